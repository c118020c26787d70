"""Image and video files behind the camera interface (tests, demos, machines with no camera).

``ImageCamera`` always shows the same picture. ``VideoCamera`` plays its file in real time
from ``open()``: a snapshot is the frame at the elapsed wall-clock time, and the video loops
at its end, as if a camera were filming the scene the file recorded.

A video file behaves like a camera that can be unplugged: once it has been opened, a file
that vanishes makes ``snapshot()`` and ``open()`` raise DeviceError (the vision stage then
answers without the picture and reopens the camera at the next question), and a file that
is back, or replaced by a new one, is played from then on.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from assistant.errors import DeviceError, InputError
from assistant.vision.base import Camera

log = logging.getLogger(__name__)

# Beyond this many frames ahead, seeking beats decoding every frame in between.
_SEEK_AHEAD_FRAMES = 60


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path}: {what} file not found; check camera.source")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an {what} file; check camera.source")


class ImageCamera(Camera):
    """A still image as the camera: every snapshot is that image (RGB)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = f"image:{self.path}"
        self._rgb: np.ndarray | None = None

    def open(self) -> None:
        if self._rgb is not None:
            return
        _check_file(self.path, "image")
        bgr = cv2.imread(str(self.path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f"{self.path}: not an image OpenCV can read (corrupt, or not "
                                 "JPEG/PNG/BMP/WebP/TIFF); check camera.source")
        self._rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        log.info("camera %s: %dx%d still image", self.name, bgr.shape[1], bgr.shape[0])

    def snapshot(self) -> np.ndarray:
        self.open()
        assert self._rgb is not None
        return self._rgb.copy()  # callers may draw on it

    def close(self) -> None:
        self._rgb = None


class VideoCamera(Camera):
    """A video file played in real time from ``open()``, looping at the end.

    ``clock`` (seconds, monotonic) is injectable so tests can step time.
    """

    def __init__(self, path: str | os.PathLike, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.name = f"video:{self.path}"
        self.clock = clock
        self.fps = 0.0
        self.frame_count = 0  # 0 until known (some containers do not say)
        self._cap: cv2.VideoCapture | None = None
        self._pos = 0  # index of the frame the next grab() returns
        self._last: np.ndarray | None = None  # the last retrieved frame (BGR) and its index
        self._last_index = -1
        self._start = 0.0
        self._lock = threading.Lock()  # snapshots may come from several worker threads
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the open file
        self._opened_once = False  # from then on a missing file is a device gone, not a typo

    def _gone(self) -> DeviceError:
        return DeviceError(f"camera {self.name}: the video file {self.path} is gone (deleted or "
                           "moved); answering without the picture until it is back "
                           "(check camera.source)")

    def _stat_id(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def open(self) -> None:
        if self._cap is not None:
            return
        if self._opened_once and not self.path.is_file():
            raise self._gone()
        _check_file(self.path, "video")
        file_id = self._stat_id()
        cap = cv2.VideoCapture(str(self.path))
        ok, first = cap.read() if cap.isOpened() else (False, None)
        if not ok:
            cap.release()
            # Once it played, a bad file is a camera failing (it may still be being copied).
            error = DeviceError if self._opened_once else InputError
            raise error(f"{self.path}: not a video OpenCV can decode (corrupt, or an "
                        "unsupported format); check camera.source")
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps and math.isfinite(fps) and fps > 0 else 25.0
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count = count if count > 0 else 0
        self._cap, self._pos, self._last, self._last_index = cap, 1, first, 0
        self._file_id, self._opened_once = file_id, True
        self._start = self.clock()
        log.info("camera %s: %dx%d, %.1f fps, %s frames, playing in real time", self.name,
                 first.shape[1], first.shape[0], self.fps, self.frame_count or "unknown")

    def current_index(self) -> int:
        """The frame index for the time elapsed since open(), wrapped at the end."""
        index = int((self.clock() - self._start) * self.fps)
        return index % self.frame_count if self.frame_count else index

    def snapshot(self) -> np.ndarray:
        self.open()
        # One stat per snapshot: an open file would keep playing after it was deleted, but
        # a camera whose file is gone must say so, and a replaced file must be shown.
        file_id = self._stat_id()
        if file_id is None:
            raise self._gone()
        if file_id != self._file_id:
            log.info("camera %s: the file was replaced; reopening it", self.name)
            with self._lock:
                self.close()
                self.open()
        with self._lock:
            bgr = self._frame_at(self.current_index())
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def _frame_at(self, target: int) -> np.ndarray:
        assert self._cap is not None
        if target == self._last_index and self._last is not None:
            return self._last
        if target < self._pos or target - self._pos > _SEEK_AHEAD_FRAMES:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, target)
            self._pos = target
        while self._pos < target:  # decode (without converting) up to the wanted frame
            if not self._cap.grab():
                return self._wrap(target)
            self._pos += 1
        ok, frame = self._cap.read()
        if not ok:
            return self._wrap(target)
        self._pos += 1
        self._last, self._last_index = frame, target
        return frame

    def _wrap(self, target: int) -> np.ndarray:
        """The file ended before ``target``: now we know its length; loop."""
        if self._pos <= 0 or (self.frame_count and self.frame_count <= self._pos):
            # Even the known length is wrong (a damaged tail); keep showing the last frame.
            assert self._last is not None
            return self._last
        log.debug("camera %s: %d frames (the header said %s)", self.name, self._pos,
                  self.frame_count or "nothing")
        self.frame_count = self._pos
        return self._frame_at(target % self.frame_count)

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()
        self._last = None
        self._last_index = -1
