"""Layout: class folders, `<data_dir>/<class>/**/*.{JPEG,jpg,jpeg,png}` (any folder names)."""

import os
from pathlib import Path

from ..options import WriterError
from .common import ImageIndex, Request, class_list, is_image_name, make_index


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
    files_by_class = {}
    for d in class_dirs:
        found = []
        for dirpath, dirnames, filenames in os.walk(root / d, followlinks=True):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            found += [os.path.relpath(os.path.join(dirpath, n), root)
                      for n in filenames if is_image_name(n) and not n.startswith(".")]
        files_by_class[d] = found
    if not any(files_by_class.values()):
        return make_index(root, [], [], [], [], [], {"kind": "image_folder", "path": str(root)})
    wnids = class_list(set(files_by_class), classes_file, f"class folders of {root}")
    position = {w: i for i, w in enumerate(wnids)}
    names, labels = [], []
    for d, found in files_by_class.items():
        names += found
        labels += [position[d]] * len(found)
    index = make_index(root, names, [0] * len(names), [-1] * len(names), labels, wnids,
                        {"kind": "image_folder", "path": str(root)})
    empty = [w for w in wnids if not files_by_class.get(w)]
    if empty:
        index.notes.append(f"{len(empty)} classes have no images: {', '.join(empty[:10])}")
    return index
