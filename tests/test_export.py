"""export: a checkpoint saved by the project's own save function, exported, then loaded by
torchvision, timm and load_model; each mapping proven by equal logits in eval mode."""

import json

import pytest
import torch

from ffcv_imagenet import checkpoint as ckpt_io
from ffcv_imagenet import config, export
from ffcv_imagenet.models import create_model
from ffcv_imagenet.optim import WeightEMA

WNIDS = [f"n{index:08d}" for index in (7, 3, 5, 1, 9)]  # not sorted: the order must survive


def trained_looking(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and BN statistic moved off its initial value, so that a key loaded into
    the wrong place (or a buffer left out) changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator)
                moved = noise.abs() + 0.5 if name.endswith("running_var") else tensor * (1 + 0.2 * noise) + 0.02 * noise
                tensor.copy_(moved)
    return model


def save_run(folder, arch="resnet18", *, ema=False, top1s=(0.31, 0.42), wnids=WNIDS, **options):
    """A run folder as train leaves it: checkpoint.pt (the model channels-last, saved through
    torch.compile's wrapper, whose keys carry `_orig_mod.`), params-free log.jsonl and env.json."""
    cfg = config.defaults()
    cfg["model"].update(arch=arch, **{k: v for k, v in options.items() if k != "use_blurpool"})
    cfg["training"]["use_blurpool"] = options.get("use_blurpool", False)
    cfg["validation"].update(resolution=32, crop_ratio=0.875)
    cfg["meta"] = {"config_file": "/x/rn18_configs/rn18_16_epochs.yaml", "argv": []}
    torch.manual_seed(0)
    model = trained_looking(create_model(arch, num_classes=len(wnids), zero_init_residual=False,
                                         use_blurpool=options.get("use_blurpool", False),
                                         **{k: v for k, v in options.items() if k != "use_blurpool"}), 1)
    model = model.to(memory_format=torch.channels_last)
    average = None
    if ema:
        average = WeightEMA(model, 0.9)
        trained_looking(model, 2)  # the model moves on; the average stays behind
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_io.save_checkpoint(folder / "checkpoint.pt", {
        "model": torch.compile(model).state_dict(), "ema": average.state_dict() if ema else None,
        "epoch": len(top1s), "config": cfg, "arch": arch, "num_classes": len(wnids), "wnids": wnids})
    lines = [{"type": "epoch", "epoch": i, "top_1": t, "top_5": t + 0.3} for i, t in enumerate(top1s)]
    if ema:
        lines[-1].update(top_1_no_ema=top1s[-1] - 0.05, top_5_no_ema=top1s[-1] + 0.2)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "env.json").write_text(json.dumps({"git_commit": "abc123"}))
    return model.eval(), (average.module.eval() if ema else None)


def logits(model, seed=3):
    """Eval-mode logits of one fixed batch; in the contiguous layout (the checkpoint's model is
    channels-last), so that both sides run the same kernels and agree to float32 rounding."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.to(memory_format=torch.contiguous_format).eval()(x)


def run_export(capsys, *argv) -> tuple:
    code = export.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plain_resnet18_loads_strictly_into_torchvision_and_model_json_says_what_it_is(tmp_path, capsys):
    import torchvision
    from safetensors.torch import load_file

    model, _ = save_run(tmp_path / "run")
    code, out, err = run_export(capsys, tmp_path / "run", f"--export.out={tmp_path / 'exp'}")
    assert code == 0, err
    manifest = json.loads((tmp_path / "exp" / "model.json").read_text())
    assert manifest["key_names"] == "torchvision" and manifest["weights"] == "model"
    assert manifest["wnids"] == WNIDS and manifest["num_classes"] == 5
    assert manifest["val"]["top_1"] == 0.42 and manifest["val"]["top_5"] == pytest.approx(0.72)
    assert (manifest["preset"], manifest["git_commit"]) == ("rn18_16_epochs", "abc123")
    assert manifest["input"]["resolution_px"] == 32 and manifest["input"]["mean"] == [0.485, 0.456, 0.406]
    assert manifest["loads_into"][0]["call"] == "torchvision.models.resnet18(num_classes=5)"
    for name in ("model.safetensors", "model.pt"):
        assert manifest["files"][name]["sha256"] == export.sha256(tmp_path / "exp" / name)
    assert "torchvision.models.resnet18(num_classes=5)" in out
    for state in (load_file(tmp_path / "exp" / "model.safetensors"),
                  torch.load(tmp_path / "exp" / "model.pt", weights_only=True)):
        assert "fc.weight" in state and "bn1.num_batches_tracked" in state  # no _orig_mod. prefix
        loaded = torchvision.models.resnet18(num_classes=5)
        loaded.load_state_dict(state, strict=True)
        torch.testing.assert_close(logits(loaded), logits(model))
    torch.testing.assert_close(logits(export.load_model(tmp_path / "exp")), logits(model))
    timm = pytest.importorskip("timm")
    loaded = timm.create_model("resnet18", num_classes=5)
    loaded.load_state_dict(load_file(tmp_path / "exp" / "model.safetensors"), strict=True)
    torch.testing.assert_close(logits(loaded), logits(model))


@pytest.mark.parametrize("arch, options, timm_name", [
    ("resnet50", {"resnet_d": True}, "resnet50d"),  # layer1's stride-1 shortcut: indices shift
    ("resnet18", {"resnet_d": True, "activation": "silu"}, "resnet18d"),
    ("resnet18", {"activation": "mish"}, "resnet18"),
])
def test_resnet_d_and_other_activations_load_into_timm_and_into_our_factory(tmp_path, capsys, monkeypatch,
                                                                           arch, options, timm_name):
    from safetensors.torch import load_file

    from ffcv_imagenet import models

    # FastMish as torch's Mish (its fallback, same values) instead of compiling its CPU kernels
    monkeypatch.setattr(models, "_MISH_KERNELS", {"fwd": None, "bwd": None})

    model, _ = save_run(tmp_path / "run", arch, **options)
    assert run_export(capsys, tmp_path / "run", f"--export.out={tmp_path / 'exp'}")[0] == 0
    manifest = export.read_manifest(tmp_path / "exp")
    assert manifest["key_names"] == "timm"
    assert [e["library"] for e in manifest["loads_into"]] == ["timm", "ffcv_imagenet"]
    assert manifest["loads_into"][0]["model"] == timm_name
    assert any(reason.startswith("torchvision") for reason in manifest["does_not_load_into"])
    torch.testing.assert_close(logits(export.load_model(tmp_path / "exp")), logits(model))
    timm = pytest.importorskip("timm")
    loaded = timm.create_model(timm_name, **manifest["loads_into"][0]["kwargs"])
    loaded.load_state_dict(load_file(tmp_path / "exp" / "model.safetensors"), strict=True)
    torch.testing.assert_close(logits(loaded), logits(model))


def test_blurpool_and_the_other_variants_load_into_our_factory_only(tmp_path, capsys):
    options = {"resnet_d": True, "use_blurpool": True, "stem_pool": "maxblur", "self_attention": True}
    model, _ = save_run(tmp_path / "run", **options)
    assert run_export(capsys, tmp_path / "run", f"--export.out={tmp_path / 'exp'}")[0] == 0
    manifest = export.read_manifest(tmp_path / "exp")
    assert manifest["key_names"] == "ffcv_imagenet" and manifest["model_options"] == {**options, "activation": "relu"}
    assert [e["library"] for e in manifest["loads_into"]] == ["ffcv_imagenet"]
    reasons = " ".join(manifest["does_not_load_into"])
    assert "BlurPool" in reasons and "self-attention" in reasons and "max-blur" in reasons
    torch.testing.assert_close(logits(export.load_model(tmp_path / "exp")), logits(model))


def test_the_weight_average_is_exported_when_the_run_kept_one(tmp_path, capsys):
    model, average = save_run(tmp_path / "run", ema=True)
    assert not torch.allclose(logits(model), logits(average))
    assert run_export(capsys, tmp_path / "run", f"--export.out={tmp_path / 'ema'}")[0] == 0
    manifest = export.read_manifest(tmp_path / "ema")
    assert manifest["weights"] == "ema" and manifest["val"]["top_1"] == 0.42
    torch.testing.assert_close(logits(export.load_model(tmp_path / "ema")), logits(average))
    checkpoint_file = tmp_path / "run" / "checkpoint.pt"  # the positional may be the file itself
    assert run_export(capsys, checkpoint_file, f"--export.out={tmp_path / 'raw'}", "--export.weights=model")[0] == 0
    manifest = export.read_manifest(tmp_path / "raw")
    assert manifest["weights"] == "model" and manifest["val"]["top_1"] == pytest.approx(0.37)  # *_no_ema
    torch.testing.assert_close(logits(export.load_model(tmp_path / "raw")), logits(model))


def test_wrapper_prefixes_and_channels_last_strides_are_gone():
    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    weight = model.weight
    state = {"module._orig_mod.weight": weight, "_orig_mod.module.bias": model.bias, "block.module.x": weight}
    cleaned = export.clean_state(state)
    assert list(cleaned) == ["weight", "bias", "block.module.x"]  # a module named `module` inside stays
    assert not weight.is_contiguous() and cleaned["weight"].is_contiguous()
    assert torch.equal(cleaned["weight"], weight)


def test_refusals_name_the_file_and_leave_nothing_half_written(tmp_path, capsys):
    save_run(tmp_path / "run")
    out = tmp_path / "exp"
    code, _, err = run_export(capsys, tmp_path / "run", f"--export.out={out}", "--export.weights=ema")
    assert code == 2 and f"{tmp_path / 'run' / 'checkpoint.pt'}: export.weights=ema" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert run_export(capsys, tmp_path / "run", f"--export.out={out}")[0] == 0
    before = (out / "model.json").read_text()
    code, _, err = run_export(capsys, tmp_path / "run", f"--export.out={out}")
    assert code == 2 and f"export.out={out} already holds an export; --export.overwrite=1" in err
    assert (out / "model.json").read_text() == before
    assert run_export(capsys, tmp_path / "run", f"--export.out={out}", "--export.overwrite=1")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "run"]  # no temporary folder left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = run_export(capsys, tmp_path / "run", f"--export.out={tmp_path / 'other'}", "--export.overwrite=1")
    assert code == 2 and "holds files but no model.json" in err
    code, _, err = run_export(capsys, tmp_path / "nothing", f"--export.out={out}")
    assert code == 2 and f"{tmp_path / 'nothing'}: no such run folder or checkpoint" in err
    code, _, err = run_export(capsys, tmp_path / "run", "--export.weights=best", f"--export.out={out}")
    assert code == 2 and "export.weights='best': expected one of auto|model|ema" in err
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(export.ExportError, match="model.safetensors: SHA-256 differs"):
        export.load_model(out)


def test_a_checkpoint_without_wnids_takes_them_from_the_val_beton_metadata(tmp_path, capsys):
    from ffcv_imagenet.metadata import write_metadata

    save_run(tmp_path / "run", top1s=(0.5,))
    checkpoint = ckpt_io.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    del checkpoint["wnids"]
    checkpoint["config"]["data"]["val_dataset"] = str(tmp_path / "val.beton")
    ckpt_io.save_checkpoint(tmp_path / "run" / "checkpoint.pt", checkpoint)
    code, _, err = run_export(capsys, tmp_path / "run", f"--export.out={tmp_path / 'exp'}")
    assert code == 2 and "no class list (wnids) in the checkpoint" in err and "val.beton" in err
    write_metadata(tmp_path / "val.beton", {"wnids": WNIDS})
    assert run_export(capsys, tmp_path / "run", f"--export.out={tmp_path / 'exp'}")[0] == 0
    manifest = export.read_manifest(tmp_path / "exp")
    assert manifest["wnids"] == WNIDS and manifest["wnids_from"].endswith("val.beton.meta.json")
