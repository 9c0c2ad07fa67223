"""`ffcv-imagenet scale`: does the writer and the loader keep their cost per sample from 12.8 k to
ILSVRC2012's 1.28 M samples? Measured, per input layout and sample count, on sources shaped like
ILSVRC2012 (1,000 classes) made of small real JPEGs so that a million of them are minutes of work.

Layouts (LAYOUTS): `folder` (class folders of hard links to a pool of small JPEGs), `class_tars`
(a tar of per-class tars, as ILSVRC2012_img_train.tar ships, members stored in full),
`val_folder` and `val_tar` (a flat folder / tar of `ILSVRC2012_val_<8 digits>.JPEG` with a
LOC_val_solution.csv). For each: seconds to index the source before the first image is written,
writer images/s, peak RSS of the writer's parent and of its largest worker, output bytes; then,
on the written file, loader start-up (construct to first batch), the per-epoch work that grows
with N (the sharded order for `scale.ranks` ranks, its batches and ffcv's epoch schedule) and the
loader's peak RSS, for the random and quasi_random orders (val: sequential). Every measurement
runs in a fresh process, so that peak RSS is that step's own.
"""

import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from .command import Command, Option
from .host import cpu_cores

TRAIN_LAYOUTS = ("folder", "class_tars")
VAL_LAYOUTS = ("val_folder", "val_tar")
LAYOUTS = TRAIN_LAYOUTS + VAL_LAYOUTS
PARTS = ("layouts", "memory")
POOL_QUALITY = 90

COMMAND = Command("scale", "scale", (
    "Writer and loader cost per sample at ILSVRC2012 scale: index time, writer images/s, peak RSS, "
    "loader start-up and per-epoch work, for 1,000-class sources of N samples in every layout."), {
    "samples": Option(int, (12800, 128000, 1281167), "train sample counts (ILSVRC2012: 1281167)",
                      low=1, many=True),
    "val_samples": Option(int, 50000, "flat val sample count (ILSVRC2012: 50000); 0 = no val rows",
                          low=0),
    "classes": Option(int, 1000, "classes of the train sources (ILSVRC2012: 1000)", low=1),
    "layouts": Option(str, LAYOUTS, "layouts to measure", choices=LAYOUTS, many=True),
    "images": Option(str, "", "folder of JPEGs for the pool (e.g. ../shared/data/imagenet-samples-315); "
                     "empty: photo-like synthetic images", path=True),
    "pool": Option(int, 64, "distinct pool images (all of scale.images when fewer)", low=1),
    "pool_px": Option(int, 64, "longer side of the pool images in px (small: the write stays bounded)",
                      low=8),
    "ranks": Option(int, 8, "ranks of the sharded train order whose per-epoch cost is measured", low=1),
    "batch_size": Option(int, 256, "loader batch per rank", low=1),
    "workers": Option(int, 0, "writer and loader worker processes; 0 = all cores", low=0),
    "workdir": Option(str, "", "sources and .beton files go here (default: a temporary folder, removed); "
                      "needs about 4 KB a sample per layout", path=True),
    "json": Option(str, "", "write the rows and the machine to this JSON file", path=True),
    "parts": Option(str, ("layouts",), "what to measure: layouts (index, write and loader per layout "
                    "and N), memory (training-loader img/s on a raw-pixel train file larger than "
                    "scale.memory_limit_mb: in_memory=1 where it fits, then in_memory=1, 0 + random, "
                    "0 + quasi_random under the limit)", choices=PARTS, many=True),
    "memory_limit_mb": Option(int, 2048, "memory limit for the memory part: a memory cgroup on the "
                              "loader's process, page cache included (needs root or a delegated "
                              "cgroup)", low=64),
    "memory_file_mb": Option(int, 0, "size of that file (default: 3 x scale.memory_limit_mb)", low=0),
    "memory_seconds": Option(float, 20.0, "timed seconds per loader configuration", low=0.1),
    "render": Option(str, (), "only render these JSON files (from scale.json) as the README's scale "
                     "tables, into scale.readme", many=True, path=True),
    "readme": Option(str, "README.md", "the Markdown file scale.render writes into", path=True),
})


# --------------------------------------------------------------------------- sources

def make_pool(folder: Path, images, count: int, side_px: int, seed: int = 0) -> list:
    """`count` small JPEGs (longer side `side_px`, q90) from the files under `images`, or photo-like
    synthetic ones; returns their paths."""
    import cv2

    from .synthetic import photo_like
    from .writer import target_size

    folder.mkdir(parents=True, exist_ok=True)
    if images:
        files = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        if not files:
            raise SystemExit(f"ffcv-imagenet scale: no .JPEG/.jpg/.png files under scale.images={images}")
        pictures = (cv2.imread(str(p), cv2.IMREAD_COLOR) for p in files[:count])
    else:
        rng = np.random.default_rng(seed)
        pictures = (photo_like(375, 500, rng)[:, :, ::-1] for _ in range(count))
    paths = []
    for k, bgr in enumerate(pictures):
        small = cv2.resize(bgr, target_size(bgr.shape[1], bgr.shape[0], side_px), interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", np.ascontiguousarray(small), [cv2.IMWRITE_JPEG_QUALITY, POOL_QUALITY])
        path = folder / f"pool_{k:04d}.JPEG"
        path.write_bytes(data.tobytes())
        paths.append(path)
    return paths


def wnid(c: int) -> str:
    return f"n{c:08d}"


def per_class(samples: int, classes: int) -> np.ndarray:
    """Images of each class: as even as possible (ILSVRC2012: 732 to 1,300)."""
    return np.full(classes, samples // classes) + (np.arange(classes) < samples % classes)


def build_folder(root: Path, pool: list, samples: int, classes: int) -> None:
    """root/<wnid>/<wnid>_<k>.JPEG, hard links to the pool."""
    k = 0
    for c, count in enumerate(per_class(samples, classes)):
        folder = root / wnid(c)
        folder.mkdir(parents=True)
        for j in range(count):
            os.link(pool[k % len(pool)], folder / f"{wnid(c)}_{j}.JPEG")
            k += 1


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def build_class_tars(tar_path: Path, pool: list, samples: int, classes: int) -> None:
    """A tar of per-class tars (<wnid>.tar), every member stored in full, as ILSVRC2012 ships it."""
    import io

    blobs = [p.read_bytes() for p in pool]
    k = 0
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as outer:
        for c, count in enumerate(per_class(samples, classes)):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                for j in range(count):
                    _add_bytes(inner, f"{wnid(c)}_{j}.JPEG", blobs[k % len(blobs)])
                    k += 1
            _add_bytes(outer, f"{wnid(c)}.tar", inner_bytes.getvalue())


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i + 1:08d}"


def write_val_labels(path: Path, samples: int, classes: int) -> None:
    """LOC_val_solution.csv: image i is of class i mod classes (every class present)."""
    with open(path, "w") as f:
        f.write("ImageId,PredictionString\n")
        for i in range(samples):
            f.write(f"{val_name(i)},{wnid(i % classes)} 0 0 10 10\n")


def build_val_folder(root: Path, pool: list, samples: int) -> None:
    root.mkdir(parents=True)
    for i in range(samples):
        os.link(pool[i % len(pool)], root / f"{val_name(i)}.JPEG")


def build_val_tar(tar_path: Path, pool: list, samples: int) -> None:
    blobs = [p.read_bytes() for p in pool]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(samples):
            _add_bytes(tar, f"{val_name(i)}.JPEG", blobs[i % len(blobs)])


def build_source(layout: str, where: Path, pool: list, samples: int, classes: int) -> tuple:
    """Build `layout` with `samples` images under `where`; returns (data_dir, split, val_labels)."""
    where.mkdir(parents=True, exist_ok=True)
    if layout == "folder":
        build_folder(where / "train", pool, samples, classes)
        return where / "train", "train", ""
    if layout == "class_tars":
        build_class_tars(where / "ILSVRC2012_img_train.tar", pool, samples, classes)
        return where / "ILSVRC2012_img_train.tar", "train", ""
    labels = where / "LOC_val_solution.csv"
    write_val_labels(labels, samples, classes)
    if layout == "val_folder":
        build_val_folder(where / "val", pool, samples)
        return where / "val", "val", labels
    build_val_tar(where / "ILSVRC2012_img_val.tar", pool, samples)
    return where / "ILSVRC2012_img_val.tar", "val", labels


# --------------------------------------------------------------------------- measurements (each in a fresh process)

def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    """Peak RSS of this process (its memory map's high-water mark, VmHWM: getrusage's would carry
    over the peak of the process that spawned it) or of its largest child."""
    if who == resource.RUSAGE_SELF:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def probe_write(data_dir: str, write_path: str, split: str, val_labels: str, workers: int,
                options=None) -> dict:
    """Write one source; the writer's own timings, and the peak RSS of this (parent) process and
    of its largest worker (forked: its RSS counts the pages it shares with the parent). The writer
    imports neither torch nor ffcv, and neither does this."""
    from .writer import write_dataset

    before_mb = rss_mb()
    summary = write_dataset(data_dir, write_path, split=split, val_labels=val_labels,
                            num_workers=workers, progress=False, **(options or {}))
    return {"index_s": summary["index_seconds"], "write_img_s": summary["write_images_per_s"],
            "bytes": summary["bytes"], "written": summary["samples"],
            "parent_rss_mb": round(peak_rss_mb(), 1), "parent_rss_before_mb": round(before_mb, 1),
            "worker_rss_mb": round(peak_rss_mb(resource.RUSAGE_CHILDREN), 1)}


def probe_loader(path: str, order: str, ranks: int, batch_size: int, workers: int) -> dict:
    """Loader start-up (construct to first batch, compilation included), then the per-epoch work
    that grows with N, timed alone: the order of the next epoch, its batches, ffcv's schedule."""
    import torch

    from . import data

    torch.set_num_threads(1)
    before_mb = rss_mb()
    started = time.perf_counter()
    if order == "sequential":
        loader = data.create_val_loader(path, batch_size=batch_size, resolution_px=64, num_workers=workers,
                                        device=torch.device("cpu"), rank=0, world_size=ranks)
    else:
        loader = data.create_train_loader(path, batch_size=batch_size, resolution_px=64,
                                          num_workers=workers, device=torch.device("cpu"), rank=0, world_size=ranks,
                                          order=order)
    next(iter(loader))
    startup_s = time.perf_counter() - started
    ffcv_loader = loader.loader
    overhead = []
    for _ in range(3):
        started = time.perf_counter()
        indices = ffcv_loader.next_traversal_order()[:len(ffcv_loader) * batch_size]
        batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        ffcv_loader.memory_manager.schedule_epoch(batches)
        ffcv_loader.next_epoch += 1
        overhead.append(time.perf_counter() - started)
    return {"loader_startup_s": round(startup_s, 3), "epoch_overhead_s": round(min(overhead), 4),
            "loader_rss_mb": round(peak_rss_mb(), 1), "loader_rss_before_mb": round(before_mb, 1)}


def train_orders() -> list:
    """data.ORDERS, asked in a fresh process: data imports torch, which would inflate this one."""
    from .data import ORDERS

    return list(ORDERS)


def in_fresh_process(function: str, *args, cgroup_procs=None) -> dict:
    """Run `ffcv_imagenet.scale.<function>(*args)` in a new interpreter (in the cgroup whose
    `cgroup.procs` is given); its JSON result."""
    # os._exit: a loader stopped after a few batches leaves its threads running, and a normal
    # interpreter exit can abort in their destructors ("terminate called without an active exception")
    code = (f"import json, os, sys; from ffcv_imagenet.scale import {function} as f; "
            "print('RESULT ' + json.dumps(f(*json.loads(sys.argv[1]))), flush=True); os._exit(0)")
    done = subprocess.run([sys.executable, "-c", code, json.dumps([str(a) if isinstance(a, Path) else a
                                                                   for a in args])],
                          capture_output=True, text=True,
                          preexec_fn=None if cgroup_procs is None else lambda: _join(cgroup_procs))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"scale: {function}{args} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _join(cgroup_procs) -> None:
    with open(cgroup_procs, "w") as f:
        f.write(str(os.getpid()))


# --------------------------------------------------------------------------- the run

def measure_layout(layout: str, samples: int, args, pool: list, workdir: Path, log) -> list:
    """Rows for one layout and sample count: build the source, write it, read it."""
    where = workdir / f"{layout}-{samples}"
    started = time.perf_counter()
    data_dir, split, labels = build_source(layout, where, pool, samples, args.classes)
    log(f"[scale] {layout} {samples:,}: source built in {time.perf_counter() - started:.0f} s; writing")
    beton = where / f"{split}.beton"
    wrote = in_fresh_process("probe_write", data_dir, beton, split, str(labels), args.workers)
    per_sample_us = {"index_us_per_sample": round(wrote["index_s"] / samples * 1e6, 2)}
    log(f"[scale] {layout} {samples:,}: indexed in {wrote['index_s']:.2f} s, "
        f"{wrote['write_img_s']:.0f} img/s, parent peak {wrote['parent_rss_mb']:.0f} MB")
    shutil.rmtree(data_dir) if data_dir.is_dir() else data_dir.unlink()
    rows = []
    ranks = args.ranks if split == "train" else 1
    batch_size = max(1, min(args.batch_size, samples // ranks))  # a small N still yields a batch
    for order in args.orders if split == "train" else ("sequential",):
        read = in_fresh_process("probe_loader", beton, order, ranks, batch_size, args.workers)
        log(f"[scale] {layout} {samples:,} {order}: start-up {read['loader_startup_s']:.2f} s, "
            f"epoch overhead {read['epoch_overhead_s'] * 1e3:.1f} ms")
        rows.append({"layout": layout, "samples": samples, "order": order, **wrote, **per_sample_us, **read})
    shutil.rmtree(where)
    return rows


def growth(rows: list) -> dict:
    """Per layout and order, how costs grow from the smallest N to the largest: index seconds and
    per-epoch work per sample (largest over smallest), and the writer parent's RSS per added sample
    (over the upper interval of N, against the lower: the fixed cost of the libraries a write loads
    would otherwise dominate the smallest N)."""
    out = {}
    for key in sorted({(r["layout"], r["order"]) for r in rows}):
        mine = sorted((r for r in rows if (r["layout"], r["order"]) == key), key=lambda r: r["samples"])
        if len(mine) < 2:
            continue
        small, large = mine[0], mine[-1]
        lower, upper = (mine[0], mine[1]), (mine[-2], mine[-1]) if len(mine) > 2 else (mine[0], mine[-1])
        out["/".join(key)] = {
            "from": small["samples"], "to": large["samples"],
            "index_s": _ratio(large["index_s"] / large["samples"], small["index_s"] / small["samples"]),
            "epoch_overhead_s": _ratio(large["epoch_overhead_s"] / large["samples"],
                                       small["epoch_overhead_s"] / small["samples"]),
            "parent_rss_bytes_per_added_sample": round(_marginal(upper) * 2**20),
            "parent_rss_added": _ratio(_marginal(upper), _marginal(lower)) if len(mine) > 2 else None,
        }
    return out


def _marginal(pair) -> float:
    a, b = pair
    return (b["parent_rss_mb"] - a["parent_rss_mb"]) / (b["samples"] - a["samples"])


def _ratio(a, b):
    return round(a / b, 3) if b > 0 else None


def machine() -> dict:
    import psutil

    from .logger import cpu_model

    return {"cpu": cpu_model() or platform.processor() or "", "cores": cpu_cores(),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform()}


def run(args, log=print) -> dict:
    workers = args.workers or cpu_cores()
    args.workers = workers
    args.orders = in_fresh_process("train_orders")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ffcv_imagenet_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": "ffcv-imagenet scale " + " ".join(args.argv),
              "machine": machine(), "workers": workers, "classes": args.classes, "rows": []}
    try:
        pool = make_pool(workdir / "pool", args.images, args.pool, args.pool_px)
        result["pool"] = {"images": len(pool), "side_px": args.pool_px,
                          "source": args.images or "synthetic (synthetic.photo_like)",
                          "mean_bytes": round(float(np.mean([p.stat().st_size for p in pool])))}
        plan = [(layout, n) for layout in args.layouts if layout in TRAIN_LAYOUTS for n in args.samples]
        if "layouts" not in args.parts:
            plan = []
        elif args.val_samples:
            plan += [(layout, args.val_samples) for layout in args.layouts if layout in VAL_LAYOUTS]
        for layout, n in plan:
            result["rows"] += measure_layout(layout, n, args, pool, workdir, log)
            if args.json:  # a long run leaves what it has measured so far
                _save(result, args.json)
        if "memory" in args.parts:
            result["memory"] = memory_rows(args, workdir, log)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["growth"] = growth(result["rows"])
    return result


def _save(result: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(temp, path)


# --------------------------------------------------------------------------- a train file larger than memory

MEMORY_CONFIGS = (  # (name, data.in_memory, data.order, under the memory limit)
    ("in_memory=1, file fits", True, "random", False),
    ("in_memory=1", True, "random", True),
    ("in_memory=0, random", False, "random", True),
    ("in_memory=0, quasi_random", False, "quasi_random", True),
)
MEMORY_RESOLUTION_PX = 128  # a cheap crop, so that reading, not decoding, limits the loader
RAW_SIDE_PX = 256


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int):
    """A memory cgroup (v1 `memory`, else v2) capped at `limit_bytes`, page cache included; yields
    its `cgroup.procs`. SystemExit naming what is missing where none can be made (it needs root
    or a delegated subtree)."""
    candidates = [("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max"),
                  ("/sys/fs/cgroup/unified", "memory.max")]
    for root, limit_file in candidates:
        folder = Path(root) / f"ffcv_imagenet_scale_{os.getpid()}"
        try:
            folder.mkdir()
        except OSError:
            continue
        try:
            (folder / limit_file).write_text(str(limit_bytes))
        except OSError:
            folder.rmdir()
            continue
        try:
            yield folder / "cgroup.procs"
        finally:
            for _ in range(50):  # the processes in it may take a moment to be reaped
                try:
                    folder.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        return
    raise SystemExit("ffcv-imagenet scale: scale.memory_limit_mb needs a memory cgroup, and none could "
                     f"be made under {', '.join(r for r, _ in candidates)} (root, or a delegated cgroup)")


def evict_from_page_cache(path: Path) -> None:
    """Drop the file's cached pages (clean ones go at once), so a run starts reading from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_through(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 * 2**20):
            pass


def probe_throughput(path: str, order: str, in_memory: bool, batch_size: int, workers: int,
                     seconds: float) -> dict:
    """Training-loader images/s over `seconds`, after the first 3 batches (compilation)."""
    import torch

    from . import data

    torch.set_num_threads(1)
    loader = data.create_train_loader(path, batch_size=batch_size, resolution_px=MEMORY_RESOLUTION_PX,
                                      num_workers=workers, device=torch.device("cpu"), in_memory=in_memory,
                                      order=order)
    images, started, batches = 0, None, iter(loader)
    for k, (x, _) in enumerate(batches):
        if k == 3:
            started = time.perf_counter()
        elif k > 3:
            images += len(x)
            if time.perf_counter() - started >= seconds:
                break
    elapsed = time.perf_counter() - started
    return {"img_s": round(images / elapsed, 1), "images": images, "seconds": round(elapsed, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def memory_rows(args, workdir: Path, log) -> dict:
    """Loader images/s on a raw-pixel train file `memory_file_mb` large, for MEMORY_CONFIGS; the
    limited ones run inside a memory cgroup of `memory_limit_mb` (the file's pages included)."""
    limit = args.memory_limit_mb * 2**20
    file_bytes = (args.memory_file_mb or 3 * args.memory_limit_mb) * 2**20
    pool = make_pool(workdir / "pool_raw", args.images, args.pool, RAW_SIDE_PX)
    raw_bytes = float(np.mean([_raw_bytes(p) for p in pool]))
    samples = int(file_bytes / raw_bytes)
    build_folder(workdir / "raw_src", pool, samples, min(args.classes, samples))
    beton = workdir / "raw.beton"
    wrote = in_fresh_process("probe_write", workdir / "raw_src", beton, "train", "", args.workers,
                             {"write_mode": "raw", "max_resolution": RAW_SIDE_PX})
    shutil.rmtree(workdir / "raw_src")
    log(f"[scale] raw file: {samples:,} samples, {wrote['bytes'] / 2**30:.2f} GiB; memory limit "
        f"{limit / 2**30:.2f} GiB")
    result = {"file_bytes": wrote["bytes"], "samples": samples, "memory_limit_bytes": limit,
              "limit_by": "memory cgroup (page cache included)", "resolution_px": MEMORY_RESOLUTION_PX,
              "batch_size": args.batch_size, "workers": args.workers, "rows": []}
    for name, in_memory, order, limited in MEMORY_CONFIGS:
        row = {"config": name, "in_memory": in_memory, "order": order, "limited": limited}
        try:
            if limited:
                evict_from_page_cache(beton)
                with memory_cgroup(limit) as procs:
                    row.update(in_fresh_process("probe_throughput", beton, order, in_memory, args.batch_size,
                                                args.workers, args.memory_seconds, cgroup_procs=procs))
            else:
                read_through(beton)  # it fits: cached, as after a first epoch
                row.update(in_fresh_process("probe_throughput", beton, order, in_memory, args.batch_size,
                                            args.workers, args.memory_seconds))
        except RuntimeError as e:
            killed = "(exit -9)" in str(e)  # the cgroup's out-of-memory killer
            row["error"] = "killed: over the memory limit" if killed else str(e).splitlines()[0][:300]
        log(f"[scale] {name}{' (limited)' if limited else ''}: {row.get('img_s', row.get('error'))}")
        result["rows"].append(row)
    beton.unlink()
    return result


def _raw_bytes(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.width * image.height * 3


# --------------------------------------------------------------------------- README tables

def render_readme(files: list, readme: Path) -> str:
    """The README's `scale` section from the scale.json files: one row per layout and N, the
    growth of the per-sample costs, and the larger-than-memory loader rates where measured."""
    from .report import update_readme

    results = [(f, json.loads(Path(f).read_text())) for f in files]
    parts = [_render(result, f) for f, result in results if result["rows"]]
    memory = [(f, result) for f, result in results if result.get("memory")]
    if memory:
        parts.append("\n".join(_render_memory(memory)))
    text = "\n\n".join(parts)
    update_readme(readme, "scale", text)
    return text


def _render(result: dict, path) -> str:
    m = result["machine"]
    out = [f"`{path}` ({result['date']}, {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM): "
           f"`{result['command']}`"]
    if result["rows"]:
        out += ["", "| layout | samples | index µs/sample | write img/s | writer parent peak RSS MB | "
                "worker peak RSS MB | loader start-up s | per-epoch work ms, random (val: sequential) | quasi_random |",
                "|---|---|---|---|---|---|---|---|---|"]
        for layout, rows in _by_layout(result["rows"]).items():
            firsts = [r for r in rows if r["order"] == rows[0]["order"]]

            def cells(f, fmt):
                return " / ".join(fmt(f(r)) for r in firsts)

            orders = (list(dict.fromkeys(r["order"] for r in rows)) + [""])[:2]  # as measured: data.ORDERS
            epoch = " | ".join(" / ".join(_order(rows, r["samples"], order) for r in firsts) for order in orders)
            out.append(f"| {layout} | {cells(lambda r: r['samples'], _count)} | "
                       f"{cells(lambda r: r['index_us_per_sample'], lambda v: f'{v:.1f}')} | "
                       f"{cells(lambda r: r['write_img_s'], lambda v: f'{v:,.0f}')} | "
                       f"{cells(lambda r: r['parent_rss_mb'], lambda v: f'{v:,.0f}')} | "
                       f"{cells(lambda r: r['worker_rss_mb'], lambda v: f'{v:,.0f}')} | "
                       f"{cells(lambda r: r['loader_startup_s'], lambda v: f'{v:.1f}')} | {epoch} |")
        growth_text = "; ".join(
            f"{k.split('/')[0]}: index time per sample {g['index_s']}x, parent RSS "
            f"{g['parent_rss_bytes_per_added_sample']:,} bytes per added sample"
            + (f" ({g['parent_rss_added']}x the lower interval's)" if g["parent_rss_added"] else "")
            for k, g in result.get("growth", {}).items() if k.endswith("/random"))
        out += ["", f"From the smallest N to the largest: {growth_text}."]
    return "\n".join(out)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 10**6 else f"{n / 1e3:g} k"


def _order(rows: list, samples: int, order: str) -> str:
    r = next((r for r in rows if r["samples"] == samples and r["order"] == order), None)
    return "—" if r is None else f"{r['epoch_overhead_s'] * 1e3:.1f}"


def _by_layout(rows: list) -> dict:
    grouped = {}
    for r in rows:
        grouped.setdefault(r["layout"], []).append(r)
    return grouped


def _render_memory(results: list) -> list:
    """One table for the memory part of several runs (one column each, by batch size)."""
    first = results[0][1]["memory"]
    lines = [f"A train file larger than memory ({first['samples']:,} raw 256-px samples, "
             f"{first['file_bytes'] / 2**30:.1f} GiB; the loader in a {first['memory_limit_bytes'] / 2**30:.1f} "
             f"GiB {first['limit_by']}; {first['resolution_px']}-px crops, {first['workers']} workers): "
             "images/s, and against `in_memory=1` where the file fits:", "",
             "| loader | memory limit | " + " | ".join(f"batch {r['memory']['batch_size']}" for _, r in results) + " |",
             "|---|---|" + "---|" * len(results)]
    for k, row in enumerate(first["rows"]):
        cells = []
        for _, result in results:
            rows = result["memory"]["rows"]
            fits = next((r.get("img_s") for r in rows if not r["limited"]), None)
            r = rows[k]
            cells.append(f"{r['img_s']:,.0f} ({r['img_s'] / fits:.2f})" if "img_s" in r and fits
                         else r.get("error", "—"))
        lines.append(f"| {row['config']} | {'yes' if row['limited'] else 'no'} | " + " | ".join(cells) + " |")
    lines += ["", "Made by " + ", ".join(f"`{r['command']}` (`{f}`)" for f, r in results) + "."]
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = COMMAND.parse(argv)
    except ValueError as e:
        return COMMAND.refuse(e)
    args.argv = argv
    if args.render:
        print(render_readme(args.render, Path(args.readme)))
        return 0
    result = run(args)
    if args.json:
        _save(result, args.json)
        print(f"[scale] wrote {args.json}")
    print(json.dumps(result["growth"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
