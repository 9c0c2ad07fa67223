"""What every layout shares: the `ImageIndex` it returns, the request it answers, class lists and
val label files, and `read_bytes`, which the workers call for one image."""

import csv
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..options import WriterError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


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


@dataclass
class Request:
    """What to index: `path` (data_dir), the split, the labels file and class list (or None)."""
    path: Path
    split: str
    val_labels: "str | None"
    classes: "str | None"
    progress: bool

    @functools.cached_property
    def listing(self) -> "Listing":
        return Listing.of(self.path)


@dataclass(frozen=True)
class Listing:
    """A folder's visible entries, sorted: sub-folders, image files, all files."""
    folders: list
    images: list
    files: list

    @classmethod
    def of(cls, path: Path) -> "Listing":
        entries = sorted((e for e in os.scandir(path) if not e.name.startswith(".")), key=lambda e: e.name)
        files = [e.name for e in entries if e.is_file()]
        return cls([e.name for e in entries if e.is_dir()], [n for n in files if is_image_name(n)], files)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def stem(name: str) -> str:
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
            mapping, lines = {}, {}
            for row_number, row in enumerate(csv.DictReader(f), start=2):
                tokens = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not tokens:
                    raise WriterError(f"{path} line {row_number}: expected "
                                      f"ImageId,PredictionString with a wnid first, got {row}")
                _put(mapping, lines, stem(row["ImageId"]), tokens[0], row_number, path)
            return mapping, "wnid"
        mapping, lines, kinds = {}, {}, set()
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
            is_index = re.fullmatch(r"\d+", label) is not None
            _put(mapping, lines, stem(name), int(label) if is_index else label, line_number, path)
            kinds.add("index" if is_index else "wnid")
    if not mapping:
        raise WriterError(f"cfg.val_labels={path}: no labels in the file")
    if len(kinds) > 1:
        raise WriterError(f"{path}: mixes class indices and wnids; use one or the other")
    return mapping, kinds.pop()


def _put(mapping: dict, lines: dict, name: str, label, line_number: int, path: str) -> None:
    """mapping[name] = label, refusing an image listed twice with different labels (the last
    row would silently win)."""
    if name in mapping and mapping[name] != label:
        raise WriterError(f"{path} line {line_number}: {name} is labelled {label} here and "
                          f"{mapping[name]} on line {lines[name]}; an image has one label")
    mapping[name], lines[name] = label, lines.get(name, line_number)


def class_list(found: set, classes_file, what: str) -> list:
    """The ordered class list: the classes file when given (found classes must be in it)."""
    if not classes_file:
        return sorted(found)
    wnids = read_class_file(classes_file)
    outside = sorted(set(found) - set(wnids))
    if outside:
        raise WriterError(f"{what} names {len(outside)} classes not in cfg.classes={classes_file}: "
                          f"{', '.join(outside[:20])}{' ...' if len(outside) > 20 else ''}")
    return wnids


def labels_for(stems: list, labels_path, classes_file, what: str) -> tuple:
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
    wnids = class_list(set(mapping.values()), classes_file, f"cfg.val_labels={labels_path}")
    position = {w: i for i, w in enumerate(wnids)}
    return np.array([position[mapping[s]] for s in stems], dtype=np.int64), wnids


class Columns:
    """Rows (name, offset, size, group) gathered into numpy arrays a chunk at a time. A Python
    tuple of str and ints costs ~300 bytes a row; 1.28 M of them were most of the writer's memory
    while indexing (issue 36). Here at most CHUNK rows live as Python objects at once."""

    CHUNK = 8192

    def __init__(self):
        self._chunks, self._rows = [], []

    def __len__(self):
        return sum(len(c[0]) for c in self._chunks) + len(self._rows)

    def append(self, name: str, offset: int, size: int, group: int) -> None:
        self._rows.append((os.fsencode(name), offset, size, group))
        if len(self._rows) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            names, offsets, sizes, groups = zip(*self._rows)
            self._chunks.append((np.array(names, dtype=bytes), np.array(offsets, dtype=np.int64),
                                 np.array(sizes, dtype=np.int64), np.array(groups, dtype=np.int64)))
            self._rows = []

    def arrays(self) -> tuple:
        """(names, offsets, sizes, groups) as numpy arrays."""
        self._flush()
        if not self._chunks:
            return (np.array([], dtype=bytes), *(np.array([], dtype=np.int64) for _ in range(3)))
        columns = [list(column) for column in zip(*self._chunks)]
        self._chunks = []
        out = []
        for k in range(len(columns)):  # one column at a time, its chunks dropped once joined
            out.append(np.concatenate(columns[k]))
            columns[k] = None
        return tuple(out)


def make_index(root, names, offsets, sizes, labels, wnids, source) -> ImageIndex:
    """Sort by (label, name) so that the file order and `subset` are deterministic. `names`: str
    (or a numpy bytes array, as Columns gives it)."""
    if not isinstance(names, np.ndarray):
        names = np.array([os.fsencode(n) for n in names], dtype=bytes)
    labels = np.asarray(labels, dtype=np.int64)
    offsets, sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    order = np.lexsort((names, labels))
    if np.any(order != np.arange(len(order))):  # in order already (a tar's members often are): no copy
        names, offsets, sizes, labels = names[order], offsets[order], sizes[order], labels[order]
    del order
    release_freed_memory()
    return ImageIndex(root=str(root), names=names, offsets=offsets, sizes=sizes, labels=labels,
                      wnids=list(wnids), source=source)


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc keeps what the index's temporaries
    freed, so the parent's RSS would stay at the indexing peak through the whole write)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


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
