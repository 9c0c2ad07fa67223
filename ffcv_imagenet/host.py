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


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
