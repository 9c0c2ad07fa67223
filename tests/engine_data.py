"""Helpers for the engine tests: tiny train/val .beton pairs written from the synthetic shapes."""

import os
from pathlib import Path

TRAIN_PER_CLASS = 8   # 10 classes x 8 = 80 train images
VAL_IMAGES = 37       # not a multiple of 2 processes x any batch size the tests use
SIZE_PX = 32


def make_betons(root, *, train_per_class: int = TRAIN_PER_CLASS, val_images: int = VAL_IMAGES,
                size_px: int = SIZE_PX) -> tuple:
    """Write `root/train.beton` and `root/val.beton` (+ .meta.json) at `size_px`; returns the paths."""
    from ffcv_imagenet.synthetic import CLASSES, make_image_folder
    from ffcv_imagenet.writer import write_dataset

    root = Path(root)
    train_dir = make_image_folder(root / "train_images", train_per_class, size_px=size_px, seed=0)
    per_class = -(-val_images // len(CLASSES))
    val_dir = make_image_folder(root / "val_images", per_class, size_px=size_px, seed=1)
    extra = per_class * len(CLASSES) - val_images
    for class_name in CLASSES[:extra]:  # drop one image from the first classes to get val_images
        os.remove(sorted((val_dir / class_name).iterdir())[-1])
    paths = []
    for split, folder in (("train", train_dir), ("val", val_dir)):
        path = root / f"{split}.beton"
        write_dataset(folder, path, split=split, max_resolution=size_px, write_mode="jpg",
                      jpeg_quality=90, num_workers=1, progress=False)
        paths.append(path)
    return tuple(paths)


_written = {}


def shared_betons(tmp_path_factory) -> tuple:
    """(train, val) written once per test session, whichever test module asks first."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _written:
        _written[key] = make_betons(tmp_path_factory.mktemp("engine_betons"))
    return _written[key]
