"""`ffcv-imagenet write`: section `cfg` (`--cfg.KEY=VALUE`, or a YAML/JSON file under `cfg:` given
with -C), strict about keys and values, read by the command-line machinery every subcommand uses
(command.py over config.parse_cli); its --help table is made from OPTIONS."""

import sys

from .core import write
from .install import Terminated
from .options import COMMAND, WriterError, WriterOptions, finish_options


def parse_args(argv: list) -> "WriterOptions":
    """Options from `--cfg.key=value` arguments and -C files (later values win); unknown keys are
    refused with the nearest valid one; raises ValueError (config.ConfigError)."""
    return finish_options(COMMAND.parse(argv))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(argv)
    except ValueError as e:
        return COMMAND.refuse(e)
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
