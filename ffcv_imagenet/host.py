"""What this machine offers a process, asked in one place (no torch import: the writer's option
check and --help use it)."""

import fcntl
import os
import socket


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


class LockHeld(Exception):
    """Another process holds the lock; the message is what it wrote in the file (pid@host)."""


def lock_file(path) -> int:
    """Hold an exclusive flock on `path` (made if missing) for this process, with pid@host written
    in it; returns the descriptor (closing it, or the process's end however it ends, lets go).
    LockHeld naming the holder when another process has it. A holder may remove the file as it
    lets go; a lock taken on a file no longer at `path` is dropped and taken on the new one, so
    two processes never both hold `path`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}".encode(), 0)
    return fd


def memory_available_bytes() -> int:
    """RAM this process can still fill: the machine's available memory, or less when a memory
    cgroup (a SLURM job, a container, `systemd-run -p MemoryMax=`) caps it. The page cache of a
    file counts against the cgroup's limit too, so a file larger than this thrashes when mapped."""
    import psutil

    available = psutil.virtual_memory().available
    room = cgroup_memory_room_bytes()
    return available if room is None else min(available, room)


def cgroup_memory_room_bytes(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup") -> "int | None":
    """The smallest room (memory limit less the anonymous memory charged) of this process's
    memory cgroup and the cgroups above it (a SLURM job's limit sits on the job's, above the
    step's): cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`; None when no limit applies or
    none can be read."""
    try:
        with open(proc_cgroup) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    rooms = []
    for _, controllers, path in lines:
        if controllers == "":  # v2: "0::/path", under the unified mount
            mounts, limit_file, anon_key = (root, os.path.join(root, "unified")), "memory.max", "anon"
        elif "memory" in controllers.split(","):
            mounts, limit_file, anon_key = (os.path.join(root, "memory"),), "memory.limit_in_bytes", "total_rss"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for mount in mounts:
            for depth in range(len(parts), -1, -1):  # this cgroup, then each one above it
                room = _room(os.path.join(mount, *parts[:depth]), limit_file, anon_key)
                if room is not None:
                    rooms.append(room)
    return min(rooms) if rooms else None


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
