"""The metadata file that travels beside every .beton: ordered class list, split, source, options.

`<file>.beton` is accompanied by `<file>.beton.meta.json`. The training engine reads both files of a
train/val pair and refuses to start when their class lists differ: a silent label-order mismatch
costs days of GPU time and is invisible in the loss curve until validation.
"""

import hashlib
import json
import os
from pathlib import Path

FORMAT = "ffcv-imagenet/1"
SUFFIX = ".meta.json"
# the fingerprint hashes the file's first and last bytes: ffcv's header and field table at the
# start, the end of the data and the allocation table at the end; a constant 1.1 MiB read
HEAD_BYTES, TAIL_BYTES = 64 << 10, 1 << 20
# the shortest side a stored image may have: a 1-px side makes the loaders' crops (the 224/256
# centre crop, the random-resized crop) round to nothing and OpenCV's resize then aborts the
# whole process (measured with both decoders, raw and JPEG samples: 1x1 and 64x1 abort; 2x2,
# 64x2, 8x5 load); the writer refuses such images and the loaders refuse files that hold some
MIN_SIDE = 2


class DataFileError(ValueError):
    """A .beton or its metadata that cannot be used; the message names the file."""


def fingerprint(beton_path) -> dict:
    """{'bytes': size, 'sha256_head_tail': SHA-256 of the first HEAD_BYTES and last TAIL_BYTES}:
    recorded by the writer, compared before training, so that a file cut short or replaced after
    it was written is caught by name instead of failing deep in the loader."""
    size = os.path.getsize(beton_path)
    digest = hashlib.sha256()
    with open(beton_path, "rb") as f:
        digest.update(f.read(HEAD_BYTES))
        f.seek(max(0, size - TAIL_BYTES))
        digest.update(f.read(TAIL_BYTES))
    return {"bytes": size, "sha256_head_tail": digest.hexdigest()}


def check_unchanged(beton_path, meta: dict) -> None:
    """DataFileError when `beton_path` differs from the fingerprint its metadata recorded (files
    written before fingerprints existed are not checked)."""
    recorded = meta.get("fingerprint")
    if not recorded:
        return
    if not os.path.exists(beton_path):
        raise DataFileError(f"{beton_path}: no such file (its metadata {metadata_path(beton_path)} exists)")
    now = fingerprint(beton_path)
    if now["bytes"] != recorded["bytes"]:
        what = "cut short" if now["bytes"] < recorded["bytes"] else "grown"
        raise DataFileError(f"{beton_path} is {now['bytes']:,} bytes but was written as "
                            f"{recorded['bytes']:,} ({what} since, e.g. an interrupted copy); "
                            "copy or write it again")
    if now["sha256_head_tail"] != recorded["sha256_head_tail"]:
        raise DataFileError(f"{beton_path} is not the file its metadata {metadata_path(beton_path)} "
                            "describes (same size, other contents: replaced after it was written); "
                            "write it again or put back the matching .meta.json")


def metadata_path(beton_path) -> Path:
    return Path(str(beton_path) + SUFFIX)


def write_metadata(beton_path, meta: dict) -> Path:
    """Write `meta` atomically (temp file + rename) beside `beton_path`; returns the path. The
    temporary file never outlives a failed write."""
    path = metadata_path(beton_path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, **meta}, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_metadata(beton_path) -> dict:
    """Read the metadata of `beton_path`; DataFileError names a missing or unreadable file."""
    path = metadata_path(beton_path)
    if not path.exists():
        raise DataFileError(
            f"{path}: metadata file not found beside {beton_path} "
            "(write the .beton with `ffcv-imagenet write`, which creates it)"
        )
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "wnids" not in meta:
        raise DataFileError(f"{path}: no 'wnids' key; not an ffcv-imagenet metadata file")
    return meta


def _listing(names: list, limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def check_same_classes(train_path, val_path) -> list:
    """Return the ordered wnid list a train/val pair shares, after checking that neither file
    changed since it was written; DataFileError says how they differ."""
    train_meta, val_meta = read_metadata(train_path), read_metadata(val_path)
    check_unchanged(train_path, train_meta)
    check_unchanged(val_path, val_meta)
    train_wnids, val_wnids = train_meta["wnids"], val_meta["wnids"]
    if train_wnids == val_wnids:
        return train_wnids
    only_train = sorted(set(train_wnids) - set(val_wnids))
    only_val = sorted(set(val_wnids) - set(train_wnids))
    parts = [f"class lists differ between {train_path} ({len(train_wnids)} classes) and "
             f"{val_path} ({len(val_wnids)} classes)"]
    if only_train:
        parts.append(f"only in train: {_listing(only_train)}")
    if only_val:
        parts.append(f"only in val: {_listing(only_val)}")
    if not only_train and not only_val:
        shorter = min(len(train_wnids), len(val_wnids))
        first = next((i for i in range(shorter) if train_wnids[i] != val_wnids[i]), shorter)
        if first < shorter:
            parts.append(f"same classes in a different order (first difference at label {first}: "
                         f"{train_wnids[first]} vs {val_wnids[first]})")
        else:  # only a repeated wnid can make equal sets differ in length
            parts.append(f"same classes, but one list repeats some (from label {first} on)")
    parts.append("labels would not mean the same class in both files; rewrite one with "
                 "--cfg.classes")
    raise DataFileError("; ".join(parts))
