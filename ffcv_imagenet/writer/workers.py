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

from .beton import BetonStats, beton_fields, encode_sample, finish_file, write_header
from .encode import decode_image, plan_proportion, store_as_jpeg
from .options import WriterError, WriterOptions
from .sources import ImageIndex, read_bytes


def _die_with_parent(parent_pid: int):
    """A SIGKILLed parent must not leave workers writing a partial file."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker(worker_id, parent_pid, index, opts, jpeg_plan, fields, metadata_buffer, metadata_type,
            allocator, tasks, results):
    """Encode the chunks (start, stop) from `tasks` until None; report on `results`:
    ("done", count) per chunk, ("bad", i, file, error) per undecodable image, then
    ("allocations", worker_id, [...]) or ("crash", worker_id, traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    # Forked after write_dataset installed its SIGTERM handler: restore the default so that the
    # parent's terminate() stops a worker at once, even inside a long decode.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    try:
        import cv2

        cv2.setNumThreads(1)
        metadata = np.frombuffer(metadata_buffer, dtype=metadata_type)
        with allocator:
            for start, stop in iter(tasks.get, None):
                for i in range(start, stop):
                    try:
                        image = decode_image(read_bytes(index, i), opts.max_resolution)
                    except Exception as e:
                        results.put(("bad", i, index.display_name(i), f"{type(e).__name__}: {e}"))
                        continue
                    jpeg = store_as_jpeg(opts.write_mode, image.shape[0], image.shape[1],
                                         opts.smart_threshold, jpeg_plan[i])
                    encode_sample(allocator, metadata, i, image, jpeg, opts,
                                   fields["label"], int(index.labels[i]))
                results.put(("done", stop - start))
        results.put(("allocations", worker_id, allocator.allocations))
    except BaseException:
        results.put(("crash", worker_id, traceback.format_exc()))
        results.close()
        results.join_thread()  # deliver the report before dying
        os._exit(1)


def write_beton(path, index: ImageIndex, opts: WriterOptions, page_size: int, progress: bool) -> BetonStats:
    """Encode every image of `index` into the .beton at `path` (opts.num_workers processes)."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.types import get_metadata_type

    n = len(index)
    fields = beton_fields(opts)
    metadata_type = get_metadata_type(list(fields.values()))
    header, metadata_start = write_header(path, n, fields, page_size)
    # Anonymous shared memory: inherited by the forked workers, gone with the processes
    # (no /dev/shm segment to leak on SIGKILL, unlike multiprocessing.shared_memory).
    metadata_buffer = mmap.mmap(-1, max(1, n * metadata_type.itemsize))
    allocator = MemoryAllocator(str(path), metadata_start + n * metadata_type.itemsize, page_size)
    if opts.write_mode == "proportion":
        jpeg_plan = plan_proportion(n, opts.compress_probability)
    else:
        jpeg_plan = np.zeros(n, dtype=bool)
    worker_args = (index, opts, jpeg_plan, fields, metadata_buffer, metadata_type, allocator)
    allocations, bad = _run_workers(n, opts, worker_args, progress)
    if len(bad) == n:
        raise WriterError(f"none of the {n} images could be decoded; first: {bad[min(bad)]}")

    metadata = np.frombuffer(metadata_buffer, dtype=metadata_type)[:n].copy()
    metadata = finish_file(path, header, metadata_start, metadata, allocations, set(bad))
    image_meta = metadata[metadata_type.names[0]]
    num_jpeg = int(np.sum(image_meta["mode"] == 0))  # ffcv: 0 = jpg, 1 = raw
    return BetonStats(num_samples=len(metadata), num_raw=len(metadata) - num_jpeg,
                      num_jpeg=num_jpeg, skipped=[bad[i] for i in sorted(bad)],
                      widths=image_meta["width"].copy(), heights=image_meta["height"].copy())


def _run_workers(n: int, opts: WriterOptions, worker_args: tuple, progress: bool) -> tuple:
    """Encode samples 0..n-1 in chunks with worker processes, showing a progress bar.

    Returns (allocations of all workers, {sample index: {"file", "error"}} of skipped images).
    Raises WriterError for an undecodable image (unless opts.skip_bad), RuntimeError when a
    worker fails; the workers are stopped whatever happens.
    """
    from ..progress import progress as progress_bar

    context = multiprocessing.get_context("fork")
    tasks, results = context.Queue(), context.Queue()
    num_workers = max(1, min(opts.num_workers, math.ceil(n / opts.chunk_size)))
    for start in range(0, n, opts.chunk_size):
        tasks.put((start, min(n, start + opts.chunk_size)))
    for _ in range(num_workers):
        tasks.put(None)
    workers = [context.Process(target=_worker, daemon=True,
                               args=(w, os.getpid(), *worker_args, tasks, results))
               for w in range(num_workers)]
    allocations, bad, finished = [], {}, set()
    try:
        for w in workers:
            w.start()
        with progress_bar(total=n, unit="img", desc="writing", enabled=progress, leave=True) as bar:
            while len(finished) < num_workers:
                message = _next_message(results, workers, finished)
                if message is None:
                    continue
                kind = message[0]
                if kind == "done":
                    bar.update(message[1])
                elif kind == "bad":
                    _, i, name, error = message
                    if not opts.skip_bad:
                        what = "image too small" if error.startswith("TooSmall") else "cannot decode image"
                        raise WriterError(f"{name}: {what} ({error}); fix or remove "
                                          "it, or pass --cfg.skip_bad=1 to skip such files")
                    bad[i] = {"file": name, "error": error}
                elif kind == "allocations":
                    finished.add(message[1])
                    allocations.extend(message[2])
                elif kind == "crash":
                    raise RuntimeError(f"writer worker {message[1]} failed:\n{message[2]}")
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
    return allocations, bad


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
