"""The metadata file that travels beside every .beton: ordered class list, split, source, options.

`<file>.beton` is accompanied by `<file>.beton.meta.json`. The training engine reads both files of a
train/val pair and refuses to start when their class lists differ: a silent label-order mismatch
costs days of GPU time and is invisible in the loss curve until validation.
"""

import json
import os
from pathlib import Path

FORMAT = "ffcv-imagenet/1"
SUFFIX = ".meta.json"


def metadata_path(beton_path) -> Path:
    return Path(str(beton_path) + SUFFIX)


def write_metadata(beton_path, meta: dict) -> Path:
    """Write `meta` atomically (temp file + rename) beside `beton_path`; returns the path."""
    path = metadata_path(beton_path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, **meta}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_metadata(beton_path) -> dict:
    """Read the metadata of `beton_path`; FileNotFoundError names the missing file."""
    path = metadata_path(beton_path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: metadata file not found beside {beton_path} "
            "(write the .beton with `ffcv-imagenet write`, which creates it)"
        )
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if "wnids" not in meta:
        raise ValueError(f"{path}: no 'wnids' key; not an ffcv-imagenet metadata file")
    return meta


def _listing(names: list, limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def check_same_classes(train_path, val_path) -> list:
    """Return the ordered wnid list a train/val pair shares; ValueError says how they differ."""
    train_wnids = read_metadata(train_path)["wnids"]
    val_wnids = read_metadata(val_path)["wnids"]
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
    raise ValueError("; ".join(parts))
