"""Model factory: any torchvision classification architecture, plus the recipe's tweaks.

Contract
--------
`create_model(arch, num_classes=..., zero_init_residual=..., use_blurpool=..., resnet_d=...,
xavier_init=...)` builds a randomly initialised torchvision model (never downloads weights) and
applies, in this order:

1. ResNet-D ("Bag of Tricks", He et al. 2019; ResNets only): the 7x7 stem conv becomes three 3x3
   convs (3->32 stride 2, 32->32, 32->64), each followed by BN + ReLU (the last ReLU is the
   original stem's); every downsampling shortcut becomes AvgPool2d(2, stride 2, ceil_mode=True,
   count_include_pad=False) -> 1x1 conv stride 1 -> BN. New layers get torchvision's ResNet
   initialisation (Kaiming normal, fan_out).
2. Xavier init (optional): xavier_uniform_ on every Conv/Linear weight, their biases zeroed.
3. Zero-init residual (default on): the γ of the last BN of every residual branch
   (BasicBlock.bn2, Bottleneck.bn3) is set to 0, so each block starts as the identity
   (Goyal et al. 2017). Other architectures are left unchanged by this flag.
4. BlurPool (optional), as ffcv-imagenet applies it: every Conv2d with stride > 1 and at least 16
   input channels is preceded by a fixed depthwise [1,2,1]x[1,2,1]/16 blur (stride 1, zero
   padding 1). The 3-channel stem conv is left alone, as is every 1x1 shortcut conv that
   ResNet-D turned to stride 1. The wrapper keeps ffcv-imagenet's attribute name `conv`, so the
   conv weights of a BlurPool model are stored as `<name>.conv.weight` in both projects; the
   blur filter is a constant and is not saved in state dicts.
5. Activation (optional): every ReLU module becomes Mish or SiLU. On the CPU, Mish runs as two
   compiled one-exp kernels (`FastMish`, same values as torch's to float rounding; `ffcv-imagenet
   bench` measures the training speed against torch's kernel); elsewhere it is torch's own.
6. Max-blur stem pool (optional, ResNets only): the stem's MaxPool2d(3, stride 2) becomes
   MaxPool2d(3, stride 1) followed by a stride-2 binomial blur (Zhang 2019, "Making convolutional
   networks shift-invariant again"); same output size, no parameters.
7. Self-attention (optional, ResNets only): the last block of the first stage gets a
   `SimpleSelfAttention` (Grankin 2019) on its residual branch, after the branch's last BN and
   before the addition. With gamma initialised to 0 it starts as the identity.

`count_parameters(model)` counts trainable parameters.
"""

import difflib

import torch
import torch.nn.functional as F


class BlurPool2d(torch.nn.Module):
    """Fixed depthwise 3x3 binomial blur ([1,2,1]x[1,2,1]/16), padding 1.

    Stride 1 (the default) keeps the spatial size; stride 2 halves it (rounding up), which is
    the blur-then-subsample half of Zhang's anti-aliased pooling. `padding_mode` is 'zeros'
    (ffcv-imagenet's choice) or 'reflect' / 'replicate'. Works with channels-last inputs (a
    grouped conv keeps the memory format).
    """

    def __init__(self, channels: int, padding_mode: str = "zeros", stride: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.stride = stride
        if padding_mode not in ("zeros", "reflect", "replicate"):
            raise ValueError(f"padding_mode must be 'zeros', 'reflect' or 'replicate', "
                             f"got {padding_mode!r}")
        self.channels = channels
        self.padding_mode = padding_mode
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16.0
        # Constant: not a parameter, not saved (persistent=False), moved by .to() like any buffer.
        self.register_buffer("filter", kernel.expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.filter.to(dtype=x.dtype)
        if self.padding_mode == "zeros":
            return F.conv2d(x, weight, stride=self.stride, padding=1, groups=self.channels)
        padded = F.pad(x, (1, 1, 1, 1), mode=self.padding_mode)
        return F.conv2d(padded, weight, stride=self.stride, padding=0, groups=self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, padding_mode={self.padding_mode!r}, stride={self.stride}"


class BlurConv2d(torch.nn.Module):
    """`BlurPool2d(conv.in_channels)` followed by the wrapped strided `conv`."""

    def __init__(self, conv: torch.nn.Conv2d, padding_mode: str = "zeros"):
        super().__init__()
        self.blur = BlurPool2d(conv.in_channels, padding_mode=padding_mode)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.blur(x))


def apply_blurpool(model: torch.nn.Module, *, min_in_channels: int = 16,
                   padding_mode: str = "zeros") -> torch.nn.Module:
    """Wrap, in place, every Conv2d with stride > 1 and >= `min_in_channels` inputs in a BlurConv2d.

    Returns `model` for chaining. Already-wrapped convs are not wrapped twice.
    """
    for name, child in model.named_children():
        if isinstance(child, BlurConv2d):
            continue
        if (isinstance(child, torch.nn.Conv2d) and max(child.stride) > 1
                and child.in_channels >= min_in_channels):
            setattr(model, name, BlurConv2d(child, padding_mode=padding_mode))
        else:
            apply_blurpool(child, min_in_channels=min_in_channels, padding_mode=padding_mode)
    return model


class SimpleSelfAttention(torch.nn.Module):
    """out = x + gamma * (X X^T) (W X), X = x as (batch, C, H*W), W a 1x1 projection.

    Attention without a softmax whose cost is linear in the number of positions (C x C products),
    as in Grankin's "SimpleSelfAttention". W is spectrally normalised (its largest singular value
    held at 1 by torch's power-iteration parametrization) and gamma, a learned scalar, starts at
    0, so the layer is the identity at initialisation. The products run in float32 even under
    autocast: X X^T sums H*W products per entry.

    With N = H*W positions, (X X^T W) X costs 2C^2N + C^3 multiply-adds forward and 3C^2N + 2C^3
    backward, against 3C^2N and 5C^2N for (X X^T)(W X): cheaper whenever N > C. ResNet-50's first
    stage has C = 256 and N = 1024 at 128 px (576 at 96 px). order="auto" takes the cheaper one
    for each input; "gram_weight" ((X X^T W) X) and "weight_input" ((X X^T)(W X)) force one, for
    `ffcv-imagenet bench`.
    """

    ORDERS = ("auto", "gram_weight", "weight_input")

    def __init__(self, channels: int, order: str = "auto"):
        super().__init__()
        if order not in self.ORDERS:
            raise ValueError(f"SimpleSelfAttention: order {order!r} is not one of {', '.join(self.ORDERS)}")
        self.order = order
        proj = torch.nn.Linear(channels, channels, bias=False)
        torch.nn.init.kaiming_normal_(proj.weight, nonlinearity="linear")
        self.proj = torch.nn.utils.parametrizations.spectral_norm(proj)
        self.gamma = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = x.float().reshape(b, c, h * w)                       # (B, C, N)
            weight = self.proj.weight.float()                           # W: (C, C)
            gram = torch.bmm(flat, flat.transpose(1, 2))                # X X^T: (B, C, C)
            order = self.order if self.order != "auto" else ("gram_weight" if h * w > c else "weight_input")
            if order == "gram_weight":
                attended = torch.bmm(torch.matmul(gram, weight), flat)  # (X X^T W) X
            else:
                attended = torch.bmm(gram, torch.matmul(weight, flat))  # (X X^T)(W X)
            attended = attended.reshape(b, c, h, w)
        return x + (self.gamma * attended).to(x.dtype)


def _mish_forward(x: torch.Tensor) -> torch.Tensor:
    # tanh(softplus(x)) = n / (n + 2) with n = e^x (e^x + 2): one exp instead of exp, log1p, tanh.
    # Above 20 the ratio is 1 to float precision (and e^2x would overflow).
    xf = x.float()
    e = torch.exp(xf.clamp(max=20.0))
    n = e * (e + 2.0)
    return (xf * n / (n + 2.0)).to(x.dtype)


def _mish_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # d/dx x tanh(sp(x)) = t + x (1 - t^2) sigmoid(x), t = tanh(sp(x)), sigmoid(x) = e / (e + 1).
    xf = x.float()
    e = torch.exp(xf.clamp(max=20.0))
    n = e * (e + 2.0)
    t = n / (n + 2.0)
    return (grad.float() * (t + xf * (1.0 - t * t) * (e / (e + 1.0)))).to(grad.dtype)


_MISH_KERNELS = {}      # "fwd"/"bwd" -> compiled function, or None once compiling has failed


def _mish_kernel(which: str):
    """The compiled (torch.compile, dynamic shapes) forward or backward, built on first use.

    A failure to compile (no C compiler, say) is reported once and Mish falls back to torch's.
    """
    if which not in _MISH_KERNELS:
        fn = {"fwd": _mish_forward, "bwd": _mish_backward}[which]
        try:
            # One kernel serves every size (dynamic shapes). Inductor would decide from the first
            # call's size whether to split the loop over threads, and cache that choice on disk
            # for every later size and process: a first small call would leave training on one
            # core. These options make every kernel parallel, with OpenMP's thread count read
            # at run time (torch.set_num_threads), whatever size it was compiled for.
            compiled = torch.compile(fn, dynamic=True,
                                     options={"cpp.min_chunk_size": 1, "cpp.dynamic_threads": True})
            compiled(torch.zeros(4), *((torch.zeros(4),) if which == "bwd" else ()))
            _MISH_KERNELS[which] = compiled
        except Exception as exc:   # compile errors come in many types; the fallback is exact
            import warnings

            warnings.warn(f"FastMish: torch.compile failed ({type(exc).__name__}: {exc}); "
                          "using torch's Mish")
            _MISH_KERNELS["fwd"] = _MISH_KERNELS["bwd"] = None
    return _MISH_KERNELS[which]


def _layout(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _flat(t: torch.Tensor) -> tuple:
    """A 1-D view of `t`'s elements in memory order, and how to put a same-sized 1-D result back.

    Contiguous and channels-last tensors are viewed without a copy, so the compiled kernels
    only ever see 1-D contiguous inputs (no recompiling per shape or layout).
    """
    if _layout(t) == torch.channels_last:
        nhwc = t.permute(0, 2, 3, 1)
        return nhwc.reshape(-1), lambda r: r.view(nhwc.shape).permute(0, 3, 1, 2)
    c = t.contiguous()
    return c.view(-1), lambda r: r.view(c.shape)


class _MishFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        flat, back = _flat(x)
        return back(_mish_kernel("fwd")(flat))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        flat_x, back = _flat(x)
        # lay the gradient out as x is, so that both flatten to the same element order
        flat_g, _ = _flat(grad.contiguous(memory_format=_layout(x)))
        return back(_mish_kernel("bwd")(flat_x, flat_g))


class FastMish(torch.nn.Mish):
    """torch.nn.Mish whose CPU forward and backward are compiled one-exp kernels.

    Mish, x tanh(softplus(x)) (Misra 2019), costs a third of a ResNet-50 training step on a CPU
    with torch's kernel. The compiled pair computes in float32 and returns the input's dtype;
    values match torch's to float rounding. On the CPU it never works in place (the input is
    saved for the backward, as torch's out-of-place Mish does). On other devices, for other
    dtypes, in deterministic mode or when compiling fails, it is torch's Mish.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bitwise-reproducible runs (torch.use_deterministic_algorithms, the engine's
        # training.deterministic) keep torch's kernel: which elements the compiled kernel
        # computes in vector lanes and which in its scalar tail depends on how the kernel was
        # specialised in that process, and the two round exp differently in the last bit.
        if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16)
                or torch.are_deterministic_algorithms_enabled() or _mish_kernel("fwd") is None):
            return F.mish(x, inplace=self.inplace)
        return _MishFunction.apply(x)


def _last_bn_name(block: torch.nn.Module):
    """Attribute name of the last BN of a torchvision residual block's branch, None for other modules."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return "bn3" if isinstance(block, Bottleneck) else "bn2" if isinstance(block, BasicBlock) else None


def apply_max_blur_pool(model: torch.nn.Module) -> torch.nn.Module:
    """Replace a torchvision ResNet's stem MaxPool2d(3, 2, 1) with max (stride 1) + blur (stride 2)."""
    import torchvision

    if not isinstance(model, torchvision.models.ResNet):
        raise ValueError(f"stem_pool=maxblur applies to torchvision ResNets only, got {type(model).__name__}")
    channels = model.layer1[0].conv1.in_channels
    model.maxpool = torch.nn.Sequential(torch.nn.MaxPool2d(3, stride=1, padding=1),
                                        BlurPool2d(channels, stride=2))
    return model


def apply_self_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Put a SimpleSelfAttention on the residual branch of the last block of `model.layer1`."""
    import torchvision

    if not isinstance(model, torchvision.models.ResNet):
        raise ValueError(f"self_attention applies to torchvision ResNets only, got {type(model).__name__}")
    block = model.layer1[-1]
    name = _last_bn_name(block)
    bn = getattr(block, name)
    if not isinstance(bn, torch.nn.BatchNorm2d):
        raise ValueError(f"self_attention: layer1's last block already has {type(bn).__name__} "
                         f"as {name}; apply self-attention once, before any other change to that branch")
    setattr(block, name, torch.nn.Sequential(bn, SimpleSelfAttention(bn.num_features)))
    return model


def available_models() -> list:
    """Names of torchvision's classification architectures."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def unknown_arch_hint(arch: str):
    """None when torchvision has `arch`; otherwise '; did you mean ...?' (or '' without a close name)."""
    names = available_models()
    if arch in names:
        return None
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _kaiming_init_(module: torch.nn.Module) -> None:
    """torchvision's ResNet initialisation for layers this module adds."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int, norm_layer, relu: bool = True) -> list:
    layers = [torch.nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
              norm_layer(out_ch)]
    if relu:
        layers.append(torch.nn.ReLU(inplace=True))
    return layers


def apply_resnet_d(model: torch.nn.Module) -> torch.nn.Module:
    """Turn a torchvision ResNet into ResNet-D in place (deep stem, avg-pool shortcuts).

    The stem conv `model.conv1` becomes Sequential(3x3 s2 3->32, BN, ReLU, 3x3 32->32, BN, ReLU,
    3x3 32->64); the existing `model.bn1`/`model.relu` follow it, as in the paper. Each
    `downsample` becomes Sequential(AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
    1x1 conv stride 1, BN). ValueError for any other architecture.
    """
    import torchvision

    if not isinstance(model, torchvision.models.ResNet):
        raise ValueError("resnet_d applies to torchvision ResNets only, "
                         f"got {type(model).__name__}")
    norm_layer = type(model.bn1)
    stem_out = model.conv1.out_channels  # 64 for every torchvision ResNet
    stem_mid = stem_out // 2
    stem = torch.nn.Sequential(
        *_conv_bn_relu(model.conv1.in_channels, stem_mid, 2, norm_layer),
        *_conv_bn_relu(stem_mid, stem_mid, 1, norm_layer),
        torch.nn.Conv2d(stem_mid, stem_out, 3, stride=1, padding=1, bias=False),
    )
    _kaiming_init_(stem)
    model.conv1 = stem

    for module in list(model.modules()):
        downsample = getattr(module, "downsample", None)
        if not isinstance(downsample, torch.nn.Sequential):
            continue
        conv, bn = downsample[0], downsample[1]
        stride = conv.stride[0]
        layers = []
        if stride > 1:
            layers.append(torch.nn.AvgPool2d(stride, stride=stride, ceil_mode=True,
                                             count_include_pad=False))
        new_conv = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=1, bias=False)
        new_bn = type(bn)(bn.num_features)
        layers += [new_conv, new_bn]
        new_downsample = torch.nn.Sequential(*layers)
        _kaiming_init_(new_downsample)
        module.downsample = new_downsample
    return model


def apply_xavier_init(model: torch.nn.Module) -> torch.nn.Module:
    """xavier_uniform_ on every Conv/Linear weight and zero their biases, in place."""
    for m in model.modules():
        if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    return model


def zero_init_last_bn(model: torch.nn.Module) -> int:
    """Set γ of the last BN of every ResNet residual branch to 0, in place; returns how many."""
    count = 0
    for m in model.modules():
        name = _last_bn_name(m)
        bn = getattr(m, name) if name else None
        if isinstance(bn, torch.nn.Sequential):     # (BN, self-attention) from apply_self_attention
            bn = bn[0]
        if bn is not None and bn.weight is not None:
            torch.nn.init.zeros_(bn.weight)
            count += 1
    return count


def create_model(arch: str, *, num_classes: int = 1000, zero_init_residual: bool = True,
                 use_blurpool: bool = False, resnet_d: bool = False,
                 xavier_init: bool = False, activation: str = "relu",
                 blurpool_padding_mode: str = "zeros", stem_pool: str = "max",
                 self_attention: bool = False) -> torch.nn.Module:
    """A randomly initialised torchvision classification model `arch` with the recipe's tweaks.

    Unknown `arch` -> ValueError naming it and the closest valid names. Never downloads weights.
    """
    import torchvision

    hint = unknown_arch_hint(arch)
    if hint is not None:
        raise ValueError(f"unknown model.arch {arch!r}{hint} (torchvision has "
                         f"{len(available_models())} classification models, see "
                         "torchvision.models.list_models())")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be > 0, got {num_classes}")

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if resnet_d:
        apply_resnet_d(model)
    if xavier_init:
        apply_xavier_init(model)
    if zero_init_residual:
        zero_init_last_bn(model)
    if use_blurpool:
        apply_blurpool(model, padding_mode=blurpool_padding_mode)
    if activation != "relu":
        replace_activation(model, activation)
    if stem_pool not in STEM_POOLS:
        raise ValueError(f"stem_pool must be one of {STEM_POOLS}, got {stem_pool!r}")
    if stem_pool == "maxblur":
        apply_max_blur_pool(model)
    if self_attention:
        apply_self_attention(model)
    return model


STEM_POOLS = ("max", "maxblur")  # create_model's stem_pool


def architecture_options(model_cfg: dict, use_blurpool: bool) -> dict:
    """create_model's keyword arguments that shape the network (not how it is initialised), from
    a config's `model` section and training.use_blurpool: what train builds and export records.
    Configs saved before a key existed lack it; they get the default it had then."""
    return {"resnet_d": bool(model_cfg["resnet_d"]), "use_blurpool": bool(use_blurpool),
            "activation": model_cfg.get("activation", "relu"),
            "stem_pool": model_cfg.get("stem_pool", "max"),
            "self_attention": bool(model_cfg.get("self_attention", False))}
ACTIVATIONS = {"relu": torch.nn.ReLU, "mish": FastMish, "silu": torch.nn.SiLU}


def replace_activation(model: torch.nn.Module, activation: str) -> int:
    """Swap every ReLU module of `model` for `activation` (in place); returns how many.

    torchvision's ResNets call their `relu` modules (a Bottleneck reuses one three times), so
    swapping the modules swaps every activation; a model that calls F.relu directly would keep
    those, which is why the count is returned (and tested).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    count = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is torch.nn.ReLU:
                setattr(parent, name, ACTIVATIONS[activation](inplace=child.inplace))
                count += 1
    return count


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, shared ones counted once."""
    seen = {}
    for p in model.parameters():
        if p.requires_grad or not trainable_only:
            seen[id(p)] = p.numel()
    return sum(seen.values())
