"""`ffcv-imagenet inspect` (report, --verify, corrupted samples) and the metadata checks."""

import json
import shutil

import numpy as np
import pytest

import writer_data as data
from ffcv_imagenet import inspect
from ffcv_imagenet.metadata import (DataFileError, check_same_classes, metadata_path, read_metadata,
                                    write_metadata)
from ffcv_imagenet.names import names_path
from ffcv_imagenet.writer import write_dataset


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    """8 samples over 3 classes (3, 3, 2): 48x40 and 24x20 px, proportion mode (4 JPEG, 4 raw)."""
    root = tmp_path_factory.mktemp("inspect")
    items = data.sample_set(per_class=(3, 3, 2))
    small = data.sample_set(per_class=(3, 3, 2), width_px=24, height_px=20)
    items = [item if k % 2 else small[k] for k, item in enumerate(items)]
    data.write_image_folder(root / "train", items)
    path = root / "train.beton"
    write_dataset(root / "train", path, split="train", max_resolution=64, write_mode="proportion",
                  compress_probability=0.5, num_workers=1, progress=False)
    return path


def copy_beton(source, folder):
    target = folder / source.name
    shutil.copy(source, target)
    shutil.copy(metadata_path(source), metadata_path(target))
    shutil.copy(names_path(source), names_path(target))
    return target


def test_inspect_reports_fields_labels_sizes_storage_and_metadata(beton, capsys):
    assert inspect.main([str(beton)]) == 0
    out = capsys.readouterr().out
    assert "fields    image (RGBImageField), label (IntField)" in out
    assert "samples   8" in out
    assert "labels    3 classes present of 3 in the metadata; per class min 2, max 3" in out
    assert "height px min 20, median 30.0, max 40" in out
    assert "width px  min 24, median 36.0, max 48" in out
    assert "longer side px, images: <=32: 4, <=64: 4" in out
    assert "storage   raw 4, JPEG 4" in out
    assert f"wnids (3): {', '.join(data.WNIDS)}" in out
    assert '"write_mode": "proportion"' in out
    first = ", ".join(f"{w}/{w}_{k:04d}.JPEG" for w, k in [(data.WNIDS[0], 0), (data.WNIDS[0], 1),
                                                           (data.WNIDS[0], 2), (data.WNIDS[1], 0),
                                                           (data.WNIDS[1], 1)])
    assert f"names     {names_path(beton)}: 8, first {first}" in out
    assert out.rstrip().endswith("ok")


def test_longer_side_histogram():
    heights, widths = [5, 64, 65, 200, 375], [8, 10, 64, 3000, 500]
    assert inspect.longer_side_histogram(heights, widths) == {
        "<=8": 1, "<=64": 1, "<=128": 1, "<=512": 1, "<=4096": 1}


def test_inspect_json_has_the_histogram(beton, capsys):
    assert inspect.main([str(beton), "--inspect.json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labels"]["histogram"] == [3, 3, 2]
    assert report["metadata"]["split"] == "train" and report["problems"] == []


def test_verify_decodes_every_sample(beton, capsys):
    assert inspect.main([str(beton), "--inspect.verify", "--inspect.num_workers=1"]) == 0
    out = capsys.readouterr().out
    assert "verify    8 of 8 images decode, 0 fail" in out
    assert "every sample decodes" in out


def test_verify_in_parallel_finds_the_same(beton):
    assert inspect.verify_images(beton, 8, num_workers=2, chunk=3) == []


def test_verify_reports_a_sample_corrupted_on_disk(beton, tmp_path, capsys):
    broken = copy_beton(beton, tmp_path)
    reader = inspect.BetonFile(broken)
    images = reader.column("image")
    victim = int(np.flatnonzero(images["mode"] == inspect.JPEG_MODE)[1])
    data_ptr = int(images["data_ptr"][victim])
    size = reader.stored_bytes(data_ptr).size
    del reader
    with open(broken, "r+b") as f:
        f.seek(data_ptr)
        f.write(bytes(size))  # the JPEG bytes of one sample become zeros
    assert inspect.main([str(broken), "--inspect.verify", "--inspect.num_workers=1"]) == 1
    out = capsys.readouterr().out
    assert "verify    7 of 8 images decode, 1 fail" in out
    assert f"sample {victim}: ValueError: JPEG data does not decode" in out
    assert "PROBLEM" in out


def test_inspect_flags_missing_or_foreign_metadata(beton, tmp_path, capsys):
    lonely = tmp_path / "lonely.beton"
    shutil.copy(beton, lonely)
    assert inspect.main([str(lonely)]) == 1
    assert "metadata file not found" in capsys.readouterr().out

    meta = read_metadata(beton)
    write_metadata(lonely, {**meta, "num_samples": 5})
    assert inspect.main([str(lonely)]) == 1
    assert "metadata says 5 samples, the .beton holds 8" in capsys.readouterr().out


def test_inspect_missing_file_is_an_error(tmp_path, capsys):
    assert inspect.main([str(tmp_path / "none.beton")]) == 1
    assert "none.beton: no such .beton file" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable .beton file"),
    (b"hello", "not a readable .beton file"),
    ("first half", "truncated .beton"),
], ids=["empty", "text", "cut"])
def test_inspect_refuses_a_file_that_is_not_a_whole_beton(beton, tmp_path, capsys, content,
                                                          message):
    path = tmp_path / "bad.beton"
    if content == "first half":
        content = beton.read_bytes()[: beton.stat().st_size // 2]
    path.write_bytes(content)
    assert inspect.main([str(path)]) == 1
    assert f"{path}: {message}" in capsys.readouterr().err


def test_check_same_classes_names_the_difference(tmp_path):
    a, b, c, d = (tmp_path / f"{name}.beton" for name in "abcd")
    write_metadata(a, {"wnids": ["n1", "n2", "n3"]})
    write_metadata(b, {"wnids": ["n1", "n2", "n4"]})
    write_metadata(c, {"wnids": ["n1", "n3", "n2"]})
    write_metadata(d, {"wnids": ["n1", "n2", "n3"]})
    assert check_same_classes(a, d) == ["n1", "n2", "n3"]
    with pytest.raises(ValueError, match="only in train: n3; only in val: n4"):
        check_same_classes(a, b)
    with pytest.raises(ValueError, match="different order .* label 1: n2 vs n3"):
        check_same_classes(a, c)
    write_metadata(d, {"wnids": ["n1", "n2", "n3", "n3"]})
    with pytest.raises(ValueError, match="repeats"):
        check_same_classes(a, d)
    with pytest.raises(DataFileError, match="metadata file not found"):
        check_same_classes(a, tmp_path / "missing.beton")


def test_val_written_with_train_classes_matches_train(tmp_path):
    """A val set that lacks a class gets a shorter class list unless pinned to the train file."""
    items = data.sample_set(per_class=(2, 2, 2))
    train = tmp_path / "train.beton"
    write_dataset(data.write_image_folder(tmp_path / "train", items), train, split="train",
                  max_resolution=32, num_workers=1, progress=False)
    val_items = items[:4]  # no image of the third class
    root = data.write_flat_val(tmp_path / "val", val_items)
    labels = data.write_csv_labels(tmp_path / "sol.csv", val_items)
    options = dict(split="val", val_labels=labels, max_resolution=32, num_workers=1, progress=False)
    write_dataset(root, tmp_path / "loose.beton", **options)
    with pytest.raises(ValueError, match=f"only in train: {data.WNIDS[2]}"):
        check_same_classes(train, tmp_path / "loose.beton")
    write_dataset(root, tmp_path / "pinned.beton", classes=train, **options)
    assert check_same_classes(train, tmp_path / "pinned.beton") == list(data.WNIDS)


def test_plain_inspect_flags_a_cut_tail_and_images_too_small(beton, tmp_path, capsys, monkeypatch):
    """Without --inspect.verify: a file whose last bytes are gone (with or without the metadata's
    fingerprint) and samples below the loaders' 2 px (written by an older writer) are problems."""
    from ffcv_imagenet.writer import encode

    cut = tmp_path / "cut.beton"
    cut.write_bytes(beton.read_bytes()[:-100])
    meta = json.loads(metadata_path(beton).read_text())
    for with_fingerprint in (True, False):
        if not with_fingerprint:
            meta.pop("fingerprint")
        metadata_path(cut).write_text(json.dumps(meta))
        assert inspect.main([str(cut)]) == 1
        out = capsys.readouterr()
        expected = "bytes but was written as" if with_fingerprint else "the file's tail is cut off"
        assert expected in out.out, out.out

    monkeypatch.setattr(encode, "MIN_SIDE", 1)  # as the writer did before it refused them
    folder = tmp_path / "tiny" / "n01"
    folder.mkdir(parents=True)
    (folder / "dot.JPEG").write_bytes(data.jpeg_bytes(data.gradient(1, 1, 0)))
    tiny = tmp_path / "tiny.beton"
    write_dataset(folder.parent, tiny, split="train", num_workers=1, progress=False)
    monkeypatch.undo()
    assert inspect.main([str(tiny)]) == 1
    assert "1 images have a side below 2 px, e.g. sample 0 (1x1)" in capsys.readouterr().out
