"""The training engine end to end on a tiny generated .beton pair (10 classes, 32 px, resnet18):
logs and their fields, gradient accumulation, batch planning, evaluation against a hand
computation, kill-and-resume equivalence, 2-process gloo runs through torchrun (one that succeeds,
one that stops at a time limit, one whose rank 1 dies), eval_only, and the refusals (class lists,
a loader with no step).

The slow tests run subprocesses (each pays ffcv's numba compilation again); they are marked `slow`
and run by default. The uninterrupted reference run is in this process and the killed one in a
subprocess: both use 1 torch thread and 1 decoding thread, so their weights are bitwise equal."""

import gc
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine_data import (EPOCHS, REPO, VAL_IMAGES, engine_env, records, run_args, shared_betons,
                         tensorboard_scalars, torchrun_2)
from ffcv_imagenet import distributed, train
from ffcv_imagenet.checkpoint import load_checkpoint
from ffcv_imagenet.config import load_config

# numba's finalizers print KeyErrors when ffcv's compiled pipelines are collected (harmless)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

KILL_AT = "1:4"  # SIGKILL after optimizer step 4 of epoch 1 (of 10)
EPOCH_FIELDS = ("epoch", "lr", "resolution", "train_loss", "train_images_per_s", "top_1", "top_5",
                "val_loss", "val_count", "epoch_s", "elapsed_s", "time")
SUMMARY_FIELDS = ("epochs", "top_1", "top_5", "elapsed_s", "startup_s", "total_images",
                  "mean_images_per_s", "time")


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    yield shared_betons(tmp_path_factory)
    gc.collect()  # collect ffcv's pipelines here, where the numba warnings above are filtered


@pytest.fixture(scope="module")
def reference_run(betons, tmp_path_factory):
    """One uninterrupted 3-epoch run, in this process: (folder, wall seconds of the call)."""
    folder = tmp_path_factory.mktemp("runs") / "reference"
    settings = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    started = time.time()
    assert train.main(run_args(*betons, folder), launched_at=started) == 0
    wall_s = time.time() - started
    # fit put back the torch settings it changed (threads, deterministic algorithms)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == settings
    return folder, wall_s


# --------------------------------------------------------------------------- pure decisions

def test_plan_batch_preset_global_batch_on_one_process():
    # rn50 preset: 8 GPUs x 512 = 4096 images per step; on 1 process, 8 accumulation steps
    plan = train.plan_batch(batch_size_per_gpu=512, world_size=1, global_batch_size=4096,
                            base_lr=1.7, lr_scaling="none")
    assert (plan["global_batch_size"], plan["accum_steps"], plan["peak_lr"]) == (4096, 8, 1.7)
    assert "4096 = 512 per process x 1 process(es) x 8 accumulation step(s)" in plan["message"]
    plan = train.plan_batch(batch_size_per_gpu=512, world_size=8, global_batch_size=4096,
                            base_lr=1.7, lr_scaling="none")
    assert (plan["accum_steps"], plan["peak_lr"]) == (1, 1.7)


def test_plan_batch_non_dividing_batch_scales_lr_linearly():
    # the user lowered the per-GPU batch to 384: 4096 is not a multiple of 384 x 2
    plan = train.plan_batch(batch_size_per_gpu=384, world_size=2, global_batch_size=4096,
                            base_lr=0.425, lr_scaling="linear")
    assert plan["accum_steps"] == 5 and plan["global_batch_size"] == 3840
    assert plan["requested_global_batch_size"] == 4096
    assert plan["peak_lr"] == pytest.approx(0.425 * 3840 / 256)
    assert "does not divide" in plan["message"] and "scaled linearly" in plan["message"]
    plan = train.plan_batch(batch_size_per_gpu=384, world_size=2, global_batch_size=4096,
                            base_lr=1.7, lr_scaling="none")
    assert plan["peak_lr"] == 1.7 and "NOT rescaled" in plan["message"]


def test_plan_batch_default_global_batch_is_per_gpu_times_world():
    plan = train.plan_batch(batch_size_per_gpu=256, world_size=4, global_batch_size=0,
                            base_lr=0.5, lr_scaling="linear")
    assert (plan["global_batch_size"], plan["accum_steps"], plan["peak_lr"]) == (1024, 1, 2.0)


# --------------------------------------------------------------------------- gradient accumulation

def small_net():
    """No BatchNorm: with BN, micro-batches normalise by their own statistics (as per-GPU BN does
    under DDP), so accumulation equals the large batch only for the gradient of BN-free nets."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))


def one_epoch(model, batches, *, steps, accum):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    trainer = train.Trainer(model, optimizer, torch.device("cpu"), "fp32", accum_steps=accum,
                            loss=train.LossOptions(label_smoothing=0.1))
    return train.train_one_epoch(trainer, batches, epoch=0, steps_per_epoch=steps,
                                 lr_fn=lambda e: 0.1 * (1 - e / 2))


def test_auto_precision_is_bf16_only_on_a_cpu_that_runs_it_natively(monkeypatch, capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(distributed, "cpu_has_fast_bf16", lambda: True)
    assert train.resolve_precision("auto", cpu) == "bf16"
    assert train.resolve_precision("bf16", cpu) == "bf16" and capsys.readouterr().err == ""
    monkeypatch.setattr(distributed, "cpu_has_fast_bf16", lambda: False)
    assert train.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(train, "cuda_has_fast_bf16", lambda device: True)   # Ampere and later
    assert train.resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(train, "cuda_has_fast_bf16", lambda device: False)  # Volta, Turing
    assert train.resolve_precision("auto", cuda) == "fp16"
    assert train.resolve_precision("bf16", cpu) == "bf16"  # asked for: kept, with a warning
    assert "no native bf16" in capsys.readouterr().err
    assert train.resolve_precision("bf16", cuda) == "bf16" and capsys.readouterr().err == ""


def test_fast_bf16_check_falls_back_to_the_cpu_capability(monkeypatch):
    import types

    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())  # no private op
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert distributed.cpu_has_fast_bf16() is True
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert distributed.cpu_has_fast_bf16() is False


def test_gradient_accumulation_equals_the_large_batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (16,), generator=g)
    large, accumulated = small_net(), small_net()
    big = one_epoch(large, [(images[:8], labels[:8]), (images[8:], labels[8:])], steps=2, accum=1)
    micro = [(images[i:i + 2], labels[i:i + 2]) for i in range(0, 16, 2)]
    small = one_epoch(accumulated, micro, steps=2, accum=4)
    for p, q in zip(large.parameters(), accumulated.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert big["images"] == small["images"] == 16
    assert big["train_loss"] == pytest.approx(small["train_loss"], rel=1e-6)
    assert big["lr"] == small["lr"] == pytest.approx(0.1 * (1 - 0.5 / 2))  # lr of the 2nd step


def test_micro_batches_that_do_not_fill_a_step_are_skipped():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=g),
                torch.randint(0, 5, (2,), generator=g)) for _ in range(5)]
    stats = one_epoch(small_net(), batches, steps=2, accum=2)
    assert stats["images"] == 8


def test_mixup_distillation_and_jitter_run_in_the_loop():
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g),
                torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]
    model, teacher = small_net(), small_net().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = train.Trainer(model, optimizer, torch.device("cpu"), "bf16",
                            loss=train.LossOptions(label_smoothing=0.1, mixup_alpha=0.2,
                                                   num_classes=5, teacher=teacher),
                            color_jitter=0.4, pca_lighting=0.1)
    stats = train.train_one_epoch(trainer, batches, epoch=0, steps_per_epoch=2,
                                  lr_fn=lambda e: 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(stats["train_loss"])) and stats["images"] == 8
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts, by name, what in a training step would make the host wait for a GPU: a tensor read
    into Python (item, tolist, bool/float/int/index, numpy) and a tensor built from Python data
    (torch.tensor / as_tensor: a blocking copy when the target is a GPU)."""

    NAMES = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "tensor",
             "as_tensor"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def host_reads(steps: int, accum: int = 1) -> list:
    """Host reads of one train_one_epoch of `steps` steps with every on-device feature on: label
    smoothing, mixup, colour jitter, PCA lighting, an EMA, accumulation."""
    from ffcv_imagenet.optim import WeightEMA, create_optimizer

    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g),
                torch.randint(0, 5, (4,), generator=g)) for _ in range(steps * accum)]
    model = small_net()
    optimizer = create_optimizer(model, name="sgd", lr=0.1, momentum=0.9, nesterov=True)
    trainer = train.Trainer(model, optimizer, torch.device("cpu"), "fp32", accum_steps=accum,
                            ema=WeightEMA(model, 0.9),
                            loss=train.LossOptions(label_smoothing=0.1, mixup_alpha=0.2,
                                                   num_classes=5),
                            color_jitter=0.4, pca_lighting=0.1)
    with HostReads() as reads:
        train.train_one_epoch(trainer, batches, epoch=0, steps_per_epoch=steps, lr_fn=lambda e: 0.1,
                              generator=torch.Generator().manual_seed(0))
    return reads.calls


def test_the_training_step_never_reads_the_device_from_the_host():
    """No host-device sync per step: the loop reads the loss once, at the end of the epoch, so an
    epoch of 7 steps makes as many host reads as one of 2 (a per-step `.item()`, `float(loss)`,
    `if loss > x`, or a `torch.tensor(...)` per batch would add one per step)."""
    host_reads(1)  # builds the per-device constants once, as the first step of a run does
    short, long = host_reads(2), host_reads(7, accum=2)
    assert short == long, (short, long)
    assert short == ["tolist"]  # the end-of-epoch totals, read once


def test_step_losses_reach_the_hook_on_the_window_reads_only():
    """45 steps of 2 micro-batches (3 and 5 images): the per-step losses arrive in three calls, at
    the two window reads and the end-of-epoch read, and those three are all the host reads; each
    step's loss is its micro-batches' image-weighted mean, its lr the one the step used."""
    import copy

    import torch.nn.functional as F

    from ffcv_imagenet.data import prepare_batch

    steps, window = 45, train.NONFINITE_WINDOW
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                torch.randint(0, 5, (n,), generator=g)) for _ in range(steps) for n in (3, 5)]
    model = small_net()
    initial = copy.deepcopy(model)
    trainer = train.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"),
                            "fp32", accum_steps=2)
    calls = []
    with HostReads() as reads:
        stats = train.train_one_epoch(trainer, batches, epoch=1, steps_per_epoch=steps,
                                      lr_fn=lambda e: 0.1 / e, hooks=train.EpochHooks(on_losses=calls.append))
    assert reads.calls == ["tolist"] * 3
    assert [[n for n, _, _ in points] for points in calls] == [
        list(range(1, window + 1)), list(range(window + 1, 2 * window + 1)), list(range(2 * window + 1, steps + 1))]
    points = [p for points in calls for p in points]
    assert [lr for _, _, lr in points] == [0.1 / (1 + (n - 1) / steps) for n, _, _ in points]
    with torch.no_grad():  # step 1: both micro-batches meet the initial weights
        first = [F.cross_entropy(initial(prepare_batch(x, dtype=torch.float32)), y).item() * len(y)
                 for x, y in batches[:2]]
    assert points[0][1] == pytest.approx(sum(first) / 8, rel=1e-6)
    # every step has 8 images: the epoch's loss is the mean of its steps'
    assert stats["train_loss"] == pytest.approx(sum(loss for _, loss, _ in points) / steps, rel=1e-9)


class PixelLogits(torch.nn.Module):
    """Logits = the first row of channel 0 of the normalised image (one value per column)."""

    def forward(self, x):
        return x[:, 0, 0, :].float()


def test_evaluate_against_hand_computation():
    from ffcv_imagenet.data import IMAGENET_MEAN, IMAGENET_STD

    pixels = torch.tensor([[10, 200, 30, 40, 50, 60],     # label 1: top-1 right
                           [10, 20, 30, 40, 50, 60],      # label 0: ranked 6th, not in top-5
                           [90, 20, 30, 40, 80, 70]],     # label 4: 2nd, in top-5 only
                          dtype=torch.uint8)
    labels = torch.tensor([1, 0, 4])
    images = torch.zeros(3, 3, 2, 6, dtype=torch.uint8)
    images[:, 0, 0, :] = pixels
    batches = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    result = train.evaluate(PixelLogits(), batches, device=torch.device("cpu"), precision="fp32",
                            lr_tta=False)
    logits = (pixels.float() - 255 * IMAGENET_MEAN[0]) / (255 * IMAGENET_STD[0])
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert result["val_count"] == 3
    assert result["top_1"] == pytest.approx(1 / 3) and result["top_5"] == pytest.approx(2 / 3)
    assert result["val_loss"] == pytest.approx(expected_loss, rel=1e-6)
    # flip TTA averages the logits with those of the mirrored image (columns reversed)
    tta = train.evaluate(PixelLogits(), batches, device=torch.device("cpu"), precision="fp32",
                         lr_tta=True)
    expected_tta = torch.nn.functional.cross_entropy((logits + logits.flip(1)) / 2, labels).item()
    assert tta["val_loss"] == pytest.approx(expected_tta, rel=1e-6)


# --------------------------------------------------------------------------- one full run

def test_run_logs_every_field_and_the_loss_falls(reference_run):
    folder, wall_s = reference_run
    epochs = records(folder, "epoch")
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS))  # once each
    for r in epochs:
        for field in EPOCH_FIELDS:
            assert r.get(field) is not None, (field, r)
        assert r["resolution"] == 32 and r["val_count"] == VAL_IMAGES
        assert 0 <= r["top_5"] <= 1 and r["top_1"] <= r["top_5"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"], [r["train_loss"] for r in epochs]

    starts = records(folder, "start")
    assert len(starts) == 1 and starts[0]["startup_s"] > 0 and starts[0]["resumed_from_epoch"] is None
    summaries = records(folder, "summary")
    assert len(summaries) == 1  # the final evaluation is logged once, not twice
    summary = summaries[0]
    for field in SUMMARY_FIELDS:
        assert summary.get(field) is not None, field
    assert summary["top_1"] == epochs[-1]["top_1"] and summary["total_images"] == EPOCHS * 80
    assert records(folder)[-1]["type"] == "summary"

    # elapsed_s counts from the first training step: it excludes start-up (loaders, compiling)
    assert [r["elapsed_s"] for r in epochs] == sorted(r["elapsed_s"] for r in epochs)
    assert 0 < epochs[0]["elapsed_s"] <= epochs[0]["epoch_s"]
    assert summary["elapsed_s"] == epochs[-1]["elapsed_s"]
    assert summary["startup_s"] == starts[0]["startup_s"]
    assert 0 < summary["startup_s"] and summary["startup_s"] + summary["elapsed_s"] <= wall_s

    # the optimizer the engine built: no decay on any BN (downsample BNs included) or bias
    checkpoint = load_checkpoint(folder / "checkpoint.pt")
    groups = checkpoint["optimizer"]["param_groups"]
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 1e-4), ("no_decay", 0.0)]
    bns = [n[:-len(".running_mean")] for n in checkpoint["model"] if n.endswith(".running_mean")]
    assert "layer2.0.downsample.1" in bns
    assert len(groups[1]["params"]) == 2 * len(bns) + 1  # every BN weight and bias, and fc.bias
    convs = [n for n in checkpoint["model"] if n.endswith(".weight") and n[:-len(".weight")] not in bns]
    assert len(groups[0]["params"]) == len(convs)  # conv weights and fc.weight

    assert checkpoint["epoch"] == EPOCHS and checkpoint["step"] == EPOCHS * 10
    assert checkpoint["config"]["training"]["epochs"] == EPOCHS and len(checkpoint["wnids"]) == 10


def test_run_writes_params_and_env(reference_run):
    folder, _ = reference_run
    params = json.loads((folder / "params.json").read_text())
    assert params["training"]["epochs"] == EPOCHS and params["lr"]["lr"] == 0.02
    derived = params["derived"]
    assert (derived["global_batch_size"], derived["accum_steps"], derived["peak_lr"]) == (8, 1, 0.02)
    assert derived["steps_per_epoch"] == 10 and derived["world_size"] == 1
    assert derived["precision"] == ("bf16" if distributed.cpu_has_fast_bf16() else "fp32")
    assert derived["train_samples"] == 80
    assert params["argv"] == run_args(*[params["data"][k] for k in ("train_dataset", "val_dataset")],
                                      folder)

    env = json.loads((folder / "env.json").read_text())
    assert torch.__version__.startswith(env["versions"]["torch"])
    assert env["versions"]["ffcv"] and env["python"] and env["world_size"] == 1
    assert env["device_count"] == torch.cuda.device_count() == len(env["device_names"])
    if (REPO / ".git").exists() and Path(train.__file__).is_relative_to(REPO):
        assert env["git_commit"]


def test_a_finished_run_is_not_overwritten(betons, reference_run):
    folder, _ = reference_run
    with pytest.raises(FileExistsError, match="already holds a run .* and training.resume=0"):
        train.fit(load_config(run_args(*betons, folder, "--training.resume=0")))


def test_eval_only_prints_the_checkpoint_top1(betons, reference_run, capsys):
    folder, _ = reference_run
    _, val = betons
    capsys.readouterr()
    assert train.main([f"--data.val_dataset={val}", "--training.eval_only=1",
                       f"--training.checkpoint={folder / 'checkpoint.pt'}", "--training.device=cpu",
                       "--training.cpu_threads=1", "--data.num_workers=1", "--logging.progress=0",
                       "--validation.resolution=32", "--validation.lr_tta=0"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = records(folder, "summary")[0]
    assert printed["type"] == "eval" and printed["val_count"] == VAL_IMAGES
    assert printed["top_1"] == pytest.approx(summary["top_1"])
    assert printed["epoch"] == EPOCHS


# --------------------------------------------------------------------------- kill and resume

@pytest.mark.slow
def test_kill_mid_epoch_and_resume_ends_with_the_same_weights(betons, reference_run, tmp_path):
    folder = tmp_path / "killed"
    out = subprocess.run([sys.executable, "-m", "ffcv_imagenet.train", *run_args(*betons, folder)],
                         env=engine_env(**{train.KILL_ENV: KILL_AT}), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == -9, out.stderr[-3000:]
    assert [r["epoch"] for r in records(folder, "epoch")] == [0]
    assert load_checkpoint(folder / "checkpoint.pt")["epoch"] == 1
    killed_elapsed = records(folder, "epoch")[0]["elapsed_s"]

    assert train.main(run_args(*betons, folder, "--training.resume=1"), launched_at=time.time()) == 0

    reference, _ = reference_run
    expected = load_checkpoint(reference / "checkpoint.pt")
    resumed = load_checkpoint(folder / "checkpoint.pt")
    assert resumed["epoch"] == expected["epoch"] == EPOCHS
    assert resumed["model"].keys() == expected["model"].keys()
    different = [k for k in expected["model"] if not torch.equal(expected["model"][k], resumed["model"][k])]
    assert not different, different
    for a, b in zip(expected["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])

    # one log: every epoch once, a start line per launch, one summary
    epochs = records(folder, "epoch")
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS))
    assert [r["train_loss"] for r in epochs] == [r["train_loss"] for r in records(reference, "epoch")]
    starts = records(folder, "start")
    assert [r["resumed_from_epoch"] for r in starts] == [None, 1]
    (summary,) = records(folder, "summary")
    assert summary["startup_s"] == starts[0]["startup_s"]  # the first launch's start-up counts
    assert summary["total_images"] == EPOCHS * 80  # the replayed part of epoch 1 is not counted twice
    assert epochs[1]["elapsed_s"] > killed_elapsed  # elapsed time continues across the restart


def test_expected_epoch_s_scales_by_pixels_and_adds_the_validation_passes():
    args = dict(last_train_s=900.0, last_res=96, train_images=9469, val_images=3925, val_res=128)
    assert train.expected_epoch_s(**args, next_res=96, val_passes=0, last_val_s=None) == 900.0
    assert train.expected_epoch_s(**args, next_res=128, val_passes=0, last_val_s=245.0) == pytest.approx(1600.0)
    assert train.expected_epoch_s(**args, next_res=96, val_passes=1, last_val_s=245.0) == 1145.0
    # the last epoch of a run with an EMA validates twice (the average and the raw weights)
    assert train.expected_epoch_s(**args, next_res=96, val_passes=2, last_val_s=245.0) == 1390.0
    # before any validation in this launch: a forward pass (a third of a step) over the val images
    guess = train.expected_epoch_s(**args, next_res=96, val_passes=1, last_val_s=None) - 900.0
    assert guess == pytest.approx(300.0 * 3925 / 9469 * (128 / 96) ** 2)


def test_resume_names_the_settings_that_changed_and_only_those():
    saved = {"lr": {"lr": 0.004, "flat_fraction": 0.72}, "training": {"epochs": 20, "resume": False},
             "data": {"train_dataset": "/old/train.beton"}}
    current = {"lr": {"lr": 0.01, "flat_fraction": 0.72}, "training": {"epochs": 20, "resume": True},
               "data": {"train_dataset": "/new/train.beton"}, "meta": {"argv": ["--training.resume=1"]}}
    assert train.resume_changes(saved, current) == ["lr.lr: 0.004 -> 0.01"]
    assert train.resume_changes(saved, {**current, "lr": saved["lr"]}) == []
    # a setting the checkpoint's config lacks (added to the engine since) is not a change
    assert train.resume_changes({}, current) == []
    # the same settings on a machine where precision=auto picks another precision
    auto = {"training": {"precision": "auto"}}
    assert train.resume_changes(auto, auto, saved_precision="bf16", precision="fp32") == [
        "precision: bf16 -> fp32 (training.precision='auto' on this machine)"]
    assert train.resume_changes(auto, auto, saved_precision="fp32", precision="fp32") == []


@pytest.mark.slow
def test_stop_after_s_ends_at_an_epoch_and_resume_finishes_the_same_run(betons, reference_run, tmp_path, capsys):
    folder = tmp_path / "stopped"
    # any epoch outlasts 1 ms: the launch ends after the first epoch, checkpointed
    assert train.main(run_args(*betons, folder, "--training.stop_after_s=0.001"), launched_at=time.time()) == 0
    assert "stopped after epoch 1/3" in capsys.readouterr().out
    assert [r["epoch"] for r in records(folder, "epoch")] == [0]
    (stopped,) = records(folder, "stopped")
    assert stopped["epoch"] == 1 and stopped["next_epoch_expected_s"] > 0
    assert not records(folder, "summary") and load_checkpoint(folder / "checkpoint.pt")["epoch"] == 1

    assert train.main(run_args(*betons, folder, "--training.resume=1", "--training.stop_after_s=3600"),
                      launched_at=time.time()) == 0
    assert "differ" not in capsys.readouterr().err  # the time limit and resume are not changes to the run
    reference, _ = reference_run
    expected, resumed = load_checkpoint(reference / "checkpoint.pt"), load_checkpoint(folder / "checkpoint.pt")
    assert resumed["epoch"] == EPOCHS
    assert all(torch.equal(expected["model"][k], resumed["model"][k]) for k in expected["model"])
    assert [r["epoch"] for r in records(folder, "epoch")] == list(range(EPOCHS))
    starts = records(folder, "start")
    assert [r["resumed_from_epoch"] for r in starts] == [None, 1]
    assert [r["argv"][-1] for r in starts] == ["--training.stop_after_s=0.001", "--training.stop_after_s=3600"]
    (summary,) = records(folder, "summary")
    assert summary["total_images"] == EPOCHS * 80  # nothing replayed

    # resumed again with another lr (a finished run: it evaluates once): the warning names it
    assert train.main(run_args(*betons, folder, "--training.resume=1", "--lr.lr=0.05"), launched_at=time.time()) == 0
    assert "lr.lr: 0.02 -> 0.05" in capsys.readouterr().err


RANGER = ("--training.optimizer=radam", "--training.lookahead_steps=3", "--training.adam_beta1=0.95",
          "--training.adam_beta2=0.99", "--training.adam_eps=1e-6", "--training.weight_decay=0.01",
          "--lr.lr=0.004", "--lr.lr_schedule_type=flat_cos", "--lr.flat_fraction=0.5",
          "--model.activation=mish", "--training.ema_decay=0.9", "--model.stem_pool=maxblur",
          "--model.self_attention=1")


@pytest.mark.slow
def test_ranger_flat_cos_mish_run_resumes_to_the_same_weights(betons, tmp_path, capsys):
    """RAdam + Lookahead (k=3, so the kill at step 4 of epoch 1 falls between two syncs), the
    flat-then-cosine schedule, Mish, the max-blur stem, self-attention (its spectral norm's power
    iteration state included) and a weight average, through the engine: killed and resumed
    equals straight, the weight average included; it is what validation and eval_only measure."""
    straight = tmp_path / "straight"
    assert train.main(run_args(*betons, straight, *RANGER), launched_at=time.time()) == 0
    lrs = [r["lr"] for r in records(straight, "epoch")]
    assert lrs[0] == pytest.approx(0.004)          # epoch 0 ends on the flat part (1.5 epochs)
    assert lrs[1] < 0.004 and lrs[2] < 1e-4      # the logged lr is the last step's (epoch 2.9)
    params = json.loads((straight / "params.json").read_text())
    assert params["model"]["activation"] == "mish" and params["training"]["lookahead_steps"] == 3
    assert params["model"]["self_attention"] and params["model"]["stem_pool"] == "maxblur"
    epochs = records(straight, "epoch")
    assert "top_1_no_ema" in epochs[-1] and not any("top_1_no_ema" in r for r in epochs[:-1])

    killed = tmp_path / "killed"
    out = subprocess.run([sys.executable, "-m", "ffcv_imagenet.train", *run_args(*betons, killed, *RANGER)],
                         env=engine_env(**{train.KILL_ENV: KILL_AT}), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == -9, out.stderr[-3000:]
    assert load_checkpoint(killed / "checkpoint.pt")["optimizer"]["lookahead"]["counter"] == 10
    assert train.main(run_args(*betons, killed, *RANGER, "--training.resume=1"), launched_at=time.time()) == 0

    expected, resumed = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(killed / "checkpoint.pt")
    different = [k for k in expected["model"] if not torch.equal(expected["model"][k], resumed["model"][k])]
    assert not different, different
    assert "layer1.1.bn2.1.gamma" in expected["model"] and expected["model"]["layer1.1.bn2.1.gamma"] != 0
    assert resumed["optimizer"]["lookahead"]["counter"] == expected["optimizer"]["lookahead"]["counter"] == 30
    for a, b in zip(expected["optimizer"]["lookahead"]["slow"], resumed["optimizer"]["lookahead"]["slow"]):
        assert torch.equal(a, b)
    assert resumed["ema"]["updates"] == expected["ema"]["updates"] == 30
    for k, v in expected["ema"]["module"].items():
        assert torch.equal(v, resumed["ema"]["module"][k]), k
    assert not torch.equal(expected["ema"]["module"]["fc.weight"], expected["model"]["fc.weight"])

    capsys.readouterr()
    _, val = betons
    assert train.main([f"--data.val_dataset={val}", "--training.eval_only=1",
                       f"--training.checkpoint={straight / 'checkpoint.pt'}", "--training.device=cpu",
                       "--training.cpu_threads=1", "--data.num_workers=1", "--logging.progress=0",
                       "--validation.resolution=32", "--validation.lr_tta=0"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["weights"] == "ema" and printed["val_loss"] == pytest.approx(epochs[-1]["val_loss"])


def test_resume_drops_epochs_the_checkpoint_does_not_hold(tmp_path):
    from ffcv_imagenet.logger import RunLogger

    # killed after logging epoch 1 but before its checkpoint was saved: the checkpoint holds 1 epoch
    logger = RunLogger(tmp_path, enabled=True)
    for record in ({"type": "start"}, {"type": "epoch", "epoch": 0}, {"type": "epoch", "epoch": 1}):
        logger.log(record)
    logger.keep_epochs_before(1)
    logger.log({"type": "start"})
    assert [(r["type"], r.get("epoch")) for r in logger.records()] == [
        ("start", None), ("epoch", 0), ("start", None)]
    with open(logger.log_path, "a") as f:
        f.write('{"type": "epoch", "epo')  # a line cut off by a kill mid-write
    assert [r["type"] for r in logger.records()] == ["start", "epoch", "start"]
    assert not RunLogger(tmp_path / "other", enabled=False).records()  # other ranks write nothing
    assert not (tmp_path / "other").exists()


# --------------------------------------------------------------------------- several processes

@pytest.mark.slow
def test_two_process_gloo_run_through_torchrun(betons, tmp_path):
    folder = tmp_path / "ddp"
    # 2 processes x 8 images x 2 accumulation steps = 32 images per step; 40 per rank = 5 batches
    # val batch 6: rank 0 evaluates 19 images in 4 batches (the last of one image), rank 1 18 in 3
    # TensorBoard (when installed) with a point per step: each step's loss is over both processes
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    argv = run_args(*betons, folder, "--training.epochs=1", "--training.global_batch_size=32",
                    "--training.deterministic=0", "--validation.batch_size=6", "--logging.csv=1",
                    f"--logging.tensorboard={int(tensorboard)}", "--logging.step_every=1")
    out = torchrun_2(argv)
    assert out.returncode == 0, out.stderr[-3000:]
    (epoch,) = records(folder, "epoch")  # only rank 0 writes
    if tensorboard:
        steps = tensorboard_scalars(folder / "tensorboard")["step/loss"]
        assert [n for n, _ in steps] == [1, 2]
        assert sum(loss for _, loss in steps) / 2 == pytest.approx(epoch["train_loss"], rel=1e-6)
    assert epoch["val_count"] == VAL_IMAGES  # 19 + 18: every val image once, none padded
    assert len(records(folder, "start")) == 1 and len(records(folder, "summary")) == 1
    assert records(folder, "summary")[0]["total_images"] == 64  # 2 steps x 32
    derived = json.loads((folder / "params.json").read_text())["derived"]
    assert (derived["world_size"], derived["accum_steps"], derived["global_batch_size"]) == (2, 2, 32)
    assert derived["steps_per_epoch"] == 2
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "checkpoint.pt", "env.json", "epochs.csv",
                                                       "log.jsonl", "params.json"] + ["tensorboard"] * tensorboard
    assert len((folder / "epochs.csv").read_text().splitlines()) == 2  # the header, epoch 0
    model_keys = load_checkpoint(folder / "checkpoint.pt")["model"].keys()
    assert "fc.weight" in model_keys and not any(k.startswith("module.") for k in model_keys)


@pytest.mark.slow
def test_two_processes_stop_together_at_the_time_limit(betons, tmp_path):
    folder = tmp_path / "ddp_stop"
    # every rank must leave at the same epoch (rank 0 decides and broadcasts): a rank that went on
    # would wait for the other in its first collective and the job would hang until the timeout
    argv = run_args(*betons, folder, "--training.epochs=2", "--training.global_batch_size=32",
                    "--training.deterministic=0", "--training.stop_after_s=0.001")
    out = torchrun_2(argv)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("stopped after epoch 1/2") == 1  # printed by rank 0 only
    assert [r["epoch"] for r in records(folder, "epoch")] == [0] and len(records(folder, "stopped")) == 1
    assert not records(folder, "summary") and load_checkpoint(folder / "checkpoint.pt")["epoch"] == 1


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_instead_of_hanging(betons, tmp_path):
    """Rank 1 dies after step 1: torchrun ends rank 0 too and the job fails, well before the
    process group's 600 s timeout (torchrun_2 kills and fails a job still running at 240 s)."""
    folder = tmp_path / "ddp_fail"
    out = torchrun_2(run_args(*betons, folder, "--training.epochs=1"),
                     **{train.KILL_ENV: "0:1:1"})  # rank 1 dies after step 1
    assert out.returncode != 0
    assert "ffcv_imagenet.train FAILED" in out.stderr and "local_rank: 1" in out.stderr
    assert not records(folder, "summary") and not records(folder, "epoch")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_run(betons, tmp_path):
    folder = tmp_path / "cuda"
    argv = run_args(*betons, folder, "--training.device=cuda", "--training.deterministic=0",
                    "--training.epochs=1", "--validation.batch_size=6", "--training.precision=fp16")
    assert train.main(argv, launched_at=time.time()) == 0
    assert json.loads((folder / "params.json").read_text())["derived"]["precision"] == "fp16"
    (epoch,) = records(folder, "epoch")
    assert epoch["val_count"] == VAL_IMAGES and epoch["train_loss"] == epoch["train_loss"]  # not NaN


def test_deterministic_on_cuda_only_warns_for_kernels_without_a_deterministic_version(capsys):
    """AdaptiveAvgPool2d's CUDA backward has no deterministic version and would raise under
    use_deterministic_algorithms(True): on CUDA the run warns instead (and says so at start)."""
    try:
        train.configure_determinism(True, torch.device("cuda"))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert "not bitwise reproducible" in capsys.readouterr().err
        train.configure_determinism(True, torch.device("cpu"))  # the CPU stays strict
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_with_compile_start_up_ends_after_the_first_step(monkeypatch):
    """torch.compile compiles in the first step: with it, the start-up callback runs after that
    step (compilation counts as start-up); the kill hook still runs."""
    started, killed = [], []
    monkeypatch.setattr(train, "_kill_hook", lambda epoch: killed.append)
    train._step_hook(0, lambda: started.append(1), compiled=True)(1)
    train._step_hook(0, lambda: started.append(2), compiled=False)(1)
    assert started == [1] and killed == [1, 1]


def test_ddp_options_keep_static_graph_away_from_accumulation_and_compile():
    assert train.ddp_options(compile_model=False, accum_steps=1) == {
        "gradient_as_bucket_view": True, "static_graph": True}
    assert not train.ddp_options(compile_model=False, accum_steps=2)["static_graph"]
    assert not train.ddp_options(compile_model=True, accum_steps=1)["static_graph"]


def cuda_batches(n, *, sync_mode_after_first=None):
    """n (uint8 channels-last, label) batches on GPU 0; with `sync_mode_after_first`, the CUDA
    sync debug mode is set to it once the first step (lazy state creation) is done, and put
    back before the loop's end-of-epoch read."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for k in range(n):
        images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda",
                               generator=g)
        labels = torch.randint(0, 10, (8,), device="cuda", generator=g)
        if k == 1 and sync_mode_after_first:
            torch.cuda.set_sync_debug_mode(sync_mode_after_first)
        yield images.contiguous(memory_format=torch.channels_last), labels
    torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_training_steps_never_sync(precision):
    """fp16 + GradScaler with the fused optimizer, bf16 without a scaler: steps 2-6 (mixup,
    jitter, lighting, EMA, accumulation) raise under set_sync_debug_mode('error') if anything in
    them waits on the host."""
    from ffcv_imagenet.models import create_model
    from ffcv_imagenet.optim import WeightEMA, create_optimizer

    device = torch.device("cuda", 0)
    model = create_model("resnet18", num_classes=10).to(device, memory_format=torch.channels_last)
    optimizer = create_optimizer(model, name="sgd", lr=0.1, momentum=0.9, nesterov=True)
    trainer = train.Trainer(model, optimizer, device, precision, accum_steps=2,
                            ema=WeightEMA(model, 0.9),
                            loss=train.LossOptions(label_smoothing=0.1, mixup_alpha=0.2,
                                                   num_classes=10),
                            color_jitter=0.4, pca_lighting=0.1)
    stats = train.train_one_epoch(
        trainer, cuda_batches(12, sync_mode_after_first="error"), epoch=0, steps_per_epoch=6,
        lr_fn=lambda e: 0.1, generator=torch.Generator(device=device).manual_seed(0))
    assert stats["images"] == 96 and stats["train_loss"] == stats["train_loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deterministic_run_on_cuda_trains(betons, tmp_path):
    folder = tmp_path / "cuda_deterministic"
    argv = run_args(*betons, folder, "--training.device=cuda", "--training.deterministic=1",
                    "--training.epochs=1", "--validation.batch_size=6")
    assert train.main(argv, launched_at=time.time()) == 0
    (epoch,) = records(folder, "epoch")
    assert epoch["val_count"] == VAL_IMAGES and epoch["train_loss"] == epoch["train_loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_ddp_with_accumulation_equals_eager_after_two_steps(tmp_path):
    import torch.distributed as dist

    from ffcv_imagenet.optim import create_optimizer

    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("nccl", init_method=store, rank=0, world_size=1)
    try:
        finals = []
        for compiled in (False, True):
            net = small_net().to("cuda", memory_format=torch.channels_last)
            ddp = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[0], **train.ddp_options(compile_model=compiled, accum_steps=2))
            model = torch.compile(ddp) if compiled else ddp
            optimizer = create_optimizer(net, name="sgd", lr=0.1, momentum=0.9)
            trainer = train.Trainer(model, optimizer, torch.device("cuda", 0), "fp32",
                                    accum_steps=2)
            train.train_one_epoch(trainer, cuda_batches(4), epoch=0, steps_per_epoch=2,
                                  lr_fn=lambda e: 0.1)
            finals.append([p.detach().clone() for p in net.parameters()])
        for eager, comp in zip(*finals):
            torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_ranks_share_one_gpu_with_gloo_syncbn_ema_accumulation_and_resume(betons, tmp_path):
    """More processes than GPUs: gloo, rank r on GPU r mod count; SyncBN, EMA, accumulation;
    a second launch resumes the run to its third epoch."""
    folder = tmp_path / "shared_gpu"
    argv = run_args(*betons, folder, "--training.device=cuda", "--training.deterministic=0",
                    "--training.global_batch_size=32", "--training.sync_bn=1",
                    "--training.ema_decay=0.9", "--validation.batch_size=6")
    first = torchrun_2([*argv, "--training.stop_after_s=0.001"])  # stops after epoch 1
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun_2([*argv, "--training.resume=1"])
    assert second.returncode == 0, second.stderr[-3000:]
    epochs = records(folder, "epoch")
    assert [r["epoch"] for r in epochs] == list(range(EPOCHS))
    assert all(r["val_count"] in (None, VAL_IMAGES) for r in epochs)
    assert records(folder, "summary")[-1]["top_1"] is not None


# --------------------------------------------------------------------------- refusals

def test_class_list_mismatch_is_refused_naming_both_files(betons, tmp_path):
    from ffcv_imagenet.metadata import read_metadata, write_metadata

    train_beton, val_beton = betons
    other = tmp_path / "other_val.beton"
    other.symlink_to(val_beton)
    meta = read_metadata(val_beton)
    write_metadata(other, {**meta, "wnids": meta["wnids"][:9] + ["zebra"]})
    with pytest.raises(ValueError) as e:
        train.fit(load_config(run_args(train_beton, other, tmp_path / "run")))
    message = str(e.value)
    assert str(train_beton) in message and str(other) in message
    assert "only in val: zebra" in message and "vstripes" in message


def test_a_loader_that_would_yield_no_step_is_an_error_saying_why(betons, tmp_path):
    # 80 images / batch 8 = 10 batches, but one optimizer step needs 1024 / 8 = 128 of them
    with pytest.raises(ValueError) as e:
        train.fit(load_config(run_args(*betons, tmp_path / "run", "--training.global_batch_size=1024")))
    message = str(e.value)
    assert "10 batches" in message and "128 micro-batches" in message
    assert "training.global_batch_size" in message
    with pytest.raises(ValueError, match="would yield no batch.*batch_size=128"):
        train.fit(load_config(run_args(*betons, tmp_path / "run2", "--training.batch_size=128")))
