"""Devices that go away and come back recover in-process, at the device layer.

- The speaker: real sounddevice devices through ALSA's `file` plugin, with the device removed
  from and restored to alsa-lib's configuration while the process runs (alsa_support's
  HotplugAlsa). A play() while it is down raises DeviceError naming it, at once; after the
  back-off it reopens and plays into the device again. The back-off schedule itself is
  checked with a stepped clock.
- The microphone: its backing file (or its whole device) disappears and returns; close() and
  open() (what the pipeline's listener does, with its own back-off) get frames flowing again.
- The camera: a video file that vanishes and returns (VideoCamera, and OpenCVCamera on a
  real capture); the vision stage reopens a camera that raised DeviceError.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from alsa_support import find_signal, hotplug_supported, make_hotplug_alsa
from assistant.audio.speaker import REOPEN_BACKOFF_S, SpeakerSink
from assistant.config import AudioOutputConfig, CameraConfig
from assistant.errors import DeviceError
from assistant.vision.camera import OpenCVCamera
from assistant.vision.file_camera import VideoCamera
from test_vision_camera import frame_index, write_video

needs_hotplug = pytest.mark.skipif(
    not hotplug_supported(), reason="PortAudio (libportaudio2) or alsa-lib's alsa.conf missing")


# ============================================================================ speaker, real ALSA

SPEAKER_UNPLUGGED_SCRIPT = """
import asyncio, json, sys, time
import numpy as np
import sounddevice as sd
from alsa_support import plug_device, unplug_device
from assistant.audio.speaker import SpeakerSink
from assistant.config import AudioOutputConfig
from assistant.errors import DeviceError

conf = sys.argv[1]
tone_a = ((np.arange(4000) % 200) * 50 + 7).astype(np.int16)
tone_b = (-(np.arange(4000) % 300) * 40 - 9).astype(np.int16)

async def attempt(sink, pcm, out):
    t0 = time.monotonic()
    try:
        out.append({"played": await sink.play(pcm)})
    except DeviceError as e:
        out.append({"error": str(e), "state": sink.state, "problem": sink.problem})
    out[-1]["took"] = time.monotonic() - t0

async def main():
    sink = SpeakerSink(AudioOutputConfig(device="fakespeaker"), reopen_backoff_s=(0.3, 0.6))
    await sink.open()
    out = []
    await attempt(sink, tone_a, out)                  # 0: plays
    # Unplugged: the device is gone from ALSA, and the open stream's writes fail as an
    # unplugged USB card's do (the file plugin itself never fails a write).
    unplug_device(conf, "fakespeaker")
    def unplugged(data):
        raise sd.PortAudioError("Unanticipated host error", -9999)
    sink._stream.write = unplugged
    await attempt(sink, tone_a, out)                  # 1: the write error
    out.append({"state_after_write_error": sink.state})
    await attempt(sink, tone_a, out)                  # 3: within the back-off: at once
    await asyncio.sleep(0.35)
    await attempt(sink, tone_a, out)                  # 4: reopen attempt; the device is gone
    plug_device(conf, "fakespeaker")
    await attempt(sink, tone_b, out)                  # 5: still backing off (0.6 s)
    await asyncio.sleep(0.65)
    await attempt(sink, tone_b, out)                  # 6: reopened, plays
    out.append({"state_end": sink.state, "problem_end": sink.problem})
    await sink.close()
    print(json.dumps(out))

asyncio.run(main())
"""


@needs_hotplug
def test_speaker_unplugged_mid_session_reopens_when_it_is_back(tmp_path):
    fake = make_hotplug_alsa(tmp_path, playback_rate=16000)
    r = fake.run_json(SPEAKER_UNPLUGGED_SCRIPT, str(fake.devices_conf))
    played, write_error, state, quick, gone, backing_off, back, end = r
    assert played["played"] == pytest.approx(0.25)
    assert "playback failed" in write_error["error"] and "fakespeaker" in write_error["error"]
    assert state["state_after_write_error"] == "down"
    # Down: no waiting on the device, one clear error naming it and when it is retried.
    assert quick["state"] == "down" and quick["took"] < 0.1
    assert "fakespeaker" in quick["error"] and "next attempt to reopen" in quick["error"]
    # The reopen attempt meets the device still gone: PortAudio cannot open it.
    assert "cannot open the speaker 'fakespeaker'" in gone["error"], gone
    assert "retrying in 0.6 s" in gone["error"] and gone["took"] < 3.0
    assert "cannot open the speaker 'fakespeaker'" in gone["problem"]
    assert "error" in backing_off and backing_off["took"] < 0.1
    assert back == {"played": pytest.approx(0.25), "took": back["took"]}
    assert end == {"state_end": "ready", "problem_end": ""}
    # What the device wrote after it came back is the second tone.
    tone_b = (-(np.arange(4000) % 300) * 40 - 9).astype(np.int16)
    assert find_signal(fake.read_playback()[:, 0], tone_b) >= 0


SPEAKER_ABSENT_SCRIPT = """
import asyncio, json, sys
import numpy as np
import sounddevice as sd
from alsa_support import plug_device, unplug_device
from assistant.audio.speaker import SpeakerSink
from assistant.config import AudioOutputConfig
from assistant.errors import DeviceError

conf = sys.argv[1]

async def main():
    sd.query_devices()                   # PortAudio started with the device there, as the
    unplug_device(conf, "fakespeaker")   # daemon did; gone before the first answer
    sink = SpeakerSink(AudioOutputConfig(device="fakespeaker"), reopen_backoff_s=(0.2,))
    out = []
    for step in ("absent", "restored"):
        try:
            out.append({"played": await sink.play(np.full(1600, 1234, np.int16))})
        except DeviceError as e:
            out.append({"error": str(e), "state": sink.state})
        plug_device(conf, "fakespeaker")
        await asyncio.sleep(0.25)
    out.append({"state": sink.state})
    await sink.close()
    print(json.dumps(out))

asyncio.run(main())
"""


@needs_hotplug
def test_speaker_absent_at_first_play_recovers_when_plugged(tmp_path):
    fake = make_hotplug_alsa(tmp_path, playback_rate=16000)
    absent, restored, end = fake.run_json(SPEAKER_ABSENT_SCRIPT, str(fake.devices_conf))
    assert absent["state"] == "down"
    assert absent["error"].startswith("cannot open the speaker 'fakespeaker' at 16000 Hz")
    assert "plugged in" in absent["error"]
    assert restored == {"played": pytest.approx(0.1)}
    assert end == {"state": "ready"}
    assert find_signal(fake.read_playback()[:, 0], np.full(1600, 1234, np.int16)) >= 0


# ============================================================================ speaker back-off

class SteppedClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_speaker_reopen_back_off_is_1_2_5_10_30_s(monkeypatch):
    clock = SteppedClock()
    sink = SpeakerSink(AudioOutputConfig(device="usb speaker"), clock=clock)
    attempts: list[float] = []
    device_back = False

    async def fake_open():
        attempts.append(clock.now - 1000.0)
        if not device_back:
            raise DeviceError("cannot open the speaker 'usb speaker': unplugged")
        sink._stream = object()  # what open() leaves behind
        sink.state, sink.problem = "ready", ""

    async def fake_release():
        sink._stream = None
    monkeypatch.setattr(sink, "open", fake_open)
    monkeypatch.setattr(sink, "_release", fake_release)

    async def run() -> list[float]:
        nonlocal device_back
        quick = 0
        # A play every 0.5 s for 110 s (the device fails at t=0, at the first play; it is
        # back at t=100, and found at the next attempt).
        for step in range(221):
            clock.now = 1000.0 + step * 0.5
            device_back = step >= 200
            try:
                await sink.recover()
            except DeviceError as e:
                assert "usb speaker" in str(e)
                quick += 1
        return quick
    asyncio.run(run())
    assert REOPEN_BACKOFF_S == (1.0, 2.0, 5.0, 10.0, 30.0)
    # t=0 the first failure, then 1, +2, +5, +10, +30, +30 (back by then), and no others.
    assert attempts == [0.0, 1.0, 3.0, 8.0, 18.0, 48.0, 78.0, 108.0]
    assert sink.state == "ready" and sink.problem == ""


def test_speaker_that_hangs_when_reopened_never_blocks_play(monkeypatch):
    from assistant.audio import speaker

    released = threading.Event()

    def hung_query(*args):  # PortAudio stuck on a half-gone USB device
        released.wait(10)
        raise RuntimeError("too late")
    monkeypatch.setattr(speaker, "import_sounddevice", lambda: None)
    monkeypatch.setattr(speaker, "open_params", hung_query)
    monkeypatch.setattr(speaker, "_OPEN_TIMEOUT_S", 0.2)

    async def run() -> tuple[str, float, bool]:
        sink = SpeakerSink(AudioOutputConfig(device="usb speaker"))
        loop_ticks = 0

        async def ticker():  # the event loop keeps running meanwhile
            nonlocal loop_ticks
            while True:
                loop_ticks += 1
                await asyncio.sleep(0.01)
        t = asyncio.create_task(ticker())
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as e:
            await sink.play(np.ones(100, np.int16))
        took = time.monotonic() - t0
        t.cancel()
        released.set()
        return str(e.value), took, loop_ticks > 5 and sink.state == "down"
    message, took, loop_ran = asyncio.run(run())
    assert "'usb speaker' did not answer within 0.2 s" in message
    assert took < 1.0 and loop_ran


# ============================================================================ microphone, real ALSA

MIC_SCRIPT = """
import asyncio, json, os, sys
import numpy as np
from alsa_support import plug_device, unplug_device
from assistant.audio.mic import MicSource
from assistant.config import AudioInputConfig
from assistant.errors import DeviceError

conf, capture, how = sys.argv[1], sys.argv[2], sys.argv[3]

def record(level):
    # 2 s of a constant level at 48 kHz, then what the plugin repeats after the end.
    np.full(96000, level, "<i2").tofile(capture)

async def take(mic, n):
    got = []
    async for frame in mic.frames():
        got.append(np.frombuffer(frame, "<i2"))
        if len(got) == n:
            break
    return np.concatenate(got)

async def main():
    out = {}
    record(1000)
    mic = MicSource(AudioInputConfig(device="fakemic"), stall_timeout_s=30)
    await mic.open()
    out["before"] = float(np.median(await take(mic, 20)))
    # Unplugged: the device disappears, and the running stream ends as an unplugged card's
    # does (the file plugin keeps reading an open file that was deleted).
    if how == "file":
        os.rename(capture, capture + ".gone")
    else:
        unplug_device(conf, "fakemic")
    frames = mic.frames()
    await asyncio.to_thread(mic._stream.abort)
    try:
        async for _ in frames:
            pass
    except DeviceError as e:
        out["lost"] = str(e)
    # What the pipeline's listener does, with its back-off between the attempts.
    await mic.close()
    try:
        await mic.open()
    except DeviceError as e:
        out["still_gone"] = str(e)
    await mic.close()
    if how == "file":
        os.remove(capture + ".gone")
    else:
        plug_device(conf, "fakemic")
    record(-3000)                       # back, with new sound
    await mic.open()
    out["after"] = float(np.median(await take(mic, 20)))
    out["rate"] = mic.sample_rate
    await mic.close()
    print(json.dumps(out))

asyncio.run(main())
"""


@needs_hotplug
@pytest.mark.parametrize("how", ["file", "device"])
def test_mic_reopens_after_its_device_disappears_and_returns(tmp_path, how):
    fake = make_hotplug_alsa(tmp_path, capture_rate=48000)
    r = fake.run_json(MIC_SCRIPT, str(fake.devices_conf), str(fake.capture_file), how)
    assert r["before"] == 1000
    assert "the microphone stopped" in r["lost"] and "fakemic" in r["lost"]
    assert r["still_gone"].startswith("cannot open the microphone 'fakemic' at 48000 Hz"), r
    assert r["after"] == -3000          # frames flow again, from the device that came back
    assert r["rate"] == 48000


def test_mic_reopened_ignores_what_the_old_stream_sends_late(monkeypatch):
    # PortAudio's thread of the old stream can still call back after close(): a block, or its
    # end. Neither may reach the reopened microphone.
    from assistant.audio import devices
    from assistant.audio.mic import MicSource
    from assistant.config import AudioInputConfig
    from test_audio_alsa_devices import FakeSoundDevice

    sd = FakeSoundDevice()
    monkeypatch.setattr(devices, "_sd", sd)

    async def run() -> np.ndarray:
        mic = MicSource(AudioInputConfig(device="usb", channels=1), frame_ms=10)
        await mic.open()
        old = sd.streams[0]
        await mic.close()
        await mic.open()
        new = sd.streams[1]
        frames = mic.frames()
        old.emit(np.full((480, 1), 7000, np.int16))   # late, from the unplugged device
        old.finished_callback()                        # and its end, late too
        for _ in range(10):
            new.emit(np.full((480, 1), -500, np.int16))
        got = [await frames.__anext__() for _ in range(8)]
        await mic.close()
        return np.frombuffer(b"".join(got), "<i2")
    pcm = asyncio.run(run())
    assert (pcm != 7000).all() and (pcm[200:] == -500).all()


# ============================================================================ camera, video file

def _swap_in(path: Path, video: Path) -> None:
    tmp = path.with_name(path.name + ".new")
    shutil.copyfile(video, tmp)
    tmp.replace(path)


def test_video_file_that_vanishes_is_a_device_error_and_reopens_when_back(tmp_path):
    first = write_video(tmp_path / "first.avi", frames=40)
    path = tmp_path / "camera.avi"
    shutil.copyfile(first, path)
    cam = VideoCamera(path, clock=lambda: 0.0)    # frame 0 of whatever file is open
    cam.open()
    assert frame_index(cam.snapshot()) == 0
    path.unlink()                                  # unplugged
    with pytest.raises(DeviceError) as e:
        cam.snapshot()
    assert str(path) in str(e.value) and "is gone" in str(e.value)
    cam.close()
    with pytest.raises(DeviceError, match="is gone"):  # still away: a device error, not a typo
        cam.open()
    # Back, as another recording (60 frames instead of 40).
    _swap_in(path, write_video(tmp_path / "later.avi", frames=60))
    cam.close()
    cam.open()
    assert frame_index(cam.snapshot()) == 0 and cam.frame_count == 60
    cam.close()


def test_video_file_replaced_while_open_is_reopened(tmp_path):
    path = write_video(tmp_path / "camera.avi", frames=40)
    clock = SteppedClock()
    cam = VideoCamera(path, clock=clock)
    cam.open()
    clock.now += 2.0                               # frame 20 of the first file
    assert frame_index(cam.snapshot()) == 20
    _swap_in(path, write_video(tmp_path / "short.avi", frames=10))
    clock.now += 1.5
    # The new file is played from its start, not the old one from its (unlinked) inode.
    assert frame_index(cam.snapshot()) == 0
    assert cam.frame_count == 10
    cam.close()


def test_opencv_camera_on_a_vanished_capture_reopens_when_back(tmp_path):
    # cv2.VideoCapture on a file: the real open path of OpenCVCamera (URLs, V4L2).
    path = write_video(tmp_path / "v.avi", frames=30)
    saved = tmp_path / "saved.avi"
    shutil.copyfile(path, saved)
    cam = OpenCVCamera(CameraConfig(source=str(path), warmup_frames=5))
    cam.open()
    cam._thread.join()                              # a file is read to its end at once
    with pytest.raises(DeviceError, match="stopped delivering frames"):
        cam.snapshot()
    cam.close()
    path.unlink()
    with pytest.raises(DeviceError, match=re.escape(f"cannot open camera {path}")):
        cam.open()
    shutil.copyfile(saved, path)
    cam.open()                                      # back: opens and delivers again
    cam._thread.join()
    assert cam.frames_grabbed == 2 * (30 - 5)
    cam.close()
