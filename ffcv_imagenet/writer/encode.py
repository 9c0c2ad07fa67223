"""One image: decode (any Pillow-readable file, downscaled), the raw-or-JPEG choice, the JPEG encoding
with restart markers; and what the images predict of the output: its size and page size."""

import contextlib
import io
import shutil
import warnings
from pathlib import Path

import numpy as np

from .. import metadata
from .options import WriterError, WriterOptions
from .sources import ImageIndex, read_bytes

PAGE_SIZE_MIN = 1 << 23  # 8 MiB, ffcv's default page; grown when one raw image would not fit
ESTIMATE_SAMPLES = 20
PROPORTION_SEED = 0


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


MIN_SIDE = metadata.MIN_SIDE  # read at each decode: tests set 1 to write what older writers wrote


class TooSmall(ValueError):
    """An image whose shorter side, once stored, would be below MIN_SIDE."""


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
            if min(new_size) < MIN_SIDE:
                scaled = (f" once its longer side is scaled to {max_resolution} px"
                          if new_size != (width, height) else "")
                raise TooSmall(f"{width}x{height} px would be stored as {new_size[0]}x{new_size[1]}{scaled}, "
                               f"below the {MIN_SIDE} px shorter side the loaders' crops need")
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


def page_size_for(max_resolution: int) -> int:
    """Smallest power of two >= 8 MiB that holds a raw max_resolution^2 RGB image."""
    needed = max_resolution * max_resolution * 3 + 64
    return max(PAGE_SIZE_MIN, 1 << (needed - 1).bit_length())


def estimate_output_bytes(index: ImageIndex, opts: WriterOptions, page_size: int) -> int:
    """Expected .beton size from ~20 evenly spaced images: raw bytes for the raw share,
    encoded size for the JPEG share, plus page tails and tables; 10% margin."""
    n = len(index)
    picks = np.unique(np.linspace(0, n - 1, min(ESTIMATE_SAMPLES, n)).astype(int))
    raw_bytes, jpeg_bytes, over_threshold = [], [], []
    for i in picks:
        try:
            image = decode_image(read_bytes(index, i), opts.max_resolution)
        except Exception:  # bad files are reported by the write itself
            continue
        raw_bytes.append(image.nbytes)
        if opts.write_mode != "raw":
            jpeg_bytes.append(len(encode_jpeg(image, opts.jpeg_quality, opts.restart_interval)))
        if opts.write_mode == "smart":
            over_threshold.append(image.nbytes > opts.smart_threshold)
    if not raw_bytes:
        return 0
    jpeg_share = {"raw": 0.0, "jpg": 1.0, "proportion": opts.compress_probability,
                  "smart": float(np.mean(over_threshold or [0]))}[opts.write_mode]
    per_image_bytes = (jpeg_share * np.mean(jpeg_bytes or [0])
                       + (1 - jpeg_share) * np.mean(raw_bytes))
    num_pages = n * per_image_bytes / page_size + opts.num_workers + 1
    page_tails_bytes = num_pages * 0.5 * np.mean(raw_bytes)  # an image that does not fit moves on
    last_pages_bytes = (opts.num_workers + 1) * page_size  # each worker's last page is whole
    tables_bytes = n * 64 + (1 << 16)  # header, per-sample metadata, allocation table
    return int(1.1 * n * per_image_bytes + page_tails_bytes + last_pages_bytes + tables_bytes)


def check_free_space(folder: Path, needed_bytes: int):
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise WriterError(f"not enough free disk in {folder}: the output is estimated at "
                          f"{needed_bytes / 1e9:.2f} GB ({needed_bytes} bytes) but only "
                          f"{free / 1e9:.2f} GB ({free} bytes) are free")


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
