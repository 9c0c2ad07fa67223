"""Nothing half-written: samples go to `.<name>.partial` beside the destination (resume.py keeps
it, with its journal, until the write is installed or started over); when complete the partial is
flushed, the metadata file written, then the partial renamed onto the destination. Partials that
earlier versions named `.<name>.partial-<pid>`, of writers that no longer run, are removed by the
next write to the folder."""

import dataclasses
import os
import time
from pathlib import Path

from ..host import process_alive
from .beton import BetonStats
from .options import NOT_RECORDED, WriterError, WriterOptions
from .sources import ImageIndex


def remove_stale_partials(write_path: Path) -> list:
    """Delete partials (and temporary metadata files) of `write_path` left by writers that no
    longer run (killed ones)."""
    removed = []
    prefixes = (f".{write_path.name}.partial-", f"{write_path.name}.meta.json.tmp")
    for entry in write_path.parent.iterdir():
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None:
            continue
        pid_text = entry.name[len(prefix):]
        if not pid_text.isdigit() or process_alive(int(pid_text)):
            continue  # not a partial, or that writer still runs
        entry.unlink(missing_ok=True)
        removed.append(str(entry))
    return removed


class Terminated(Exception):
    pass


def raise_terminated(signum, frame):
    raise Terminated(f"stopped by signal {signum}")


def prepare_destination(opts: WriterOptions) -> Path:
    """The absolute .beton path; refuses a folder, or an existing file without overwrite."""
    write_path = opts.write_path
    destination = Path(write_path).absolute()
    if destination.is_dir():
        raise WriterError(f"cfg.write_path={write_path} is a folder; give a file path such as "
                          f"{destination / (opts.split + '.beton')}")
    if destination.exists() and not opts.overwrite:
        raise WriterError(f"cfg.write_path={write_path} already exists; kept it. Pass "
                          "--cfg.overwrite=1 (overwrite=True) to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    return destination


def metadata_record(index: ImageIndex, opts: WriterOptions, stats: BetonStats, num_bytes: int,
                    images_found: int) -> dict:
    """What goes into `<beton>.meta.json` (see metadata.py): class list, source, options, counts."""
    from ffcv_imagenet import __version__

    return {
        "wnids": index.wnids,
        "split": opts.split,
        "source": index.source,
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k not in NOT_RECORDED},
        "num_samples": stats.num_samples,
        "num_classes": len(index.wnids),
        "num_raw": stats.num_raw,
        "num_jpeg": stats.num_jpeg,
        "num_bytes": num_bytes,
        "skipped": stats.skipped,
        "images_found": images_found,
        "writer": f"ffcv-imagenet {__version__}",
        "ffcv_version": _ffcv_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def install(temp: Path, destination: Path, meta: dict, names_file: Path) -> Path:
    """Put the finished partial file and its metadata at the destination; returns the metadata path.

    New metadata (renamed in), the source names, then the new .beton renamed over the old one:
    each an atomic rename, and the old file stays at the destination until the new one replaces
    it. A crash between them leaves the old .beton with the new metadata (and names), which the
    fingerprint in it tells apart (training refuses the pair by name), and the finished partial.
    """
    from ffcv_imagenet.metadata import write_metadata

    from ffcv_imagenet.names import names_path

    meta_file = write_metadata(destination, meta)
    os.replace(names_file, names_path(destination))
    os.replace(temp, destination)
    _fsync_folder(destination.parent)
    return meta_file


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _ffcv_version() -> str:
    try:
        from importlib.metadata import version

        return version("ffcv")
    except Exception:
        return "unknown"


def _fsync_folder(folder: Path):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
