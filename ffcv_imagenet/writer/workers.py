"""The parallel part of a write: forked worker processes decode and encode chunks of samples into
ffcv's page allocator (its file mapping shared by fork); the parent collects their reports,
stops the write on an undecodable image (unless skip_bad) or a worker that died, and always
stops the workers."""

import ctypes
import math
import mmap
import multiprocessing
import os
import queue
import signal
import traceback

import numpy as np

from .beton import (ALLOC_TABLE_TYPE, IMAGE_MODES, METADATA_TYPE, BetonStats, PageAllocator, align_to_page,
                    encode_sample, finish_file, write_header)
from .encode import decode_image, plan_proportion, store_as_jpeg
from . import resume
from .options import WriterError, WriterOptions
from .resume import Partial
from .sources import ImageIndex, read_bytes


def _die_with_parent(parent_pid: int):
    """A SIGKILLed parent must not leave workers writing a partial file."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker(worker_id, parent_pid, index, opts, jpeg_plan, metadata_buffer, record, allocator,
            tasks, results):
    """Encode the samples of each chunk from `tasks` until None; report on `results`:
    ("done", count) per chunk, ("bad", i, file, error) per undecodable image, ("written", records)
    after each page written (resume.record_type rows), then ("finished", worker_id) or ("crash",
    worker_id, traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    # Forked after write_dataset installed its SIGTERM handler: restore the default so that the
    # parent's terminate() stops a worker at once, even inside a long decode.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    try:
        import cv2

        cv2.setNumThreads(1)
        metadata = np.frombuffer(metadata_buffer, dtype=METADATA_TYPE)
        allocator.report = lambda allocations: results.put(
            ("written", journal_records(allocations, metadata, record).tobytes()))
        with allocator:
            for chunk in iter(tasks.get, None):
                for i in chunk:
                    try:
                        image = decode_image(read_bytes(index, i), opts.max_resolution)
                    except Exception as e:
                        results.put(("bad", int(i), index.display_name(i), f"{type(e).__name__}: {e}"))
                        continue
                    jpeg = store_as_jpeg(opts.write_mode, image.shape[0], image.shape[1],
                                         opts.smart_threshold, jpeg_plan[i])
                    encode_sample(allocator, metadata, i, image, jpeg, opts, int(index.labels[i]))
                results.put(("done", len(chunk)))
        results.put(("finished", worker_id))
    except BaseException:
        results.put(("crash", worker_id, traceback.format_exc()))
        results.close()
        results.join_thread()  # deliver the report before dying
        os._exit(1)


def journal_records(allocations: list, metadata: np.ndarray, record: np.dtype) -> np.ndarray:
    """Journal rows for allocations (sample, ptr, size): where each sample's bytes are, and its
    metadata row."""
    places = np.array(allocations, dtype=np.int64).reshape(-1, 3)
    rows = np.zeros(len(places), dtype=record)
    rows["sample"], rows["ptr"], rows["size"] = places[:, 0], places[:, 1], places[:, 2]
    rows["row"] = metadata[places[:, 0]].view(rows.dtype["row"])
    return rows


def write_beton(partial: Partial, index: ImageIndex, opts: WriterOptions, page_size: int,
                progress: bool) -> tuple:
    """Encode every image of `index` into partial.path (opts.num_workers processes), continuing a
    kept unfinished write when opts.resume; returns (BetonStats, notes)."""
    n = len(index)
    record = resume.record_type(METADATA_TYPE)
    journal, notes = resume.open_write(partial, resume.identity(opts, index, page_size, METADATA_TYPE),
                                       opts.resume, record, n)
    header, metadata_start = write_header(partial.path, n, page_size,
                                          keep_rest=partial.path.exists() and bool(len(journal.records)))
    data_start = align_to_page(metadata_start + n * METADATA_TYPE.itemsize, page_size)
    first_page = resume.cut_to_pages(partial.path, data_start, page_size, journal)
    context = multiprocessing.get_context("fork")
    # Anonymous shared memory: inherited by the forked workers, gone with the processes
    # (no /dev/shm segment to leak on SIGKILL, unlike multiprocessing.shared_memory).
    metadata_buffer = mmap.mmap(-1, max(1, n * METADATA_TYPE.itemsize))
    allocator = PageAllocator(partial.path, data_start, page_size, first_page, context)
    if opts.write_mode == "proportion":
        jpeg_plan = plan_proportion(n, opts.compress_probability)
    else:
        jpeg_plan = np.zeros(n, dtype=bool)
    pending = np.flatnonzero(~journal.done_mask(n))
    del journal.records  # read again, whole, at the end; not held through the write
    worker_args = (index, opts, jpeg_plan, metadata_buffer, record, allocator)
    bad = _run_workers(context, pending, n, opts, worker_args, partial, journal.bad, progress)
    # every journalled sample, earlier attempts' and this one's
    return _finish(partial, header, metadata_start, partial.load(record, n).records, bad, n), notes


def _finish(partial: Partial, header, metadata_start: int, records: np.ndarray, bad: dict, n: int) -> BetonStats:
    """The metadata and allocation tables from the journal, written at the end of the file."""
    if len(bad) == n:
        raise WriterError(f"none of the {n} images could be decoded; first: {bad[min(bad)]}")
    missing = n - len(bad) - len(np.unique(records["sample"]))
    if missing or len(records) != len(np.unique(records["sample"])):
        raise WriterError(f"{partial.journal}: {len(records)} journal records for {n - len(bad)} samples "
                          f"({missing} missing); write again without cfg.resume")
    metadata = np.zeros(n, dtype=METADATA_TYPE)
    metadata.view(records.dtype["row"])[records["sample"]] = records["row"]
    table = np.zeros(len(records), dtype=ALLOC_TABLE_TYPE)
    table["sample_id"], table["ptr"], table["size"] = records["sample"], records["ptr"], records["size"]
    del records
    metadata = finish_file(partial.path, header, metadata_start, metadata, table, set(bad))
    image_meta = metadata[METADATA_TYPE.names[0]]
    num_jpeg = int(np.sum(image_meta["mode"] == IMAGE_MODES["jpg"]))
    return BetonStats(num_samples=len(metadata), num_raw=len(metadata) - num_jpeg,
                      num_jpeg=num_jpeg, skipped=[bad[i] for i in sorted(bad)],
                      widths=image_meta["width"].copy(), heights=image_meta["height"].copy())


def _run_workers(context, pending: np.ndarray, n: int, opts: WriterOptions, worker_args: tuple,
                 partial: Partial, journalled_bad: dict, progress: bool) -> dict:
    """Encode the `pending` samples in chunks with worker processes, journalling each page written,
    showing a progress bar that starts at what an earlier attempt wrote.

    Returns {sample index: {"file", "error"}} of skipped images (this attempt's and the journal's).
    Raises WriterError for an undecodable image (unless opts.skip_bad), RuntimeError when a
    worker fails; the workers are stopped whatever happens.
    """
    from ..progress import progress as progress_bar

    bad = dict(journalled_bad)
    if bad and not opts.skip_bad:
        first = bad[min(bad)]
        raise WriterError(f"{first['file']}: skipped as undecodable by the unfinished write this "
                          "resumes (it ran with cfg.skip_bad=1); resume with --cfg.skip_bad=1 too")
    if not len(pending):
        return bad
    tasks, results = context.Queue(), context.Queue()
    num_workers = max(1, min(opts.num_workers, math.ceil(len(pending) / opts.chunk_size)))
    for start in range(0, len(pending), opts.chunk_size):
        tasks.put(pending[start:start + opts.chunk_size].tolist())
    for _ in range(num_workers):
        tasks.put(None)
    workers = [context.Process(target=_worker, daemon=True,
                               args=(w, os.getpid(), *worker_args, tasks, results))
               for w in range(num_workers)]
    record, finished = worker_args[4], set()
    try:
        for w in workers:
            w.start()
        with progress_bar(total=n, unit="img", desc="writing", enabled=progress, leave=True) as bar:
            bar.update(n - len(pending))  # done by an earlier attempt
            while len(finished) < num_workers:
                message = _next_message(results, workers, finished)
                if message is not None:
                    _handle(message, bar, bad, finished, partial, record, opts)
        for w in workers:
            w.join()
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
        for w in workers:
            if w.pid is not None:
                w.join()
        # After an error, chunks nobody will read may fill the pipe; without this, the exit of
        # this process would wait forever for the queue's feeder thread to deliver them.
        tasks.cancel_join_thread()
    return bad


def _handle(message: tuple, bar, bad: dict, finished: set, partial: Partial, record, opts) -> None:
    """One worker report (see _worker)."""
    kind = message[0]
    if kind == "done":
        bar.update(message[1])
    elif kind == "written":
        partial.append(np.frombuffer(message[1], dtype=record))
    elif kind == "bad":
        _, i, name, error = message
        if not opts.skip_bad:
            what = "image too small" if error.startswith("TooSmall") else "cannot decode image"
            raise WriterError(f"{name}: {what} ({error}); fix or remove "
                              "it, or pass --cfg.skip_bad=1 to skip such files")
        bad[i] = {"file": name, "error": error}
        partial.append_bad(i, bad[i])
    elif kind == "finished":
        finished.add(message[1])
    elif kind == "crash":
        raise RuntimeError(f"writer worker {message[1]} failed:\n{message[2]}")


def _next_message(results, workers, finished: set):
    """The next worker report, or None after 1 s without one; RuntimeError if a worker that has
    not finished died silently (killed by the kernel for memory, typically)."""
    try:
        return results.get(timeout=1.0)
    except queue.Empty:
        dead = [w for i, w in enumerate(workers) if i not in finished and not w.is_alive()]
        if dead:
            raise RuntimeError(f"writer worker died (exit code {dead[0].exitcode}) without "
                               "reporting an error; out of memory?") from None
        return None
