"""Crop-first decoder (fastjpeg.py, _jpegcrop.c): same boxes and pixels as ffcv's RandomResizedCrop,
less work. JPEGs are made here from photo-like synthetic images (synthetic.photo_like)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ffcv_imagenet import fastjpeg as fj
from ffcv_imagenet.synthetic import photo_like
from ffcv_imagenet.writer import encode_jpeg, restart_mcus

SIZES = ((375, 500), (500, 333), (131, 97), (256, 256))  # (height, width), odd ones included


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def random_boxes(height, width, count, rng):
    """Boxes of every shape and place, corners and edges included."""
    boxes = [(0, 0, height, width), (height - 8, width - 8, 8, 8), (0, width - 40, 17, 40)]
    for _ in range(count):
        h, w = int(rng.integers(8, height + 1)), int(rng.integers(8, width + 1))
        boxes.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    return boxes


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return [photo_like(h, w, rng) for h, w in SIZES]


def test_flag_bits_are_the_c_decoders():
    """Every JC_* flag bit of _jpegcrop.c has the value of the Python constant of the same name,
    and every Python bit but RESIZE (applied here, not in C) is defined in C."""
    import re
    from pathlib import Path

    source = (Path(fj.__file__).parent / "_jpegcrop.c").read_text()
    c_bits = {name: int(value) for name, value in
              re.findall(r"^#define JC_([A-Z0-9_]+) (\d+)u\b", source, flags=re.MULTILINE)}
    python_bits = {name: getattr(fj, name) for name in
                   ("SPLICE", "SCALE", "REGION", "SCALE_POW2_ONLY", "RESIZE")}
    assert c_bits == {k: v for k, v in python_bits.items() if k != "RESIZE"}
    assert len(set(python_bits.values())) == len(python_bits)  # distinct bits
    assert all(v & (v - 1) == 0 for v in python_bits.values())
    assert fj.ALL_LEVERS == sum(fj.LEVERS.values())
    assert fj.DEFAULT_FLAGS == fj.ALL_LEVERS | fj.SCALE_POW2_ONLY


def test_restart_interval_is_a_divisor_of_the_mcu_columns():
    assert restart_mcus(500, 0) == 0                 # 0 = no markers
    assert restart_mcus(500, 4) == 4                 # 32 MCU columns
    assert restart_mcus(500, 5) == 4
    assert restart_mcus(375, 4) == 4                 # 24 columns
    assert restart_mcus(368, 4) == 1                 # 23 columns (prime): every MCU
    assert restart_mcus(10, 8) == 1                  # narrower than one MCU


def test_writer_jpegs_carry_spliceable_restart_markers(images):
    for image in images:
        info = fj.jpeg_layout(encode_jpeg(image, 90, 4).tobytes())
        assert (info["height"], info["width"]) == image.shape[:2]
        assert (info["mcu_width"], info["mcu_height"]) == (16, 16)   # OpenCV's 4:2:0
        assert info["restart_interval"] == restart_mcus(image.shape[1], 4) and info["spliceable"]
        plain = fj.jpeg_layout(encode_jpeg(image, 90, 0).tobytes())
        assert plain["restart_interval"] == 0 and not plain["spliceable"]


def test_full_decode_is_ffcvs_decode(images):
    """No lever: the whole image at scale 1 with ffcv's IFAST DCT, equal to ffcv's own imdecode."""
    from ffcv.libffcv import imdecode

    for image in images:
        data = encode_jpeg(image, 90, 2)
        h, w = image.shape[:2]
        ours = fj.decode_box_numpy(data.tobytes(), (0, 0, h, w), (h, w), flags=0)
        theirs = np.empty((h, w, 3), np.uint8)
        assert imdecode(data, theirs, h, w, h, w, 0, 0, 1, 1, False, False) == 0
        np.testing.assert_array_equal(ours, theirs)
        assert psnr(ours, image) > 30  # and it is the picture that was encoded


@pytest.mark.parametrize("levers", ["region", "splice", "splice,region"])
def test_region_and_splice_give_the_full_decodes_crop(images, levers):
    """Decoding only the box's segments/rows/columns gives the very pixels of the full decode's
    crop: the cuts keep a margin, so chroma upsampling at the cut never reaches the box."""
    flags = fj.parse_levers(levers)
    rng = np.random.default_rng(1)
    for image in images:
        data = encode_jpeg(image, 90, 2).tobytes()
        for box in random_boxes(*image.shape[:2], 30, rng):
            for out in ((64, 64), (160, 160), (37, 50)):
                full = fj.decode_box_numpy(data, box, out, flags=0)
                part = fj.decode_box_numpy(data, box, out, flags=flags)
                np.testing.assert_array_equal(part, full, err_msg=f"{image.shape} {box} {out} {levers}")


def test_area_resize_matches_opencvs_inter_area(images):
    """The resize lever: OpenCV's INTER_AREA weights, rows filtered before columns; at most one level
    off, on a tiny share of values; boxes smaller than the output are refused (OpenCV upsamples)."""
    import cv2

    rng = np.random.default_rng(4)
    differing = total = 0
    for image in images:
        h_img, w_img = image.shape[:2]
        for _ in range(40):
            out_h, out_w = int(rng.integers(8, min(100, h_img) + 1)), int(rng.integers(8, min(100, w_img) + 1))
            h, w = int(rng.integers(out_h, h_img + 1)), int(rng.integers(out_w, w_img + 1))
            y, x = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
            ours = np.empty((out_h, out_w, 3), np.uint8)
            assert fj.resize_area(image.reshape(-1), w_img, y, x, y + h, x + w, ours) == 0
            theirs = cv2.resize(image[y:y + h, x:x + w], (out_w, out_h), interpolation=cv2.INTER_AREA)
            diff = np.abs(ours.astype(int) - theirs)
            assert diff.max() <= 1
            differing += int((diff > 0).sum())
            total += diff.size
    assert differing / total < 1e-4  # the README: fewer than 1 value in 10,000
    small = np.empty((64, 64, 3), np.uint8)
    assert fj.resize_area(images[0].reshape(-1), 500, 0, 0, 63, 300, small) == -1  # 63 rows < 64


def test_splice_needs_markers_and_falls_back_without_them(images):
    image = images[0]
    with_markers = encode_jpeg(image, 90, 1)
    without = encode_jpeg(image, 90, 0)
    region = np.zeros(8, np.int32)
    dst = np.empty(image.size, np.uint8)
    assert fj.decode_crop(with_markers, 375, 500, 100, 200, 120, 150, 64, 64, fj.SPLICE, dst, region) == 0
    # spliced: the small stream starts at the box's MCU row and restart segment
    assert 0 <= region[0] < 16 and 0 <= region[1] < 16 and region[4] <= 120 + 2 * 16
    assert fj.decode_crop(without, 375, 500, 100, 200, 120, 150, 64, 64, fj.SPLICE, dst, region) == 1
    assert (region[0], region[1], region[4], region[5]) == (100, 200, 375, 500)  # whole image decoded


def test_grayscale_and_progressive_jpegs(images):
    """Single-component scans (8x8 MCUs) splice too; progressive JPEGs take the region path."""
    import cv2

    grey = cv2.cvtColor(images[0], cv2.COLOR_RGB2GRAY)
    ok, mono = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_RST_INTERVAL, 1])
    buffer = io.BytesIO()
    Image.fromarray(images[1]).save(buffer, format="JPEG", quality=90, progressive=True)
    for data, spliceable in ((mono.tobytes(), True), (buffer.getvalue(), False)):
        assert fj.jpeg_layout(data)["spliceable"] == spliceable
        h, w = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2]
        for box in random_boxes(h, w, 10, np.random.default_rng(2)):
            full = fj.decode_box_numpy(data, box, (48, 48), flags=0)
            part = fj.decode_box_numpy(data, box, (48, 48), flags=fj.SPLICE | fj.REGION)
            np.testing.assert_array_equal(part, full)


def test_reduced_scale_decode_stays_close(images):
    """DCT scaling (only when the box is at least the output size at the reduced scale): the
    crop differs from the full-scale crop by a different low-pass filter; stated bounds: mean
    PSNR over scaled boxes > 28 dB, every box > 20 dB (pow2 scales)."""
    rng = np.random.default_rng(3)
    values = []
    for image in images[:2]:
        data = encode_jpeg(image, 90, 2).tobytes()
        for box in random_boxes(*image.shape[:2], 40, rng):
            region = np.zeros(8, np.int32)
            dst = np.empty(image.size, np.uint8)
            flags = fj.ALL_LEVERS | fj.SCALE_POW2_ONLY
            fj.decode_crop(np.frombuffer(data, np.uint8), *image.shape[:2], *box, 64, 64, flags, dst, region)
            if region[6] == 8:
                continue  # not scaled
            values.append(psnr(fj.decode_box_numpy(data, box, (64, 64), flags=flags),
                               fj.decode_box_numpy(data, box, (64, 64), flags=0)))
    assert len(values) > 20
    assert np.mean(values) > 28 and min(values) > 20


def test_bad_input_is_an_error_not_a_crash(images):
    data = encode_jpeg(images[0], 90, 2)
    dst = np.empty(images[0].size, np.uint8)
    region = np.zeros(8, np.int32)
    # headers without a scan and garbage are decode errors (-1); a scan cut in half decodes (1:
    # the stream as it is, not spliced), the missing part grey (libjpeg warns)
    for broken, expected in ((data[:200], -1), (np.zeros(1000, np.uint8), -1), (data[:len(data) // 2], 1)):
        for flags in (0, fj.ALL_LEVERS, fj.DEFAULT_FLAGS):
            rc = fj.decode_crop(np.ascontiguousarray(broken), 375, 500, 0, 0, 375, 500, 64, 64,
                                flags, dst, region)
            assert rc == expected, (len(broken), flags, rc)
    assert fj.decode_crop(data, 375, 500, 300, 0, 100, 10, 64, 64, fj.ALL_LEVERS, dst, region) == -3
    # a box on the bottom row at scale 1/8, and metadata taller than the JPEG, once made the row
    # loop spin forever (libjpeg returns no row past the end); run them in a thread with a deadline
    import threading

    grey = encode_jpeg(np.full((800, 600, 3), 128, np.uint8), 90, 0)
    big = np.empty(850 * 600 * 3, np.uint8)
    codes = []
    calls = [(800, 600, 799, 0, 1, 600, 1, 1, fj.SCALE | fj.REGION | (1 << 8)),
             (850, 600, 820, 0, 10, 600, 10, 10, fj.REGION)]
    worker = threading.Thread(target=lambda: codes.extend(
        fj.decode_crop(grey, *c[:8], c[8], big, region) for c in calls), daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive() and codes == [1, 1]
    with pytest.raises(ValueError, match="unknown decoder lever 'fast'"):
        fj.parse_levers("splice,fast")


def _ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.union1d(a, b)
    return float(np.max(np.abs(np.searchsorted(np.sort(a), grid, side="right") / len(a)
                               - np.searchsorted(np.sort(b), grid, side="right") / len(b))))


@pytest.mark.parametrize("height,width", [(375, 500), (40, 500)])  # (40, 500) hits the fallback often
def test_crop_boxes_follow_torchvisions_random_resized_crop(height, width):
    """The decoder draws boxes with ffcv's sampler compiled by numba; compare 20,000 of them with
    torchvision's RandomResizedCrop.get_params: KS statistic of top, left, height, width below
    the 0.1% critical value, and the same fallback (whole-image centre crop) rate within 1 point."""
    from numba import njit
    from ffcv.fields.rgb_image import get_random_crop
    from torchvision.transforms import RandomResizedCrop

    n = 20_000
    sampler = njit(get_random_crop)
    scale, ratio = np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3])

    @njit
    def draw(count, seed):
        np.random.seed(seed)
        out = np.empty((count, 4), np.int64)
        for k in range(count):
            out[k] = sampler(height, width, scale, ratio)
        return out

    ours = draw(n, 0)
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    theirs = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    critical = 1.95 * np.sqrt(2 / n)  # alpha = 0.001
    for column, name in enumerate(("top", "left", "height", "width")):
        assert _ks(ours[:, column], theirs[:, column]) < critical, name

    def fallback(boxes):
        whole = min(height, round(width / (4 / 3))) * min(width, round(height * 4 / 3))
        return np.mean(boxes[:, 2] * boxes[:, 3] == whole)

    assert abs(fallback(ours) - fallback(theirs)) < 0.01
    if height == 40:
        assert fallback(ours) > 0.2  # the case really exercises the fallback


def _loader_batches(path, kind, levers, resolution=64, batches=3):
    from ffcv_imagenet import data

    loader = data.create_train_loader(
        path, batch_size=16, resolution_px=resolution, num_workers=1, device=torch.device("cpu"),
        deterministic=True, seed=5, decoder=kind,
        decoder_factory=lambda *a, **k: data.train_decoder(*a, levers=levers, **k))
    return torch.cat([images for _, (images, _) in zip(range(batches), loader)])


def test_loader_crops_like_ffcv(tmp_path):
    """Through ffcv's Loader (numba, raw and JPEG samples mixed): seeded, the crop-first decoder draws
    the very boxes ffcv's RandomResizedCrop draws; without levers the batches are identical, with
    splice + region too; the area resize is off by at most one level; with scaling they stay close."""
    from ffcv_imagenet.writer import write_dataset

    rng = np.random.default_rng(11)
    folder = tmp_path / "images" / "n00000001"
    folder.mkdir(parents=True)
    for k in range(48):
        h, w = int(rng.integers(90, 260)), int(rng.integers(90, 260))
        Image.fromarray(photo_like(h, w, rng)).save(folder / f"img_{k:03d}.JPEG", quality=95)
    beton = tmp_path / "mixed.beton"
    summary = write_dataset(tmp_path / "images", beton, split="train", max_resolution=256,
                            write_mode="proportion", compress_probability=0.75, restart_interval=2,
                            num_workers=1, progress=False)
    assert 0 < summary["raw"] < summary["jpeg"]

    stock = _loader_batches(beton, "ffcv", None)
    assert stock.shape == (48, 3, 64, 64)
    same = _loader_batches(beton, "crop_first", 0)
    assert torch.equal(same, stock)
    spliced = _loader_batches(beton, "crop_first", fj.SPLICE | fj.REGION)
    assert torch.equal(spliced, stock)
    resized = _loader_batches(beton, "crop_first", fj.SPLICE | fj.REGION | fj.RESIZE)
    assert (resized.int() - stock.int()).abs().max() <= 1  # raw samples go through it too
    assert (resized != stock).float().mean() < 1e-3
    scaled = _loader_batches(beton, "crop_first", fj.ALL_LEVERS | fj.SCALE_POW2_ONLY)
    assert psnr(scaled.numpy(), stock.numpy()) > 28
