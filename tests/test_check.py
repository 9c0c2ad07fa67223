"""`ffcv-imagenet check`: the quick check end to end on the CPU, its step bookkeeping, the plan's
arithmetic and the README section it renders."""

import json
from pathlib import Path

import pytest
import torch

from ffcv_imagenet import check

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "imagenette_configs" / "in128_rn50_5_epochs.yaml"


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    """One quick check, smaller still (ResNet-18 at 64 px) to keep the suite short; the README
    gives the plain `check --quick` figures on this machine."""
    out = tmp_path_factory.mktemp("check")
    status = check.main(["--check.quick", f"--check.out={out}", "--check.device=cpu",
                         "--check.arch=resnet18", "--check.res=64", "--check.seconds=0.3",
                         f"--check.preset={PRESET}"])
    return status, out, json.loads((out / "check.json").read_text())


def test_quick_check_passes_and_writes_every_figure(quick_result):
    status, out, result = quick_result
    assert status == 0, result["failed"]
    for key in ("versions", "devices", "steps", "model_img_s", "e2e_img_s", "loader_img_s",
                "e2e_over_model"):
        assert key in result
    assert result["versions"]["torch"] and result["devices"]["cpu_cores"] >= 1
    for precision in ("fp32", "bf16"):  # every precision the CPU offers trained, loss falling
        record = result["steps"]["cpu"][precision]
        assert record["ok"] and record["last_loss"] < record["first_loss"]
    statuses = {r["step"]: r["status"] for r in result["checks"]}
    assert statuses["environment: ffcv and the crop-first decoder agree"] == "pass"
    assert statuses["cpu: checkpoint save and reload"] == "pass"
    nccl = "pass" if torch.cuda.is_available() else "skip"  # it runs wherever a GPU is visible
    assert statuses["cuda: 1-process NCCL group and a DDP step"] == nccl
    model, e2e = result["model_img_s"]["64"]["eager"], result["e2e_img_s"]["64"]["eager"]
    assert model > 0 and e2e > 0 and result["loader_img_s"]["64"] > 0
    assert result["e2e_over_model"]["64"]["eager"] == pytest.approx(e2e / model)
    table = (out / "check.md").read_text()
    assert "| 64 | eager |" in table and "Projection (not a measurement)" in table


def test_quick_check_plans_the_preset(quick_result):
    _, _, result = quick_result
    plan = result["plan"]
    assert plan["projection"] and plan["epochs"] == 5 and plan["train_images"] == 1_281_167
    # the preset's ramp
    assert [r["resolution"] for r in plan["per_epoch"]] == [96, 96, 96, 128, 128]
    assert plan["total_min"] == pytest.approx(sum(r["epoch_min"] for r in plan["per_epoch"]))
    assert plan["fits_in_ram"] is None  # no train file given


def test_plan_arithmetic(tmp_path):
    """Rates scaled from the nearest measured resolution by pixel count; the slower of loader and
    model sets each epoch; cores per GPU = model rate / loader rate per core."""
    speed = {"device": "cuda:0", "loader_workers": 16,
             "model": {"128": {"eager": 4000.0, "compile": 5000.0}},
             "loader_1core_img_s": {"128": 200.0}}
    text, plan = check.plan(PRESET, speed, None)
    first, last = plan["per_epoch"][0], plan["per_epoch"][-1]
    assert (first["resolution"] == 96
            and first["model_img_s"] == pytest.approx(5000 * (128 / 96) ** 2))
    assert first["loader_img_s"] == pytest.approx(200 * 16 * (128 / 96) ** 2)
    assert first["limit"] == "loader" and first["cores_per_gpu_needed"] == pytest.approx(25.0)
    assert last["epoch_min"] == pytest.approx(1_281_167 / 3200 / 60)
    assert "projection" in text and "loader-bound" in text


def test_a_failing_step_is_recorded_and_the_rest_runs():
    lines = []
    steps = check.Steps(log=lines.append)

    def broken():
        raise RuntimeError("no such device")

    assert steps.run("one", broken) is None
    assert steps.run("two", lambda: ("fine", 3)) == 3
    assert steps.run("three", lambda: (_ for _ in ()).throw(check.Skip("not here"))) is None
    assert [r["status"] for r in steps.records] == ["fail", "pass", "skip"]
    assert steps.failed == ["one"]
    assert any(line.startswith("[check] FAIL one") and "no such device" in line for line in lines)


def test_render_readme_from_committed_check_files(quick_result, tmp_path):
    _, out, result = quick_result
    folder = tmp_path / "results" / "gpu" / "2026-12-04-test"
    folder.mkdir(parents=True)
    (folder / "check.json").write_text((out / "check.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:check start -->\nold\n<!-- report:check end -->\nafter\n")
    assert check.main([f"--check.render={tmp_path / 'results'}", f"--check.readme={readme}"]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("after\n")
    row = next(line for line in text.splitlines() if "2026-12-04-test" in line)
    assert result["versions"]["torch"] in row and "0 failed" in row and "64: " in row
