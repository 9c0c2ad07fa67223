"""Helpers for the engine tests: tiny train/val .beton pairs written from the synthetic shapes; the
run folder's log and TensorBoard scalars read back."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN_PER_CLASS = 8   # 10 classes x 8 = 80 train images
VAL_IMAGES = 37       # not a multiple of 2 processes x any batch size the tests use
SIZE_PX = 32
REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3


def make_betons(root, *, train_per_class: int = TRAIN_PER_CLASS, val_images: int = VAL_IMAGES,
                size_px: int = SIZE_PX) -> tuple:
    """Write `root/train.beton` and `root/val.beton` (+ .meta.json) at `size_px`; returns the paths."""
    from ffcv_imagenet.synthetic import CLASSES, make_image_folder
    from ffcv_imagenet.writer import write_dataset

    root = Path(root)
    train_dir = make_image_folder(root / "train_images", train_per_class, size_px=size_px, seed=0)
    per_class = -(-val_images // len(CLASSES))
    val_dir = make_image_folder(root / "val_images", per_class, size_px=size_px, seed=1)
    extra = per_class * len(CLASSES) - val_images
    for class_name in CLASSES[:extra]:  # drop one image from the first classes to get val_images
        os.remove(sorted((val_dir / class_name).iterdir())[-1])
    paths = []
    for split, folder in (("train", train_dir), ("val", val_dir)):
        path = root / f"{split}.beton"
        write_dataset(folder, path, split=split, max_resolution=size_px, write_mode="jpg",
                      jpeg_quality=90, num_workers=1, progress=False)
        paths.append(path)
    return tuple(paths)


_written = {}


def shared_betons(tmp_path_factory) -> tuple:
    """(train, val) written once per test session, whichever test module asks first."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _written:
        _written[key] = make_betons(tmp_path_factory.mktemp("engine_betons"))
    return _written[key]


def run_args(train_beton, val_beton, folder, *extra):
    """80 train images, batch 8: 10 steps per epoch; bitwise reproducible on CPU with 1 thread."""
    return [f"--data.train_dataset={train_beton}", f"--data.val_dataset={val_beton}",
            f"--logging.folder={folder}", "--logging.progress=0",
            "--model.arch=resnet18", "--training.use_blurpool=0", f"--training.epochs={EPOCHS}",
            "--training.batch_size=8", "--training.label_smoothing=0", "--training.device=cpu",
            "--training.cpu_threads=1", "--data.num_workers=1", "--training.deterministic=1",
            "--lr.lr=0.02", "--lr.lr_schedule_type=cosine", "--augment.scale_min=0.5",
            "--resolution.min_res=32", "--resolution.max_res=32", "--validation.resolution=32",
            "--validation.batch_size=20", "--validation.lr_tta=0", *extra]


def engine_env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def torchrun_2(argv, timeout_s=240, **env):
    """The engine under torchrun with 2 processes on this machine (gloo), as a user runs it. The
    job runs in a session of its own: past `timeout_s` (a hang) the whole process group, torchrun
    and its workers, is killed and the test fails saying so."""
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ffcv_imagenet.train",
                             *argv], env=engine_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout_s} s (killed with its workers):\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def records(folder, kind=None):
    with open(Path(folder) / "log.jsonl") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [r for r in lines if kind is None or r["type"] == kind]


def tensorboard_scalars(folder) -> dict:
    """{tag: [(step, value)]} of the event files in `folder`, read by TensorBoard's own reader,
    which hides what a later launch's purge_step covers, as TensorBoard's display does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}
