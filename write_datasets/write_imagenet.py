"""Write one ILSVRC2012 split to .beton: a thin entry point to `ffcv-imagenet write`.

Same options as `ffcv-imagenet write --help`, e.g.

    python write_datasets/write_imagenet.py --cfg.split=val --cfg.data_dir=ILSVRC2012_img_val.tar \
        --cfg.val_labels=LOC_val_solution.csv --cfg.classes=train_500_0.5_90.beton \
        --cfg.write_path=val_500_0.5_90.beton --cfg.max_resolution=500 \
        --cfg.write_mode=proportion --cfg.compress_probability=0.5 --cfg.jpeg_quality=90

`write_imagenet.sh` beside this file writes both splits with the recommended parameters.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run from a checkout without installing: make the package next to this folder importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ffcv_imagenet.writer import main

    sys.exit(main(sys.argv[1:]))
