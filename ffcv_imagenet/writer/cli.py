"""`ffcv-imagenet write`: fastargs section `cfg` (`--cfg.KEY=VALUE`, or a JSON/YAML file under
`cfg:` given with -C), strict about keys and values, its --help table made from OPTIONS."""

import argparse
import difflib
import json
import os
import sys
import textwrap

from .core import write
from .install import Terminated
from .options import OPTIONS, WriterError, check_options


DESCRIPTION = ("Convert ILSVRC2012 (class folders, flat val + labels, or the .tar archives) "
               "to .beton.")


def help_epilog() -> str:
    """The option table of --help: plain text (fastargs' own table uses terminal line drawing)."""
    lines = ["options (--cfg.KEY=VALUE; or in a JSON/YAML file under 'cfg:' given with -C):", ""]
    for key, option in OPTIONS.items():
        if option.required:
            default = "required"
        elif option.kind is bool:
            default = f"default {int(option.default)}"
        elif option.default in (None, ""):
            default = "optional"
        else:
            default = f"default {option.default!r}"
        text = textwrap.wrap(f"{option.desc} ({option.constraint()}; {default})", width=70)
        lines.append(f"  --cfg.{key:<22} {text[0]}")
        lines += [f"  {'':<28} {line}" for line in text[1:]]
    return "\n".join(lines)


def _fastargs_config():
    from fastargs import Config, Param, Section
    from fastargs.validation import Checker

    class OptionChecker(Checker):
        def __init__(self, key, option):
            self.key, self.option = key, option

        def check(self, value):
            return self.option.coerce(self.key, value)

        def help(self):
            return self.option.constraint()

    config = Config()
    Section("cfg", "ffcv-imagenet write", config_descriptor=config).params(**{
        key: Param(OptionChecker(key, option), option.desc,
                   default=None if option.required else option.default, required=option.required)
        for key, option in OPTIONS.items()})
    return config


def _flatten(tree, prefix=""):
    if not isinstance(tree, dict):
        return [prefix]
    keys = []
    for k, v in tree.items():
        keys += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    return keys


def check_known_keys(argv: list):
    """fastargs ignores keys it does not know; refuse them, naming the nearest valid one."""
    known = [f"cfg.{k}" for k in OPTIONS]
    given = []
    tokens = iter(argv)
    for token in tokens:
        if token in ("-C", "--config-file") or token.startswith("--config-file="):
            config_file = token.split("=", 1)[1] if "=" in token else next(tokens, None)
            keys = _flatten(_load_config_file(config_file))
            given += [(key, f"in {config_file}") for key in keys]
        elif token in ("-h", "--help") or not token.startswith("-") or _is_number(token):
            continue  # help, or the value of the previous option
        else:
            given.append((token.lstrip("-").split("=", 1)[0], "on the command line"))
    errors = []
    for key, where in given:
        if key in known:
            continue
        section = key.split(".", 1)[0] if "." in key else None
        close = difflib.get_close_matches(key if section else f"cfg.{key}", known, n=1, cutoff=0.4)
        hint = f"; did you mean --{close[0]}?" if close else ""
        if section is not None and section != "cfg":
            errors.append(f"unknown section '{section}' in --{key} {where} (the writer's options "
                          f"are all under cfg){hint}")
        else:
            errors.append(f"unknown option --{key} {where}{hint}")
    if errors:
        valid = ", ".join("--" + k for k in known)
        raise ValueError("; ".join(errors) + f"\nvalid options: {valid}")


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _load_config_file(path):
    if path is None or not os.path.isfile(path):
        raise ValueError(f"--config-file {path}: file not found")
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        import yaml

        return yaml.safe_load(text) or {}


def parse_args(argv: list) -> dict:
    """Options from `--cfg.key=value` arguments (and -C config files); raises ValueError."""
    check_known_keys(argv)
    config = _fastargs_config()
    parser = argparse.ArgumentParser(prog="ffcv-imagenet write", description=DESCRIPTION)
    saved_argv = sys.argv
    sys.argv = [parser.prog] + list(argv)  # fastargs reads sys.argv, in both calls below
    try:
        config.augment_argparse(parser)  # declares the --cfg.* arguments
        parser.epilog = help_epilog()
        config.collect_argparse_args(parser)  # --help prints it (and exits 0) here
    finally:
        sys.argv = saved_argv
    raw = {key: config.content.get(("cfg", key)) for key in OPTIONS}
    return check_options(raw)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(argv)
    except ValueError as e:
        print(f"ffcv-imagenet write: {e}", file=sys.stderr)
        return 2
    try:
        write(opts, progress=True)
    except (WriterError, ValueError, RuntimeError) as e:
        print(f"ffcv-imagenet write: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated):
        print("ffcv-imagenet write: interrupted; nothing was written at the destination",
              file=sys.stderr)
        return 130
    return 0
