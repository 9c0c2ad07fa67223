"""ILSVRC2012 (or any image-classification tree) -> FFCV `.beton`, with the class list beside it.

Inputs, told apart by what is at `data_dir`:

- an ImageFolder tree `<data_dir>/<class>/**/*.{JPEG,jpg,jpeg,png}` (any class folder names);
- a flat folder of images plus `val_labels` (the raw ILSVRC2012 val layout);
- a tar archive, read in place (never unpacked): either a tar of per-class tars
  (`ILSVRC2012_img_train.tar`, the class is the inner tar's name) or a tar of images
  (`ILSVRC2012_img_val.tar`, labelled by `val_labels`; images under folders inside the tar take
  the folder name as class when no `val_labels` is given). `data_dir` may be the tar itself or a
  folder holding `ILSVRC2012_img_<split>.tar` (or a single `*.tar`) and no images.
  Tars must be uncompressed (the ILSVRC2012 ones are): the writer indexes member offsets once,
  then every worker reads its images with `pread`, so decoding is parallel and in any order.

`val_labels` formats (the image is matched by file name without folder and extension):

- Kaggle's `LOC_val_solution.csv`: header `ImageId,PredictionString`; the first token of the
  prediction string is the wnid;
- text lines `<filename> <label>` where every label is a class index (Caffe's `val.txt`) or every
  label is a wnid. Indices only mean something relative to a class list, so index labels need
  `classes` (the ordered wnid list they index); without it the writer refuses.

Labels: the position of the image's class in the class list. The class list is `classes` when
given (a file of wnids one a line, first token per line, `#` comments allowed, e.g.
`LOC_synset_mapping.txt`; or a `.beton`/`.meta.json` written by this tool, whose wnids are reused),
otherwise the sorted class names found in the input (folder names, an empty class folder
included; inner tar names; or the wnids of the labels file). Input classes missing from the list
are an error that names them.

`subset=N` keeps the first N images of every class by sorted file name: balanced, deterministic.

Images are decoded with Pillow (greyscale, CMYK, palette, PNG saved as .JPEG all become RGB),
downscaled here so that the longer side is at most `max_resolution` px (JPEG DCT scaling to the
nearest size >= target, then OpenCV area filter), then stored by ffcv's `RGBImageField` either
raw or as JPEG. Which samples are JPEG is decided here, deterministically:
raw = none, jpg = all, smart = those whose raw RGB size H*W*3 exceeds `smart_threshold` bytes
(ffcv's rule), proportion = exactly round(compress_probability * N) samples chosen by a seeded
permutation (ffcv draws each sample independently instead).

Nothing half-written: samples go to `.<name>.partial-<pid>` in the destination folder; when
complete it is flushed, the metadata file is written, then the partial is renamed onto the
destination. So a `.beton` at the destination always has its metadata (the reverse, a metadata
file left after a crash with no `.beton`, is harmless). Ctrl-C / SIGTERM / errors delete the
partial; after a SIGKILL only the hidden partial remains, removed by the next write to the same
folder. Before any image is written the output size is estimated from ~20 sampled images and the
write is refused when the destination's free space is smaller.
"""

import argparse
import contextlib
import csv
import ctypes
import difflib
import io
import json
import math
import mmap
import multiprocessing
import os
import queue
import re
import shutil
import signal
import sys
import tarfile
import textwrap
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
WRITE_MODES = ("raw", "jpg", "smart", "proportion")
SPLITS = ("train", "val")
PAGE_SIZE_MIN = 1 << 23  # 8 MiB, ffcv's default page; grown when one raw image would not fit
ESTIMATE_SAMPLES = 20
RESTART_INTERVAL_DEFAULT = 2  # MCUs between JPEG restart markers (see restart_mcus); bench: +2.6% bytes
PROPORTION_SEED = 0


class WriterError(Exception):
    """A problem with the input or the options; the message names the file, key or value."""


# ----------------------------------------------------------------------------------------------
# Options: one table drives the fastargs section, the --help table and write_dataset's checks.


def _parse_bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 0/1 (or true/false)")


@dataclass(frozen=True)
class Option:
    kind: type
    default: object
    desc: str
    choices: tuple = ()
    low: float = None
    high: float = None
    required: bool = False

    def constraint(self) -> str:
        if self.choices:
            return "one of " + "|".join(self.choices)
        name = {int: "an integer", float: "a number", str: "a path", bool: "0 or 1"}[self.kind]
        if self.low is not None and self.high is not None:
            return f"{name} from {self.low} to {self.high}"
        if self.low is not None:
            return f"{name} >= {self.low}"
        return name

    def coerce(self, key: str, value):
        """Return `value` converted to this option's type; ValueError names key and value."""
        if value is None or (self.kind is str and value == ""):
            if self.required:
                raise ValueError(f"cfg.{key} is required ({self.desc})")
            return self.default
        try:
            if self.kind is bool:
                result = _parse_bool(value)
            elif self.kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                result = int(value) if isinstance(value, (int, float)) else int(str(value).strip())
            elif self.kind is float:
                result = float(value)
            else:
                result = str(value)
        except (TypeError, ValueError):
            raise ValueError(f"cfg.{key}={value!r}: expected {self.constraint()}") from None
        bad = (self.choices and result not in self.choices) \
            or (self.low is not None and result < self.low) \
            or (self.high is not None and result > self.high)
        if bad:
            raise ValueError(f"cfg.{key}={value!r}: expected {self.constraint()}")
        return result


OPTIONS = {
    "split": Option(str, None, "which split this file holds (recorded in the metadata)",
                    choices=SPLITS, required=True),
    "data_dir": Option(str, None, "ImageFolder tree, flat image folder, or a .tar (or a folder "
                       "holding ILSVRC2012_img_<split>.tar)", required=True),
    "write_path": Option(str, None, "output .beton path (metadata goes to <path>.meta.json)",
                         required=True),
    # 16384 px: a raw 16384^2 RGB image needs a 1 GiB page; the header stores the page size in
    # 32 bits, so much larger values cannot be written.
    "max_resolution": Option(int, 500, "longer image side in px after downscaling",
                             low=1, high=16384),
    "write_mode": Option(str, "jpg", "how images are stored: raw (no JPEG), jpg (all JPEG), smart "
                         "(JPEG when H*W*3 > smart_threshold), proportion (exactly "
                         "round(compress_probability * N) JPEG, chosen by a seeded shuffle)",
                         choices=WRITE_MODES),
    "compress_probability": Option(float, 0.5, "proportion mode: fraction stored as JPEG",
                                   low=0.0, high=1.0),
    "jpeg_quality": Option(int, 90, "JPEG quality of re-encoded images", low=1, high=100),
    "restart_interval": Option(int, RESTART_INTERVAL_DEFAULT,
                               "JPEG restart marker every N MCUs (16 px wide each), rounded down "
                               "to a divisor of the image's MCU columns; lets the crop-first "
                               "decoder Huffman-decode only the crop's segments; 0 = none (ffcv's "
                               "files)", low=0, high=65535),
    "smart_threshold": Option(int, None, "smart mode: images whose raw RGB bytes (H*W*3) exceed "
                              "this are stored as JPEG, the others raw", low=1),
    "subset": Option(int, -1, "images per class (first N by file name); -1 = all", low=-1),
    "num_workers": Option(int, 0, "worker processes; 0 = all cores", low=0),
    "chunk_size": Option(int, 100, "images handed to a worker at a time", low=1),
    "val_labels": Option(str, "", "labels for a flat val folder/tar: LOC_val_solution.csv or "
                         "'<filename> <index|wnid>' lines"),
    "classes": Option(str, "", "file of wnids, one a line, pinning the class set and order "
                      "(or a .beton/.meta.json written by this tool)"),
    "overwrite": Option(bool, False, "replace an existing destination"),
    "skip_bad": Option(bool, False, "skip undecodable images and list them in the summary"),
}


def restart_mcus(width: int, requested: int) -> int:
    """Largest divisor of the image's 4:2:0 MCU columns (16 px each) that is <= requested, so that
    restart segments never straddle two MCU rows; 0 stays 0 (no markers)."""
    if requested <= 0:
        return 0
    columns = max(1, -(-width // 16))
    return max(d for d in range(1, min(requested, columns) + 1) if columns % d == 0)


def encode_jpeg(image: np.ndarray, quality: int, restart_interval: int = 0) -> np.ndarray:
    """RGB uint8 -> baseline 4:2:0 JPEG bytes (OpenCV, as ffcv encodes), with restart markers every
    restart_mcus(width, restart_interval) MCUs."""
    import cv2

    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)]
    rst = restart_mcus(image.shape[1], restart_interval)
    if rst:
        params += [int(cv2.IMWRITE_JPEG_RST_INTERVAL), rst]
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as JPEG")
    return encoded.reshape(-1)


def default_num_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_options(values: dict) -> dict:
    """Coerce and check every option in `values`; ValueError lists each bad key and value."""
    resolved, errors = {}, []
    for key, option in OPTIONS.items():
        try:
            resolved[key] = option.coerce(key, values.get(key))
        except ValueError as e:
            errors.append(str(e))
    if not errors and resolved["write_mode"] == "smart" and resolved["smart_threshold"] is None:
        errors.append("cfg.write_mode=smart needs cfg.smart_threshold (raw RGB bytes above which "
                      "an image is stored as JPEG, e.g. 270000 = 300x300x3)")
    if not errors and resolved["subset"] == 0:
        errors.append("cfg.subset=0: expected -1 (all images) or a number of images per class >= 1")
    if errors:
        raise ValueError("; ".join(errors))
    if resolved["num_workers"] == 0:
        resolved["num_workers"] = default_num_workers()
    return resolved


# ----------------------------------------------------------------------------------------------
# Inputs: an index of every image (where its bytes are, its label), built without decoding.


@dataclass
class ImageIndex:
    """Where each image's bytes are. `sizes[i] < 0`: a file `root/names[i]`; otherwise
    `sizes[i]` bytes at `offsets[i]` inside the tar `root`. Numpy arrays, not Python objects, so
    that forked workers share the pages instead of copying them on reference-count updates."""

    root: str
    names: np.ndarray  # bytes (os.fsencode), relative path or tar member path
    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64
    labels: np.ndarray  # int64
    wnids: list
    source: dict
    notes: list = field(default_factory=list)

    def __len__(self):
        return len(self.labels)

    def name(self, i) -> str:
        return os.fsdecode(bytes(self.names[i]))

    def display_name(self, i) -> str:
        if self.sizes[i] < 0:
            return os.path.join(self.root, self.name(i))
        return f"{self.root}:{self.name(i)}"

    def take(self, keep: np.ndarray) -> "ImageIndex":
        return ImageIndex(self.root, self.names[keep], self.offsets[keep], self.sizes[keep],
                          self.labels[keep], self.wnids, self.source, self.notes)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def read_class_file(path) -> list:
    """Ordered wnids from a class file (first token per line) or from a .beton's metadata."""
    from ffcv_imagenet.metadata import SUFFIX, read_metadata

    path = str(path)
    if path.endswith((SUFFIX, ".beton")):
        beton = path[: -len(SUFFIX)] if path.endswith(SUFFIX) else path
        try:
            return list(read_metadata(beton)["wnids"])
        except (FileNotFoundError, ValueError) as e:
            raise WriterError(f"cfg.classes={path}: {e}") from None
    if not os.path.isfile(path):
        raise WriterError(f"cfg.classes={path}: file not found")
    wnids = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                wnids.append(line.split()[0].rstrip(","))
    if not wnids:
        raise WriterError(f"cfg.classes={path}: no class names in the file")
    duplicates = sorted({w for w in wnids if wnids.count(w) > 1})
    if duplicates:
        raise WriterError(f"cfg.classes={path}: classes listed twice: {', '.join(duplicates[:10])}")
    return wnids


def read_val_labels(path) -> tuple:
    """Parse a labels file; returns ({image stem: label}, kind) with kind 'wnid' or 'index'."""
    path = str(path)
    if not os.path.isfile(path):
        raise WriterError(f"cfg.val_labels={path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM from Excel
        first = f.readline()
        f.seek(0)
        if first.replace(" ", "").lower().startswith("imageid,predictionstring"):
            mapping = {}
            for row_number, row in enumerate(csv.DictReader(f), start=2):
                tokens = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not tokens:
                    raise WriterError(f"{path} line {row_number}: expected "
                                      f"ImageId,PredictionString with a wnid first, got {row}")
                mapping[_stem(row["ImageId"])] = tokens[0]
            return mapping, "wnid"
        mapping, kinds = {}, set()
        for line_number, line in enumerate(f, start=1):
            tokens = line.replace(",", " ").split()
            if not tokens:
                continue
            if len(tokens) != 2:
                raise WriterError(
                    f"{path} line {line_number}: expected '<filename> <class index or wnid>', got "
                    f"{line.strip()!r} (a file of bare indices such as the devkit's "
                    "ILSVRC2012_validation_ground_truth.txt uses the ILSVRC2012_ID order, not "
                    "sorted wnids, and is not supported; use LOC_val_solution.csv)")
            name, label = tokens
            if re.fullmatch(r"\d+", label):
                mapping[_stem(name)] = int(label)
                kinds.add("index")
            else:
                mapping[_stem(name)] = label
                kinds.add("wnid")
    if not mapping:
        raise WriterError(f"cfg.val_labels={path}: no labels in the file")
    if len(kinds) > 1:
        raise WriterError(f"{path}: mixes class indices and wnids; use one or the other")
    return mapping, kinds.pop()


def _class_list(found: set, classes_file, what: str) -> list:
    """The ordered class list: the classes file when given (found classes must be in it)."""
    if not classes_file:
        return sorted(found)
    wnids = read_class_file(classes_file)
    outside = sorted(set(found) - set(wnids))
    if outside:
        raise WriterError(f"{what} names {len(outside)} classes not in cfg.classes={classes_file}: "
                          f"{', '.join(outside[:20])}{' ...' if len(outside) > 20 else ''}")
    return wnids


def _labels_for(stems: list, labels_path, classes_file, what: str) -> tuple:
    """Labels of images (by stem) from a val labels file; returns (labels, wnids)."""
    mapping, kind = read_val_labels(labels_path)
    unlabelled = [s for s in stems if s not in mapping]
    if unlabelled:
        raise WriterError(f"{len(unlabelled)} images in {what} have no label in {labels_path}: "
                          f"{', '.join(unlabelled[:10])}{' ...' if len(unlabelled) > 10 else ''}")
    if kind == "index":
        if not classes_file:
            raise WriterError(
                f"cfg.val_labels={labels_path} gives class indices, which only mean something "
                "relative to a class list: pass cfg.classes (the ordered wnids the indices refer "
                "to, e.g. the train .beton or its sorted class folder names)")
        wnids = read_class_file(classes_file)
        out_of_range = sorted({mapping[s] for s in stems if mapping[s] >= len(wnids)})
        if out_of_range:
            raise WriterError(f"{labels_path}: class indices {out_of_range[:10]} are out of range "
                              f"for the {len(wnids)} classes of {classes_file}")
        return np.array([mapping[s] for s in stems], dtype=np.int64), wnids
    wnids = _class_list(set(mapping.values()), classes_file, f"cfg.val_labels={labels_path}")
    position = {w: i for i, w in enumerate(wnids)}
    return np.array([position[mapping[s]] for s in stems], dtype=np.int64), wnids


def _make_index(root, names, offsets, sizes, labels, wnids, source) -> ImageIndex:
    """Sort by (label, name) so that the file order and `subset` are deterministic."""
    encoded = [os.fsencode(n) for n in names]
    order = sorted(range(len(encoded)), key=lambda i: (labels[i], encoded[i]))
    return ImageIndex(
        root=str(root),
        names=np.array([encoded[i] for i in order], dtype=bytes),
        offsets=np.array([offsets[i] for i in order], dtype=np.int64),
        sizes=np.array([sizes[i] for i in order], dtype=np.int64),
        labels=np.array([labels[i] for i in order], dtype=np.int64),
        wnids=list(wnids),
        source=source,
    )


def _index_image_folder(root: Path, class_dirs: list, classes_file) -> ImageIndex:
    """Every class folder is a class, also an empty one: dropping it would shift the labels of
    all later classes relative to a split that has images of it."""
    files_by_class = {}
    for d in class_dirs:
        found = []
        for dirpath, dirnames, filenames in os.walk(root / d, followlinks=True):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            found += [os.path.relpath(os.path.join(dirpath, n), root)
                      for n in filenames if is_image_name(n) and not n.startswith(".")]
        files_by_class[d] = found
    if not any(files_by_class.values()):
        return _make_index(root, [], [], [], [], [], {"kind": "image_folder", "path": str(root)})
    wnids = _class_list(set(files_by_class), classes_file, f"class folders of {root}")
    position = {w: i for i, w in enumerate(wnids)}
    names, labels = [], []
    for d, found in files_by_class.items():
        names += found
        labels += [position[d]] * len(found)
    index = _make_index(root, names, [0] * len(names), [-1] * len(names), labels, wnids,
                        {"kind": "image_folder", "path": str(root)})
    empty = [w for w in wnids if not files_by_class.get(w)]
    if empty:
        index.notes.append(f"{len(empty)} classes have no images: {', '.join(empty[:10])}")
    return index


def _index_flat_folder(root: Path, files: list, val_labels, classes_file) -> ImageIndex:
    if not val_labels:
        raise WriterError(f"{root} holds images but no class folders: a flat (val) folder needs "
                          "cfg.val_labels (LOC_val_solution.csv or '<filename> <index>' lines)")
    labels, wnids = _labels_for([_stem(n) for n in files], val_labels, classes_file, str(root))
    return _make_index(root, files, [0] * len(files), [-1] * len(files), list(labels), wnids,
                       {"kind": "flat_folder", "path": str(root), "val_labels": str(val_labels)})


def _scan_tar(tar_path: Path, progress: bool):
    """Yield (class or None, member path, absolute data offset, size) for each image in the tar,
    descending one level into member tars. Only headers are read; data is skipped with seeks."""
    from tqdm import tqdm

    try:
        outer = tarfile.open(tar_path, mode="r:")
    except tarfile.ReadError as e:
        raise WriterError(f"{tar_path}: not an uncompressed tar ({e}); compressed archives cannot "
                          "be read in place, decompress them first") from None
    with outer, tqdm(desc=f"indexing {tar_path.name}", unit=" members", disable=not progress,
                     leave=False) as bar:
        for member in outer:
            bar.update(1)
            if not member.isfile():
                continue
            if member.name.lower().endswith(".tar"):
                wnid = _stem(member.name)
                with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    for item in inner:
                        if item.isfile() and is_image_name(item.name):
                            yield wnid, f"{member.name}/{item.name}", \
                                member.offset_data + item.offset_data, item.size
            elif is_image_name(member.name):
                parent = os.path.dirname(member.name.rstrip("/"))
                folder = os.path.basename(parent) or None
                yield folder, member.name, member.offset_data, member.size


def _index_tar(tar_path: Path, val_labels, classes_file, progress: bool) -> ImageIndex:
    entries = list(_scan_tar(tar_path, progress))
    if not entries:
        raise WriterError(f"{tar_path}: no images (*.JPEG/*.jpg/*.png or per-class .tar) inside")
    names = [e[1] for e in entries]
    offsets = [e[2] for e in entries]
    sizes = [e[3] for e in entries]
    nested = any("/" in n and n.split("/", 1)[0].lower().endswith(".tar") for n in names)
    source = {"kind": "class_tars" if nested else "image_tar", "path": str(tar_path)}
    if val_labels and not nested:
        stems = [_stem(n) for n in names]
        labels, wnids = _labels_for(stems, val_labels, classes_file, str(tar_path))
        source["val_labels"] = str(val_labels)
        return _make_index(tar_path, names, offsets, sizes, list(labels), wnids, source)
    if val_labels:
        raise WriterError(f"cfg.val_labels={val_labels} given, but {tar_path} is a tar of "
                          "per-class tars whose names are the labels; drop cfg.val_labels")
    classes = [e[0] for e in entries]
    if any(c is None for c in classes):
        raise WriterError(f"{tar_path} holds images with no class folder or class tar: a flat "
                          "(val) archive needs cfg.val_labels")
    wnids = _class_list(set(classes), classes_file, f"classes of {tar_path}")
    position = {w: i for i, w in enumerate(wnids)}
    labels = [position[c] for c in classes]
    return _make_index(tar_path, names, offsets, sizes, labels, wnids, source)


def index_input(data_dir, split: str, val_labels=None, classes=None, progress=False) -> ImageIndex:
    """Find out what is at `data_dir` (module docstring) and index every image in it."""
    path = Path(data_dir)
    if not path.exists():
        raise WriterError(f"cfg.data_dir={data_dir}: no such file or folder")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise WriterError(f"cfg.data_dir={data_dir}: a file, but not a tar archive")
        return _index_tar(path, val_labels, classes, progress)
    entries = sorted((e for e in os.scandir(path) if not e.name.startswith(".")),
                     key=lambda e: e.name)
    subdirs = [e.name for e in entries if e.is_dir()]
    files = [e.name for e in entries if e.is_file() and is_image_name(e.name)]
    tars = [e.name for e in entries if e.is_file() and e.name.lower().endswith(".tar")]
    if files:
        return _index_flat_folder(path, files, val_labels, classes)
    if subdirs:
        if val_labels:
            raise WriterError(f"cfg.val_labels={val_labels} given, but {data_dir} is a tree of "
                              "class folders whose names are the labels; drop cfg.val_labels")
        index = _index_image_folder(path, subdirs, classes)
        if len(index):
            return index
    if tars:
        wanted = f"ILSVRC2012_img_{split}.tar"
        if wanted in tars:
            return _index_tar(path / wanted, val_labels, classes, progress)
        if len(tars) == 1:
            return _index_tar(path / tars[0], val_labels, classes, progress)
        raise WriterError(f"{data_dir} holds several tars ({', '.join(tars)}) and no {wanted}; "
                          "pass the tar itself as cfg.data_dir")
    raise WriterError(f"cfg.data_dir={data_dir}: no images found (expected class folders of "
                      "*.JPEG/*.jpg/*.png, a flat folder of images with cfg.val_labels, or a .tar)")


def take_subset(index: ImageIndex, per_class: int) -> tuple:
    """First `per_class` images of every class (the index is sorted by label, then name)."""
    if per_class < 0:
        return index, []
    starts = np.searchsorted(index.labels, np.arange(len(index.wnids)))
    rank = np.arange(len(index)) - starts[index.labels]
    counts = np.bincount(index.labels, minlength=len(index.wnids))
    short = [index.wnids[c] for c in range(len(index.wnids)) if 0 < counts[c] < per_class]
    return index.take(rank < per_class), short


# ----------------------------------------------------------------------------------------------
# Reading and decoding one image (runs in the workers).

_open_files = {}


def read_bytes(index: ImageIndex, i: int) -> bytes:
    if index.sizes[i] < 0:
        with open(os.path.join(index.root, index.name(i)), "rb") as f:
            return f.read()
    fd = _open_files.get(index.root)
    if fd is None:
        fd = _open_files[index.root] = os.open(index.root, os.O_RDONLY)
    data = os.pread(fd, int(index.sizes[i]), int(index.offsets[i]))
    if len(data) != index.sizes[i]:
        raise OSError(f"archive ends early: read {len(data)} of {index.sizes[i]} bytes")
    return data


def target_size(width: int, height: int, max_resolution: int) -> tuple:
    """(width, height) with the longer side at most max_resolution px, aspect kept."""
    longer = max(width, height)
    if longer <= max_resolution:
        return width, height
    scale = max_resolution / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_image(data: bytes, max_resolution: int) -> np.ndarray:
    """Decode any Pillow-readable image to an RGB uint8 array, longer side <= max_resolution."""
    import cv2
    from PIL import Image

    if not data:
        raise OSError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            new_size = target_size(width, height, max_resolution)
            if new_size != (width, height) and image.format == "JPEG":
                # libjpeg scales by 1/2..1/8 while decoding, never below new_size
                image.draft(None, new_size)
            rgb = np.asarray(image.convert("RGB"))
    if (rgb.shape[1], rgb.shape[0]) != new_size:
        rgb = cv2.resize(rgb, new_size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb)


def store_as_jpeg(write_mode: str, height: int, width: int, smart_threshold, planned: bool) -> bool:
    if write_mode == "raw":
        return False
    if write_mode == "jpg":
        return True
    if write_mode == "smart":
        return height * width * 3 > smart_threshold
    return bool(planned)  # proportion: decided up front by a seeded permutation


def plan_proportion(num_samples: int, compress_probability: float) -> np.ndarray:
    """Exactly round(p * N) samples flagged for JPEG, chosen by a seeded permutation."""
    flags = np.zeros(num_samples, dtype=bool)
    count = int(round(compress_probability * num_samples))
    flags[np.random.default_rng(PROPORTION_SEED).permutation(num_samples)[:count]] = True
    return flags


# ----------------------------------------------------------------------------------------------
# Size estimate and free-space check.


def estimate_output_bytes(index: ImageIndex, opts: dict, page_size: int) -> int:
    """Expected .beton size from ~20 evenly spaced images: raw bytes for the raw share,
    encoded size for the JPEG share, plus page tails and tables; 10% margin."""
    n = len(index)
    picks = np.unique(np.linspace(0, n - 1, min(ESTIMATE_SAMPLES, n)).astype(int))
    raw_bytes, jpeg_bytes, over_threshold = [], [], []
    for i in picks:
        try:
            image = decode_image(read_bytes(index, i), opts["max_resolution"])
        except Exception:  # bad files are reported by the write itself
            continue
        raw_bytes.append(image.nbytes)
        if opts["write_mode"] != "raw":
            jpeg_bytes.append(len(encode_jpeg(image, opts["jpeg_quality"], opts["restart_interval"])))
        if opts["write_mode"] == "smart":
            over_threshold.append(image.nbytes > opts["smart_threshold"])
    if not raw_bytes:
        return 0
    jpeg_share = {"raw": 0.0, "jpg": 1.0, "proportion": opts["compress_probability"],
                  "smart": float(np.mean(over_threshold or [0]))}[opts["write_mode"]]
    per_image_bytes = (jpeg_share * np.mean(jpeg_bytes or [0])
                       + (1 - jpeg_share) * np.mean(raw_bytes))
    num_pages = n * per_image_bytes / page_size + opts["num_workers"] + 1
    page_tails_bytes = num_pages * 0.5 * np.mean(raw_bytes)  # an image that does not fit moves on
    last_pages_bytes = (opts["num_workers"] + 1) * page_size  # each worker's last page is whole
    tables_bytes = n * 64 + (1 << 16)  # header, per-sample metadata, allocation table
    return int(1.1 * n * per_image_bytes + page_tails_bytes + last_pages_bytes + tables_bytes)


def check_free_space(folder: Path, needed_bytes: int):
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise WriterError(f"not enough free disk in {folder}: the output is estimated at "
                          f"{needed_bytes / 1e9:.2f} GB ({needed_bytes} bytes) but only "
                          f"{free / 1e9:.2f} GB ({free} bytes) are free")


# ----------------------------------------------------------------------------------------------
# The parallel .beton writer: ffcv's file layout and page allocator, our own orchestration
# (worker crash detection, bad-file reporting, skip_bad compaction, deterministic JPEG choice).


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
                        image = decode_image(read_bytes(index, i), opts["max_resolution"])
                    except Exception as e:
                        results.put(("bad", i, index.display_name(i), f"{type(e).__name__}: {e}"))
                        continue
                    jpeg = store_as_jpeg(opts["write_mode"], image.shape[0], image.shape[1],
                                         opts["smart_threshold"], jpeg_plan[i])
                    _encode_sample(allocator, metadata, i, image, jpeg, opts,
                                   fields["label"], int(index.labels[i]))
                results.put(("done", stop - start))
        results.put(("allocations", worker_id, allocator.allocations))
    except BaseException:
        results.put(("crash", worker_id, traceback.format_exc()))
        results.close()
        results.join_thread()  # deliver the report before dying
        os._exit(1)


def _encode_sample(allocator, metadata, i, image, jpeg: bool, opts, label_field, label: int):
    """Write sample i (data into the allocator's page, metadata row i) in ffcv's RGBImageField
    layout (mode, width, height, data_ptr), JPEG-encoding it with our restart markers."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    image_column, label_column = metadata.dtype.names
    data = (encode_jpeg(image, opts["jpeg_quality"], opts["restart_interval"]) if jpeg
            else np.ascontiguousarray(image).reshape(-1))
    for attempt in (0, 1):  # a sample that straddles a page restarts on a new one
        try:
            allocator.set_current_sample(i)
            row = metadata[image_column][i:i + 1]
            row["mode"] = IMAGE_MODES["jpg" if jpeg else "raw"]
            row["height"], row["width"] = image.shape[:2]
            row["data_ptr"], storage = allocator.malloc(data.nbytes)
            storage[:] = data
            label_field.encode(metadata[label_column][i:i + 1], label, allocator.malloc)
            return
        except MemoryError:
            if attempt:
                raise


@dataclass
class BetonStats:
    num_samples: int = 0
    num_raw: int = 0
    num_jpeg: int = 0
    skipped: list = field(default_factory=list)  # [{"file": ..., "error": ...}]
    widths: np.ndarray = None
    heights: np.ndarray = None


def _fields(opts):
    from ffcv.fields import IntField, RGBImageField

    # The header records only the field types; the per-sample raw/JPEG choice is ours.
    return {"image": RGBImageField(write_mode=opts["write_mode"],
                                   jpeg_quality=opts["jpeg_quality"]),
            "label": IntField()}


def _write_header(path, num_samples, fields, page_size):
    from ffcv.types import CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType

    header = np.zeros(1, dtype=HeaderType)[0]
    header["version"] = CURRENT_VERSION
    header["num_samples"] = num_samples
    header["num_fields"] = len(fields)
    header["page_size"] = page_size
    type_ids = {handler: type_id for type_id, handler in TYPE_ID_HANDLER.items()}
    descriptors = np.zeros(len(fields), dtype=FieldDescType)
    for row, (name, f) in zip(descriptors, fields.items()):
        encoded = np.frombuffer(name.encode("ascii"), dtype="<u1")[: row["name"].shape[0]]
        row["type_id"] = type_ids[type(f)]
        row["name"][: len(encoded)] = encoded
        row["arguments"][:] = f.to_binary()[0]
    with open(path, "wb") as fp:
        fp.write(header.tobytes())
        fp.write(descriptors.tobytes())
    return header, HeaderType.itemsize + descriptors.nbytes


def _finish_file(path, header, metadata_start, metadata, allocations, bad: set):
    """Write the per-sample metadata, allocation table and header; drop `bad` samples."""
    from ffcv.types import ALLOC_TABLE_TYPE

    table = np.array(allocations, dtype=ALLOC_TABLE_TYPE) if allocations else \
        np.zeros(0, dtype=ALLOC_TABLE_TYPE)
    if bad:
        keep = np.ones(len(metadata), dtype=bool)
        keep[sorted(bad)] = False
        new_id = np.cumsum(keep) - 1
        table = table[keep[table["sample_id"]]]
        table["sample_id"] = new_id[table["sample_id"]]
        metadata = metadata[keep]  # rows shrink; the data region (absolute pointers) stays put
    with open(path, "r+b") as fp:
        fp.seek(metadata_start)
        fp.write(metadata.tobytes())
        header["alloc_table_ptr"] = fp.seek(0, os.SEEK_END)
        header["num_samples"] = len(metadata)
        fp.write(table.tobytes())
        fp.seek(0)
        fp.write(header.tobytes())
        fp.flush()
        os.fsync(fp.fileno())
    return metadata


def write_beton(path, index: ImageIndex, opts: dict, page_size: int, progress: bool) -> BetonStats:
    """Encode every image of `index` into the .beton at `path` (opts['num_workers'] processes)."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.types import get_metadata_type

    n = len(index)
    fields = _fields(opts)
    metadata_type = get_metadata_type(list(fields.values()))
    header, metadata_start = _write_header(path, n, fields, page_size)
    # Anonymous shared memory: inherited by the forked workers, gone with the processes
    # (no /dev/shm segment to leak on SIGKILL, unlike multiprocessing.shared_memory).
    metadata_buffer = mmap.mmap(-1, max(1, n * metadata_type.itemsize))
    allocator = MemoryAllocator(str(path), metadata_start + n * metadata_type.itemsize, page_size)
    if opts["write_mode"] == "proportion":
        jpeg_plan = plan_proportion(n, opts["compress_probability"])
    else:
        jpeg_plan = np.zeros(n, dtype=bool)
    worker_args = (index, opts, jpeg_plan, fields, metadata_buffer, metadata_type, allocator)
    allocations, bad = _run_workers(n, opts, worker_args, progress)
    if len(bad) == n:
        raise WriterError(f"none of the {n} images could be decoded; first: {bad[min(bad)]}")

    metadata = np.frombuffer(metadata_buffer, dtype=metadata_type)[:n].copy()
    metadata = _finish_file(path, header, metadata_start, metadata, allocations, set(bad))
    image_meta = metadata[metadata_type.names[0]]
    num_jpeg = int(np.sum(image_meta["mode"] == 0))  # ffcv: 0 = jpg, 1 = raw
    return BetonStats(num_samples=len(metadata), num_raw=len(metadata) - num_jpeg,
                      num_jpeg=num_jpeg, skipped=[bad[i] for i in sorted(bad)],
                      widths=image_meta["width"].copy(), heights=image_meta["height"].copy())


def _run_workers(n: int, opts: dict, worker_args: tuple, progress: bool) -> tuple:
    """Encode samples 0..n-1 in chunks with worker processes, showing a progress bar.

    Returns (allocations of all workers, {sample index: {"file", "error"}} of skipped images).
    Raises WriterError for an undecodable image (unless opts['skip_bad']), RuntimeError when a
    worker fails; the workers are stopped whatever happens.
    """
    from tqdm import tqdm

    context = multiprocessing.get_context("fork")
    tasks, results = context.Queue(), context.Queue()
    num_workers = max(1, min(opts["num_workers"], math.ceil(n / opts["chunk_size"])))
    for start in range(0, n, opts["chunk_size"]):
        tasks.put((start, min(n, start + opts["chunk_size"])))
    for _ in range(num_workers):
        tasks.put(None)
    workers = [context.Process(target=_worker, daemon=True,
                               args=(w, os.getpid(), *worker_args, tasks, results))
               for w in range(num_workers)]
    allocations, bad, finished = [], {}, set()
    try:
        for w in workers:
            w.start()
        with tqdm(total=n, unit="img", desc="writing", disable=not progress) as bar:
            while len(finished) < num_workers:
                message = _next_message(results, workers, finished)
                if message is None:
                    continue
                kind = message[0]
                if kind == "done":
                    bar.update(message[1])
                elif kind == "bad":
                    _, i, name, error = message
                    if not opts["skip_bad"]:
                        raise WriterError(f"{name}: cannot decode image ({error}); fix or remove "
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


# ----------------------------------------------------------------------------------------------
# write_dataset: options -> index -> checks -> partial file -> metadata -> rename.


def partial_path(write_path: Path, pid=None) -> Path:
    return write_path.with_name(f".{write_path.name}.partial-{os.getpid() if pid is None else pid}")


def remove_stale_partials(write_path: Path) -> list:
    """Delete partials of `write_path` left by writers that no longer run (killed ones)."""
    removed = []
    prefix = f".{write_path.name}.partial-"
    for entry in write_path.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix):]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # that writer still runs
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        entry.unlink(missing_ok=True)
        removed.append(str(entry))
    return removed


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(f"stopped by signal {signum}")


def page_size_for(max_resolution: int) -> int:
    """Smallest power of two >= 8 MiB that holds a raw max_resolution^2 RGB image."""
    needed = max_resolution * max_resolution * 3 + 64
    return max(PAGE_SIZE_MIN, 1 << (needed - 1).bit_length())


def write_dataset(data_dir, write_path, *, split, max_resolution=500, write_mode="jpg",
                  compress_probability=0.5, jpeg_quality=90, smart_threshold=None, subset=-1,
                  restart_interval=None,
                  num_workers=None, chunk_size=100, val_labels=None, classes=None, overwrite=False,
                  skip_bad=False, progress=True) -> dict:
    """Write the images at `data_dir` to `write_path` (.beton) and `<write_path>.meta.json`.

    Options are those of `ffcv-imagenet write --help` (num_workers None or 0 = all cores).
    Returns the summary: samples, classes, bytes, raw/jpeg counts, seconds, images_per_s,
    skipped files, paths. Raises WriterError (bad input) or ValueError (bad option).
    """
    import ffcv.fields  # noqa: F401  (imports torch: seconds that are not the writer's speed)

    with single_threaded_opencv():
        return _write_dataset(data_dir, write_path, split=split, max_resolution=max_resolution,
                              write_mode=write_mode, compress_probability=compress_probability,
                              jpeg_quality=jpeg_quality, smart_threshold=smart_threshold,
                              restart_interval=(RESTART_INTERVAL_DEFAULT if restart_interval is None
                                                else restart_interval),
                              subset=subset, num_workers=num_workers, chunk_size=chunk_size,
                              val_labels=val_labels, classes=classes, overwrite=overwrite,
                              skip_bad=skip_bad, progress=progress)


@contextlib.contextmanager
def single_threaded_opencv():
    """Keep OpenCV's thread pool down in this process while workers are forked from it.

    The pool does not survive fork: a worker forked while the parent's pool is up (started by
    any earlier cv2.resize of a large image, e.g. while estimating the output size) deadlocks in
    its first cv2 call. Workers decode one image per process anyway.
    """
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def _write_dataset(data_dir, write_path, *, split, max_resolution, write_mode,
                   compress_probability, jpeg_quality, smart_threshold, restart_interval, subset, num_workers,
                   chunk_size, val_labels, classes, overwrite, skip_bad, progress) -> dict:
    started_s = time.time()
    opts = check_options({
        "split": split, "data_dir": str(data_dir), "write_path": str(write_path),
        "max_resolution": max_resolution, "write_mode": write_mode,
        "compress_probability": compress_probability, "jpeg_quality": jpeg_quality,
        "restart_interval": restart_interval,
        "smart_threshold": smart_threshold, "subset": subset, "num_workers": num_workers or 0,
        "chunk_size": chunk_size, "val_labels": str(val_labels or ""),
        "classes": str(classes or ""),
        "overwrite": overwrite, "skip_bad": skip_bad})
    for key in ("data_dir", "val_labels", "classes"):  # the metadata outlives the working folder
        opts[key] = os.path.abspath(opts[key]) if opts[key] else ""
    destination = prepare_destination(opts)
    stale = remove_stale_partials(destination)

    index = index_input(opts["data_dir"], opts["split"], opts["val_labels"] or None,
                        opts["classes"] or None, progress)
    images_found = len(index)
    index, short_classes = take_subset(index, opts["subset"])
    if not len(index):
        raise WriterError(f"cfg.data_dir={data_dir}: no images to write")
    page_size = page_size_for(opts["max_resolution"])
    estimated_bytes = estimate_output_bytes(index, opts, page_size)
    check_free_space(destination.parent, estimated_bytes)

    temp = partial_path(destination)
    previous_sigterm = None
    if threading_is_main():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        write_started_s = time.time()
        stats = write_beton(temp, index, opts, page_size, progress)
        write_seconds = time.time() - write_started_s
        num_bytes = temp.stat().st_size
        meta = metadata_record(index, opts, stats, num_bytes, images_found)
        meta_file = install(temp, destination, meta)
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        temp.unlink(missing_ok=True)

    summary = write_summary(opts, index, stats, destination=destination, meta_file=meta_file,
                            num_bytes=num_bytes, estimated_bytes=estimated_bytes,
                            seconds=time.time() - started_s, write_seconds=write_seconds,
                            notes=index.notes + [f"removed stale partial file {p}" for p in stale],
                            short_classes=short_classes)
    if progress:
        print(format_summary(summary), file=sys.stderr)
    return summary


def write_summary(opts: dict, index, stats, *, destination, meta_file, num_bytes, estimated_bytes,
                  seconds, write_seconds, notes, short_classes) -> dict:
    """What `write_dataset` returns and prints: where, what, how large, how fast."""
    return {
        "write_path": str(destination),
        "metadata_path": str(meta_file),
        "data_dir": opts["data_dir"],
        "split": opts["split"],
        "source": index.source,
        "samples": stats.num_samples,
        "classes": len(index.wnids),
        "bytes": num_bytes,
        "estimated_bytes": estimated_bytes,
        "raw": stats.num_raw,
        "jpeg": stats.num_jpeg,
        "seconds": round(seconds, 3),
        "write_seconds": round(write_seconds, 3),
        "images_per_s": round(len(index) / seconds, 1),
        "write_images_per_s": round(len(index) / write_seconds, 1),
        "num_workers": opts["num_workers"],
        "skipped": stats.skipped,
        "classes_with_fewer_images_than_subset": short_classes,
        "notes": notes,
    }


def prepare_destination(opts: dict) -> Path:
    """The absolute .beton path; refuses a folder, or an existing file without overwrite."""
    write_path = opts["write_path"]
    destination = Path(write_path).absolute()
    if destination.is_dir():
        raise WriterError(f"cfg.write_path={write_path} is a folder; give a file path such as "
                          f"{destination / (opts['split'] + '.beton')}")
    if destination.exists() and not opts["overwrite"]:
        raise WriterError(f"cfg.write_path={write_path} already exists; kept it. Pass "
                          "--cfg.overwrite=1 (overwrite=True) to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    return destination


def metadata_record(index: ImageIndex, opts: dict, stats: BetonStats, num_bytes: int,
                    images_found: int) -> dict:
    """What goes into `<beton>.meta.json` (see metadata.py): class list, source, options, counts."""
    from ffcv_imagenet import __version__

    return {
        "wnids": index.wnids,
        "split": opts["split"],
        "source": index.source,
        "options": {k: v for k, v in opts.items() if k not in ("data_dir", "write_path")},
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


def install(temp: Path, destination: Path, meta: dict) -> Path:
    """Put the finished partial file and its metadata at the destination; returns the metadata path.

    Order matters: old .beton gone -> new metadata -> new .beton renamed in. A crash at any point
    leaves either no .beton at the destination or one whose metadata matches it.
    """
    from ffcv_imagenet.metadata import write_metadata

    if destination.exists():
        destination.unlink()
    meta_file = write_metadata(destination, meta)
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


# ----------------------------------------------------------------------------------------------
# Command line: fastargs section `cfg`, strict about keys and values.

DESCRIPTION = ("Convert ILSVRC2012 (class folders, flat val + labels, or the .tar archives) "
               "to .beton.")


def help_epilog() -> str:
    """The option table of --help: plain text (fastargs' own table uses terminal line drawing)."""
    lines = ["options (--cfg.KEY=VALUE; or in a JSON/YAML file under 'cfg:' given with -C):", ""]
    for key, option in OPTIONS.items():
        if option.required:
            default = "required"
        elif option.kind is bool:
            default = f"default {int(option.default)}"
        elif option.default in (None, ""):
            default = "optional"
        else:
            default = f"default {option.default!r}"
        text = textwrap.wrap(f"{option.desc} ({option.constraint()}; {default})", width=70)
        lines.append(f"  --cfg.{key:<22} {text[0]}")
        lines += [f"  {'':<28} {line}" for line in text[1:]]
    return "\n".join(lines)


def _fastargs_config():
    from fastargs import Config, Param, Section
    from fastargs.validation import Checker

    class OptionChecker(Checker):
        def __init__(self, key, option):
            self.key, self.option = key, option

        def check(self, value):
            return self.option.coerce(self.key, value)

        def help(self):
            return self.option.constraint()

    config = Config()
    Section("cfg", "ffcv-imagenet write", config_descriptor=config).params(**{
        key: Param(OptionChecker(key, option), option.desc,
                   default=None if option.required else option.default, required=option.required)
        for key, option in OPTIONS.items()})
    return config


def _flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        return [prefix]
    keys = []
    for k, v in tree.items():
        keys += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return keys


def check_known_keys(argv: list):
    """fastargs ignores keys it does not know; refuse them, naming the nearest valid one."""
    known = [f"cfg.{k}" for k in OPTIONS]
    given = []
    tokens = iter(argv)
    for token in tokens:
        if token in ("-C", "--config-file") or token.startswith("--config-file="):
            config_file = token.split("=", 1)[1] if "=" in token else next(tokens, None)
            keys = _flatten(_load_config_file(config_file))
            given += [(key, f"in {config_file}") for key in keys]
        elif token in ("-h", "--help") or not token.startswith("-") or _is_number(token):
            continue  # help, or the value of the previous option
        else:
            given.append((token.lstrip("-").split("=", 1)[0], "on the command line"))
    errors = []
    for key, where in given:
        if key in known:
            continue
        section = key.split(".", 1)[0] if "." in key else None
        close = difflib.get_close_matches(key if section else f"cfg.{key}", known, n=1, cutoff=0.4)
        hint = f"; did you mean --{close[0]}?" if close else ""
        if section is not None and section != "cfg":
            errors.append(f"unknown section '{section}' in --{key} {where} (the writer's options "
                          f"are all under cfg){hint}")
        else:
            errors.append(f"unknown option --{key} {where}{hint}")
    if errors:
        valid = ", ".join("--" + k for k in known)
        raise ValueError("; ".join(errors) + f"\nvalid options: {valid}")


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _load_config_file(path):
    if path is None or not os.path.isfile(path):
        raise ValueError(f"--config-file {path}: file not found")
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        import yaml

        return yaml.safe_load(text) or {}


def parse_args(argv: list) -> dict:
    """Options from `--cfg.key=value` arguments (and -C config files); raises ValueError."""
    check_known_keys(argv)
    config = _fastargs_config()
    parser = argparse.ArgumentParser(prog="ffcv-imagenet write", description=DESCRIPTION)
    saved_argv = sys.argv
    sys.argv = [parser.prog] + list(argv)  # fastargs reads sys.argv, in both calls below
    try:
        config.augment_argparse(parser)  # declares the --cfg.* arguments
        parser.epilog = help_epilog()
        config.collect_argparse_args(parser)  # --help prints it (and exits 0) here
    finally:
        sys.argv = saved_argv
    raw = {key: config.content.get(("cfg", key)) for key in OPTIONS}
    return check_options(raw)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(argv)
    except ValueError as e:
        print(f"ffcv-imagenet write: {e}", file=sys.stderr)
        return 2
    try:
        write_dataset(opts.pop("data_dir"), opts.pop("write_path"), progress=True, **opts)
    except (WriterError, ValueError, RuntimeError) as e:
        print(f"ffcv-imagenet write: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated):
        print("ffcv-imagenet write: interrupted; nothing was written at the destination",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
