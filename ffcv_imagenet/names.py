"""Which source file each sample of a .beton came from: the `FILE.beton.names.gz` sidecar.

The writer orders samples by label, then name, so a sample index says nothing about its image by
itself. Beside `FILE.beton` the writer puts `FILE.beton.names.gz`: gzip (level 6, no time stamp,
so the same names give the same bytes) of the samples' source names, one a line, in sample
order, as the file system spells them (UTF-8 on Linux) and relative to `data_dir` (a folder) or
the tar (a member path, e.g. `n01440764.tar/n01440764_10026.JPEG`). Its count and the SHA-256 of
its bytes go into the .meta.json (`names`), so that a sidecar of another write is refused by name.

Cost (measured, 1.28 M synthetic names shaped like ImageNet's train ones,
`n01440764/n01440764_10026.JPEG`, on a loaded 2-core machine): 37.1 MB of names store as 3.5 MB;
`write_names` takes 1.1-1.2 s (joining 0.14 s, gzip 0.36 s, the rest the fsync and the load), and
`read_names`, hash check included, 0.3-0.5 s: little beside encoding the 1.28 M images
(76 min at the 280 images/s docs/writer.md measured on 2 cores).
"""

import gzip
import hashlib
import os
import re
from pathlib import Path

from ffcv_imagenet.metadata import DataFileError, read_metadata

SUFFIX = ".names.gz"
NAMES_CHUNK = 65536  # names joined at a time
GZIP_LEVEL = 6  # 3.5 MB in 0.34 s for 1.28 M names; level 1: 4.2 MB in 0.12 s
# the ILSVRC2012 val file name: its number is the image's position in the devkit's (and ReaL's) order
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")


def names_path(beton_path) -> Path:
    return Path(str(beton_path) + SUFFIX)


def write_names(beton_path, names, to=None) -> dict:
    """Write `names` (bytes, one per sample, in sample order: a list or a numpy bytes array) beside
    `beton_path` (or at `to`, for the writer to rename in with the .beton), atomically; returns the
    record for the metadata: {"file", "count", "sha256", "bytes"}. Streamed in chunks: 1.28 M names
    as Python objects and one joined text cost the writer's parent ~130 MB at its peak."""
    path = Path(to) if to is not None else names_path(beton_path)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=GZIP_LEVEL, mtime=0) as z:
                for start in range(0, len(names), NAMES_CHUNK):
                    z.write(_lines(names[start:start + NAMES_CHUNK]))
            f.flush()
            os.fsync(f.fileno())
        data = tmp.read_bytes()  # compressed: a few MB
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": names_path(beton_path).name, "count": len(names),
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _lines(chunk) -> bytes:
    """The chunk's names, a line each; WriterError for a name holding a line break."""
    chunk = list(chunk)
    text = b"\n".join(chunk) + b"\n"
    if text.count(b"\n") != len(chunk) or b"\r" in text:  # one scan of the text, not one per name
        from ffcv_imagenet.writer.options import WriterError

        bad = next(n for n in chunk if b"\n" in n or b"\r" in n)
        raise WriterError(f"source file name {bad!r} holds a line break, which the names file "
                          "cannot store; rename the file")
    return text


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary names files of writers that no longer run (SIGKILLed while writing one)."""
    from ffcv_imagenet.host import process_alive

    prefix = f".{path.name}.tmp"
    for entry in path.parent.glob(prefix + "*"):
        pid_text = entry.name[len(prefix):]
        if pid_text.isdigit() and not process_alive(int(pid_text)):
            entry.unlink(missing_ok=True)


def kept_names(index, skipped: list):
    """The source names (bytes) of the samples a write kept: those of `index` (an ImageIndex) in
    its order, less the `skipped` images ({"file": display name} of skip_bad); a numpy array."""
    if not skipped:
        return index.names
    gone = {item["file"] for item in skipped}
    keep = [index.display_name(i) not in gone for i in range(len(index))]
    return index.names[keep]


def has_names(meta: dict) -> bool:
    return bool(meta.get("names"))


def read_names(beton_path, meta: "dict | None" = None) -> list:
    """The source name of every sample of `beton_path`, in sample order; DataFileError naming the
    file when its writer recorded none, or the sidecar is missing or not the one it wrote."""
    meta = read_metadata(beton_path) if meta is None else meta
    record = meta.get("names")
    if not record:
        raise DataFileError(f"{beton_path} records no source names (written before they were "
                            "kept): write it again with `ffcv-imagenet write` to get "
                            f"{names_path(beton_path).name} beside it")
    path = names_path(beton_path)
    if not path.exists():
        raise DataFileError(f"{path}: source names file not found beside {beton_path} (its "
                            "metadata records one); copy it along with the .beton")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise DataFileError(f"{path} is not the names file written with {beton_path} (its SHA-256 "
                            "differs from the metadata's); put back the matching file or write "
                            "the .beton again")
    names = gzip.decompress(data).decode("utf-8", errors="surrogateescape").split("\n")[:-1]
    if len(names) != record["count"] or len(names) != meta.get("num_samples", len(names)):
        raise DataFileError(f"{path} holds {len(names)} names; {beton_path} has "
                            f"{meta.get('num_samples')} samples")
    return names


def val_numbers(names: list, where: str) -> list:
    """ILSVRC2012 val image numbers (1-based, as in `ILSVRC2012_val_00000001`) parsed from the base
    names; DataFileError naming the first name that is not one (and `where` it comes from)."""
    numbers = []
    for name in names:
        found = VAL_NAME.fullmatch(os.path.splitext(name.replace("\\", "/").rsplit("/", 1)[-1])[0])
        if found is None:
            raise DataFileError(f"{where}: sample {len(numbers)}'s source {name!r} is not named like "
                             "an ILSVRC2012 val image (ILSVRC2012_val_NNNNNNNN.JPEG)")
        numbers.append(int(found.group(1)))
    return numbers
