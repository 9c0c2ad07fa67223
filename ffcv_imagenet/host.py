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


def memory_available_bytes() -> int:
    """RAM this process can still fill: the machine's available memory, or less when a memory
    cgroup (a SLURM job, a container, `systemd-run -p MemoryMax=`) caps it. The page cache of a
    file counts against the cgroup's limit too, so a file larger than this thrashes when mapped."""
    import psutil

    available = psutil.virtual_memory().available
    room = cgroup_memory_room_bytes()
    return available if room is None else min(available, room)


def cgroup_memory_room_bytes(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup") -> "int | None":
    """The memory limit of this process's cgroup less the anonymous memory charged to it (cgroup v2
    `memory.max`, or v1 `memory.limit_in_bytes`); None when no limit applies or none can be read."""
    try:
        with open(proc_cgroup) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for _, controllers, path in lines:
        if controllers == "":  # v2: "0::/path", under the unified mount
            for mount in (root, os.path.join(root, "unified")):
                folder = os.path.join(mount, path.lstrip("/"))
                room = _room(folder, "memory.max", "anon")
                if room is not None:
                    return room
        elif "memory" in controllers.split(","):
            room = _room(os.path.join(root, "memory", path.lstrip("/")), "memory.limit_in_bytes", "total_rss")
            if room is not None:
                return room
    return None


def _room(folder: str, limit_file: str, anon_key: str) -> "int | None":
    try:
        with open(os.path.join(folder, limit_file)) as f:
            text = f.read().strip()
        with open(os.path.join(folder, "memory.stat")) as f:
            stat = dict(line.split() for line in f if len(line.split()) == 2)
    except OSError:
        return None
    if text == "max" or int(text) >= 2**62:  # v2 "max"; v1 "no limit" is a huge page-rounded number
        return None
    return max(0, int(text) - int(stat.get(anon_key, 0)))
