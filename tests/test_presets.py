"""Presets: each loads strictly, each runs a few steps end to end, and the FFCV presets resolve to
the numbers ../shared/ANCHORS.md states for them (so that presets and documentation cannot drift).
"""

import json
import re
from pathlib import Path

import pytest
import torch

from ffcv_imagenet import train
from ffcv_imagenet.config import ConfigError, load_config
from ffcv_imagenet.schedules import lr_at, resolution_at

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = ROOT.parent / "shared" / "ANCHORS.md"
PRESETS = sorted(p for folder in ("rn50_configs", "rn18_configs") for p in (ROOT / folder).glob("*.yaml")
                 if not p.name.startswith("_"))
DEMO_PRESET = ROOT / "ffcv_imagenet" / "presets" / "demo.yaml"
IMAGENETTE_PRESETS = sorted((ROOT / "imagenette_configs").glob("in128_*.yaml"))
ALL_PRESETS = PRESETS + IMAGENETTE_PRESETS + [DEMO_PRESET]

# From ../shared/ANCHORS.md ("Their rn50 recipe, as facts"): epochs -> (start_ramp, end_ramp).
ANCHOR_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}
# model -> (GPUs, global batch, peak lr, weight decay); rn18's batch and lr are those of
# ffcv-imagenet's rn18 presets (1 GPU x 1024, lr 0.5), which ANCHORS.md's rn18 row was run with.
ANCHOR_RECIPES = {"rn50": (8, 4096, 1.7, 1e-4), "rn18": (1, 1024, 0.5, 5e-5)}


def _load(preset, *extra):
    return load_config(["--config-file", str(preset), "--data.train_dataset=t.beton",
                        "--data.val_dataset=v.beton", "--training.distill_checkpoint=teacher.pt",
                        *extra])


def _plan(cfg, world_size):
    t = cfg["training"]
    return train.plan_batch(batch_size_per_gpu=t["batch_size"], world_size=world_size,
                            global_batch_size=t["global_batch_size"], base_lr=cfg["lr"]["lr"],
                            lr_scaling=cfg["lr"]["lr_scaling"])


def test_preset_files_exist():
    names = {p.name for p in PRESETS}
    for model in ("rn50", "rn18"):
        for epochs in ANCHOR_RAMPS:
            assert f"{model}_{epochs}_epochs.yaml" in names
    assert "rn50_he2016_90_epochs.yaml" in names
    assert {"rn50_tricks_cosine_120_epochs.yaml", "rn50_tricks_mixup_200_epochs.yaml",
            "rn50_tricks_distill_120_epochs.yaml"} <= names


@pytest.mark.parametrize("preset", ALL_PRESETS, ids=lambda p: p.name)
def test_preset_loads_strictly_and_states_its_reference(preset):
    cfg = _load(preset)
    assert cfg["meta"]["config_file"] == str(preset)
    first_lines = preset.read_text().split("\n", 6)[:6]
    header = " ".join(line for line in first_lines if line.startswith("#"))
    if preset in IMAGENETTE_PRESETS:  # the leaderboard figure, labelled as a reference
        assert "leaderboard" in header and "reference" in header, preset
    elif preset != DEMO_PRESET:  # each ImageNet preset names its reference and where it comes from
        assert "ANCHORS.md" in header and "Reference" in header, preset


def test_a_dead_key_in_a_preset_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'rn50_configs' / 'rn50_16_epochs.yaml'}\ntraining:\n  bn_wd: 0\n")
    with pytest.raises(ConfigError, match=r"training\.bn_wd"):
        _load(bad)


@pytest.mark.parametrize("model", ["rn50", "rn18"])
@pytest.mark.parametrize("epochs", sorted(ANCHOR_RAMPS))
def test_ffcv_preset_resolves_to_anchor_numbers(model, epochs):
    cfg = _load(ROOT / f"{model}_configs" / f"{model}_{epochs}_epochs.yaml")
    gpus, global_batch, peak_lr, weight_decay = ANCHOR_RECIPES[model]
    assert cfg["model"]["arch"] == {"rn50": "resnet50", "rn18": "resnet18"}[model]
    assert cfg["training"]["epochs"] == epochs
    assert cfg["training"]["weight_decay"] == pytest.approx(weight_decay)
    assert cfg["training"]["label_smoothing"] == pytest.approx(0.1)
    assert cfg["training"]["use_blurpool"] and cfg["validation"]["lr_tta"]
    assert cfg["validation"]["resolution"] == 256
    assert cfg["lr"]["lr_schedule_type"] in ("triangular", "cyclic") and cfg["lr"]["lr_peak_epoch"] == 2
    # On the reference's GPU count and on one GPU: the same global batch and peak lr.
    for world_size in sorted({gpus, 1}):
        plan = _plan(cfg, world_size)
        assert plan["global_batch_size"] == global_batch
        assert plan["peak_lr"] == pytest.approx(peak_lr)
        assert plan["accum_steps"] == gpus // world_size
    r = cfg["resolution"]
    start, end = ANCHOR_RAMPS[epochs]
    assert (r["min_res"], r["max_res"], r["start_ramp"], r["end_ramp"]) == (160, 192, start, end)
    at = [resolution_at(e, min_res=160, max_res=192, start_ramp=r["start_ramp"], end_ramp=r["end_ramp"])
          for e in range(epochs)]
    assert at[0] == 160 and at[start] == 160 and at[-1] == 192 and at == sorted(at)


def test_anchor_tables_match_this_test():
    """The numbers above are ANCHORS.md's; re-read them from the file when it is there."""
    if not ANCHORS.exists():
        pytest.skip(f"{ANCHORS} not present (outside the development tree)")
    text = ANCHORS.read_text()
    ramps = re.search(r"ramp epochs for ([\d/]+)\s+epochs: ([\d\-, ]+)", text.replace("\n", " "))
    assert ramps, "ANCHORS.md no longer states the ramps in the expected sentence"
    epochs = [int(e) for e in ramps.group(1).split("/")]
    pairs = [tuple(int(v) for v in p.strip().split("-")) for p in ramps.group(2).split(",") if p.strip()]
    assert dict(zip(epochs, pairs)) == ANCHOR_RAMPS
    assert "per-GPU batch 512 on 8 GPUs, peak lr 1.7" in text.replace("\n", " ")
    assert "weight decay 1e-4 (5e-5 for rn18)" in text.replace("\n", " ")


def test_he2016_preset():
    cfg = _load(ROOT / "rn50_configs" / "rn50_he2016_90_epochs.yaml")
    t, lr_cfg = cfg["training"], cfg["lr"]
    plan = _plan(cfg, 8)
    assert (plan["global_batch_size"], plan["accum_steps"], t["batch_size"]) == (256, 1, 32)
    assert plan["peak_lr"] == pytest.approx(0.1)
    assert t["nesterov"] and t["momentum"] == 0.9 and t["weight_decay"] == 1e-4 and t["epochs"] == 90
    assert t["label_smoothing"] == 0.1 and cfg["model"]["zero_init_residual"]
    assert t["precision"] == "auto"  # mixed precision on a GPU: bf16 where native, else fp16
    assert cfg["resolution"]["min_res"] == cfg["resolution"]["max_res"] == 224
    assert cfg["validation"]["resolution"] == 224 and not cfg["validation"]["lr_tta"]

    def lr(epoch):
        return lr_at(epoch, schedule=lr_cfg["lr_schedule_type"], peak_lr=plan["peak_lr"], epochs=90,
                     warmup_epochs=lr_cfg["warmup_epochs"], milestones=tuple(lr_cfg["milestones"]),
                     step_ratio=lr_cfg["step_ratio"])

    assert lr(0) == 0 and lr(2.5) == pytest.approx(0.05) and lr(5) == pytest.approx(0.1)
    assert lr(29.99) == pytest.approx(0.1) and lr(30) == pytest.approx(0.01)
    assert lr(60) == pytest.approx(0.001) and lr(80) == pytest.approx(1e-4) and lr(89.9) == pytest.approx(1e-4)


def test_tricks_presets():
    cosine = _load(ROOT / "rn50_configs" / "rn50_tricks_cosine_120_epochs.yaml")
    assert cosine["model"]["resnet_d"] and cosine["lr"]["lr_schedule_type"] == "cosine"
    assert cosine["training"]["epochs"] == 120 and cosine["lr"]["warmup_epochs"] == 5
    assert _plan(cosine, 8)["peak_lr"] == pytest.approx(0.4)
    assert _plan(cosine, 8)["global_batch_size"] == 1024
    mixup = _load(ROOT / "rn50_configs" / "rn50_tricks_mixup_200_epochs.yaml")
    assert mixup["training"]["mixup_alpha"] == 0.2 and mixup["training"]["epochs"] == 200
    assert mixup["model"]["resnet_d"]
    distill = _load(ROOT / "rn50_configs" / "rn50_tricks_distill_120_epochs.yaml")
    assert distill["training"]["distill_arch"] == "resnet152"
    assert distill["training"]["distill_temperature"] == 20
    with pytest.raises(ConfigError, match="distill_checkpoint"):
        load_config(["--config-file", str(ROOT / "rn50_configs" / "rn50_tricks_distill_120_epochs.yaml"),
                     "--data.train_dataset=t.beton", "--data.val_dataset=v.beton"])


# --------------------------------------------------------------------------- a few steps each

@pytest.fixture(scope="module")
def tiny_betons(tmp_path_factory):
    from ffcv_imagenet.synthetic import make_image_folder
    from ffcv_imagenet.writer import write_dataset

    root = tmp_path_factory.mktemp("preset_data")
    paths = {}
    for split, per_class, seed in (("train", 2, 0), ("val", 1, 1)):
        folder = make_image_folder(root / split, images_per_class=per_class, size_px=40, seed=seed)
        paths[split] = root / f"{split}.beton"
        write_dataset(folder, paths[split], split=split, max_resolution=40, num_workers=1, progress=False)
    return paths


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    import torchvision

    path = tmp_path_factory.mktemp("teacher") / "resnet18_10_classes.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


@pytest.mark.parametrize("preset", ALL_PRESETS, ids=lambda p: p.name)
def test_preset_runs_a_few_steps(preset, tiny_betons, teacher_checkpoint, tmp_path):
    """The preset's model, optimizer, schedule, losses and augmentation, on 20 tiny images:
    per-GPU batch 4 and global batch 8 (2 accumulation steps), one epoch of 2 optimizer steps."""
    cfg = _load(preset)
    overrides = [
        f"--data.train_dataset={tiny_betons['train']}", f"--data.val_dataset={tiny_betons['val']}",
        "--data.num_workers=1", "--training.batch_size=4", "--training.global_batch_size=8",
        "--training.epochs=1", "--resolution.min_res=32", "--resolution.max_res=32",
        "--validation.resolution=32", "--validation.batch_size=5", f"--logging.folder={tmp_path / 'run'}",
        "--logging.progress=0", "--training.device=cpu",
    ]
    if cfg["lr"]["lr_schedule_type"] in ("triangular", "cyclic"):
        overrides.append("--lr.lr_peak_epoch=0.5")
    else:
        overrides.append(f"--lr.warmup_epochs={min(cfg['lr']['warmup_epochs'], 0.5)}")
    if cfg["training"]["distill_arch"]:  # a small teacher stands in for the ResNet-152
        overrides += ["--training.distill_arch=resnet18", f"--training.distill_checkpoint={teacher_checkpoint}"]
    assert train.main(["--config-file", str(preset), *overrides]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["val_count"] == 10
    assert torch.isfinite(torch.tensor(epochs[0]["train_loss"]))
    params = json.loads((tmp_path / "run" / "params.json").read_text())
    assert params["derived"]["accum_steps"] == 2 and params["derived"]["steps_per_epoch"] == 2
    assert params["model"]["arch"] == cfg["model"]["arch"]
    assert params["config_file"] == str(preset)
