"""Image decoding with errors that name the file.

A corrupt, truncated or empty image raises :class:`ImageLoadError` with the path and what was
expected, instead of a traceback from deep inside PIL. CMYK, grayscale, RGBA and palette
images are converted to RGB, not rejected.
"""
from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageLoadError(OSError):
    """An image file could not be read or decoded."""


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully and return it as an RGB PIL image."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise ImageLoadError(f"{path}: image file not found ({err.strerror})") from err
    if size == 0:
        raise ImageLoadError(f"{path}: file is empty (0 bytes); expected an image "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncation is found here and not later in a worker
            return img.convert("RGB")
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{path}: not a readable image; expected one of "
                             f"{', '.join(IMAGE_EXTENSIONS)}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"{path}: corrupt or truncated image ({err})") from err
