"""`ffcv-imagenet write`: every input layout round-trips through ffcv's Loader; messy images,
bad files, interrupted writes, options and the free-disk check behave as documented."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import writer_data as data
from ffcv_imagenet import writer
from ffcv_imagenet.metadata import read_metadata
from ffcv_imagenet.writer import WriterError, write_dataset

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("ffcv-imagenet"))
JPEG_TOLERANCE = 6.0  # mean abs difference, 0-255 levels, after one q90 re-encode of a gradient


@pytest.fixture(scope="module")
def items():
    """3 classes x 3 gradient JPEGs of 48x40 px."""
    return data.sample_set()


def write(data_dir, path, **options):
    """write_dataset with test defaults: one worker, small images, no progress bar."""
    options = {"split": "train", "max_resolution": 64, "num_workers": 1, "progress": False,
               **options}
    return write_dataset(data_dir, path, **options)


def run_cli(args, **kwargs):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, **kwargs)


def assert_round_trip(beton, expected):
    """The .beton read by ffcv's Loader holds `expected` [(label, pixels)] in order."""
    images, labels = data.load_with_ffcv(beton)
    assert labels.tolist() == [label for label, _ in expected]
    for image, (_, pixels) in zip(images, expected):
        assert data.mean_abs_diff(image, pixels) < JPEG_TOLERANCE


# ----------------------------------------------------------------------------------------------
# Input layouts


def test_image_folder_round_trip_through_cli(tmp_path, items, capsys, monkeypatch):
    root = data.write_image_folder(tmp_path / "train", items)
    beton = tmp_path / "out" / "train.beton"
    monkeypatch.chdir(tmp_path)  # a relative data_dir is recorded as an absolute path
    rc = writer.main(["--cfg.data_dir=train", f"--cfg.write_path={beton}", "--cfg.split=train",
                      "--cfg.max_resolution=64", "--cfg.num_workers=2", "--cfg.chunk_size=2"])
    assert rc == 0
    summary = capsys.readouterr().err
    assert "samples 9, classes 3" in summary and "images/s" in summary
    assert_round_trip(beton, data.expected_order(items))
    meta = read_metadata(beton)
    assert meta["wnids"] == list(data.WNIDS)
    assert meta["split"] == "train" and meta["num_samples"] == 9
    assert meta["source"] == {"kind": "image_folder", "path": str(root)}
    assert meta["options"]["max_resolution"] == 64


def test_flat_val_with_csv_labels(tmp_path, items):
    root = data.write_flat_val(tmp_path / "val", items)
    labels = data.write_csv_labels(tmp_path / "LOC_val_solution.csv", items)
    beton = tmp_path / "val.beton"
    summary = write(root, beton, split="val", val_labels=labels)
    assert summary["samples"] == 9 and summary["classes"] == 3
    assert_round_trip(beton, data.expected_order(items, data.val_names(items)))
    assert read_metadata(beton)["source"]["kind"] == "flat_folder"


def test_flat_val_with_index_labels_and_pinned_classes(tmp_path, items):
    pinned = list(reversed(data.WNIDS)) + ["n09999999"]  # not sorted, and one class with no images
    classes = tmp_path / "classes.txt"
    classes.write_text("# wnid order of the train file\n" + "\n".join(pinned) + "\n")
    root = data.write_flat_val(tmp_path / "val", items)
    labels = data.write_index_labels(tmp_path / "val.txt", items, pinned)
    beton = tmp_path / "val.beton"
    write(root, beton, split="val", val_labels=labels, classes=classes)
    assert_round_trip(beton, data.expected_order(items, data.val_names(items), wnids=pinned))
    assert read_metadata(beton)["wnids"] == pinned


def test_csv_labels_with_a_byte_order_mark(tmp_path, items):
    root = data.write_flat_val(tmp_path / "val", items)
    labels = data.write_csv_labels(tmp_path / "LOC_val_solution.csv", items)
    labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())  # as saved by Excel
    summary = write(root, tmp_path / "val.beton", split="val", val_labels=labels)
    assert summary["samples"] == 9 and summary["classes"] == 3


def test_empty_class_folder_still_counts_as_a_class(tmp_path, items):
    """Dropping it would shift the labels of later classes against the other split."""
    root = data.write_image_folder(tmp_path / "train", [i for i in items if i[0] != data.WNIDS[1]])
    (root / data.WNIDS[1]).mkdir()
    summary = write(root, tmp_path / "t.beton")
    assert read_metadata(tmp_path / "t.beton")["wnids"] == list(data.WNIDS)
    _, labels, _ = data.read_samples(tmp_path / "t.beton")
    assert labels.tolist() == [0, 0, 0, 2, 2, 2]
    assert f"1 classes have no images: {data.WNIDS[1]}" in summary["notes"]


def test_index_labels_without_classes_are_refused(tmp_path, items):
    root = data.write_flat_val(tmp_path / "val", items)
    labels = data.write_index_labels(tmp_path / "val.txt", items, data.WNIDS)
    with pytest.raises(WriterError, match="cfg.classes"):
        write(root, tmp_path / "val.beton", split="val", val_labels=labels)


def test_train_tar_of_class_tars(tmp_path, items):
    tar = data.write_train_tar(tmp_path / "imagenet" / "ILSVRC2012_img_train.tar", items)
    data.write_val_tar(tmp_path / "imagenet" / "ILSVRC2012_img_val.tar", items)
    beton = tmp_path / "train.beton"
    # data_dir = the folder holding both tars: the writer picks ILSVRC2012_img_<split>.tar
    write(tar.parent, beton, split="train")
    assert_round_trip(beton, data.expected_order(items))
    assert read_metadata(beton)["source"] == {"kind": "class_tars", "path": str(tar)}


def test_val_tar_with_csv_labels(tmp_path, items):
    tar = data.write_val_tar(tmp_path / "imagenet" / "ILSVRC2012_img_val.tar", items)
    data.write_train_tar(tmp_path / "imagenet" / "ILSVRC2012_img_train.tar", items)
    labels = data.write_csv_labels(tmp_path / "LOC_val_solution.csv", items)
    beton = tmp_path / "val.beton"
    summary = write(tar.parent, beton, split="val", val_labels=labels, write_mode="proportion")
    assert (summary["raw"], summary["jpeg"]) == (5, 4)  # ffcv's Loader decodes both kinds
    assert_round_trip(beton, data.expected_order(items, data.val_names(items)))
    assert read_metadata(beton)["source"]["kind"] == "image_tar"


def test_tar_of_class_folders(tmp_path, items):
    """A tar of `<wnid>/<file>.JPEG` (no labels file): the folder names are the classes."""
    import tarfile

    tar = tmp_path / "train.tar"
    with tarfile.open(tar, "w") as archive:
        for wnid, stem, content in items:
            data.add_tar_member(archive, f"train/{wnid}/{stem}.JPEG", content)
    write(tar, tmp_path / "t.beton")
    _, labels, _ = data.read_samples(tmp_path / "t.beton")
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def _linked_tree(root: Path, items) -> list:
    """Class folders whose files are hard links to a pool of 3 JPEGs (as a benchmark builds large
    sources); returns each file's (wnid, name, content)."""
    pool = root / "pool"
    pool.mkdir(parents=True)
    for k, (_, _, content) in enumerate(items[:3]):
        (pool / f"{k}.JPEG").write_bytes(content)
    files = []
    for n, (wnid, stem, _) in enumerate(items):
        (root / "tree" / wnid).mkdir(parents=True, exist_ok=True)
        os.link(pool / f"{n % 3}.JPEG", root / "tree" / wnid / f"{stem}.JPEG")
        files.append((wnid, f"{stem}.JPEG", items[n % 3][2]))
    return files


def test_hard_linked_tar_members_are_samples_with_their_targets_data(tmp_path, items):
    """tarfile (like GNU tar) stores the second and later names of one inode as hard-link members
    without data: each is a sample, read from the member it names, in a tar of class folders and
    in a tar of class tars alike; none is dropped."""
    import tarfile

    from ffcv_imagenet.writer.sources import read_bytes

    files = _linked_tree(tmp_path, items)
    folders_tar = tmp_path / "folders.tar"
    with tarfile.open(folders_tar, "w") as archive:
        archive.add(tmp_path / "tree", arcname="train")
    class_tars = tmp_path / "class_tars.tar"
    with tarfile.open(class_tars, "w") as outer:
        for wnid in sorted({w for w, _, _ in files}):
            inner = tmp_path / f"{wnid}.tar"
            with tarfile.open(inner, "w") as archive:
                archive.add(tmp_path / "tree" / wnid, arcname=".")
            outer.add(inner, arcname=f"{wnid}.tar")
    with tarfile.open(folders_tar) as archive:
        assert sum(m.islnk() for m in archive) == len(items) - 3  # the links are there
    expected = sorted((w, name, content) for w, name, content in files)
    for tar in (folders_tar, class_tars):
        index = writer.index_input(tar, "train")
        assert len(index) == len(items)
        got = sorted((index.wnids[index.labels[i]], os.path.basename(index.name(i)), read_bytes(index, i))
                     for i in range(len(index)))
        assert got == expected


def test_symbolic_link_tar_members_are_refused_with_their_count(tmp_path, items):
    import tarfile

    tar = tmp_path / "links.tar"
    with tarfile.open(tar, "w") as archive:
        data.add_tar_member(archive, "train/n01/a.JPEG", items[0][2])
        for name in ("b", "c"):
            link = tarfile.TarInfo(f"train/n01/{name}.JPEG")
            link.type, link.linkname = tarfile.SYMTYPE, "a.JPEG"
            archive.addfile(link)
    with pytest.raises(WriterError, match=r"links.tar: 2 image members are symbolic links.*train/n01/b.JPEG"):
        writer.index_input(tar, "train")


def test_raw_images_over_several_pages_with_two_workers(tmp_path):
    """18 raw images of 1.1 MB fill three 8 MiB pages, written by two workers in turn."""
    root = tmp_path / "big"
    for k in range(18):
        folder = root / data.WNIDS[k % 3]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{k:02d}.JPEG").write_bytes(data.jpeg_bytes(data.gradient(640, 600, 10 * k)))
    beton = tmp_path / "big.beton"
    summary = write(root, beton, max_resolution=640, write_mode="raw", num_workers=2, chunk_size=2)
    assert summary["samples"] == 18 and summary["bytes"] > 3 * (1 << 23)
    images, labels = data.load_with_ffcv(beton)
    assert labels.tolist() == [k // 6 for k in range(18)]
    by_label = sorted(range(18), key=lambda k: (k % 3, k))
    assert [data.blue_tag(image) for image in images] == [10 * k for k in by_label]


# ----------------------------------------------------------------------------------------------
# Messy images


def test_messy_images_become_rgb_and_fit_max_resolution(tmp_path):
    root = tmp_path / "train"
    grey = data.gradient(40, 30, 0)[..., 0]
    sources = {
        "a_grey.JPEG": data.jpeg_bytes(np.stack([grey] * 3, -1), mode="L"),
        "b_cmyk.JPEG": data.jpeg_bytes(data.gradient(40, 30, 90), mode="CMYK"),
        "d_tiny.JPEG": data.jpeg_bytes(data.gradient(8, 5, 120)),
        "e_huge.JPEG": data.jpeg_bytes(data.gradient(3000, 200, 150)),
    }
    png = root / "n01" / "c_png.JPEG"
    png.parent.mkdir(parents=True)
    Image.fromarray(data.gradient(30, 40, 60)).save(png, format="PNG")
    for name, content in sources.items():
        (root / "n01" / name).write_bytes(content)
    assert Image.open(root / "n01" / "b_cmyk.JPEG").mode == "CMYK"

    beton = tmp_path / "messy.beton"
    summary = write(root, beton, max_resolution=64, write_mode="raw")
    assert summary["samples"] == 5 and summary["raw"] == 5
    images, _, _ = data.read_samples(beton)
    shapes = [image.shape for image in images]
    assert shapes == [(30, 40, 3), (30, 40, 3), (40, 30, 3), (5, 8, 3), (4, 64, 3)]
    references = [data.decoded((root / "n01" / n).read_bytes())
                  for n in ("a_grey.JPEG", "b_cmyk.JPEG", "c_png.JPEG", "d_tiny.JPEG")]
    for image, reference in zip(images, references):
        assert data.mean_abs_diff(image, reference) < 1.0  # raw: stored as decoded
    huge = data.decoded(sources["e_huge.JPEG"])
    assert abs(float(images[4].mean()) - float(huge.mean())) < 3
    assert writer.target_size(3000, 200, 64) == (64, 4)


# ----------------------------------------------------------------------------------------------
# Bad files


def make_truncated(items, tmp_path) -> tuple:
    root = data.write_image_folder(tmp_path / "train", items)
    bad = root / data.WNIDS[1] / f"{items[3][1]}.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    return root, bad


def test_truncated_file_is_an_error_naming_it_and_the_writer_exits(tmp_path):
    """3000 one-image chunks: after the error, the unread chunks must not keep the process from
    exiting (it used to wait forever for the task queue to drain)."""
    folder = tmp_path / "train" / data.WNIDS[0]
    folder.mkdir(parents=True)
    tiny = data.jpeg_bytes(data.gradient(8, 8, 0))
    for k in range(3000):
        (folder / f"img_{k:04d}.JPEG").write_bytes(tiny if k != 3 else tiny[:100])
    beton = tmp_path / "train.beton"
    result = run_cli(["write", f"--cfg.data_dir={folder.parent}", f"--cfg.write_path={beton}",
                      "--cfg.split=train", "--cfg.num_workers=1", "--cfg.chunk_size=1"])
    assert result.returncode == 1
    assert f"error: {folder / 'img_0003.JPEG'}: cannot decode image" in result.stderr
    assert "--cfg.skip_bad=1" in result.stderr
    assert "--cfg.resume=1 continues it" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["train"]
    assert partials(beton)


def test_skip_bad_skips_and_lists_the_file(tmp_path, items):
    root, bad = make_truncated(items, tmp_path)
    beton = tmp_path / "train.beton"
    summary = write(root, beton, skip_bad=True, num_workers=2, chunk_size=2)
    assert summary["samples"] == 8
    assert [s["file"] for s in summary["skipped"]] == [str(bad)]
    assert str(bad) in writer.format_summary(summary)
    assert read_metadata(beton)["skipped"][0]["file"] == str(bad)
    expected = data.expected_order(items[:3] + items[4:])
    images, labels, _ = data.read_samples(beton)  # the dropped row shifts the others correctly
    assert labels.tolist() == [label for label, _ in expected]
    for image, (_, pixels) in zip(images, expected):
        assert data.mean_abs_diff(image, pixels) < JPEG_TOLERANCE


# ----------------------------------------------------------------------------------------------
# Nothing half-written


FIFO = Path("n01") / "img_001.JPEG"  # inside a blocking folder


def blocking_folder(root: Path, count=40) -> Path:
    """ImageFolder whose second image is a FIFO: a worker reading it blocks until killed, so the
    write is reliably caught in the middle. (The size estimate samples images 0, 2, 4, ...)"""
    tiny = data.jpeg_bytes(data.gradient(16, 16, 50))
    (root / FIFO.parent).mkdir(parents=True)
    for k in range(count):
        if k != 1:
            (root / FIFO.parent / f"img_{k:03d}.JPEG").write_bytes(tiny)
    os.mkfifo(root / FIFO)
    return root


def partials(beton: Path) -> list:
    """The unfinished write's data file, when there is one (its journal and state lie beside it)."""
    return list(beton.parent.glob(f".{beton.name}.partial"))


def only_the_kept_partial(beton: Path) -> bool:
    """Nothing in the output folder but the hidden files of the unfinished write (resume.py)."""
    names = [p.name for p in beton.parent.iterdir()]
    return all(n.startswith(f".{beton.name}.partial") for n in names)


def children_now() -> set:
    """PIDs of this process's children before a write starts: in-process tests count only the
    writer's workers, not what earlier tests left running (e.g. a DataLoader's persistent
    workers)."""
    import psutil

    return {p.pid for p in psutil.Process().children()}


def wait_for_workers(beton: Path, writer_pid: int, process=None, timeout_s=90,
                     before=frozenset()) -> list:
    """Wait until one of the writer's two workers has finished (its page is in the journal) and
    the other blocks on the FIFO; returns [the blocked worker]."""
    import psutil

    deadline = time.time() + timeout_s
    while True:
        assert process is None or process.poll() is None, process.communicate()
        assert time.time() < deadline, "the writer never got to writing"
        # the writer's forked workers; not other children of this process, such as the
        # multiprocessing resource tracker that an earlier test's ffcv DatasetWriter started
        workers = [p for p in psutil.Process(writer_pid).children()
                   if p.pid not in before and _not_a_tracker(p)]
        journal = beton.with_name(f".{beton.name}.partial.journal")
        if partials(beton) and journal.exists() and len(workers) == 1:
            return workers
        time.sleep(0.05)


def _not_a_tracker(process) -> bool:
    import psutil

    try:
        return "resource_tracker" not in " ".join(process.cmdline())
    except psutil.Error:  # exited meanwhile
        return False


def in_background(action, root: Path) -> threading.Thread:
    """Run `action` in a thread; should it fail, feed the FIFO EOF so that the blocked write in
    the main thread ends (with an error) instead of hanging the test run."""
    def run():
        try:
            action()
        except BaseException:
            with open(root / FIFO, "wb"):
                pass
            raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigkill_leaves_the_partial_and_next_write_without_resume_removes_it(tmp_path, items):
    import psutil

    root = blocking_folder(tmp_path / "slow")
    beton = tmp_path / "out" / "train.beton"
    process = subprocess.Popen(
        [CLI, "write", f"--cfg.data_dir={root}", f"--cfg.write_path={beton}", "--cfg.split=train",
         "--cfg.num_workers=2", "--cfg.chunk_size=4", "--cfg.max_resolution=32"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        workers = wait_for_workers(beton, process.pid, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == [], "workers outlived their killed parent"
    finally:
        process.kill()
        process.communicate()
    assert not beton.exists()
    assert only_the_kept_partial(beton) and partials(beton)  # hidden; another source starts over:

    summary = write(data.write_image_folder(tmp_path / "train", items), beton)
    assert summary["samples"] == 9 and beton.exists()
    assert [p.name for p in beton.parent.iterdir() if p.name.startswith(".")] == []
    assert any(n.startswith("removed an unfinished write of this file") for n in summary["notes"])


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_keeps_only_the_hidden_partial(tmp_path, stop_signal):
    """Ctrl-C / SIGTERM to a writing `ffcv-imagenet write` process: exit 130, a message, nothing
    at the destination but the unfinished write kept for cfg.resume, no worker left behind."""
    import psutil

    root = blocking_folder(tmp_path / "slow")
    beton = tmp_path / "out" / "train.beton"
    # a shell starting this test run in the background (`cmd &` without job control) makes its
    # children ignore SIGINT, and Python keeps an ignored SIGINT ignored: give the writer a
    # terminal process's default, as Ctrl-C finds it
    process = subprocess.Popen(
        [CLI, "write", f"--cfg.data_dir={root}", f"--cfg.write_path={beton}", "--cfg.split=train",
         "--cfg.num_workers=2", "--cfg.chunk_size=4", "--cfg.max_resolution=32"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        workers = wait_for_workers(beton, process.pid, process)
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=10)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == 130, stderr
    assert "interrupted; nothing was written" in stderr
    assert "--cfg.resume=1 continues it" in stderr
    assert alive == [], "workers outlived the interrupted write"
    assert only_the_kept_partial(beton) and partials(beton)


def test_a_worker_killed_by_the_system_is_reported(tmp_path):
    """E.g. the kernel's out-of-memory killer: the write stops with a message; only the hidden
    unfinished write is left."""
    root = blocking_folder(tmp_path / "slow")
    beton = tmp_path / "out" / "train.beton"
    before = children_now()

    def kill_a_worker():
        wait_for_workers(beton, os.getpid(), before=before)[0].kill()

    killer = in_background(kill_a_worker, root)
    with pytest.raises(RuntimeError, match="writer worker died .* out of memory"):
        write(root, beton, num_workers=2, chunk_size=4, max_resolution=32)
    killer.join()
    assert only_the_kept_partial(beton)


def test_existing_destination_is_kept_without_overwrite(tmp_path, items):
    root = data.write_image_folder(tmp_path / "train", items)
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"precious")
    with pytest.raises(WriterError, match="already exists"):
        write(root, beton)
    assert beton.read_bytes() == b"precious"
    write(root, beton, overwrite=True)
    assert read_metadata(beton)["num_samples"] == 9 and beton.stat().st_size > 1000


# ----------------------------------------------------------------------------------------------
# Write modes, subset, classes


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    """10 images: 5 of 16x16 px (768 raw bytes) and 5 of 40x40 px (4800 raw bytes)."""
    root = tmp_path_factory.mktemp("sizes")
    for k in range(10):
        side = 16 if k % 2 else 40
        folder = root / data.WNIDS[k % 2]
        folder.mkdir(exist_ok=True)
        (folder / f"img_{k}.JPEG").write_bytes(data.jpeg_bytes(data.gradient(side, side, 20 * k)))
    return root


@pytest.mark.parametrize("mode, options, expected_jpeg", [
    ("raw", {}, 0),
    ("jpg", {}, 10),
    ("smart", {"smart_threshold": 16 * 16 * 3}, 5),  # only the 40 px images exceed it
    ("proportion", {"compress_probability": 0.3}, 3),
    ("proportion", {"compress_probability": 0.25}, 2),  # round(2.5) = 2
])
def test_write_mode_raw_jpeg_split(tmp_path, two_sizes, mode, options, expected_jpeg):
    beton = tmp_path / "x.beton"
    summary = write(two_sizes, beton, write_mode=mode, **options)
    assert (summary["jpeg"], summary["raw"]) == (expected_jpeg, 10 - expected_jpeg)
    images, _, modes = data.read_samples(beton)
    assert int(np.sum(modes == 0)) == expected_jpeg  # ffcv: 0 = JPEG, 1 = raw
    if mode == "smart":
        assert all((m == 0) == (im.shape[0] == 40) for m, im in zip(modes, images))


def test_smart_needs_a_threshold(tmp_path, two_sizes):
    with pytest.raises(ValueError, match="smart_threshold"):
        write(two_sizes, tmp_path / "x.beton", write_mode="smart")


def test_subset_is_balanced_and_deterministic(tmp_path):
    items = data.sample_set(per_class=(5, 4, 2))
    root = data.write_image_folder(tmp_path / "train", items)
    tags = []
    for run in range(2):
        summary = write(root, tmp_path / f"s{run}.beton", subset=3)
        images, labels, _ = data.read_samples(tmp_path / f"s{run}.beton")
        assert np.bincount(labels).tolist() == [3, 3, 2]
        tags.append([data.blue_tag(image) for image in images])
    assert summary["classes_with_fewer_images_than_subset"] == [data.WNIDS[2]]
    # the first 3 of each class by file name: tags 40,50,60 | 90,100,110 | 130,140
    assert tags[0] == tags[1] == [40, 50, 60, 90, 100, 110, 130, 140]


def test_classes_file_pins_order_and_refuses_unknown_folders(tmp_path, items):
    root = data.write_image_folder(tmp_path / "train", items)
    pinned = [data.WNIDS[2], data.WNIDS[0], data.WNIDS[1]]
    (tmp_path / "classes.txt").write_text("\n".join(pinned) + "\n")
    write(root, tmp_path / "a.beton", classes=tmp_path / "classes.txt")
    _, labels, _ = data.read_samples(tmp_path / "a.beton")
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert read_metadata(tmp_path / "a.beton")["wnids"] == pinned
    # a .beton written by this tool can serve as the class list
    write(root, tmp_path / "b.beton", classes=tmp_path / "a.beton")
    assert read_metadata(tmp_path / "b.beton")["wnids"] == pinned

    (tmp_path / "two.txt").write_text(f"{data.WNIDS[0]}\n{data.WNIDS[1]}\n")
    with pytest.raises(WriterError, match=data.WNIDS[2]):
        write(root, tmp_path / "c.beton", classes=tmp_path / "two.txt")
    with pytest.raises(WriterError, match="cfg.classes=.*missing.beton.*metadata file not found"):
        write(root, tmp_path / "d.beton", classes=tmp_path / "missing.beton")


def test_labels_naming_unknown_wnids_are_listed(tmp_path, items):
    root = data.write_flat_val(tmp_path / "val", items)
    labels = data.write_csv_labels(tmp_path / "sol.csv", items)
    (tmp_path / "two.txt").write_text(f"{data.WNIDS[0]}\n{data.WNIDS[1]}\n")
    with pytest.raises(WriterError, match=f"not in cfg.classes.*{data.WNIDS[2]}"):
        write(root, tmp_path / "v.beton", split="val", val_labels=labels,
              classes=tmp_path / "two.txt")
    assert not (tmp_path / "v.beton").exists()


def test_an_image_labelled_twice_with_different_classes_is_refused(tmp_path, items):
    """The last row used to win in silence; the same row twice is harmless."""
    from ffcv_imagenet.writer.sources.common import stem

    root = data.write_flat_val(tmp_path / "val", items)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(data.WNIDS) + "\n")
    csv = data.write_csv_labels(tmp_path / "sol.csv", items)
    txt = data.write_index_labels(tmp_path / "val.txt", items, list(data.WNIDS))
    for labels, first_line, sep in ((csv, 2, ","), (txt, 1, " ")):
        rows = labels.read_text().splitlines()
        name, first = rows[first_line - 1].replace(",", " ").split()[:2]
        other = next(w for w in (data.WNIDS if sep == "," else "012") if w != first)
        labels.write_text("\n".join([*rows, rows[first_line - 1], f"{name}{sep}{other}"]) + "\n")
        with pytest.raises(WriterError, match=f"{labels} line {len(rows) + 2}: {stem(name)} is labelled "
                           f"{other} here and {first} on line {first_line}; an image has one label"):
            write(root, tmp_path / "v.beton", split="val", val_labels=labels, classes=classes)
        assert not (tmp_path / "v.beton").exists()


def test_images_too_small_for_the_loaders_are_refused_naming_the_file(tmp_path):
    """A 1x1 image, and a 10000x20 one that would be stored 64x1, used to be written and then
    abort training in validation inside OpenCV; now the writer names them (skip_bad skips them)."""
    root = tmp_path / "train" / "n01"
    root.mkdir(parents=True)
    (root / "a_fine.JPEG").write_bytes(data.jpeg_bytes(data.gradient(64, 2, 0)))  # 2 px: loads
    (root / "b_dot.JPEG").write_bytes(data.jpeg_bytes(data.gradient(1, 1, 0)))
    (root / "c_strip.JPEG").write_bytes(data.jpeg_bytes(data.gradient(10000, 20, 0)))
    with pytest.raises(WriterError, match=r"b_dot.JPEG: image too small \(TooSmall: 1x1 px would be "
                       r"stored as 1x1, below the 2 px shorter side the loaders' crops need\)"):
        write(root.parent, tmp_path / "t.beton", max_resolution=64, num_workers=1)
    summary = write(root.parent, tmp_path / "t.beton", max_resolution=64, num_workers=1, skip_bad=True)
    assert summary["samples"] == 1
    assert [s["file"] for s in summary["skipped"]] == [str(root / "b_dot.JPEG"), str(root / "c_strip.JPEG")]
    strip = summary["skipped"][1]["error"]
    assert "10000x20 px would be stored as 64x1 once its longer side is scaled to 64 px" in strip


# ----------------------------------------------------------------------------------------------
# Options, free disk, --help, entry points


def test_unknown_option_is_named_with_a_close_match(tmp_path, capsys):
    rc = writer.main(["--cfg.split=train", f"--cfg.data_dir={tmp_path}", "--cfg.max_res=64",
                      f"--cfg.write_path={tmp_path / 'x.beton'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--cfg.max_res" in err and "did you mean --cfg.max_resolution" in err


@pytest.mark.parametrize("argument, named", [
    ("--cfg.write_mode=zip", "cfg.write_mode='zip'"),
    ("--cfg.jpeg_quality=101", "cfg.jpeg_quality='101'"),
    ("--cfg.compress_probability=half", "cfg.compress_probability='half'"),
    ("--cfg.max_resolution=40000", "cfg.max_resolution='40000'"),  # page size would overflow
])
def test_bad_option_value_is_named(tmp_path, capsys, argument, named):
    rc = writer.main(["--cfg.split=train", f"--cfg.data_dir={tmp_path}",
                      f"--cfg.write_path={tmp_path / 'x.beton'}", argument])
    assert rc == 2
    assert named in capsys.readouterr().err


def test_options_are_declared_once_and_checked_into_a_frozen_object():
    import dataclasses

    opts = writer.check_options({"split": "train", "data_dir": "in", "write_path": "out.beton",
                                 "num_workers": 3})
    assert [f.name for f in dataclasses.fields(opts)] == list(writer.OPTIONS)
    assert opts.data_dir == os.path.abspath("in") and opts.classes == ""  # paths made absolute
    assert opts.jpeg_quality == writer.OPTIONS["jpeg_quality"].default and opts.num_workers == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.jpeg_quality = 50
    with pytest.raises(ValueError, match="unknown option cfg.jpeg_qualty; did you mean cfg.jpeg_quality"):
        writer.check_options({"split": "train", "data_dir": "in", "write_path": "o", "jpeg_qualty": 80})
    with pytest.raises(ValueError, match="unknown option cfg.jpeg_qualty"):
        write_dataset("in", "out.beton", split="train", jpeg_qualty=80)


def test_config_file_is_read_and_checked(tmp_path):
    config = tmp_path / "write.yaml"
    config.write_text("cfg:\n  split: val\n  data_dir: in\n  write_path: out.beton\n"
                      "  max_resolution: 32\n")
    opts = writer.parse_args(["-C", str(config), "--cfg.jpeg_quality=80"])
    assert (opts.split, opts.max_resolution, opts.jpeg_quality) == ("val", 32, 80)
    config.write_text(config.read_text() + "  jpeg_qualty: 80\n")
    hint = f"cfg.jpeg_qualty in {config}.*did you mean --cfg.jpeg_quality"
    with pytest.raises(ValueError, match=hint):
        writer.parse_args(["-C", str(config)])


def test_bare_flags_are_for_yes_no_options_only(tmp_path):
    """`--cfg.overwrite` alone means 1; a bare option of another type is refused, not read as 1
    (`--cfg.write_path --cfg.subset=3` once meant a file named "1"); a -C after a bare flag is a
    file, not the flag's value; a JSON file with tab indentation is read."""
    required = ["--cfg.split=train", "--cfg.data_dir=in"]
    with pytest.raises(ValueError, match=r"--cfg.write_path needs a value \(--cfg.write_path=VALUE\)"):
        writer.parse_args([*required, "--cfg.write_path", "--cfg.subset=3"])
    config = tmp_path / "w.json"
    config.write_text('{\n\t"cfg": {\n\t\t"max_resolution": 32\n\t}\n}\n')
    opts = writer.parse_args([*required, "--cfg.write_path=o.beton", "--cfg.overwrite", "-C", str(config)])
    assert opts.overwrite is True and opts.max_resolution == 32
    with pytest.raises(ValueError, match="unknown option --split in .*did you mean --cfg.split"):
        config.write_text("split: train\n")
        writer.parse_args([*required, "--cfg.write_path=o.beton", "-C", str(config)])


def test_the_command_line_goes_through_the_same_checks_as_write_dataset(tmp_path, capsys):
    """num_workers=0 (the default) is all cores, and the checks between options run."""
    from ffcv_imagenet.host import cpu_cores

    required = ["--cfg.split=train", f"--cfg.data_dir={tmp_path}", f"--cfg.write_path={tmp_path / 'o.beton'}"]
    assert writer.parse_args(required).num_workers == cpu_cores()
    assert writer.main([*required, "--cfg.write_mode=smart"]) == 2
    assert "cfg.write_mode=smart needs cfg.smart_threshold" in capsys.readouterr().err
    assert writer.main([*required, "--cfg.subset=0"]) == 2
    assert "cfg.subset=0: expected -1" in capsys.readouterr().err


def test_missing_required_option_is_named(capsys):
    assert writer.main(["--cfg.split=train"]) == 2
    err = capsys.readouterr().err
    assert "cfg.data_dir is required" in err and "cfg.write_path is required" in err


def test_too_little_free_disk_is_refused_before_writing(tmp_path, items, monkeypatch):
    """The estimate covers the real file (and not by much), a disk one byte short of it is
    refused before anything is written, and a disk that just holds it is accepted."""
    root = data.write_image_folder(tmp_path / "train", items)
    real = write(root, tmp_path / "real" / "train.beton")
    estimate = real["estimated_bytes"]
    assert real["bytes"] <= estimate <= 1.5 * real["bytes"], real
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=estimate - 1))
    with pytest.raises(WriterError, match=rf"not enough free disk.*\({estimate} bytes\)"):
        write(root, tmp_path / "out" / "train.beton")
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=estimate))
    assert write(root, tmp_path / "out" / "train.beton")["bytes"] == real["bytes"]


def test_write_help_lists_every_option():
    result = run_cli(["write", "--help"])
    assert result.returncode == 0
    for key, option in writer.OPTIONS.items():
        assert f"--cfg.{key}" in result.stdout, key
        assert option.desc.split()[0] in result.stdout


def test_write_imagenet_py_help_and_tiny_write(tmp_path, items):
    script = REPO / "write_datasets" / "write_imagenet.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--cfg.write_mode" in result.stdout
    tar = data.write_train_tar(tmp_path / "ILSVRC2012_img_train.tar", items)
    beton = tmp_path / "train.beton"
    result = subprocess.run([sys.executable, str(script), f"--cfg.data_dir={tar}",
                             f"--cfg.write_path={beton}", "--cfg.split=train",
                             "--cfg.max_resolution=32", "--cfg.num_workers=1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "samples 9, classes 3" in result.stderr
    assert read_metadata(beton)["num_samples"] == 9


def run_sh(imagenet: Path, out: Path, *extra) -> tuple:
    """Run write_imagenet.sh with a stand-in Python that records each command it is given."""
    log = out.parent / "commands.txt"
    stub = out.parent / "python-stub"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    script = REPO / "write_datasets" / "write_imagenet.sh"
    result = subprocess.run([str(script), str(imagenet), str(out), *extra], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHON": str(stub)})
    commands = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return result, commands


def test_write_imagenet_sh_picks_inputs_and_parameters(tmp_path):
    script = REPO / "write_datasets" / "write_imagenet.sh"
    assert os.access(script, os.X_OK)
    imagenet, out = tmp_path / "imagenet", tmp_path / "out"
    imagenet.mkdir()
    (imagenet / "ILSVRC2012_img_train.tar").write_bytes(b"")
    (imagenet / "ILSVRC2012_img_val.tar").write_bytes(b"")
    result, _ = run_sh(imagenet, out)
    assert result.returncode == 1 and "LOC_val_solution.csv" in result.stderr

    (imagenet / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    result, commands = run_sh(imagenet, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("+ ") == 2  # prints what it runs
    train, val = commands
    for option in ("--cfg.max_resolution=500", "--cfg.write_mode=proportion",
                   "--cfg.compress_probability=1.0", "--cfg.jpeg_quality=90"):
        assert option in train.split() and option in val.split()
    assert f"--cfg.data_dir={imagenet}/ILSVRC2012_img_train.tar" in train
    assert f"--cfg.write_path={out}/train_500_1.0_90.beton" in train
    assert f"--cfg.val_labels={imagenet}/LOC_val_solution.csv" in val
    assert f"--cfg.classes={out}/train_500_1.0_90.beton" in val

    (imagenet / "train" / "n01").mkdir(parents=True)
    (imagenet / "val" / "n01").mkdir(parents=True)  # val sorted into class folders: no labels
    result, (train, val) = run_sh(imagenet, out, "160", "0.25", "80")
    assert f"--cfg.data_dir={imagenet}/train " in train and "--cfg.max_resolution=160" in train
    assert "--cfg.val_labels" not in val and f"--cfg.write_path={out}/val_160_0.25_80.beton" in val

    (imagenet / "val" / "n01").rmdir()  # a flat val folder: labels again
    (imagenet / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    result, (train, val) = run_sh(imagenet, out)
    assert f"--cfg.data_dir={imagenet}/val " in val
    assert f"--cfg.val_labels={imagenet}/LOC_val_solution.csv" in val


def test_workers_forked_after_opencv_started_its_thread_pool(tmp_path):
    """Regression: OpenCV's thread pool, once started in the parent (any cv2.resize of a large
    image, e.g. while the writer estimates its output size from real ImageNet photos), deadlocked
    every forked worker in its first cv2 call; the write hung forever at 0 images."""
    folder = data.write_image_folder(tmp_path / "train", data.sample_set(per_class=(2, 2, 2)))
    out = tmp_path / "out.beton"
    script = (
        "import cv2, numpy as np\n"
        "cv2.setNumThreads(2)\n"
        "big = np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8)\n"
        "for _ in range(3):\n"
        "    cv2.resize(big, (500, 375), interpolation=cv2.INTER_AREA)\n"
        "from ffcv_imagenet.writer import write_dataset\n"
        f"write_dataset({str(folder)!r}, {str(out)!r}, split='train', max_resolution=32,\n"
        "              num_workers=2, progress=False)\n"
        "assert cv2.getNumThreads() == 2  # the caller's setting is put back\n"
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.exists()


def test_the_format_spelled_out_in_beton_py_is_ffcvs():
    """beton.py writes ffcv 1.0.2's format without importing ffcv (and torch): every definition
    there must be ffcv's own."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.base import ARG_TYPE
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType,
                            get_metadata_type)
    from ffcv.utils import align_to_page

    from ffcv_imagenet.writer import beton

    assert beton.CURRENT_VERSION == CURRENT_VERSION
    assert beton.HEADER_TYPE == HeaderType and beton.HEADER_TYPE.itemsize == HeaderType.itemsize
    assert beton.ALLOC_TABLE_TYPE == ALLOC_TABLE_TYPE and beton.FIELD_DESC_TYPE == FieldDescType
    handlers = [RGBImageField(), IntField()]
    assert [(type_id, dtype) for _, type_id, dtype in beton.FIELDS] == [
        ({h: k for k, h in TYPE_ID_HANDLER.items()}[type(h)], h.metadata_type) for h in handlers]
    assert beton.METADATA_TYPE == get_metadata_type(handlers)
    assert beton.IMAGE_MODES == dict(IMAGE_MODES)
    assert all(h.to_binary().tobytes() == np.zeros(1, dtype=ARG_TYPE).tobytes() for h in handlers)
    for offset, page in ((0, 8), (1, 8), (8, 8), (4097, 4096), (10**9 + 1, 2**23)):
        assert beton.align_to_page(offset, page) == align_to_page(offset, page)


def test_the_writer_runs_without_torch(tmp_path, items):
    """The writer's parent (and so the workers forked from it, which import nothing more) never
    imports torch, ffcv or numba: hundreds of MB each."""
    root = data.write_image_folder(tmp_path / "train", items)
    code = ("import sys; from ffcv_imagenet.writer import write_dataset; "
            f"write_dataset({str(root)!r}, {str(tmp_path / 'train.beton')!r}, split='train', "
            "max_resolution=32, num_workers=2, progress=False); "
            "print(sorted(m for m in ('torch', 'ffcv', 'numba') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_option_lists_of_resume_and_metadata_name_real_options():
    from ffcv_imagenet.writer.options import NOT_IN_OUTPUT, NOT_RECORDED, OPTIONS

    assert set(NOT_IN_OUTPUT) <= set(OPTIONS) and set(NOT_RECORDED) <= set(NOT_IN_OUTPUT)
