"""The training engine: `fit(cfg)` reads in setup order, distributed -> data -> model -> optimizer
-> resume -> loop -> save; `train_one_epoch` and `evaluate` do one pass each.

    ffcv-imagenet train --config-file rn50_configs/rn50_16_epochs.yaml --data.train_dataset=...
    torchrun --nproc_per_node=8 -m ffcv_imagenet.train --config-file ... (several processes)

Same result on 1 or 8 GPUs: a preset states `training.global_batch_size` (images per optimizer
step); with fewer processes the engine accumulates gradients over `accum_steps` micro-batches to
keep it. When the per-GPU batch no longer divides it, the global batch becomes the nearest
multiple and the peak lr follows it when `lr.lr_scaling=linear` (peak = lr.lr x global / 256).
What was decided is printed at start-up and logged (`start` line, params.json).

Exact resume (training.deterministic=1, CPU): every source of randomness of an epoch is a function
of (seed, epoch) -- the loader's order (ffcv seeds it with its epoch counter, which we set), the
crops and flips (a seeded decoder, see data.SeededRandomResizedCrop), mixup/jitter (a torch
Generator seeded per epoch) -- and the checkpoint after each epoch holds the model, optimizer and
scaler states. A run killed mid-epoch resumes from the last complete epoch and replays that epoch
exactly, ending with the same weights as an uninterrupted run. To spread a run over sessions of
bounded length (a batch job's time limit), `training.stop_after_s` ends a launch after the last
epoch expected to finish in time, checkpointed, so that nothing is replayed on resume.
"""

import contextlib
import gc
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record

from ffcv_imagenet import checkpoint as ckpt_io
from ffcv_imagenet import distributed
from ffcv_imagenet.config import load_config
from ffcv_imagenet.data import create_train_loader, create_val_loader, prepare_batch
from ffcv_imagenet.logger import RunLogger, SinkOptions, environment
from ffcv_imagenet.metadata import DataFileError, check_same_classes, read_metadata
from ffcv_imagenet.names import has_names, read_names
from ffcv_imagenet.predict import PREDICTIONS_FILE, Predictions, RealTop1, real_labels_for, write_predictions
from ffcv_imagenet.progress import progress as progress_bar
from ffcv_imagenet.schedules import lr_from_config, resolution_from_config, validation_passes

# Test hook: "EPOCH:STEP" makes rank 0 (or "EPOCH:STEP:RANK": that rank) SIGKILL itself after
# optimizer step STEP (1-based) of EPOCH (0-based), to test resume after a hard kill in the middle
# of an epoch, and that the other ranks then stop instead of hanging.
KILL_ENV = "FFCV_IMAGENET_TEST_KILL_AT"

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# the loop reads from the device once per this many optimizer steps (and at the end of the epoch):
# a run whose loss is not finite at every step of such a window, on every process, stops there
NONFINITE_WINDOW = 20
# the loop's sums on the device, read to the host once per window and at the end of the epoch:
# [0:4] the epoch's loss x images of the finite micro-batches, their images, all images, non-finite
# micro-batches (summed over processes at the end); WINDOW: the current window's non-finite
# micro-batches, then per step of the window its loss x images, then its images (summed, read and
# zeroed at the end of each window: the per-step loss reaches the logger on that same read);
# FIRST_BAD: this process's first step with a non-finite loss (not summed), 0 = none
WINDOW = slice(4, 5 + 2 * NONFINITE_WINDOW)
FIRST_BAD = WINDOW.stop


class Terminated(BaseException):
    """SIGTERM (a batch system's time limit, `kill`, torchrun's agent ending its workers)."""


def raise_terminated(signum, frame):
    raise Terminated()


class NonFiniteLoss(RuntimeError):
    """The loss stayed NaN or infinite (or the weights became so): the run cannot go on."""

    def __init__(self, message: str, *, epoch: int, step: int, lr: float):
        super().__init__(message)
        self.epoch, self.step, self.lr = epoch, step, lr


# --------------------------------------------------------------------------- small decisions

def launch_time() -> float:
    """When this job was launched: the torchrun agent's start under torchrun, else ours."""
    import psutil

    process = psutil.Process()
    if "TORCHELASTIC_RUN_ID" in os.environ and process.parent() is not None:
        return process.parent().create_time()
    return process.create_time()


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """Tensor cores that run bf16 at the fp16 rate: compute capability 8.0 (Ampere) and later."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: on CUDA bf16 where the GPU runs it natively (Ampere and later: the same tensor-core
    rate as fp16, no GradScaler, no skipped steps, no loss-scale state to resume), else fp16 +
    GradScaler; on the CPU bf16 where it runs natively, else fp32. `ffcv-imagenet check` measures
    fp16 against bf16 on the GPU it runs on, so that this choice can be checked per machine."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_fast_bf16(device) else "fp16"
        return "bf16" if distributed.cpu_has_fast_bf16() else "fp32"
    if device.type == "cpu" and precision == "fp16":
        print("warning: fp16 autocast on CPU was 20-60x slower than bf16 (on an AVX-512 CPU); "
              "use --training.precision=auto", file=sys.stderr)
    elif device.type == "cpu" and precision == "bf16" and not distributed.cpu_has_fast_bf16():
        print("warning: this CPU has no native bf16 (no AVX-512), so bf16 autocast runs 13-15x "
              "slower than fp32; use --training.precision=auto (fp32 here)", file=sys.stderr)
    return precision


def expected_epoch_s(*, last_train_s: float, last_res: int, next_res: int, val_passes: int,
                     last_val_s: "float | None", train_images: int, val_images: int, val_res: int) -> float:
    """Seconds the next epoch should take: the last epoch's training time scaled by the next
    resolution's pixel count, plus `val_passes` validation passes (0 when it does not validate; 2 for
    the last epoch of a run with an EMA, which scores the average and the raw weights), each as long
    as the last pass of this launch, or before any, a forward pass over the val images at a third of
    a training step's cost per pixel (forward is about a third of forward + backward)."""
    seconds = last_train_s * (next_res / last_res) ** 2
    if val_passes:
        if last_val_s is None:
            last_val_s = last_train_s / 3 * (val_images / train_images) * (val_res / last_res) ** 2
        seconds += val_passes * last_val_s
    return seconds


# settings a resumed launch may change without changing the run: where things are and how this
# machine runs them, not what is trained
RESUME_MAY_CHANGE = ("data.train_dataset", "data.val_dataset", "data.num_workers", "data.in_memory",
                     "training.resume", "training.stop_after_s", "training.cpu_threads",
                     "training.device", "logging.folder", "logging.progress", "logging.tensorboard",
                     "logging.csv", "logging.step_every", "validation.real_labels")


def resume_changes(saved: dict, current: dict, *, saved_precision: "str | None" = None,
                   precision: "str | None" = None) -> list:
    """'section.key: old -> new' for each setting of `current` that differs from the checkpoint's
    config `saved`, apart from RESUME_MAY_CHANGE; and the precision the run trained in so far
    against this launch's, which training.precision=auto picks per machine (bf16 on a CPU with
    AVX-512, fp32 on one without), so that it can change with the same settings."""
    changes = []
    if saved_precision and precision and saved_precision != precision:
        changes.append(f"precision: {saved_precision} -> {precision} (training.precision="
                       f"{current.get('training', {}).get('precision')!r} on this machine)")
    for section, values in current.items():
        if section == "meta" or not isinstance(values, dict):
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            old = saved.get(section, {}).get(key, value)
            if name not in RESUME_MAY_CHANGE and old != value:
                changes.append(f"{name}: {old!r} -> {value!r}")
    return changes


def plan_batch(*, batch_size_per_gpu: int, world_size: int, global_batch_size: int,
               base_lr: float, lr_scaling: str) -> dict:
    """Global batch, accumulation steps and peak lr for this many processes.

    `global_batch_size` is what the preset states (0: batch_size x world_size). When the micro-
    batches of all processes divide it, gradients are accumulated to keep it exactly; otherwise
    the global batch becomes the nearest multiple of them.
    """
    per_micro_step = batch_size_per_gpu * world_size
    requested = global_batch_size or per_micro_step
    accum_steps = max(1, round(requested / per_micro_step))
    effective = per_micro_step * accum_steps
    peak_lr = base_lr * effective / 256 if lr_scaling == "linear" else base_lr
    lines = [f"global batch {effective} = {batch_size_per_gpu} per process x {world_size} "
             f"process(es) x {accum_steps} accumulation step(s)"]
    if effective != requested:
        if lr_scaling == "linear":
            lines.append(f"  the preset asks for {requested}, which {per_micro_step} does not divide; "
                         f"lr scaled linearly with the global batch")
        else:
            lines.append(f"  WARNING: the preset asks for {requested}, which {per_micro_step} does not "
                         "divide; lr NOT rescaled (lr.lr_scaling=none): set lr.lr for this batch")
    if lr_scaling == "linear":
        lines.append(f"peak lr {peak_lr:.6g} = {base_lr:g} x {effective}/256 (lr.lr_scaling=linear)")
    else:
        lines.append(f"peak lr {peak_lr:.6g} = lr.lr (lr.lr_scaling=none)")
    return {"global_batch_size": effective, "requested_global_batch_size": requested,
            "accum_steps": accum_steps, "peak_lr": peak_lr, "message": "\n".join(lines)}


def configure_determinism(deterministic: bool, device: torch.device = torch.device("cpu")) -> None:
    """training.deterministic=1: deterministic kernels, no cuDNN autotuning. On CUDA some backward
    kernels a ResNet needs have no deterministic version (AdaptiveAvgPool2d's raises under
    `use_deterministic_algorithms(True)`), so there torch only warns for them: the run goes on, and
    the warning says it is not bitwise reproducible. Exact resume is proven on the CPU."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if device.type == "cuda":
            print("warning: training.deterministic=1 on CUDA: kernels without a deterministic "
                  "version (e.g. AdaptiveAvgPool2d backward) only warn, so the run is not bitwise "
                  "reproducible", file=sys.stderr, flush=True)
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def ddp_options(*, compile_model: bool, accum_steps: int) -> dict:
    """DDP's options: gradients are views into the all-reduce buckets (no copy, less memory);
    `static_graph` (DDP reuses the first step's bucket order and hook plan) only when neither
    torch.compile (which traces its own graph) nor accumulation is used: DDP with static_graph
    under no_sync() crashes or stops all-reducing gradients in torch releases of 2025-26
    (pytorch/pytorch#187732, huggingface/accelerate#3679)."""
    return {"gradient_as_bucket_view": True, "static_graph": not compile_model and accum_steps == 1}


def seed_epoch(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """Seed the global RNGs from (seed, epoch); return this rank's generator for augmentation."""
    epoch_seed = (seed * 1_000_003 + epoch) % 2**31
    random.seed(epoch_seed)
    np.random.seed(epoch_seed)
    torch.manual_seed(epoch_seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(epoch_seed * 1009 + rank)
    return generator


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


# --------------------------------------------------------------------------- one pass each

@dataclass(frozen=True)
class LossOptions:
    """What the training loss is made of: cross-entropy with label smoothing, mixup's soft
    targets (`mixup_alpha` > 0, over `num_classes`), and distillation from `teacher`."""
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    num_classes: "int | None" = None
    teacher: "torch.nn.Module | None" = None
    distill_temperature: float = 4.0
    distill_weight: float = 0.5


@dataclass
class Trainer:
    """What an optimizer step needs, fixed for a run: the model (DDP- and compile-wrapped as it
    will be called), its optimizer, the GradScaler (default: enabled for fp16 only), an optional
    weight average updated after each step, and the loss and batch augmentations."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    accum_steps: int = 1
    scaler: "torch.amp.GradScaler | None" = None
    ema: object = None
    loss: LossOptions = field(default_factory=LossOptions)
    color_jitter: float = 0.0
    pca_lighting: float = 0.0

    def __post_init__(self):
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


@dataclass
class EpochHooks:
    """Optional callbacks of a training pass: a progress bar, `on_first_batch()` when the first
    batch arrives, `on_step(n)` after optimizer step n (1-based), `on_losses(points)` with
    [(step n, its loss over every process, its lr)] for the steps of each window of
    NONFINITE_WINDOW steps, when the loop reads it from the device (and at the end of the epoch)."""
    progress: bool = False
    on_first_batch: object = None
    on_step: object = None
    on_losses: object = None


def compute_loss(model, images, labels, options: LossOptions, generator=None):
    """Forward pass and loss: plain CE, mixup (soft targets) and/or distillation."""
    from ffcv_imagenet import losses

    targets = labels
    if options.mixup_alpha > 0:
        images, targets = losses.mixup(images, labels, alpha=options.mixup_alpha,
                                       num_classes=options.num_classes, generator=generator)
    logits = model(images)
    if options.teacher is not None:
        with torch.no_grad():
            teacher_logits = options.teacher(images)
        return losses.distillation_loss(logits, teacher_logits, targets,
                                        temperature=options.distill_temperature,
                                        weight=options.distill_weight,
                                        label_smoothing=options.label_smoothing)
    return losses.cross_entropy(logits, targets, label_smoothing=options.label_smoothing)


def train_one_epoch(trainer: Trainer, batches, *, epoch: int, steps_per_epoch: int, lr_fn,
                    generator=None, hooks: EpochHooks = EpochHooks()) -> dict:
    """One epoch of `steps_per_epoch` optimizer steps of `trainer.accum_steps` micro-batches each.

    `batches` yields (uint8 NCHW images, int labels) on the device; `lr_fn(epoch_float)` gives the
    lr of each step. Returns the epoch's mean train loss and image count over all processes."""
    t = trainer
    t.model.train()
    dtype = DTYPES[t.precision]
    sums = torch.zeros(FIRST_BAD + 1, dtype=torch.float64, device=t.device)  # see WINDOW
    lr, lrs = None, []
    bar = progress_bar(steps_per_epoch, f"epoch {epoch}", unit="step", enabled=hooks.progress)
    t.optimizer.zero_grad(set_to_none=True)
    for micro, (images, labels) in enumerate(batches):
        if micro >= steps_per_epoch * t.accum_steps:
            break  # micro-batches that do not fill an optimizer step are skipped, on every rank
        if micro == 0 and hooks.on_first_batch is not None:
            hooks.on_first_batch()
        step, k = divmod(micro, t.accum_steps)
        if k == 0:
            lr = lr_fn(epoch + step / steps_per_epoch)
            lrs.append(lr)
            for group in t.optimizer.param_groups:
                group["lr"] = lr
        x = prepare_batch(images, dtype=dtype, color_jitter=t.color_jitter,
                          pca_lighting=t.pca_lighting, generator=generator)
        y = labels.to(torch.long, copy=True)  # a copy: ffcv reuses its buffers
        last_micro = k == t.accum_steps - 1
        # DDP all-reduces gradients only on the micro-batch that completes the step.
        no_sync = not last_micro and hasattr(t.model, "no_sync")
        with t.model.no_sync() if no_sync else contextlib.nullcontext():
            with autocast_context(t.device, t.precision):
                loss = compute_loss(t.model, x, y, t.loss, generator)
            t.scaler.scale(loss / t.accum_steps).backward()
        _count_loss(sums, loss.detach(), len(y), step + 1)
        if last_micro:
            _optimizer_step(t)
            bar.update(1)
            if hooks.progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
            if hooks.on_step is not None:
                hooks.on_step(step + 1)
            if (step + 1) % NONFINITE_WINDOW == 0:
                _check_window(sums, t.accum_steps, lrs, epoch=epoch, on_losses=hooks.on_losses)
    bar.close()
    return _epoch_stats(sums, lrs, hooks.on_losses)


def _count_loss(sums: torch.Tensor, loss: torch.Tensor, batch: int, step: int) -> None:
    """Add one micro-batch of optimizer step `step` (1-based) to the epoch's device-side sums (no
    host read)."""
    bad = (~torch.isfinite(loss)).double()
    sums[:5] += torch.stack([torch.where(bad > 0, 0.0, loss.double() * batch), (1 - bad) * batch,
                             torch.ones_like(bad) * batch, bad, bad])
    # the step's loss x images and images, at its place in the window's two rows: a strided view,
    # so that no index tensor is built on the host (a blocking copy on a GPU)
    at = WINDOW.start + 1 + (step - 1) % NONFINITE_WINDOW
    sums[at:FIRST_BAD:NONFINITE_WINDOW] += torch.stack([loss.double() * batch, torch.ones_like(bad) * batch])
    sums[FIRST_BAD] = torch.where((sums[FIRST_BAD] == 0) & (bad > 0), float(step), sums[FIRST_BAD])


def _step_points(window: list, lrs: list, steps: int) -> list:
    """[(step, loss, lr)] of the window's first `steps` steps from the window's values as read
    (see WINDOW); `lrs` holds the lr of every step of the epoch so far, the window's last."""
    losses, images = window[1:1 + NONFINITE_WINDOW], window[1 + NONFINITE_WINDOW:]
    first = len(lrs) - (len(lrs) - 1) % NONFINITE_WINDOW  # 1-based: the window's first step
    return [(first + i, losses[i] / images[i] if images[i] else float("nan"), lrs[first + i - 1])
            for i in range(steps)]


def _check_window(sums: torch.Tensor, accum_steps: int, lrs: list, *, epoch: int, on_losses) -> None:
    """At the end of a window: its per-step losses to `on_losses`; and when every micro-batch of
    its NONFINITE_WINDOW steps was non-finite on every process, stop (one host read per window;
    every process takes the same decision from the same sum)."""
    window = distributed.all_reduce_sum(sums[WINDOW])  # in place, on the device
    values = window.tolist()
    window.zero_()
    if on_losses is not None:
        on_losses(_step_points(values, lrs, NONFINITE_WINDOW))
    step, lr = len(lrs), lrs[-1]
    if values[0] >= NONFINITE_WINDOW * accum_steps * distributed.world_size():
        raise NonFiniteLoss(
            f"the loss was NaN or infinite at every one of the last {NONFINITE_WINDOW} steps on "
            f"every process (epoch {epoch}, steps {step - NONFINITE_WINDOW + 1}-{step}, lr {lr:.4g})",
            epoch=epoch, step=step, lr=lr)


def _epoch_stats(sums: torch.Tensor, lrs: list, on_losses) -> dict:
    """The epoch's one host read at its end: the sums over processes (on the device), and the
    per-step losses of a window the epoch ended inside. Returns train_one_epoch's result."""
    distributed.all_reduce_sum(sums[:FIRST_BAD])
    values = sums.tolist()
    loss_sum, finite_images, images, nonfinite = values[:4]
    first_bad = values[FIRST_BAD]
    if on_losses is not None and len(lrs) % NONFINITE_WINDOW:
        on_losses(_step_points(values[WINDOW], lrs, len(lrs) % NONFINITE_WINDOW))
    return {"train_loss": loss_sum / finite_images if finite_images else float("nan"),
            "images": int(images), "lr": lrs[-1] if lrs else None, "nonfinite_batches": int(nonfinite),
            "first_nonfinite": (int(first_bad), lrs[int(first_bad) - 1]) if first_bad else None}


def _optimizer_step(t: Trainer) -> None:
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    if t.ema is not None:
        t.ema.update()


@torch.no_grad()
def evaluate(model, batches, *, device, precision: str, lr_tta: bool = True, progress=False,
             scorers=()) -> dict:
    """Top-1, top-5, mean loss and count over every val image of every process, and the fields of
    each of `scorers` (predict.py: they see every batch's logits, labels and top-5 classes)."""
    model.eval()
    dtype = DTYPES[precision]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    count = 0  # on the host: a device tensor made from it per batch would be a blocking copy
    bar = progress_bar(len(batches) if hasattr(batches, "__len__") else None, "val", unit="batch",
                       enabled=progress)
    for images, labels in batches:
        bar.update(1)
        x = prepare_batch(images, dtype=dtype)
        y = labels.to(torch.long, copy=True)
        count += len(y)
        with autocast_context(device, precision):
            logits = model(x).float()
            if lr_tta:  # average with the mirrored image
                logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        for scorer in scorers:
            scorer.update(logits, y, top5)
        sums[:3] += torch.stack([
            F.cross_entropy(logits, y, reduction="sum").double(),
            (top5[:, 0] == y).sum().double(),
            (top5 == y[:, None]).any(dim=1).sum().double(),
        ])
    bar.close()
    sums[3] = count
    distributed.all_reduce_sum(sums)
    count = max(1.0, sums[3].item())
    extra = {k: v for scorer in scorers for k, v in scorer.result().items()}
    return {"top_1": sums[1].item() / count, "top_5": sums[2].item() / count,
            "val_loss": sums[0].item() / count, "val_count": int(sums[3].item()), **extra}


# --------------------------------------------------------------------------- the run, in stages

def _step_hook(epoch: int, on_start, compiled: bool):
    """What runs after each optimizer step: with torch.compile, `on_start` (idempotent) after the
    first one, so that compilation, which happens in the first step, counts as start-up and not
    as training time; and the test hook's kill."""
    kill = _kill_hook(epoch)

    def hook(step):
        if compiled:
            on_start()
        if kill is not None:
            kill(step)
    return hook


def _kill_hook(epoch: int):
    """The test hook's callback for this epoch, or None."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    kill_epoch, kill_step, kill_rank = ([int(v) for v in spec.split(":")] + [0])[:3]
    if kill_epoch != epoch or int(os.environ.get("RANK", 0)) != kill_rank:
        return None

    def hook(step):
        if step >= kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


@dataclass
class Run:
    """What every stage reads: the config, this process's place in the job, what was decided from
    them at start-up (precision, global batch and peak lr) and the run's logger."""
    cfg: dict
    dist: distributed.DistInfo
    precision: str
    plan: dict
    logger: RunLogger
    torch_threads: int
    launched_at: float

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def folder(self) -> str:
        return self.cfg["logging"]["folder"]

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.folder, "checkpoint.pt")

    @property
    def show_progress(self) -> bool:
        return self.cfg["logging"]["progress"] and self.dist.is_main

    def say(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.dist.is_main:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        """Print to stderr on rank 0 only."""
        if self.dist.is_main:
            print(message, file=sys.stderr, flush=True)


@dataclass
class Data:
    train_loader: object
    val_loader: object
    wnids: list
    num_workers: int
    steps_per_epoch: int
    real: "torch.Tensor | None" = None  # ReaL labels of this process's val images (real_rows)


@dataclass
class Progress:
    """Where the run stands after its last complete epoch: saved in every checkpoint (as top-level
    keys) and restored on resume. `startup_s` is the first launch's."""
    epoch: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    train_s: float = 0.0
    total_images: int = 0
    startup_s: "float | None" = None


def loader_workers(data_cfg: dict, dist_info: distributed.DistInfo) -> int:
    """data.num_workers, or (0) this node's cores shared among its processes."""
    return data_cfg["num_workers"] or max(1, distributed.cpu_cores() // dist_info.local_world_size)


def setup_run(cfg: dict, dist_info: distributed.DistInfo, launched_at: float) -> Run:
    """Stage 1, after the process group: precision, determinism, global batch, the run folder."""
    train_cfg, lr_cfg = cfg["training"], cfg["lr"]
    torch_threads = torch.get_num_threads()
    precision = resolve_precision(train_cfg["precision"], dist_info.device)
    configure_determinism(train_cfg["deterministic"], dist_info.device)
    plan = plan_batch(batch_size_per_gpu=train_cfg["batch_size"], world_size=dist_info.world_size,
                      global_batch_size=train_cfg["global_batch_size"], base_lr=lr_cfg["lr"],
                      lr_scaling=lr_cfg["lr_scaling"])
    folder = cfg["logging"]["folder"]
    logger = RunLogger(folder, enabled=dist_info.is_main, options=SinkOptions.from_config(cfg["logging"]))
    refusal = None
    try:  # rank 0 locks the folder; every rank learns the outcome (none waits for one that left)
        logger.lock()
        if train_cfg["resume"] is False and os.path.exists(os.path.join(folder, "log.jsonl")):
            raise FileExistsError(f"{folder} already holds a run (log.jsonl) and training.resume=0; "
                                  "continue it with --training.resume=auto (or 1), or choose another "
                                  "--logging.folder")
    except FileExistsError as e:
        refusal = str(e)
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        logger.unlock()
        raise FileExistsError(refusal)
    run = Run(cfg, dist_info, precision, plan, logger, torch_threads, launched_at)
    run.say(plan["message"])
    return run


def setup_data(run: Run) -> Data:
    """Stage 2: the class list both files share, the train and val loaders of this rank."""
    cfg = run.cfg
    data_cfg, train_cfg, aug_cfg, val_cfg = cfg["data"], cfg["training"], cfg["augment"], cfg["validation"]
    for key in ("train_dataset", "val_dataset"):
        if not os.path.isfile(data_cfg[key]):
            raise DataFileError(f"data.{key}={data_cfg[key]}: no such file")
    if os.path.realpath(data_cfg["train_dataset"]) == os.path.realpath(data_cfg["val_dataset"]):
        run.warn(f"warning: data.train_dataset and data.val_dataset are the same file "
                 f"({data_cfg['val_dataset']}): validation scores images the model trains on")
    wnids = check_same_classes(data_cfg["train_dataset"], data_cfg["val_dataset"])
    num_workers = loader_workers(data_cfg, run.dist)
    loader_args = dict(num_workers=num_workers, device=run.device, rank=run.dist.rank,
                       world_size=run.dist.world_size, in_memory=data_cfg["in_memory"],
                       torch_threads=run.torch_threads)
    train_loader = create_train_loader(
        data_cfg["train_dataset"], batch_size=train_cfg["batch_size"],
        resolution_px=cfg["resolution"]["min_res"], order=data_cfg["order"], seed=train_cfg["seed"],
        scale=(aug_cfg["scale_min"], aug_cfg["scale_max"]),
        ratio=(aug_cfg["ratio_min"], aug_cfg["ratio_max"]),
        deterministic=train_cfg["deterministic"], decoder=data_cfg["decoder"], **loader_args)
    val_loader = create_val_loader(data_cfg["val_dataset"], batch_size=val_cfg["batch_size"],
                                   resolution_px=val_cfg["resolution"],
                                   crop_ratio=val_cfg["crop_ratio"], **loader_args)
    steps_per_epoch = len(train_loader) // run.plan["accum_steps"]
    if steps_per_epoch == 0:
        raise ValueError(
            f"{data_cfg['train_dataset']}: {len(train_loader)} batches per process per epoch is fewer "
            f"than the {run.plan['accum_steps']} micro-batches of one optimizer step (global batch "
            f"{run.plan['global_batch_size']}); lower training.global_batch_size or use more data")
    real = real_rows(val_cfg["real_labels"], data_cfg["val_dataset"], wnids, val_loader)
    return Data(train_loader, val_loader, wnids, num_workers, steps_per_epoch, real)


def real_rows(real_path: str, val_path: str, wnids: list, val_loader) -> "torch.Tensor | None":
    """validation.real_labels for the val images this process reads, in its loader's order (None
    when off); refused before training starts when the files do not fit together."""
    real = real_labels_for(real_path, val_path, wnids)
    return None if real is None else real[torch.from_numpy(np.asarray(val_loader.indices))]


def real_scorers(real: "torch.Tensor | None", device) -> list:
    return [] if real is None else [RealTop1(real, device)]


def build_model(*, arch, num_classes, model_cfg, use_blurpool, channels_last, device):
    from ffcv_imagenet.models import architecture_options, create_model

    model = create_model(arch, num_classes=num_classes, zero_init_residual=model_cfg["zero_init_residual"],
                         xavier_init=model_cfg["xavier_init"], **architecture_options(model_cfg, use_blurpool))
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def setup_model(run: Run, num_classes: int) -> torch.nn.Module:
    """Stage 3: the model as training calls it (SyncBN, DDP, torch.compile as configured);
    `checkpoint.unwrap` gives the module inside."""
    train_cfg = run.cfg["training"]
    torch.manual_seed(train_cfg["seed"])
    model = build_model(arch=run.cfg["model"]["arch"], num_classes=num_classes,
                        model_cfg=run.cfg["model"], use_blurpool=train_cfg["use_blurpool"],
                        channels_last=train_cfg["channels_last"], device=run.device)
    if run.dist.is_distributed:
        if train_cfg["sync_bn"]:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            **ddp_options(compile_model=train_cfg["compile"], accum_steps=run.plan["accum_steps"]))
    return torch.compile(model) if train_cfg["compile"] else model


def setup_trainer(run: Run, model: torch.nn.Module, num_classes: int) -> Trainer:
    """Stage 4: optimizer, GradScaler, weight average, the loss (with its teacher) and the batch
    augmentations, around the model of stage 3."""
    from ffcv_imagenet.optim import WeightEMA, create_optimizer

    train_cfg, aug_cfg = run.cfg["training"], run.cfg["augment"]
    raw_model = ckpt_io.unwrap(model)
    optimizer = create_optimizer(raw_model, name=train_cfg["optimizer"], lr=run.plan["peak_lr"],
                                 momentum=train_cfg["momentum"], nesterov=train_cfg["nesterov"],
                                 weight_decay=train_cfg["weight_decay"],
                                 betas=(train_cfg["adam_beta1"], train_cfg["adam_beta2"]),
                                 eps=train_cfg["adam_eps"] or None,
                                 lookahead_steps=train_cfg["lookahead_steps"],
                                 lookahead_alpha=train_cfg["lookahead_alpha"])
    ema = WeightEMA(raw_model, train_cfg["ema_decay"]) if train_cfg["ema_decay"] > 0 else None
    loss = LossOptions(label_smoothing=train_cfg["label_smoothing"],
                       mixup_alpha=train_cfg["mixup_alpha"], num_classes=num_classes,
                       teacher=setup_teacher(run, num_classes),
                       distill_temperature=train_cfg["distill_temperature"],
                       distill_weight=train_cfg["distill_weight"])
    return Trainer(model, optimizer, run.device, run.precision, accum_steps=run.plan["accum_steps"],
                   ema=ema, loss=loss, color_jitter=aug_cfg["color_jitter"],
                   pca_lighting=aug_cfg["pca_lighting"])


def setup_teacher(run: Run, num_classes: int):
    """The distillation teacher (training.distill_arch), or None."""
    train_cfg = run.cfg["training"]
    if not train_cfg["distill_arch"]:
        return None
    from ffcv_imagenet.losses import create_teacher

    teacher = create_teacher(train_cfg["distill_arch"], train_cfg["distill_checkpoint"],
                             num_classes, run.device)
    return teacher.to(memory_format=torch.channels_last) if train_cfg["channels_last"] else teacher


def resume(run: Run, trainer: Trainer) -> tuple:
    """Stage 5 (training.resume=1 or auto): the checkpoint's weights, optimizer, scaler, weight
    average and RNG states, and where the run stood (from the previous checkpoint when the last
    cannot be read); from scratch when the folder holds none. `auto` goes on only with the same
    run. Returns (Progress, the epoch resumed after or None); the logger opens at that point."""
    progress, resumed_from = Progress(), None
    mode = run.cfg["training"]["resume"]
    if mode is False:
        return progress, resumed_from
    checkpoint, path = ckpt_io.load_latest(run.checkpoint_path, warn=run.warn)
    changes = changed_settings(run, checkpoint)
    if mode == "auto" and changes:
        raise FileExistsError(
            f"{run.folder} holds another run (settings differ: {'; '.join(changes)}); "
            "training.resume=auto goes on only with the same run: continue that one with these "
            "settings with --training.resume=1, or choose another --logging.folder")
    if checkpoint is not None:
        restore(trainer, checkpoint, path, run.cfg["model"]["arch"])
        progress = Progress(**{f.name: checkpoint[f.name] for f in fields(Progress)})
        resumed_from = progress.epoch
        run.say(f"resuming {path} after epoch {progress.epoch} (step {progress.step})")
        if changes:  # resume=1: goes on with them
            run.warn(f"warning: resuming {path} with settings that differ from the run's so far "
                     f"(the rest of the run uses the new ones): {'; '.join(changes)}")
    else:
        run.say(f"no checkpoint in {run.folder}; starting from scratch")
    return progress, resumed_from


def restore(trainer: Trainer, checkpoint: dict, path: str, arch: str) -> None:
    """Load the checkpoint's states into the trainer; CheckpointError naming `path` when they do
    not fit this model and optimizer."""
    try:
        ckpt_io.unwrap(trainer.model).load_state_dict(checkpoint["model"])
        trainer.optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ckpt_io.CheckpointError(
            f"{path} does not fit this model (model.arch={arch}; the checkpoint's: "
            f"{checkpoint.get('arch')}) or optimizer: {str(e).splitlines()[0]}") from None
    if checkpoint.get("scaler"):
        trainer.scaler.load_state_dict(checkpoint["scaler"])
    if trainer.ema is not None:
        if checkpoint.get("ema") is None:
            raise ckpt_io.CheckpointError(f"{path} holds no weight average: the run was started "
                                          "without training.ema_decay; resume it without")
        trainer.ema.load_state_dict(checkpoint["ema"])
    ckpt_io.set_rng_state(checkpoint["rng"])


def changed_settings(run: Run, checkpoint: "dict | None") -> list:
    """resume_changes between this launch and the run in the folder: its settings from the
    checkpoint, else (killed before its first one) from params.json; [] when it holds neither."""
    if checkpoint is not None:
        saved = checkpoint.get("config") or {}
        derived = checkpoint.get("derived") or {}
    else:
        params = os.path.join(run.folder, "params.json")
        if not os.path.exists(params):
            return []
        with open(params) as f:
            saved = json.load(f)
        derived = saved.get("derived") or {}
    return resume_changes(saved, run.cfg, precision=run.precision,
                          saved_precision=derived.get("precision"))


def derived_params(run: Run, data: Data) -> dict:
    """What the engine decided from the config on this machine: params.json's `derived`, the
    checkpoint's, and (START_KEYS) the log's `start` line."""
    return {"world_size": run.dist.world_size, "global_batch_size": run.plan["global_batch_size"],
            "requested_global_batch_size": run.plan["requested_global_batch_size"],
            "batch_size_per_gpu": run.cfg["training"]["batch_size"],
            "accum_steps": run.plan["accum_steps"], "peak_lr": run.plan["peak_lr"],
            "precision": run.precision, "device": str(run.device), "num_classes": len(data.wnids),
            "steps_per_epoch": data.steps_per_epoch, "train_samples": data.train_loader.num_samples,
            "num_workers": data.num_workers, "torch_threads": run.torch_threads}


START_KEYS = ("world_size", "global_batch_size", "batch_size_per_gpu", "accum_steps", "peak_lr",
              "precision", "device")


class LaunchClock:
    """This launch's start-up and wall-clock. The first batch (with torch.compile: the end of the
    first optimizer step, so that compilation counts as start-up) ends start-up and logs the
    `start` line; wall-clock counts from there, added to what earlier launches logged."""

    def __init__(self, run: Run, progress: Progress, derived: dict, resumed_from: "int | None"):
        self.run, self.progress = run, progress
        self.start_record = {**{k: derived[k] for k in START_KEYS},
                             "resumed_from_epoch": resumed_from,
                             "argv": run.cfg.get("meta", {}).get("argv")}
        self.elapsed_before = progress.elapsed_s
        self.first_step_at = None
        self.last_train_s = None  # this launch's last epoch of training, for stop_after_s
        self.last_val_s = None  # and its last validation pass

    def on_first_batch(self) -> None:
        if self.first_step_at is not None:
            return
        self.first_step_at = time.time()
        startup_s = self.first_step_at - self.run.launched_at
        if self.progress.startup_s is None:
            self.progress.startup_s = startup_s  # the first launch's start-up is the one that counts
        self.run.logger.log({"type": "start", "startup_s": startup_s, **self.start_record})

    def elapsed_s(self, now: float) -> float:
        # the replayed part of an epoch cut short by a kill is not counted
        return self.elapsed_before + (now - self.first_step_at)

    def hooks(self, epoch: int) -> EpochHooks:
        compiled = self.run.cfg["training"]["compile"]
        return EpochHooks(progress=self.run.show_progress,
                          on_first_batch=None if compiled else self.on_first_batch,
                          on_step=_step_hook(epoch, self.on_first_batch, compiled),
                          on_losses=self._step_logger(self.progress.step))

    def _step_logger(self, steps_before: int):
        """The epoch's per-step points to the logger, at the run's step (`steps_before` + n)."""
        def on_losses(points):
            self.run.logger.steps([(steps_before + n, loss, lr) for n, loss, lr in points])
        return on_losses


def fit(cfg: dict, *, launched_at: float = None) -> dict:
    """Train (or, with training.eval_only, evaluate) as `cfg` says; returns the summary record.

    `launched_at` (time.time() seconds) is where start-up is counted from: by default the start of
    this process (of the torchrun agent under torchrun), right for the command line; a caller that
    runs fit inside a longer-lived process (demo, tests) passes its own start time.
    """
    launched_at = launch_time() if launched_at is None else launched_at
    # fit may be called in-process (tests, demo): global torch settings are put back at the end
    saved_settings = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                      torch.backends.cudnn.benchmark)
    train_cfg = cfg["training"]
    dist_info = distributed.setup(train_cfg["device"], cpu_threads=train_cfg["cpu_threads"])
    try:
        if train_cfg["eval_only"]:
            return evaluate_checkpoint(cfg, dist_info)
        # the run's objects (the DDP model among them) are gone when _train returns, before the
        # process group is destroyed: a DDP reducer freed after it can deadlock on the GIL in
        # gloo's destructor (seen once with torch 2.4 after a torchrun restart)
        return _train(cfg, dist_info, launched_at)
    finally:
        gc.collect()
        distributed.cleanup()
        torch.set_num_threads(saved_settings[0])
        torch.use_deterministic_algorithms(saved_settings[1])
        torch.backends.cudnn.benchmark = saved_settings[2]


def _train(cfg: dict, dist_info: distributed.DistInfo, launched_at: float) -> dict:
    """Stages 1-7 of `fit`; the run folder's lock is released however they end."""
    run = setup_run(cfg, dist_info, launched_at)
    try:
        data = setup_data(run)
        trainer = setup_trainer(run, setup_model(run, len(data.wnids)), len(data.wnids))
        progress, resumed_from = resume(run, trainer)
        # the log keeps only the epochs before the one training goes on with; the sinks start
        run.logger.open(epoch=progress.epoch, step=progress.step)
        derived = derived_params(run, data)
        run.logger.write_json("params.json", {**{k: v for k, v in cfg.items() if k != "meta"},
                                              "config_file": cfg.get("meta", {}).get("config_file"),
                                              "argv": cfg.get("meta", {}).get("argv"),
                                              "derived": derived})
        run.logger.write_json("env.json", environment(dist_info.world_size))
        return train_loop(run, data, trainer, progress, LaunchClock(run, progress, derived, resumed_from))
    finally:
        run.logger.close()
        run.logger.unlock()


def train_loop(run: Run, data: Data, trainer: Trainer, progress: Progress, clock: LaunchClock) -> dict:
    """Stage 6: the epochs left, each trained, validated, logged and (stage 7) saved; a stop
    before an epoch that would end past training.stop_after_s; the summary line."""
    epochs = run.cfg["training"]["epochs"]
    val = None
    for epoch in range(progress.epoch, epochs):
        try:
            record, val = run_epoch(run, data, trainer, progress, clock, epoch)
        except Terminated:
            run.logger.log({"type": "stopped", "reason": "SIGTERM", "epoch": epoch,
                            "elapsed_s": progress.elapsed_s})
            kept = (f"the checkpoint after epoch {progress.epoch} is kept" if progress.epoch
                    else "no checkpoint was written yet")
            raise Terminated(f"stopped by SIGTERM during epoch {epoch}; {kept}: run the same command "
                             "to continue") from None
        except NonFiniteLoss as e:
            run.logger.log({"type": "failed", "reason": "non-finite loss", "epoch": e.epoch,
                            "step": e.step, "lr": e.lr})
            kept = (f"the last good checkpoint, {run.checkpoint_path} (after epoch {progress.epoch}), "
                    "is kept" if progress.epoch else "no checkpoint was written")
            raise NonFiniteLoss(f"{e}; the run stopped: nothing of epoch {e.epoch} is logged as done "
                                f"or saved, {kept}; lower lr.lr (or check the data) and start again",
                                epoch=e.epoch, step=e.step, lr=e.lr) from None
        if run.dist.is_main:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items() if k != "type"), flush=True)
        save(run, data, trainer, progress)
        stopped = stop_before_next(run, data, trainer, progress, clock, epoch)
        if stopped is not None:
            return stopped
    if val is None and progress.epoch >= epochs:  # resumed a finished run: evaluate once
        val = _evaluate(run, data, _scored_model(trainer))
    summary = {"type": "summary", "epochs": epochs, "top_1": val["top_1"], "top_5": val["top_5"],
               "elapsed_s": progress.elapsed_s, "startup_s": progress.startup_s,
               "total_images": progress.total_images,
               "mean_images_per_s": progress.total_images / max(progress.train_s, 1e-9),
               "preset": run.cfg.get("meta", {}).get("config_file"),
               **{k: val[k] for k in ("real_top_1", "real_count") if k in val}}
    run.logger.log(summary)
    return summary


def run_epoch(run: Run, data: Data, trainer: Trainer, progress: Progress, clock: LaunchClock,
              epoch: int) -> tuple:
    """One epoch: its resolution and seeds, training, validation when due; advances `progress`
    and logs the epoch line. Returns (that line, the validation result or None)."""
    cfg = run.cfg
    resolution = resolution_from_config(epoch, cfg)
    data.train_loader.set_resolution(resolution)
    data.train_loader.set_epoch(epoch)
    generator = seed_epoch(cfg["training"]["seed"], epoch, run.dist.rank, run.device)
    epoch_start = time.time()
    stats = train_one_epoch(trainer, data.train_loader, epoch=epoch,
                            steps_per_epoch=data.steps_per_epoch,
                            lr_fn=lambda e: lr_from_config(e, cfg, run.plan["peak_lr"]),
                            generator=generator, hooks=clock.hooks(epoch))
    clock.last_train_s = time.time() - epoch_start
    if not weights_finite(trainer.model):  # one host read an epoch: nothing non-finite is saved
        step, lr = stats["first_nonfinite"] or (data.steps_per_epoch, stats["lr"])
        raise NonFiniteLoss(f"the weights are no longer finite at the end of epoch {epoch}: the loss "
                            f"was NaN or infinite from step {step} of the epoch (lr {lr:.4g}; "
                            f"{stats['nonfinite_batches']} micro-batches in all)", epoch=epoch,
                            step=step, lr=lr)
    val = validate(run, data, trainer, clock, epoch)
    now = time.time()
    progress.epoch = epoch + 1
    progress.step += data.steps_per_epoch
    progress.train_s += clock.last_train_s
    progress.total_images += stats["images"]
    progress.elapsed_s = clock.elapsed_s(now)
    record = {"type": "epoch", "epoch": epoch, "step": progress.step, "lr": stats["lr"],
              "resolution": resolution, "train_loss": stats["train_loss"],
              "nonfinite_batches": stats["nonfinite_batches"],
              "train_images_per_s": stats["images"] / max(clock.last_train_s, 1e-9),
              **(val or {"top_1": None, "top_5": None, "val_loss": None, "val_count": None}),
              "epoch_s": now - epoch_start, "elapsed_s": progress.elapsed_s}
    run.logger.log(record)
    return record, val


@torch.no_grad()
def weights_finite(model) -> bool:
    """Whether every parameter and buffer is finite on every process (one host read; the same
    answer on every rank, whose BatchNorm buffers may differ)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    bad = (~torch.stack([torch.isfinite(t).all() for t in tensors])).sum().double()
    return distributed.all_reduce_sum(bad.reshape(1)).item() == 0


def _val_passes(run: Run, trainer: Trainer, epoch: int) -> int:
    return validation_passes(epoch, epochs=run.cfg["training"]["epochs"],
                             every=run.cfg["validation"]["every_n_epochs"], ema=trainer.ema is not None)


def _scored_model(trainer: Trainer) -> torch.nn.Module:
    """What validation scores: the weight average when the run keeps one, else the model."""
    return trainer.model if trainer.ema is None else trainer.ema.module


def _evaluate(run: Run, data: Data, model) -> dict:
    return evaluate(model, data.val_loader, device=run.device, precision=run.precision,
                    lr_tta=run.cfg["validation"]["lr_tta"], progress=run.show_progress,
                    scorers=real_scorers(data.real, run.device))


def validate(run: Run, data: Data, trainer: Trainer, clock: LaunchClock, epoch: int):
    """The validation due after `epoch`, or None: the weight average (broadcast from rank 0 first)
    or the model; after the last epoch of an EMA run also the raw weights, as `*_no_ema`."""
    passes = _val_passes(run, trainer, epoch)
    if not passes:
        return None
    val_start = time.time()
    if trainer.ema is not None:
        trainer.ema.broadcast(src=0)
    val = _evaluate(run, data, _scored_model(trainer))
    clock.last_val_s = time.time() - val_start
    if passes == 2:  # the last epoch of an EMA run: the model itself too, for comparison
        raw = _evaluate(run, data, trainer.model)
        val = {**val, **{f"{k}_no_ema": v for k, v in raw.items()}}
    return val


def save(run: Run, data: Data, trainer: Trainer, progress: Progress) -> None:
    """Stage 7: the checkpoint after an epoch (written whole, then renamed), by rank 0 (the other
    ranks hold the same weights); every rank learns whether it failed (a full disk), so that
    all stop together instead of waiting for rank 0."""
    error = None
    if run.dist.is_main:
        try:
            _save(run, data, trainer, progress)
        except ckpt_io.CheckpointError as e:
            error = str(e)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise ckpt_io.CheckpointError(error)


def _save(run: Run, data: Data, trainer: Trainer, progress: Progress) -> None:
    ckpt_io.save_checkpoint(run.checkpoint_path, {
        "model": ckpt_io.model_state(trainer.model), "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        **asdict(progress), "rng": ckpt_io.rng_state(), "config": run.cfg,
        "derived": derived_params(run, data), "arch": run.cfg["model"]["arch"],
        "num_classes": len(data.wnids), "wnids": data.wnids})


def stop_before_next(run: Run, data: Data, trainer: Trainer, progress: Progress,
                     clock: LaunchClock, epoch: int):
    """training.stop_after_s: the `stopped` record when the epoch after `epoch` is expected to end
    past the limit (counted from launch, 10% to spare), else None. Rank 0 decides for all, so that
    no rank waits for one that stopped."""
    cfg, epochs = run.cfg, run.cfg["training"]["epochs"]
    stop_after_s = cfg["training"]["stop_after_s"]
    if not stop_after_s or epoch == epochs - 1:
        return None
    next_s = expected_epoch_s(
        last_train_s=clock.last_train_s, last_res=resolution_from_config(epoch, cfg),
        next_res=resolution_from_config(epoch + 1, cfg), val_passes=_val_passes(run, trainer, epoch + 1),
        last_val_s=clock.last_val_s, train_images=data.train_loader.num_samples,
        val_images=data.val_loader.num_samples, val_res=cfg["validation"]["resolution"])
    if not distributed.broadcast_object(time.time() + 1.1 * next_s > run.launched_at + stop_after_s):
        return None
    record = {"type": "stopped", "epoch": epoch + 1, "next_epoch_expected_s": next_s,
              "stop_after_s": stop_after_s, "elapsed_s": progress.elapsed_s}
    run.logger.log(record)
    run.say(f"stopped after epoch {epoch + 1}/{epochs}: the next would take about "
            f"{next_s / 60:.1f} min and end past training.stop_after_s={stop_after_s:g} s from "
            "launch; run the same command to continue")
    return record


def evaluate_checkpoint(cfg: dict, dist_info) -> dict:
    """--training.eval_only=1: evaluate training.checkpoint on data.val_dataset; the eval record
    (with ReaL top-1 when validation.real_labels is given) is printed and appended to
    logging.folder/log.jsonl, every image's top-5 written to logging.folder/predictions.csv."""
    train_cfg, val_cfg, data_cfg = cfg["training"], cfg["validation"], cfg["data"]
    device, val_path = dist_info.device, data_cfg["val_dataset"]
    precision = resolve_precision(train_cfg["precision"], device)
    val_meta = read_metadata(val_path)
    checkpoint = ckpt_io.load_checkpoint(train_cfg["checkpoint"])
    model, weights = checkpoint_model(cfg, checkpoint, val_meta["wnids"], device)
    val_loader = create_val_loader(val_path, batch_size=val_cfg["batch_size"],
                                   resolution_px=val_cfg["resolution"],
                                   num_workers=loader_workers(data_cfg, dist_info),
                                   device=device, rank=dist_info.rank, world_size=dist_info.world_size,
                                   in_memory=data_cfg["in_memory"], torch_threads=torch.get_num_threads(),
                                   crop_ratio=val_cfg["crop_ratio"])
    real = real_rows(val_cfg["real_labels"], val_path, val_meta["wnids"], val_loader)
    predictions = Predictions() if has_names(val_meta) else None
    result = evaluate(model, val_loader, device=device, precision=precision, lr_tta=val_cfg["lr_tta"],
                      progress=cfg["logging"]["progress"] and dist_info.is_main,
                      scorers=[*real_scorers(real, device), *([predictions] if predictions else [])])
    result = {"type": "eval", "checkpoint": train_cfg["checkpoint"], "epoch": checkpoint.get("epoch"),
              "weights": weights, **result}
    if dist_info.is_main:
        save_evaluation(cfg["logging"]["folder"], result, predictions, val_path, val_meta)
        print(json.dumps(result), flush=True)
    return result


def checkpoint_model(cfg: dict, checkpoint: dict, val_wnids: list, device) -> tuple:
    """(the model of `checkpoint` with its weights, 'ema' or 'model': which weights); ValueError
    when it was trained on another class list than the val file's."""
    train_cfg, data_cfg = cfg["training"], cfg["data"]
    if checkpoint.get("wnids") is not None and checkpoint["wnids"] != val_wnids:
        raise ValueError(f"class list of {data_cfg['val_dataset']} differs from the one "
                         f"{train_cfg['checkpoint']} was trained on")
    saved = checkpoint.get("config", cfg)
    model = build_model(arch=checkpoint.get("arch", saved["model"]["arch"]),
                        num_classes=checkpoint.get("num_classes", len(val_wnids)),
                        model_cfg=saved["model"], use_blurpool=saved["training"]["use_blurpool"],
                        channels_last=train_cfg["channels_last"], device=device)
    # a run with training.ema_decay reported its weight average: evaluate that
    weights = "ema" if checkpoint.get("ema") else "model"
    model.load_state_dict(checkpoint["ema"]["module"] if weights == "ema" else checkpoint["model"])
    return model, weights


def save_evaluation(folder: str, result: dict, predictions, val_path: str, val_meta: dict) -> None:
    """Rank 0: the eval record into folder/log.jsonl, and predictions.csv (a val file written
    before source names were kept gets a warning instead: its images cannot be named)."""
    logger = RunLogger(folder, enabled=True)
    if predictions is None:
        print(f"warning: no {PREDICTIONS_FILE}: {val_path} records no source names; write it "
              "again with `ffcv-imagenet write` to get them", file=sys.stderr, flush=True)
    else:
        path = os.path.join(folder, PREDICTIONS_FILE)
        write_predictions(path, read_names(val_path, val_meta), val_meta["wnids"], predictions.gathered)
        result["predictions"] = path
    logger.log(result)


def main(argv=None, *, launched_at: float = None) -> int:
    """Command line -> fit; `launched_at` as for `fit` (in-process callers pass time.time())."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = load_config(argv)
    except ValueError as e:  # ConfigError: the message names the key or file at fault
        print(f"ffcv-imagenet train: {e}", file=sys.stderr)
        return 2
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    if in_main_thread:
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        fit(cfg, launched_at=launched_at)
    except Terminated as e:
        print(f"ffcv-imagenet train: {str(e) or 'stopped by SIGTERM'}", file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    except (DataFileError, ckpt_io.CheckpointError, FileExistsError, distributed.DeviceError) as e:
        print(f"ffcv-imagenet train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLoss as e:
        print(f"ffcv-imagenet train: error: {e}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:
        if not distributed.lost_peer(e):
            raise
        print(f"ffcv-imagenet train: error: rank {os.environ.get('RANK', 0)}: a peer process is gone "
              f"({str(e).strip().splitlines()[0][:300]}); torchrun restarts the group when "
              "--max-restarts allows (the run resumes from its last checkpoint), else the job ends",
              file=sys.stderr, flush=True)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    # under torchrun (`-m ffcv_imagenet.train`), `record` puts the failing rank's exception in
    # torchrun's failure summary; only here, so that in-process callers keep their stderr as is.
    # Everything is written and flushed when main returns: a worker leaves without the
    # interpreter's teardown, where freeing torch's distributed objects can hang (torch 2.4).
    status = record(main)()
    sys.stdout.flush()
    sys.stderr.flush()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        os._exit(status or 0)
    sys.exit(status)
