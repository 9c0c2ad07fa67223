"""`ffcv-imagenet demo`: the whole pipeline on an embedded dataset, no download needed.

1. draws a 10-class dataset of shapes and textures as real JPEG files (ffcv_imagenet.synthetic);
2. writes train and val `.beton` files with the real writer;
3. trains ResNet-18 with the scaled-down preset `ffcv_imagenet/presets/demo.yaml` through the real
   training engine, on a GPU when there is one, else on the CPU (bf16 with AVX-512, else fp32;
   channels-last);
4. prints the time-to-accuracy table and the plots' paths (ffcv_imagenet.report).

Everything goes under `demo.out` (default ./demo_out); a second run reuses the generated images and
`.beton` files and starts a fresh training run.
"""

import sys
import time
from importlib import resources
from pathlib import Path

from ffcv_imagenet.command import Command, Option
from ffcv_imagenet.config import parse_cli, resolve
from ffcv_imagenet.host import cpu_cores


def demo_preset() -> Path:
    return Path(str(resources.files("ffcv_imagenet") / "presets" / "demo.yaml"))


def prepare_data(out: Path, train_per_class: int, val_per_class: int, size_px: int, workers: int,
                 log=print):
    """Generate the JPEG folders and write the two .beton files (skipped when already there);
    `log=None` writes quietly."""
    say = log or (lambda *a, **k: None)
    from ffcv_imagenet.synthetic import make_image_folder
    from ffcv_imagenet.writer import write_dataset

    paths = {}
    for split, per_class, seed in (("train", train_per_class, 0), ("val", val_per_class, 1)):
        folder = out / "images" / f"{split}_{per_class}x{size_px}px"
        beton = out / "beton" / f"{split}_{per_class}x{size_px}px.beton"
        if not beton.exists():
            if not folder.exists():
                say(f"  drawing {10 * per_class} {split} JPEGs ({size_px} px) into {folder}",
                    flush=True)
                tmp = folder.with_name(folder.name + ".partial")
                make_image_folder(tmp, images_per_class=per_class, size_px=size_px, seed=seed)
                tmp.rename(folder)
            beton.parent.mkdir(parents=True, exist_ok=True)
            write_dataset(folder, beton, split=split, max_resolution=size_px, write_mode="jpg",
                          jpeg_quality=90, num_workers=workers, overwrite=False,
                          progress=log is not None)
        else:
            say(f"  reusing {beton}", flush=True)
        paths[split] = beton
    return paths


COMMAND = Command("demo", "demo", __doc__.split("\n\n")[0].split(": ", 1)[1], {
    "out": Option(str, "demo_out", "folder for data, run logs and report", path=True),
    "train_per_class": Option(int, 240, "train images per class (10 classes)", low=1),
    "val_per_class": Option(int, 50, "val images per class (10 classes)", low=1),
    "size": Option(int, 64, "image side in pixels", low=16),
}, passthrough=("Any training key (ffcv-imagenet train --help) is handed to the engine, e.g. "
                "--training.epochs=4 or --training.device=cpu (default: a GPU when present)."))


def parse_args(argv: list):
    """The demo's settings; the training keys it hands on are checked here, before any data is
    drawn (ValueError names a bad key or value)."""
    args = COMMAND.parse(argv)
    resolve(parse_cli(list(args.extra))[1], source="command line")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        return COMMAND.refuse(e)

    t0 = time.time()
    out = Path(args.out).resolve()
    workers = cpu_cores()
    print(f"[1/3] data: shapes dataset, 10 classes -> {out}", flush=True)
    betons = prepare_data(out, args.train_per_class, args.val_per_class, args.size, workers)
    print(f"      data ready in {time.time() - t0:.1f} s", flush=True)

    from ffcv_imagenet import report, train

    run_dir = out / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    train_argv = [
        "--config-file", str(demo_preset()),
        f"--data.train_dataset={betons['train']}",
        f"--data.val_dataset={betons['val']}",
        f"--data.num_workers={workers}",
        f"--logging.folder={run_dir}",
        *args.extra,
    ]
    print(f"[2/3] training: ffcv-imagenet train {' '.join(train_argv)}", flush=True)
    # start-up is counted from here: generating and writing the data is not part of training
    status = train.main(train_argv, launched_at=time.time())
    if status:
        print(f"demo: training failed (exit {status})", file=sys.stderr)
        return int(status)

    print("[3/3] report", flush=True)
    report_dir = out / "report"
    status = report.main([str(run_dir), f"--report.out={report_dir}", "--report.targets=0.5,0.6,0.7,0.8,0.9"])
    print(f"demo finished in {time.time() - t0:.0f} s; logs in {run_dir}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
