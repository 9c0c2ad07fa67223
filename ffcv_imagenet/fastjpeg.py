"""Crop-first RandomResizedCrop decoder for ffcv pipelines (the C part is `_jpegcrop.c`).

ffcv's `RandomResizedCropRGBImageDecoder` decodes each JPEG whole, then draws the crop box and
resizes it. The box depends only on the image's height and width, which the .beton stores, so
`CropFirstRandomResizedCrop` draws it first (with ffcv's own sampler, same distribution, same RNG
stream) and asks the C decoder for only what the box needs:

- splice: with restart markers in the JPEG (the writer's `restart_interval`), only the entropy-coded
  segments covering the box are Huffman-decoded;
- scale: the IDCT runs at the smallest scale M/8 whose output still covers the output size;
- region: rows above and below and columns beside the box are neither transformed nor converted;
- resize: the box is downscaled to the output by our C area filter, with the weights of OpenCV's
  INTER_AREA (what ffcv's resize uses) at about half its cost; boxes smaller than the output
  (upscaling) go to ffcv's resize.

Splice and region give the very pixels of a full decode's crop; scale and resize change a few (see
the tests for the bounds). Raw (uncompressed) samples skip the decoding. Each lever is a bit in
`flags`, so the benchmark can measure it alone.
"""

import ctypes
from ctypes import c_uint32, c_uint64, c_void_p

import numpy as np

from ._ffcv import preload  # isort: skip

preload()  # before any ffcv import (see _ffcv.py)

from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler

from . import _jpegcrop

# The bits of `flags`. SPLICE, SCALE, REGION and SCALE_POW2_ONLY are read by the C decoder, whose
# JC_* defines must hold the same values (tests/test_fastjpeg.py reads _jpegcrop.c and checks);
# RESIZE is read here only. SCALE_POW2_ONLY is not a lever but a restriction of SCALE: the IDCT
# scale is one of 1/8, 2/8, 4/8, 8/8 (libjpeg-turbo's fast paths) instead of any M/8.
SPLICE, SCALE, REGION, SCALE_POW2_ONLY, RESIZE = 1, 2, 4, 8, 16
LEVERS = {"splice": SPLICE, "scale": SCALE, "region": REGION, "resize": RESIZE}
ALL_LEVERS = SPLICE | SCALE | REGION | RESIZE  # every lever, the IDCT at any scale M/8
DEFAULT_FLAGS = ALL_LEVERS | SCALE_POW2_ONLY  # the train decoder's, unless told otherwise

_lib = ctypes.CDLL(_jpegcrop.__file__)
_c_decode_crop = _lib.jc_decode_crop
_c_decode_crop.argtypes = [c_void_p, c_uint64, c_uint32, c_uint32, c_uint32, c_uint32, c_uint32,
                           c_uint32, c_uint32, c_uint32, c_uint32, c_void_p, c_uint64, c_void_p]
_c_decode_crop.restype = ctypes.c_int
_c_resize_area = _lib.jc_resize_area
_c_resize_area.argtypes = [c_void_p, c_uint64, c_uint32, c_uint32, c_uint32, c_uint32, c_void_p,
                           c_uint32, c_uint32]
_c_resize_area.restype = ctypes.c_int
_c_layout = _lib.jc_layout
_c_layout.argtypes = [c_void_p, c_uint64, c_void_p]
_c_layout.restype = ctypes.c_int


def parse_levers(text: str) -> int:
    """'splice,scale,region' (or 'all', or 'none') -> flags."""
    text = text.strip().lower()
    if text in ("all", ""):
        return ALL_LEVERS
    if text == "none":
        return 0
    flags = 0
    for name in text.split(","):
        name = name.strip()
        if name not in LEVERS:
            raise ValueError(f"unknown decoder lever {name!r}; choose from {sorted(LEVERS)}, 'all' or 'none'")
        flags |= LEVERS[name]
    return flags


def decode_crop(source, height, width, y, x, h, w, out_h, out_w, flags, dst, region):
    """Decode what box (y, x, h, w) needs into dst (uint8, flat); region (int32[8]) receives the
    box's top, left, bottom, right in dst, dst's rows and columns, the IDCT scale m (of 8) and the
    decoded image height at that scale. Returns 0 (spliced),
    1 (original stream decoded) or < 0 (error). Callable from numba (ctypes)."""
    return _c_decode_crop(source.ctypes.data, source.size, height, width, y, x, h, w,
                          out_h, out_w, flags, dst.ctypes.data, dst.size, region.ctypes.data)


def resize_area(pixels, stride, top, left, bottom, right, dst):
    """Downscale box [top, bottom) x [left, right) of `pixels` (flat RGB rows of `stride` pixels) into
    dst (out_h x out_w x 3, C-contiguous) with INTER_AREA weights; -1 when the box is smaller than
    dst either way (then use OpenCV). Callable from numba (ctypes)."""
    return _c_resize_area(pixels.ctypes.data, stride, top, left, bottom, right, dst.ctypes.data,
                          dst.shape[0], dst.shape[1])


def jpeg_layout(data: bytes) -> dict:
    """Restart interval and MCU geometry of a JPEG (for tests and `inspect`)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    out = np.zeros(5, dtype=np.int32)
    spliceable = _c_layout(buf.ctypes.data, buf.size, out.ctypes.data)
    return {"restart_interval": int(out[0]), "mcu_width": int(out[1]), "mcu_height": int(out[2]),
            "height": int(out[3]), "width": int(out[4]), "spliceable": bool(spliceable)}


def decode_box_numpy(data: bytes, box, out_size, flags: int = ALL_LEVERS) -> np.ndarray:
    """Python entry (tests, bench): the out_size RGB crop of box=(y, x, h, w) of a JPEG."""
    import cv2

    buf = np.frombuffer(data, dtype=np.uint8)
    img_h, img_w = _jpeg_size(data)
    dst = np.empty(img_h * img_w * 3, dtype=np.uint8)
    region = np.zeros(8, dtype=np.int32)
    y, x, h, w = (int(v) for v in box)
    rc = decode_crop(buf, img_h, img_w, y, x, h, w, out_size[0], out_size[1], flags, dst, region)
    if rc < 0:
        raise ValueError(f"JPEG decode failed (code {rc})")
    top, left, bottom, right, rows, cols = (int(v) for v in region[:6])
    if flags & RESIZE:
        out = np.empty((out_size[0], out_size[1], 3), np.uint8)
        if resize_area(dst, cols, top, left, bottom, right, out) == 0:
            return out
    pixels = dst[:rows * cols * 3].reshape(rows, cols, 3)[top:bottom, left:right]
    return cv2.resize(pixels, (out_size[1], out_size[0]), interpolation=cv2.INTER_AREA)


def _jpeg_size(data: bytes):
    info = jpeg_layout(data)
    if info["height"] == 0:  # not parsed (e.g. progressive): ask OpenCV
        import cv2

        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        return img.shape[0], img.shape[1]
    return info["height"], info["width"]


class CropFirstRandomResizedCrop(ResizedCropRGBImageDecoder):
    """Drop-in for ffcv's RandomResizedCropRGBImageDecoder: same crop distribution (ffcv's sampler,
    drawn before decoding instead of after), less work per JPEG. `flags` selects the levers."""

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flags: int = ALL_LEVERS):
        super().__init__(output_size)
        self.scale, self.ratio, self.flags = scale, ratio, int(flags)

    @property
    def get_crop_generator(self):
        return get_random_crop

    def declare_state_and_memory(self, previous_state):
        state, (out_query, temp_query) = super().declare_state_and_memory(previous_state)
        # one int32[8] region record per sample, next to ffcv's per-sample scratch buffer
        return state, (out_query, temp_query, AllocationQuery((8,), np.dtype("<i4")))

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        decode_crop_c = Compiler.compile(decode_crop)
        resize_area_c = Compiler.compile(resize_area)
        fast_resize = bool(self.flags & RESIZE)
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(get_random_crop)
        scale, ratio = np.array(self.scale), np.array(self.ratio)
        flags = np.uint32(self.flags)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, regions = my_storage
            out_h = np.uint32(destination.shape[1])
            out_w = np.uint32(destination.shape[2])
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                if field["mode"] == jpg:
                    temp = temp_storage[dst_ix]
                    region = regions[dst_ix]
                    rc = decode_crop_c(image_data, height, width, np.uint32(i), np.uint32(j),
                                       np.uint32(h), np.uint32(w), out_h, out_w, flags, temp, region)
                    if rc >= 0:
                        rows, cols = region[4], region[5]
                        if not fast_resize or resize_area_c(
                                temp, cols, region[0], region[1], region[2], region[3],
                                destination[dst_ix]) != 0:
                            pixels = temp[:rows * cols * 3].reshape(rows, cols, 3)
                            resize_crop_c(pixels, region[0], region[2], region[1], region[3],
                                          destination[dst_ix])
                    else:  # not decodable by libjpeg: ffcv's TurboJPEG path, as the stock decoder
                        imdecode_c(image_data, temp, height, width, height, width, 0, 0, 1, 1,
                                   False, False)
                        pixels = temp[:3 * height * width].reshape(height, width, 3)
                        resize_crop_c(pixels, i, i + h, j, j + w, destination[dst_ix])
                elif not fast_resize or resize_area_c(image_data, width, i, j, i + h, j + w,
                                                      destination[dst_ix]) != 0:
                    pixels = image_data.reshape(height, width, 3)
                    resize_crop_c(pixels, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode

