"""Layout: class folders, `<data_dir>/<class>/**/*.{JPEG,jpg,jpeg,png}` (any folder names)."""

import os
from pathlib import Path

import numpy as np

from ..options import WriterError
from .common import Columns, ImageIndex, Request, class_list, is_image_name, make_index


def index(request: Request) -> "ImageIndex | None":
    """None when there are no class folders or none holds an image (a folder of tars, say)."""
    subdirs = request.listing.folders
    if not subdirs:
        return None
    if request.val_labels:
        raise WriterError(f"cfg.val_labels={request.val_labels} given, but {request.path} is a tree "
                          "of class folders whose names are the labels; drop cfg.val_labels")
    found = index_class_folders(request.path, subdirs, request.classes)
    return found if len(found) else None


def index_class_folders(root: Path, class_dirs: list, classes_file) -> ImageIndex:
    """Every class folder is a class, also an empty one: dropping it would shift the labels of
    all later classes relative to a split that has images of it."""
    rows, counts = Columns(), []
    for k, d in enumerate(class_dirs):
        found = len(rows)
        for relative in _images_under(root, d):
            rows.append(relative, 0, -1, k)
        counts.append(len(rows) - found)
    if not any(counts):
        return make_index(root, [], [], [], [], [], {"kind": "image_folder", "path": str(root)})
    wnids = class_list(set(class_dirs), classes_file, f"class folders of {root}")
    position = {w: i for i, w in enumerate(wnids)}
    names, offsets, sizes, folder_numbers = rows.arrays()
    labels = np.array([position[d] for d in class_dirs], dtype=np.int64)[folder_numbers]
    index = make_index(root, names, offsets, sizes, labels, wnids, {"kind": "image_folder", "path": str(root)})
    with_images = {d for d, count in zip(class_dirs, counts) if count}
    empty = [w for w in wnids if w not in with_images]
    if empty:
        index.notes.append(f"{len(empty)} classes have no images: {', '.join(empty[:10])}")
    return index


def _images_under(root: Path, class_dir: str):
    """Paths relative to `root` of the images under root/class_dir, at any depth."""
    top = os.path.join(root, class_dir)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        prefix = class_dir + dirpath[len(top):] + os.sep  # relpath's work, once per folder
        # sorted, so that a tree of sorted class folders is indexed in the file's order (no copy)
        yield from (prefix + n for n in sorted(filenames) if is_image_name(n) and not n.startswith("."))
