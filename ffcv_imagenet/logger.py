"""The run folder and its time-to-accuracy log.

Layout: `logging.folder` *is* the run folder (no generated run id, so that `training.resume=auto`
with the same command line finds it again):

    <folder>/params.json     resolved config + derived values (global batch, accum steps, peak lr)
    <folder>/env.json        versions, devices, world size, host, CPU count, git commit
    <folder>/log.jsonl       one JSON object per line (below)
    <folder>/checkpoint.pt   last complete epoch (see checkpoint.py); checkpoint.prev.pt the one before
    <folder>/.lock           held (flock) by the run's rank 0 while it runs: a second launch into
                             the folder is refused, naming the holder's pid

log.jsonl lines, in order:
    {"type": "start", "startup_s", "world_size", "global_batch_size", "batch_size_per_gpu",
     "accum_steps", "peak_lr", "precision", "device", "resumed_from_epoch": null|int, "argv", "time"}
        at every (re)start (argv: this launch's command-line arguments; params.json keeps the last's);
    {"type": "epoch", "epoch", "lr", "resolution", "train_loss", "train_images_per_s", "top_1",
     "top_5", "val_loss", "val_count", "epoch_s", "elapsed_s", "time"}  per epoch (0-based);
    {"type": "summary", "epochs", "top_1", "top_5", "elapsed_s", "startup_s", "total_images",
     "mean_images_per_s", "preset", "time"}  once, at the end;
    (epoch lines and the summary also hold "real_top_1", "real_count" with validation.real_labels)
    {"type": "eval", "checkpoint", "epoch", "weights", "top_1", "top_5", "val_loss", "val_count",
     ["real_top_1", "real_count"], "predictions", "time"}  per training.eval_only into the folder,
        which also writes predictions.csv there.

Only rank 0 writes; other ranks get a logger that does nothing (the one rank check lives here).
"""

import datetime
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunLogger:
    def __init__(self, folder, *, enabled: bool):
        self.folder = str(folder)
        self.enabled = enabled
        self.log_path = os.path.join(self.folder, "log.jsonl")
        self.created_folder = enabled and not os.path.exists(self.folder)
        if enabled:
            os.makedirs(self.folder, exist_ok=True)

    def lock(self) -> None:
        """Take the folder's lock for this process (rank 0), or FileExistsError naming the pid of
        the process that holds it. The kernel releases it when the process ends, however it ends."""
        if not self.enabled:
            return
        path = os.path.join(self.folder, ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FileExistsError(f"{self.folder} is in use by another run (pid@host {holder}); wait "
                                  "for it to end or choose another --logging.folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}@{socket.gethostname()}".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock; a folder left holding nothing but it (a launch refused before it
        wrote anything) is removed."""
        fd = getattr(self, "_lock_fd", None)
        if fd is None:
            return
        self._lock_fd = None
        try:
            if self.created_folder and os.listdir(self.folder) == [".lock"]:
                os.remove(os.path.join(self.folder, ".lock"))
                os.rmdir(self.folder)
        except OSError:
            pass  # another launch took the folder meanwhile: it stays
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def write_json(self, name: str, obj: dict) -> None:
        if not self.enabled:
            return
        path = os.path.join(self.folder, name)
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": record.get("time", now_iso())}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list:
        """The log's records; a line cut off by a kill in the middle of a write is left out (the
        resume that reads them rewrites the log without it)."""
        if not os.path.exists(self.log_path):
            return []
        records = []
        with open(self.log_path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def keep_epochs_before(self, epoch: int) -> None:
        """On resume from a checkpoint taken after `epoch` epochs: drop epoch lines >= epoch and
        any summary, so that the log never holds an epoch twice."""
        if not self.enabled or not os.path.exists(self.log_path):
            return
        kept = [r for r in self.records()
                if not (r.get("type") == "epoch" and r.get("epoch", -1) >= epoch)
                and r.get("type") != "summary"]
        tmp = self.log_path + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.log_path)


def git_commit(path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def package_versions(packages) -> dict:
    """{distribution name: installed version, or None when it is not installed}."""
    from importlib import metadata

    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def environment(world_size: int) -> dict:
    """Versions, devices and host of this run."""
    import torch

    from ffcv_imagenet.distributed import cpu_has_fast_bf16

    versions = package_versions(("torch", "torchvision", "ffcv", "numba", "numpy", "fastargs",
                                 "ffcv-imagenet"))
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "versions": versions,
        "cuda": torch.version.cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "device_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "world_size": world_size,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2, AVX512
        "cpu_native_bf16": cpu_has_fast_bf16(),
        "git_commit": git_commit(os.path.dirname(os.path.abspath(__file__))),
        "time": now_iso(),
    }
