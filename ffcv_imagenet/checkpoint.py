"""One explicit checkpoint dict, saved atomically after every epoch (the one before kept as
checkpoint.prev.pt); loaded for resume (falling back on the previous one) and eval.

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
import shutil

import numpy as np
import torch

from .host import process_alive


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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


def previous_path(path) -> str:
    """Where the checkpoint before the current one is kept: checkpoint.pt -> checkpoint.prev.pt."""
    base, ext = os.path.splitext(str(path))
    return f"{base}.prev{ext}"


def save_checkpoint(path, checkpoint: dict) -> None:
    """Write the whole checkpoint to a temporary file beside `path` (flushed to disk), keep the
    current one as previous_path(path), then rename the new one over `path`. `path` exists at
    every moment (the previous file is a hard link to it, made before the rename), so a kill at
    any point leaves a readable checkpoint. A write that fails (a full disk: ENOSPC) removes its
    temporary file and raises CheckpointError naming `path`; both earlier files stay as they were."""
    path = str(path)
    remove_stale_temporaries(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            reason = os.strerror(e.errno) if getattr(e, "errno", None) else str(e)
            kept = f"; the previous checkpoint {path} is kept as it was" if os.path.exists(path) else ""
            raise CheckpointError(f"could not write the checkpoint {path}: {reason}{kept}") from e
        raise
    if os.path.exists(path):
        _keep_previous(path)
    os.replace(tmp, path)


def remove_stale_temporaries(path: str) -> list:
    """Delete `<path>.tmp<pid>` (and the previous file's) left by processes that no longer run (a
    kill in the middle of a save): full-size files nothing else would remove."""
    folder = os.path.dirname(path) or "."
    removed = []
    for name in os.listdir(folder):
        for prefix in (os.path.basename(path) + ".tmp", os.path.basename(previous_path(path)) + ".tmp"):
            pid = name[len(prefix):]
            if name.startswith(prefix) and pid.isdigit() and not process_alive(int(pid)):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


def _keep_previous(path: str) -> None:
    previous, link = previous_path(path), f"{previous_path(path)}.tmp{os.getpid()}"
    if os.path.exists(link):
        os.remove(link)
    try:
        os.link(path, link)
    except OSError:  # a filesystem without hard links: a copy
        shutil.copyfile(path, link)
    os.replace(link, previous)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dict at `path`; CheckpointError naming the file when it is missing, cut
    short, corrupt or not one of ours."""
    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: the dict holds RNG states and the config (our file, not a download)
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, EOF: torch raises several kinds
        raise CheckpointError(f"{path} cannot be read (cut short or corrupt? "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{path}: not an ffcv-imagenet checkpoint (no 'model' key)")
    return checkpoint


def load_latest(path, map_location="cpu", warn=print) -> tuple:
    """(checkpoint, the file it came from) for a resume: `path`, or when that cannot be read the
    previous one kept beside it, with a warning naming both; CheckpointError naming `path` when
    neither can be read. (None, None) when the folder holds neither file."""
    path, previous = str(path), previous_path(path)
    if not os.path.exists(path) and not os.path.exists(previous):
        return None, None
    try:
        return load_checkpoint(path, map_location), path
    except CheckpointError as e:
        if not os.path.exists(previous):
            raise CheckpointError(f"{e}; there is no previous checkpoint ({previous}) to fall "
                                  "back on") from None
        first_error = e
    try:
        checkpoint = load_checkpoint(previous, map_location)
    except CheckpointError as e:
        raise CheckpointError(f"{first_error}; and the previous one: {e}") from None
    warn(f"warning: {first_error}; resuming from the previous checkpoint {previous} "
         f"(epoch {checkpoint.get('epoch')})")
    return checkpoint, previous


def unwrap(model):
    """The module under DDP / torch.compile wrappers (in either order)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def model_state(model) -> dict:
    """state_dict of the model under DDP / torch.compile wrappers."""
    return unwrap(model).state_dict()
