"""Strict configuration: unknown keys, bad values, `base:` includes, presets, --help."""

import sys

import pytest

from ffcv_imagenet.config import ConfigError, defaults, help_text, load_config

DATA = ["--data.train_dataset=train.beton", "--data.val_dataset=val.beton"]


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_and_cli_overrides_with_types():
    cfg = load_config(DATA + ["--lr.lr=1.7", "--training.epochs", "16", "--training.nesterov=true",
                              "--lr.milestones=30,60,80", "--training.resume"])
    assert cfg["lr"]["lr"] == 1.7 and isinstance(cfg["lr"]["lr"], float)
    assert cfg["training"]["epochs"] == 16 and isinstance(cfg["training"]["epochs"], int)
    assert cfg["training"]["nesterov"] is True
    assert cfg["training"]["resume"] is True  # a bare flag means 1
    assert cfg["lr"]["milestones"] == [30, 60, 80]
    assert cfg["validation"]["resolution"] == defaults()["validation"]["resolution"] == 256
    assert cfg["meta"] == {"config_file": None, "argv": DATA + [
        "--lr.lr=1.7", "--training.epochs", "16", "--training.nesterov=true",
        "--lr.milestones=30,60,80", "--training.resume"]}


@pytest.mark.parametrize("argv, named, nearest", [
    (["--lr.lrr=0.5"], "lr.lrr", "lr.lr"),
    (["--training.epoch=3"], "training.epoch", "training.epochs"),
    (["--trainig.epochs=3"], "trainig.epochs", "training.epochs"),
    (["--validation.res=224"], "validation.res", "validation.resolution"),
])
def test_unknown_cli_key_names_it_and_the_nearest(argv, named, nearest):
    with pytest.raises(ConfigError) as e:
        load_config(DATA + argv)
    message = str(e.value)
    assert "command line" in message and f"'{named}'" in message and f"'{nearest}'" in message


def test_a_bare_flag_is_for_bool_keys_only():
    """A bare `--training.epochs` is not the number 1; a negative number may follow its key."""
    with pytest.raises(ConfigError, match=r"--training.epochs needs a value \(--training.epochs=VALUE\)"):
        load_config(DATA + ["--training.epochs", "--training.resume"])
    with pytest.raises(ConfigError, match="'lr.lr'.*must be > 0"):  # read as the value -0.5
        load_config(DATA + ["--lr.lr", "-0.5"])


def test_unknown_plain_argument_is_refused():
    with pytest.raises(ConfigError, match="unknown argument 'epochs=3'"):
        load_config(DATA + ["epochs=3"])


def test_unknown_yaml_key_names_file_key_and_nearest(tmp_path):
    preset = write(tmp_path / "p.yaml", "training:\n  epochs: 4\n  lable_smoothing: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(DATA + ["--config-file", str(preset)])
    message = str(e.value)
    assert str(preset) in message
    assert "'training.lable_smoothing'" in message and "'training.label_smoothing'" in message


def test_unknown_yaml_section_is_refused(tmp_path):
    preset = write(tmp_path / "p.yaml", "optimizer:\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match="unknown key 'optimizer.momentum'.*'training.momentum'"):
        load_config(DATA + ["--config-file", str(preset)])


@pytest.mark.parametrize("argv, key, value", [
    (["--training.epochs=3.5"], "training.epochs", "'3.5'"),
    (["--training.epochs=0"], "training.epochs", "'0'"),
    (["--training.epochs=many"], "training.epochs", "'many'"),
    (["--lr.lr=-1"], "lr.lr", "'-1'"),
    (["--lr.lr=0"], "lr.lr", "'0'"),
    (["--training.label_smoothing=1.5"], "training.label_smoothing", "'1.5'"),
    (["--training.use_blurpool=2"], "training.use_blurpool", "'2'"),
    (["--training.precision=fp8"], "training.precision", "'fp8'"),
    (["--lr.milestones=30,x"], "lr.milestones", "'30,x'"),
])
def test_bad_value_names_key_and_value(argv, key, value):
    with pytest.raises(ConfigError) as e:
        load_config(DATA + argv)
    message = str(e.value)
    assert f"'{key}'" in message and value in message


@pytest.mark.parametrize("text, key, value", [
    ("training:\n  epochs: 2.5\n", "training.epochs", "2.5"),
    ("training:\n  use_blurpool: yes please\n", "training.use_blurpool", "yes please"),
    ("training:\n  nesterov: 2\n", "training.nesterov", "2"),
    ("lr:\n  lr: true\n", "lr.lr", "True"),
    ("lr:\n  lr: .nan\n", "lr.lr", "nan"),
    ("model:\n  arch: [resnet50]\n", "model.arch", "['resnet50']"),
])
def test_bad_yaml_value_names_file_key_and_value(tmp_path, text, key, value):
    preset = write(tmp_path / "p.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(DATA + ["--config-file", str(preset)])
    message = str(e.value)
    assert str(preset) in message and f"'{key}'" in message and value in message


def test_yaml_types_are_accepted():
    cfg = load_config(DATA + ["--training.epochs=16"])
    assert cfg["training"]["epochs"] == 16


def test_base_includes_merge_recursively_and_the_preset_wins(tmp_path):
    write(tmp_path / "_common.yaml", "training:\n  epochs: 88\n  momentum: 0.8\nlr:\n  lr: 1.0\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "_mid.yaml", "base: ../_common.yaml\ntraining:\n  momentum: 0.85\n")
    preset = write(tmp_path / "sub" / "p.yaml",
                   "base: [_mid.yaml]\ntraining:\n  epochs: 16\ndata:\n  num_workers: 3\n")
    cfg = load_config(DATA + ["--config-file", str(preset), "--lr.lr=1.7"])
    assert cfg["training"]["epochs"] == 16        # preset over its base
    assert cfg["training"]["momentum"] == 0.85    # nearer base over the farther one
    assert cfg["lr"]["lr"] == 1.7                 # command line over every file
    assert cfg["data"]["num_workers"] == 3
    assert cfg["meta"]["config_file"] == str(preset.resolve())


def test_base_errors_name_the_file(tmp_path):
    preset = write(tmp_path / "p.yaml", "base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(DATA + ["--config-file", str(preset)])
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(DATA + ["--config-file", str(tmp_path / "a.yaml")])
    write(tmp_path / "bad_base.yaml", "training:\n  epochz: 3\n")
    preset = write(tmp_path / "q.yaml", "base: bad_base.yaml\n")
    with pytest.raises(ConfigError, match="'training.epochz'.*'training.epochs'"):
        load_config(DATA + ["--config-file", str(preset)])


def test_consistency_checks():
    with pytest.raises(ConfigError, match="data.train_dataset"):
        load_config(["--data.val_dataset=v.beton"])
    with pytest.raises(ConfigError, match="min_res"):
        load_config(DATA + ["--resolution.min_res=256", "--resolution.max_res=192"])
    with pytest.raises(ConfigError, match="training.checkpoint"):
        load_config(["--data.val_dataset=v.beton", "--training.eval_only=1"])
    # used to fail only when the optimizer was built, after the loaders' start-up
    with pytest.raises(ConfigError, match="training.nesterov=1 applies to training.optimizer=sgd only"):
        load_config(DATA + ["--training.optimizer=adamw", "--training.nesterov=1"])
    load_config(DATA + ["--training.optimizer=adamw", "--training.nesterov=0"])
    with pytest.raises(ConfigError, match="model.arch=resnet5 is not a torchvision.*did you mean resnet50"):
        load_config(DATA + ["--model.arch=resnet5"])
    with pytest.raises(ConfigError, match="training.adam_beta2 must be < 1, got 1.0"):
        load_config(DATA + ["--training.optimizer=radam", "--training.adam_beta2=1"])
    with pytest.raises(ConfigError, match="training.ema_decay must be < 1, got 1.0"):
        load_config(DATA + ["--training.ema_decay=1"])
    with pytest.raises(ConfigError, match="model.activation"):
        load_config(DATA + ["--model.activation=swish"])
    with pytest.raises(ConfigError, match="training.optimizer"):
        load_config(DATA + ["--training.optimizer=ranger"])
    with pytest.raises(ConfigError, match="training.distill_arch=resnet125"):
        load_config(DATA + ["--training.distill_arch=resnet125", "--training.distill_checkpoint=t.pt"])


@pytest.mark.parametrize("argv, named", [
    # the default triangular schedule peaks at epoch 2: a 1-epoch run used to fail at its first
    # step, after start-up, instead of at load time
    (["--training.epochs=1"], "lr_peak_epoch must be in [0, epochs=1], got 2.0"),
    (["--lr.lr_schedule_type=cosine", "--lr.warmup_epochs=5", "--training.epochs=3"], "warmup_epochs"),
    (["--lr.lr_schedule_type=step_warmup", "--lr.milestones=60,30"], "milestones must be increasing"),
    (["--lr.warmup_epochs=1"], "triangular schedule warms up to lr_peak_epoch"),
])
def test_schedule_keys_that_do_not_fit_the_run_fail_at_load_time(argv, named):
    with pytest.raises(ConfigError) as e:
        load_config(DATA + argv)
    assert named in str(e.value) and "lr.lr_schedule_type" in str(e.value)


def test_help_lists_every_key():
    text = help_text()
    for section, keys in defaults().items():
        for key in keys:
            assert f"--{section}.{key}" in text


def test_train_help_on_the_command_line(monkeypatch, capsys):
    from ffcv_imagenet import cli  # the `ffcv-imagenet` console script

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # cli.main rewrites sys.argv
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in ("--data.train_dataset", "--training.global_batch_size", "--lr.lr_schedule_type",
                "--validation.resolution", "--logging.folder", "--training.cpu_threads"):
        assert key in out


def test_train_main_reports_config_errors_with_exit_code_2(capsys):
    from ffcv_imagenet.train import main

    assert main(DATA + ["--training.epohcs=3"]) == 2
    err = capsys.readouterr().err
    assert "'training.epohcs'" in err and "'training.epochs'" in err
