"""ILSVRC2012 (or any image-classification tree) -> FFCV `.beton`, with the class list beside it.

The package, by concern: `options` (every option declared once, checked into one frozen
`WriterOptions`), `sources` (an index of the input, one module per layout), `encode` (one image),
`beton` (ffcv's file layout), `workers` (the parallel write), `install` (nothing half-written),
`core` (`write_dataset`, in that order), `cli` (`ffcv-imagenet write`).

Inputs, told apart by what is at `data_dir`:

- an ImageFolder tree `<data_dir>/<class>/**/*.{JPEG,jpg,jpeg,png}` (any class folder names);
- a flat folder of images plus `val_labels` (the raw ILSVRC2012 val layout);
- a tar archive, read in place (never unpacked): either a tar of per-class tars
  (`ILSVRC2012_img_train.tar`, the class is the inner tar's name) or a tar of images
  (`ILSVRC2012_img_val.tar`, labelled by `val_labels`; images under folders inside the tar take
  the folder name as class when no `val_labels` is given). `data_dir` may be the tar itself or a
  folder holding `ILSVRC2012_img_<split>.tar` (or a single `*.tar`) and no images.
  Tars must be uncompressed (the ILSVRC2012 ones are): the writer indexes member offsets once,
  then every worker reads its images with `pread`, so decoding is parallel and in any order.

`val_labels` formats (the image is matched by file name without folder and extension):

- Kaggle's `LOC_val_solution.csv`: header `ImageId,PredictionString`; the first token of the
  prediction string is the wnid;
- text lines `<filename> <label>` where every label is a class index (Caffe's `val.txt`) or every
  label is a wnid. Indices only mean something relative to a class list, so index labels need
  `classes` (the ordered wnid list they index); without it the writer refuses.

Labels: the position of the image's class in the class list. The class list is `classes` when
given (a file of wnids one a line, first token per line, `#` comments allowed, e.g.
`LOC_synset_mapping.txt`; or a `.beton`/`.meta.json` written by this tool, whose wnids are reused),
otherwise the sorted class names found in the input (folder names, an empty class folder
included; inner tar names; or the wnids of the labels file). Input classes missing from the list
are an error that names them.

`subset=N` keeps the first N images of every class by sorted file name: balanced, deterministic.

Images are decoded with Pillow (greyscale, CMYK, palette, PNG saved as .JPEG all become RGB),
downscaled here so that the longer side is at most `max_resolution` px (JPEG DCT scaling to the
nearest size >= target, then OpenCV area filter), then stored by ffcv's `RGBImageField` either
raw or as JPEG. Which samples are JPEG is decided here, deterministically:
raw = none, jpg = all, smart = those whose raw RGB size H*W*3 exceeds `smart_threshold` bytes
(ffcv's rule), proportion = exactly round(compress_probability * N) samples chosen by a seeded
permutation (ffcv draws each sample independently instead).

Nothing half-written: samples go to `.<name>.partial-<pid>` in the destination folder; when
complete it is flushed, the metadata file is written, then the partial is renamed onto the
destination. So a `.beton` at the destination always has its metadata (the reverse, a metadata
file left after a crash with no `.beton`, is harmless). Ctrl-C / SIGTERM / errors delete the
partial; after a SIGKILL only the hidden partial remains, removed by the next write to the same
folder. Before any image is written the output size is estimated from ~20 sampled images and the
write is refused when the destination's free space is smaller.
"""

from .cli import main, parse_args  # noqa: F401
from .core import format_summary, write, write_dataset  # noqa: F401
from .encode import encode_jpeg, restart_mcus, target_size  # noqa: F401
from .options import (COMMAND, OPTIONS, WriterError, WriterOptions,  # noqa: F401
                      check_options)
from .sources import index_input  # noqa: F401
