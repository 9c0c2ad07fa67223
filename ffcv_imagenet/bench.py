"""`ffcv-imagenet bench`: input-pipeline and training throughput, measured in one run, as ratios.

On the same images and the same RandomResizedCrop + flip, it measures (images/s):
  loader_1core / loader       this toolkit's training loader (crop-first decoder), 1 worker / all
  ffcv_loader_1core / _loader stock ffcv 1.0.2 RandomResizedCropRGBImageDecoder on the same .beton
  ffcv_raw50_loader(_1core)   stock ffcv on the images written as ffcv-imagenet's rn50 recipe
                              writes them (50% raw pixels, max side 500, q90), a much larger file
  torchvision_loader(_1core)  ImageFolder + DataLoader (PIL), same crop, same worker count
  dali_loader                 NVIDIA DALI CPU pipeline (decoders.image_random_crop), when installed
  model                       training steps on a batch already on the device (the ceiling)
  e2e                         training steps fed by this toolkit's loader
  precision_*                 model only in each precision the device offers (CPU: fp32, bf16;
                              CUDA: fp32, fp16), and which one training.precision=auto picks
  mish_torch / mish_fast      model only with Mish: torch's kernel against FastMish
  sa_weight_input / _gram_weight  model only with self-attention (model.self_attention) computed
                              as (X X^T)(W X) against (X X^T W) X
  writer / ffcv_writer        .beton writing, ours against ffcv's DatasetWriter, same folder/options
plus, on one worker, each decoder lever alone, and per-core rates at 192 and 224 px for the
projection "CPU cores per H100 needed to feed ResNet-50" (H100 ceilings: ANCHORS.md, reference).

Loader passes of all configurations are interleaved round by round, so that the shared machine's
drift falls on all of them alike; ratios taken in one run are the result, not absolute rates.
"""

import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .command import Command, Option
from .config import ConfigError
from .host import cpu_cores

# Reference, not measured here: torchvision resnet50 model-only img/s on one H100 80GB, channels-last,
# fp16 autocast, batch 256 (ANCHORS.md, "Measured on the lent GPU machine", 2026-11-23).
H100_RESNET50_IMG_S = {160: 7815, 192: 6020, 224: 4612}
CLASSES = 10
MAX_SIDE = 500
QUALITY = 90
SYNTHETIC_SIZES = ((375, 500), (500, 375), (333, 500), (500, 500), (281, 500), (500, 400))
MODEL_PARTS = ("training", "precision", "mish", "attention")   # the parts that time training steps
PARTS = ("torchvision", "dali", *MODEL_PARTS, "writer")   # what bench.skip can leave out


# --------------------------------------------------------------------------- inputs

def prepare_images(folder: Path, source, distinct: int, count: int, seed: int = 0) -> dict:
    """ImageFolder at `folder` with `count` JPEGs (CLASSES classes): `distinct` different images at
    max side 500, q90 (read from `source`, or photo-like synthetic ones when source is None),
    replicated by hard links. Returns {"distinct": n, "count": count, "source": ...}."""
    import cv2

    from .synthetic import photo_like

    rng = np.random.default_rng(seed)
    encoded = []
    if source is not None:
        files = sorted(p for p in Path(source).rglob("*")
                       if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        if not files:
            raise SystemExit(f"ffcv-imagenet bench: no .JPEG/.jpg/.png files under bench.images={source}")
        for path in files[:distinct] if distinct else files:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise SystemExit(f"ffcv-imagenet bench: cannot decode {path}")
            encoded.append(_reencode(image))
    else:
        for k in range(distinct):
            h, w = SYNTHETIC_SIZES[k % len(SYNTHETIC_SIZES)]
            encoded.append(_reencode(photo_like(h, w, rng)[:, :, ::-1]))
    for c in range(CLASSES):
        (folder / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    originals = []
    for k, data in enumerate(encoded):
        path = folder / f"class_{k % CLASSES:02d}" / f"img_{k:05d}.JPEG"
        path.write_bytes(data)
        originals.append(path)
    for k in range(len(encoded), count):
        src = originals[k % len(originals)]
        os.link(src, folder / f"class_{k % CLASSES:02d}" / f"img_{k:05d}.JPEG")
    return {"distinct": len(encoded), "count": max(count, len(encoded)),
            "source": str(source) if source else "synthetic (synthetic.photo_like)"}


def _reencode(bgr: np.ndarray) -> bytes:
    import cv2

    from .writer import target_size

    size = target_size(bgr.shape[1], bgr.shape[0], MAX_SIDE)
    if size != (bgr.shape[1], bgr.shape[0]):
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
    return data.tobytes()


def payload_bytes(beton: Path) -> int:
    from ffcv.reader import Reader

    return int(Reader(str(beton)).alloc_table["size"].sum())


# --------------------------------------------------------------------------- writers

def write_ours(folder, path, workers, restart_interval=None, write_mode="jpg") -> float:
    """This toolkit's writer; restart_interval None: the writer's default (options.OPTIONS)."""
    from .writer import write_dataset

    start = time.perf_counter()
    write_dataset(folder, path, split="train", max_resolution=MAX_SIDE, write_mode=write_mode,
                  jpeg_quality=QUALITY, restart_interval=restart_interval, num_workers=workers,
                  progress=False, overwrite=True)
    return time.perf_counter() - start


def write_ffcv(folder, path, workers, write_mode="jpg") -> float:
    """ffcv 1.0.2's own DatasetWriter over torchvision's ImageFolder (PIL images)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder))
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=MAX_SIDE,
                                     jpeg_quality=QUALITY, compress_probability=0.5),
              "label": IntField()}
    start = time.perf_counter()
    DatasetWriter(str(path), fields, num_workers=workers).from_indexed_dataset(dataset)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- loaders

class Pass:
    """One measured configuration: `make()` builds an iterable of batches; passes are timed."""

    def __init__(self, key, make, label):
        self.key, self.make, self.label = key, make, label
        self.loader = None
        self.images = 0
        self.seconds = 0.0

    def warm(self):
        self.loader = self.make()
        for _ in self.loader:  # the first pass compiles ffcv's pipeline (numba) / starts workers
            pass

    def run(self):
        import torch

        start = time.perf_counter()
        n = 0
        for batch in self.loader:
            images = batch[0]
            n += images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        self.seconds += time.perf_counter() - start
        self.images += n

    def close(self):
        """Drop the loader, so that a DataLoader's persistent worker processes end now rather than
        at some later garbage collection (they would outlive the bench in a caller's process)."""
        import gc

        self.loader = None
        gc.collect()

    @property
    def rate(self):
        return self.images / self.seconds if self.seconds else float("nan")


def measure(passes, seconds: float, min_rounds: int = 2, log=print):
    """Warm every configuration, then run one pass of each per round until each has had
    `seconds` of timed passes (and at least min_rounds)."""
    for p in passes:
        log(f"  warming {p.label} ...")
        p.warm()
    rounds = 0
    while rounds < min_rounds or min(p.seconds for p in passes) < seconds:
        for p in passes:
            p.run()
        rounds += 1
    for p in passes:
        log(f"  {p.label:<58} {p.rate:9.0f} img/s")
        p.close()
    return {p.key: p.rate for p in passes}


def ours_loader(path, res, batch, workers, flags=None):
    import torch

    from . import data

    def make():
        return data.create_train_loader(
            path, batch_size=batch, resolution_px=res, num_workers=workers, device=torch.device("cpu"),
            decoder="crop_first", torch_threads=torch.get_num_threads(),
            decoder_factory=lambda *a, **k: data.train_decoder(*a, levers=flags, **k))
    return make


def ffcv_loader(path, res, batch, workers):
    def make():
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

        return Loader(str(path), batch_size=batch, num_workers=workers, order=OrderOption.RANDOM,
                      drop_last=True, os_cache=True,
                      pipelines={"image": [RandomResizedCropRGBImageDecoder((res, res)),
                                           RandomHorizontalFlip(), ToTensor(), ToTorchImage()],
                                 "label": [IntDecoder(), ToTensor()]})
    return make


def torchvision_loader(folder, res, batch, workers):
    def make():
        import torch
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        tf = transforms.Compose([transforms.RandomResizedCrop(res), transforms.RandomHorizontalFlip(),
                                 transforms.PILToTensor()])
        return torch.utils.data.DataLoader(ImageFolder(str(folder), transform=tf), batch_size=batch,
                                           shuffle=True, drop_last=True, num_workers=workers,
                                           persistent_workers=True)
    return make


def dali_loader(folder, res, batch, workers):
    """NVIDIA DALI's CPU pipeline: region decode of the random crop, resize, flip."""
    def make():
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=batch, num_threads=workers, device_id=None)
        def pipe():
            jpegs, labels = fn.readers.file(file_root=str(folder), random_shuffle=True, name="reader")
            images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                                   random_area=[0.08, 1.0],
                                                   random_aspect_ratio=[3 / 4, 4 / 3])
            images = fn.resize(images, resize_x=res, resize_y=res)
            images = fn.flip(images, horizontal=fn.random.coin_flip())
            return images, labels

        p = pipe()
        p.build()
        epoch = p.epoch_size("reader") // batch

        class Epoch:
            def __iter__(self):
                for _ in range(epoch):
                    images, labels = p.run()
                    yield [images.as_array()]
        return Epoch()
    return make


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


# --------------------------------------------------------------------------- training steps

def _step_source(batches, batch: int, res: int, device):
    """source(steps) -> `steps` (images, labels) pairs: cycling `batches`, or with batches=None
    one random batch already on the device, reused (the model-only ceiling)."""
    import torch

    if batches is None:
        images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, device=device)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (batch,), device=device)
        return lambda steps: ((images, labels) for _ in range(steps))

    def source(steps):
        produced = 0
        while produced < steps:
            for item in batches:
                yield item
                produced += 1
                if produced >= steps:
                    return
    return source


def training_rate(arch, res, batch, seconds, batches=None, log=print, model=None, label="",
                  precision="auto", device=None, timings=None) -> float:
    """Images/s of real training steps (engine's train_one_epoch: SGD, label smoothing, autocast).
    batches=None: one batch already on the device, reused (model-only ceiling). model: use this
    (already built) model instead of a fresh `arch`; label names it in the log line. precision:
    as training.precision (auto: what training would use here). device: where to train (default a
    GPU when there is one). timings: a dict that receives `first_steps_s`, the seconds of the first
    two steps (with torch.compile, mostly compilation). cuDNN autotunes, as in training."""
    import torch

    from .models import create_model
    from .optim import create_optimizer
    from .train import LossOptions, Trainer, resolve_precision, train_one_epoch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(precision, device)
    torch.backends.cudnn.benchmark = True
    if model is None:
        model = create_model(arch, num_classes=1000)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = create_optimizer(model, name="sgd", lr=0.1, momentum=0.9, nesterov=True,
                                 weight_decay=5e-5)
    trainer = Trainer(model, optimizer, device, precision, loss=LossOptions(label_smoothing=0.1))
    source = _step_source(batches, batch, res, device)

    def run(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = train_one_epoch(trainer, source(steps), epoch=0, steps_per_epoch=steps,
                              lr_fn=lambda e: 0.1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out["images"], time.perf_counter() - start

    torch.set_num_threads(cpu_cores())  # ffcv's Loader lowers it when iterated
    warm_until = time.perf_counter() + min(seconds, 5.0)
    # warm-up: allocator, oneDNN/cudnn kernel selection, the loader's first batches
    _, first_s = run(2)
    if timings is not None:
        timings["first_steps_s"] = first_s
    while time.perf_counter() < warm_until:
        run(2)
    images_done, elapsed, steps = 0, 0.0, 2
    while elapsed < seconds:
        n, s = run(steps)
        images_done += n
        elapsed += s
        steps = min(steps * 2, 64)
    rate = images_done / elapsed
    log(f"  {arch}{label} @ {res}px, batch {batch}, {precision} on {device.type}: {rate:.1f} img/s")
    return rate


def alternating_rates(arch, res, batch, seconds, variants: dict, log=print) -> dict:
    """{key: training img/s} for variants {key: (setup, label, precision)}, where setup() readies
    and returns the model to time and precision is as training.precision. The variants are measured
    alternately, twice each for half of `seconds`, and each rate is the mean of its two, so a slow
    spell on a shared machine hits all alike."""
    rates = {key: [] for key in variants}
    for _ in range(2):
        for key, (setup, label, precision) in variants.items():
            rates[key].append(training_rate(arch, res, batch, seconds / 2, log=log, model=setup(),
                                            label=label, precision=precision))
    return {key: sum(r) / len(r) for key, r in rates.items()}


def precision_rates(arch, res, batch, seconds, log=print) -> dict:
    """Training img/s of `arch` in fp32 and in the device's half precision (bf16 on the CPU, fp16
    on CUDA), same weights, alternated; plus `auto`, the precision training.precision=auto picks."""
    import torch

    from .models import create_model
    from .train import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    half = "fp16" if device.type == "cuda" else "bf16"
    model = create_model(arch, num_classes=1000)
    rates = alternating_rates(arch, res, batch, seconds, {
        p: (lambda: model, f" ({p})", p) for p in ("fp32", half)}, log=log)
    return {"auto": resolve_precision("auto", device), **rates}


def mish_rates(arch, res, batch, seconds, log=print) -> tuple:
    """Training img/s of `arch` with Mish: (torch's nn.Mish, this toolkit's FastMish), same weights."""
    import torch

    from .models import FastMish, create_model

    fast = create_model(arch, num_classes=1000, activation="mish")
    plain = copy.deepcopy(fast)
    for parent in list(plain.modules()):
        for name, child in parent.named_children():
            if isinstance(child, FastMish):
                setattr(parent, name, torch.nn.Mish())
    rates = alternating_rates(arch, res, batch, seconds, {"torch": (lambda: plain, " (torch Mish)", "auto"),
                                                          "fast": (lambda: fast, " (FastMish)", "auto")}, log=log)
    return rates["torch"], rates["fast"]


def attention_rates(arch, res, batch, seconds, log=print) -> tuple:
    """Training img/s of `arch` with SimpleSelfAttention computing (X X^T)(W X) and (X X^T W) X:
    (weight_input, gram_weight). One model, its layers switched between the orders."""
    from .models import SimpleSelfAttention, create_model

    model = create_model(arch, num_classes=1000, self_attention=True)
    layers = [m for m in model.modules() if isinstance(m, SimpleSelfAttention)]

    def ordered(order):
        def setup():
            for layer in layers:
                layer.order = order
            return model
        return setup, f" (self-attention, {order})", "auto"

    rates = alternating_rates(arch, res, batch, seconds,
                              {order: ordered(order) for order in ("weight_input", "gram_weight")}, log=log)
    return rates["weight_input"], rates["gram_weight"]


# --------------------------------------------------------------------------- report

def projection(per_core: dict) -> dict:
    """{px: (stock ffcv img/s per core, ours per core)} -> cores per H100 at the px with a reference
    ceiling: the H100's ResNet-50 model-only rate divided by the per-core loader rate."""
    return {r: {"h100_img_s": H100_RESNET50_IMG_S[r],
                "ffcv_cores": H100_RESNET50_IMG_S[r] / f if f else None,
                "ours_cores": H100_RESNET50_IMG_S[r] / o if o else None}
            for r, (f, o) in per_core.items() if r in H100_RESNET50_IMG_S}


def ratio(a, b):
    return a / b if a and b and np.isfinite(a) and np.isfinite(b) else None


def build_table(r: dict) -> str:
    rows = [
        ("this toolkit, crop-first decoder (recommended file)", "loader_1core_img_s", "loader_img_s"),
        ("stock ffcv 1.0.2, same file", "ffcv_loader_1core_img_s", "ffcv_loader_img_s"),
        ("stock ffcv 1.0.2, 50%-raw file (rn50 recipe)", "ffcv_raw50_loader_1core_img_s", "ffcv_raw50_loader_img_s"),
        ("torchvision ImageFolder + DataLoader (PIL)", "torchvision_loader_1core_img_s", "torchvision_loader_img_s"),
        ("NVIDIA DALI CPU (image_random_crop)", "dali_loader_1core_img_s", "dali_loader_img_s"),
    ]
    w = r["workers"]
    out = [f"| loader, RandomResizedCrop {r['resolution']} + flip | img/s, 1 worker | img/s, {w} workers |",
           "|---|---|---|"]
    for name, one, all_ in rows:
        if one in r or all_ in r:
            out.append(f"| {name} | {_fmt(r.get(one))} | {_fmt(r.get(all_))} |")
    out += ["", "| ratio | 1 worker | all workers |", "|---|---|---|"]
    for name, num, den in (("this / stock ffcv, same file", "loader", "ffcv_loader"),
                           ("this / stock ffcv, 50%-raw file", "loader", "ffcv_raw50_loader"),
                           ("this / torchvision", "loader", "torchvision_loader")):
        out.append(f"| {name} | {_fmtr(ratio(r.get(num + '_1core_img_s'), r.get(den + '_1core_img_s')))} "
                   f"| {_fmtr(ratio(r.get(num + '_img_s'), r.get(den + '_img_s')))} |")
    for res in r.get("extra_resolutions", []):
        out.append(f"| this / stock ffcv, same file, {res} px | "
                   f"{_fmtr(ratio(r.get(f'loader_1core_img_s_{res}'), r.get(f'ffcv_loader_1core_img_s_{res}')))} | |")
    out += ["", "| training | img/s |", "|---|---|",
            f"| model only ({r['arch']} @ {r['model_resolution']} px, batch on the device) "
            f"| {_fmt(r.get('model_img_s'))} |",
            f"| end to end (this loader -> same training step) | {_fmt(r.get('e2e_img_s'))} |",
            f"| end to end / model only | {_fmtr(ratio(r.get('e2e_img_s'), r.get('model_img_s')))} |",
            *_precision_rows(r),
            f"| model only, Mish activations, torch's kernel | {_fmt(r.get('mish_torch_img_s'))} |",
            f"| model only, Mish activations, FastMish | {_fmt(r.get('mish_fast_img_s'))} |",
            f"| FastMish / torch's Mish | {_fmtr(ratio(r.get('mish_fast_img_s'), r.get('mish_torch_img_s')))} |",
            f"| model only, self-attention as (X X^T)(W X) | {_fmt(r.get('sa_weight_input_img_s'))} |",
            f"| model only, self-attention as (X X^T W) X | {_fmt(r.get('sa_gram_weight_img_s'))} |",
            "| (X X^T W) X / (X X^T)(W X) | "
            f"{_fmtr(ratio(r.get('sa_gram_weight_img_s'), r.get('sa_weight_input_img_s')))} |",
            "", "| writer, same folder and options (JPEG q90, max side 500) | img/s |", "|---|---|",
            f"| ffcv-imagenet write ({r['workers']} workers) | {_fmt(r.get('writer_img_s'))} |",
            f"| ffcv 1.0.2 DatasetWriter ({r['workers']} workers) | {_fmt(r.get('ffcv_writer_img_s'))} |"]
    sizes = r.get("file_sizes", {})
    if sizes:
        out += ["", "| file | bytes on disk | image bytes |", "|---|---|---|"]
        for name, info in sizes.items():
            out.append(f"| {name} | {info['file_bytes']:,} | {info['payload_bytes']:,} |")
    levers = r.get("levers_1core_img_s")
    if levers:
        base = levers.get("none")
        out += ["", "| crop-first decoder, 1 worker | img/s | vs no lever |", "|---|---|---|"]
        for name, rate in levers.items():
            out.append(f"| {name} | {_fmt(rate)} | {_fmtr(ratio(rate, base))} |")
    projection = r.get("projection")
    if projection:
        out += ["", "Projection (not a measurement): CPU cores needed per H100 to feed ResNet-50 = the "
                "H100's model-only rate (reference, ANCHORS.md) / the loader's per-core rate measured here.",
                "", "| px | H100 ResNet-50 img/s (reference) | stock ffcv cores/GPU | this toolkit cores/GPU |",
                "|---|---|---|---|"]
        for res, p in projection.items():
            out.append(f"| {res} | {p['h100_img_s']:,} | {_fmtc(p.get('ffcv_cores'))} | {_fmtc(p.get('ours_cores'))} |")
    return "\n".join(out)


def _precision_rows(r: dict) -> list:
    """Rows for the precision part: each precision's model-only rate, the ratio, auto's pick."""
    half = "bf16" if "precision_bf16_img_s" in r else "fp16"
    fp32, other = r.get("precision_fp32_img_s"), r.get(f"precision_{half}_img_s")
    if fp32 is None and other is None:
        return []
    auto = r.get("precision_auto", "?")
    return [f"| model only, fp32{' (auto)' if auto == 'fp32' else ''} | {_fmt(fp32)} |",
            f"| model only, {half}{' (auto)' if auto == half else ''} | {_fmt(other)} |",
            f"| {half} / fp32 | {_fmtr(ratio(other, fp32))} |"]


def _fmt(x):
    return "–" if x is None or not np.isfinite(x) else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _fmtr(x):
    return "–" if x is None else f"{x:.2f}x"


def _fmtc(x):
    return "–" if x is None else f"{x:.1f}"


def machine() -> dict:
    import torch

    from .logger import cpu_model
    from .distributed import cpu_has_fast_bf16

    return {"cpu": cpu_model() or platform.processor() or "", "cores": cpu_cores(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": cpu_has_fast_bf16(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------- main

COMMAND = Command("bench", "bench", (
    "Loader, writer and training throughput on the same images, in one run, as ratios (this toolkit "
    "vs stock ffcv 1.0.2, ffcv's 50%-raw files, torchvision, DALI)."), {
    "images": Option(str, "", "folder of JPEGs to use, searched recursively (e.g. "
                     "../shared/data/imagenet-samples-315); empty: photo-like synthetic images", path=True),
    "distinct": Option(int, None, "distinct images (default: all of bench.images, or 64 synthetic; "
                       "quick: 24)", low=1),
    "count": Option(int, None, "images after replication by hard links (default 3150; quick: 192)", low=1),
    "res": Option(int, None, "training crop in px (default 160; quick: 64)", low=8),
    "extra_res": Option(int, None, "more crops for per-core rates and the projection (default "
                        "192,224; quick: none)", low=8, many=True),
    "batch_size": Option(int, None, "loader batch (default 128; quick: 32)", low=1),
    "workers": Option(int, 0, "'all cores' worker count; 0 = all cores", low=0),
    "seconds": Option(float, None, "minimum timed seconds per loader configuration (default 8; "
                      "quick: 0.5)", low=0.0),
    "arch": Option(str, None, "model for the training rates (default resnet50; quick: resnet18)"),
    "model_res": Option(int, None, "model resolution (default: bench.res)", low=8),
    "model_batch": Option(int, None, "training batch (default 64 on CPU, 256 on CUDA; quick: 8)", low=1),
    "train_seconds": Option(float, None, "minimum timed seconds for each training rate (default 20; "
                            "quick: 1)", low=0.0),
    "restart_interval": Option(int, None, "writer's restart interval for this toolkit's file "
                               "(default: the writer's)", low=0),
    "levers": Option(bool, True, "the one-lever-at-a-time decoder study (quick: off)"),
    "skip": Option(str, (), "parts to leave out", choices=PARTS, many=True),
    "workdir": Option(str, "", "keep the images and .beton files here (default: a temporary "
                      "folder, removed)", path=True),
    "json": Option(str, "", "write every rate, size and ratio to this JSON file", path=True),
    "quick": Option(bool, False, "small, fast run (CI): 192 tiny-model images at 64 px, no lever study"),
})


def parse_args(argv):
    """The bench's settings: the command line, then the defaults that depend on bench.quick."""
    args = COMMAND.parse(argv)
    quick = args.quick
    defaults = dict(distinct=24 if quick else (0 if args.images else 64), count=192 if quick else 3150,
                    res=64 if quick else 160, extra_res=() if quick else (192, 224),
                    batch_size=32 if quick else 128, seconds=0.5 if quick else 8.0,
                    arch="resnet18" if quick else "resnet50", train_seconds=1.0 if quick else 20.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if quick:
        args.levers = False  # seven more compiled loaders; the full run measures them
    args.skip = set(args.skip)
    if args.images and not Path(args.images).is_dir():
        raise ConfigError(f"bench.images={args.images}: not a folder")
    return args


def run(args, log=print) -> dict:
    from . import fastjpeg

    cores = cpu_cores()
    workers = args.workers or cores
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ffcv_imagenet_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": "ffcv-imagenet bench " + " ".join(args.argv),
              "machine": machine(), "workers": workers, "resolution": args.res,
              "batch_size": args.batch_size, "arch": args.arch,
              "model_resolution": args.model_res or args.res,
              "decoder_levers": sorted(k for k, v in fastjpeg.LEVERS.items() if v & fastjpeg.DEFAULT_FLAGS),
              "extra_resolutions": args.extra_res}
    try:
        folder = workdir / "images"
        if folder.exists():
            shutil.rmtree(folder)
        log(f"[bench] preparing {args.count} images in {folder}")
        result["images"] = prepare_images(folder, args.images, args.distinct, args.count)
        files = write_files(args, folder, workdir, workers, result, log)
        result.update(measure(loader_passes(args, files, folder, workers, log), args.seconds, log=log))
        if workers == 1:
            for key in ("loader", "ffcv_loader", "ffcv_raw50_loader", "torchvision_loader", "dali_loader"):
                if f"{key}_1core_img_s" in result:
                    result[f"{key}_img_s"] = result[f"{key}_1core_img_s"]
        if args.levers:
            log("[bench] decoder levers, one at a time, 1 worker")
            result["levers_1core_img_s"] = measure(lever_passes(args, files), args.seconds, log=log)
        if args.extra_res:
            log(f"[bench] per-core rates at {', '.join(map(str, args.extra_res))} px")
            result.update(measure(extra_resolution_passes(args, files), args.seconds, log=log))
        per_core = {args.res: (result.get("ffcv_loader_1core_img_s"), result.get("loader_1core_img_s"))}
        for r in args.extra_res:
            per_core[r] = (result.get(f"ffcv_loader_1core_img_s_{r}"), result.get(f"loader_1core_img_s_{r}"))
        result["projection"] = projection(per_core)
        result.update(model_rates(args, files["ours"], workers, log))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["ratios"] = ratios(result, args.extra_res)
    return result


def write_files(args, folder: Path, workdir: Path, workers: int, result: dict, log) -> dict:
    """The three .beton files the loaders read (ours; ffcv's JPEG; ffcv's 50% raw), with the
    writers' rates, the restart interval ours was written with and the files' sizes into
    `result`; returns their paths by name."""
    from .metadata import read_metadata

    files = {"ours": workdir / "ours.beton", "ffcv_jpg": workdir / "ffcv_jpg.beton",
             "raw50": workdir / "ffcv_raw50.beton"}
    log("[bench] writing .beton files (ours: JPEG q90 + restart markers; ffcv: JPEG q90; ffcv: 50% raw)")
    t_ours = write_ours(folder, files["ours"], workers, args.restart_interval)
    result["restart_interval"] = read_metadata(files["ours"])["options"]["restart_interval"]
    t_ffcv = write_ffcv(folder, files["ffcv_jpg"], workers)
    write_ffcv(folder, files["raw50"], workers, write_mode="proportion")
    n = result["images"]["count"]
    if "writer" not in args.skip:
        result["writer_img_s"] = n / t_ours
        result["ffcv_writer_img_s"] = n / t_ffcv
    result["file_sizes"] = {name: {"file_bytes": os.path.getsize(p), "payload_bytes": payload_bytes(p)}
                            for name, p in (("this toolkit (JPEG q90, restart markers)", files["ours"]),
                                            ("ffcv, JPEG q90", files["ffcv_jpg"]),
                                            ("ffcv, 50% raw (rn50 recipe)", files["raw50"]))}
    sizes = list(result["file_sizes"].values())
    result["restart_marker_overhead"] = sizes[0]["payload_bytes"] / sizes[1]["payload_bytes"] - 1
    result["raw50_size_ratio"] = sizes[2]["file_bytes"] / sizes[0]["file_bytes"]
    return files


def loader_passes(args, files: dict, folder: Path, workers: int, log) -> list:
    """The loaders compared at args.res: ours and stock ffcv on the same file and ffcv on its
    50%-raw file (on 1 worker, then on `workers`), then torchvision and DALI on the JPEG folder
    (each on 1, then on `workers`)."""
    res, bs = args.res, args.batch_size
    ours, raw50 = files["ours"], files["raw50"]
    counts = (1, workers) if workers > 1 else (1,)

    def passes_of(key, make, label, n, unit="worker"):
        return Pass(key.replace("_img_s", "_1core_img_s") if n == 1 else key, make(n),
                    f"{label}, {n} {unit}{'s' if n > 1 else ''}")

    betons = [("loader_img_s", lambda n: ours_loader(ours, res, bs, n), "this toolkit"),
              ("ffcv_loader_img_s", lambda n: ffcv_loader(ours, res, bs, n), "stock ffcv, same file"),
              ("ffcv_raw50_loader_img_s", lambda n: ffcv_loader(raw50, res, bs, n), "stock ffcv, 50%-raw file")]
    passes = [passes_of(*kind, n) for n in counts for kind in betons]
    if "torchvision" not in args.skip:
        make = lambda n: torchvision_loader(folder, res, bs, n)  # noqa: E731
        passes += [passes_of("torchvision_loader_img_s", make, "torchvision", n) for n in counts]
    if "dali" not in args.skip and dali_available():
        make = lambda n: dali_loader(folder, res, bs, n)  # noqa: E731
        passes += [passes_of("dali_loader_img_s", make, "DALI CPU", n, unit="thread") for n in counts]
    elif "dali" not in args.skip:
        log("[bench] DALI: not installed (pip install 'ffcv-imagenet[dali]'); skipped")
    log(f"[bench] loaders at {res} px, batch {bs}")
    return passes


def lever_passes(args, files: dict) -> list:
    """The crop-first decoder with its levers one at a time and together, 1 worker."""
    from . import fastjpeg

    res, bs, ours = args.res, args.batch_size, files["ours"]
    studies = [("none", 0), ("region", fastjpeg.REGION), ("splice", fastjpeg.SPLICE),
               ("scale", fastjpeg.SCALE | fastjpeg.SCALE_POW2_ONLY), ("resize", fastjpeg.RESIZE),
               ("splice+region", fastjpeg.SPLICE | fastjpeg.REGION),
               ("splice+region+scale", fastjpeg.SPLICE | fastjpeg.REGION | fastjpeg.SCALE | fastjpeg.SCALE_POW2_ONLY),
               ("all (default)", fastjpeg.DEFAULT_FLAGS)]
    passes = [Pass(name, ours_loader(ours, res, bs, 1, flags), f"crop-first: {name}") for name, flags in studies]
    passes.append(Pass("all (default), file without restart markers",
                       ours_loader(files["ffcv_jpg"], res, bs, 1, fastjpeg.DEFAULT_FLAGS),
                       "crop-first: all, ffcv's JPEG file (no markers)"))
    return passes


def extra_resolution_passes(args, files: dict) -> list:
    """Ours and stock ffcv per core at each of args.extra_res."""
    passes, ours, bs = [], files["ours"], args.batch_size
    for r in args.extra_res:
        passes += [Pass(f"loader_1core_img_s_{r}", ours_loader(ours, r, bs, 1), f"this toolkit, 1 worker, {r} px"),
                   Pass(f"ffcv_loader_1core_img_s_{r}", ffcv_loader(ours, r, bs, 1), f"stock ffcv, 1 worker, {r} px")]
    return passes


def model_rates(args, ours: Path, workers: int, log) -> dict:
    """Training rates of args.arch: model only and end to end from our loader, fp32 against half
    precision, FastMish, the self-attention orders (each unless in args.skip)."""
    import torch

    from . import data

    model_res = args.model_res or args.res
    batch = args.model_batch or (256 if torch.cuda.is_available() else (8 if args.quick else 64))
    out = {"model_batch": batch} if set(MODEL_PARTS) - args.skip else {}
    what = f"{args.arch} @ {model_res} px, batch {batch}"
    if "training" not in args.skip:
        log(f"[bench] training rates: {what}")
        out["model_img_s"] = training_rate(args.arch, model_res, batch, args.train_seconds, log=log)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        loader = data.create_train_loader(ours, batch_size=batch, resolution_px=model_res,
                                          num_workers=workers, device=device,
                                          torch_threads=torch.get_num_threads())
        out["e2e_img_s"] = training_rate(args.arch, model_res, batch, args.train_seconds,
                                         batches=loader, log=log)
    if "precision" not in args.skip:
        log(f"[bench] precision: fp32 against half precision, {what}")
        precision = precision_rates(args.arch, model_res, batch, args.train_seconds, log=log)
        out["precision_auto"] = precision.pop("auto")
        out.update({f"precision_{name}_img_s": rate for name, rate in precision.items()})
    if "mish" not in args.skip:
        log(f"[bench] Mish: torch's kernel against FastMish, {what}")
        out["mish_torch_img_s"], out["mish_fast_img_s"] = mish_rates(
            args.arch, model_res, batch, args.train_seconds, log=log)
    if "attention" not in args.skip:
        log(f"[bench] self-attention: (X X^T)(W X) against (X X^T W) X, {what}")
        out["sa_weight_input_img_s"], out["sa_gram_weight_img_s"] = attention_rates(
            args.arch, model_res, batch, args.train_seconds, log=log)
    return out


def ratios(result: dict, extra_res) -> dict:
    """The ratios the README reports, each of two rates taken in this one run."""
    get = result.get
    out = {
        "this_over_ffcv_same_file_1core": ratio(get("loader_1core_img_s"), get("ffcv_loader_1core_img_s")),
        "this_over_ffcv_same_file": ratio(get("loader_img_s"), get("ffcv_loader_img_s")),
        "this_over_ffcv_raw50_1core": ratio(get("loader_1core_img_s"), get("ffcv_raw50_loader_1core_img_s")),
        "this_over_ffcv_raw50": ratio(get("loader_img_s"), get("ffcv_raw50_loader_img_s")),
        "this_over_torchvision": ratio(get("loader_img_s"), get("torchvision_loader_img_s")),
        "e2e_over_model": ratio(get("e2e_img_s"), get("model_img_s")),
        "half_over_fp32": ratio(get("precision_bf16_img_s", get("precision_fp16_img_s")),
                                get("precision_fp32_img_s")),
        "fast_mish_over_torch_mish": ratio(get("mish_fast_img_s"), get("mish_torch_img_s")),
        "sa_gram_weight_over_weight_input": ratio(get("sa_gram_weight_img_s"), get("sa_weight_input_img_s")),
    }
    for r in extra_res:
        out[f"this_over_ffcv_same_file_1core_{r}"] = ratio(
            get(f"loader_1core_img_s_{r}"), get(f"ffcv_loader_1core_img_s_{r}"))
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except ValueError as e:
        return COMMAND.refuse(e)
    args.argv = argv
    result = run(args)
    m = result["machine"]
    print(f"\nffcv-imagenet bench, {result['date']}, {m['cpu']} ({m['cores']} cores, {m['cpu_capability']}), "
          f"{result['images']['count']} images ({result['images']['distinct']} distinct, "
          f"{result['images']['source']})\ncommand: {result['command']}\n")
    print(build_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
