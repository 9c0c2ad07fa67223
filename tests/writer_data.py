"""Small real-image inputs for the writer and inspect tests, in every layout the writer reads.

Images are smooth gradients (so one JPEG re-encode at q90 changes pixels by ~1-2 levels on average)
whose blue channel encodes the image's identity, so a test can tell which source a sample came from.
"""

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850")  # sorted: label = position
SOURCE_QUALITY = 95


def gradient(width_px: int, height_px: int, tag: int) -> np.ndarray:
    """Smooth RGB uint8 image: red rises left to right, green top to bottom, blue = tag."""
    y, x = np.mgrid[0:height_px, 0:width_px]
    red = 30 + 190 * x / max(1, width_px - 1)
    green = 30 + 190 * y / max(1, height_px - 1)
    blue = np.full_like(red, float(tag))
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, quality: int = SOURCE_QUALITY, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """What Pillow makes of an image file, as RGB (the writer's reference)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def blue_tag(image: np.ndarray) -> int:
    return int(round(float(image[..., 2].mean())))


def sample_set(per_class=(3, 3, 3), width_px=48, height_px=40):
    """[(wnid, file stem, JPEG bytes)] with a distinct blue tag per image, by class then stem."""
    items, tag = [], 40
    for wnid, count in zip(WNIDS, per_class):
        for k in range(count):
            items.append((wnid, f"{wnid}_{k:04d}", jpeg_bytes(gradient(width_px, height_px, tag))))
            tag += 10
    return items


def write_image_folder(root: Path, items) -> Path:
    for wnid, stem, data in items:
        (root / wnid).mkdir(parents=True, exist_ok=True)
        (root / wnid / f"{stem}.JPEG").write_bytes(data)
    return root


def val_names(items) -> list:
    """ILSVRC2012-style val file stems, interleaving the classes (so name order != label order)."""
    order = sorted(range(len(items)), key=lambda i: (i % 3, i))
    names = [None] * len(items)
    for number, i in enumerate(order, start=1):
        names[i] = f"ILSVRC2012_val_{number:08d}"
    return names


def write_flat_val(root: Path, items) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, (_, _, data) in zip(val_names(items), items):
        (root / f"{name}.JPEG").write_bytes(data)
    return root


def write_csv_labels(path: Path, items, extra_rows=()) -> Path:
    """Kaggle LOC_val_solution.csv: ImageId,PredictionString (wnid then a box)."""
    rows = [f"{name},{wnid} 10 20 30 40 {wnid} 1 2 3 4"
            for name, (wnid, _, _) in zip(val_names(items), items)]
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows + list(extra_rows)) + "\n")
    return path


def write_index_labels(path: Path, items, wnids) -> Path:
    """Caffe val.txt: '<filename> <class index>' with indices into `wnids`."""
    position = {w: i for i, w in enumerate(wnids)}
    lines = [f"{name}.JPEG {position[wnid]}" for name, (wnid, _, _) in zip(val_names(items), items)]
    path.write_text("\n".join(lines) + "\n")
    return path


def add_tar_member(archive: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_train_tar(path: Path, items) -> Path:
    """ILSVRC2012_img_train.tar: a tar of per-class tars `<wnid>.tar` holding JPEGs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as outer:
        for wnid in sorted({w for w, _, _ in items}):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for w, stem, data in items:
                    if w == wnid:
                        add_tar_member(inner, f"{stem}.JPEG", data)
            add_tar_member(outer, f"{wnid}.tar", inner_bytes.getvalue())
    return path


def write_val_tar(path: Path, items) -> Path:
    """ILSVRC2012_img_val.tar: a flat tar of ILSVRC2012_val_*.JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, (_, _, data) in sorted(zip(val_names(items), items)):
            add_tar_member(archive, f"{name}.JPEG", data)
    return path


def expected_order(items, names=None, wnids=WNIDS) -> list:
    """[(label, reference RGB)] in the writer's sample order: by label, then file name."""
    names = names or [stem for _, stem, _ in items]
    position = {w: i for i, w in enumerate(wnids)}
    rows = sorted((position[wnid], name, decoded(content))
                  for name, (wnid, _, content) in zip(names, items))
    return [(label, pixels) for label, _, pixels in rows]


def load_with_ffcv(beton_path) -> tuple:
    """(images [N, H, W, 3] uint8, labels [N]) through ffcv's Loader, in file order."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    num_samples = int(Reader(str(beton_path)).num_samples)
    loader = Loader(str(beton_path), batch_size=num_samples, num_workers=1,
                    order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images, labels = [], []
    for batch_images, batch_labels in loader:
        images.append(np.array(batch_images))
        labels.append(np.array(batch_labels).reshape(-1))
    return np.concatenate(images), np.concatenate(labels)


def read_samples(beton_path) -> tuple:
    """([RGB arrays of any size], labels, storage modes) without a Loader (inspect's reader)."""
    from ffcv_imagenet.inspect import BetonFile

    beton = BetonFile(beton_path)
    images = [beton.image(i) for i in range(beton.num_samples)]
    return images, beton.column("label").astype(int), beton.column("image")["mode"].copy()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
