"""The run logger's sinks: TensorBoard event files and epochs.csv against log.jsonl after a real
(tiny) run that is resumed, per-step points at multiples of logging.step_every only, a replayed
epoch after a kill (TensorBoard's purge, the CSV's rows), sinks switched on at a resume, and the
refusal of logging.tensorboard=1 without the tensorboard package.

TensorBoard is read back with its own reader (EventAccumulator), which applies the purge the way
TensorBoard's display does."""

import csv
import gc
import sys
import time

import numpy as np
import pytest

from engine_data import EPOCHS, records, run_args, shared_betons, tensorboard_scalars
from ffcv_imagenet import train
from ffcv_imagenet.logger import RunLogger, SinkOptions, epoch_fields

# numba's finalizers print KeyErrors when ffcv's compiled pipelines are collected (harmless)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

STEP_EVERY = 5  # with 10 steps per epoch: 2 points per epoch, one of them the epoch's last step
STEPS_PER_EPOCH = 10  # engine_data.run_args: 80 images, batch 8


def f32(value: float) -> float:
    """What an event file holds of a float (TensorBoard stores scalars as float32)."""
    return float(np.float32(value))


def read_csv(path) -> tuple:
    with open(path, newline="") as f:
        text = f.read()
    rows = list(csv.reader(text.splitlines()))
    return rows[0], rows[1:], text


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A run of EPOCHS - 1 epochs with both sinks, then resumed (training.resume=1) to EPOCHS."""
    pytest.importorskip("tensorboard")
    betons = shared_betons(tmp_path_factory)
    folder = tmp_path_factory.mktemp("logger_runs") / "run"
    sinks = ("--logging.tensorboard=1", "--logging.csv=1", f"--logging.step_every={STEP_EVERY}")
    assert train.main(run_args(*betons, folder, *sinks, f"--training.epochs={EPOCHS - 1}")) == 0
    assert train.main(run_args(*betons, folder, *sinks, "--training.resume=1")) == 0
    gc.collect()  # ffcv's pipelines, while the numba warnings above are filtered
    return folder


def test_tensorboard_holds_each_epoch_figure_of_the_log_once(resumed_run):
    epochs = records(resumed_run, "epoch")
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS))
    assert [r["step"] for r in epochs] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    tags = tensorboard_scalars(resumed_run / "tensorboard")
    numeric = [k for k, v in epochs[0].items()
               if isinstance(v, (int, float)) and k not in ("epoch", "step")]
    assert {"train_loss", "top_1", "top_5", "val_loss", "lr", "resolution", "train_images_per_s"} <= set(numeric)
    assert sorted(t for t in tags if t.startswith("epoch/")) == sorted(f"epoch/{k}" for k in numeric)
    for key in numeric:  # one point per epoch, at the step that ended it, the log's value
        assert tags[f"epoch/{key}"] == [(r["step"], f32(r[key])) for r in epochs], key


def test_step_points_only_every_step_every_steps_and_continue_after_resume(resumed_run):
    tags = tensorboard_scalars(resumed_run / "tensorboard")
    expected_steps = list(range(STEP_EVERY, STEPS_PER_EPOCH * EPOCHS + 1, STEP_EVERY))
    assert [s for s, _ in tags["step/loss"]] == expected_steps
    assert [s for s, _ in tags["step/lr"]] == expected_steps
    # the last step of an epoch has the lr the epoch line logs (the lr of its last step)
    lrs = dict(tags["step/lr"])
    for r in records(resumed_run, "epoch"):
        assert lrs[r["step"]] == f32(r["lr"])
    losses = [v for _, v in tags["step/loss"]]
    assert all(0 < v < 10 for v in losses) and len(set(losses)) == len(losses)


def test_csv_is_the_logs_epoch_lines_with_one_header(resumed_run):
    epochs = records(resumed_run, "epoch")
    header, rows, text = read_csv(resumed_run / "epochs.csv")
    assert header == list(epoch_fields(epochs[0]))
    assert header[:3] == ["epoch", "step", "lr"] and "type" not in header
    assert text.count("epoch,step,") == 1  # the resumed launch appended, without a second header
    assert len(rows) == len(epochs) == EPOCHS
    for row, record in zip(rows, epochs):
        for column, cell in zip(header, row):
            value = record[column]
            if value is None:
                assert cell == ""
            elif isinstance(value, str):
                assert cell == value
            else:  # repr of a float reads back exactly
                assert type(value)(cell) == value, (column, cell, value)


def logger_at(folder, epoch: int, step: int, *, tensorboard=False, csv=False, step_every=5) -> RunLogger:
    options = SinkOptions(tensorboard=tensorboard, csv=csv, step_every=step_every)
    logger = RunLogger(folder, enabled=True, options=options)
    logger.open(epoch=epoch, step=step)
    return logger


def epoch_record(epoch: int, loss: float, **extra) -> dict:
    return {"type": "epoch", "epoch": epoch, "step": STEPS_PER_EPOCH * (epoch + 1), "lr": 0.1,
            "train_loss": loss, "top_1": None, **extra}


def test_an_epoch_replayed_after_a_kill_is_not_held_twice(tmp_path):
    """Killed during epoch 2, after epoch 1 was logged but before its checkpoint: the resumed
    launch opens after epoch 0 and logs epochs 1 and 2 again, with other values."""
    pytest.importorskip("tensorboard")
    options = dict(tensorboard=True, csv=True)
    first = logger_at(tmp_path, 0, 0, **options)
    first.log(epoch_record(0, 3.0))
    first.steps([(5, 3.1, 0.1), (10, 3.2, 0.1)])
    first.log(epoch_record(1, 2.0))
    first.steps([(15, 2.1, 0.1), (20, 2.2, 0.1), (25, 2.3, 0.1)])
    first.close()
    # TensorBoard reads a folder's event files in name order, and a name starts with its second
    # of creation: launches are seconds apart, these two calls need not be
    time.sleep(1.1)
    second = logger_at(tmp_path, 1, STEPS_PER_EPOCH, **options)
    for step in range(11, 31):  # every step read from the device; every 5th kept
        second.steps([(step, 1.0 + step / 100, 0.01)])
        if step % STEPS_PER_EPOCH == 0:
            second.log(epoch_record(step // STEPS_PER_EPOCH - 1, 1.5 - step / 100))
    second.close()
    assert [(r["epoch"], r["train_loss"]) for r in records(tmp_path, "epoch")] == [(0, 3.0), (1, 1.3), (2, 1.2)]
    header, rows, text = read_csv(tmp_path / "epochs.csv")
    assert text.count("epoch,step,") == 1
    assert [(row[0], row[header.index("train_loss")]) for row in rows] == [("0", "3.0"), ("1", "1.3"), ("2", "1.2")]
    tags = tensorboard_scalars(tmp_path / "tensorboard")
    assert tags["epoch/train_loss"] == [(10, 3.0), (20, f32(1.3)), (30, f32(1.2))]
    assert tags["step/loss"] == [(5, f32(3.1)), (10, f32(3.2))] + [(s, f32(1.0 + s / 100)) for s in (15, 20, 25, 30)]
    assert "epoch/top_1" not in tags  # None: not validated, no point


def test_sinks_switched_on_at_a_resume_start_from_the_log(tmp_path):
    pytest.importorskip("tensorboard")
    first = logger_at(tmp_path, 0, 0)
    for epoch in range(2):
        first.log(epoch_record(epoch, 3.0 - epoch))
    first.close()
    assert not (tmp_path / "epochs.csv").exists() and not (tmp_path / "tensorboard").exists()
    second = logger_at(tmp_path, 2, 2 * STEPS_PER_EPOCH, tensorboard=True, csv=True)
    second.log(epoch_record(2, 1.0, top_1_no_ema=0.5))  # a field first seen now: a new last column
    second.close()
    header, rows, text = read_csv(tmp_path / "epochs.csv")
    assert header[-1] == "top_1_no_ema" and text.count("epoch,step,") == 1
    assert [(row[0], row[-1]) for row in rows] == [("0", ""), ("1", ""), ("2", "0.5")]
    assert tensorboard_scalars(tmp_path / "tensorboard")["epoch/train_loss"] == [(10, 3.0), (20, 2.0), (30, 1.0)]


def test_other_ranks_and_a_logger_without_sinks_write_only_what_they_did(tmp_path):
    quiet = RunLogger(tmp_path / "rank1", enabled=False,
                      options=SinkOptions(tensorboard=True, csv=True, step_every=1))
    quiet.open(epoch=0, step=0)
    quiet.log(epoch_record(0, 1.0))
    quiet.steps([(10, 1.0, 0.1)])
    quiet.close()
    assert not (tmp_path / "rank1").exists()
    plain = logger_at(tmp_path / "plain", 0, 0)
    plain.log(epoch_record(0, 1.0))
    plain.steps([(10, 1.0, 0.1)])  # per-step points go to TensorBoard only, never to log.jsonl
    plain.close()
    assert [r["type"] for r in plain.records()] == ["epoch"]
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["log.jsonl"]


def test_tensorboard_without_the_package_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    from ffcv_imagenet.config import load_config

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    argv = ["--data.train_dataset=t.beton", "--data.val_dataset=v.beton", f"--logging.folder={tmp_path / 'run'}"]
    assert load_config(argv)["logging"]["tensorboard"] is False  # not asked for: not needed
    assert train.main([*argv, "--logging.tensorboard=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "logging.tensorboard=1 needs the tensorboard package" in err
    assert "pip install tensorboard" in err
    assert not (tmp_path / "run").exists()
