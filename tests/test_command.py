"""command.py: the one command-line machinery of every subcommand (train's keys come from
config.declare, the others from a Command each); the same spelling, -C files, hints and --help."""

import importlib

import pytest

from ffcv_imagenet import cli, command, config, demo, inspect, report


def command_of(name: str):
    module = importlib.import_module(cli.SUBCOMMANDS[name][0])
    return getattr(module, "COMMAND", None)


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_every_subcommand_lists_its_keys_with_type_and_default(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: ffcv-imagenet {name}")
    cmd = command_of(name)
    if cmd is None:  # train: the engine's declaration table
        names = ["--" + ".".join(path) for path in config.declare().entries]
    else:
        names = ["--" + n for n in cmd.names()]
        for option in cmd.options.values():  # the type and the default of each key
            assert f"{option.constraint()}; {option.default_text()}" in " ".join(text.split())
    for name_ in names:
        assert name_ in text


@pytest.mark.parametrize("name, old", [("bench", "--quick"), ("check", "--quick"),
                                       ("report", "--no-plots"), ("inspect", "--verify"),
                                       ("demo", "--size"), ("write", "--split")])
def test_an_argument_that_is_not_a_key_is_refused_with_the_nearest(name, old, capsys):
    assert cli.main([name, "x", old]) == 2 if name in ("report", "inspect") else cli.main([name, old]) == 2
    err = capsys.readouterr().err
    assert f"unknown argument '{old}'; did you mean '--{command_of(name).section}." in err


def test_keys_files_positionals_and_lists(tmp_path):
    args = inspect.COMMAND.parse(["--inspect.verify", "a.beton", "--inspect.num_workers", "3"])
    assert (args.verify, args.path, args.num_workers) == (True, "a.beton", 3)  # FILE is no bool
    args = inspect.COMMAND.parse(["--inspect.verify", "0", "a.beton"])
    assert args.verify is False and args.path == "a.beton"
    with pytest.raises(ValueError, match="FILE is required"):
        inspect.COMMAND.parse(["--inspect.json"])
    with pytest.raises(ValueError, match="one FILE expected, got 2"):
        inspect.COMMAND.parse(["a.beton", "b.beton"])
    cfg = tmp_path / "report.yaml"
    cfg.write_text("report:\n  targets: [70, 0.8]\n  plots: false\n")
    args = report.COMMAND.parse(["r1", "-C", str(cfg), "r2", "--report.section=x"])
    assert args.runs == ("r1", "r2") and args.targets == (70.0, 0.8) and args.plots is False
    assert report.fractions(args.targets) == (0.7, 0.8)
    cfg.write_text("report:\n  targetz: [70]\n")
    with pytest.raises(ValueError, match=f"unknown option --report.targetz in {cfg}; did you mean --report.targets"):
        report.COMMAND.parse(["r1", "-C", str(cfg)])
    with pytest.raises(ValueError, match=r"report.targets='70,x': expected comma-separated, each a number"):
        report.COMMAND.parse(["r1", "--report.targets=70,x"])
    with pytest.raises(ValueError, match="unknown section 'bench' in --bench.quick .*report's options"):
        report.COMMAND.parse(["r1", "--bench.quick"])
    with pytest.raises(ValueError, match="--report.section needs a value"):
        report.COMMAND.parse(["r1", "--report.section"])


def test_demo_hands_training_keys_on_and_checks_them_first():
    args = demo.parse_args(["--demo.size=32", "--training.epochs=2", "--training.resume"])
    assert args.size == 32 and args.extra == ("--training.epochs=2", "--training.resume")
    with pytest.raises(ValueError, match="unknown key 'training.epoch'.*did you mean 'training.epochs'"):
        demo.parse_args(["--training.epoch=2"])
    with pytest.raises(ValueError, match="demo.size='8': expected an integer >= 16"):
        demo.parse_args(["--demo.size=8"])


def test_option_values_are_coerced_and_bounded():
    opt = command.Option(int, None, "n", low=1, many=True)
    assert opt.coerce("s.n", "1, 2,3") == (1, 2, 3) and opt.coerce("s.n", None) is None
    assert opt.coerce("s.n", "") == ()
    with pytest.raises(ValueError, match=r"s.n='0': expected comma-separated, each an integer >= 1"):
        opt.coerce("s.n", "0")
    flag = command.Option(bool, False, "f")
    assert flag.coerce("s.f", config.BareFlag("1")) is True
    with pytest.raises(ValueError, match="s.f=' ': expected 0 or 1"):
        flag.coerce("s.f", " ")
