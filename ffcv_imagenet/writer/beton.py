"""ffcv's .beton layout, and nothing else: the header and field descriptors, one sample's metadata
row and data in an RGBImageField + IntField file, the metadata and allocation tables at the end."""

import os
from dataclasses import dataclass, field

import numpy as np

from .encode import encode_jpeg
from .options import WriterOptions


@dataclass
class BetonStats:
    num_samples: int = 0
    num_raw: int = 0
    num_jpeg: int = 0
    skipped: list = field(default_factory=list)  # [{"file": ..., "error": ...}]
    widths: np.ndarray = None
    heights: np.ndarray = None


def beton_fields(opts: WriterOptions) -> dict:
    from ffcv.fields import IntField, RGBImageField

    # The header records only the field types; the per-sample raw/JPEG choice is ours.
    return {"image": RGBImageField(write_mode=opts.write_mode,
                                   jpeg_quality=opts.jpeg_quality),
            "label": IntField()}


def write_header(path, num_samples, fields, page_size, keep_rest: bool = False):
    """Write ffcv's header and field descriptors at the start of `path` (a new file, or, with
    keep_rest, over the same bytes of a resumed one); returns (header, metadata table offset)."""
    from ffcv.types import CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType

    header = np.zeros(1, dtype=HeaderType)[0]
    header["version"] = CURRENT_VERSION
    header["num_samples"] = num_samples
    header["num_fields"] = len(fields)
    header["page_size"] = page_size
    type_ids = {handler: type_id for type_id, handler in TYPE_ID_HANDLER.items()}
    descriptors = np.zeros(len(fields), dtype=FieldDescType)
    for row, (name, f) in zip(descriptors, fields.items()):
        encoded = np.frombuffer(name.encode("ascii"), dtype="<u1")[: row["name"].shape[0]]
        row["type_id"] = type_ids[type(f)]
        row["name"][: len(encoded)] = encoded
        row["arguments"][:] = f.to_binary()[0]
    with open(path, "r+b" if keep_rest else "wb") as fp:
        fp.write(header.tobytes())
        fp.write(descriptors.tobytes())
    return header, HeaderType.itemsize + descriptors.nbytes


def encode_sample(allocator, metadata, i, image, jpeg: bool, opts: WriterOptions, label_field, label: int):
    """Write sample i (data into the allocator's page, metadata row i) in ffcv's RGBImageField
    layout (mode, width, height, data_ptr), JPEG-encoding it with our restart markers."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    image_column, label_column = metadata.dtype.names
    data = (encode_jpeg(image, opts.jpeg_quality, opts.restart_interval) if jpeg
            else np.ascontiguousarray(image).reshape(-1))
    for attempt in (0, 1):  # a sample that straddles a page restarts on a new one
        try:
            allocator.set_current_sample(i)
            row = metadata[image_column][i:i + 1]
            row["mode"] = IMAGE_MODES["jpg" if jpeg else "raw"]
            row["height"], row["width"] = image.shape[:2]
            row["data_ptr"], storage = allocator.malloc(data.nbytes)
            storage[:] = data
            label_field.encode(metadata[label_column][i:i + 1], label, allocator.malloc)
            return
        except MemoryError:
            if attempt:
                raise


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
