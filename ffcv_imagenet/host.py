"""What this machine offers a process, asked in one place (no torch import: the writer's option
check and --help use it)."""

import os


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: what a container or `taskset`
    leaves it), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
