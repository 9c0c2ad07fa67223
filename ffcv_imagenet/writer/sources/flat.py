"""Layout: a flat folder of images (the raw ILSVRC2012 val layout) labelled by cfg.val_labels."""

from pathlib import Path

from ..options import WriterError
from .common import ImageIndex, Request, labels_for, make_index, stem


def index(request: Request) -> "ImageIndex | None":
    files = request.listing.images
    return index_flat_folder(request.path, files, request.val_labels, request.classes) if files else None


def index_flat_folder(root: Path, files: list, val_labels, classes_file) -> ImageIndex:
    if not val_labels:
        raise WriterError(f"{root} holds images but no class folders: a flat (val) folder needs "
                          "cfg.val_labels (LOC_val_solution.csv or '<filename> <index>' lines)")
    labels, wnids = labels_for([stem(n) for n in files], val_labels, classes_file, str(root))
    return make_index(root, files, [0] * len(files), [-1] * len(files), list(labels), wnids,
                       {"kind": "flat_folder", "path": str(root), "val_labels": str(val_labels)})
