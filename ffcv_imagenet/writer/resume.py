"""A write that survives being killed: the unfinished file and a journal of what is in it.

Beside the destination `X`, while it is written:

- `.X.partial`: ffcv's layout (header, room for the metadata table, pages of sample data);
- `.X.partial.json`: what this write is (every option that changes the output, a digest of the
  source index, the page size): a later `--cfg.resume=1` continues it only when all are equal,
  and names the first that differs otherwise;
- `.X.partial.journal`: one fixed-size record per sample whose page is in the file (sample,
  data pointer, size, its metadata row), appended by the parent after the worker wrote the page:
  a sample is in the journal only once its bytes are. A record cut by a kill is dropped on read;
- `.X.partial.bad`: JSON lines of the images skipped as undecodable (skip_bad);
- `.X.partial.lock`: held (flock) while a writer works on X, so two writers never share it;
- `.X.partial.names.gz`: the source names (names.py), renamed in with the .beton.

Resuming keeps the journalled samples, cuts the file after its last whole page (a page cut by the
kill, and tables a finished-but-not-installed write appended, go) and encodes the rest into new
pages. Sample order and bytes are those of an uninterrupted write: the metadata table is in sample
order; only where each sample's bytes sit in the data region differs. All of it is removed when the
.beton is installed; a write without cfg.resume removes an unfinished one, saying so.
"""

import dataclasses
import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np

from .options import NOT_IN_OUTPUT, WriterError, WriterOptions

FORMAT = 1


class ResumeRefused(WriterError):
    """cfg.resume=1 cannot continue the kept write (other options, another source, damage)."""

# test hook: SIGKILL this writer at a named point ("state", "journal:N" after the N-th journal
# append, "finished", "installed"), so that a test can stop a write at each stage
KILL_AT_ENV = "FFCV_IMAGENET_TEST_WRITER_KILL_AT"


def crash_point(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def record_type(metadata_type: np.dtype) -> np.dtype:
    return np.dtype([("sample", "<i8"), ("ptr", "<u8"), ("size", "<u8"),
                     ("row", np.void, metadata_type.itemsize)])


def index_digest(index) -> str:
    """SHA-256 of what the index says (names, labels, byte ranges, classes)."""
    h = hashlib.sha256()
    for array in (index.names, index.labels, index.offsets, index.sizes):
        h.update(np.ascontiguousarray(array).tobytes())
    h.update(json.dumps(index.wnids).encode())
    return h.hexdigest()


def identity(opts: WriterOptions, index, page_size: int, metadata_type: np.dtype) -> dict:
    """What must be equal for a resumed write to give the same file."""
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in NOT_IN_OUTPUT}
    return {"format": FORMAT, "data_dir": str(opts.data_dir), **options, "samples": len(index),
            "source_index_sha256": index_digest(index), "page_size": page_size,
            "metadata_itemsize": metadata_type.itemsize}


class Partial:
    """The unfinished write of one destination: its files, its lock, what is already done."""

    def __init__(self, destination: Path):
        self.destination = destination
        base = destination.with_name(f".{destination.name}.partial")
        self.path = base
        self.state, self.journal, self.bad_file, self.lock_file, self.names_file = (
            base.with_name(base.name + suffix) for suffix in (".json", ".journal", ".bad", ".lock", ".names.gz"))
        self._lock_fd, self._appended = None, 0

    def lock(self) -> None:
        from ..host import LockHeld, lock_file

        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock_fd = lock_file(self.lock_file)
        except LockHeld as e:
            raise WriterError(f"{self.destination} is being written by pid {str(e) or '(unknown)'} (lock "
                              f"{self.lock_file}); wait for it or stop it") from None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            self.lock_file.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def exists(self) -> bool:
        return self.state.exists()

    def bytes_on_disk(self) -> int:
        """Disk space the kept partial holds (0 without one)."""
        try:
            return os.stat(self.path).st_blocks * 512 if self.exists() else 0
        except FileNotFoundError:
            return 0

    def remove(self) -> None:
        for path in (self.path, self.journal, self.bad_file, self.names_file, self.state):
            path.unlink(missing_ok=True)

    def done_count(self, record: np.dtype) -> int:
        size = self.journal.stat().st_size if self.journal.exists() else 0
        return size // record.itemsize

    def start(self, wanted: dict) -> None:
        """A fresh write: the state first (so a kill from here on leaves a resumable write)."""
        self.remove()
        temp = self.state.with_name(self.state.name + ".tmp")
        temp.write_text(json.dumps(wanted, indent=1) + "\n")
        os.replace(temp, self.state)
        crash_point("state")

    def check_same(self, wanted: dict) -> None:
        """WriterError naming the first option (or the source) that differs from the kept write."""
        try:
            kept = json.loads(self.state.read_text())
        except (OSError, ValueError) as e:
            raise ResumeRefused(f"{self.state}: unreadable ({e}); write again without cfg.resume") from None
        for key, value in wanted.items():
            if kept.get(key) != value:
                raise ResumeRefused(_difference(self, key, kept.get(key), value))

    def load(self, record: np.dtype, n: int) -> "Journal":
        """The journalled samples, the skipped ones, and the first free page; the file is cut after
        its last whole page."""
        size = self.journal.stat().st_size if self.journal.exists() else 0
        whole = size // record.itemsize
        if size != whole * record.itemsize:  # a record cut by a kill: gone, or later ones would shift
            os.truncate(self.journal, whole * record.itemsize)
        records = np.fromfile(self.journal, dtype=record, count=whole) if whole else np.zeros(0, dtype=record)
        if len(records) and (records["sample"].max() >= n or records["sample"].min() < 0):
            raise ResumeRefused(f"{self.journal}: sample numbers outside 0..{n - 1}; write again without cfg.resume")
        bad = {}
        if self.bad_file.exists():
            text = self.bad_file.read_text()
            if not text.endswith("\n"):  # a line cut by a kill: that image is tried again
                text = text[:text.rfind("\n") + 1]
                self.bad_file.write_text(text)
            for line in text.splitlines():
                try:
                    item = json.loads(line)
                except ValueError:
                    continue  # a line cut by the kill: that image is tried again
                bad[int(item["sample"])] = {"file": item["file"], "error": item["error"]}
        return Journal(records, bad)

    def append(self, records: np.ndarray) -> None:
        with open(self.journal, "ab") as f:
            f.write(records.tobytes())
        self._appended += 1
        crash_point(f"journal:{self._appended}")

    def remove_if_installed(self) -> None:
        """A kill between installing the .beton and removing the journal leaves the journal alone."""
        if self.state.exists() and not self.path.exists() and self.destination.exists():
            self.remove()

    def append_bad(self, sample: int, item: dict) -> None:
        with open(self.bad_file, "a") as f:
            f.write(json.dumps({"sample": sample, **item}) + "\n")


@dataclasses.dataclass
class Journal:
    records: np.ndarray
    bad: dict  # sample -> {"file", "error"}

    def done_mask(self, n: int) -> np.ndarray:
        done = np.zeros(n, dtype=bool)
        done[self.records["sample"]] = True
        done[list(self.bad)] = True
        return done


def open_write(partial: Partial, wanted: dict, resume: bool, record: np.dtype, n: int) -> tuple:
    """Continue the kept write (resume, and the same `wanted`) or start a new one; returns
    (Journal, notes for the summary)."""
    empty = Journal(np.zeros(0, dtype=record), {})
    if not partial.exists():
        partial.start(wanted)
        note = [f"cfg.resume=1: no unfinished write of {partial.destination}; wrote it from the start"]
        return empty, note if resume else []
    if not resume:
        done = partial.done_count(record)
        partial.start(wanted)
        return empty, [f"removed an unfinished write of this file ({done} of {n} samples were written); "
                       "--cfg.resume=1 continues one"]
    partial.check_same(wanted)
    journal = partial.load(record, n)
    if not partial.path.exists():
        partial.start(wanted)
        return empty, [f"cfg.resume=1: {partial.path} is gone; wrote it from the start"]
    return journal, [f"resumed: {len(journal.records)} of {n} samples were written before"
                     + (f", {len(journal.bad)} skipped" if journal.bad else "")]


def cut_to_pages(path: Path, data_start: int, page_size: int, journal: Journal) -> int:
    """Truncate the partial after its last whole page; returns the number of whole pages. A kill
    can cut the last page being written (its samples are not journalled yet) and a finished write
    that was not installed has its tables after the pages: both go."""
    size = path.stat().st_size
    pages = max(0, size - data_start) // page_size
    end = data_start + pages * page_size
    records = journal.records
    if len(records) and int((records["ptr"] + records["size"]).max()) > end:
        raise ResumeRefused(f"{path}: the journal names data past the file's last whole page (was the "
                            "file cut or replaced?); write again without cfg.resume")
    os.truncate(path, min(size, end))
    return pages


def _difference(partial: Partial, key: str, kept, wanted) -> str:
    where = f"the unfinished write of {partial.destination} (kept in {partial.path})"
    if key == "source_index_sha256" or key == "samples":
        what = "the source's images differ (files added, removed or renamed since)"
    elif key in ("format", "page_size", "metadata_itemsize"):
        what = f"it was made by another version of the writer ({key} {kept} vs {wanted})"
    else:
        what = f"it was made with cfg.{key}={kept}, not {wanted}"
    return (f"cfg.resume=1: {what}; {where} cannot be continued. Run the same command as before, "
            "or without cfg.resume to start over")
