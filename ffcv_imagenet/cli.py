"""The `ffcv-imagenet` console script: one subcommand per module, imported only when used."""

import importlib
import sys

# subcommand -> (module, one-line help). Each module exposes main(argv: list[str]) -> int | None.
SUBCOMMANDS = {
    "write": ("ffcv_imagenet.writer", "convert ILSVRC2012 (folders, flat val, tar archives) to .beton"),
    "inspect": ("ffcv_imagenet.inspect", "show fields, counts, labels, sizes and metadata of a .beton"),
    "train": ("ffcv_imagenet.train", "train a model from a preset (--config-file) with overrides"),
    "report": ("ffcv_imagenet.report", "time-to-accuracy tables and plots from run folders"),
    "export": ("ffcv_imagenet.export", "a run's weights + model.json for torchvision, timm or load_model"),
    "bench": ("ffcv_imagenet.bench", "loader/writer/training throughput vs stock ffcv, torchvision, DALI"),
    "scale": ("ffcv_imagenet.scale", "writer and loader cost per sample at ILSVRC2012 scale (1.28 M samples)"),
    "demo": ("ffcv_imagenet.demo", "generate a small real-JPEG dataset, write, train, report"),
    "check": ("ffcv_imagenet.check", "is this machine ready (versions, decoders, every precision, "
              "speed), and what a preset will cost here"),
}


def usage() -> str:
    lines = ["usage: ffcv-imagenet SUBCOMMAND [options]   (ffcv-imagenet SUBCOMMAND --help for options)", ""]
    for name, (_, help_text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<9} {help_text}")
    return "\n".join(lines)


def _quiet_numba_finalizer(unraisable):
    """numba's dispatcher finalizer raises KeyError when ffcv's compiled pipelines of a finished
    Loader are garbage-collected; harmless, but printed as a traceback per pipeline."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if (isinstance(unraisable.exc_value, KeyError) and tb is not None
            and tb.tb_frame.f_code.co_filename.endswith("numba/core/dispatcher.py")):
        return
    sys.__unraisablehook__(unraisable)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.unraisablehook = _quiet_numba_finalizer
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"ffcv-imagenet: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    # a subcommand run as a module reads sys.argv; make it look like a direct call.
    sys.argv = [f"ffcv-imagenet {name}"] + rest
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
