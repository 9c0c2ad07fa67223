"""`ffcv-imagenet demo`: the whole pipeline on an embedded dataset, no download needed.

1. draws a 10-class dataset of shapes and textures as real JPEG files (ffcv_imagenet.synthetic);
2. writes train and val `.beton` files with the real writer;
3. trains ResNet-18 with the scaled-down preset `ffcv_imagenet/presets/demo.yaml` through the real
   training engine, on a GPU when there is one, else on the CPU (bf16 with AVX-512, else fp32;
   channels-last);
4. prints the time-to-accuracy table and the plots' paths (ffcv_imagenet.report).

Everything goes under `--out` (default ./demo_out); a second run reuses the generated images and
`.beton` files and starts a fresh training run.
"""

import argparse
import sys
import time
from importlib import resources
from pathlib import Path

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ffcv-imagenet demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="folder for data, run logs and report "
                        "(default %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=240, help="train images per class "
                        "(default %(default)s)")
    parser.add_argument("--val-per-class", type=int, default=50, help="val images per class "
                        "(default %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="training device (default: a GPU when present)")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--") or "." not in a.split("=")[0]]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (engine overrides look like --training.epochs=4)")

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
        f"--training.device={args.device}",
    ]
    if args.epochs is not None:
        train_argv.append(f"--training.epochs={args.epochs}")
    train_argv += extra
    print(f"[2/3] training: ffcv-imagenet train {' '.join(train_argv)}", flush=True)
    # start-up is counted from here: generating and writing the data is not part of training
    status = train.main(train_argv, launched_at=time.time())
    if status:
        print(f"demo: training failed (exit {status})", file=sys.stderr)
        return int(status)

    print("[3/3] report", flush=True)
    report_dir = out / "report"
    status = report.main([str(run_dir), "--out", str(report_dir), "--targets", "0.5,0.6,0.7,0.8,0.9"])
    print(f"demo finished in {time.time() - t0:.0f} s; logs in {run_dir}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
