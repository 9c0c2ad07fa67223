"""Model factory: zero-init residual, ResNet-D, BlurPool, Xavier, unknown-arch message."""

import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from ffcv_imagenet.models import (BlurConv2d, BlurPool2d, SimpleSelfAttention, apply_blurpool,
                                  count_parameters, create_model, replace_activation)


def blocks(model):
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def last_bn(block):
    return block.bn3 if isinstance(block, Bottleneck) else block.bn2


@pytest.mark.parametrize("arch, resnet_d", [("resnet18", False), ("resnet50", False),
                                            ("resnet50", True)])
def test_zero_init_residual(arch, resnet_d):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, resnet_d=resnet_d)
    assert blocks(model), "no residual blocks found"
    for block in blocks(model):
        assert torch.count_nonzero(last_bn(block).weight) == 0
    # A fresh model's residual branches output 0: every block is relu(shortcut(x)).
    model.train()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in layer:
                shortcut = block.downsample(x) if block.downsample is not None else x
                out = block(x)
                torch.testing.assert_close(out, torch.relu(shortcut))
                x = out


def test_zero_init_can_be_disabled():
    model = create_model("resnet18", num_classes=10, zero_init_residual=False)
    assert all(torch.all(last_bn(b).weight == 1) for b in blocks(model))


def test_resnet_d_structure_and_forward():
    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=7, resnet_d=True)
    stem_convs = [m for m in model.conv1.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in stem_convs] == [
        (3, 32, (3, 3), (2, 2)), (32, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.conv1.modules()) == 2  # + bn1
    downsamples = [b.downsample for b in blocks(model) if b.downsample is not None]
    assert len(downsamples) == 4
    for ds in downsamples:
        kinds = [type(m) for m in ds]
        conv = ds[-2]
        assert kinds[-2:] == [torch.nn.Conv2d, torch.nn.BatchNorm2d]
        assert conv.kernel_size == (1, 1) and conv.stride == (1, 1)
    strided = [ds for ds in downsamples if isinstance(ds[0], torch.nn.AvgPool2d)]
    assert len(strided) == 3  # layer1's shortcut only changes channels
    for ds in strided:
        pool = ds[0]
        assert pool.kernel_size == 2 and pool.stride == 2
        assert pool.ceil_mode and not pool.count_include_pad
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
        assert model(torch.randn(1, 3, 33, 33)).shape == (1, 7)  # odd sizes: ceil_mode


def test_resnet_d_refuses_non_resnets():
    with pytest.raises(ValueError, match="ResNet"):
        create_model("mobilenet_v2", num_classes=10, resnet_d=True)


def test_blurpool_placement_and_forward():
    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=10, use_blurpool=True)
    wrapped = [m for m in model.modules() if isinstance(m, BlurConv2d)]
    # resnet50 (v1.5): 3 strided 3x3 convs + 3 strided downsample convs; the 3-channel stem is not.
    assert len(wrapped) == 6
    assert isinstance(model.conv1, torch.nn.Conv2d)
    for m in wrapped:
        assert max(m.conv.stride) == 2 and m.blur.channels == m.conv.in_channels
    # the blur filter is a constant: not a parameter and not in the state dict
    assert not any("blur" in k for k in model.state_dict())
    assert any(k.endswith("conv2.conv.weight") for k in model.state_dict())
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_blurpool_with_resnet_d_skips_stride1_shortcuts():
    model = create_model("resnet18", num_classes=10, use_blurpool=True, resnet_d=True)
    wrapped = [m for m in model.modules() if isinstance(m, BlurConv2d)]
    assert len(wrapped) == 3  # only the strided 3x3 convs of layers 2-4


def test_blurpool_blurs():
    blur = BlurPool2d(4)
    const = torch.full((1, 4, 8, 8), 3.0)
    out = blur(const)
    assert out.shape == const.shape
    torch.testing.assert_close(out[..., 1:-1, 1:-1], const[..., 1:-1, 1:-1])  # interior unchanged
    torch.testing.assert_close(BlurPool2d(4, padding_mode="reflect")(const), const)
    # a single bright pixel spreads as [1,2,1]x[1,2,1]/16
    impulse = torch.zeros(1, 4, 5, 5)
    impulse[:, :, 2, 2] = 16.0
    expected = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]])
    torch.testing.assert_close(blur(impulse)[0, 0, 1:4, 1:4], expected)
    assert blur(impulse).sum() == pytest.approx(64.0)


def test_blurpool_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=5, use_blurpool=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_apply_blurpool_is_idempotent():
    model = create_model("resnet18", num_classes=5, use_blurpool=True)
    apply_blurpool(model)
    assert sum(isinstance(m, BlurConv2d) for m in model.modules()) == 6  # 3 convs + 3 shortcuts
    assert not any(isinstance(m.conv, BlurConv2d) for m in model.modules()
                   if isinstance(m, BlurConv2d))


def test_xavier_init():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, xavier_init=True)
    conv = model.layer1[0].conv1  # 64 -> 64, 3x3: bound = sqrt(6 / (576 + 576))
    bound = (6.0 / (64 * 9 + 64 * 9)) ** 0.5
    assert conv.weight.abs().max() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    fc_bound = (6.0 / (512 + 10)) ** 0.5
    assert model.fc.weight.abs().max() <= fc_bound
    assert torch.count_nonzero(model.fc.bias) == 0
    # zero-init residual still applied after Xavier
    assert all(torch.count_nonzero(last_bn(b).weight) == 0 for b in blocks(model))


def test_unknown_arch_message_names_it_and_close_matches():
    with pytest.raises(ValueError) as info:
        create_model("resnet5O")
    message = str(info.value)
    assert "'resnet5O'" in message and "resnet50" in message


def test_other_torchvision_arch_and_parameter_count():
    model = create_model("mobilenet_v3_small", num_classes=10)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert count_parameters(create_model("resnet50")) == 25_557_032  # torchvision's figure


@pytest.mark.parametrize("arch, resnet_d, activation, module",
                         [("resnet18", False, "mish", torch.nn.Mish), ("resnet50", True, "mish", torch.nn.Mish),
                          ("resnet50", True, "silu", torch.nn.SiLU)])
def test_activation_replaces_every_relu(arch, resnet_d, activation, module):
    relu = create_model(arch, num_classes=5, resnet_d=resnet_d)
    n_relu = sum(isinstance(m, torch.nn.ReLU) for m in relu.modules())
    other = create_model(arch, num_classes=5, resnet_d=resnet_d, activation=activation)
    assert not any(isinstance(m, torch.nn.ReLU) for m in other.modules())
    assert sum(isinstance(m, module) for m in other.modules()) == n_relu > 0
    # same weights, different activation: different outputs (a negative pre-activation survives)
    other.load_state_dict(relu.state_dict())
    for m in (relu, other):
        for block in blocks(m):
            torch.nn.init.ones_(last_bn(block).weight)   # undo zero-init so blocks contribute
    x = torch.randn(2, 3, 64, 64)
    relu.eval(), other.eval()
    assert not torch.allclose(relu(x), other(x))
    assert other(x).shape == (2, 5) and torch.isfinite(other(x)).all()


def test_unknown_activation_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="relu, mish, silu"):
        replace_activation(torch.nn.Sequential(torch.nn.ReLU()), "swish")


@pytest.mark.parametrize("size", [32, 33])
def test_max_blur_stem_pool_keeps_the_shape_and_blurs_the_stride_1_max(size):
    plain = create_model("resnet50", num_classes=4, resnet_d=True)
    blurred = create_model("resnet50", num_classes=4, resnet_d=True, stem_pool="maxblur")
    result = blurred.load_state_dict(plain.state_dict())  # strict: no new or missing parameters
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 64, size, size)
    pooled = blurred.maxpool(x)
    assert pooled.shape == plain.maxpool(x).shape == (2, 64, (size + 1) // 2, (size + 1) // 2)
    # by hand at an interior output pixel (i, j): the 3x3 max at stride 1, then the
    # [1,2,1]x[1,2,1]/16 weighted sum around input pixel (2i, 2j)
    m = torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1)
    taps = torch.tensor([1.0, 2.0, 1.0])
    kernel = taps[:, None] * taps[None, :] / 16
    i, j = 3, 5
    expected = (m[:, :, 2 * i - 1:2 * i + 2, 2 * j - 1:2 * j + 2] * kernel).sum(dim=(2, 3))
    torch.testing.assert_close(pooled[:, :, i, j], expected)
    assert not torch.allclose(pooled, plain.maxpool(x))
    blurred.eval()
    assert blurred(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    with pytest.raises(ValueError, match="stem_pool"):
        create_model("resnet18", stem_pool="avg")
    with pytest.raises(ValueError, match="ResNets only"):
        create_model("mobilenet_v3_small", stem_pool="maxblur")


@pytest.mark.parametrize("h, w, order", [(4, 5, "auto"), (2, 2, "auto"),   # N = 20 > C = 6; N = 4
                                         (4, 5, "weight_input"), (2, 2, "gram_weight")])
def test_simple_self_attention_by_hand(h, w, order):
    torch.manual_seed(0)
    layer = SimpleSelfAttention(6, order=order)
    x = torch.randn(2, 6, h, w)
    torch.testing.assert_close(layer(x), x)          # gamma starts at 0: the identity
    with torch.no_grad():
        layer.gamma.fill_(0.3)
    layer.eval()                                     # no power iteration: a fixed W
    weight = layer.proj.weight.detach()
    assert torch.linalg.matrix_norm(weight, ord=2).item() == pytest.approx(1.0, rel=0.05)

    def by_hand(x):
        flat = x.reshape(2, 6, h * w)
        out = torch.stack([flat[b] @ flat[b].T @ (weight @ flat[b]) for b in range(2)])
        return x + 0.3 * out.reshape(2, 6, h, w)

    x.requires_grad_(True)
    out = layer(x)
    torch.testing.assert_close(out, by_hand(x))
    # the gradient reaching the input, through both X X^T and W X, matches the formula's
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, upstream)
    (expected_grad,) = torch.autograd.grad(by_hand(x), x, upstream)
    torch.testing.assert_close(grad, expected_grad)
    x = x.detach()
    # channels-last input, bf16 autocast: the same figures to bf16 precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out.float(), layer(x), rtol=2e-2, atol=2e-2)


def test_self_attention_auto_order_multiplies_w_by_the_smaller_operand(monkeypatch):
    """order="auto": W meets the C x C Gram matrix when positions outnumber channels (N > C), and
    the C x N input otherwise; an unknown order is refused by name."""
    layer = SimpleSelfAttention(8)
    shapes = []
    matmul = torch.matmul

    def recording(a, b):
        shapes.append(tuple(b.shape[-2:]))
        return matmul(a, b)

    monkeypatch.setattr(torch, "matmul", recording)
    layer(torch.randn(2, 8, 4, 4))                   # N = 16 > 8: (X X^T) W
    layer(torch.randn(2, 8, 2, 2))                   # N = 4 <= 8: W X
    assert shapes == [(8, 8), (8, 4)]
    with pytest.raises(ValueError, match="'fast'.*auto, gram_weight, weight_input"):
        SimpleSelfAttention(8, order="fast")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_self_attention_sits_on_the_first_stages_last_branch(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=4, resnet_d=True, self_attention=True)
    found = [name for name, m in model.named_modules() if isinstance(m, SimpleSelfAttention)]
    last = len(model.layer1) - 1
    assert found == [f"layer1.{last}.{'bn3' if arch == 'resnet50' else 'bn2'}.1"]
    assert count_parameters(model) == count_parameters(create_model(arch, num_classes=4, resnet_d=True)) \
        + 1 + model.layer1[-1].conv1.in_channels ** 2
    # it learns: gamma and W get gradients once the branch is non-zero
    for block in blocks(model):
        torch.nn.init.ones_(last_bn(block)[0].weight if block is model.layer1[-1] else last_bn(block).weight)
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    sa = model.get_submodule(found[0])
    assert sa.gamma.grad is not None and sa.gamma.grad.abs() > 0
    with pytest.raises(ValueError, match="ResNets only"):
        create_model("mobilenet_v3_small", self_attention=True)


def test_zero_init_and_self_attention_compose():
    """zero_init_last_bn after apply_self_attention still finds every branch's last BN; a second
    apply_self_attention is refused rather than nesting a wrapper."""
    from ffcv_imagenet.models import apply_self_attention, zero_init_last_bn

    model = create_model("resnet18", num_classes=4, zero_init_residual=False, self_attention=True)
    for block in blocks(model):
        bn = last_bn(block)
        (bn[0] if block is model.layer1[-1] else bn).weight.data.fill_(1.0)
    assert zero_init_last_bn(model) == len(blocks(model))
    assert model.layer1[-1].bn2[0].weight.abs().sum() == 0
    with pytest.raises(ValueError, match="already has Sequential as bn2"):
        apply_self_attention(model)


def _mish_pair(x, grad):
    """(output, input gradient) of FastMish and of torch's Mish for the same input and gradient."""
    from ffcv_imagenet.models import FastMish

    results = []
    for module in (FastMish(), torch.nn.Mish()):
        leaf = x.detach().clone().requires_grad_(True)
        out = module(leaf)
        out.backward(grad)
        results.append((out, leaf.grad))
    return results


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_mish_matches_torch_mish(layout, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7) * 6
    x[0, 0, 0, :5] = torch.tensor([-100.0, -30.0, 0.0, 25.0, 100.0])   # both tails and the clamp
    grad = torch.randn(2, 6, 5, 7)
    if layout == "channels_last":
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    elif layout == "transposed":                         # neither layout: copied, still right
        x, grad = x.transpose(2, 3), grad.transpose(2, 3)
    x, grad = x.to(dtype), grad.to(dtype)
    (fast_out, fast_grad), (ref_out, ref_grad) = _mish_pair(x, grad)
    from ffcv_imagenet import models
    assert models._MISH_KERNELS["fwd"] is not None, "the compiled path was not taken"
    assert fast_out.dtype == fast_grad.dtype == dtype and fast_out.shape == x.shape
    # bf16: the same values as torch's kernel, bit for bit (as the README says); fp32: within rounding
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=0)
    torch.testing.assert_close(fast_out, ref_out, **tol)
    torch.testing.assert_close(fast_grad, ref_grad, **tol)
    if layout == "channels_last":                        # the layout a channels-last model needs
        assert fast_out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(fast_out).all() and torch.isfinite(fast_grad).all()


def test_fast_mish_falls_back_to_torch_when_compiling_fails(monkeypatch):
    from ffcv_imagenet import models

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(models, "_MISH_KERNELS", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.randn(3, 4, 5, 5)
    with pytest.warns(UserWarning, match="torch.compile failed .*no C compiler"):
        out = models.FastMish()(x)
    assert torch.equal(out, torch.nn.functional.mish(x))
    assert models._MISH_KERNELS == {"fwd": None, "bwd": None}


def test_mish_model_trains_with_fast_mish_under_bf16_autocast():
    from ffcv_imagenet.models import FastMish

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=4, resnet_d=True, activation="mish")
    assert sum(isinstance(m, FastMish) for m in model.modules()) > 0
    model = model.to(memory_format=torch.channels_last)
    for block in blocks(model):
        torch.nn.init.ones_(last_bn(block).weight)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.conv1[0].weight.grad.abs().sum() > 0     # the gradient reached the stem


def test_fast_mish_is_torch_mish_in_deterministic_mode(monkeypatch):
    # Reproducible runs keep torch's kernel: a compiled kernel's vector lanes and scalar tail
    # round exp differently, and which elements fall where depends on how it was specialised.
    from ffcv_imagenet import models

    def no_kernel(which):
        raise AssertionError("the compiled kernel was asked for in deterministic mode")

    x = torch.randn(2, 3, 7, 7) * 4
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        monkeypatch.setattr(models, "_mish_kernel", no_kernel)
        assert torch.equal(models.FastMish()(x), torch.nn.functional.mish(x))
    finally:
        torch.use_deterministic_algorithms(before)
