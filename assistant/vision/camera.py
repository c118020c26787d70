"""V4L2 cameras through OpenCV, the camera factory, and the list of cameras for `devices`.

A USB camera queues a few frames in the driver, so a plain ``read()`` when a question comes
returns a picture from the past. ``OpenCVCamera`` therefore keeps a reader thread that
``grab()``s every frame as it arrives (cheap: nothing is decoded), and a snapshot is the
first frame grabbed *after* the call, decoded then. The first ``warmup_frames`` after opening
are dropped: a USB camera's auto-exposure starts dark.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import cv2
import numpy as np

from assistant.config import CameraConfig
from assistant.errors import AssistantError, DeviceError
from assistant.vision.base import Camera
from assistant.vision.file_camera import ImageCamera, VideoCamera

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".mjpeg"}

_CLOSE_WAIT_S = 3.0  # how long close() waits for the reader's grab() to return

_CHECK = ("is it plugged in? Is the user in the `video` group (`sudo usermod -aG video $USER`, "
          "then log in again)? `rkvlm-assistant devices` lists the cameras")


def _describe_source(source: Union[int, str]) -> str:
    return f"/dev/video{source}" if isinstance(source, int) else str(source)


class OpenCVCamera(Camera):
    """A V4L2 camera (index or /dev/video path); also opens URLs and video files, untimed.

    ``capture_factory(source, api)`` makes the capture object; tests pass a fake.
    """

    def __init__(self, cfg: CameraConfig, source: Union[int, str, None] = None,
                 capture_factory: Callable[[Any, int], Any] = cv2.VideoCapture,
                 snapshot_timeout_s: float = 5.0):
        src = cfg.source if source is None else source
        if src is None:
            raise AssistantError("OpenCVCamera needs a camera.source")
        if isinstance(src, str) and src.isdigit():
            src = int(src)
        self.cfg = cfg
        self.source: Union[int, str] = src
        self.device = _describe_source(src)
        self.name = f"camera:{self.device}"
        self.snapshot_timeout_s = snapshot_timeout_s
        self._factory = capture_factory
        self._cap: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[concurrent.futures.Future] = []
        self._failure: DeviceError | None = None
        self.frames_grabbed = 0

    def _is_v4l2(self) -> bool:
        return isinstance(self.source, int) or str(self.source).startswith("/dev/")

    def _check_device_node(self) -> None:
        """Say why a /dev/video node cannot be used before OpenCV says something vaguer."""
        path = Path(self.device)
        if not path.exists():
            raise DeviceError(f"camera {self.device} not found: {_CHECK}")
        if not os.access(path, os.R_OK | os.W_OK):
            raise DeviceError(f"camera {self.device}: permission denied; add the user to the "
                              "`video` group (`sudo usermod -aG video $USER`, then log in again)")

    def open(self) -> None:
        if self._cap is not None:
            return
        if self._is_v4l2() and sys.platform.startswith("linux"):
            self._check_device_node()
            api = cv2.CAP_V4L2
        else:
            api = cv2.CAP_ANY
        cap = self._factory(self.source, api)
        if not cap.isOpened():
            cap.release()
            raise DeviceError(f"cannot open camera {self.device}: {_CHECK}")
        if self._is_v4l2():
            self._configure(cap)
        # Drop the dark frames auto-exposure starts with (and check frames come at all).
        for i in range(max(1, self.cfg.warmup_frames)):
            if not cap.grab():
                cap.release()
                raise DeviceError(f"camera {self.device} opened but delivered no frame "
                                  f"(after {i}); is another program using it? {_CHECK}")
        self._cap = cap
        self._failure = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._reader, name="camera-reader", daemon=True)
        self._thread.start()

    def _configure(self, cap: Any) -> None:
        w, h, fps = self.cfg.width, self.cfg.height, self.cfg.fps
        if w * h > 640 * 480:
            # Above VGA, USB 2 cameras only reach their frame rate compressed.
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"MJPG"))
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, w)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, h)
        cap.set(cv2.CAP_PROP_FPS, fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # fewer stale frames queued in the driver
        got = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
               cap.get(cv2.CAP_PROP_FPS))
        log.info("camera %s: %dx%d at %.0f fps (asked %dx%d at %d)", self.device, got[0], got[1],
                 got[2] or 0, w, h, fps)

    # ------------------------------------------------------------------ the reader thread

    def _reader(self) -> None:
        cap = self._cap
        while not self._stop.is_set():
            ok = cap.grab()
            if self._stop.is_set():
                break
            if not ok:
                self._fail(DeviceError(f"camera {self.device} stopped delivering frames "
                                       f"(unplugged?); {_CHECK}"))
                return
            self.frames_grabbed += 1
            with self._lock:
                waiters, self._waiters = self._waiters, []
            if not waiters:
                continue
            ok, bgr = cap.retrieve()
            if not ok or bgr is None:
                error = DeviceError(f"camera {self.device} delivered a frame that cannot be "
                                    "decoded")
                for w in waiters:
                    w.set_exception(error)
                continue
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            for w in waiters:
                w.set_result(rgb)

    def _fail(self, error: DeviceError) -> None:
        with self._lock:
            self._failure = error
            waiters, self._waiters = self._waiters, []
        log.error("%s", error)
        for w in waiters:
            w.set_exception(error)

    def snapshot(self) -> np.ndarray:
        """The first frame the camera delivers after this call, RGB."""
        self.open()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._failure is not None:
                raise self._failure
            self._waiters.append(future)
        try:
            return future.result(timeout=self.snapshot_timeout_s)
        except concurrent.futures.TimeoutError:
            with self._lock:
                if future in self._waiters:
                    self._waiters.remove(future)
            raise DeviceError(f"camera {self.device} delivered no frame for "
                              f"{self.snapshot_timeout_s:g} s; {_CHECK}") from None

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        cap, self._cap = self._cap, None
        if thread is not None:
            thread.join(timeout=_CLOSE_WAIT_S)  # grab() returns within a frame period
            if thread.is_alive():
                # Releasing the capture under a grab() in progress can crash OpenCV: leave
                # the hung device to the daemon thread rather than risk that.
                log.warning("camera %s: the reader is stuck in the driver; not released",
                            self.device)
                cap = None
        if cap is not None:
            cap.release()
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.set_exception(DeviceError(f"camera {self.device} was closed"))


# ---------------------------------------------------------------------------- factory

def make_camera(cfg: CameraConfig, resolve_path: Callable[[str], Any] = Path) -> Camera | None:
    """The camera camera.source asks for, not opened yet; None when it is null.

    An int, a digit string or a /dev path is a V4L2 device; rtsp:// and http(s):// URLs go
    to OpenCV; otherwise the extension picks an image or a video file (``resolve_path``
    makes a relative path relative to the config file, e.g. ``Config.path``).
    """
    src = cfg.source
    if src is None:
        return None
    if isinstance(src, int) or (isinstance(src, str) and (src.isdigit() or src.startswith("/dev/"))):
        return OpenCVCamera(cfg)
    if re.match(r"^(rtsp|rtmp|https?)://", src):
        return OpenCVCamera(cfg)
    path = Path(resolve_path(src))
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return ImageCamera(path)
    if ext in VIDEO_EXTENSIONS:
        return VideoCamera(path)
    raise AssistantError(
        f"camera.source: {src!r} is neither a V4L2 camera (0 or /dev/video0) nor an image "
        f"({', '.join(sorted(IMAGE_EXTENSIONS))}) or video ({', '.join(sorted(VIDEO_EXTENSIONS))}) "
        "file")


def open_camera(cfg: CameraConfig, resolve_path: Callable[[str], Any] = Path) -> Camera | None:
    """``make_camera`` and open it (blocking: call from a worker thread)."""
    camera = make_camera(cfg, resolve_path)
    if camera is not None:
        camera.open()
    return camera


# ---------------------------------------------------------------------------- listing

@dataclass(frozen=True)
class CameraInfo:
    path: str  # /dev/videoN, what camera.source accepts
    name: str  # the driver's name for it
    index: int  # N

    def __str__(self) -> str:
        return f"{self.path}  {self.name}  (camera.source: {self.index} or {self.path})"


def list_cameras(dev_dir: str | os.PathLike = "/dev",
                 sys_dir: str | os.PathLike = "/sys/class/video4linux") -> list[CameraInfo]:
    """Every /dev/videoN with its name from sysfs, by N.

    A USB camera usually has two nodes (video and metadata); the first is the camera.
    """
    cams = []
    for entry in Path(dev_dir).glob("video*"):
        m = re.fullmatch(r"video(\d+)", entry.name)
        if not m:
            continue
        try:
            name = (Path(sys_dir) / entry.name / "name").read_text().strip()
        except OSError:
            name = "?"
        cams.append(CameraInfo(str(entry), name, int(m.group(1))))
    return sorted(cams, key=lambda c: c.index)
