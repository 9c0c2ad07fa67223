"""Parameter groups and optimizers.

Contract
--------
- `param_groups(model, weight_decay)` returns two groups, `"decay"` then `"no_decay"`. A
  parameter goes to `"no_decay"` when the module that owns it is a normalisation layer (chosen by
  module TYPE: every BatchNorm / SyncBatchNorm / InstanceNorm, GroupNorm, LayerNorm, RMSNorm,
  and their subclasses) or when it is a bias; everything else decays. Every parameter appears
  exactly once, shared parameters included. Choosing by type, not by name, is the point:
  ffcv-imagenet's `'bn' in name` test let torchvision's `downsample.1` BatchNorm decay.
- `create_optimizer(model, name=..., lr=..., ...)` builds SGD (momentum, optional Nesterov),
  AdamW or LAMB over those groups. The engine overwrites every group's `lr` each iteration from
  `schedules.lr_at`; the `lr` given here is only the initial value.
- `Lamb`: Adam moments with bias correction + decoupled weight decay, scaled per parameter
  tensor by the trust ratio ||w|| / ||update|| (You et al. 2019). Groups with
  `layer_adaptation=False` (here the no-decay group: norms and biases) skip the trust ratio.
"""

from typing import Optional

import torch

OPTIMIZERS = ("sgd", "adamw", "lamb")


def norm_layer_types() -> tuple:
    """Module types whose parameters never get weight decay."""
    types = [torch.nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
             torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.LocalResponseNorm]
    if hasattr(torch.nn, "RMSNorm"):
        types.append(torch.nn.RMSNorm)
    return tuple(types)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """[{"name": "decay", ...}, {"name": "no_decay", "weight_decay": 0.0, ...}] for `model`."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    norm_types = norm_layer_types()
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        is_norm = isinstance(module, norm_types)
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if is_norm or param_name == "bias" or param_name.endswith("_bias"):
                no_decay.append(param)
            else:
                decay.append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": float(weight_decay)},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


class Lamb(torch.optim.Optimizer):
    """LAMB: layer-wise adaptive moments (You et al. 2019, "Large Batch Optimization for Deep
    Learning: Training BERT in 76 minutes"), with Adam bias correction.

    Per parameter tensor w with gradient g, at step t:
        m = β1 m + (1 - β1) g;  v = β2 v + (1 - β2) g²
        u = m / (1 - β1^t) / (sqrt(v / (1 - β2^t)) + eps) + weight_decay · w
        r = ||w|| / ||u|| if both norms are > 0 and the group has layer_adaptation, else 1
        w ← w - lr · r · u
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, layer_adaptation: bool = True):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        layer_adaptation=layer_adaptation)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = exp_avg / (1 - beta1 ** t)
                v_hat = exp_avg_sq / (1 - beta2 ** t)
                weights = p.float()
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(weights, alpha=group["weight_decay"])
                trust_ratio = 1.0
                if group["layer_adaptation"]:
                    w_norm = torch.linalg.vector_norm(weights)
                    u_norm = torch.linalg.vector_norm(update)
                    trust_ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                              torch.ones_like(w_norm))
                p.sub_((update * (group["lr"] * trust_ratio)).to(p.dtype))
        return loss


def create_optimizer(model: torch.nn.Module, *, name: str = "sgd", lr: float,
                     momentum: float = 0.9, nesterov: bool = False,
                     weight_decay: float = 5e-5, betas: tuple = (0.9, 0.999),
                     eps: Optional[float] = None) -> torch.optim.Optimizer:
    """Optimizer `name` ('sgd', 'adamw', 'lamb') over `param_groups(model, weight_decay)`.

    `momentum` and `nesterov` are SGD's; `betas` and `eps` are AdamW's and LAMB's (`eps`
    defaults to 1e-8 for AdamW, 1e-6 for LAMB). Nesterov with
    another optimizer is an error rather than silently ignored.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if nesterov and name != "sgd":
        raise ValueError(f"nesterov applies to sgd only, got optimizer {name!r}")
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov needs momentum > 0, got momentum={momentum}")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                               weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8 if eps is None else eps,
                                 weight_decay=weight_decay)
    for group in groups:
        group["layer_adaptation"] = group["name"] == "decay"
    return Lamb(groups, lr=lr, betas=betas, eps=1e-6 if eps is None else eps,
                weight_decay=weight_decay)
