"""Pictures in chat requests: data: URLs, PNG or JPEG, checked before they are decoded.

The size a picture's header announces is read without decoding it, so a decompression bomb
is refused for nothing; http(s) URLs are refused (the board is offline by design).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct

import numpy as np

from assistant.http.errors import bad

_IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")
_DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.S)


def image_size(data: bytes, param: str = "messages") -> tuple[str, int, int]:
    """(format, width, height) from a PNG's IHDR or a JPEG's SOF header, without decoding."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise bad("the PNG image is corrupt (no IHDR header)", param, "invalid_image")
        w, h = struct.unpack(">II", data[16:24])
        return "png", w, h
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                break
            marker = data[i + 1]
            if marker == 0xFF:                       # fill byte
                i += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:   # no length
                i += 2
                continue
            if marker in (0xD9, 0xDA):               # end of image / scan before a frame header
                break
            seglen = struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if i + 9 > len(data):
                    break
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return "jpeg", w, h
            i += 2 + seglen
        raise bad("the JPEG image is corrupt (no frame header)", param, "invalid_image")
    raise bad("the image is neither PNG nor JPEG (send a data:image/png or data:image/jpeg "
              "URL)", param, "invalid_image")


def parse_image_url(url: str, param: str = "messages") -> bytes:
    """The bytes of a data: URL (base64 PNG or JPEG); ApiError for anything else."""
    if url.startswith(("http://", "https://")):
        raise bad("image URLs over http(s) are not fetched: the assistant is offline by "
                  "design; send the picture inline as a data:image/jpeg;base64,... URL",
                  param, "image_url_not_supported")
    m = _DATA_URL.match(url)
    if m is None:
        raise bad("image_url must be a data: URL (data:image/jpeg;base64,...)", param,
                  "invalid_image_url")
    mtype = m["type"].strip().lower()
    if mtype not in _IMAGE_TYPES:
        raise bad(f"unsupported image type {mtype or '(none)'!r}: send image/png or image/jpeg",
                  param, "invalid_image_format")
    if "base64" not in [p.strip().lower() for p in m["params"].split(";")]:
        raise bad("the image data: URL must be base64 encoded (data:image/png;base64,...)",
                  param, "invalid_image_url")
    try:
        return base64.b64decode(re.sub(r"\s+", "", m["data"]), validate=True)
    except (binascii.Error, ValueError):
        raise bad("the image data: URL holds invalid base64", param,
                  "invalid_image_url") from None


def check_image(data: bytes, max_pixels: int, param: str = "messages") -> tuple[str, int, int]:
    """Refuse a picture whose header announces more than ``max_pixels``: before any decode,
    so a decompression bomb costs nothing."""
    fmt, w, h = image_size(data, param)
    if w <= 0 or h <= 0:
        raise bad(f"the {fmt.upper()} image announces a size of {w}x{h}", param,
                  "invalid_image")
    if w * h > max_pixels:
        raise bad(f"the image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} "
                  f"(http.max_image_pixels): send a smaller picture", param,
                  "image_too_large")
    return fmt, w, h


def decode_image(data: bytes, max_pixels: int, param: str = "messages") -> np.ndarray:
    """PNG/JPEG bytes -> RGB uint8 (H, W, 3). Blocking: run in a worker thread."""
    import cv2

    check_image(data, max_pixels, param)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.ndim != 3 or bgr.shape[0] * bgr.shape[1] > max_pixels:
        raise bad("the image could not be decoded (corrupt or truncated PNG/JPEG)", param,
                  "invalid_image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
