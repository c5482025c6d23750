"""One request to ``finegrained serve``: the image it carries, or the one-line reason it is refused.

Two forms are accepted on ``POST /predict``:

* ``multipart/form-data`` with the image file in the field ``image`` (``curl -F image=@photo.jpg``);
* ``application/json``: ``{"image": "<base64 of the image file>"}`` (line breaks and a ``data:`` URI prefix are
  allowed).

A bad request is a :class:`BadRequest` (HTTP status and message); the server answers it with that status and
``{"error": message}`` and keeps serving the others, also those batched with it.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

FIELD = "image"
EXPECTED = ('expected a multipart form with the image file in the field "image", or a JSON object '
            '{"image": "<base64 of the image file>"}')


@dataclass
class BadRequest(Exception):
    status: int
    message: str

    def __str__(self) -> str:
        return self.message


def image_bytes(payload, max_bytes: int) -> bytes:
    """The image file's bytes in a parsed request body (a form or a JSON value), at most ``max_bytes``."""
    if isinstance(payload, dict):
        value = payload.get(FIELD)
        if not isinstance(value, str) or not value:
            raise BadRequest(400, f"no {FIELD!r} in the JSON body; {EXPECTED}")
        if len(value) > (max_bytes + 2) // 3 * 4 + 4:
            raise BadRequest(413, f"image of more than {max_bytes} bytes; the server accepts at most "
                                  f"{max_bytes} bytes")
        value = re.sub(r"\s+", "", re.sub(r"^data:[^,]*;base64,", "", value, count=1))  # line breaks, a data: URI
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"the JSON field {FIELD!r} is not base64; {EXPECTED}") from None
    elif hasattr(payload, "getlist"):  # a form (starlette's FormData)
        values = payload.getlist(FIELD)
        if len(values) != 1 or not hasattr(values[0], "file"):
            fields = ", ".join(sorted(set(payload.keys()))) or "none"
            raise BadRequest(400, f"no single file in the form field {FIELD!r} (fields: {fields}); {EXPECTED}")
        upload = values[0]
        upload.file.seek(0)
        data = upload.file.read(max_bytes + 1)
    else:
        raise BadRequest(400, f"the body is neither a form nor a JSON object; {EXPECTED}")
    if len(data) > max_bytes:
        raise BadRequest(413, f"image of more than {max_bytes} bytes; the server accepts at most {max_bytes} "
                              f"bytes")
    if not data:
        raise BadRequest(400, "the image is empty (0 bytes)")
    return data


def resized_pixels(width: int, height: int, resize) -> int:
    """Pixels of a ``width`` × ``height`` image once resized as the preprocessing does (``resize``: the shorter
    side, or [h, w])."""
    if isinstance(resize, int):
        short, long = sorted((width, height))
        return resize * math.ceil(resize * long / max(short, 1))
    return int(resize[0]) * int(resize[1])


def check_image_size(data: bytes, max_pixels: int, resize=None) -> None:
    """Refuse, from the file's header alone, what is not an image, claims more than ``max_pixels`` pixels (a
    decompression bomb: a few kilobytes that would decode to gigabytes), or would have more once resized by
    ``resize`` (a thin image: 1 × 100,000 pixels resized to a shorter side of 108 is 108 × 10.8 million)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is the server's
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError as err:  # PIL refuses more than twice its own limit before we can
        raise BadRequest(413, f"{err}; the server accepts at most {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadRequest(400, "not an image PIL can read (JPEG, PNG, WebP, BMP, TIFF, ...)") from None
    if width * height > max_pixels:
        raise BadRequest(413, f"image of {width}×{height} = {width * height} pixels; the server accepts at most "
                              f"{max_pixels} pixels")
    if resize is not None and resized_pixels(width, height, resize) > max_pixels:
        raise BadRequest(413, f"image of {width}×{height} pixels would have {resized_pixels(width, height, resize)} "
                              f"once resized (resize {resize}); the server accepts at most {max_pixels} pixels")
