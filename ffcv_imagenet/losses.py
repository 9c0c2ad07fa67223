"""Losses: cross-entropy with label smoothing on hard or soft targets, mixup, distillation.

Contract
--------
- `cross_entropy(logits, targets, label_smoothing=ε)`: mean over the batch. `targets` are class
  indices (integer tensor [N]) or soft targets (float [N, C], rows summing to 1, e.g. from
  mixup). Smoothing turns a target row t into t·(1-ε) + ε/C in both cases, which for indices is
  `torch.nn.CrossEntropyLoss(label_smoothing=ε)`. Computed in float32 whatever the logits' dtype.
- `mixup(images, targets, alpha=α, num_classes=C, generator=g)`: λ ~ Beta(α, α) (drawn and
  kept on the device), a random
  permutation π of the batch; returns
  (λ·x + (1-λ)·x[π], λ·onehot(y) + (1-λ)·onehot(y[π])).
  With α <= 0 the images are returned unchanged with one-hot targets. All randomness comes from
  `generator` (a torch.Generator) or, when None, from torch's global RNG, so a resumed run that
  restores torch's RNG state draws the same λ and π.
- `distillation_loss(student, teacher, targets, temperature=T, weight=w, label_smoothing=ε)`:
  (1-w)·CE(student, targets) + w·T²·KL(softmax(teacher/T) ‖ softmax(student/T)), the KL summed
  over classes and averaged over the batch ("batchmean"); the teacher's logits get no gradient.
- `create_teacher(arch, checkpoint_path, num_classes, device)`: a torchvision model loaded from a
  checkpoint, in eval mode, every parameter frozen.
"""

from pathlib import Path

import torch
import torch.nn.functional as F


def _soft_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float32 [N, C] targets from class indices [N] or already-soft [N, C] targets."""
    if targets.dtype.is_floating_point:
        if targets.ndim != 2 or targets.shape[1] != num_classes:
            raise ValueError(f"soft targets must have shape [N, {num_classes}], "
                             f"got {tuple(targets.shape)}")
        return targets.float()
    if targets.ndim != 1:
        raise ValueError(f"class-index targets must have shape [N], got {tuple(targets.shape)}")
    return F.one_hot(targets.long(), num_classes).float()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of `logits` [N, C] against class indices [N] or soft targets [N, C]."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [N, C], got {tuple(logits.shape)}")
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"batch sizes differ: logits {tuple(logits.shape)}, "
                         f"targets {tuple(targets.shape)}")
    num_classes = logits.shape[1]
    if not targets.dtype.is_floating_point:
        return F.cross_entropy(logits.float(), targets.long(), label_smoothing=label_smoothing)
    log_probs = F.log_softmax(logits.float(), dim=1)
    soft = _soft_targets(targets, num_classes)
    if label_smoothing:
        soft = soft * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -(soft * log_probs).sum(dim=1).mean()


def sample_beta(alpha: float, generator: torch.Generator = None) -> torch.Tensor:
    """One draw from Beta(alpha, alpha) as a 0-d float32 tensor on the generator's device (the
    first part of a two-part Dirichlet), seeded from `generator` (or torch's global RNG). It stays
    on the device: reading it on the host would make every mixup step wait for the GPU."""
    device = generator.device if generator is not None else "cpu"
    concentration = torch.full((2,), float(alpha), dtype=torch.float32, device=device)
    return torch._sample_dirichlet(concentration, generator=generator)[0]


def mixup(images: torch.Tensor, targets: torch.Tensor, *, alpha: float, num_classes: int,
          generator: torch.Generator = None) -> tuple:
    """(mixed images, soft targets [N, C] float32); see the module docstring."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be > 0, got {num_classes}")
    soft = _soft_targets(targets, num_classes)
    if alpha <= 0:
        return images, soft
    lam = sample_beta(alpha, generator)
    device = generator.device if generator is not None else "cpu"
    perm = torch.randperm(images.shape[0], generator=generator, device=device)
    perm, lam = perm.to(images.device), lam.to(images.device)
    mixed_images = torch.lerp(images[perm], images, lam.to(images.dtype))
    mixed_targets = torch.lerp(soft[perm.to(soft.device)], soft, lam.to(soft.device))
    return mixed_images, mixed_targets


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, *, temperature: float, weight: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """(1-w)·CE(student, targets) + w·T²·KL(softmax(teacher/T) ‖ softmax(student/T))."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    hard = cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    student_log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)
    return (1.0 - weight) * hard + weight * temperature ** 2 * kl


def _strip_prefixes(state_dict: dict) -> dict:
    """Drop DDP's `module.` and torch.compile's `_orig_mod.` prefixes (in any order, repeated)."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def load_state_dict_file(checkpoint_path) -> dict:
    """The model state dict inside `checkpoint_path`: a raw state dict or {'model': state_dict}.

    Loads with `weights_only=True` first; a checkpoint holding other Python objects (this
    project's own checkpoints keep RNG states) is then unpickled in full, as it is the user's own
    file named on the command line.
    """
    import pickle

    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated file, not a torch file, ...
        raise ValueError(f"cannot read teacher checkpoint {path}: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"teacher checkpoint {path} holds neither a state dict nor a dict "
                         "with a 'model' state dict")
    return _strip_prefixes(obj)


def create_teacher(arch: str, checkpoint_path, num_classes: int, device, *,
                   use_blurpool: bool = False, resnet_d: bool = False) -> torch.nn.Module:
    """Teacher for distillation: `arch` with weights from `checkpoint_path`, eval mode, frozen.

    `use_blurpool` / `resnet_d` must match how the teacher was trained. ffcv-imagenet's constant
    `blur_filter` buffers, if present, are ignored. Missing or unexpected keys, or wrong shapes,
    raise ValueError naming the file.
    """
    from ffcv_imagenet.models import create_model

    state_dict = load_state_dict_file(checkpoint_path)
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("blur_filter")}
    model = create_model(arch, num_classes=num_classes, zero_init_residual=False,
                         use_blurpool=use_blurpool, resnet_d=resnet_d)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"teacher checkpoint {checkpoint_path} does not match {arch} "
                         f"(num_classes={num_classes}): {len(missing)} missing keys "
                         f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"teacher checkpoint {checkpoint_path} does not fit {arch} "
                         f"(num_classes={num_classes}): {exc}") from exc
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
