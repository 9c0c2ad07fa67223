"""Source names beside a .beton (`FILE.beton.names.gz`), `inspect` showing them, and
`training.eval_only` writing predictions.csv and ReaL top-1 (`validation.real_labels`), on a
small flat val folder named like ILSVRC2012's."""

import csv
import json
import os

import numpy as np
import pytest
import torch

import writer_data as data
from ffcv_imagenet.metadata import DataFileError, read_metadata, write_metadata
from ffcv_imagenet.names import names_path, read_names, val_numbers, write_names
from ffcv_imagenet.writer import write_dataset

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def items():
    """3 classes x 4 gradient JPEGs of 48x40 px: 12 val images."""
    return data.sample_set(per_class=(4, 4, 4))


@pytest.fixture(scope="module")
def val_beton(items, tmp_path_factory):
    """The 12 images as a flat ILSVRC2012-style val folder + Kaggle labels, written to a .beton."""
    root = tmp_path_factory.mktemp("val")
    folder = data.write_flat_val(root / "val", items)
    labels = data.write_csv_labels(root / "LOC_val_solution.csv", items)
    beton = root / "val.beton"
    write_dataset(folder, beton, split="val", val_labels=labels, max_resolution=64, num_workers=1,
                  progress=False)
    return beton


def expected_names(items) -> list:
    """The val file names in the writer's sample order: by label, then name."""
    position = {w: i for i, w in enumerate(data.WNIDS)}
    return [name for _, name in sorted((position[wnid], f"{name}.JPEG")
                                       for name, (wnid, _, _) in zip(data.val_names(items), items))]


# --------------------------------------------------------------------------- the names sidecar

def test_the_writer_records_each_samples_source_name(items, val_beton):
    names = read_names(val_beton)
    assert names == expected_names(items)
    meta = read_metadata(val_beton)
    assert meta["names"]["count"] == 12 and meta["names"]["file"] == "val.beton.names.gz"
    # and the names agree with the labels stored in the file, sample by sample
    _, labels, _ = data.read_samples(val_beton)
    by_name = {f"{n}.JPEG": data.WNIDS.index(w) for n, (w, _, _) in zip(data.val_names(items), items)}
    assert labels.tolist() == [by_name[n] for n in names]


def test_skipped_images_have_no_name(tmp_path, items):
    folder = data.write_image_folder(tmp_path / "train", items[:6])
    bad = folder / data.WNIDS[0] / f"{items[1][1]}.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # cut short: does not decode
    beton = tmp_path / "train.beton"
    write_dataset(folder, beton, split="train", max_resolution=64, num_workers=1, progress=False,
                  skip_bad=True)
    kept = [f"{wnid}/{stem}.JPEG" for wnid, stem, _ in items[:6] if stem != items[1][1]]
    assert read_names(beton) == kept


def test_a_sidecar_that_does_not_belong_is_refused_by_name(tmp_path, val_beton):
    beton = tmp_path / "val.beton"
    for suffix in ("", ".meta.json", ".names.gz"):
        (tmp_path / f"val.beton{suffix}").write_bytes(val_beton.with_name(f"val.beton{suffix}").read_bytes())
    sidecar = names_path(beton)
    write_names(beton, [b"ILSVRC2012_val_00000001.JPEG"] * 12)  # another write's names
    with pytest.raises(DataFileError, match=f"{sidecar}.*not the names file"):
        read_names(beton)
    sidecar.unlink()
    with pytest.raises(DataFileError, match=f"{sidecar}: source names file not found"):
        read_names(beton)
    meta = read_metadata(beton)
    del meta["names"]
    with pytest.raises(DataFileError, match=f"{beton} records no source names.*write it again"):
        read_names(beton, meta)


def test_val_numbers_come_from_the_base_name_and_other_names_are_refused():
    assert val_numbers(["a/ILSVRC2012_val_00000007.JPEG", "ILSVRC2012_val_00050000.png"], "x") == [7, 50000]
    with pytest.raises(ValueError, match=r"val.beton.names.gz: sample 1's source 'n01/img_1.JPEG'"):
        val_numbers(["ILSVRC2012_val_00000001.JPEG", "n01/img_1.JPEG"], "val.beton.names.gz")


def test_inspect_shows_the_names_and_flags_a_foreign_sidecar(tmp_path, val_beton, items, capsys):
    from ffcv_imagenet import inspect

    assert inspect.main([str(val_beton)]) == 0
    first = ", ".join(expected_names(items)[:5])
    assert f"names     {names_path(val_beton)}: 12, first {first}" in capsys.readouterr().out
    beton = tmp_path / "val.beton"
    for suffix in ("", ".meta.json", ".names.gz"):
        (tmp_path / f"val.beton{suffix}").write_bytes(val_beton.with_name(f"val.beton{suffix}").read_bytes())
    write_names(beton, [b"x.JPEG"] * 12)
    assert inspect.main([str(beton)]) == 1
    assert f"PROBLEM   {names_path(beton)} is not the names file" in capsys.readouterr().out
    meta = read_metadata(beton)
    del meta["names"]
    write_metadata(beton, meta)  # as an older writer left it: usable, said so
    assert inspect.main([str(beton)]) == 0
    assert "names     none recorded (an older writer)" in capsys.readouterr().out


# --------------------------------------------------------------------------- ReaL and predictions

def real_entry(number: int) -> list:
    """ReaL labels of ILSVRC2012_val_{number}: every 4th image has none; whatever class a model
    predicts, some labelled images hold it and some do not."""
    return [[], [0], [1, 2], [2]][number % 4]


@pytest.fixture(scope="module")
def real_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "real.json"
    path.write_text(json.dumps([real_entry(i + 1) for i in range(20)]))  # more entries than images
    return path


@pytest.fixture(scope="module")
def trained(val_beton, real_json, tmp_path_factory):
    """One epoch on the 12 images (train = val here), validating with ReaL labels: the folder."""
    from engine_data import run_args
    from ffcv_imagenet import train

    folder = tmp_path_factory.mktemp("runs") / "run"
    assert train.main(run_args(val_beton, val_beton, folder, "--training.epochs=1",
                               "--training.batch_size=4", "--validation.batch_size=5",
                               f"--validation.real_labels={real_json}"), launched_at=0) == 0
    return folder


def log_records(folder, kind) -> list:
    return [r for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_eval_only_writes_predictions_and_real_top1(trained, val_beton, real_json, items, tmp_path, capsys):
    from engine_data import run_args
    from ffcv_imagenet import train

    capsys.readouterr()
    assert train.main(run_args(val_beton, val_beton, tmp_path, "--training.eval_only=1",
                               f"--training.checkpoint={trained / 'checkpoint.pt'}",
                               "--validation.batch_size=5", f"--validation.real_labels={real_json}")) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = log_records(tmp_path, "eval")
    assert len(logged) == 1 and {k: v for k, v in logged[0].items() if k != "time"} == printed
    assert printed["predictions"] == str(tmp_path / "predictions.csv") and printed["val_count"] == 12

    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["name", "label", "label_wnid", "wnid_1", "score_1", "wnid_2", "score_2",
                             "wnid_3", "score_3"]  # 3 classes: a top-3
    assert [r["name"] for r in rows] == expected_names(items)
    label_of = {f"{n}.JPEG": data.WNIDS.index(w) for n, (w, _, _) in zip(data.val_names(items), items)}
    for r in rows:
        assert int(r["label"]) == label_of[r["name"]] and r["label_wnid"] == data.WNIDS[int(r["label"])]
        scores = [float(r[f"score_{k}"]) for k in (1, 2, 3)]
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-5)
        assert sorted(r[f"wnid_{k}"] for k in (1, 2, 3)) == list(data.WNIDS)
    # top-1 and ReaL top-1 by hand from predictions.csv and real.json
    real = json.loads(real_json.read_text())
    top1 = [data.WNIDS.index(r["wnid_1"]) for r in rows]
    lists = [real[val_numbers([r["name"]], "")[0] - 1] for r in rows]
    labelled = [(c, lst) for c, lst in zip(top1, lists) if lst]
    assert printed["real_count"] == len(labelled) == 9
    assert printed["real_top_1"] == pytest.approx(sum(c in lst for c, lst in labelled) / len(labelled))
    assert printed["top_1"] == pytest.approx(np.mean([c == int(r["label"]) for c, r in zip(top1, rows)]))
    # the same weights scored the same images at the end of training
    epoch = log_records(trained, "epoch")[-1]
    assert epoch["real_top_1"] == pytest.approx(printed["real_top_1"])
    assert log_records(trained, "summary")[0]["real_top_1"] == pytest.approx(printed["real_top_1"])


def copy_without_names(val_beton, folder):
    """The val file as a writer from before source names left it: no sidecar, no record."""
    beton = folder / "old.beton"
    beton.write_bytes(val_beton.read_bytes())
    meta = read_metadata(val_beton)
    del meta["names"]
    write_metadata(beton, meta)
    return beton


def test_real_labels_that_do_not_fit_the_val_file_are_refused_by_name(val_beton, tmp_path):
    from ffcv_imagenet.predict import real_labels_for

    wnids = list(data.WNIDS)
    assert real_labels_for("", val_beton, wnids) is None  # off
    short = tmp_path / "short.json"
    short.write_text(json.dumps([[0]] * 11))
    with pytest.raises(DataFileError, match=f"{short} holds 11 entries, but .*names ILSVRC2012_val_00000012"):
        real_labels_for(str(short), val_beton, wnids)
    for content, named in [("[[0], 1]", "entry 1 is not one"), ('{"a": 1}', "the file is not one"),
                           ("[[0], [", "not JSON"), (json.dumps([[3]] * 12), "class index 3 is outside")]:
        short.write_text(content)
        with pytest.raises(DataFileError, match=f"validation.real_labels={short}: .*{named}"):
            real_labels_for(str(short), val_beton, wnids)
    with pytest.raises(DataFileError, match="not sorted"):
        real_labels_for(str(short), val_beton, wnids[::-1])
    old = copy_without_names(val_beton, tmp_path)
    with pytest.raises(DataFileError, match=f"{old} records no source names.*write it again"):
        real_labels_for(str(short), old, wnids)
    full = tmp_path / "real.json"
    full.write_text(json.dumps([real_entry(i + 1) for i in range(12)]))
    table = real_labels_for(str(full), val_beton, wnids)
    numbers = val_numbers(read_names(val_beton), "")
    assert [[c for c in row if c >= 0] for row in table.tolist()] == [real_entry(k) for k in numbers]


def test_eval_only_on_a_file_without_names_evaluates_and_says_why_there_are_no_predictions(
        trained, val_beton, tmp_path, capsys):
    from engine_data import run_args
    from ffcv_imagenet import train

    old = copy_without_names(val_beton, tmp_path)
    assert train.main(run_args(old, old, tmp_path / "eval", "--training.eval_only=1",
                               f"--training.checkpoint={trained / 'checkpoint.pt'}")) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["val_count"] == 12
    assert f"warning: no predictions.csv: {old} records no source names" in err
    assert not (tmp_path / "eval" / "predictions.csv").exists()


class PixelLogits(torch.nn.Module):
    """Logits = the first row of the red channel: a test sets each image's scores by hand."""

    def forward(self, x):
        return x[:, 0, 0, :].float()


def test_real_top1_and_predictions_against_a_hand_count():
    from ffcv_imagenet.data import IMAGENET_MEAN, IMAGENET_STD
    from ffcv_imagenet.predict import Predictions, RealTop1
    from ffcv_imagenet.train import evaluate

    pixels = torch.tensor([[10, 200, 30, 40, 50, 60],   # top-1 class 1, ReaL [1]: right
                           [10, 20, 30, 40, 50, 60],    # no ReaL labels: left out
                           [90, 20, 30, 40, 80, 70],    # top-1 class 0, ReaL [4, 2]: wrong
                           [10, 20, 30, 90, 50, 60]],   # top-1 class 3, ReaL [5, 3]: right
                          dtype=torch.uint8)
    real = torch.tensor([[1, -1], [-1, -1], [4, 2], [5, 3]])
    labels = torch.tensor([1, 0, 4, 2])
    images = torch.zeros(4, 3, 2, 6, dtype=torch.uint8)
    images[:, 0, 0, :] = pixels
    batches = [(images[:2], labels[:2]), (images[2:3], labels[2:3]), (images[3:], labels[3:])]
    predictions = Predictions()
    result = evaluate(PixelLogits(), batches, device=torch.device("cpu"), precision="fp32",
                      lr_tta=False, scorers=[RealTop1(real, "cpu"), predictions])
    assert result["real_count"] == 3 and result["real_top_1"] == pytest.approx(2 / 3)
    assert result["top_1"] == pytest.approx(1 / 4)
    (got_labels, top, scores), = predictions.gathered
    logits = (pixels.float() - 255 * IMAGENET_MEAN[0]) / (255 * IMAGENET_STD[0])
    expected = logits.softmax(dim=1).topk(5, dim=1)
    assert got_labels.tolist() == labels.tolist()
    assert top.tolist() == expected.indices.tolist()
    np.testing.assert_allclose(scores, expected.values.numpy(), rtol=1e-6)


REAL_JSON = "/work/shared/data/imagenet-real/real.json"


@pytest.mark.skipif(not os.path.exists(REAL_JSON), reason="the published real.json is not on this machine")
def test_the_published_real_json_reads_as_documented():
    from ffcv_imagenet.predict import read_real_json

    real = read_real_json(REAL_JSON)
    assert len(real) == 50000 and sum(not r for r in real) == 3163  # the count docs/training.md gives
    assert max(c for r in real for c in r) == 999


@pytest.mark.slow
def test_eval_only_under_torchrun_gathers_every_ranks_predictions(val_beton, real_json, tmp_path):
    """2 processes (gloo), each scoring its half of the file: the same predictions.csv and ReaL
    top-1 as one process. The checkpoint is a fixed random ResNet-18 saved by the project's save."""
    from engine_data import run_args, torchrun_2
    from ffcv_imagenet import train
    from ffcv_imagenet.checkpoint import save_checkpoint
    from ffcv_imagenet.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, use_blurpool=False, zero_init_residual=False)
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, {"model": model.state_dict(), "arch": "resnet18", "num_classes": 3,
                                 "wnids": list(data.WNIDS), "epoch": 0})
    args = ["--training.eval_only=1", f"--training.checkpoint={checkpoint}",
            "--validation.batch_size=5", f"--validation.real_labels={real_json}"]
    assert train.main(run_args(val_beton, val_beton, tmp_path / "one", *args)) == 0
    result = torchrun_2(run_args(val_beton, val_beton, tmp_path / "two", *args))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (log_records(tmp_path / k, "eval")[0] for k in ("one", "two"))
    assert (two["val_count"], two["real_count"]) == (12, 9)
    assert two["real_top_1"] == one["real_top_1"] and two["top_1"] == one["top_1"]
    rows = [list(csv.reader(open(tmp_path / k / "predictions.csv"))) for k in ("one", "two")]
    assert len(rows[1]) == 13 and [r[:4] for r in rows[1]] == [r[:4] for r in rows[0]]
    np.testing.assert_allclose(np.array([r[4::2] for r in rows[1][1:]], dtype=float),
                               np.array([r[4::2] for r in rows[0][1:]], dtype=float), atol=2e-6)
    assert [r[5::2] for r in rows[1]] == [r[5::2] for r in rows[0]]


def test_a_name_with_a_line_break_is_refused_naming_it(tmp_path):
    from ffcv_imagenet.writer import WriterError

    with pytest.raises(WriterError, match=r"source file name b'a\\nb.JPEG' holds a line break"):
        write_names(tmp_path / "x.beton", [b"ok.JPEG", b"a\nb.JPEG"])
    assert list(tmp_path.iterdir()) == []  # nothing written
