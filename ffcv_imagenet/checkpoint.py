"""One explicit checkpoint dict, saved atomically after every epoch; loaded for resume and eval.

    {
      "model": state_dict of the unwrapped model,
      "optimizer": optimizer.state_dict(),
      "scaler": GradScaler.state_dict() or None,
      "ema": optim.WeightEMA.state_dict() (training.ema_decay > 0) or None; eval_only evaluates it,
      "epoch": epochs completed (= the epoch to run next),
      "step": optimizer steps taken (the schedule position),
      "rng": {"python", "numpy", "torch", "cuda"} states at the end of the epoch,
      "elapsed_s": wall-clock since the first training step, summed over (re)starts,
      "train_s": training time only (no validation), summed, for the mean images/s,
      "total_images": images trained on, all processes,
      "config": the resolved config, "derived": global batch / accum steps / peak lr,
      "arch", "num_classes", "wnids": enough to rebuild the model for eval_only,
    }

The per-epoch randomness of the engine (loader order, crops, flips, mixup, jitter) is re-derived
from (seed, epoch) at the start of every epoch, so the RNG states saved here are a record, not the
mechanism of exact resume.
"""

import os
import random

import numpy as np
import torch


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        restore_cuda_rng(state["cuda"])


def restore_cuda_rng(states: list) -> int:
    """Set the RNG of each GPU this machine has from the saved list, one state per GPU of the
    machine that saved it; returns how many were set. A checkpoint of an 8-GPU node resumed on 1
    GPU sets GPU 0 only (torch's set_rng_state_all would raise IndexError on GPU 1); GPUs beyond
    the saved ones keep their state. Either way the engine reseeds every epoch from (seed, epoch),
    so these states are a record, not what makes resume exact."""
    count = min(len(states), torch.cuda.device_count())
    for index in range(count):
        torch.cuda.set_rng_state(states[index], index)
    return count


def save_checkpoint(path, checkpoint: dict) -> None:
    """Write to a temporary file in the same folder, then rename: a kill never leaves half a file."""
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # weights_only=False: the dict holds RNG states and the config (our own file, not a download)
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path}: not an ffcv-imagenet checkpoint (no 'model' key)")
    return checkpoint


def unwrap(model):
    """The module under DDP / torch.compile wrappers (in either order)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def model_state(model) -> dict:
    """state_dict of the model under DDP / torch.compile wrappers."""
    return unwrap(model).state_dict()
