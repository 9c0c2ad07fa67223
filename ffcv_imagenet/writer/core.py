"""write_dataset: checked options -> index -> size check -> partial file -> metadata -> rename."""

import signal
import sys
import time
from pathlib import Path

from ..metadata import fingerprint
from ..names import kept_names, write_names
from .encode import check_free_space, estimate_output_bytes, page_size_for, single_threaded_opencv
from .install import (install, metadata_record, prepare_destination, raise_terminated,
                      remove_stale_partials, threading_is_main)
from .options import WriterError, WriterOptions, check_options
from .resume import Partial, ResumeRefused, crash_point
from .sources import index_input, take_subset
from .workers import write_beton


def write_dataset(data_dir, write_path, *, progress=True, **options) -> dict:
    """Write the images at `data_dir` to `write_path` (.beton) and `<write_path>.meta.json`.

    `options` are those of `ffcv-imagenet write --help` by name (OPTIONS; omitted or None: the
    default; num_workers 0 = all cores). Returns the summary: samples, classes, bytes, raw/jpeg
    counts, seconds, images_per_s, skipped files, paths. Raises WriterError (bad input) or
    ValueError (bad option).
    """
    return write(check_options({"data_dir": str(data_dir), "write_path": str(write_path), **options}),
                 progress=progress)


def write(opts: WriterOptions, *, progress=True) -> dict:
    """`write_dataset` for options already checked: index -> checks -> partial file -> metadata
    -> rename (install.py)."""
    with single_threaded_opencv():
        return _write(opts, progress)


def _write(opts: WriterOptions, progress: bool) -> dict:
    started_s = time.time()
    partial = Partial(Path(opts.write_path).absolute())
    partial.lock()
    try:
        partial.remove_if_installed()
        destination = prepare_destination(opts)
        return _write_locked(opts, destination, partial, started_s, progress)
    except ResumeRefused:
        raise
    except BaseException:
        if progress and partial.exists():
            print(f"ffcv-imagenet write: kept the unfinished write ({partial.path}): the same command "
                  "with --cfg.resume=1 continues it; without, it starts over", file=sys.stderr)
        raise
    finally:
        partial.unlock()


def _write_locked(opts: WriterOptions, destination, partial: Partial, started_s: float, progress: bool) -> dict:
    stale = remove_stale_partials(destination)
    index_started_s = time.time()
    index = index_input(opts.data_dir, opts.split, opts.val_labels, opts.classes, progress)
    index_seconds = time.time() - index_started_s
    images_found = len(index)
    index, short_classes = take_subset(index, opts.subset)
    if not len(index):
        raise WriterError(f"cfg.data_dir={opts.data_dir}: no images to write")
    page_size = page_size_for(opts.max_resolution)
    estimated_bytes = estimate_output_bytes(index, opts, page_size)
    # a kept partial already holds part of the file (resume), or is removed before writing (not)
    check_free_space(destination.parent, estimated_bytes - partial.bytes_on_disk())

    previous_sigterm = None
    if threading_is_main():
        previous_sigterm = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        write_started_s = time.time()
        stats, notes = write_beton(partial, index, opts, page_size, progress)
        crash_point("finished")
        write_seconds = time.time() - write_started_s
        num_bytes = partial.path.stat().st_size
        meta = {**metadata_record(index, opts, stats, num_bytes, images_found),
                "fingerprint": fingerprint(partial.path),
                # the sidecar goes in before the metadata that records its hash (names.py)
                "names": write_names(destination, kept_names(index, stats.skipped), to=partial.names_file)}
        meta_file = install(partial.path, destination, meta, partial.names_file)
        crash_point("installed")
        partial.remove()
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)

    summary = write_summary(opts, index, stats, destination=destination, meta_file=meta_file,
                            num_bytes=num_bytes, estimated_bytes=estimated_bytes,
                            seconds=time.time() - started_s, index_seconds=index_seconds,
                            write_seconds=write_seconds,
                            notes=index.notes + notes + [f"removed stale partial file {p}" for p in stale],
                            short_classes=short_classes)
    if progress:
        print(format_summary(summary), file=sys.stderr)
    return summary


def write_summary(opts: WriterOptions, index, stats, *, destination, meta_file, num_bytes, estimated_bytes,
                  seconds, index_seconds, write_seconds, notes, short_classes) -> dict:
    """What `write_dataset` returns and prints: where, what, how large, how fast."""
    return {
        "write_path": str(destination),
        "metadata_path": str(meta_file),
        "data_dir": opts.data_dir,
        "split": opts.split,
        "source": index.source,
        "samples": stats.num_samples,
        "classes": len(index.wnids),
        "bytes": num_bytes,
        "estimated_bytes": estimated_bytes,
        "raw": stats.num_raw,
        "jpeg": stats.num_jpeg,
        "seconds": round(seconds, 3),
        "index_seconds": round(index_seconds, 3),
        "write_seconds": round(write_seconds, 3),
        "images_per_s": round(len(index) / seconds, 1),
        "write_images_per_s": round(len(index) / write_seconds, 1),
        "num_workers": opts.num_workers,
        "skipped": stats.skipped,
        "classes_with_fewer_images_than_subset": short_classes,
        "notes": notes,
    }


def format_summary(s: dict) -> str:
    lines = [
        f"wrote {s['write_path']}",
        f"  samples {s['samples']}, classes {s['classes']}, {s['bytes'] / 1e6:.1f} MB "
        f"(estimated {s['estimated_bytes'] / 1e6:.1f} MB), raw {s['raw']}, JPEG {s['jpeg']}",
        f"  {s['seconds']:.1f} s, {s['images_per_s']:.1f} images/s overall, "
        f"{s['write_images_per_s']:.1f} images/s while encoding ({s['num_workers']} processes)",
        f"  metadata {s['metadata_path']}",
    ]
    if s["skipped"]:
        lines.append(f"  skipped {len(s['skipped'])} unreadable files:")
        lines += [f"    {item['file']}: {item['error']}" for item in s["skipped"]]
    if s["classes_with_fewer_images_than_subset"]:
        short = s["classes_with_fewer_images_than_subset"]
        lines.append(f"  {len(short)} classes have fewer images than cfg.subset: "
                     f"{', '.join(short[:10])}")
    lines += [f"  note: {note}" for note in s["notes"]]
    return "\n".join(lines)
