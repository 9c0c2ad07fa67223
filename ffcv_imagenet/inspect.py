"""`ffcv-imagenet inspect FILE.beton [--inspect.verify]`: what is in a .beton, and whether it all decodes.

Reads the file with ffcv's `Reader` (header, fields, per-sample metadata, allocation table) and
reports fields, sample count, label histogram, image sizes, raw vs JPEG storage, the metadata
file written beside it and the first source names (names.py; a sidecar that does not belong to
the file is a problem). `inspect.verify` decodes every image independently of ffcv's loader (OpenCV for
JPEG samples, a size check for raw ones) so that a failing sample is reported by index, and
checks every label against the class count of the metadata. Exit code 1 when anything is wrong.
"""

import json
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np

from ffcv_imagenet.command import Command, Option, Positional
from ffcv_imagenet.host import cpu_cores

from ffcv_imagenet.writer.beton import CURRENT_VERSION as CURRENT_FORMAT
from ffcv_imagenet.writer.beton import IMAGE_MODES

JPEG_MODE, RAW_MODE = IMAGE_MODES["jpg"], IMAGE_MODES["raw"]
NAMES_SHOWN = 5  # source names listed by inspect


def _check_not_truncated(path):
    """ValueError when the header points past the end of the file (a copy cut short)."""
    from ffcv.types import HeaderType

    file_bytes = os.path.getsize(path)
    header = np.fromfile(path, dtype=HeaderType, count=1)
    if len(header) and header[0]["version"] == CURRENT_FORMAT and \
            int(header[0]["alloc_table_ptr"]) >= file_bytes:
        raise ValueError(f"{path}: truncated .beton: {file_bytes} bytes, but the header puts the "
                         f"allocation table at byte {int(header[0]['alloc_table_ptr'])}")


class BetonFile:
    """Random access to the samples of a .beton without a Loader (no numba compile)."""

    def __init__(self, path):
        from ffcv.reader import Reader

        self.path = str(path)
        try:
            self.reader = Reader(self.path)
        except Exception as e:  # ffcv fails with IndexError, AssertionError, ValueError...
            _check_not_truncated(self.path)
            raise ValueError(f"{self.path}: not a readable .beton file "
                             f"({type(e).__name__}: {e})") from None
        self.num_samples = int(self.reader.num_samples)
        if len(self.reader.metadata) != self.num_samples:
            _check_not_truncated(self.path)
        columns = self.reader.metadata.dtype.names
        self.columns = dict(zip(self.reader.field_names, columns))
        table = self.reader.alloc_table
        order = np.argsort(table["ptr"])
        self._ptrs, self._sizes = table["ptr"][order], table["size"][order]
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")

    def field_types(self) -> dict:
        return {name: type(handler).__name__ for name, handler in self.reader.handlers.items()}

    def column(self, field_name):
        return self.reader.metadata[self.columns[field_name]]

    def stored_bytes(self, ptr) -> np.ndarray:
        position = np.searchsorted(self._ptrs, ptr)
        if position >= len(self._ptrs) or self._ptrs[position] != ptr:
            raise ValueError(f"no allocation at file offset {ptr}")
        return self._data[int(ptr):int(ptr) + int(self._sizes[position])]

    def image(self, i, field_name="image") -> np.ndarray:
        """Sample i's image as an RGB uint8 array (height, width, 3); ValueError if it is bad."""
        import cv2

        row = self.column(field_name)[i]
        height, width = int(row["height"]), int(row["width"])
        data = self.stored_bytes(row["data_ptr"])
        if row["mode"] == RAW_MODE:
            if data.size != height * width * 3:
                raise ValueError(f"raw image holds {data.size} bytes, expected {height}x{width}x3")
            return np.array(data).reshape(height, width, 3)
        if row["mode"] != JPEG_MODE:
            raise ValueError(f"unknown storage mode {row['mode']}")
        decoded = cv2.imdecode(np.asarray(data), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ValueError("JPEG data does not decode")
        if decoded.shape[:2] != (height, width):
            raise ValueError(f"JPEG decodes to {decoded.shape[1]}x{decoded.shape[0]}, "
                             f"metadata says {width}x{height}")
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _verify_range(path, start, stop):
    import cv2

    cv2.setNumThreads(1)
    beton = BetonFile(path)
    failures = []
    for i in range(start, stop):
        try:
            beton.image(i)
        except Exception as e:
            failures.append((i, f"{type(e).__name__}: {e}"))
    return failures


def verify_images(path, num_samples, num_workers=None, chunk=2000) -> list:
    """Decode every image; returns [(sample index, error)] for those that fail."""
    ranges = [(str(path), s, min(num_samples, s + chunk)) for s in range(0, num_samples, chunk)]
    num_workers = num_workers or cpu_cores()
    if num_workers <= 1 or len(ranges) <= 1:
        return [f for r in ranges for f in _verify_range(*r)]
    with multiprocessing.get_context("fork").Pool(min(num_workers, len(ranges))) as pool:
        return [f for part in pool.starmap(_verify_range, ranges) for f in part]


def longer_side_histogram(heights, widths) -> dict:
    """Images per power-of-two bucket of the longer side: {"<=32": n, "<=64": n, ...}, non-empty
    buckets only, in increasing order."""
    longer = np.maximum(np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64))
    if len(longer) == 0:
        return {}
    bucket_px = 1 << np.ceil(np.log2(np.maximum(longer, 1))).astype(np.int64)
    sizes, counts = np.unique(bucket_px, return_counts=True)
    return {f"<={int(size)}": int(count) for size, count in zip(sizes, counts)}


def _quartiles(values) -> dict:
    if len(values) == 0:
        return {"min": None, "median": None, "max": None}
    return {"min": int(np.min(values)), "median": float(np.median(values)),
            "max": int(np.max(values))}


def inspect_beton(path, verify=False, num_workers=None) -> dict:
    """Everything `ffcv-imagenet inspect` reports, as a dict; `problems` lists what is wrong."""
    from ffcv_imagenet.metadata import check_unchanged, metadata_path, read_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .beton file")
    beton = BetonFile(path)
    report = {"path": str(path), "bytes": path.stat().st_size, "fields": beton.field_types(),
              "samples": beton.num_samples, "problems": []}
    problems = report["problems"]
    meta = None
    try:
        meta = read_metadata(path)
        check_unchanged(path, meta)  # a file cut short or replaced since it was written
    except ValueError as e:
        problems.append(str(e))
    report["metadata_path"] = str(metadata_path(path))
    report["metadata"] = meta
    if meta is not None and meta.get("num_samples") != beton.num_samples:
        problems.append(f"metadata says {meta.get('num_samples')} samples, the .beton holds "
                        f"{beton.num_samples}: they do not belong together")
    report["names"] = _source_names(path, meta, problems)

    if "label" in beton.columns:
        labels = beton.column("label").astype(np.int64)
        num_classes = len(meta["wnids"]) if meta else int(labels.max(initial=-1)) + 1
        counts = np.bincount(labels[labels >= 0], minlength=num_classes)
        present = np.flatnonzero(counts)
        report["labels"] = {
            "classes_in_metadata": len(meta["wnids"]) if meta else None,
            "classes_present": int(len(present)),
            "min_per_class": int(counts[present].min()) if len(present) else 0,
            "max_per_class": int(counts[present].max()) if len(present) else 0,
            "histogram": counts.tolist(),
        }
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if meta is not None and len(bad):
            problems.append(f"{len(bad)} labels outside 0..{num_classes - 1} (the metadata's "
                            f"{num_classes} classes), e.g. sample {bad[0]} has label "
                            f"{labels[bad[0]]}")
    if "image" in beton.columns:
        images = beton.column("image")
        report["image_height_px"] = _quartiles(images["height"])
        report["image_width_px"] = _quartiles(images["width"])
        report["longer_side_px"] = longer_side_histogram(images["height"], images["width"])
        report["raw"] = int(np.sum(images["mode"] == RAW_MODE))
        report["jpeg"] = int(np.sum(images["mode"] == JPEG_MODE))
        problems += _image_problems(beton, images)
        if verify:
            failures = verify_images(path, beton.num_samples, num_workers)
            report["verify"] = {"decoded": beton.num_samples - len(failures),
                                "failed": [{"sample": int(i), "error": e} for i, e in failures]}
            if failures:
                problems.append(f"{len(failures)} of {beton.num_samples} images fail to decode, "
                                f"e.g. sample {failures[0][0]}: {failures[0][1]}")
    return report


def _source_names(path: Path, meta: "dict | None", problems: list) -> "dict | None":
    """The names sidecar (names.py): its path, count and first names; None without metadata."""
    from ffcv_imagenet.names import has_names, names_path, read_names

    if meta is None:
        return None
    if not has_names(meta):  # an older writer's file: usable, but predictions cannot name images
        return {"path": None, "count": 0, "first": []}
    try:
        names = read_names(path, meta)
    except ValueError as e:
        problems.append(str(e))
        return None
    return {"path": str(names_path(path)), "count": len(names), "first": names[:NAMES_SHOWN]}


def _image_problems(beton: BetonFile, images) -> list:
    """Without decoding: samples too small for the loaders' crops (see metadata.MIN_SIDE),
    and data the index places past the end of the file (a tail cut off)."""
    from ffcv_imagenet.metadata import MIN_SIDE

    problems = []
    small = np.flatnonzero(np.minimum(images["height"], images["width"]) < MIN_SIDE)
    if len(small):
        i = int(small[0])
        problems.append(f"{len(small)} images have a side below {MIN_SIDE} px, e.g. sample {i} "
                        f"({int(images['width'][i])}x{int(images['height'][i])}): training aborts "
                        "on them inside OpenCV; write the file again (the writer now refuses them)")
    unindexed = np.flatnonzero(~np.isin(images["data_ptr"], beton._ptrs))
    if len(unindexed):  # the allocation table, at the end of the file, lost its last rows
        problems.append(f"{len(unindexed)} images have no entry in the allocation table, e.g. "
                        f"sample {int(unindexed[0])}: the file's tail is cut off")
    end = int(np.max(beton._ptrs + beton._sizes, initial=0))
    if end > beton._data.size:
        problems.append(f"the index places data up to byte {end:,} but the file ends at byte "
                        f"{beton._data.size:,}: its tail is cut off")
    return problems


def format_report(r: dict) -> str:
    lines = [f"file      {r['path']} ({r['bytes'] / 1e6:.1f} MB)",
             "fields    " + ", ".join(f"{k} ({v})" for k, v in r["fields"].items()),
             f"samples   {r['samples']}"]
    if "labels" in r:
        lab = r["labels"]
        of = "" if lab["classes_in_metadata"] is None else \
            f" of {lab['classes_in_metadata']} in the metadata"
        lines.append(f"labels    {lab['classes_present']} classes present{of}; per class min "
                     f"{lab['min_per_class']}, max {lab['max_per_class']}")
    if "image_height_px" in r:
        h, w = r["image_height_px"], r["image_width_px"]
        lines.append(f"height px min {h['min']}, median {h['median']}, max {h['max']}")
        lines.append(f"width px  min {w['min']}, median {w['median']}, max {w['max']}")
        buckets = ", ".join(f"{k}: {v}" for k, v in r["longer_side_px"].items())
        lines.append(f"longer side px, images: {buckets}")
        lines.append(f"storage   raw {r['raw']}, JPEG {r['jpeg']}")
    if "verify" in r:
        v = r["verify"]
        lines.append(f"verify    {v['decoded']} of {r['samples']} images decode, "
                     f"{len(v['failed'])} fail")
        lines += [f"          sample {f['sample']}: {f['error']}" for f in v["failed"][:20]]
    if r.get("names") is not None:
        names = r["names"]
        lines.append(f"names     {names['path']}: {names['count']}, first "
                     f"{', '.join(names['first'])}" if names["path"] else
                     "names     none recorded (an older writer): write the file again to map "
                     "predictions to images")
    lines.append(f"metadata  {r['metadata_path']}")
    if r["metadata"] is not None:
        shown = dict(r["metadata"])
        wnids = shown.pop("wnids")
        more = " ..." if len(wnids) > 10 else ""
        lines.append(f"          wnids ({len(wnids)}): {', '.join(wnids[:10])}{more}")
        lines += ["          " + line for line in json.dumps(shown, indent=1).splitlines()]
    if r["problems"]:
        lines += [f"PROBLEM   {p}" for p in r["problems"]]
    else:
        verified = " (every sample decodes, every label is in range)" if "verify" in r else ""
        lines.append("ok" + verified)
    return "\n".join(lines)


COMMAND = Command("inspect", "inspect", "Show a .beton's fields, counts, labels, sizes and metadata.", {
    "verify": Option(bool, False, "decode every image and check every label"),
    "num_workers": Option(int, 0, "processes for inspect.verify; 0 = all cores", low=0),
    "json": Option(bool, False, "print the report as JSON"),
}, positional=Positional("path", "FILE", "the .beton file"))


def main(argv=None) -> int:
    try:
        args = COMMAND.parse(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        return COMMAND.refuse(e)
    try:
        report = inspect_beton(args.path, verify=args.verify, num_workers=args.num_workers or None)
    except (FileNotFoundError, ValueError, AssertionError) as e:
        print(f"ffcv-imagenet inspect: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
