"""`ffcv-imagenet check`: is this machine ready for a long run, and what will the run cost here?

Run it on a new machine before a long job (and whenever a GPU machine is lent). In order, each
step printed as it passes or fails:

  environment   versions, devices (GPU names, memory), CPU cores; ffcv and the crop-first
                decoder import and decode one JPEG to the same bytes
  correctness   per device type (cpu, and cuda when visible) and precision it supports (CPU:
                fp32, bf16; CUDA: fp16 + GradScaler, bf16, fp32): ResNet-18 trained for a few
                steps of the engine on a small generated .beton, the loss must fall; a checkpoint
                saved and loaded gives identical weights; on CUDA a 1-process NCCL group and a DDP
                step
  speed         ResNet-50 channels-last training img/s on the fastest device: model only (a
                batch already on the device) and end to end (fed by the loader), at 160 px (and
                192, 224 unless check.quick), eager and torch.compile (not when quick); the
                loader's img/s with all cores and with one; end to end / model only
  preset run    with --check.data=DIR (an ImageFolder with train/ and val/, e.g. Imagenette):
                the .beton files written and a preset (--check.preset) trained on this machine,
                logged like any run (log.jsonl, time to accuracy)
  plan          with --check.preset=FILE (and --check.train_beton=FILE): minutes per epoch and the run
                on this machine from the measured rates (a projection), the limit (loader or
                model), cores per GPU the loader needs, whether the file fits in RAM

Everything goes to OUT/check.json (and OUT/check.md, the table). `--check.render=DIR,...` instead
rebuilds the README's machine-check section from committed check.json files.
"""

import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .command import Command, Option
from .config import ConfigError

SECTION = "check"
# check.modes: eager, or torch.compile with these options (reduce-overhead: CUDA graphs;
# max-autotune: inductor's kernel search, CUDA graphs too)
COMPILE_MODES = {"compile": {}, "reduce-overhead": {"mode": "reduce-overhead"},
                 "max-autotune": {"mode": "max-autotune"}}
MODES = ("eager", *COMPILE_MODES)
CORRECTNESS_ARCH = "resnet18"
IMAGENET_TRAIN_IMAGES = 1_281_167


# --------------------------------------------------------------------------- step bookkeeping

class Steps:
    """Runs named steps, prints PASS/FAIL (or SKIP) as each ends, keeps the record for
    check.json."""

    def __init__(self, log=print):
        self.log, self.records = log, []

    def run(self, name: str, fn, *args, **kwargs):
        """fn(...) -> (detail text, value); an exception fails the step (value None)."""
        start = time.perf_counter()
        try:
            detail, value = fn(*args, **kwargs)
            status = "pass"
        except Skip as skip:
            detail, value, status = str(skip), None, "skip"
        except Failed as failed:
            detail, value, status = str(failed), failed.value, "fail"
        except Exception as exc:  # the check reports every failure, then goes on
            detail, value, status = f"{type(exc).__name__}: {exc}", None, "fail"
            self.log(traceback.format_exc().rstrip())
        seconds = time.perf_counter() - start
        self.records.append({"step": name, "status": status, "detail": detail, "seconds": seconds})
        self.log(f"[check] {status.upper():<4} {name} ({seconds:.1f} s): {detail}")
        return value

    @property
    def failed(self) -> list:
        return [r["step"] for r in self.records if r["status"] == "fail"]


class Skip(Exception):
    """A step that does not apply on this machine (e.g. NCCL without a GPU)."""


class Failed(Exception):
    """A step that failed with a result worth keeping (e.g. the losses that did not fall)."""

    def __init__(self, message: str, value):
        super().__init__(message)
        self.value = value


# --------------------------------------------------------------------------- (a) environment

def versions() -> dict:
    import torch

    from .logger import package_versions

    out = {"python": platform.python_version(), **package_versions((
        "torch", "torchvision", "numpy", "numba", "ffcv", "ffcv-imagenet", "Pillow", "fastargs",
        "opencv-python", "opencv-python-headless"))}
    try:
        import cv2

        out["cv2"] = cv2.__version__
    except ImportError:  # the decoder step then fails, saying what to install
        out["cv2"] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    nccl = getattr(torch.cuda, "nccl", None)
    try:
        out["nccl"] = (".".join(map(str, nccl.version())) if nccl and torch.cuda.is_available()
                       else None)
    except (RuntimeError, AttributeError):
        out["nccl"] = None
    return out


def devices() -> dict:
    import psutil
    import torch

    from .distributed import cpu_cores, cpu_has_fast_bf16
    from .logger import cpu_model

    gpus = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"name": props.name, "memory_gib": props.total_memory / 2**30,
                     "capability": f"{props.major}.{props.minor}",
                     "bf16": torch.cuda.is_bf16_supported() if index == 0 else None})
    return {"cpu": cpu_model() or platform.processor(), "cpu_cores": cpu_cores(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": cpu_has_fast_bf16(),
            "ram_gib": psutil.virtual_memory().total / 2**30, "gpu_count": len(gpus), "gpus": gpus,
            "platform": platform.platform()}


def decoder_agreement() -> tuple:
    """One photo-like JPEG (with restart markers, as the writer stores them) decoded whole by
    ffcv's imdecode and by the crop-first decoder without levers, and one box of it decoded by
    the crop-first decoder with splice + region: the same bytes each time."""
    import cv2
    from ffcv.libffcv import imdecode

    from . import fastjpeg
    from .synthetic import photo_like

    image = photo_like(375, 500, np.random.default_rng(0))
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90,
                                            cv2.IMWRITE_JPEG_RST_INTERVAL, 2])
    if not ok:
        raise RuntimeError("OpenCV could not encode a test JPEG")
    h, w = image.shape[:2]
    theirs = np.empty((h, w, 3), np.uint8)
    if imdecode(data, theirs, h, w, h, w, 0, 0, 1, 1, False, False) != 0:
        raise RuntimeError("ffcv's imdecode failed on a baseline JPEG")
    ours = fastjpeg.decode_box_numpy(data.tobytes(), (0, 0, h, w), (h, w), flags=0)
    box = (97, 141, 200, 230)
    crop = fastjpeg.decode_box_numpy(data.tobytes(), box, (box[2], box[3]),
                                     flags=fastjpeg.SPLICE | fastjpeg.REGION)
    same_full = bool(np.array_equal(ours, theirs))
    same_crop = bool(np.array_equal(crop, theirs[97:297, 141:371]))
    if not (same_full and same_crop):
        raise AssertionError(f"decoders disagree: whole image equal={same_full}, splice+region "
                             f"crop equal={same_crop}")
    return (f"{w}x{h} JPEG: whole image and a {box[3]}x{box[2]} splice+region crop equal to "
            "ffcv's decode, byte for byte"), True


# --------------------------------------------------------------------------- (b) correctness

def precisions_for(device) -> tuple:
    import torch

    if device.type == "cuda":
        return ("fp16", "bf16", "fp32") if torch.cuda.is_bf16_supported() else ("fp16", "fp32")
    return ("fp32", "bf16")


def fixed_batches(val_beton, device, batch_size: int, count: int) -> list:
    """`count` batches of the val loader (centre crops: the same pixels every time, so a few
    steps over them must lower the loss), copied out of ffcv's reused buffers."""
    import torch

    from .data import create_val_loader

    loader = create_val_loader(val_beton, batch_size=batch_size, resolution_px=32, num_workers=1,
                               device=device, torch_threads=torch.get_num_threads())
    batches = []
    for images, labels in loader:
        batches.append((images.clone(), labels.clone()))
        if len(batches) == count:
            break
    return batches


def training_steps(device, precision: str, batches: list, steps: int) -> tuple:
    """`steps` optimizer steps of the engine's train_one_epoch on ResNet-18, cycling `batches`;
    returns (detail, {"ok", "first_loss", "last_loss", "losses"})."""
    import torch

    from .models import create_model
    from .optim import create_optimizer
    from .train import Trainer, train_one_epoch

    torch.manual_seed(0)
    model = create_model(CORRECTNESS_ARCH, num_classes=10).to(
        device, memory_format=torch.channels_last)
    optimizer = create_optimizer(model, name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-5)
    trainer = Trainer(model, optimizer, device, precision)
    losses = []
    for step in range(steps):
        out = train_one_epoch(trainer, [batches[step % len(batches)]], epoch=0, steps_per_epoch=1,
                              lr_fn=lambda e: 0.05)
        losses.append(out["train_loss"])
    # one pass over the batches at the start and at the end, so that batch differences cancel
    k = len(batches)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    ok = bool(np.isfinite(losses).all() and last < first)
    record = {"ok": ok, "first_loss": first, "last_loss": last, "losses": losses}
    if not ok:
        raise Failed(f"loss did not fall: first pass {first:.4f}, last pass {last:.4f}", record)
    return f"{steps} steps, loss {first:.3f} -> {last:.3f}", record


def checkpoint_roundtrip(device, workdir: Path) -> tuple:
    """A trained-for-one-step model and its optimizer saved with the engine's checkpoint code,
    loaded into a fresh model: every tensor equal."""
    import torch

    from . import checkpoint as ckpt_io
    from .models import create_model
    from .optim import create_optimizer

    torch.manual_seed(1)
    model = create_model(CORRECTNESS_ARCH, num_classes=10).to(device)
    optimizer = create_optimizer(model, name="sgd", lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 32, 32, device=device)).sum().backward()
    optimizer.step()
    path = workdir / f"checkpoint-{device.type}.pt"
    ckpt_io.save_checkpoint(path, {"model": ckpt_io.model_state(model),
                                   "optimizer": optimizer.state_dict(), "rng": ckpt_io.rng_state()})
    loaded = ckpt_io.load_checkpoint(path, map_location=device)
    fresh = create_model(CORRECTNESS_ARCH, num_classes=10).to(device)
    fresh.load_state_dict(loaded["model"])
    ckpt_io.set_rng_state(loaded["rng"])
    saved, back = model.state_dict(), fresh.state_dict()
    differing = [k for k in saved if not torch.equal(saved[k], back[k])]
    if differing:
        raise AssertionError(f"{len(differing)} tensors differ after reload, e.g. {differing[:3]}")
    return (f"{len(saved)} tensors identical after save and load "
            f"({path.stat().st_size:,} bytes)"), True


def nccl_ddp_step(workdir: Path) -> tuple:
    """A 1-process NCCL group: an all-reduce and one DDP training step on GPU 0."""
    import torch
    import torch.distributed as dist

    from .models import create_model
    from .optim import create_optimizer
    from .train import ddp_options

    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    if dist.is_initialized():
        raise Skip("a process group already exists in this process")
    device = torch.device("cuda", 0)
    store = workdir / "nccl_store"
    store.unlink(missing_ok=True)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        value = torch.ones(4, device=device)
        dist.all_reduce(value)
        model = create_model(CORRECTNESS_ARCH, num_classes=10).to(
            device, memory_format=torch.channels_last)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[0], **ddp_options(compile_model=False, accum_steps=1))
        optimizer = create_optimizer(model, name="sgd", lr=0.1, momentum=0.9)
        loss = ddp(torch.randn(8, 3, 32, 32, device=device)).float().logsumexp(1).mean()
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        if not bool(torch.isfinite(loss)) or value.sum().item() != 4:
            raise AssertionError("NCCL all-reduce or DDP step gave a wrong or non-finite value")
        return (f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}: all-reduce and a "
                "DDP step"), True
    finally:
        dist.destroy_process_group()


def correctness(steps: Steps, device_types: list, workdir: Path, n_steps: int) -> dict:
    """Step (b) for each device type; returns {device: {precision: record}} for check.json."""
    import torch

    from .demo import prepare_data

    betons = steps.run("correctness: write a small .beton", lambda: (
        "40 generated JPEGs at 32 px, 10 classes",
        prepare_data(workdir / "small", train_per_class=4, val_per_class=4, size_px=32, workers=1,
                     log=None)))
    results = {}
    for kind in device_types if betons else ():
        device = torch.device(kind, 0) if kind == "cuda" else torch.device("cpu")
        batches = steps.run(f"{kind}: batches from a generated .beton", lambda: (
            "4 val batches of 8 at 32 px", fixed_batches(betons["val"], device, 8, 4)))
        if batches is None:
            continue
        results[kind] = {}
        for precision in precisions_for(device):
            record = steps.run(f"{kind} {precision}: ResNet-18 training steps", training_steps,
                               device, precision, batches, n_steps)
            results[kind][precision] = record or {"ok": False}
        steps.run(f"{kind}: checkpoint save and reload", checkpoint_roundtrip, device, workdir)
    steps.run("cuda: 1-process NCCL group and a DDP step", nccl_ddp_step, workdir)
    return results


# --------------------------------------------------------------------------- (c) speed

def speed_beton(workdir: Path, count: int, workers: int) -> tuple:
    """A .beton of `count` photo-like JPEGs at max side 500, q90, as `bench` writes them."""
    from .bench import prepare_images, write_ours

    folder, beton = workdir / "speed_images", workdir / "speed.beton"
    images = prepare_images(folder, None, distinct=min(64, count), count=count)
    seconds = write_ours(folder, beton, workers)
    return (f"{images['count']} JPEGs ({images['distinct']} distinct) written in {seconds:.1f} s, "
            f"{beton.stat().st_size / 2**20:.0f} MiB"), beton


def loader_rates(beton: Path, res: int, batch: int, workers: int, seconds: float) -> tuple:
    """The training loader's img/s on the CPU with `workers` threads and with one."""
    from .bench import Pass, measure, ours_loader

    passes = [Pass("one", ours_loader(beton, res, batch, 1), "loader, 1 worker")]
    if workers > 1:
        passes.append(Pass("all", ours_loader(beton, res, batch, workers),
                           f"loader, {workers} workers"))
    rates = measure(passes, seconds, log=lambda *a: None)
    rates.setdefault("all", rates["one"])
    return (f"{res} px: {rates['all']:,.0f} img/s with {workers} workers, "
            f"{rates['one']:,.0f} with 1"), rates


def e2e_loader(beton: Path, res: int, batch: int, workers: int, device) -> tuple:
    """The engine's train loader on `device` with `workers` threads, one for every resolution (as
    progressive resizing uses it)."""
    import torch

    from . import data

    loader = data.create_train_loader(beton, batch_size=batch, resolution_px=res,
                                      num_workers=workers, device=device,
                                      torch_threads=torch.get_num_threads())
    return f"{len(loader)} batches of {batch} per pass, {workers} workers, on {device}", loader


def model_for(arch: str, device, mode: str):
    """A fresh channels-last `arch` on `device`, compiled as MODES says."""
    import torch

    from .models import create_model

    model = create_model(arch, num_classes=1000).to(device, memory_format=torch.channels_last)
    return model if mode == "eager" else torch.compile(model, **COMPILE_MODES[mode])


def training_speed(device, arch: str, res: int, batch: int, seconds: float, mode: str,
                   loader) -> tuple:
    """Model-only img/s, and end-to-end img/s when `loader` (a TrainLoader, set here to `res`) is
    given, feeding the same step with the same model (compiled once); the first steps' seconds
    (with torch.compile, mostly compilation)."""
    from .bench import training_rate

    timings = {}
    quiet = lambda *a: None  # noqa: E731
    model = model_for(arch, device, mode)
    rate = {"model": training_rate(arch, res, batch, seconds, log=quiet, device=device,
                                   timings=timings, model=model)}
    rate["first_steps_s"] = timings["first_steps_s"]
    if loader is not None:
        loader.set_resolution(res)
        rate["e2e"] = training_rate(arch, res, batch, seconds, batches=loader, log=quiet,
                                    device=device, model=model)
        rate["e2e_over_model"] = rate["e2e"] / rate["model"]
    text = f"model only {rate['model']:,.1f} img/s"
    if "e2e" in rate:
        text += (f", end to end {rate['e2e']:,.1f} img/s "
                 f"({rate['e2e_over_model']:.2f} of model only)")
    return f"{text}; first 2 steps {rate['first_steps_s']:.1f} s", rate


def precision_speed(device, arch: str, res: int, batch: int, seconds: float) -> tuple:
    """Model-only img/s in fp16 and bf16 on CUDA, the measurement behind training.precision=auto."""
    from .bench import training_rate
    from .train import resolve_precision

    if device.type != "cuda":
        raise Skip("fp16 against bf16 is measured on CUDA only")
    rates = {p: training_rate(arch, res, batch, seconds, log=lambda *a: None, device=device,
                              precision=p, model=model_for(arch, device, "eager"))
             for p in ("fp16", "bf16")}
    rates["auto"] = resolve_precision("auto", device)
    return (f"fp16 {rates['fp16']:,.0f}, bf16 {rates['bf16']:,.0f} img/s; "
            f"auto picks {rates['auto']}"), rates


def speed(steps: Steps, opts, workdir: Path) -> dict:
    """Step (c): rates per resolution and mode on the fastest device, plus the loader's rates."""
    import torch

    from .distributed import cpu_cores

    device = torch.device("cuda", 0) if opts.device_types[-1] == "cuda" else torch.device("cpu")
    cores = cpu_cores()
    out = {"device": str(device), "arch": opts.arch, "batch_size": opts.batch, "modes": opts.modes,
           "e2e_workers": opts.e2e_workers, "loader_workers": cores, "model": {}, "e2e": {},
           "first_steps_s": {}, "loader_img_s": {}, "loader_1core_img_s": {}}
    beton = steps.run("speed: write the loader's .beton", speed_beton, workdir, opts.images, cores)
    loader = None
    if beton is not None:
        res = opts.resolutions[0]
        rates = steps.run(f"speed: loader at {res} px", loader_rates, beton, res, opts.loader_batch,
                          cores, opts.seconds)
        if rates:
            out["loader_img_s"][res], out["loader_1core_img_s"][res] = rates["all"], rates["one"]
        loader = steps.run("speed: the end-to-end loader", e2e_loader, beton, res, opts.batch,
                           opts.e2e_workers, device)
    for res in opts.resolutions:
        for mode in opts.modes:
            rate = steps.run(f"speed: {opts.arch} {mode} at {res} px, batch {opts.batch}",
                             training_speed, device, opts.arch, res, opts.batch, opts.seconds,
                             mode, loader)
            for key in ("model", "e2e", "first_steps_s"):
                if rate and key in rate:
                    out[key].setdefault(res, {})[mode] = rate[key]
    out["precision_img_s"] = steps.run(f"speed: fp16 against bf16 at {opts.resolutions[0]} px",
                                       precision_speed, device, opts.arch, opts.resolutions[0],
                                       opts.batch, opts.seconds)
    return out


# --------------------------------------------------------------------------- (d) a preset, timed

def preset_config(preset) -> dict:
    """The preset's resolved config (the data paths it leaves to the command line stand in)."""
    from .config import load_config

    return load_config(["--config-file", str(preset), "--data.train_dataset=(check)",
                        "--data.val_dataset=(check)"])


def write_data(data_dir: Path, out: Path, max_resolution: int, workers: int) -> tuple:
    """DATA/train and DATA/val (ImageFolder) written as JPEG q90 .beton files, as the README writes
    Imagenette; reused when already there."""
    from .writer import write_dataset

    paths, counts = {}, {}
    for split in ("train", "val"):
        source, beton = data_dir / split, out / f"{split}.beton"
        if not source.is_dir():
            raise FileNotFoundError(f"check.data={data_dir}: no {split}/ folder "
                                    "(ImageFolder layout expected)")
        if not beton.exists():
            write_dataset(source, beton, split=split, max_resolution=max_resolution,
                          write_mode="jpg", jpeg_quality=90, num_workers=workers, progress=False)
        from .data import num_samples

        paths[split], counts[split] = beton, num_samples(beton)
    return (f"{counts['train']:,} train and {counts['val']:,} val images at max side "
            f"{max_resolution}"), paths


def preset_run(preset: Path, betons: dict, folder: Path, device) -> tuple:
    """The preset trained by `ffcv-imagenet train` in a child process (start-up counted as for
    any run); returns the run's epochs and summary from its log.jsonl."""
    import subprocess

    if (folder / "log.jsonl").exists():
        raise FileExistsError(f"{folder} already holds a run; choose another --check.out")
    command = [sys.executable, "-m", "ffcv_imagenet.train", "--config-file", str(preset),
               f"--data.train_dataset={betons['train']}", f"--data.val_dataset={betons['val']}",
               f"--logging.folder={folder}", f"--training.device={device.type}"]
    start = time.time()
    status = subprocess.run(command).returncode
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()] \
        if (folder / "log.jsonl").exists() else []
    epochs = [{k: r.get(k) for k in ("epoch", "resolution", "top_1", "train_loss", "elapsed_s",
                                     "train_images_per_s")}
              for r in records if r.get("type") == "epoch"]
    summary = next((r for r in records if r.get("type") == "summary"), None)
    result = {"command": command, "exit_status": status, "wall_s": time.time() - start,
              "folder": str(folder), "epochs": epochs, "summary": summary}
    if status != 0 or summary is None:
        raise Failed(f"ffcv-imagenet train exited with {status}", result)
    return (f"{Path(preset).name}: top-1 {summary['top_1']:.2%} after {len(epochs)} epochs, "
            f"{summary['elapsed_s'] / 60:.1f} min, start-up {summary['startup_s']:.1f} s"), result


# --------------------------------------------------------------------------- (e) plan

def nearest_rate(rates: dict, res: int) -> "float | None":
    """img/s at `res` from the rate measured at the nearest resolution, scaled by pixel count
    (a projection: cost per image taken as proportional to its pixels)."""
    if not rates:
        return None
    measured = min(rates, key=lambda r: abs(int(r) - res))
    return rates[measured] * (int(measured) / res) ** 2


def best_mode(by_res: dict) -> dict:
    """{res: the fastest mode's img/s}."""
    return {res: max(modes.values()) for res, modes in by_res.items() if modes}


def plan(preset: Path, speed_result: dict, train_beton: "Path | None") -> tuple:
    """Minutes per epoch and for the run on one device of this machine (a projection from the
    measured rates), which of loader and model limits each epoch, cores per GPU the loader needs,
    and whether the train file fits in RAM for data.in_memory=1."""
    import psutil

    from .schedules import resolution_from_config

    cfg = preset_config(preset)
    epochs = cfg["training"]["epochs"]
    model_rates = best_mode(speed_result.get("model", {}))
    per_core = speed_result.get("loader_1core_img_s", {})
    if not model_rates or not per_core:
        raise Skip("needs the speed step's model and loader rates")
    from .data import num_samples

    images = num_samples(train_beton) if train_beton else IMAGENET_TRAIN_IMAGES
    cores = speed_result["loader_workers"]
    rows, total_s = [], 0.0
    for epoch in range(epochs):
        res = resolution_from_config(epoch, cfg)
        model, core = nearest_rate(model_rates, res), nearest_rate(per_core, res)
        rate = min(model, core * cores)
        total_s += images / rate
        rows.append({"epoch": epoch, "resolution": res, "model_img_s": model,
                     "loader_img_s": core * cores,
                     "limit": "loader" if core * cores < model else "model",
                     "cores_per_gpu_needed": model / core, "epoch_min": images / rate / 60})
    size = train_beton.stat().st_size if train_beton else None
    ram = psutil.virtual_memory().total
    result = {"preset": str(preset), "epochs": epochs, "train_images": images,
              "images_from": str(train_beton) if train_beton else "ILSVRC2012 train (1,281,167)",
              "cpu_cores": cores, "per_epoch": rows, "total_min": total_s / 60,
              "train_file_bytes": size, "ram_bytes": ram,
              "fits_in_ram": None if size is None else size < 0.9 * ram, "projection": True}
    limits = sorted({r["limit"] for r in rows})
    return (f"projection: {total_s / 60:.1f} min of training for {epochs} epochs of "
            f"{images:,} images on one {speed_result['device']} ({'/'.join(limits)}-bound); "
            f"the loader needs up to {max(r['cores_per_gpu_needed'] for r in rows):.2g} cores "
            "per GPU"), result


# --------------------------------------------------------------------------- output

def _num(x, digits=0) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def machine_name(result: dict) -> str:
    devices = result.get("devices") or {}
    if devices.get("gpus"):
        return f"{len(devices['gpus'])} × {devices['gpus'][0]['name']}"
    return f"{devices.get('cpu_cores', '?')}-core CPU ({devices.get('cpu', '?')})"


def speed_rows(speed_result: dict) -> list:
    """One row per (resolution, mode): model only, end to end, ratio, first steps, loader."""
    rows = []
    for res, modes in speed_result.get("model", {}).items():
        for mode, model in modes.items():
            e2e = speed_result.get("e2e", {}).get(res, {}).get(mode)
            rows.append((int(res), mode, model, e2e, e2e / model if e2e else None,
                         speed_result.get("first_steps_s", {}).get(res, {}).get(mode),
                         speed_result.get("loader_img_s", {}).get(res),
                         speed_result.get("loader_1core_img_s", {}).get(res)))
    return rows


def build_table(result: dict) -> str:
    s = result.get("speed") or {}
    verdict = ("all steps passed" if not result["failed"]
               else "FAILED: " + ", ".join(result["failed"]))
    out = [f"ffcv-imagenet check, {result['date']}, {machine_name(result)}, torch "
           f"{(result.get('versions') or {}).get('torch')}, {verdict}",
           "", "| step | result | detail |", "|---|---|---|"]
    out += [f"| {r['step']} | {r['status']} | {r['detail']} |" for r in result["checks"]]
    if s:
        out += ["", f"| {s.get('arch')} @ px | mode | model only img/s | end to end img/s "
                f"({s.get('e2e_workers')} loader workers) | end to end / model | first 2 steps s "
                f"| loader img/s ({s.get('loader_workers')} workers) | loader img/s, 1 worker |",
                "|---|---|---|---|---|---|---|---|"]
        for res, mode, model, e2e, ratio, first, loader, one in speed_rows(s):
            out.append(f"| {res} | {mode} | {_num(model, 1)} | {_num(e2e, 1)} | {_num(ratio, 2)} | "
                       f"{_num(first, 1)} | {_num(loader)} | {_num(one)} |")
    p = result.get("plan")
    if p:
        out += ["", f"Projection (not a measurement) for {Path(p['preset']).name} on one "
                f"{s.get('device')}, {p['train_images']:,} images per epoch: {p['total_min']:.1f} "
                f"min of training; train file fits in RAM: {p['fits_in_ram']}", "",
                "| epoch | px | model img/s | loader img/s | limit | cores per GPU needed | min |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['epoch']} | {r['resolution']} | {_num(r['model_img_s'])} | "
                f"{_num(r['loader_img_s'])} | {r['limit']} | {r['cores_per_gpu_needed']:.1f} | "
                f"{r['epoch_min']:.2f} |" for r in p["per_epoch"]]
    return "\n".join(out)


def _rates(by_res: dict, digits=None) -> str:
    """'160: 7,815, 224: 4,612' (rates under 100 with one decimal), or a dash."""
    def fmt(v):
        return f"{v:.{digits}f}" if digits is not None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
    return ", ".join(f"{k}: {fmt(v)}" for k, v in by_res.items() if v) or "–"


def render_readme(folders: list, readme: Path) -> str:
    """The README's check section from every check.json under `folders`, one row per file."""
    from .report import update_readme

    files = sorted(f for folder in folders for f in Path(folder).rglob("check.json"))
    lines = ["| machine | date | torch | run | steps | model only img/s (px: best mode) | end to "
             "end / model only | loader img/s, all cores | file |",
             "|---|---|---|---|---|---|---|---|---|"]
    for path in files:
        r = json.loads(path.read_text())
        s = r.get("speed") or {}
        ratios = {res: max(modes.values(), default=None)
                  for res, modes in (r.get("e2e_over_model") or {}).items()}
        passed = sum(c["status"] == "pass" for c in r["checks"])
        lines.append(
            f"| {machine_name(r)} | {r['date'][:10]} | {(r.get('versions') or {}).get('torch')} | "
            f"{'quick' if r.get('quick') else 'full'} | {passed} passed, {len(r['failed'])} "
            f"failed | {_rates(best_mode(s.get('model', {})))} | {_rates(ratios, 2)} | "
            f"{_rates(s.get('loader_img_s') or {})} | `{path}` |")
    if not files:
        lines.append("| (no check.json committed yet) | | | | | | | | |")
    text = "\n".join(lines)
    update_readme(readme, SECTION, text)
    return text


# --------------------------------------------------------------------------- main

COMMAND = Command("check", "check", __doc__.split("\n\n")[0].split(": ", 1)[1], {
    "quick": Option(bool, False, "160 px only, eager only, short timings, small data (under 2 "
                    "minutes on a 2-core CPU)"),
    "out": Option(str, "check_out", "folder for check.json, check.md and the check.data run's logs",
                  path=True),
    "workdir": Option(str, "", "keep the generated images and .beton files here (default: a "
                      "temporary folder, removed at the end)", path=True),
    "device": Option(str, "auto", "auto: the CPU and, when visible, CUDA (speed on the fastest); "
                     "cpu or cuda: that one", choices=("auto", "cpu", "cuda")),
    "data": Option(str, "", "ImageFolder with train/ and val/ (e.g. Imagenette): write it and "
                   "train check.preset on it, timed", path=True),
    "preset": Option(str, "", "preset to time with check.data and to plan for this machine (e.g. "
                     "imagenette_configs/in128_rn50_5_epochs.yaml)", path=True),
    "train_beton": Option(str, "", "the preset's train .beton, for the plan's image count and RAM "
                          "check (default: the one written from check.data, else ILSVRC2012's "
                          "1,281,167 images without a RAM check)", path=True),
    "max_resolution": Option(int, 0, "longest side when writing check.data; 0 = the preset's "
                             "largest resolution", low=0),
    "arch": Option(str, "resnet50", "model for the speed step"),
    "res": Option(int, None, "speed resolutions (default 160,192,224; quick: 160)", low=8, many=True),
    "modes": Option(str, None, "eager and torch.compile modes timed (default eager,compile; quick: "
                    "eager)", choices=MODES, many=True),
    "batch": Option(int, None, "training batch (default 256 on CUDA, 16 on the CPU; quick on the "
                    "CPU: 8)", low=1),
    "seconds": Option(float, None, "timed seconds per rate (default 5; quick: 1)", low=0.0),
    "images": Option(int, None, "images in the speed .beton (default 10240 with CUDA, 1024 without; "
                     "quick: 192)", low=1),
    "render": Option(str, (), "only rebuild the README's check section from the check.json files "
                     "under these folders", path=True, many=True),
    "readme": Option(str, "README.md", "the Markdown file check.render writes into", path=True),
})


def parse_args(argv):
    """The check's settings: the command line, then the defaults that depend on check.quick and
    on the devices; ValueError (config.ConfigError) names a bad key or value."""
    return finish_args(COMMAND.parse(argv))


def finish_args(args):
    """Defaults that depend on check.quick and on the devices."""
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise ConfigError("check.device=cuda: torch sees no CUDA device")
    args.device_types = {"auto": ["cpu"] + (["cuda"] if cuda else []), "cpu": ["cpu"],
                         "cuda": ["cuda"]}[args.device]
    on_gpu = args.device_types[-1] == "cuda"
    quick = args.quick
    args.resolutions = list(args.res or ((160,) if quick else (160, 192, 224)))
    args.modes = list(args.modes or (("eager",) if quick else ("eager", "compile")))
    args.batch = args.batch or (256 if on_gpu else (8 if quick else 16))
    args.loader_batch = 64 if quick else 128
    args.seconds = args.seconds or (1.0 if quick else 5.0)
    args.images = args.images or (192 if quick else (10240 if on_gpu else 1024))
    args.correctness_steps = 12 if quick else 24
    args.e2e_workers = min(8, _cores())
    if args.data and not args.preset:
        raise ConfigError("check.data needs check.preset (the preset to train on it)")
    for key in ("data", "preset", "train_beton", "workdir"):
        setattr(args, key, Path(getattr(args, key)) if getattr(args, key) else None)
    for key in ("data", "preset", "train_beton"):
        if getattr(args, key) is not None and not getattr(args, key).exists():
            raise ConfigError(f"check.{key}={getattr(args, key)}: not found")
    return args


def _cores() -> int:
    from .distributed import cpu_cores

    return cpu_cores()


def run(args, log=print) -> dict:
    """Every step in order; the result as written to check.json."""
    import shutil
    import tempfile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ffcv_imagenet_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run_steps(args, out, workdir, log)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run_steps(args, out: Path, workdir: Path, log) -> dict:
    import torch

    steps = Steps(log)
    result = {"date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "command": "ffcv-imagenet check " + " ".join(args.argv), "quick": args.quick}
    result["versions"] = steps.run("environment: versions", lambda: (
        (v := versions()) and f"torch {v['torch']}, CUDA {v['cuda']}, ffcv {v['ffcv']}, "
        f"numpy {v['numpy']}, cv2 {v['cv2']}", v))
    result["devices"] = steps.run("environment: devices", lambda: (
        (d := devices()) and f"{d['cpu_cores']} CPU cores, {d['gpu_count']} GPU(s)"
        + "".join(f"; {g['name']} {g['memory_gib']:.0f} GiB" for g in d["gpus"]), d))
    steps.run("environment: ffcv and the crop-first decoder agree", decoder_agreement)
    result["steps"] = correctness(steps, args.device_types, workdir, args.correctness_steps)
    torch.set_num_threads(_cores())
    result["speed"] = speed(steps, args, workdir)
    betons = None
    if args.data is not None:
        preset = preset_config(args.preset)
        max_res = args.max_resolution or max(preset["resolution"]["max_res"],
                                             preset["validation"]["resolution"])
        betons = steps.run(f"preset: write {args.data}", write_data, args.data,
                           workdir / "preset_data", max_res, _cores())
        if betons:
            device = torch.device("cuda" if args.device_types[-1] == "cuda" else "cpu")
            result["preset_run"] = steps.run(f"preset: train {args.preset}", preset_run,
                                             args.preset, betons, out / "preset_run", device)
    if args.preset is not None:  # for the train file written from check.data, unless one is named
        train_beton = args.train_beton or (betons or {}).get("train")
        result["plan"] = steps.run(f"plan: {args.preset} on this machine", plan, args.preset,
                                   result["speed"], train_beton)
    summarise(result, steps)
    return result


def summarise(result: dict, steps: Steps) -> None:
    """The top-level figures (model_img_s, e2e_img_s, loader_img_s, e2e_over_model) and the
    step records, as check.json holds them."""
    s = result["speed"]
    result["model_img_s"], result["e2e_img_s"] = s["model"], s["e2e"]
    result["loader_img_s"] = s["loader_img_s"]
    result["e2e_over_model"] = {
        res: {mode: e2e / s["model"][res][mode] for mode, e2e in modes.items()
              if s["model"].get(res, {}).get(mode)} for res, modes in s["e2e"].items()}
    result["checks"], result["failed"] = steps.records, steps.failed


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = COMMAND.parse(argv)
        if not args.render:
            args = finish_args(args)
    except ValueError as e:
        return COMMAND.refuse(e)
    if args.render:
        print(render_readme(args.render, Path(args.readme)))
        print(f"\nwrote the {SECTION!r} section of {args.readme}")
        return 0
    args.argv = argv
    result = run(args)
    out = Path(args.out)
    (out / "check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = build_table(result)
    (out / "check.md").write_text(table + "\n")
    print("\n" + table + f"\n\nwrote {out / 'check.json'} and {out / 'check.md'}")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
