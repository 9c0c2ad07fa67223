"""A small procedurally drawn image-classification dataset, written as real JPEG files.

Ten classes of shapes and textures (disc, ring, square, triangle, cross, star, stripes in two
directions, checkerboard, dots) with random colours, positions, scales, rotations, backgrounds and
noise, so that a ResNet has to learn shape rather than colour. Used by the demo and by the tests;
the layout is ImageFolder: `<root>/<class>/<class>_<index>.JPEG`.
"""

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("checker", "cross", "disc", "dots", "hstripes", "ring", "square", "star", "triangle", "vstripes")


def _random_colour(rng, avoid=None):
    while True:
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if avoid is None or sum(abs(a - b) for a, b in zip(colour, avoid)) > 150:
            return colour


def _polygon(cx, cy, radius, n_points, angle, inner=None):
    points = []
    steps = n_points * (2 if inner else 1)
    for k in range(steps):
        r = radius if (inner is None or k % 2 == 0) else radius * inner
        a = angle + 2 * math.pi * k / steps
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def draw_image(class_name: str, size_px: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of `class_name`, `size_px` square."""
    bg = _random_colour(rng)
    fg = _random_colour(rng, avoid=bg)
    img = Image.new("RGB", (size_px, size_px), bg)
    draw = ImageDraw.Draw(img)
    s = size_px
    radius = s * rng.uniform(0.18, 0.42)
    cx = rng.uniform(radius, s - radius)
    cy = rng.uniform(radius, s - radius)
    angle = rng.uniform(0, 2 * math.pi)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if class_name == "disc":
        draw.ellipse(box, fill=fg)
    elif class_name == "ring":
        draw.ellipse(box, outline=fg, width=max(2, int(radius * rng.uniform(0.2, 0.35))))
    elif class_name == "square":
        draw.polygon(_polygon(cx, cy, radius, 4, angle), fill=fg)
    elif class_name == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=fg)
    elif class_name == "star":
        draw.polygon(_polygon(cx, cy, radius, 5, angle, inner=0.45), fill=fg)
    elif class_name == "cross":
        w = max(2, int(radius * rng.uniform(0.25, 0.45)))
        for a in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(a), radius * math.sin(a)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fg, width=w)
    elif class_name in ("hstripes", "vstripes"):
        period = max(4, int(s * rng.uniform(0.08, 0.2)))
        width = max(2, period // 2)
        for p in range(-s, 2 * s, period):
            if class_name == "hstripes":
                draw.rectangle((0, p, s, p + width), fill=fg)
            else:
                draw.rectangle((p, 0, p + width, s), fill=fg)
    elif class_name == "checker":
        cell = max(3, int(s * rng.uniform(0.08, 0.2)))
        for y in range(0, s, cell):
            for x in range(0, s, cell):
                if (x // cell + y // cell) % 2 == 0:
                    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fg)
    elif class_name == "dots":
        for _ in range(int(rng.integers(6, 16))):
            r = s * rng.uniform(0.03, 0.07)
            x, y = rng.uniform(r, s - r, 2)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fg)
    else:
        raise ValueError(f"unknown class {class_name!r}; expected one of {', '.join(CLASSES)}")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    pixels = np.asarray(img, dtype=np.int16)
    pixels = pixels + rng.normal(0, rng.uniform(3, 18), pixels.shape).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_image_folder(root, images_per_class: int, size_px: int = 64, classes=CLASSES,
                      seed: int = 0, quality: int = 90) -> Path:
    """Write `images_per_class` JPEGs of each class under `root/<class>/`; returns `root`.

    Deterministic for a given seed. Existing files are overwritten.
    """
    root = Path(root)
    for class_index, class_name in enumerate(classes):
        folder = root / class_name
        os.makedirs(folder, exist_ok=True)
        rng = np.random.default_rng([seed, class_index])
        for i in range(images_per_class):
            draw_image(class_name, size_px, rng).save(folder / f"{class_name}_{i:05d}.JPEG", quality=quality)
    return root


def photo_like(height_px: int, width_px: int, rng: np.random.Generator) -> np.ndarray:
    """A photograph-sized RGB uint8 image whose JPEG costs about what an ImageNet photo costs.

    Smooth colour fields (large-scale structure), a few blurred shapes (edges) and fine texture
    that varies in strength across the image (foliage next to sky), so that entropy-coded size and
    decode time per pixel are near real photos' (about 0.3 bytes/pixel at q90; measured in bench).
    """
    y, x = np.mgrid[0:height_px, 0:width_px].astype(np.float32)
    image = np.zeros((height_px, width_px, 3), np.float32)
    for channel in range(3):
        for _ in range(3):
            fy, fx = rng.uniform(0.2, 3, 2) * 2 * math.pi / np.array([height_px, width_px])
            image[..., channel] += rng.uniform(20, 45) * np.sin(fy * y + fx * x + rng.uniform(0, 6.3))
    image += rng.uniform(70, 170, 3)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 9))):
        r = rng.uniform(0.05, 0.3) * min(height_px, width_px)
        cx, cy = rng.uniform(0, width_px), rng.uniform(0, height_px)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_random_colour(rng))
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=1.0))
    pixels = np.asarray(canvas, dtype=np.float32)
    strength = 3 + 13 * (0.5 + 0.5 * np.sin(x * 2 * math.pi / width_px * rng.uniform(0.5, 2)
                                             + y * 2 * math.pi / height_px * rng.uniform(0.5, 2)))
    texture = rng.normal(0, 1, (height_px, width_px, 1)).astype(np.float32)
    texture = (texture + np.roll(texture, 1, axis=1) + np.roll(texture, 1, axis=0)) / 1.7
    pixels = pixels + strength[..., None] * texture + rng.normal(0, 2, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)
