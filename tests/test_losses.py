"""Label smoothing, mixup and distillation losses against hand computations; teacher loading."""

import math

import pytest
import torch

from ffcv_imagenet.losses import (create_teacher, cross_entropy, distillation_loss, mixup,
                                  sample_beta)

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
TARGETS = torch.tensor([0, 1])


def log_softmax_row(row):
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


def hand_ce(logits, soft_rows):
    total = 0.0
    for row, t in zip(logits.tolist(), soft_rows):
        total -= sum(ti * li for ti, li in zip(t, log_softmax_row(row)))
    return total / len(soft_rows)


def test_cross_entropy_hard_targets():
    expected = hand_ce(LOGITS, [[1, 0, 0], [0, 1, 0]])
    assert cross_entropy(LOGITS, TARGETS).item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_hard_and_soft_targets():
    eps, c = 0.1, 3
    smoothed = [[1 - eps + eps / c, eps / c, eps / c], [eps / c, 1 - eps + eps / c, eps / c]]
    expected = hand_ce(LOGITS, smoothed)
    assert cross_entropy(LOGITS, TARGETS, label_smoothing=eps).item() == pytest.approx(expected,
                                                                                      rel=1e-6)
    one_hot = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    assert cross_entropy(LOGITS, one_hot, label_smoothing=eps).item() == pytest.approx(expected,
                                                                                      rel=1e-6)
    # same as PyTorch's own
    torch_value = torch.nn.CrossEntropyLoss(label_smoothing=eps)(LOGITS, TARGETS).item()
    assert cross_entropy(LOGITS, TARGETS, label_smoothing=eps).item() == pytest.approx(torch_value)


def test_cross_entropy_soft_targets_with_smoothing():
    soft = [[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]]
    eps = 0.2
    smoothed = [[t * (1 - eps) + eps / 3 for t in row] for row in soft]
    value = cross_entropy(LOGITS, torch.tensor(soft), label_smoothing=eps).item()
    assert value == pytest.approx(hand_ce(LOGITS, smoothed), rel=1e-6)


def test_cross_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="soft targets"):
        cross_entropy(LOGITS, torch.ones(2, 4) / 4)
    with pytest.raises(ValueError, match="batch sizes"):
        cross_entropy(LOGITS, torch.tensor([0, 1, 2]))


def test_mixup_against_hand_computation():
    images = torch.arange(4 * 2, dtype=torch.float32).reshape(4, 2, 1, 1)
    targets = torch.tensor([0, 1, 2, 1])
    gen = torch.Generator().manual_seed(123)
    mixed, soft = mixup(images, targets, alpha=0.4, num_classes=3, generator=gen)

    # Replay the same draws: λ first, then the permutation.
    replay = torch.Generator().manual_seed(123)
    lam = sample_beta(0.4, replay)
    perm = torch.randperm(4, generator=replay)
    assert 0.0 <= lam <= 1.0
    for i in range(4):
        j = int(perm[i])
        torch.testing.assert_close(mixed[i], lam * images[i] + (1 - lam) * images[j])
        expected = [0.0, 0.0, 0.0]
        expected[int(targets[i])] += lam
        expected[int(targets[j])] += 1 - lam
        torch.testing.assert_close(soft[i], torch.tensor(expected))
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))

    # deterministic given the generator's seed; different seeds give different draws
    again = mixup(images, targets, alpha=0.4, num_classes=3,
                  generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(again[0], mixed)
    other = mixup(images, targets, alpha=0.4, num_classes=3,
                  generator=torch.Generator().manual_seed(7))
    assert not torch.equal(other[1], soft)


def test_mixup_global_rng_is_reproducible():
    images, targets = torch.randn(6, 3, 4, 4), torch.randint(0, 5, (6,))
    torch.manual_seed(5)
    first = mixup(images, targets, alpha=0.2, num_classes=5)
    torch.manual_seed(5)
    second = mixup(images, targets, alpha=0.2, num_classes=5)
    torch.testing.assert_close(first[0], second[0])
    torch.testing.assert_close(first[1], second[1])


def test_mixup_alpha_zero_is_identity_with_one_hot():
    images, targets = torch.randn(3, 3, 4, 4), torch.tensor([2, 0, 1])
    mixed, soft = mixup(images, targets, alpha=0.0, num_classes=3)
    assert mixed is images
    torch.testing.assert_close(soft, torch.eye(3)[[2, 0, 1]])


def test_loss_on_mixed_targets_is_the_mix_of_losses():
    """CE is linear in the target: CE(x, λa + (1-λ)b) = λ CE(x, a) + (1-λ) CE(x, b)."""
    lam = 0.3
    a, b = torch.tensor([0, 1]), torch.tensor([2, 0])
    soft = lam * torch.eye(3)[a] + (1 - lam) * torch.eye(3)[b]
    expected = lam * cross_entropy(LOGITS, a, 0.1) + (1 - lam) * cross_entropy(LOGITS, b, 0.1)
    torch.testing.assert_close(cross_entropy(LOGITS, soft, label_smoothing=0.1), expected)


def test_distillation_loss_against_hand_computation():
    student = LOGITS
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    t, w, eps = 2.0, 0.7, 0.1
    ce = cross_entropy(student, TARGETS, label_smoothing=eps).item()
    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        log_q = log_softmax_row([v / t for v in s_row])
        log_p = log_softmax_row([v / t for v in t_row])
        kl += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
    kl /= 2  # batchmean
    expected = (1 - w) * ce + w * t * t * kl
    value = distillation_loss(student, teacher, TARGETS, temperature=t, weight=w,
                              label_smoothing=eps)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_distillation_gradients_reach_student_only_and_soft_targets_work():
    student = LOGITS.clone().requires_grad_(True)
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 3.0, 1.0]], requires_grad=True)
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    distillation_loss(student, teacher, soft, temperature=4.0, weight=0.5).backward()
    assert student.grad is not None and teacher.grad is None
    # weight 0 is plain CE; identical logits give zero KL
    plain = distillation_loss(LOGITS, LOGITS, TARGETS, temperature=3.0, weight=0.0)
    torch.testing.assert_close(plain, cross_entropy(LOGITS, TARGETS))
    same = distillation_loss(LOGITS, LOGITS, TARGETS, temperature=3.0, weight=1.0)
    assert same.abs().item() < 1e-6


def test_create_teacher_loads_prefixed_checkpoint(tmp_path):
    from ffcv_imagenet.models import create_model

    torch.manual_seed(0)
    source = create_model("resnet18", num_classes=4, zero_init_residual=False)
    wrapped = {"model": {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()},
               "epoch": 3}
    path = tmp_path / "teacher.pt"
    torch.save(wrapped, path)
    teacher = create_teacher("resnet18", path, num_classes=4, device="cpu")
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), source.eval()(x))

    raw = tmp_path / "raw.pt"
    torch.save(source.state_dict(), raw)
    with torch.no_grad():
        torch.testing.assert_close(create_teacher("resnet18", raw, num_classes=4, device="cpu")(x),
                                   source.eval()(x))


def test_create_teacher_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        create_teacher("resnet18", missing, num_classes=4, device="cpu")
    path = tmp_path / "wrong_arch.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ValueError, match="wrong_arch.pt"):
        create_teacher("resnet18", path, num_classes=4, device="cpu")
    sized = tmp_path / "wrong_classes.pt"
    from ffcv_imagenet.models import create_model
    torch.save(create_model("resnet18", num_classes=5).state_dict(), sized)
    with pytest.raises(ValueError, match="wrong_classes.pt"):
        create_teacher("resnet18", sized, num_classes=4, device="cpu")


def test_create_teacher_reads_ffcv_imagenet_blurpool_weights(tmp_path):
    """ffcv-imagenet's BlurPoolConv2d saves `<name>.conv.weight` plus a constant `blur_filter`."""
    from ffcv_imagenet.models import create_model

    source = create_model("resnet18", num_classes=4, use_blurpool=True)
    state = dict(source.state_dict())
    for key in [k for k in state if k.endswith(".conv.weight")]:
        channels = state[key].shape[1]
        state[key[: -len("conv.weight")] + "blur_filter"] = torch.ones(channels, 1, 3, 3) / 16
    path = tmp_path / "ffcv_final_weights.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    teacher = create_teacher("resnet18", path, num_classes=4, device="cpu", use_blurpool=True)
    torch.testing.assert_close(teacher.layer2[0].conv1.conv.weight,
                               source.layer2[0].conv1.conv.weight)


def test_create_teacher_reads_a_checkpoint_with_numpy_state(tmp_path):
    """Engine checkpoints keep RNG states (numpy arrays) next to the model."""
    import numpy as np

    from ffcv_imagenet.models import create_model

    source = create_model("resnet18", num_classes=4)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": source.state_dict(), "numpy_rng": np.random.get_state()}, path)
    teacher = create_teacher("resnet18", path, num_classes=4, device="cpu")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[key], value, rtol=0, atol=0)


def test_sample_beta_stays_a_tensor_with_betas_moments():
    """λ stays a 0-d tensor on the generator's device (no host read), distributed as Beta(α, α):
    mean 1/2, variance 1 / (4 (2α + 1))."""
    gen = torch.Generator().manual_seed(0)
    alpha = 0.4
    draws = torch.stack([sample_beta(alpha, gen) for _ in range(4000)])
    assert draws.shape == (4000,) and draws.dtype == torch.float32
    assert float(draws.min()) >= 0.0 and float(draws.max()) <= 1.0
    assert float(draws.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(draws.var()) == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.08)
