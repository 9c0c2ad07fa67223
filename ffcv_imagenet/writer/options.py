"""The writer's options, declared once: `OPTIONS` names each with its type, default, bounds and
help; the command line (cli.py), its --help table and `write_dataset`'s keywords all come from it.
`check_options` turns given values into one frozen `WriterOptions` (a dataclass made from
`OPTIONS`, so no name is spelled twice), checked once; the encoder reads its fields."""

import dataclasses
import difflib
import os
from dataclasses import dataclass

from ..config import needs_value, parse_bool
from ..host import cpu_cores

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
SPLITS = ("train", "val")
RESTART_INTERVAL_DEFAULT = 2  # MCUs between JPEG restart markers (see restart_mcus); bench: +2.6% bytes


class WriterError(Exception):
    """A problem with the input or the options; the message names the file, key or value."""


@dataclass(frozen=True)
class Option:
    kind: type
    default: object
    desc: str
    choices: tuple = ()
    low: float = None
    high: float = None
    required: bool = False
    path: bool = False  # made absolute when checked: the metadata outlives the working folder

    def constraint(self) -> str:
        if self.choices:
            return "one of " + "|".join(self.choices)
        name = {int: "an integer", float: "a number", str: "a path", bool: "0 or 1"}[self.kind]
        if self.low is not None and self.high is not None:
            return f"{name} from {self.low} to {self.high}"
        if self.low is not None:
            return f"{name} >= {self.low}"
        return name

    def coerce(self, key: str, value):
        """Return `value` converted to this option's type; ValueError names key and value."""
        if value is None or (self.kind is str and value == ""):
            if self.required:
                raise ValueError(f"cfg.{key} is required ({self.desc})")
            return self.default
        if self.kind is not bool:
            needs_value(f"cfg.{key}", value)
        try:
            if self.kind is bool:
                result = parse_bool(value)
            elif self.kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                result = int(value) if isinstance(value, (int, float)) else int(str(value).strip())
            elif self.kind is float:
                result = float(value)
            else:
                result = str(value)
        except (TypeError, ValueError):
            raise ValueError(f"cfg.{key}={value!r}: expected {self.constraint()}") from None
        bad = (self.choices and result not in self.choices) \
            or (self.low is not None and result < self.low) \
            or (self.high is not None and result > self.high)
        if bad:
            raise ValueError(f"cfg.{key}={value!r}: expected {self.constraint()}")
        return result


OPTIONS = {
    "split": Option(str, None, "which split this file holds (recorded in the metadata)",
                    choices=SPLITS, required=True),
    "data_dir": Option(str, None, "ImageFolder tree, flat image folder, or a .tar (or a folder "
                       "holding ILSVRC2012_img_<split>.tar)", required=True, path=True),
    "write_path": Option(str, None, "output .beton path (metadata goes to <path>.meta.json)",
                         required=True),
    # 16384 px: a raw 16384^2 RGB image needs a 1 GiB page; the header stores the page size in
    # 32 bits, so much larger values cannot be written.
    "max_resolution": Option(int, 500, "longer image side in px after downscaling",
                             low=1, high=16384),
    "write_mode": Option(str, "jpg", "how images are stored: raw (no JPEG), jpg (all JPEG), smart "
                         "(JPEG when H*W*3 > smart_threshold), proportion (exactly "
                         "round(compress_probability * N) JPEG, chosen by a seeded shuffle)",
                         choices=WRITE_MODES),
    "compress_probability": Option(float, 0.5, "proportion mode: fraction stored as JPEG",
                                   low=0.0, high=1.0),
    "jpeg_quality": Option(int, 90, "JPEG quality of re-encoded images", low=1, high=100),
    "restart_interval": Option(int, RESTART_INTERVAL_DEFAULT,
                               "JPEG restart marker every N MCUs (16 px wide each), rounded down "
                               "to a divisor of the image's MCU columns; lets the crop-first "
                               "decoder Huffman-decode only the crop's segments; 0 = none (ffcv's "
                               "files)", low=0, high=65535),
    "smart_threshold": Option(int, None, "smart mode: images whose raw RGB bytes (H*W*3) exceed "
                              "this are stored as JPEG, the others raw", low=1),
    "subset": Option(int, -1, "images per class (first N by file name); -1 = all", low=-1),
    "num_workers": Option(int, 0, "worker processes; 0 = all cores", low=0),
    "chunk_size": Option(int, 100, "images handed to a worker at a time", low=1),
    "val_labels": Option(str, "", "labels for a flat val folder/tar: LOC_val_solution.csv or "
                         "'<filename> <index|wnid>' lines", path=True),
    "classes": Option(str, "", "file of wnids, one a line, pinning the class set and order "
                      "(or a .beton/.meta.json written by this tool)", path=True),
    "overwrite": Option(bool, False, "replace an existing destination"),
    "skip_bad": Option(bool, False, "skip undecodable images and list them in the summary"),
}


WriterOptions = dataclasses.make_dataclass(
    "WriterOptions", [(key, option.kind) for key, option in OPTIONS.items()], frozen=True)
WriterOptions.__doc__ = "Every writer option, checked (check_options); fields as in OPTIONS."

def check_options(values: dict) -> "WriterOptions":
    """Coerce and check every option in `values` (missing ones take their defaults); ValueError
    lists each bad or unknown key and value."""
    resolved, errors = {}, []
    for key in values:
        if key not in OPTIONS:
            close = difflib.get_close_matches(key, OPTIONS, n=1)
            errors.append(f"unknown writer option {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    for key, option in OPTIONS.items():
        try:
            resolved[key] = option.coerce(key, values.get(key))
        except ValueError as e:
            errors.append(str(e))
    if not errors and resolved["write_mode"] == "smart" and resolved["smart_threshold"] is None:
        errors.append("cfg.write_mode=smart needs cfg.smart_threshold (raw RGB bytes above which "
                      "an image is stored as JPEG, e.g. 270000 = 300x300x3)")
    if not errors and resolved["subset"] == 0:
        errors.append("cfg.subset=0: expected -1 (all images) or a number of images per class >= 1")
    if errors:
        raise ValueError("; ".join(errors))
    if resolved["num_workers"] == 0:
        resolved["num_workers"] = cpu_cores()
    for key, option in OPTIONS.items():
        if option.path and resolved[key]:
            resolved[key] = os.path.abspath(resolved[key])
    return WriterOptions(**resolved)
