"""The input side of the writer: an `ImageIndex` of every image at `data_dir` (where its bytes are,
its label), built without decoding, by the first layout module that recognises the input."""

from pathlib import Path

import numpy as np

from ..options import WriterError
from . import flat, folder, tar
from .common import ImageIndex, Request, read_bytes, read_class_file, read_val_labels  # noqa: F401


# The layouts, tried in this order; each returns None when `data_dir` is not of its kind. A new
# layout (WebDataset shards, say) is one module with an index(request) function and one entry here.
LAYOUTS = (tar.index_archive, flat.index, folder.index, tar.index_folder_of_tars)


def index_input(data_dir, split: str, val_labels=None, classes=None, progress=False) -> ImageIndex:
    """Find out what is at `data_dir` (the package docstring) and index every image in it."""
    path = Path(data_dir)
    if not path.exists():
        raise WriterError(f"cfg.data_dir={data_dir}: no such file or folder")
    request = Request(path, split, val_labels or None, classes or None, progress)
    for layout in LAYOUTS:
        found = layout(request)
        if found is not None:
            return found
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
