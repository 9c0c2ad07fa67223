"""ffcv's .beton layout, and nothing else: the header and field descriptors, one sample's metadata
row and data in an RGBImageField + IntField file, the pages samples go in, the metadata and
allocation tables at the end.

ffcv 1.0.2's format is spelled out here rather than imported: `import ffcv` imports torch and
numba, about 630 MB of RSS in the writer's parent and in each of its workers, for a few dtypes.
tests/test_writer.py checks every definition below against ffcv's own."""

import ctypes
import os
from dataclasses import dataclass, field

import numpy as np

from .encode import encode_jpeg
from .options import WriterOptions

CURRENT_VERSION = 2  # ffcv.types.CURRENT_VERSION
HEADER_TYPE = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                        ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
FIELD_DESC_TYPE = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                           align=True)
# (name, ffcv type id, metadata dtype) of each field, in file order: RGBImageField, IntField.
# Their arguments in the header are all zeros (to_binary); the raw/JPEG choice is per sample.
FIELDS = (("image", 2, np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])),
          ("label", 1, np.dtype("<i8")))
METADATA_TYPE = np.dtype([("", dtype) for _, _, dtype in FIELDS], align=True)  # ffcv names them f0, f1
IMAGE_MODES = {"jpg": 0, "raw": 1}


@dataclass
class BetonStats:
    num_samples: int = 0
    num_raw: int = 0
    num_jpeg: int = 0
    skipped: list = field(default_factory=list)  # [{"file": ..., "error": ...}]
    widths: np.ndarray = None
    heights: np.ndarray = None


def align_to_page(offset: int, page_size: int) -> int:
    return -(-offset // page_size) * page_size


def write_header(path, num_samples, page_size, keep_rest: bool = False):
    """Write ffcv's header and field descriptors at the start of `path` (a new file, or, with
    keep_rest, over the same bytes of a resumed one); returns (header, metadata table offset)."""
    header = np.zeros(1, dtype=HEADER_TYPE)[0]
    header["version"] = CURRENT_VERSION
    header["num_samples"] = num_samples
    header["num_fields"] = len(FIELDS)
    header["page_size"] = page_size
    descriptors = np.zeros(len(FIELDS), dtype=FIELD_DESC_TYPE)
    for row, (name, type_id, _) in zip(descriptors, FIELDS):
        encoded = np.frombuffer(name.encode("ascii"), dtype="<u1")
        row["type_id"] = type_id
        row["name"][: len(encoded)] = encoded
    with open(path, "r+b" if keep_rest else "wb") as fp:
        fp.write(header.tobytes())
        fp.write(descriptors.tobytes())
    return header, HEADER_TYPE.itemsize + descriptors.nbytes


class PageAllocator:
    """Places samples in whole pages of the file, as ffcv's reader wants them (a sample never
    straddles a page): each worker fills a page of its own in memory and writes it when full, at
    its place in the file. The page counter is shared by the forked workers (made before the fork);
    `report` (set in each worker) hears [(sample, offset, size)] of each page once it is written."""

    def __init__(self, path, data_start: int, page_size: int, first_page: int, context):
        self.path, self.data_start, self.page_size = str(path), data_start, page_size
        self.next_page = context.Value(ctypes.c_uint64, first_page)
        self.report = None
        self._fd, self._buffer, self._page, self._used, self._placed = None, None, -1, 0, []

    def __enter__(self):
        self._fd = os.open(self.path, os.O_WRONLY)
        self._buffer = np.zeros(self.page_size, dtype=np.uint8)
        return self

    def __exit__(self, *exc):
        self.flush()
        os.close(self._fd)

    def place(self, sample: int, data: np.ndarray) -> int:
        """Copy `data` into the current page, or a new one when it does not fit; its file offset."""
        if data.nbytes > self.page_size:
            raise ValueError(f"sample {sample}: {data.nbytes} bytes do not fit a page of {self.page_size}")
        if self._page < 0 or self._used + data.nbytes > self.page_size:
            self.flush()
            with self.next_page.get_lock():
                self._page = self.next_page.value
                self.next_page.value += 1
        offset = self.data_start + self._page * self.page_size + self._used
        self._buffer[self._used:self._used + data.nbytes] = data
        self._used += data.nbytes
        self._placed.append((sample, offset, data.nbytes))
        return offset

    def flush(self) -> None:
        """Write the current page (whole, zero-padded like ffcv's) and report its samples."""
        if self._page < 0:
            return
        self._buffer[self._used:] = 0
        offset, view = self.data_start + self._page * self.page_size, memoryview(self._buffer)
        while len(view):  # pwrite may write less (a full disk says so only on the next call)
            written = os.pwrite(self._fd, view, offset)
            offset, view = offset + written, view[written:]
        # on the disk before its samples are journalled: a resume after a power cut finds them
        os.fdatasync(self._fd)
        placed, self._placed, self._page, self._used = self._placed, [], -1, 0
        if self.report is not None:
            self.report(placed)


def encode_sample(allocator: PageAllocator, metadata, i, image, jpeg: bool, opts: WriterOptions, label: int):
    """Write sample i (data into the allocator's page, metadata row i) in ffcv's RGBImageField
    layout (mode, width, height, data_ptr), JPEG-encoding it with our restart markers."""
    image_column, label_column = metadata.dtype.names
    data = (encode_jpeg(image, opts.jpeg_quality, opts.restart_interval) if jpeg
            else np.ascontiguousarray(image).reshape(-1))
    row = metadata[image_column][i:i + 1]
    row["mode"] = IMAGE_MODES["jpg" if jpeg else "raw"]
    row["height"], row["width"] = image.shape[:2]
    row["data_ptr"] = allocator.place(i, data)
    metadata[label_column][i] = label


def finish_file(path, header, metadata_start, metadata, table, bad: set):
    """Write the per-sample metadata, allocation table (ffcv's ALLOC_TABLE_TYPE) and header;
    drop `bad` samples."""
    if bad:
        keep = np.ones(len(metadata), dtype=bool)
        keep[sorted(bad)] = False
        new_id = np.cumsum(keep) - 1
        table = table[keep[table["sample_id"]]]
        table["sample_id"] = new_id[table["sample_id"]]
        metadata = metadata[keep]  # rows shrink; the data region (absolute pointers) stays put
    with open(path, "r+b") as fp:
        fp.seek(metadata_start)
        fp.write(metadata.tobytes())
        header["alloc_table_ptr"] = fp.seek(0, os.SEEK_END)
        header["num_samples"] = len(metadata)
        fp.write(table.tobytes())
        fp.seek(0)
        fp.write(header.tobytes())
        fp.flush()
        os.fsync(fp.fileno())
    return metadata
