"""Import ffcv without its start-up tax.

ffcv 1.0.2's `ffcv.fields.rgb_image` builds a two-entry table (`IMAGE_MODES`, 'jpg' -> 0, 'raw' -> 1)
as a numba typed Dict when it is imported, and a typed Dict JIT-compiles numba's dictionary code:
about 2-3 s of every process's start-up, before any data is touched. ffcv only ever reads that
table from Python (never inside compiled code), so a plain dict serves. `preload()` imports ffcv's
image field once with numba.typed.Dict standing in as dict; modules that import ffcv at their top
call it first. Anything else that imports ffcv earlier just pays the usual cost.
"""

import importlib.util
import sys

# What to install when an import is missing: ffcv and OpenCV are extras (pyproject.toml says why).
MISSING = {
    "cv2": "OpenCV is not installed: `pip install opencv-python-headless` on a server or "
           "`pip install opencv-python` on a desktop (either works; never install both)",
    "ffcv": "ffcv is not installed: `pip install 'ffcv-imagenet[ffcv]'` in a fresh environment, or "
            "`pip install --no-deps ffcv==1.0.2` beside opencv-python-headless (its build needs "
            "libturbojpeg and OpenCV headers: see the README's set-up)",
}


def require(*modules: str) -> None:
    """Raise ImportError saying what to install for the first of `modules` that is missing."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise ImportError(f"ffcv-imagenet: {MISSING[name]}", name=name)


def preload() -> None:
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    require("cv2", "ffcv")
    import numba.typed

    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict
    try:
        import ffcv.fields.rgb_image  # noqa: F401
    finally:
        numba.typed.Dict = typed_dict
