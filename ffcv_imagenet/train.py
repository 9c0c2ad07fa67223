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
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record

from ffcv_imagenet import checkpoint as ckpt_io
from ffcv_imagenet import distributed
from ffcv_imagenet.config import load_config
from ffcv_imagenet.data import create_train_loader, create_val_loader, prepare_batch
from ffcv_imagenet.logger import RunLogger, environment
from ffcv_imagenet.metadata import check_same_classes, read_metadata
from ffcv_imagenet.schedules import lr_at, resolution_at, validation_passes

# Test hook: "EPOCH:STEP" makes rank 0 (or "EPOCH:STEP:RANK": that rank) SIGKILL itself after
# optimizer step STEP (1-based) of EPOCH (0-based), to test resume after a hard kill in the middle
# of an epoch, and that the other ranks then stop instead of hanging.
KILL_ENV = "FFCV_IMAGENET_TEST_KILL_AT"

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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
                     "training.device", "logging.folder", "logging.progress")


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

def compute_loss(model, images, labels, *, label_smoothing=0.0, mixup_alpha=0.0, num_classes=None,
                 teacher=None, distill_temperature=4.0, distill_weight=0.5, generator=None):
    """Forward pass and loss: plain CE, mixup (soft targets) and/or distillation."""
    from ffcv_imagenet import losses

    targets = labels
    if mixup_alpha > 0:
        images, targets = losses.mixup(images, labels, alpha=mixup_alpha, num_classes=num_classes,
                                       generator=generator)
    logits = model(images)
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(images)
        return losses.distillation_loss(logits, teacher_logits, targets, temperature=distill_temperature,
                                        weight=distill_weight, label_smoothing=label_smoothing)
    return losses.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def train_one_epoch(model, batches, optimizer, scaler, *, epoch: int, steps_per_epoch: int,
                    accum_steps: int, lr_fn, device, precision: str, label_smoothing=0.0,
                    mixup_alpha=0.0, num_classes=None, teacher=None, distill_temperature=4.0,
                    distill_weight=0.5, color_jitter=0.0, pca_lighting=0.0, generator=None,
                    progress=False, on_first_batch=None, on_step=None, ema=None) -> dict:
    """One epoch of `steps_per_epoch` optimizer steps of `accum_steps` micro-batches each.

    `batches` yields (uint8 NCHW images, int labels) on `device`; `lr_fn(epoch_float)` gives the
    lr of each step; `ema` (optim.WeightEMA) is updated after every optimizer step. Returns the
    epoch's mean train loss and image count over all processes.
    """
    model.train()
    dtype = DTYPES[precision]
    total_micro = steps_per_epoch * accum_steps
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    images_seen = 0
    lr = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for micro, (images, labels) in enumerate(batches):
        if micro >= total_micro:
            break  # micro-batches that do not fill an optimizer step are skipped, on every rank
        if micro == 0 and on_first_batch is not None:
            on_first_batch()
        step, k = divmod(micro, accum_steps)
        if k == 0:
            lr = lr_fn(epoch + step / steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
        x = prepare_batch(images, dtype=dtype, color_jitter=color_jitter,
                          pca_lighting=pca_lighting, generator=generator)
        y = labels.to(torch.long, copy=True)  # a copy: ffcv reuses its buffers
        last_micro = k == accum_steps - 1
        # DDP all-reduces gradients only on the micro-batch that completes the step.
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast_context(device, precision):
                loss = compute_loss(model, x, y, label_smoothing=label_smoothing,
                                    mixup_alpha=mixup_alpha, num_classes=num_classes, teacher=teacher,
                                    distill_temperature=distill_temperature,
                                    distill_weight=distill_weight, generator=generator)
            scaler.scale(loss / accum_steps).backward()
        loss_sum += loss.detach().double() * len(y)
        images_seen += len(y)
        if last_micro:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4f}")
            if on_step is not None:
                on_step(step + 1)
    if bar is not None:
        bar.close()
    # the epoch's one host read: loss and image count summed over processes, on the device
    images_total = torch.full((), images_seen, dtype=torch.float64, device=device)
    totals = torch.stack([loss_sum, images_total])
    loss_total, images = distributed.all_reduce_sum(totals).tolist()
    return {"train_loss": loss_total / max(1.0, images), "images": int(images), "lr": lr}


@torch.no_grad()
def evaluate(model, batches, *, device, precision: str, lr_tta: bool = True, progress=False) -> dict:
    """Top-1, top-5, mean loss and count over every val image of every process."""
    model.eval()
    dtype = DTYPES[precision]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    count = 0  # on the host: a device tensor made from it per batch would be a blocking copy
    iterator = batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(batches, desc="val", leave=False, dynamic_ncols=True)
    for images, labels in iterator:
        x = prepare_batch(images, dtype=dtype)
        y = labels.to(torch.long, copy=True)
        count += len(y)
        with autocast_context(device, precision):
            logits = model(x).float()
            if lr_tta:  # average with the mirrored image
                logits = (logits + model(torch.flip(x, dims=[3])).float()) / 2
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[:3] += torch.stack([
            F.cross_entropy(logits, y, reduction="sum").double(),
            (top5[:, 0] == y).sum().double(),
            (top5 == y[:, None]).any(dim=1).sum().double(),
        ])
    sums[3] = count
    distributed.all_reduce_sum(sums)
    count = max(1.0, sums[3].item())
    return {"top_1": sums[1].item() / count, "top_5": sums[2].item() / count,
            "val_loss": sums[0].item() / count, "val_count": int(sums[3].item())}


# --------------------------------------------------------------------------- the run

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


def build_model(*, arch, num_classes, model_cfg, use_blurpool, channels_last, device):
    from ffcv_imagenet.models import create_model

    model = create_model(arch, num_classes=num_classes, zero_init_residual=model_cfg["zero_init_residual"],
                         use_blurpool=use_blurpool, resnet_d=model_cfg["resnet_d"],
                         xavier_init=model_cfg["xavier_init"],
                         activation=model_cfg.get("activation", "relu"),
                         stem_pool=model_cfg.get("stem_pool", "max"),
                         self_attention=model_cfg.get("self_attention", False))
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def fit(cfg: dict, *, launched_at: float = None) -> dict:
    """Train (or, with training.eval_only, evaluate) as `cfg` says; returns the summary record.

    `launched_at` (time.time() seconds) is where start-up is counted from: by default the start of
    this process (of the torchrun agent under torchrun), right for the command line; a caller that
    runs fit inside a longer-lived process (demo, tests) passes its own start time.
    """
    launched_at = launch_time() if launched_at is None else launched_at
    data_cfg, lr_cfg, res_cfg, train_cfg = cfg["data"], cfg["lr"], cfg["resolution"], cfg["training"]
    aug_cfg, val_cfg, model_cfg, log_cfg = cfg["augment"], cfg["validation"], cfg["model"], cfg["logging"]

    # fit may be called in-process (tests, demo): global torch settings are put back at the end
    saved_settings = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                      torch.backends.cudnn.benchmark)

    # 1. distributed
    dist_info = distributed.setup(train_cfg["device"], cpu_threads=train_cfg["cpu_threads"])
    try:
        if train_cfg["eval_only"]:
            return evaluate_checkpoint(cfg, dist_info)
        device = dist_info.device
        torch_threads = torch.get_num_threads()
        precision = resolve_precision(train_cfg["precision"], device)
        configure_determinism(train_cfg["deterministic"], device)
        plan = plan_batch(batch_size_per_gpu=train_cfg["batch_size"], world_size=dist_info.world_size,
                          global_batch_size=train_cfg["global_batch_size"], base_lr=lr_cfg["lr"],
                          lr_scaling=lr_cfg["lr_scaling"])
        folder = log_cfg["folder"]
        checkpoint_path = os.path.join(folder, "checkpoint.pt")
        logger = RunLogger(folder, enabled=dist_info.is_main)
        if not train_cfg["resume"] and os.path.exists(os.path.join(folder, "log.jsonl")):
            raise FileExistsError(f"{folder} already holds a run (log.jsonl); continue it with "
                                  "--training.resume=1 or choose another --logging.folder")
        if dist_info.is_main:
            print(plan["message"], flush=True)

        # 2. data
        wnids = check_same_classes(data_cfg["train_dataset"], data_cfg["val_dataset"])
        num_workers = data_cfg["num_workers"] or max(1, distributed.cpu_cores() // dist_info.local_world_size)
        loader_args = dict(num_workers=num_workers, device=device, rank=dist_info.rank,
                           world_size=dist_info.world_size, in_memory=data_cfg["in_memory"],
                           torch_threads=torch_threads)
        train_loader = create_train_loader(
            data_cfg["train_dataset"], batch_size=train_cfg["batch_size"],
            resolution_px=res_cfg["min_res"], order=data_cfg["order"], seed=train_cfg["seed"],
            scale=(aug_cfg["scale_min"], aug_cfg["scale_max"]),
            ratio=(aug_cfg["ratio_min"], aug_cfg["ratio_max"]),
            deterministic=train_cfg["deterministic"], decoder=data_cfg["decoder"], **loader_args)
        val_loader = create_val_loader(data_cfg["val_dataset"], batch_size=val_cfg["batch_size"],
                                       resolution_px=val_cfg["resolution"],
                                       crop_ratio=val_cfg["crop_ratio"], **loader_args)
        steps_per_epoch = len(train_loader) // plan["accum_steps"]
        if steps_per_epoch == 0:
            raise ValueError(
                f"{data_cfg['train_dataset']}: {len(train_loader)} batches per process per epoch is fewer "
                f"than the {plan['accum_steps']} micro-batches of one optimizer step (global batch "
                f"{plan['global_batch_size']}); lower training.global_batch_size or use more data")

        # 3. model
        torch.manual_seed(train_cfg["seed"])
        model = build_model(arch=model_cfg["arch"], num_classes=len(wnids), model_cfg=model_cfg,
                            use_blurpool=train_cfg["use_blurpool"],
                            channels_last=train_cfg["channels_last"], device=device)
        raw_model = model
        if dist_info.is_distributed:
            if train_cfg["sync_bn"]:
                model = raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                **ddp_options(compile_model=train_cfg["compile"], accum_steps=plan["accum_steps"]))
        if train_cfg["compile"]:
            model = torch.compile(model)
        teacher = None
        if train_cfg["distill_arch"]:
            from ffcv_imagenet.losses import create_teacher

            teacher = create_teacher(train_cfg["distill_arch"], train_cfg["distill_checkpoint"],
                                     len(wnids), device)
            if train_cfg["channels_last"]:
                teacher = teacher.to(memory_format=torch.channels_last)

        # 4. optimizer
        from ffcv_imagenet.optim import create_optimizer

        optimizer = create_optimizer(raw_model, name=train_cfg["optimizer"], lr=plan["peak_lr"],
                                     momentum=train_cfg["momentum"], nesterov=train_cfg["nesterov"],
                                     weight_decay=train_cfg["weight_decay"],
                                     betas=(train_cfg["adam_beta1"], train_cfg["adam_beta2"]),
                                     eps=train_cfg["adam_eps"] or None,
                                     lookahead_steps=train_cfg["lookahead_steps"],
                                     lookahead_alpha=train_cfg["lookahead_alpha"])
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        ema = None
        if train_cfg["ema_decay"] > 0:
            from ffcv_imagenet.optim import WeightEMA

            ema = WeightEMA(raw_model, train_cfg["ema_decay"])

        # 5. resume
        state = {"epoch": 0, "step": 0, "elapsed_s": 0.0, "train_s": 0.0, "total_images": 0,
                 "startup_s": None}
        resumed_from = None
        if train_cfg["resume"]:
            if os.path.exists(checkpoint_path):
                checkpoint = ckpt_io.load_checkpoint(checkpoint_path)
                raw_model.load_state_dict(checkpoint["model"])
                optimizer.load_state_dict(checkpoint["optimizer"])
                if checkpoint.get("scaler"):
                    scaler.load_state_dict(checkpoint["scaler"])
                if ema is not None:
                    if checkpoint.get("ema") is None:
                        raise ValueError(f"{checkpoint_path} holds no weight average: the run was "
                                         "started without training.ema_decay; resume it without")
                    ema.load_state_dict(checkpoint["ema"])
                ckpt_io.set_rng_state(checkpoint["rng"])
                state = {k: checkpoint[k] for k in state}
                resumed_from = state["epoch"]
                if dist_info.is_main:
                    print(f"resuming {folder} after epoch {resumed_from} (step {state['step']})", flush=True)
                    changes = resume_changes(checkpoint.get("config") or {}, cfg, precision=precision,
                                             saved_precision=(checkpoint.get("derived") or {}).get("precision"))
                    if changes:
                        print(f"warning: resuming {checkpoint_path} with settings that differ from the "
                              f"run's so far (the rest of the run uses the new ones): {'; '.join(changes)}",
                              file=sys.stderr, flush=True)
            elif dist_info.is_main:
                print(f"no checkpoint in {folder}; starting from scratch", flush=True)
            logger.keep_epochs_before(state["epoch"])

        derived = {"world_size": dist_info.world_size, "global_batch_size": plan["global_batch_size"],
                   "requested_global_batch_size": plan["requested_global_batch_size"],
                   "batch_size_per_gpu": train_cfg["batch_size"], "accum_steps": plan["accum_steps"],
                   "peak_lr": plan["peak_lr"], "precision": precision, "device": str(device),
                   "num_classes": len(wnids), "steps_per_epoch": steps_per_epoch,
                   "train_samples": train_loader.num_samples, "num_workers": num_workers,
                   "torch_threads": torch_threads}
        logger.write_json("params.json", {**{k: v for k, v in cfg.items() if k != "meta"},
                                          "config_file": cfg.get("meta", {}).get("config_file"),
                                          "argv": cfg.get("meta", {}).get("argv"), "derived": derived})
        logger.write_json("env.json", environment(dist_info.world_size))

        # 6. loop
        session = {"first_step_at": None}

        def on_first_batch():
            if session["first_step_at"] is not None:
                return
            session["first_step_at"] = time.time()
            startup_s = session["first_step_at"] - launched_at
            if state["startup_s"] is None:
                state["startup_s"] = startup_s  # the first launch's start-up is the one that counts
            logger.log({"type": "start", "startup_s": startup_s, "world_size": dist_info.world_size,
                        "global_batch_size": plan["global_batch_size"],
                        "batch_size_per_gpu": train_cfg["batch_size"],
                        "accum_steps": plan["accum_steps"], "peak_lr": plan["peak_lr"],
                        "precision": precision, "device": str(device),
                        "resumed_from_epoch": resumed_from, "argv": cfg.get("meta", {}).get("argv")})

        def lr_fn(epoch_float):
            return lr_at(epoch_float, schedule=lr_cfg["lr_schedule_type"], peak_lr=plan["peak_lr"],
                         epochs=train_cfg["epochs"], warmup_epochs=lr_cfg["warmup_epochs"],
                         lr_peak_epoch=lr_cfg["lr_peak_epoch"], step_ratio=lr_cfg["step_ratio"],
                         step_length=lr_cfg["step_length"], milestones=tuple(lr_cfg["milestones"]),
                         end_lr_ratio=lr_cfg["end_lr_ratio"], flat_fraction=lr_cfg["flat_fraction"])

        def train_res(epoch):
            return resolution_at(epoch, min_res=res_cfg["min_res"], max_res=res_cfg["max_res"],
                                 start_ramp=res_cfg["start_ramp"], end_ramp=res_cfg["end_ramp"])

        val = None
        last_val_s = None  # this launch's last validation pass, for training.stop_after_s
        elapsed_before = state["elapsed_s"]
        epochs = train_cfg["epochs"]
        progress = log_cfg["progress"] and dist_info.is_main
        for epoch in range(state["epoch"], epochs):
            resolution = train_res(epoch)
            train_loader.set_resolution(resolution)
            train_loader.set_epoch(epoch)
            generator = seed_epoch(train_cfg["seed"], epoch, dist_info.rank, device)
            epoch_start = time.time()
            stats = train_one_epoch(
                model, train_loader, optimizer, scaler, epoch=epoch, steps_per_epoch=steps_per_epoch,
                accum_steps=plan["accum_steps"], lr_fn=lr_fn, device=device, precision=precision,
                label_smoothing=train_cfg["label_smoothing"], mixup_alpha=train_cfg["mixup_alpha"],
                num_classes=len(wnids), teacher=teacher,
                distill_temperature=train_cfg["distill_temperature"],
                distill_weight=train_cfg["distill_weight"], color_jitter=aug_cfg["color_jitter"],
                pca_lighting=aug_cfg["pca_lighting"], generator=generator, progress=progress,
                on_first_batch=None if train_cfg["compile"] else on_first_batch,
                on_step=_step_hook(epoch, on_first_batch, train_cfg["compile"]), ema=ema)
            train_s = time.time() - epoch_start
            last = epoch == epochs - 1
            val = None
            passes = validation_passes(epoch, epochs=epochs, every=val_cfg["every_n_epochs"], ema=ema is not None)
            if passes:
                val_start = time.time()
                if ema is not None:
                    ema.broadcast(src=0)
                val = evaluate(model if ema is None else ema.module, val_loader, device=device,
                               precision=precision, lr_tta=val_cfg["lr_tta"], progress=progress)
                last_val_s = time.time() - val_start
                if passes == 2:  # the last epoch of an EMA run: the model itself too, for comparison
                    raw = evaluate(model, val_loader, device=device, precision=precision,
                                   lr_tta=val_cfg["lr_tta"], progress=progress)
                    val = {**val, **{f"{k}_no_ema": v for k, v in raw.items()}}
            now = time.time()
            state["epoch"] = epoch + 1
            state["step"] += steps_per_epoch
            state["train_s"] += train_s
            state["total_images"] += stats["images"]
            # wall-clock since the first training step, summed over (re)starts; the replayed part
            # of an epoch cut short by a kill is not counted
            state["elapsed_s"] = elapsed_before + (now - session["first_step_at"])
            record = {"type": "epoch", "epoch": epoch, "lr": stats["lr"], "resolution": resolution,
                      "train_loss": stats["train_loss"],
                      "train_images_per_s": stats["images"] / max(train_s, 1e-9),
                      **(val or {"top_1": None, "top_5": None, "val_loss": None, "val_count": None}),
                      "epoch_s": now - epoch_start, "elapsed_s": state["elapsed_s"]}
            logger.log(record)
            if dist_info.is_main:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in record.items() if k != "type"), flush=True)
                # 7. save (rank 0 only; the other ranks hold the same weights)
                ckpt_io.save_checkpoint(checkpoint_path, {
                    "model": ckpt_io.model_state(model), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "ema": ema.state_dict() if ema is not None else None,
                    **state, "rng": ckpt_io.rng_state(), "config": cfg, "derived": derived,
                    "arch": model_cfg["arch"], "num_classes": len(wnids), "wnids": wnids})
            distributed.barrier()
            if train_cfg["stop_after_s"] and not last:
                next_s = expected_epoch_s(
                    last_train_s=train_s, last_res=resolution, next_res=train_res(epoch + 1),
                    val_passes=validation_passes(epoch + 1, epochs=epochs, every=val_cfg["every_n_epochs"],
                                                 ema=ema is not None),
                    last_val_s=last_val_s, train_images=train_loader.num_samples,
                    val_images=val_loader.num_samples, val_res=val_cfg["resolution"])
                # 10% to spare; rank 0 decides for all, so that no rank waits for one that stopped
                stop = distributed.broadcast_object(
                    time.time() + 1.1 * next_s > launched_at + train_cfg["stop_after_s"])
                if stop:
                    record = {"type": "stopped", "epoch": epoch + 1, "next_epoch_expected_s": next_s,
                              "stop_after_s": train_cfg["stop_after_s"], "elapsed_s": state["elapsed_s"]}
                    logger.log(record)
                    if dist_info.is_main:
                        print(f"stopped after epoch {epoch + 1}/{epochs}: the next would take about "
                              f"{next_s / 60:.1f} min and end past training.stop_after_s="
                              f"{train_cfg['stop_after_s']:g} s from launch; continue with "
                              "--training.resume=1", flush=True)
                    return record

        if val is None and state["epoch"] >= epochs:  # resumed a finished run: evaluate once
            val = evaluate(model if ema is None else ema.module, val_loader, device=device, precision=precision,
                           lr_tta=val_cfg["lr_tta"], progress=progress)
        summary = {"type": "summary", "epochs": epochs, "top_1": val["top_1"], "top_5": val["top_5"],
                   "elapsed_s": state["elapsed_s"], "startup_s": state["startup_s"],
                   "total_images": state["total_images"],
                   "mean_images_per_s": state["total_images"] / max(state["train_s"], 1e-9),
                   "preset": cfg.get("meta", {}).get("config_file")}
        logger.log(summary)
        return summary
    finally:
        distributed.cleanup()
        torch.set_num_threads(saved_settings[0])
        torch.use_deterministic_algorithms(saved_settings[1])
        torch.backends.cudnn.benchmark = saved_settings[2]


def evaluate_checkpoint(cfg: dict, dist_info) -> dict:
    """--training.eval_only=1: evaluate training.checkpoint on data.val_dataset."""
    train_cfg, val_cfg, data_cfg = cfg["training"], cfg["validation"], cfg["data"]
    device = dist_info.device
    precision = resolve_precision(train_cfg["precision"], device)
    checkpoint = ckpt_io.load_checkpoint(train_cfg["checkpoint"])
    val_wnids = read_metadata(data_cfg["val_dataset"])["wnids"]
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
    num_workers = data_cfg["num_workers"] or max(1, distributed.cpu_cores() // dist_info.local_world_size)
    val_loader = create_val_loader(data_cfg["val_dataset"], batch_size=val_cfg["batch_size"],
                                   resolution_px=val_cfg["resolution"], num_workers=num_workers,
                                   device=device, rank=dist_info.rank, world_size=dist_info.world_size,
                                   in_memory=data_cfg["in_memory"], torch_threads=torch.get_num_threads(),
                                   crop_ratio=val_cfg["crop_ratio"])
    result = evaluate(model, val_loader, device=device, precision=precision, lr_tta=val_cfg["lr_tta"],
                      progress=cfg["logging"]["progress"] and dist_info.is_main)
    result = {"type": "eval", "checkpoint": train_cfg["checkpoint"], "epoch": checkpoint.get("epoch"),
              "weights": weights, **result}
    if dist_info.is_main:
        import json

        print(json.dumps(result), flush=True)
    return result


def main(argv=None, *, launched_at: float = None) -> int:
    """Command line -> fit; `launched_at` as for `fit` (in-process callers pass time.time())."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = load_config(argv)
    except ValueError as e:  # ConfigError: the message names the key or file at fault
        print(f"ffcv-imagenet train: {e}", file=sys.stderr)
        return 2
    fit(cfg, launched_at=launched_at)
    return 0


if __name__ == "__main__":
    # under torchrun (`-m ffcv_imagenet.train`), `record` puts the failing rank's exception in
    # torchrun's failure summary; only here, so that in-process callers keep their stderr as is
    sys.exit(record(main)())
