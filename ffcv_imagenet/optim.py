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
  AdamW, RAdam (decoupled weight decay) or LAMB over those groups, optionally wrapped in
  `Lookahead` (`lookahead_steps > 0`; RAdam + Lookahead is fast.ai's "Ranger"). The engine
  overwrites every group's `lr` each iteration from `schedules.lr_at`; the `lr` given here is
  only the initial value.
- `Lamb`: Adam moments with bias correction + decoupled weight decay, scaled per parameter
  tensor by the trust ratio ||w|| / ||update|| (You et al. 2019). Groups with
  `layer_adaptation=False` (here the no-decay group: norms and biases) skip the trust ratio.
- `Lookahead(base, steps=k, alpha=a)` (Zhang et al. 2019): every k steps of `base`, the slow
  weights move `a` of the way to the fast ones and the fast weights restart from them. It shares
  `base.param_groups` (so the engine's lr updates reach `base`, also after a resume) and its
  `state_dict` holds the slow weights and the step count, so resuming continues the same k-step
  cycle.
- `WeightEMA(model, decay)`: an exponential moving average of the weights (and BatchNorm
  statistics), which the engine evaluates instead of the model when `training.ema_decay > 0`.
"""

from typing import Optional

import torch

OPTIMIZERS = ("sgd", "adamw", "radam", "lamb")


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


class Lookahead:
    """Lookahead around any torch optimizer: k fast steps, then slow += alpha * (fast - slow)."""

    def __init__(self, base: torch.optim.Optimizer, *, steps: int = 6, alpha: float = 0.5):
        if steps < 1:
            raise ValueError(f"lookahead steps must be >= 1, got {steps}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"lookahead alpha must be in (0, 1], got {alpha}")
        self.base, self.steps, self.alpha = base, int(steps), float(alpha)
        self.counter = 0
        self.slow = [p.detach().clone() for group in base.param_groups for p in group["params"]]

    # Properties, not copies: torch's Optimizer.load_state_dict replaces base.param_groups with a
    # new list, and the engine's lr updates must reach the list the base optimizer steps with.
    @property
    def param_groups(self) -> list:
        return self.base.param_groups

    @property
    def defaults(self) -> dict:
        return self.base.defaults

    @property
    def state(self):
        return self.base.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.base.step(closure)
        self.counter += 1
        if self.counter % self.steps == 0:
            params = [p for group in self.param_groups for p in group["params"]]
            # slow += alpha (fast - slow); fast = slow, over all tensors at once
            torch._foreach_lerp_(self.slow, [p.detach().to(s.dtype) for p, s in zip(params, self.slow)],
                                 self.alpha)
            torch._foreach_copy_(params, self.slow)
        return loss

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "lookahead": {
            "counter": self.counter, "steps": self.steps, "alpha": self.alpha,
            "slow": [t.clone() for t in self.slow]}}

    def load_state_dict(self, state_dict: dict) -> None:
        if "lookahead" not in state_dict:
            raise ValueError("optimizer state has no Lookahead part: the checkpoint was written "
                             "without training.lookahead_steps; resume with the same optimizer")
        look = state_dict["lookahead"]
        if len(look["slow"]) != len(self.slow):
            raise ValueError(f"Lookahead state has {len(look['slow'])} slow tensors, the model "
                             f"{len(self.slow)}")
        self.base.load_state_dict(state_dict["base"])
        self.counter = int(look["counter"])
        for mine, saved in zip(self.slow, look["slow"]):
            mine.copy_(saved)


class WeightEMA:
    """Exponential moving average of a model's weights, for evaluation.

    `module` is a frozen copy of `model`; `update()` (after each optimizer step) moves every
    floating-point parameter and buffer of the copy towards the model's:
    ema = d * ema + (1 - d) * weight, with d = min(decay, (1 + n) / (10 + n)) at the n-th update,
    so the early average is not dominated by the random initial weights. BatchNorm running
    statistics are averaged like the weights; integer buffers (BatchNorm's batch counters) are
    copied. The copy keeps the model's device and memory format.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(zip(self._tensors(self.module), self._tensors(model)))
        self._floats = ([e for e, m in pairs if e.is_floating_point()],
                        [m for e, m in pairs if e.is_floating_point()])
        self._others = [(e, m) for e, m in pairs if not e.is_floating_point()]

    @staticmethod
    def _tensors(model) -> list:
        return [t for t in model.parameters()] + [t for t in model.buffers()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema, weights = self._floats
        torch._foreach_lerp_(ema, [w.detach() for w in weights], 1.0 - decay)
        for e, m in self._others:
            e.copy_(m)

    @torch.no_grad()
    def broadcast(self, src: int = 0) -> None:
        """Make every process's average rank `src`'s. Each process averages its own model, whose
        BatchNorm running statistics come from its own micro-batches (DDP broadcasts the model's
        buffers from rank 0 only at the next forward), so the averages drift apart per rank; call
        before evaluating, which every rank does on its part of the val set. No-op in one
        process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for tensor in self._tensors(self.module):
                dist.broadcast(tensor, src=src)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.updates = int(state_dict["updates"])
        self.module.load_state_dict(state_dict["module"])


def kernel_options(model: torch.nn.Module) -> dict:
    """`fused=True` for parameters on CUDA (one kernel per step; and GradScaler hands a fused
    optimizer its inf check as a tensor, where with `foreach` it reads `found_inf.item()`, a host
    sync every step), else `foreach=True` (the CPU, where fused kernels are not in every release
    the project admits)."""
    on_cuda = any(p.is_cuda for p in model.parameters())
    return {"fused": True} if on_cuda else {"foreach": True}


def create_optimizer(model: torch.nn.Module, *, name: str = "sgd", lr: float,
                     momentum: float = 0.9, nesterov: bool = False,
                     weight_decay: float = 5e-5, betas: tuple = (0.9, 0.999),
                     eps: Optional[float] = None, lookahead_steps: int = 0,
                     lookahead_alpha: float = 0.5):
    """Optimizer `name` ('sgd', 'adamw', 'radam', 'lamb') over `param_groups(model, weight_decay)`.

    `momentum` and `nesterov` are SGD's; `betas` and `eps` are AdamW's, RAdam's and LAMB's
    (`eps` defaults to 1e-8 for AdamW and RAdam, 1e-6 for LAMB); RAdam's weight decay is
    decoupled, as AdamW's. Nesterov with another optimizer is an error rather than silently
    ignored. `lookahead_steps` > 0 wraps the result in `Lookahead(steps, alpha)`.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if nesterov and name != "sgd":
        raise ValueError(f"nesterov applies to sgd only, got optimizer {name!r}")
    if lookahead_steps < 0:
        raise ValueError(f"lookahead_steps must be >= 0, got {lookahead_steps}")
    groups = param_groups(model, weight_decay)
    kernels = kernel_options(model)
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov needs momentum > 0, got momentum={momentum}")
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                              weight_decay=weight_decay, **kernels)
    elif name == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8 if eps is None else eps,
                                weight_decay=weight_decay, **kernels)
    elif name == "radam":  # no fused RAdam in torch: foreach (fp16 then reads found_inf per step)
        opt = torch.optim.RAdam(groups, lr=lr, betas=betas, eps=1e-8 if eps is None else eps,
                                weight_decay=weight_decay, decoupled_weight_decay=True, foreach=True)
    else:
        for group in groups:
            group["layer_adaptation"] = group["name"] == "decay"
        opt = Lamb(groups, lr=lr, betas=betas, eps=1e-6 if eps is None else eps,
                   weight_decay=weight_decay)
    if lookahead_steps:
        return Lookahead(opt, steps=lookahead_steps, alpha=lookahead_alpha)
    return opt
