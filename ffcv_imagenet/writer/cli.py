"""`ffcv-imagenet write`: section `cfg` (`--cfg.KEY=VALUE`, or a YAML/JSON file under `cfg:` given
with -C), strict about keys and values, read by the machinery `ffcv-imagenet train` uses
(config.py: one argv reader, one YAML loader, one bool parser, one "did you mean"); its --help
table is made from OPTIONS."""

import sys
import textwrap

from ..config import flatten, load_config_file, nearest, parse_cli
from .core import write
from .install import Terminated
from .options import OPTIONS, WriterError, WriterOptions, check_options


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


def parse_args(argv: list) -> "WriterOptions":
    """Options from `--cfg.key=value` arguments and -C files (YAML or JSON, under `cfg:`), read by
    the same machinery as `ffcv-imagenet train` (config.parse_cli, load_config_file); later
    values win. Unknown keys are refused with the nearest valid one; raises ValueError."""
    if "-h" in argv or "--help" in argv:
        print(f"usage: ffcv-imagenet write [-C FILE] --cfg.KEY=VALUE ...\n\n{DESCRIPTION}\n\n{help_epilog()}")
        sys.exit(0)
    files, cli_values = parse_cli(argv, known=[f"--cfg.{k}" for k in OPTIONS])
    given, errors = {}, []
    for path in files:
        tree = load_config_file(path)
        values = flatten(tree, path)
        errors += _unknown(values, f"in {path}")
        given.update(values)
    errors += _unknown(cli_values, "on the command line")
    given.update(cli_values)
    if errors:
        valid = ", ".join(f"--cfg.{k}" for k in OPTIONS)
        raise ValueError("; ".join(errors) + f"\nvalid options: {valid}")
    return check_options({name.split(".", 1)[1]: value for name, value in given.items()})


def _unknown(values: dict, where: str) -> list:
    """One message per name in `values` that is not `cfg.<option>`, with the nearest valid one."""
    known = [f"cfg.{k}" for k in OPTIONS]
    errors = []
    for name in values:
        if name in known:
            continue
        section = name.split(".", 1)[0] if "." in name else None
        close = nearest(name if section else f"cfg.{name}", known)
        hint = f"; did you mean --{close}?" if close else ""
        if section is not None and section != "cfg":
            errors.append(f"unknown section '{section}' in --{name} {where} (the writer's options "
                          f"are all under cfg){hint}")
        else:
            errors.append(f"unknown option --{name} {where}{hint}")
    return errors


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
