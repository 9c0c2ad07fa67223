"""Learning-rate and resolution schedules: pure functions of the (fractional) epoch.

Contract
--------
- `lr_at(epoch, schedule=..., peak_lr=..., epochs=...)` returns the learning rate for one
  iteration. `epoch` is a float: `epoch_index + step / steps_per_epoch`, so the engine sets the
  rate every iteration (the reference recipe does the same, see below). Nothing is stored between
  calls: resuming at any iteration gives the same value.
- `resolution_at(epoch, min_res=..., max_res=..., start_ramp=..., end_ramp=...)` returns the
  training side length in pixels for one epoch (FFCV's progressive resizing).

Schedules (`SCHEDULES`):

- ``'step_warmup'`` (He et al. 2016 with Goyal et al. 2017's warmup): linear from 0 to `peak_lr`
  over `warmup_epochs`, then multiplied by `step_ratio` at each epoch in `milestones`
  (He et al.: warmup 5, milestones (30, 60, 80) of 90). Without milestones, every
  `step_length` epochs.
- ``'cosine'``: linear warmup over `warmup_epochs`, then half a cosine from `peak_lr` down to
  `peak_lr * end_lr_ratio` at `epochs`.
- ``'flat_cos'`` (fast.ai's `fit_flat_cos`): optional linear warmup over `warmup_epochs`, the
  peak until `flat_fraction * epochs`, then half a cosine down to `peak_lr * end_lr_ratio` at
  `epochs`. Suits optimizers that need no warmup (RAdam) on short runs.
- ``'triangular'`` (FFCV's "cyclic"; ``'cyclic'`` is accepted as an alias): piecewise linear
  through (0, 1e-4 * peak), (`lr_peak_epoch`, peak), (`epochs`, 0), exactly as ffcv-imagenet's
  `get_cyclic_lr` (`np.interp([epoch], [0, lr_peak_epoch, epochs], [1e-4 * lr, lr, 0])`).
  ffcv-imagenet sets per-iteration rates by interpolating linearly between the values at the
  current and the next integer epoch; for integer `lr_peak_epoch` that is the same function.
- ``'step'`` (FFCV's): at integer epochs `peak * step_ratio ** (epoch // step_length)`, and 0
  from `epochs` on; between integer epochs linear interpolation between the two neighbouring
  integer-epoch values, which is what ffcv-imagenet's `train_loop` does per iteration
  (`np.interp(arange(iters), [0, iters], [get_lr(e), get_lr(e + 1)])`). So the rate slides down
  during the epoch before each drop, and to 0 during the last epoch. Optional linear warmup
  from 0 over `warmup_epochs` multiplies it.

Progressive resizing follows ffcv-imagenet's `get_resolution`: `min_res` up to and including
`start_ramp`, `max_res` from `end_ramp` on, and in between the linear interpolation rounded to the
nearest multiple of 32 (`int(np.round(res / 32)) * 32`, so halves go to the even multiple); the
result is clamped to [min_res, max_res], which changes nothing for the published presets.

`validates_after(epoch, epochs=..., every=...)` says whether the engine validates after a
(0-based) epoch: every `every` epochs and always after the last. The report reads logs by it.
`validation_passes` adds the second pass after the last epoch of a run with a weight average.
"""

import math

SCHEDULES = ("step_warmup", "cosine", "flat_cos", "triangular", "step")
SCHEDULE_ALIASES = {"cyclic": "triangular"}  # the name ffcv-imagenet's presets use

# ffcv-imagenet's triangular schedule starts at 1e-4 x peak, not 0.
TRIANGULAR_START_RATIO = 1e-4


def _interp(x: float, xs: tuple, ys: tuple) -> float:
    """Piecewise-linear interpolation like np.interp (clamped at both ends), without numpy."""
    if x <= xs[0]:
        return float(ys[0])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            if x1 == x0:
                return float(y1)
            return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return float(ys[-1])


def _warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """Linear warmup from 0 at epoch 0 to 1 at `warmup_epochs`; 1 when there is no warmup."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return 1.0
    return epoch / warmup_epochs


def _cosine_decay(epoch: float, start: float, end: float, peak_lr: float,
                  end_lr_ratio: float) -> float:
    """Half a cosine from `peak_lr` at `start` to `peak_lr * end_lr_ratio` at `end` (held there)."""
    end_lr = peak_lr * end_lr_ratio
    span = end - start
    progress = 1.0 if span <= 0 else min(1.0, (epoch - start) / span)
    return end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _ffcv_step_at_integer(epoch: int, peak_lr: float, epochs: int, step_ratio: float,
                          step_length: int) -> float:
    """ffcv-imagenet's `get_step_lr` at an integer epoch."""
    if epoch >= epochs:
        return 0.0
    return peak_lr * step_ratio ** (epoch // step_length)


def resolve_schedule_name(schedule: str) -> str:
    """Canonical schedule name; ValueError naming the unknown name and the valid ones."""
    name = SCHEDULE_ALIASES.get(schedule, schedule)
    if name not in SCHEDULES:
        valid = ", ".join(SCHEDULES + tuple(SCHEDULE_ALIASES))
        raise ValueError(f"unknown lr schedule {schedule!r}; valid schedules: {valid}")
    return name


def lr_at(epoch: float, *, schedule: str, peak_lr: float, epochs: int,
          warmup_epochs: float = 0, lr_peak_epoch: float = 2, step_ratio: float = 0.1,
          step_length: int = 30, milestones: tuple = (), end_lr_ratio: float = 0.0,
          flat_fraction: float = 0.72) -> float:
    """Learning rate at fractional `epoch` (epoch_index + step / steps_per_epoch).

    See the module docstring for each schedule. `epochs` is the length of the run; `peak_lr` is
    the rate the schedule peaks at (already scaled to the global batch by the caller).
    """
    name = resolve_schedule_name(schedule)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    if peak_lr < 0:
        raise ValueError(f"peak_lr must be >= 0, got {peak_lr}")
    if warmup_epochs < 0 or warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")

    if name == "step_warmup":
        steps = tuple(milestones) if milestones else tuple(range(step_length, epochs, step_length))
        if list(steps) != sorted(steps):
            raise ValueError(f"milestones must be increasing, got {tuple(milestones)}")
        drops = sum(1 for m in steps if epoch >= m)
        return peak_lr * step_ratio ** drops * _warmup_factor(epoch, warmup_epochs)

    if name == "cosine":
        if epoch < warmup_epochs:
            return peak_lr * _warmup_factor(epoch, warmup_epochs)
        return _cosine_decay(epoch, warmup_epochs, epochs, peak_lr, end_lr_ratio)

    if name == "flat_cos":
        if not 0 <= flat_fraction <= 1:
            raise ValueError(f"flat_fraction must be in [0, 1], got {flat_fraction}")
        anneal_from = max(flat_fraction * epochs, warmup_epochs)
        if epoch < warmup_epochs:
            return peak_lr * _warmup_factor(epoch, warmup_epochs)
        if epoch < anneal_from:
            return float(peak_lr)
        return _cosine_decay(epoch, anneal_from, epochs, peak_lr, end_lr_ratio)

    if name == "triangular":
        if warmup_epochs:
            raise ValueError("the triangular schedule warms up to lr_peak_epoch; "
                             f"set warmup_epochs=0 (got {warmup_epochs})")
        if not 0 <= lr_peak_epoch <= epochs:
            raise ValueError(f"lr_peak_epoch must be in [0, epochs={epochs}], got {lr_peak_epoch}")
        return _interp(epoch, (0, lr_peak_epoch, epochs),
                       (TRIANGULAR_START_RATIO * peak_lr, peak_lr, 0.0))

    # name == "step": FFCV's per-iteration interpolation between integer-epoch values.
    if step_length <= 0:
        raise ValueError(f"step_length must be > 0, got {step_length}")
    whole = math.floor(epoch)
    frac = epoch - whole
    lr_here = _ffcv_step_at_integer(whole, peak_lr, epochs, step_ratio, step_length)
    lr_next = _ffcv_step_at_integer(whole + 1, peak_lr, epochs, step_ratio, step_length)
    return (lr_here + (lr_next - lr_here) * frac) * _warmup_factor(epoch, warmup_epochs)


def validates_after(epoch: int, *, epochs: int, every: int) -> bool:
    """Whether the run validates after 0-based `epoch`: after epochs every, 2*every, ... (1-based)
    and after the last of `epochs`."""
    return epoch + 1 == epochs or (epoch + 1) % every == 0


def validation_passes(epoch: int, *, epochs: int, every: int, ema: bool) -> int:
    """Validation passes after 0-based `epoch`: none, one, or with a weight average (`ema`) two
    after the last epoch, which scores the average and, for comparison, the raw weights."""
    if not validates_after(epoch, epochs=epochs, every=every):
        return 0
    return 2 if ema and epoch + 1 == epochs else 1


def resolution_at(epoch: int, *, min_res: int, max_res: int, start_ramp: int, end_ramp: int,
                  multiple: int = 32) -> int:
    """Training resolution (pixels per side) for `epoch`, as ffcv-imagenet's `get_resolution`.

    `min_res` while epoch <= start_ramp, `max_res` while epoch >= end_ramp, and in between the
    linear interpolation rounded to the nearest `multiple` (round half to even, like np.round).
    """
    if min_res > max_res:
        raise ValueError(f"min_res ({min_res}) must be <= max_res ({max_res})")
    if min_res == max_res:
        return int(min_res)
    if start_ramp > end_ramp:
        raise ValueError(f"start_ramp ({start_ramp}) must be <= end_ramp ({end_ramp})")
    if multiple <= 0:
        raise ValueError(f"multiple must be > 0, got {multiple}")
    if epoch <= start_ramp:
        return int(min_res)
    if epoch >= end_ramp:
        return int(max_res)
    res = _interp(epoch, (start_ramp, end_ramp), (min_res, max_res))
    rounded = int(round(res / multiple)) * multiple  # Python's round() is half-to-even too
    return int(min(max(rounded, min_res), max_res))


# --------------------------------------------------------------------------- from a run's config

def lr_from_config(epoch: float, cfg: dict, peak_lr: float) -> float:
    """`lr_at` with the schedule's keys read from a loaded config (section `lr`, and
    training.epochs); `peak_lr` is already scaled to the global batch."""
    lr = cfg["lr"]
    return lr_at(epoch, schedule=lr["lr_schedule_type"], peak_lr=peak_lr,
                 epochs=cfg["training"]["epochs"], warmup_epochs=lr["warmup_epochs"],
                 lr_peak_epoch=lr["lr_peak_epoch"], step_ratio=lr["step_ratio"],
                 step_length=lr["step_length"], milestones=tuple(lr["milestones"]),
                 end_lr_ratio=lr["end_lr_ratio"], flat_fraction=lr["flat_fraction"])


def resolution_from_config(epoch: int, cfg: dict) -> int:
    """`resolution_at` with the ramp read from a loaded config (section `resolution`)."""
    res = cfg["resolution"]
    return resolution_at(epoch, min_res=res["min_res"], max_res=res["max_res"],
                         start_ramp=res["start_ramp"], end_ramp=res["end_ramp"])
