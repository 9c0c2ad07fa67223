"""The writer's options, declared once: `OPTIONS` names each with its type, default, bounds and
help; the command line (`COMMAND`, section `cfg` as in the original ffcv-imagenet's writer), its
--help table and `write_dataset`'s keywords all come from it. `check_options` turns given values
into one frozen `WriterOptions` (a dataclass made from `OPTIONS`, so no name is spelled twice),
checked once; the encoder reads its fields."""

import dataclasses

from ..command import Command, Option
from ..host import cpu_cores

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
SPLITS = ("train", "val")
RESTART_INTERVAL_DEFAULT = 2  # MCUs between JPEG restart markers (see restart_mcus); bench: +2.6% bytes


class WriterError(Exception):
    """A problem with the input or the options; the message names the file, key or value."""


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
    "resume": Option(bool, False, "continue the unfinished write of this destination (killed, "
                     "stopped, or failed on a bad image) where it stopped, when every option that "
                     "changes the output and the source are the same; 0: start over"),
    "skip_bad": Option(bool, False, "skip undecodable images and list them in the summary"),
}


# Options that do not change the .beton's content (resume.identity leaves them out), and those the
# metadata does not record (where the files are, and how this run was started).
NOT_IN_OUTPUT = ("data_dir", "write_path", "num_workers", "chunk_size", "overwrite", "skip_bad", "resume")
NOT_RECORDED = ("data_dir", "write_path", "resume")


DESCRIPTION = ("Convert ILSVRC2012 (class folders, flat val + labels, or the .tar archives) "
               "to .beton.")
COMMAND = Command("write", "cfg", DESCRIPTION, OPTIONS, frozen=True, absolute_paths=True)
WriterOptions = COMMAND.values_type
WriterOptions.__doc__ = "Every writer option, checked (check_options); fields as in OPTIONS."


def check_options(values: dict) -> "WriterOptions":
    """Coerce and check every option in `values` (missing ones take their defaults), once;
    ValueError lists each bad or unknown key and value."""
    return finish_options(COMMAND.check(values))


def finish_options(opts: "WriterOptions") -> "WriterOptions":
    """The checks between options, and num_workers=0 made the core count: what both ways in
    (the command line, `write_dataset`'s keywords) go through."""
    if opts.write_mode == "smart" and opts.smart_threshold is None:
        raise ValueError("cfg.write_mode=smart needs cfg.smart_threshold (raw RGB bytes above which "
                         "an image is stored as JPEG, e.g. 270000 = 300x300x3)")
    if opts.subset == 0:
        raise ValueError("cfg.subset=0: expected -1 (all images) or a number of images per class >= 1")
    return dataclasses.replace(opts, num_workers=opts.num_workers or cpu_cores())
