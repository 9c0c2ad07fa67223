"""Parameter groups (no decay on any norm parameter or bias, by module type) and optimizers."""

import copy

import pytest
import torch

from ffcv_imagenet.models import create_model
from ffcv_imagenet.optim import Lamb, Lookahead, WeightEMA, create_optimizer, param_groups


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
    with pytest.raises(ValueError, match="'adam'.*sgd, adamw, radam, lamb"):
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


@pytest.mark.parametrize("name, lr", [("sgd", 0.05), ("adamw", 0.01), ("radam", 0.05), ("lamb", 0.05)])
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


def test_radam_weight_decay_is_decoupled_and_skips_the_no_decay_group():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    opt = create_optimizer(model, name="radam", lr=0.1, weight_decay=0.01, betas=(0.95, 0.99), eps=1e-6)
    assert isinstance(opt, torch.optim.RAdam)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["decoupled_weight_decay"] and groups["decay"]["weight_decay"] == 0.01
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["decay"]["betas"] == (0.95, 0.99) and groups["decay"]["eps"] == 1e-6
    # with a zero gradient, one step only decays: w <- w (1 - lr wd); biases and BN stay put
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model[0].weight.detach(), w0 * (1 - 0.1 * 0.01))
    torch.testing.assert_close(model[0].bias.detach(), b0)


def sgd_steps(params, grads, lr):
    """Plain SGD by hand: the fast weights after applying each gradient in turn."""
    out = [p.clone() for p in params]
    for g in grads:
        out = [w - lr * gi for w, gi in zip(out, g)]
    return out


def test_lookahead_syncs_every_k_steps_against_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lookahead(torch.optim.SGD([p], lr=0.5), steps=3, alpha=0.25)
    grads = [torch.tensor([0.2, 0.1]), torch.tensor([-0.4, 0.3]), torch.tensor([0.6, 0.0]),
             torch.tensor([0.1, 0.1])]
    slow0 = p.detach().clone()
    for i, g in enumerate(grads[:2]):
        p.grad = g.clone()
        opt.step()
    fast2 = sgd_steps([slow0], [[g] for g in grads[:2]], 0.5)[0]
    torch.testing.assert_close(p.detach(), fast2)                # no sync before step k
    p.grad = grads[2].clone()
    opt.step()
    fast3 = fast2 - 0.5 * grads[2]
    slow1 = slow0 + 0.25 * (fast3 - slow0)
    torch.testing.assert_close(p.detach(), slow1)                # step k: fast restarts from slow
    p.grad = grads[3].clone()
    opt.step()
    torch.testing.assert_close(p.detach(), slow1 - 0.5 * grads[3])


def ranger(model):
    return create_optimizer(model, name="radam", lr=0.01, weight_decay=1e-2, betas=(0.95, 0.99),
                            eps=1e-6, lookahead_steps=3)


def test_lookahead_state_dict_resumes_the_same_trajectory():
    model, x, y = regression_problem()

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    straight = copy.deepcopy(model)
    train(straight, ranger(straight), 10)

    first = copy.deepcopy(model)
    opt = ranger(first)
    train(first, opt, 4)                       # stop between two syncs (k = 3)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["lookahead"]["counter"] == 4

    resumed = copy.deepcopy(model)             # fresh weights, then the checkpoint
    opt2 = ranger(resumed)
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    for group in opt2.param_groups:            # a schedule's update must reach the base optimizer
        group["lr"] = 0.005
    assert {g["lr"] for g in opt2.base.param_groups} == {0.005}
    for group in opt2.param_groups:
        group["lr"] = 0.01
    train(resumed, opt2, 6)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lookahead_refuses_state_without_its_part_and_bad_settings():
    model = torch.nn.Linear(2, 2)
    plain = create_optimizer(model, name="radam", lr=0.01)
    wrapped = create_optimizer(model, name="radam", lr=0.01, lookahead_steps=6)
    with pytest.raises(ValueError, match="lookahead_steps"):
        wrapped.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="steps"):
        Lookahead(plain, steps=0)
    with pytest.raises(ValueError, match="alpha"):
        Lookahead(plain, steps=2, alpha=1.5)
    with pytest.raises(ValueError, match="lookahead_steps"):
        create_optimizer(model, name="sgd", lr=0.1, lookahead_steps=-1)


def test_weight_ema_against_hand_computation_with_batchnorm():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    ema = WeightEMA(model, decay=0.9)
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    start = model[0].weight.detach().clone()
    averaged = start.clone()
    for n in range(1, 31):
        model.train()(torch.randn(4, 2))  # moves the BatchNorm statistics and its counter
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))  # warm-up: 2/11, 3/12, ... until 0.9 from n = 80
        averaged = d * averaged + (1 - d) * model[0].weight.detach()
    torch.testing.assert_close(ema.module[0].weight, averaged)
    assert not torch.allclose(ema.module[1].running_mean, model[1].running_mean)  # averaged, not copied
    assert ema.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 30

    again = WeightEMA(copy.deepcopy(model), decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 30
    torch.testing.assert_close(again.module[0].weight, averaged)
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(model, decay=1.0)


@pytest.mark.parametrize("name", ["sgd", "adamw", "radam"])
def test_multi_tensor_path_is_used_and_matches_the_per_tensor_loop(name):
    # On the CPU torch defaults to a per-tensor loop, whose RAdam step cost as much as a
    # ResNet-50 forward and backward at 96 px; the multi-tensor (foreach) path does the same math.
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    models = [copy.deepcopy(base) for _ in range(2)]
    opts = [create_optimizer(m, name=name, lr=0.01, weight_decay=0.05) for m in models]
    assert all(g["foreach"] is True for g in opts[0].param_groups)
    for group in opts[1].param_groups:
        group["foreach"] = False
    for _ in range(3):
        grads = [torch.randn_like(p) for p in base.parameters()]
        for model, opt in zip(models, opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(next(models[0].parameters()), next(base.parameters()))   # they moved


def _ema_rank(rank: int, store: str, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        ema = WeightEMA(model, decay=0.5)
        model[1].running_mean.fill_(float(rank + 1))  # each rank's own batches
        ema.update()
        ema.broadcast(src=0)
        results[rank] = [t.clone() for t in ema.module.state_dict().values()]
    finally:
        dist.destroy_process_group()


def test_ema_broadcast_makes_every_rank_hold_rank_zeros_average(tmp_path):
    """The average's BatchNorm statistics come from each rank's own micro-batches; before
    evaluation every rank takes rank 0's."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ema_rank, args=(str(tmp_path / "store"), results), nprocs=2)
        zero, one = results[0], results[1]
    assert all(torch.equal(a, b) for a, b in zip(zero, one))
    # running_mean (entry 4): rank 0's 1.0 averaged in with weight 1 - min(0.5, 2/11); rank 1's
    # own would be twice that
    torch.testing.assert_close(zero[4], torch.full((4,), 9 / 11))


def test_cpu_parameters_get_foreach_kernels():
    from ffcv_imagenet.optim import kernel_options

    assert kernel_options(torch.nn.Linear(2, 2)) == {"foreach": True}
