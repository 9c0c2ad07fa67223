"""report: tables and plots from run logs (logs written here by hand, no training)."""

import json

import pytest
import torch

from ffcv_imagenet import report


def write_run(folder, preset, top1s, epochs_planned=None, summary=True, startup_s=10.0,
              epoch_s=60.0, drop_field=None):
    folder.mkdir(parents=True)
    epochs_planned = len(top1s) if epochs_planned is None else epochs_planned
    (folder / "params.json").write_text(json.dumps(
        {"config_file": f"rn50_configs/{preset}.yaml", "training": {"epochs": epochs_planned}}))
    lines = [{"type": "start", "startup_s": startup_s, "world_size": 1, "device": "cpu"}]
    for i, top1 in enumerate(top1s):
        rec = {"type": "epoch", "epoch": i, "lr": 0.1, "resolution": 160, "train_loss": 2.0 - i * 0.1,
               "train_images_per_s": 100.0 + i, "top_1": top1, "top_5": min(1.0, top1 + 0.2),
               "val_loss": 1.0, "epoch_s": epoch_s, "elapsed_s": epoch_s * (i + 1)}
        if drop_field:
            rec.pop(drop_field)
        lines.append(rec)
    if summary:
        lines.append({"type": "summary", "epochs": len(top1s), "top_1": top1s[-1],
                      "top_5": min(1.0, top1s[-1] + 0.2), "elapsed_s": epoch_s * len(top1s),
                      "startup_s": startup_s, "mean_images_per_s": 101.0,
                      "preset": f"rn50_configs/{preset}.yaml"})
    (folder / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_groups_runs_of_a_preset_with_mean_std_and_count(tmp_path):
    write_run(tmp_path / "a1", "fast", [0.5, 0.7])
    write_run(tmp_path / "a2", "fast", [0.6, 0.8])
    runs = report.find_runs([tmp_path])
    assert len(runs) == 2
    table = report.make_table(runs, targets=(0.7,))
    row = [line for line in table.splitlines() if line.startswith("| fast")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1] == "2"  # n runs
    assert cells[4] == "75.00% ± 7.07%"  # mean ± sample std of 70 and 80
    # wall-clock = start-up 10 s + 2 epochs of 60 s = 130 s
    assert cells[6] == "2.2 min ± 0.0 min"
    # time to 70%: run a1 reaches it at epoch 2 (130 s), run a2 at epoch 2 (130 s)
    assert cells[7] == "2.2 min ± 0.0 min"


def test_cut_short_and_missing_fields_are_shown_not_dropped(tmp_path):
    write_run(tmp_path / "done", "p", [0.5, 0.6, 0.7])
    write_run(tmp_path / "cut", "p", [0.5], epochs_planned=3, summary=False)
    write_run(tmp_path / "holes", "q", [0.4, 0.5], drop_field="train_loss")
    table = report.make_table(report.find_runs([tmp_path]), targets=(0.65,))
    assert "incomplete 1/3 epochs" in table
    assert "missing train_loss" in table
    assert "not reached" in table  # the cut-short run never reached 65%
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 4  # header + 3 rows


def test_a_run_stopped_at_its_time_limit_says_so(tmp_path):
    write_run(tmp_path / "stopped", "p", [0.5], epochs_planned=3, summary=False)
    write_run(tmp_path / "killed", "p", [0.5], epochs_planned=3, summary=False)
    with open(tmp_path / "stopped" / "log.jsonl", "a") as f:
        f.write(json.dumps({"type": "stopped", "epoch": 1, "next_epoch_expected_s": 70.0,
                            "stop_after_s": 100.0, "elapsed_s": 60.0}) + "\n")
    problems = {run.folder.name: run.problems[0] for run in report.find_runs([tmp_path])}
    assert problems == {"stopped": "incomplete 1/3 epochs, stopped by training.stop_after_s",
                        "killed": "incomplete 1/3 epochs"}
    # resumed afterwards and killed in the next launch: no longer the time limit's doing
    with open(tmp_path / "stopped" / "log.jsonl", "a") as f:
        f.write(json.dumps({"type": "start", "startup_s": 5.0, "resumed_from_epoch": 1}) + "\n")
    (stopped,) = [run for run in report.find_runs([tmp_path]) if run.folder.name == "stopped"]
    assert stopped.problems[0] == "incomplete 1/3 epochs"


def _validate_every(folder, n, blank_epochs):
    """Rewrite a run's logs as if it validated every `n` epochs; `blank_epochs` lose top-1/5."""
    params = json.loads((folder / "params.json").read_text())
    params["validation"] = {"every_n_epochs": n}
    (folder / "params.json").write_text(json.dumps(params))
    lines = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    for rec in lines:
        if rec.get("type") == "epoch" and rec["epoch"] in blank_epochs:
            rec.update(top_1=None, top_5=None, val_loss=None)
    (folder / "log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_epochs_skipped_by_validation_every_n_epochs_are_not_flagged(tmp_path):
    write_run(tmp_path / "sparse", "p", [0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    _validate_every(tmp_path / "sparse", 4, blank_epochs={0, 1, 2, 4})  # validated after 4 and 6
    run = report.load_run(tmp_path / "sparse")
    assert run.problems == []
    # 55% is first measured after the 4th epoch (60%): 10 s start-up + 4 epochs of 60 s
    assert run.time_to(0.55) == 250.0
    # a hole on an epoch that should have validated (the 4th, or the last) is still flagged
    write_run(tmp_path / "hole4", "p", [0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    _validate_every(tmp_path / "hole4", 4, blank_epochs={0, 1, 2, 3, 4})
    write_run(tmp_path / "hole_last", "p", [0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    _validate_every(tmp_path / "hole_last", 4, blank_epochs={0, 1, 2, 4, 5})
    for name in ("hole4", "hole_last"):
        assert report.load_run(tmp_path / name).problems == ["missing top_1, top_5, val_loss"], name


def test_resumed_run_keeps_one_record_per_epoch(tmp_path):
    write_run(tmp_path / "r", "p", [0.5, 0.6])
    log = tmp_path / "r" / "log.jsonl"
    lines = log.read_text().splitlines()
    # a resume re-logged epoch 1 after a second start line
    restart = {"type": "start", "startup_s": 99.0, "resumed_from_epoch": 1}
    log.write_text("\n".join(lines[:2] + [json.dumps(restart)] + lines[2:]) + "\n")
    run = report.load_run(tmp_path / "r")
    assert [r["epoch"] for r in run.epochs] == [0, 1]
    assert run.startup_s == 10.0  # the first launch's, as the runs table shows it
    # wall-clock counts both start-ups: 10 + 99 + 2 epochs of 60 s; epoch 0 ran before the resume
    assert run.wallclock_s() == 229.0
    assert run.time_to(0.5) == 70.0 and run.time_to(0.6) == 229.0
    assert "| 10.0 s + 99.0 s (1 resume) | 3.8 min |" in report.make_runs_table([run])


def test_readme_section_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:results start -->\nold\n<!-- report:results end -->\noutro\n")
    report.update_readme(readme, "results", "| new |\n")
    assert readme.read_text() == "intro\n<!-- report:results start -->\n| new |\n<!-- report:results end -->\noutro\n"
    with pytest.raises(ValueError, match="other"):
        report.update_readme(readme, "other", "x")


def test_cli_writes_table_and_readable_pngs(tmp_path, capsys):
    write_run(tmp_path / "runs" / "a", "fast", [0.3, 0.6])
    write_run(tmp_path / "runs" / "b", "slow", [0.2, 0.5, 0.7])
    assert report.main([str(tmp_path / "runs"), "--report.out", str(tmp_path / "out"), "--report.targets=50,60"]) == 0
    out = capsys.readouterr().out
    assert "| fast" in out and "| slow" in out
    assert "| fast" in (tmp_path / "out" / "report.md").read_text()
    for name in ("top1_vs_time.png", "top1_vs_epoch.png", "front.png"):
        path = tmp_path / "out" / name
        assert path.exists() and path.stat().st_size > 1000
    assert (tmp_path / "out" / "top1_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_folder_is_an_error_naming_it(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_runs_table_names_machine_date_and_command(tmp_path):
    write_run(tmp_path / "gpu", "fast", [0.3, 0.6], startup_s=12.5)
    (tmp_path / "gpu" / "params.json").write_text(json.dumps(
        {"config_file": "rn50_configs/fast.yaml", "training": {"epochs": 2},
         "argv": ["--config-file", "rn50_configs/fast.yaml", "--logging.folder=runs/my run"]}))
    (tmp_path / "gpu" / "env.json").write_text(json.dumps(
        {"device_count": 8, "device_names": ["NVIDIA H100 80GB HBM3"] * 8, "cpu_count": 96}))
    lines = (tmp_path / "gpu" / "log.jsonl").read_text().splitlines()
    start = dict(json.loads(lines[0]), time="2026-11-30T13:46:47+00:00")
    (tmp_path / "gpu" / "log.jsonl").write_text("\n".join([json.dumps(start)] + lines[1:]) + "\n")
    write_run(tmp_path / "cpu", "fast", [0.4], epochs_planned=3, summary=False)
    (tmp_path / "cpu" / "env.json").write_text(json.dumps(
        {"device_count": 0, "device_names": [], "cpu_count": 2, "cpu_model": "AMD EPYC"}))

    table = report.make_runs_table(report.find_runs([tmp_path]))
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    gpu, cpu = rows["gpu"], rows["cpu (incomplete)"]
    assert "| 60.00% | 12.5 s | 2.2 min | 101 | 8 × NVIDIA H100 80GB HBM3 | 2026-11-30 |" in gpu
    assert "`ffcv-imagenet train --config-file rn50_configs/fast.yaml '--logging.folder=runs/my run'`" in gpu
    assert "| 2-core CPU (AMD EPYC) | ? | ? |" in cpu

    assert report.main([str(tmp_path), "--report.plots=0"]) == 0
    assert "| run | preset | top-1 | start-up |" in (tmp_path / "report.md").read_text()


def test_a_resumed_run_shows_its_first_command_and_what_resumes_added(tmp_path):
    write_run(tmp_path / "run", "fast", [0.3, 0.6])
    (tmp_path / "run" / "params.json").write_text(json.dumps(  # rewritten by the last launch
        {"config_file": "fast.yaml", "training": {"epochs": 2},
         "argv": ["--config-file", "fast.yaml", "--training.resume=1", "--training.stop_after_s=900"]}))
    first = ["--config-file", "fast.yaml", "--training.resume=1"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    lines[0]["argv"] = first
    lines.insert(2, {"type": "start", "startup_s": 3.0, "resumed_from_epoch": 1,
                     "argv": first + ["--training.stop_after_s=600"]})
    lines.insert(4, {"type": "start", "startup_s": 3.0, "resumed_from_epoch": 1,
                     "argv": first + ["--training.stop_after_s=900"]})
    lines.insert(5, {"type": "start", "startup_s": 3.0, "resumed_from_epoch": 1, "argv": first})
    (tmp_path / "run" / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    (run,) = report.find_runs([tmp_path])
    assert run.command == "ffcv-imagenet train --config-file fast.yaml --training.resume=1"
    # one entry per resumed launch, in order, so that a repeated flag reads as separate launches
    assert run.resumed_with == [["--training.stop_after_s=600"], ["--training.stop_after_s=900"], []]
    assert ("`ffcv-imagenet train --config-file fast.yaml --training.resume=1` (resumed with "
            "`--training.stop_after_s=600`, then `--training.stop_after_s=900`, then nothing added)"
            ) in report.make_runs_table([run])
    assert run.resumed_without == []  # a changed value is not a dropped argument


def test_a_resume_that_leaves_out_an_argument_of_the_first_launch_says_so(tmp_path):
    write_run(tmp_path / "run", "fast", [0.3, 0.6])
    first = ["--config-file", "fast.yaml", "--training.resume=1", "--training.seed=3", "--lr.lr=0.5"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    lines[0]["argv"] = first
    lines.insert(2, {"type": "start", "startup_s": 3.0, "resumed_from_epoch": 1,
                     "argv": ["--config-file", "fast.yaml", "--training.resume=1", "--lr.lr=0.7"]})
    (tmp_path / "run" / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    (run,) = report.find_runs([tmp_path])
    assert run.resumed_with == [["--lr.lr=0.7"]]
    assert run.resumed_without == ["--training.seed=3"]
    assert ("(resumed with `--lr.lr=0.7`) (resumed without `--training.seed=3`)"
            in report.make_runs_table([run]))

    # parsed as `train` parses them: `--training.seed 3` is the same setting as `--training.seed=3`
    lines[0]["argv"] = ["--config-file", "fast.yaml", "--training.resume=1", "--training.seed", "3"]
    (tmp_path / "run" / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run,) = report.find_runs([tmp_path])
    assert run.resumed_without == ["--training.seed=3"]


def test_runs_in_other_precisions_are_not_averaged_together(tmp_path):
    for name, precision, top1 in (("b1", "bf16", 0.8), ("b2", "bf16", 0.9), ("f1", "fp32", 0.7)):
        write_run(tmp_path / name, "fast", [0.5, top1])
        params = json.loads((tmp_path / name / "params.json").read_text())
        params["derived"] = {"precision": precision}
        (tmp_path / name / "params.json").write_text(json.dumps(params))
        (tmp_path / name / "env.json").write_text(json.dumps(
            {"device_count": 0, "cpu_count": 2, "cpu_model": "AMD EPYC",
             "cpu_capability": "AVX512" if precision == "bf16" else "AVX2"}))
    runs = report.find_runs([tmp_path])
    table = report.make_table(runs, targets=(0.7,))
    rows = [line for line in table.splitlines() if line.startswith("| fast")]
    assert len(rows) == 3
    assert "| fast | 2 | 2 | 1 × cpu, bf16 | 85.00% ± 7.07% |" in rows[0]
    assert "| fast | 1 | 2 | 1 × cpu, fp32 | 70.00% |" in rows[1]
    # and one more row pooling the accuracy of all three, with no times (they differ in speed)
    pooled = [c.strip() for c in rows[2].strip("|").split("|")]
    assert pooled[:6] == ["fast", "3", "2", "1 × cpu, all (bf16 ×2 + fp32 ×1)", "80.00% ± 10.00%",
                          "96.67% ± 5.77%"]
    assert pooled[6:9] == ["—"] * 3 and "accuracy over every precision" in pooled[-1]
    per_run = report.make_runs_table(runs)
    assert "| 2-core CPU (AMD EPYC, AVX512), bf16 |" in per_run
    assert "| 2-core CPU (AMD EPYC, AVX2), fp32 |" in per_run

    # b2 resumed on a machine where precision=auto picked fp32: its own group, flagged
    log = tmp_path / "b2" / "log.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    lines[0]["precision"] = "bf16"
    lines.insert(2, {"type": "start", "startup_s": 9.0, "resumed_from_epoch": 1, "precision": "fp32"})
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    runs = report.find_runs([tmp_path])
    (b2,) = [run for run in runs if run.folder.name == "b2"]
    assert b2.precision == "bf16+fp32" and "precision changed between launches: bf16 -> fp32" in b2.problems
    rows = [line for line in report.make_table(runs, targets=(0.7,)).splitlines() if line.startswith("| fast")]
    assert len(rows) == 4 and any("| fast | 1 | 2 | 1 × cpu, bf16+fp32 | 90.00% |" in row for row in rows)
    assert "| fast | 3 | 2 | 1 × cpu, all (bf16 ×1 + bf16+fp32 ×1 + fp32 ×1) | 80.00% ± 10.00% |" in rows[-1]


def test_a_preset_in_one_precision_gets_no_pooled_row_nor_does_a_cut_short_run(tmp_path):
    write_run(tmp_path / "x1", "other", [0.5, 0.6])
    write_run(tmp_path / "x2", "other", [0.5], epochs_planned=2)
    params = json.loads((tmp_path / "x2" / "params.json").read_text())
    params["derived"] = {"precision": "fp32"}
    (tmp_path / "x2" / "params.json").write_text(json.dumps(params))
    rows = [line for line in report.make_table(report.find_runs([tmp_path]), targets=(0.7,)).splitlines()
            if line.startswith("| other")]
    assert len(rows) == 2 and not any("all (" in row for row in rows)


def test_environment_records_the_cpu_model():
    from ffcv_imagenet.logger import environment
    from ffcv_imagenet.distributed import cpu_has_fast_bf16

    env = environment(1)
    assert "cpu_model" in env and env["cpu_count"] >= 1
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu_native_bf16"] == cpu_has_fast_bf16()
    with open("/proc/cpuinfo") as f:
        if "model name" in f.read():
            assert env["cpu_model"]


def test_reference_rows_stand_beside_the_runs_they_match_with_their_source(tmp_path, capsys):
    write_run(tmp_path / "runs" / "a", "rn50_16_epochs", [0.5 + 0.01 * i for i in range(16)])
    write_run(tmp_path / "runs" / "b", "rn50_88_epochs", [0.6], epochs_planned=88, summary=False)
    write_run(tmp_path / "runs" / "c", "mine", [0.4, 0.5])
    code = report.main([str(tmp_path / "runs"), "--report.reference=he2016,ffcv-rn50", "--report.plots=0",
                        f"--report.out={tmp_path / 'out'}", "--report.targets=70"])
    assert code == 0
    table = (tmp_path / "out" / "report.md").read_text().split("\n\n")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    firsts = [(row[0], row[2]) for row in rows]
    # each reference right after the runs of its preset and epochs; the unmatched ones last, in order
    assert firsts == [("rn50_16_epochs", "16"), ("reference: FFCV ResNet-50", "16"),
                      ("rn50_88_epochs", "88"), ("reference: FFCV ResNet-50", "88"), ("mine", "2"),
                      ("reference: He et al. 2016 ResNet-50", "90"),
                      *[("reference: FFCV ResNet-50", str(e)) for e in (24, 32, 40, 56)]]
    assert rows[1][1:7] == ["—", "16", "8 × A100", "73.80%", "90.80%", "14.9 min"]
    assert rows[1][-1].startswith("published, not run here: FFCV's published ResNet-50 table")
    assert rows[5][4:6] == ["76.00%", "92.90%"] and "He, Zhang, Ren, Sun" in rows[5][-1]
    assert all(row[-1].startswith("published, not run here: ") for row in rows if row[0].startswith("reference"))
    assert report.make_table(report.find_runs([tmp_path / "runs"])).count("reference") == 0  # only when asked
    capsys.readouterr()
    assert report.main([str(tmp_path / "runs"), "--report.reference=ffcv-rn5"]) == 2
    err = capsys.readouterr().err
    assert "report.reference='ffcv-rn5': expected comma-separated, each one of " in err
    assert {"ffcv-rn50", "he2016", "bag-of-tricks"} <= set(report.REFERENCES)
    assert all(name in err for name in report.REFERENCES)


def test_real_top1_gets_a_column_when_a_run_measured_it(tmp_path):
    write_run(tmp_path / "a1", "fast", [0.5, 0.7])
    write_run(tmp_path / "a2", "fast", [0.6, 0.8])
    write_run(tmp_path / "b", "slow", [0.4])
    plain = report.make_table(report.find_runs([tmp_path]), targets=(0.7,))
    assert "ReaL" not in plain  # runs without validation.real_labels: the table as before
    log = tmp_path / "a1" / "log.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    lines[-1]["real_top_1"] = 0.75  # the summary (validation.real_labels during training)
    log.write_text("\n".join(map(json.dumps, lines)) + "\n")
    with open(tmp_path / "a2" / "log.jsonl", "a") as f:  # eval_only into the run folder, later
        f.write(json.dumps({"type": "eval", "top_1": 0.8, "real_top_1": 0.85}) + "\n")
    runs = report.find_runs([tmp_path])
    table = report.make_table(runs, targets=(0.7,)).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[4:8] == ["top-1", "top-5", "ReaL top-1", "wall-clock"]
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.strip("|").split("|")] for row in table[2:]}
    assert cells["fast"][6] == "80.00% ± 7.07%" and cells["slow"][6] == "—"
    by_run = {row.split("|")[1].strip(): [c.strip() for c in row.strip("|").split("|")]
              for row in report.make_runs_table(runs).splitlines()[2:]}
    assert (by_run["a1"][3], by_run["a2"][3], by_run["b"][3]) == ("75.00%", "85.00%", "—")
