"""A write killed at any point (SIGKILL) continues with --cfg.resume=1 and gives the same samples,
in the same order, as an uninterrupted write; a resume that would change the output is refused."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import writer_data as data
from ffcv_imagenet.writer.resume import KILL_AT_ENV

CLI = str(Path(sys.executable).with_name("ffcv-imagenet"))
# Raw 400x300 images (360 KB) in 8 MiB pages: 23 a page, so 60 images take 3 pages and a kill
# can fall between pages.
OPTIONS = ["--cfg.split=train", "--cfg.write_mode=raw", "--cfg.max_resolution=400",
           "--cfg.num_workers=2", "--cfg.chunk_size=5"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    items = [(wnid, f"{wnid}_{k:04d}", data.jpeg_bytes(data.gradient(400, 300, 3 * k + c)))
             for c, wnid in enumerate(data.WNIDS) for k in range(20)]
    folder = data.write_image_folder(root / "train", items)
    tar = data.write_train_tar(root / "tar" / "ILSVRC2012_img_train.tar", items)
    return {"folder": folder, "tar": tar}


@pytest.fixture(scope="module")
def references(sources, tmp_path_factory):
    """The uninterrupted write of each source."""
    out = tmp_path_factory.mktemp("references")
    for layout, source in sources.items():
        assert write(source, out / f"{layout}.beton").returncode == 0
    return {layout: samples(out / f"{layout}.beton") for layout in sources}


def write(source, beton, *extra, kill_at=None):
    env = {k: v for k, v in os.environ.items() if k != KILL_AT_ENV}
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    return subprocess.run([CLI, "write", f"--cfg.data_dir={source}", f"--cfg.write_path={beton}",
                           *OPTIONS, *extra], capture_output=True, text=True, timeout=180, env=env)


def samples(beton: Path) -> list:
    """[(label, mode, width, height, image bytes)] of every sample, in file order."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    table = reader.alloc_table
    raw = np.fromfile(beton, dtype=np.uint8)
    out = []
    for i, row in enumerate(reader.metadata):
        image, label = row["f0"], row["f1"]
        place = table[table["sample_id"] == i]
        assert len(place) == 1, f"sample {i}: {len(place)} allocations"
        data_bytes = raw[int(place["ptr"][0]):int(place["ptr"][0]) + int(place["size"][0])].tobytes()
        out.append((int(label), int(image["mode"]), int(image["width"]), int(image["height"]), data_bytes))
    return out


def hidden(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("layout,kill_at", [
    ("folder", "state"), ("folder", "journal:1"), ("folder", "journal:3"), ("folder", "finished"),
    ("folder", "installed"), ("tar", "journal:2"), ("tar", "finished")])
def test_killed_write_resumes_to_the_same_file(tmp_path, sources, references, layout, kill_at):
    beton = tmp_path / "train.beton"
    killed = write(sources[layout], beton, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr
    if kill_at != "installed":
        assert not beton.exists()
        assert f".{beton.name}.partial.json" in hidden(tmp_path)
    resumed = write(sources[layout], beton, "--cfg.resume=1")
    if kill_at == "installed":  # the file was complete: never written over without overwrite
        assert resumed.returncode == 1 and "already exists" in resumed.stderr
    else:
        assert resumed.returncode == 0, resumed.stderr
        if kill_at.startswith("journal"):
            assert "note: resumed:" in resumed.stderr
            done = int(resumed.stderr.split("note: resumed: ")[1].split(" ")[0])
            assert 0 < done < 60
    assert samples(beton) == references[layout]
    assert hidden(tmp_path) == [] or kill_at == "installed" and not any(
        name.endswith((".partial", ".journal")) for name in hidden(tmp_path))


def test_resume_refuses_other_options_and_another_source(tmp_path, sources, references):
    beton = tmp_path / "train.beton"
    assert write(sources["folder"], beton, kill_at="journal:1").returncode == -9
    other = write(sources["folder"], beton, "--cfg.resume=1", "--cfg.max_resolution=200")
    assert other.returncode == 1
    assert "made with cfg.max_resolution=400, not 200" in other.stderr
    source = write(sources["tar"], beton, "--cfg.resume=1")
    assert source.returncode == 1 and "cfg.data_dir=" in source.stderr
    # the refusals kept the unfinished write: the same command still continues it
    assert write(sources["folder"], beton, "--cfg.resume=1").returncode == 0
    assert samples(beton) == references["folder"]


def test_a_write_without_resume_starts_over_and_says_so(tmp_path, sources, references):
    beton = tmp_path / "train.beton"
    assert write(sources["folder"], beton, kill_at="journal:1").returncode == -9
    again = write(sources["folder"], beton)
    assert again.returncode == 0
    assert "removed an unfinished write of this file" in again.stderr
    assert samples(beton) == references["folder"] and hidden(tmp_path) == []
    fresh = write(sources["folder"], tmp_path / "other.beton", "--cfg.resume=1")
    assert fresh.returncode == 0 and "no unfinished write" in fresh.stderr


def test_two_writers_never_share_a_destination(tmp_path):
    from ffcv_imagenet.writer import WriterError
    from ffcv_imagenet.writer.resume import Partial

    first, second = Partial(tmp_path / "train.beton"), Partial(tmp_path / "train.beton")
    first.lock()
    try:
        with pytest.raises(WriterError, match=rf"is being written by pid {os.getpid()}"):
            second.lock()
    finally:
        first.unlock()
    second.lock()  # free again once the first let go
    second.unlock()
    assert hidden(tmp_path) == []


def test_a_journal_record_cut_by_the_kill_is_dropped_not_shifted(tmp_path, sources, references):
    """A kill in the middle of a journal append leaves part of a record: the resume drops it (and
    appends after the whole ones), so no later record is read shifted."""
    beton = tmp_path / "train.beton"
    assert write(sources["folder"], beton, kill_at="journal:1").returncode == -9
    journal = tmp_path / f".{beton.name}.partial.journal"
    with open(journal, "ab") as f:
        f.write(b"\x07" * 16)  # a third of a 48-byte record
    resumed = write(sources["folder"], beton, "--cfg.resume=1")
    assert resumed.returncode == 0, resumed.stderr
    assert samples(beton) == references["folder"]
