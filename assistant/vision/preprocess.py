"""Image preprocessing shared by the vision encoders.

The vision-language models here were trained on square images, so a camera frame is padded
to a square (centred, with a flat colour: mid-grey, 127.5, like the reference demos) rather
than stretched or cropped, then resized to the encoder's input size. Normalisation (mean and
std) is inside the exported encoder, so the result stays uint8 RGB, NHWC with a batch axis.
"""

from __future__ import annotations

import cv2
import numpy as np


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 \
            or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        what = (f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray)
                else type(rgb).__name__)
        raise ValueError(f"expected an RGB image as a uint8 array of shape (H, W, 3), got {what}")


def pad_value(color: float) -> int:
    """The uint8 grey level for a pad colour: 127.5 rounds to 128, as OpenCV's cvRound does."""
    return int(np.clip(np.rint(color), 0, 255))


def pad_to_square(rgb: np.ndarray, color: float = 127.5) -> np.ndarray:
    """The image centred on a square of side max(H, W) filled with ``color``.

    A square image is returned as is (not copied).
    """
    _check_rgb(rgb)
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    side = max(h, w)
    out = np.full((side, side, 3), pad_value(color), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = rgb
    return out


def resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize to (height, width); the image is returned as is if already that size."""
    _check_rgb(rgb)
    if width <= 0 or height <= 0:
        raise ValueError(f"resize target must be positive, got {width}x{height}")
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)


def prepare(rgb: np.ndarray, width: int, height: int, color: float = 127.5) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> padded, resized, contiguous uint8 (1, height, width, 3)."""
    square = pad_to_square(rgb, color)
    out = resize(square, width, height)
    return np.ascontiguousarray(out[np.newaxis])
