"""Per-image results of an evaluation: ReaL top-1 (`validation.real_labels`) and predictions.csv
(`training.eval_only`).

Both need each val sample's source image, which the .beton's names sidecar gives (names.py): the
val loader reads each process's contiguous block of the file in order, so sample `indices[k]` of
the block is line `indices[k]` of the sidecar. Scorers see every batch inside `train.evaluate`
(`update(logits, labels, top5)`) and add their fields to its result (`result()`, which every
process calls: it sums over processes).

ReaL labels (Beyer et al. 2020, "Are we done with ImageNet?"): `real.json` is a list of 50,000
lists of class indices (sorted-wnid order); entry i belongs to `ILSVRC2012_val_{i+1:08d}`. A
prediction is right when its top-1 class is in the image's list; images with an empty list are
left out of the count, as the labels' authors define it.
"""

import csv
import json
import os

import numpy as np
import torch

from ffcv_imagenet import distributed
from ffcv_imagenet.metadata import DataFileError
from ffcv_imagenet.names import names_path, read_names, val_numbers

PREDICTIONS_FILE = "predictions.csv"


def read_real_json(path) -> list:
    """real.json as a list of lists of ints; DataFileError naming the file when it is not one."""
    try:
        with open(path) as f:
            real = json.load(f)
    except FileNotFoundError:
        raise DataFileError(f"validation.real_labels={path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataFileError(f"validation.real_labels={path}: not JSON ({e})") from None
    bad = None if isinstance(real, list) else -1
    if bad is None:
        bad = next((i for i, r in enumerate(real) if not isinstance(r, list) or
                    not all(isinstance(c, int) and not isinstance(c, bool) for c in r)), None)
    if bad is not None:
        where = "the file" if bad < 0 else f"entry {bad}"
        raise DataFileError(f"validation.real_labels={path}: expected a list of lists of class "
                         f"indices (ReaL's real.json); {where} is not one")
    return real


def real_labels_for(real_path: str, val_beton, wnids: list) -> "torch.Tensor | None":
    """The ReaL labels of every sample of `val_beton`, in sample order: int64 [samples, most
    labels of an image], padded with -1 (an image without labels: a row of -1). None when
    `real_path` is ''. DataFileError naming the file, key or value at fault."""
    if not real_path:
        return None
    if wnids != sorted(wnids):
        raise DataFileError(f"validation.real_labels={real_path} indexes classes in sorted-wnid order, "
                         f"but the class list of {val_beton} is not sorted")
    numbers = val_numbers(read_names(val_beton), str(names_path(val_beton)))
    real = read_real_json(real_path)
    if numbers and max(numbers) > len(real):
        raise DataFileError(f"validation.real_labels={real_path} holds {len(real)} entries, but "
                         f"{names_path(val_beton)} names ILSVRC2012_val_{max(numbers):08d}")
    rows = [real[k - 1] for k in numbers]
    out_of_range = next((c for r in rows for c in r if not 0 <= c < len(wnids)), None)
    if out_of_range is not None:
        raise DataFileError(f"validation.real_labels={real_path}: class index {out_of_range} is "
                         f"outside the {len(wnids)} classes of {val_beton}")
    table = np.full((len(rows), max([1] + [len(r) for r in rows])), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        table[i, :len(r)] = r
    return torch.from_numpy(table)


class RealTop1:
    """ReaL top-1 over this process's block of the val file (`labels`: its rows of
    real_labels_for, in loader order)."""

    def __init__(self, labels: torch.Tensor, device):
        self.labels = labels.to(device)
        self.position = 0  # rows scored so far
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # correct, labelled

    def update(self, logits, labels, top5) -> None:
        rows = self.labels[self.position:self.position + len(labels)]
        self.position += len(labels)
        labelled = (rows >= 0).any(dim=1)
        correct = (rows == top5[:, :1]).any(dim=1)  # -1 (padding) is never a class
        self.sums += torch.stack([correct.sum(), labelled.sum()]).double()

    def result(self) -> dict:
        if self.position != len(self.labels):  # the loader and the names disagree: a bug
            raise RuntimeError(f"ReaL labels for {len(self.labels)} images, {self.position} scored")
        distributed.all_reduce_sum(self.sums)
        correct, labelled = self.sums.tolist()
        return {"real_top_1": correct / max(labelled, 1.0), "real_count": int(labelled)}


class Predictions:
    """Every image's label and top classes with their softmax scores, kept on the host; `result`
    gathers them from every process (in rank order, which is file order) on rank 0."""

    def __init__(self):
        self.parts = []  # (labels, top classes, their scores) per batch
        self.gathered = []  # per process: the same, concatenated (on rank 0 after `result`)

    def update(self, logits, labels, top5) -> None:
        scores = logits.softmax(dim=1).gather(1, top5)
        self.parts.append((labels.cpu().numpy(), top5.cpu().numpy(), scores.cpu().numpy()))

    def result(self) -> dict:
        mine = [np.concatenate(column) for column in zip(*self.parts)] if self.parts else None
        self.gathered = [part for part in distributed.gather_objects(mine) if part is not None]
        return {}


def write_predictions(path, names: list, wnids: list, gathered: list) -> None:
    """predictions.csv: name, label (index), label_wnid, then wnid_k, score_k for the top 5
    classes (best first; fewer when the model has fewer); written whole, then renamed in."""
    labels, top, scores = (np.concatenate(column) for column in zip(*gathered))
    if len(labels) != len(names):
        raise RuntimeError(f"{len(labels)} predictions for {len(names)} images")  # a bug
    k = top.shape[1]
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["name", "label", "label_wnid"] +
                            [f"{what}_{j}" for j in range(1, k + 1) for what in ("wnid", "score")])
            for name, label, classes, probs in zip(names, labels, top, scores):
                pairs = [v for c, p in zip(classes, probs) for v in (wnids[c], f"{p:.6f}")]
                writer.writerow([name, int(label), wnids[label], *pairs])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
