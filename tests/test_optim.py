"""Parameter groups (no decay on any norm parameter or bias, by module type) and optimizers."""

import pytest
import torch

from ffcv_imagenet.models import create_model
from ffcv_imagenet.optim import Lamb, create_optimizer, param_groups


def expected_no_decay_ids(model):
    """Every parameter of every BatchNorm module, and every bias, found independently by type."""
    ids = set()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            ids |= {id(p) for p in module.parameters(recurse=False)}
        if getattr(module, "bias", None) is not None:
            ids.add(id(module.bias))
    return ids


@pytest.mark.parametrize("arch, resnet_d, blurpool", [
    ("resnet18", False, False), ("resnet18", True, True), ("resnet50", False, True),
    ("resnet50", True, False)])
def test_no_decay_group_is_every_bn_and_bias(arch, resnet_d, blurpool):
    model = create_model(arch, num_classes=10, resnet_d=resnet_d, use_blurpool=blurpool)
    groups = param_groups(model, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert by_name["decay"]["weight_decay"] == 1e-4 and by_name["no_decay"]["weight_decay"] == 0.0
    decay_ids = {id(p) for p in by_name["decay"]["params"]}
    no_decay_ids = {id(p) for p in by_name["no_decay"]["params"]}

    # each parameter exactly once
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(model.parameters()))

    assert no_decay_ids == expected_no_decay_ids(model)
    # decay = conv and linear weights only
    weight_ids = {id(m.weight) for m in model.modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert decay_ids == weight_ids

    # the reference recipe's defect: the downsample BN (named `downsample.1` or `.2`, no "bn")
    downsample_bns = [m for name, m in model.named_modules()
                      if "downsample" in name and isinstance(m, torch.nn.BatchNorm2d)]
    assert downsample_bns
    for bn in downsample_bns:
        assert id(bn.weight) in no_decay_ids and id(bn.bias) in no_decay_ids


def test_other_norm_types_and_shared_parameters():
    linear = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4),
                                torch.nn.Flatten(), torch.nn.LayerNorm(4), linear, linear)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    decay = {id(p) for p in groups["decay"]["params"]}
    assert no_decay == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                        id(model[3].weight), id(model[3].bias), id(linear.bias)}
    assert decay == {id(model[0].weight), id(linear.weight)}
    assert sum(len(g["params"]) for g in groups.values()) == 8


def test_sgd_settings():
    model = create_model("resnet18", num_classes=10)
    opt = create_optimizer(model, lr=0.5, momentum=0.9, nesterov=True, weight_decay=5e-5)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-5, 0.0]
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["lr"] == 0.5
               for g in opt.param_groups)


def test_unknown_optimizer_and_bad_combinations():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'adam'.*sgd, adamw, lamb"):
        create_optimizer(model, name="adam", lr=0.1)
    with pytest.raises(ValueError, match="nesterov"):
        create_optimizer(model, name="adamw", lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        create_optimizer(model, lr=0.1, momentum=0.0, nesterov=True)


def regression_problem():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    true_w = torch.randn(8, 3)
    y = x @ true_w + 0.5
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return model, x, y


@pytest.mark.parametrize("name, lr", [("sgd", 0.05), ("adamw", 0.01), ("lamb", 0.05)])
def test_optimizer_reduces_a_simple_loss(name, lr):
    model, x, y = regression_problem()
    opt = create_optimizer(model, name=name, lr=lr, weight_decay=1e-4)
    losses = []
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_lamb_first_step_against_hand_computation():
    w0 = torch.tensor([3.0, 4.0])           # ||w|| = 5
    grad = torch.tensor([0.1, -0.2])
    p = torch.nn.Parameter(w0.clone())
    opt = Lamb([p], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    p.grad = grad.clone()
    opt.step()
    # step 1 with bias correction: m_hat = g, v_hat = g², so adam part = g / (|g| + eps)
    update = grad / (grad.abs() + 1e-6) + 0.01 * w0
    trust = w0.norm() / update.norm()
    torch.testing.assert_close(p.detach(), w0 - 0.1 * trust * update)


def test_lamb_no_layer_adaptation_for_no_decay_group():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    opt = create_optimizer(model, name="lamb", lr=0.1)
    flags = {g["name"]: g["layer_adaptation"] for g in opt.param_groups}
    assert flags == {"decay": True, "no_decay": False}
    bias = model[0].bias
    before = bias.detach().clone()
    bias.grad = torch.tensor([1.0, -1.0])
    opt.step()
    # no trust ratio: the first Adam step moves each element by lr (g/|g| = ±1)
    torch.testing.assert_close(bias.detach(), before - 0.1 * torch.tensor([1.0, -1.0]),
                               rtol=0, atol=1e-6)
