"""The run folder and its time-to-accuracy log.

Layout: `logging.folder` *is* the run folder (no generated run id, so that `training.resume=auto`
with the same command line finds it again):

    <folder>/params.json     resolved config + derived values (global batch, accum steps, peak lr)
    <folder>/env.json        versions, devices, world size, host, CPU count, git commit
    <folder>/log.jsonl       one JSON object per line (below): the run's record, which `report`,
                             `check` and resume read
    <folder>/epochs.csv      logging.csv=1: its epoch lines as a table (CsvSink)
    <folder>/tensorboard/    logging.tensorboard=1: event files (TensorBoardSink)
    <folder>/checkpoint.pt   last complete epoch (see checkpoint.py); checkpoint.prev.pt the one before
    <folder>/.lock           held (flock) by the run's rank 0 while it runs: a second launch into
                             the folder is refused, naming the holder's pid

log.jsonl lines, in order:
    {"type": "start", "startup_s", "world_size", "global_batch_size", "batch_size_per_gpu",
     "accum_steps", "peak_lr", "precision", "device", "resumed_from_epoch": null|int, "argv", "time"}
        at every (re)start (argv: this launch's command-line arguments; params.json keeps the last's);
    {"type": "epoch", "epoch", "step", "lr", "resolution", "train_loss", "train_images_per_s",
     "top_1", "top_5", "val_loss", "val_count", "epoch_s", "elapsed_s", "time"}  per epoch
        (0-based; step: the run's optimizer steps at its end);
    {"type": "summary", "epochs", "top_1", "top_5", "elapsed_s", "startup_s", "total_images",
     "mean_images_per_s", "preset", "time"}  once, at the end;
    (epoch lines and the summary also hold "real_top_1", "real_count" with validation.real_labels)
    {"type": "eval", "checkpoint", "epoch", "weights", "top_1", "top_5", "val_loss", "val_count",
     ["real_top_1", "real_count"], "predictions", "time"}  per training.eval_only into the folder,
        which also writes predictions.csv there.

Every record goes to the logger's sinks (`Sink`: open, record, steps, close): log.jsonl always,
and epochs.csv and TensorBoard when asked. Per-step loss and lr (`RunLogger.steps`) go to
TensorBoard only: they arrive in windows read from the device with the loop's non-finite check,
and log.jsonl stays a short per-epoch record (each line is fsynced).

Only rank 0 writes; other ranks get a logger that does nothing (the one rank check lives here).
"""

import csv
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass, fields


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SinkOptions:
    """Where the log goes besides log.jsonl: the keys of config section `logging` of the same
    names (declared there, with their defaults and help)."""
    tensorboard: bool
    csv: bool
    step_every: int  # optimizer steps between per-step points

    @classmethod
    def from_config(cls, logging_cfg: dict) -> "SinkOptions":
        return cls(**{f.name: logging_cfg[f.name] for f in fields(cls)})


class RunLogger:
    """The run folder's writer (rank 0; `enabled=False` elsewhere, where every method does
    nothing). `log` works from construction on (log.jsonl only); `open` (once the run knows where
    it goes on from) adds the sinks of `options` (None: log.jsonl only), `close` ends them."""

    def __init__(self, folder, *, enabled: bool, options: "SinkOptions | None" = None):
        self.folder = str(folder)
        self.enabled = enabled
        self.options = options
        self.log_path = os.path.join(self.folder, "log.jsonl")
        self.jsonl = JsonlSink(self.log_path)
        self.sinks = [self.jsonl]
        self.created_folder = enabled and not os.path.exists(self.folder)
        if enabled:
            os.makedirs(self.folder, exist_ok=True)

    def lock(self) -> None:
        """Take the folder's lock for this process (rank 0), or FileExistsError naming the pid of
        the process that holds it. The kernel releases it when the process ends, however it ends."""
        if not self.enabled:
            return
        from .host import LockHeld, lock_file

        try:
            self._lock_fd = lock_file(os.path.join(self.folder, ".lock"))
        except LockHeld as e:
            raise FileExistsError(f"{self.folder} is in use by another run (pid@host {str(e) or 'unknown'}); "
                                  "wait for it to end or choose another --logging.folder") from None

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

    def open(self, *, epoch: int, step: int) -> None:
        """The run goes on after `epoch` complete epochs, `step` optimizer steps (0, 0: from the
        start): the log drops what came later (an epoch logged but not checkpointed before a
        kill), and the sinks of `options` start, each given the log's epochs so far."""
        if not self.enabled:
            return
        past = {r["epoch"]: r for r in self.records()
                if r.get("type") == "epoch" and isinstance(r.get("epoch"), int) and r["epoch"] < epoch}
        self.sinks = [self.jsonl]
        if self.options is not None and self.options.csv:
            self.sinks.append(CsvSink(os.path.join(self.folder, "epochs.csv")))
        if self.options is not None and self.options.tensorboard:
            self.sinks.append(TensorBoardSink(os.path.join(self.folder, "tensorboard")))
        for sink in self.sinks:
            sink.open(epoch=epoch, step=step, past_epochs=[past[e] for e in sorted(past)])

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": record.get("time", now_iso())}
        for sink in self.sinks:
            sink.record(record)

    def steps(self, points: list) -> None:
        """Per-step points [(the run's optimizer step, 1-based; loss; lr)], as read from the
        device (a window at a time): those at multiples of `options.step_every` go to the sinks."""
        if not self.enabled or self.options is None:
            return
        kept = [p for p in points if p[0] % self.options.step_every == 0]
        if kept:
            for sink in self.sinks:
                sink.steps(kept)

    def close(self) -> None:
        """End the sinks (flushed and closed), at the end of the launch however it ends."""
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.close()
        self.sinks = [self.jsonl]

    def records(self) -> list:
        return self.jsonl.records()

    def keep_epochs_before(self, epoch: int) -> None:
        if self.enabled:
            self.jsonl.keep_epochs_before(epoch)


# --------------------------------------------------------------------------- sinks

class Sink:
    """One destination of the run log; each method may do nothing.

    open(epoch=, step=, past_epochs=): once per launch, before its first record: the run goes on
        after `epoch` epochs and `step` optimizer steps; `past_epochs` are the log's epoch records
        before that, in order (a sink that starts empty may fill itself from them).
    record(record): every record of log.jsonl as it is written ("type": start, epoch, ...).
    steps(points): per-step [(optimizer step of the run, loss, lr)], already thinned to
        logging.step_every.
    close(): at the end of the launch, however it ends.
    """

    def open(self, *, epoch: int, step: int, past_epochs: list) -> None:
        pass

    def record(self, record: dict) -> None:
        pass

    def steps(self, points: list) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink(Sink):
    """log.jsonl, the source of truth: one line per record, fsynced (a kill loses at most the line
    being written). Takes no per-step points."""

    def __init__(self, path: str):
        self.path = path

    def open(self, *, epoch: int, step: int, past_epochs: list) -> None:
        self.keep_epochs_before(epoch)

    def record(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list:
        """The log's records; a line cut off by a kill in the middle of a write is left out (the
        resume that reads them rewrites the log without it)."""
        if not os.path.exists(self.path):
            return []
        records = []
        with open(self.path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def keep_epochs_before(self, epoch: int) -> None:
        """On resume from a checkpoint taken after `epoch` epochs: drop epoch lines >= epoch and
        any summary, so that the log never holds an epoch twice."""
        if not os.path.exists(self.path):
            return
        kept = [r for r in self.records()
                if not (r.get("type") == "epoch" and r.get("epoch", -1) >= epoch)
                and r.get("type") != "summary"]
        tmp = self.path + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)


def epoch_fields(record: dict) -> dict:
    """An epoch record's scalar fields (all but `type`), in the record's order; None stays None."""
    return {k: v for k, v in record.items()
            if k != "type" and (v is None or isinstance(v, (str, int, float)))}


class CsvSink(Sink):
    """epochs.csv: one row per epoch line, its scalar fields as columns (an empty cell for None).
    Columns keep the order in which they first appeared; a field that first appears later (the
    `*_no_ema` figures of an EMA run's last epoch) is added at the end, the file rewritten with it.
    A resumed launch appends (rows of epochs it replays are dropped first, as in log.jsonl); a
    launch that finds no file starts it from the log's epochs so far."""

    def __init__(self, path: str):
        self.path = path
        self.columns = []

    def _read(self) -> list:
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            self.columns = list(reader.fieldnames or [])
        return rows

    def _write(self, rows: list) -> None:
        tmp = self.path + f".tmp{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def open(self, *, epoch: int, step: int, past_epochs: list) -> None:
        if not os.path.exists(self.path):
            for record in past_epochs:
                self.record(record)
            return
        rows = self._read()
        kept = [row for row in rows if (row.get("epoch") or "").isdigit() and int(row["epoch"]) < epoch]
        if len(kept) < len(rows):
            self._write(kept)

    def record(self, record: dict) -> None:
        if record.get("type") != "epoch":
            return
        row = epoch_fields(record)
        added = [k for k in row if k not in self.columns]
        if added or not os.path.exists(self.path):
            rows = self._read() if os.path.exists(self.path) else []
            self.columns += [k for k in added if k not in self.columns]
            self._write(rows + [row])
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(row)


def summary_writer_class():
    """torch's SummaryWriter, imported only when asked for (it needs the optional tensorboard
    package); ImportError in one line naming the package when it cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        reason = (str(e).strip().splitlines() or ["no reason given"])[0]
        raise ImportError(f"logging.tensorboard=1 needs the tensorboard package, which cannot be "
                          f"imported here ({reason}): pip install tensorboard, or install "
                          "ffcv-imagenet[tensorboard]") from None
    return SummaryWriter


class TensorBoardSink(Sink):
    """Event files in one folder, x = the run's optimizer steps: per epoch, each numeric field of
    the epoch record as `epoch/<field>` at the step that ended the epoch (`step` of the record);
    per step, `step/loss` and `step/lr`. Flushed after each epoch. A launch opens the folder with
    purge_step = its first step, so that TensorBoard hides what an earlier launch wrote from there
    on (the part of an epoch replayed after a kill): the curves continue instead of overlapping."""

    def __init__(self, folder: str):
        self.folder = folder
        self.writer = None

    def open(self, *, epoch: int, step: int, past_epochs: list) -> None:
        fresh = not (os.path.isdir(self.folder) and any(
            name.startswith("events.out.tfevents") for name in os.listdir(self.folder)))
        self.writer = summary_writer_class()(self.folder, purge_step=step + 1)
        if fresh:  # logging.tensorboard=1 from a resumed launch on: the epochs so far, from the log
            for record in past_epochs:
                self._epoch(record)

    def record(self, record: dict) -> None:
        if record.get("type") == "epoch":
            self._epoch(record)
            self.writer.flush()

    def _epoch(self, record: dict) -> None:
        if not isinstance(record.get("step"), int):
            return  # written before epoch lines held their step: no place on the axis
        wall_s = datetime.datetime.fromisoformat(record["time"]).timestamp() if "time" in record else None
        for name, value in epoch_fields(record).items():
            if name not in ("epoch", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"epoch/{name}", value, record["step"], walltime=wall_s)

    def steps(self, points: list) -> None:
        for step, loss, lr in points:
            self.writer.add_scalar("step/loss", loss, step)
            self.writer.add_scalar("step/lr", lr, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


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
                                 "tensorboard", "ffcv-imagenet"))
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
