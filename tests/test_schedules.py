"""Learning-rate and resolution schedules at chosen points, against hand-computed values."""

import math

import pytest

from ffcv_imagenet.schedules import SCHEDULES, lr_at, resolution_at, validates_after, validation_passes

HE = dict(schedule="step_warmup", peak_lr=0.4, epochs=90, warmup_epochs=5,
          milestones=(30, 60, 80), step_ratio=0.1)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),            # warmup starts at 0
    (2.5, 0.2),            # warmup midpoint
    (5.0, 0.4),            # warmup end = peak
    (29.999, 0.4),         # just before the first milestone
    (30.0, 0.04),          # right after each milestone
    (59.5, 0.04),
    (60.0, 0.004),
    (80.0, 0.0004),
    (89.99, 0.0004),
])
def test_step_warmup_he_et_al(epoch, expected):
    assert lr_at(epoch, **HE) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_step_warmup_without_milestones_uses_step_length():
    kwargs = dict(schedule="step_warmup", peak_lr=1.0, epochs=90, step_length=30)
    assert lr_at(29.9, **kwargs) == pytest.approx(1.0)
    assert lr_at(30, **kwargs) == pytest.approx(0.1)
    assert lr_at(60, **kwargs) == pytest.approx(0.01)


COS = dict(schedule="cosine", peak_lr=1.0, epochs=25, warmup_epochs=5)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),
    (2.5, 0.5),
    (5.0, 1.0),
    (15.0, 0.5),                                   # cosine midpoint
    (10.0, 0.5 * (1 + math.cos(math.pi * 0.25))),
    (25.0, 0.0),
])
def test_cosine(epoch, expected):
    assert lr_at(epoch, **COS) == pytest.approx(expected, abs=1e-12)


def test_cosine_end_lr_ratio_and_no_warmup():
    kwargs = dict(schedule="cosine", peak_lr=2.0, epochs=10, end_lr_ratio=0.1)
    assert lr_at(0, **kwargs) == pytest.approx(2.0)
    assert lr_at(5, **kwargs) == pytest.approx(0.2 + 1.8 * 0.5)
    assert lr_at(10, **kwargs) == pytest.approx(0.2)


def test_flat_cos_holds_the_peak_then_anneals():
    kwargs = dict(schedule="flat_cos", peak_lr=4e-3, epochs=5, flat_fraction=0.72)
    assert lr_at(0, **kwargs) == lr_at(3.59, **kwargs) == pytest.approx(4e-3)
    assert lr_at(3.6 + 0.7, **kwargs) == pytest.approx(2e-3)                  # cosine midpoint
    assert lr_at(5, **kwargs) == pytest.approx(0.0, abs=1e-15)
    warm = dict(kwargs, warmup_epochs=1.0, end_lr_ratio=0.1)
    assert lr_at(0.5, **warm) == pytest.approx(2e-3)
    assert lr_at(5, **warm) == pytest.approx(4e-4)
    # a warmup longer than the flat part: the cosine starts when the warmup ends
    assert lr_at(4.0, **dict(kwargs, warmup_epochs=4.0)) == pytest.approx(4e-3)
    with pytest.raises(ValueError, match="flat_fraction"):
        lr_at(1, **dict(kwargs, flat_fraction=1.5))


# ffcv-imagenet rn50 16-epoch preset: lr 1.7, peak at epoch 2, linear to 0 at 16.
TRI = dict(schedule="triangular", peak_lr=1.7, epochs=16, lr_peak_epoch=2)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 1.7e-4),                          # ffcv starts at 1e-4 x peak, not 0
    (1.0, (1.7e-4 + 1.7) / 2),
    (2.0, 1.7),                             # peak
    (9.0, 1.7 / 2),                         # halfway down
    (15.5, 1.7 * 0.5 / 14),
    (16.0, 0.0),                            # end
])
def test_triangular(epoch, expected):
    assert lr_at(epoch, **TRI) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_triangular_matches_ffcv_per_iteration_interpolation():
    """ffcv-imagenet: per-iteration lrs = interp between get_lr(e) and get_lr(e+1)."""
    import numpy as np

    def ffcv_cyclic(e):
        return np.interp([e], [0, 2, 16], [1e-4 * 1.7, 1.7, 0])[0]

    iters = 7
    for epoch in range(16):
        ffcv = np.interp(np.arange(iters), [0, iters], [ffcv_cyclic(epoch), ffcv_cyclic(epoch + 1)])
        ours = [lr_at(epoch + i / iters, **TRI) for i in range(iters)]
        np.testing.assert_allclose(ours, ffcv, rtol=1e-12, atol=1e-15)


def test_cyclic_is_an_alias_of_triangular():
    assert lr_at(3.3, **{**TRI, "schedule": "cyclic"}) == lr_at(3.3, **TRI)


STEP = dict(schedule="step", peak_lr=1.0, epochs=90, step_ratio=0.1, step_length=30)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 1.0),
    (29.0, 1.0),
    (29.5, 0.55),        # ffcv interpolates per iteration between get_lr(29) and get_lr(30)
    (30.0, 0.1),         # step boundaries
    (45.0, 0.1),
    (60.0, 0.01),
    (89.0, 0.01),
    (89.5, 0.005),       # ffcv's last epoch slides to get_lr(90) = 0
    (90.0, 0.0),
])
def test_ffcv_step(epoch, expected):
    assert lr_at(epoch, **STEP) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_ffcv_step_with_warmup():
    assert lr_at(1.0, **STEP, warmup_epochs=2) == pytest.approx(0.5)
    assert lr_at(2.0, **STEP, warmup_epochs=2) == pytest.approx(1.0)


def test_unknown_schedule_names_it_and_the_valid_ones():
    with pytest.raises(ValueError) as info:
        lr_at(0, schedule="cosin", peak_lr=1.0, epochs=10)
    message = str(info.value)
    assert "'cosin'" in message
    assert all(name in message for name in SCHEDULES)


def test_every_schedule_is_nonnegative_and_bounded_by_peak():
    for name in SCHEDULES:
        extra = {} if name == "triangular" else {"warmup_epochs": 1}
        for i in range(0, 101):
            value = lr_at(i * 0.1, schedule=name, peak_lr=0.5, epochs=10, milestones=(3, 6),
                          step_length=3, **extra)
            assert 0.0 <= value <= 0.5 + 1e-12, (name, i)


# ffcv-imagenet rn50 presets: min 160, max 192; the 16-epoch one ramps from 11 to 13.
RN50_16 = dict(min_res=160, max_res=192, start_ramp=11, end_ramp=13)


def test_resolution_rn50_16_epochs():
    values = [resolution_at(e, **RN50_16) for e in range(16)]
    assert values[:12] == [160] * 12          # 160 at every epoch <= 11
    assert values[13:] == [192] * 3           # 192 at every epoch >= 13
    # epoch 12: interp = 176, 176/32 = 5.5 -> np.round gives 6 (half to even) -> 192
    assert values[12] == 192


def ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """ffcv-imagenet's get_resolution, restated for comparison."""
    import numpy as np

    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


@pytest.mark.parametrize("epochs, start, end", [
    (16, 11, 13), (24, 17, 20), (32, 23, 27), (40, 29, 34), (56, 41, 48), (88, 65, 76)])
def test_resolution_matches_ffcv_for_every_rn50_preset(epochs, start, end):
    for epoch in range(epochs):
        ours = resolution_at(epoch, min_res=160, max_res=192, start_ramp=start, end_ramp=end)
        assert ours == ffcv_get_resolution(epoch, 160, 192, end, start)
        assert ours % 32 == 0


def test_resolution_wider_ramp_values():
    kwargs = dict(min_res=128, max_res=256, start_ramp=10, end_ramp=14)
    assert [resolution_at(e, **kwargs) for e in range(9, 16)] == [128, 128, 160, 192, 224, 256, 256]


def test_resolution_constant_and_errors():
    assert resolution_at(5, min_res=176, max_res=176, start_ramp=0, end_ramp=0) == 176
    with pytest.raises(ValueError, match="min_res"):
        resolution_at(0, min_res=192, max_res=160, start_ramp=1, end_ramp=2)
    with pytest.raises(ValueError, match="start_ramp"):
        resolution_at(0, min_res=160, max_res=192, start_ramp=5, end_ramp=2)


def test_validates_every_n_epochs_and_after_the_last():
    # 0-based epochs of a 10-epoch run validating every 4: after the 4th, the 8th and the 10th
    assert [e for e in range(10) if validates_after(e, epochs=10, every=4)] == [3, 7, 9]
    assert [e for e in range(3) if validates_after(e, epochs=3, every=1)] == [0, 1, 2]
    # an EMA run scores the raw weights as well after the last epoch only
    assert [validation_passes(e, epochs=10, every=4, ema=True) for e in range(10)] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 2]
    assert [validation_passes(e, epochs=10, every=4, ema=False) for e in range(10)] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 1]
