"""Image decoding with errors that name the file.

A corrupt, truncated or empty image raises :class:`ImageLoadError` with the path and what was
expected, instead of a traceback from deep inside PIL. CMYK, grayscale, RGBA and palette
images are converted to RGB, not rejected.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple, Union

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageLoadError(OSError):
    """An image file could not be read or decoded."""


def _draft_request(size, resize):
    """The size a decode must keep so that ``resize`` still down-samples, or None for no draft."""
    width, height = size
    if isinstance(resize, int):
        short = min(width, height)
        return math.ceil(width * resize / short), math.ceil(height * resize / short)
    return int(resize[1]), int(resize[0])


def decode_cropped(path: str | os.PathLike, resize: Optional[Union[int, Sequence[int]]] = None, bottom_crop: int = 0,
                   box: Optional[Tuple[float, float, float, float]] = None) -> Image.Image:
    """Decode ``path`` as every loader does before its transforms, for training, test and prediction alike.

    Large JPEGs are draft-decoded for ``resize`` (see :func:`decode_rgb`) unless a ``box`` (left, upper,
    right, lower in stored pixels) must stay exact; ``bottom_crop`` stored rows are removed (FGVC-Aircraft's
    copyright banner), then the box is cropped.
    """
    image, scale = decode_rgb(path, None if box is not None else resize)
    width, height = image.size
    bottom = height - round(bottom_crop * scale)
    if box is not None:
        left, upper, right, lower = box
        return image.crop((max(0, round(left)), max(0, round(upper)), min(width, round(right)), min(bottom, round(lower))))
    return image.crop((0, 0, width, bottom)) if bottom_crop else image


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully and return it as an RGB PIL image."""
    return decode_rgb(path)[0]


def decode_rgb(path: str | os.PathLike, resize: Optional[Union[int, Sequence[int]]] = None) -> Tuple[Image.Image, float]:
    """Decode ``path`` as RGB; returns ``(image, scale)`` with scale = decoded size / stored size.

    When ``resize`` is given and a JPEG is more than twice that target, it is decoded with
    ``Image.draft`` at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the target: the
    transforms resize it anyway, and skipping the discarded resolution is much faster.
    """
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
            stored_width = img.size[0]
            if resize is not None and img.format == "JPEG":
                request = _draft_request(img.size, resize)
                if img.size[0] > 2 * request[0] and img.size[1] > 2 * request[1]:
                    img.draft("RGB", request)
            img.load()  # decode now, so truncation is found here and not later in a worker
            return img.convert("RGB"), img.size[0] / stored_width
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{path}: not a readable image; expected one of "
                             f"{', '.join(IMAGE_EXTENSIONS)}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"{path}: corrupt or truncated image ({err})") from err
