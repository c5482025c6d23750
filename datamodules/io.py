"""Image decoding with errors that name the file.

A corrupt, truncated or empty image, and one larger than PIL's decompression-bomb limit, raises
:class:`ImageLoadError` with the file (or shard and sample) and what was expected, instead of a traceback from
deep inside PIL. CMYK, grayscale, RGBA and palette images are converted to RGB, not rejected; 16-bit grayscale
is scaled to 8 bits (value × 255 / 65535, rounded) rather than clipped. The EXIF orientation is ignored unless
``exif_transpose`` is asked for (the benchmark datasets are read without it, as their official code reads them).
"""
from __future__ import annotations

import io
import math
import os
import re
from typing import BinaryIO, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# PIL's modes for one 16-bit channel; a PNG opened as "I" is 16-bit too (the format has no 32-bit grey).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

# EXIF orientation -> the transposition that shows the image upright, as PIL.ImageOps.exif_transpose applies it.
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_EXIF_ORIENTATION = 0x0112


class ImageLoadError(OSError):
    """An image file could not be read or decoded."""


def _draft_request(size, resize):
    """The size a decode must keep so that ``resize`` still down-samples, or None for no draft."""
    width, height = size
    if isinstance(resize, int):
        short = min(width, height)
        return math.ceil(width * resize / short), math.ceil(height * resize / short)
    return int(resize[1]), int(resize[0])


def decode_cropped(path: str | os.PathLike | bytes, resize: Optional[Union[int, Sequence[int]]] = None,
                   bottom_crop: int = 0, box: Optional[Tuple[float, float, float, float]] = None,
                   exif_transpose: bool = False, name: str = "image") -> Image.Image:
    """Decode ``path`` as every loader does before its transforms, for training, test and prediction alike
    (``path`` may be the file's bytes, received by a server: errors then name it ``name``).

    Large JPEGs are draft-decoded for ``resize`` (see :func:`decode_rgb`) unless a ``box`` (left, upper,
    right, lower in stored pixels) must stay exact; ``bottom_crop`` stored rows are removed (FGVC-Aircraft's
    copyright banner), then the box is cropped. With ``exif_transpose`` the result is then turned upright by its
    EXIF orientation (boxes and banner rows are in stored pixels, so they are cut first).
    """
    target = None if box is not None else resize
    if isinstance(path, (bytes, bytearray)):
        if not path:
            raise ImageLoadError(f"{name}: empty (0 bytes); expected an image ({', '.join(IMAGE_EXTENSIONS)})")
        image, scale, orientation = _decode(io.BytesIO(path), name, target, exif_transpose)
    else:
        image, scale, orientation = _decode_path(path, target, exif_transpose)
    width, height = image.size
    bottom = height - round(bottom_crop * scale)
    if box is not None:
        left, upper, right, lower = box
        image = image.crop((max(0, round(left)), max(0, round(upper)),
                            min(width, round(right)), min(bottom, round(lower))))
    elif bottom_crop:
        image = image.crop((0, 0, width, bottom))
    return _upright(image, orientation)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully and return it as an RGB PIL image."""
    return decode_rgb(path)[0]


def decode_rgb(path: str | os.PathLike, resize: Optional[Union[int, Sequence[int]]] = None,
               exif_transpose: bool = False) -> Tuple[Image.Image, float]:
    """Decode ``path`` as RGB; returns ``(image, scale)`` with scale = decoded size / stored size.

    When ``resize`` is given and a JPEG is more than twice that target, it is decoded with
    ``Image.draft`` at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the target: the
    transforms resize it anyway, and skipping the discarded resolution is much faster. With ``exif_transpose``
    the image is turned upright by its EXIF orientation (as ``PIL.ImageOps.exif_transpose``).
    """
    image, scale, orientation = _decode_path(path, resize, exif_transpose)
    return _upright(image, orientation), scale


def decode_bytes(data: bytes, name: str) -> Image.Image:
    """Decode an image held in memory (a shard sample) as RGB; errors name it as ``name``."""
    if not data:
        raise ImageLoadError(f"{name}: empty (0 bytes); expected an image")
    return _decode(io.BytesIO(data), name, None, False)[0]


def _decode_path(path, resize, exif_transpose: bool) -> Tuple[Image.Image, float, int]:
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise ImageLoadError(f"{path}: image file not found ({err.strerror})") from err
    if size == 0:
        raise ImageLoadError(f"{path}: file is empty (0 bytes); expected an image "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
    return _decode(path, path, resize, exif_transpose)


def _decode(source: Union[str, BinaryIO], name: str, resize, exif_transpose: bool) -> Tuple[Image.Image, float, int]:
    """``(RGB image as stored, decoded size / stored size, EXIF orientation or 1)``; errors name ``name``."""
    try:
        with Image.open(source) as img:
            stored_width = img.size[0]
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1) if exif_transpose else 1
            if resize is not None and img.format == "JPEG":
                request = _draft_request(img.size, resize)
                if orientation in (5, 6, 7, 8):  # the target is upright: its width lies along the stored height
                    request = request[::-1]
                if img.size[0] > 2 * request[0] and img.size[1] > 2 * request[1]:
                    img.draft("RGB", request)
            img.load()  # decode now, so truncation is found here and not later in a worker
            return _to_rgb(img), img.size[0] / stored_width, orientation
    except Image.DecompressionBombError as err:
        # PIL refuses (before decoding) images of more than twice MAX_IMAGE_PIXELS: a few bytes of PNG or GIF can
        # claim gigabytes of pixels. It is not an OSError, so without this it would escape skip_corrupt.
        found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(err))
        pixels, limit = (found.groups() if found else ("too many", 2 * (Image.MAX_IMAGE_PIXELS or 0)))
        raise ImageLoadError(f"{name}: image of {pixels} pixels, more than PIL's decompression-bomb limit of {limit} "
                             f"pixels (2 × PIL.Image.MAX_IMAGE_PIXELS); expected a smaller image (raise "
                             f"PIL.Image.MAX_IMAGE_PIXELS if it is genuine)") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{name}: not a readable image; expected one of "
                             f"{', '.join(IMAGE_EXTENSIONS)}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({err})") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; one 16-bit channel is scaled to 8 bits first (PIL's own conversion clips it at 255: nearly white)."""
    if img.mode in _SIXTEEN_BIT_MODES or (img.mode == "I" and img.format == "PNG"):
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # value × 255 / 65535, rounded (never a tie)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENTATIONS.get(orientation)
    return image.transpose(method) if method is not None else image
