"""`python -m ffcv_imagenet.writer` = `ffcv-imagenet write`."""

import sys

from .cli import main

sys.exit(main())
