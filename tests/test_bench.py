"""`ffcv-imagenet bench --quick`: every measurement runs and lands in the JSON and the table."""

import json
import math

import pytest

import torch

from ffcv_imagenet import bench
from ffcv_imagenet.train import resolve_precision

REQUIRED = ("loader_img_s", "loader_1core_img_s", "ffcv_loader_img_s", "ffcv_loader_1core_img_s",
            "ffcv_raw50_loader_img_s", "torchvision_loader_img_s", "model_img_s", "e2e_img_s",
            "writer_img_s", "ffcv_writer_img_s", "mish_torch_img_s", "mish_fast_img_s",
            "sa_weight_input_img_s", "sa_gram_weight_img_s", "precision_fp32_img_s")


@pytest.mark.slow
def test_bench_quick_measures_everything(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--bench.quick", f"--bench.json={out}"]) == 0
    result = json.loads(out.read_text())
    for key in REQUIRED:
        assert result[key] > 0 and math.isfinite(result[key]), key
    assert ("dali_loader_img_s" in result) == bench.dali_available()
    sizes = result["file_sizes"]
    assert len(sizes) == 3 and all(v["file_bytes"] >= v["payload_bytes"] > 0 for v in sizes.values())
    ours, ffcv_jpg, raw50 = (v["payload_bytes"] for v in sizes.values())
    assert raw50 > 2 * ffcv_jpg        # half the images as raw pixels
    assert ours >= ffcv_jpg * 0.9      # same images and quality; restart markers add a little
    ratios = result["ratios"]
    assert ratios["this_over_ffcv_same_file"] == pytest.approx(
        result["loader_img_s"] / result["ffcv_loader_img_s"])
    # a ratio of two passes timed one after the other: no bound on it holds while other work
    # shares the CPU (3.6 was seen with a training run beside the suite), so only its form
    assert ratios["e2e_over_model"] == pytest.approx(result["e2e_img_s"] / result["model_img_s"])
    assert ratios["fast_mish_over_torch_mish"] == pytest.approx(
        result["mish_fast_img_s"] / result["mish_torch_img_s"])
    assert ratios["sa_gram_weight_over_weight_input"] == pytest.approx(
        result["sa_gram_weight_img_s"] / result["sa_weight_input_img_s"])
    half = "fp16" if torch.cuda.is_available() else "bf16"
    assert result[f"precision_{half}_img_s"] > 0
    assert result["precision_auto"] == resolve_precision("auto", torch.device("cuda" if half == "fp16" else "cpu"))
    assert ratios["half_over_fp32"] == pytest.approx(
        result[f"precision_{half}_img_s"] / result["precision_fp32_img_s"])
    assert result["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert result["images"]["count"] == 192 and result["images"]["distinct"] == 24
    printed = capsys.readouterr().out
    assert "| this / stock ffcv, same file |" in printed and "ffcv-imagenet write" in printed
    assert "| FastMish / torch's Mish |" in printed and "| (X X^T W) X / (X X^T)(W X) |" in printed
    assert "command: ffcv-imagenet bench --bench.quick --bench.json=" in printed
    assert f"| {half} / fp32 |" in printed and " (auto) |" in printed


def test_bench_options_are_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"bench.skip='torchvision,gpu': expected comma-separated, each one of"):
        bench.parse_args(["--bench.skip", "torchvision,gpu"])
    assert bench.parse_args(["--bench.skip", "attention,mish,precision"]).skip == {"attention", "mish", "precision"}
    with pytest.raises(ValueError, match="missing: not a folder"):
        bench.parse_args([f"--bench.images={tmp_path / 'missing'}"])
    args = bench.parse_args(["--bench.quick", "--bench.extra_res", "96"])
    assert args.extra_res == (96,) and not args.levers and args.res == 64
    assert bench.parse_args(["--bench.extra_res="]).extra_res == ()  # none, not the default
    assert bench.main(["--quick"]) == 2  # the old spelling, refused with the new one named
    assert "unknown argument '--quick'; did you mean '--bench.quick'?" in capsys.readouterr().err


def test_projection_uses_the_h100_reference_and_per_core_rates():
    p = bench.projection({160: (1000.0, 1500.0), 224: (800.0, None), 96: (5000.0, 6000.0)})
    assert set(p) == {160, 224}  # no H100 reference at 96 px
    assert p[160] == {"h100_img_s": 7815, "ffcv_cores": 7.815, "ours_cores": 5.21}
    assert p[224]["ours_cores"] is None
    table = bench.build_table({
        "workers": 2, "resolution": 160, "arch": "resnet50", "model_resolution": 160,
        "loader_1core_img_s": 1500.0, "ffcv_loader_1core_img_s": 1000.0, "projection": p})
    assert "| this / stock ffcv, same file | 1.50x |" in table
    assert "| 160 | 7,815 | 7.8 | 5.2 |" in table
    assert "fp32" not in table  # no precision part measured: no rows for it


def test_precision_rows_mark_what_auto_picks():
    rows = bench._precision_rows({"precision_fp32_img_s": 17.0, "precision_bf16_img_s": 1.1,
                                  "precision_auto": "fp32"})
    assert rows == ["| model only, fp32 (auto) | 17.0 |", "| model only, bf16 | 1.1 |",
                    "| bf16 / fp32 | 0.06x |"]
    rows = bench._precision_rows({"precision_fp32_img_s": 900.0, "precision_fp16_img_s": 2700.0,
                                  "precision_auto": "fp16"})
    assert rows[1] == "| model only, fp16 (auto) | 2,700 |" and rows[2] == "| fp16 / fp32 | 3.00x |"
