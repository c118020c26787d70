"""Cameras: image and video files, the OpenCV V4L2 camera, the factory and the device list."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from assistant.config import CameraConfig
from assistant.errors import AssistantError, DeviceError
from assistant.vision.camera import CameraInfo, OpenCVCamera, list_cameras, make_camera, open_camera
from assistant.vision.file_camera import ImageCamera, VideoCamera

W, H = 64, 48  # two 32-pixel halves: whole JPEG blocks, so the greys survive compression


def write_video(path: Path, frames: int = 40, fps: float = 10.0) -> Path:
    """An MJPEG .avi whose frame i shows i in base 16: two grey halves, (i // 16, i % 16)."""
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
    assert out.isOpened()
    for i in range(frames):
        img = np.empty((H, W, 3), np.uint8)
        img[:, : W // 2] = (i // 16) * 16 + 8
        img[:, W // 2:] = (i % 16) * 16 + 8
        out.write(img)
    out.release()
    return path


def frame_index(rgb: np.ndarray) -> int:
    high = round((float(rgb[:, : W // 2].mean()) - 8) / 16)
    low = round((float(rgb[:, W // 2:].mean()) - 8) / 16)
    return high * 16 + low


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------- image

def test_image_camera_returns_rgb(tmp_path):
    bgr = np.zeros((20, 30, 3), np.uint8)
    bgr[:, :, 2] = 255  # red, in OpenCV's BGR order
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), bgr)
    cam = ImageCamera(path)
    cam.open()
    rgb = cam.snapshot()
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 0, 0]
    rgb[:] = 0  # the caller's copy: the next snapshot is untouched
    assert cam.snapshot()[0, 0].tolist() == [255, 0, 0]
    cam.close()
    cam.close()


def test_image_camera_errors(tmp_path):
    with pytest.raises(AssistantError, match="image file not found"):
        ImageCamera(tmp_path / "none.jpg").open()
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(AssistantError, match="not an image OpenCV can read") as e:
        ImageCamera(bad).open()
    assert str(bad) in str(e.value)


# ---------------------------------------------------------------------------- video file

def test_video_camera_plays_in_real_time_and_loops(tmp_path):
    clock = FakeClock()
    cam = VideoCamera(write_video(tmp_path / "v.avi"), clock=clock)
    cam.open()
    assert cam.fps == pytest.approx(10.0) and cam.frame_count == 40
    seen = []
    for t in (0.0, 0.05, 1.05, 1.25, 3.95, 4.25, 4.75, 0.5 + 8.0):
        clock.now = 100.0 + t
        rgb = cam.snapshot()
        assert rgb.shape == (H, W, 3)
        seen.append(frame_index(rgb))
    # 10 fps: frame = int(t * 10) mod 40; backwards (after the loop) and far jumps included.
    assert seen == [0, 0, 10, 12, 39, 2, 7, 5]
    cam.close()


def test_video_camera_snapshot_after_sleeping_is_a_later_frame(tmp_path):
    cam = VideoCamera(write_video(tmp_path / "v.avi", frames=200, fps=10.0))
    cam.open()
    first = frame_index(cam.snapshot())
    time.sleep(0.35)
    later = frame_index(cam.snapshot())
    assert later > first
    cam.close()


def test_video_camera_length_learned_when_the_header_does_not_say(tmp_path):
    clock = FakeClock()
    cam = VideoCamera(write_video(tmp_path / "v.avi", frames=20), clock=clock)
    cam.open()
    cam.frame_count = 0  # as if the container did not say
    clock.now += 2.5  # frame 25 of a 20-frame file
    assert frame_index(cam.snapshot()) == 5
    assert cam.frame_count == 20


def test_video_camera_errors(tmp_path):
    with pytest.raises(AssistantError, match="video file not found"):
        VideoCamera(tmp_path / "none.mp4").open()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(AssistantError, match="not a video OpenCV can decode"):
        VideoCamera(bad).open()


# ---------------------------------------------------------------------------- OpenCVCamera

def test_missing_v4l2_device_is_a_device_error():
    for source in ("/dev/video99", 99):
        cam = OpenCVCamera(CameraConfig(source=source))
        with pytest.raises(DeviceError) as e:
            cam.open()
        msg = str(e.value)
        assert "/dev/video99" in msg and "video` group" in msg and "rkvlm-assistant devices" in msg


class FakeCapture:
    """A cv2.VideoCapture stand-in the test drives frame by frame.

    grab() takes the next frame the test put in `feed` (True = a frame, False = the device
    failed) and reports it on `grabbed`; retrieve() returns frame `index` as a BGR image.
    """

    def __init__(self, source, api, warm_frames: int = 0) -> None:
        self.source, self.api = source, api
        self.feed: queue.Queue = queue.Queue()
        self.grabbed: queue.Queue = queue.Queue()
        self.index = -1
        self.retrieves = 0
        self.settings: dict[int, float] = {}
        self.released = False
        for _ in range(warm_frames):
            self.feed.put(True)

    def isOpened(self) -> bool:
        return True

    def set(self, prop: int, value: float) -> bool:
        self.settings[prop] = value
        return True

    def get(self, prop: int) -> float:
        return self.settings.get(prop, 0.0)

    def grab(self) -> bool:
        ok = self.feed.get()
        if ok:
            self.index += 1
        self.grabbed.put(ok)
        return ok

    def retrieve(self):
        self.retrieves += 1
        bgr = np.zeros((4, 4, 3), np.uint8)
        bgr[..., 0] = self.index  # blue channel = frame index
        return True, bgr

    def release(self) -> None:
        self.released = True


def close_fake(cam: OpenCVCamera, cap: FakeCapture) -> None:
    """close() waits for the reader's grab(): keep the fake camera delivering until it is done."""
    closer = threading.Thread(target=cam.close)
    closer.start()
    while closer.is_alive():
        cap.feed.put(True)
        closer.join(timeout=0.05)


def fake_camera(cfg: CameraConfig, warm_frames: int) -> tuple[OpenCVCamera, list[FakeCapture]]:
    made: list[FakeCapture] = []

    def factory(source, api):
        made.append(FakeCapture(source, api, warm_frames))
        return made[-1]
    return OpenCVCamera(cfg, source="rtsp://camera.test/stream", capture_factory=factory), made


def test_snapshot_is_a_frame_grabbed_after_the_call():
    cam, made = fake_camera(CameraConfig(warmup_frames=3), warm_frames=3)
    cam.open()
    cap = made[0]
    for _ in range(3):  # the warm-up frames were grabbed and dropped
        assert cap.grabbed.get() is True
    for _ in range(5):  # the camera keeps delivering; the reader keeps up without decoding
        cap.feed.put(True)
        assert cap.grabbed.get() is True
    assert cap.retrieves == 0
    index_at_call = cap.index  # frame 7 (0-2 warm-up, 3-7 since)

    result: list[np.ndarray] = []
    taker = threading.Thread(target=lambda: result.append(cam.snapshot()))
    taker.start()
    while taker.is_alive():  # one more frame at a time until the snapshot has one
        cap.feed.put(True)
        cap.grabbed.get()
        taker.join(timeout=0.05)
    rgb = result[0]
    assert rgb[0, 0, 2] > index_at_call  # blue ends up last in RGB
    assert cap.retrieves == 1
    close_fake(cam, cap)
    assert cap.released


def test_a_camera_that_stops_delivering_is_a_device_error():
    cam, made = fake_camera(CameraConfig(warmup_frames=1), warm_frames=1)
    cam.open()
    cap = made[0]
    cap.grabbed.get()
    cap.feed.put(False)  # unplugged
    cap.grabbed.get()
    cam._thread.join()
    with pytest.raises(DeviceError, match="stopped delivering frames"):
        cam.snapshot()
    cam.close()


def test_no_frame_at_open_is_a_device_error():
    made: list[FakeCapture] = []

    def factory(source, api):
        cap = FakeCapture(source, api)
        cap.feed.put(False)
        made.append(cap)
        return cap
    cam = OpenCVCamera(CameraConfig(warmup_frames=2), source="rtsp://x", capture_factory=factory)
    with pytest.raises(DeviceError, match="delivered no frame"):
        cam.open()
    assert made[-1].released


def test_v4l2_settings_are_applied(monkeypatch, tmp_path):
    made: list[FakeCapture] = []

    def factory(source, api):
        made.append(FakeCapture(source, api, warm_frames=2))
        return made[-1]
    node = tmp_path / "video7"
    node.write_text("")  # stands in for the device node
    cfg = CameraConfig(source=str(node), width=1280, height=720, fps=15, warmup_frames=2)
    cam = OpenCVCamera(cfg, capture_factory=factory)
    monkeypatch.setattr(cam, "_is_v4l2", lambda: True)
    cam.open()
    cap = made[0]
    assert cap.api == cv2.CAP_V4L2
    s = cap.settings
    assert (s[cv2.CAP_PROP_FRAME_WIDTH], s[cv2.CAP_PROP_FRAME_HEIGHT], s[cv2.CAP_PROP_FPS]) == (1280, 720, 15)
    assert s[cv2.CAP_PROP_FOURCC] == cv2.VideoWriter_fourcc(*"MJPG")  # above VGA
    close_fake(cam, cap)


def test_opencv_camera_on_a_real_capture(tmp_path):
    # cv2.VideoCapture opens files too: the real capture path, warm-up and end of stream.
    path = write_video(tmp_path / "v.avi", frames=30)
    cam = OpenCVCamera(CameraConfig(source=str(path), warmup_frames=5))
    cam.open()
    cam._thread.join()  # a file is read as fast as it decodes, to its end
    assert cam.frames_grabbed == 30 - 5
    with pytest.raises(DeviceError, match="stopped delivering frames"):
        cam.snapshot()
    cam.close()


# ---------------------------------------------------------------------------- factory

def test_factory_picks_the_camera_by_source(tmp_path):
    assert make_camera(CameraConfig(source=None)) is None
    assert isinstance(make_camera(CameraConfig(source=0)), OpenCVCamera)
    assert make_camera(CameraConfig(source="2")).device == "/dev/video2"
    assert make_camera(CameraConfig(source="/dev/video1")).device == "/dev/video1"
    assert isinstance(make_camera(CameraConfig(source="rtsp://host/stream")), OpenCVCamera)
    resolve = lambda p: tmp_path / p  # noqa: E731 - the config's path resolver
    image = make_camera(CameraConfig(source="scene.JPG"), resolve)
    assert isinstance(image, ImageCamera) and image.path == tmp_path / "scene.JPG"
    assert isinstance(make_camera(CameraConfig(source="clip.mp4"), resolve), VideoCamera)
    with pytest.raises(AssistantError, match="camera.source: 'notes.txt'"):
        make_camera(CameraConfig(source="notes.txt"), resolve)


def test_open_camera_opens_it(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((8, 8, 3), 40, np.uint8))
    cam = open_camera(CameraConfig(source="a.png"), lambda p: tmp_path / p)
    assert cam.snapshot().shape == (8, 8, 3)
    assert open_camera(CameraConfig(source=None)) is None
    with pytest.raises(AssistantError, match="not found"):
        open_camera(CameraConfig(source="missing.mp4"), lambda p: tmp_path / p)


# ---------------------------------------------------------------------------- listing

def test_list_cameras_reads_names_from_sysfs(tmp_path):
    dev, sysfs = tmp_path / "dev", tmp_path / "sys"
    dev.mkdir()
    for n in ("video10", "video0", "video1", "videoX", "vide"):
        (dev / n).write_text("")
    for n, name in (("video0", "USB Camera: USB Camera"), ("video10", "rkisp_mainpath")):
        (sysfs / n).mkdir(parents=True)
        (sysfs / n / "name").write_text(name + "\n")
    cams = list_cameras(dev, sysfs)
    assert cams == [CameraInfo(str(dev / "video0"), "USB Camera: USB Camera", 0),
                    CameraInfo(str(dev / "video1"), "?", 1),
                    CameraInfo(str(dev / "video10"), "rkisp_mainpath", 10)]
    assert str(cams[2]) == f"{dev / 'video10'}  rkisp_mainpath  (camera.source: 10 or {dev / 'video10'})"
