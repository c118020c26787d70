"""The microphone, the speaker and the device list.

The first part runs the real sounddevice path against ALSA's `file` plugin (a fake mic that
reads a raw file, a fake speaker that writes one), each case in a fresh process whose HOME
holds the asoundrc. The second part drives MicSource and SpeakerSink through a stand-in
sounddevice module, for what a fake sound card cannot do on cue: stop mid-chunk, fail,
overflow.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from alsa_support import REPO_ROOT, find_signal, make_fake_alsa, portaudio_available
from assistant.audio import devices
from assistant.audio.mic import MicSource
from assistant.audio.resample import resample
from assistant.audio.speaker import SpeakerSink
from assistant.config import AudioInputConfig, AudioOutputConfig
from assistant.errors import DeviceError

needs_portaudio = pytest.mark.skipif(not portaudio_available(),
                                     reason="PortAudio (libportaudio2) is not installed")


def tones(rate: int, seconds: float, channels: int) -> np.ndarray:
    """(frames, channels) int16: a different tone per channel."""
    t = np.arange(int(rate * seconds)) / rate
    chans = [6000 / (c + 1) * np.sin(2 * np.pi * (300 + 500 * c) * t) + 50 for c in range(channels)]
    return np.rint(np.stack(chans, 1)).astype(np.int16)


# ============================================================================ real ALSA

LIST_SCRIPT = """
import json
from assistant.audio.devices import describe_device, list_audio_devices, resolve_device
from assistant.errors import DeviceError
inputs, outputs = list_audio_devices()
errors = {}
for spec in ("fake", "nosuch", 99):
    try:
        resolve_device(spec, "input")
    except DeviceError as e:
        errors[str(spec)] = str(e)
mic = resolve_device("fakemic", "input")
print(json.dumps({
    "inputs": [d.name for d in inputs], "outputs": [d.name for d in outputs],
    "mic": mic, "mic_upper": resolve_device("FAKEMIC", "input"),
    "mic_by_index": resolve_device(str(mic), "input"),
    "speaker": resolve_device("speak", "output"), "speaker_index": outputs[[d.name for d in outputs].index("fakespeaker")].index,
    "default": resolve_device("default", "input"),
    "errors": errors, "lines": [str(d) for d in inputs],
    "describe": describe_device("fakemic", "input"),
    "describe_default": describe_device("default", "output")}))
"""


@needs_portaudio
def test_devices_are_listed_and_resolved_by_name(tmp_path):
    fake = make_fake_alsa(tmp_path)
    r = fake.run_json(LIST_SCRIPT)
    assert {"fakemic", "fakespeaker"} <= set(r["inputs"]) and {"fakemic", "fakespeaker"} <= set(r["outputs"])
    assert r["mic"] == r["mic_upper"] == r["mic_by_index"]
    assert r["speaker"] == r["speaker_index"]
    assert r["default"] is None
    assert "matches several" in r["errors"]["fake"] and "fakespeaker" in r["errors"]["fake"]
    assert "no audio input device matches 'nosuch'" in r["errors"]["nosuch"]
    assert "'fakemic'" in r["errors"]["nosuch"] and "rkvlm-assistant devices" in r["errors"]["nosuch"]
    assert "index 99" in r["errors"]["99"]
    assert any(line.strip().startswith(f"{r['mic']}  fakemic  (") for line in r["lines"])
    assert r["describe"].startswith(f"{r['mic']} 'fakemic' (")
    assert r["describe_default"].startswith("system default: ") and "'default'" in r["describe_default"]


MIC_SCRIPT = """
import asyncio, json, sys
import numpy as np
from assistant.audio.mic import MicSource
from assistant.config import AudioInputConfig

async def main(device, channels, frame_ms, n_frames, out):
    mic = MicSource(AudioInputConfig(device=device, channels=channels), frame_ms=frame_ms)
    await mic.open()
    frames = []
    async for frame in mic.frames():
        frames.append(frame)
        if len(frames) == n_frames:
            break
    await mic.close()
    np.save(out, np.frombuffer(b"".join(frames), "<i2"))
    print(json.dumps({"rate": mic.sample_rate, "name": mic.name,
                      "sizes": sorted({len(f) for f in frames})}))

asyncio.run(main(*json.loads(sys.argv[1])))
"""


@needs_portaudio
@pytest.mark.parametrize("rate,channels,frame_ms,device", [
    (48000, 2, 30, "fakemic"),
    (44100, 1, 20, "FakeMic"),
    (16000, 1, 10, "default"),
])
def test_mic_delivers_the_captured_audio_at_16k(tmp_path, rate, channels, frame_ms, device):
    fake = make_fake_alsa(tmp_path, capture_rate=rate, capture_channels=channels)
    captured = tones(rate, 1.0, channels)
    fake.write_capture(captured)
    frame_samples = 16 * frame_ms
    n_frames = 15000 // frame_samples  # stay inside the file (minus the resampler's latency)
    out = tmp_path / "mic.npy"
    r = fake.run_json(MIC_SCRIPT, json.dumps([device, channels, frame_ms, n_frames, str(out)]))
    assert r["rate"] == rate  # the device's own rate, converted here
    assert r["sizes"] == [2 * frame_samples]
    got = np.load(out)
    mono = captured[:, 0] if channels == 1 else captured.astype(np.float32).mean(axis=1)
    expected = np.rint(resample(mono, rate, 16000)).astype(np.int64)[: len(got)]
    assert np.abs(got.astype(np.int64) - expected).max() <= 1


LOST_SCRIPT = """
import asyncio, json
from assistant.audio.mic import MicSource
from assistant.config import AudioInputConfig
from assistant.errors import DeviceError

async def main():
    mic = MicSource(AudioInputConfig(device="fakemic"))
    await mic.open()
    frames = 0
    try:
        async for _ in mic.frames():
            frames += 1
            if frames == 1:
                await asyncio.to_thread(mic._stream.abort)  # as if the device went away
    except DeviceError as e:
        print(json.dumps({"error": str(e), "frames": frames}))
    await mic.close()

asyncio.run(main())
"""


@needs_portaudio
def test_mic_stream_that_ends_by_itself_is_a_device_error(tmp_path):
    fake = make_fake_alsa(tmp_path)
    fake.write_capture(tones(48000, 0.5, 1))
    r = fake.run_json(LOST_SCRIPT)
    assert "the microphone stopped" in r["error"] and "fakemic" in r["error"]


BAD_MIC_SCRIPT = """
import asyncio, json
from assistant.audio.mic import MicSource
from assistant.audio.speaker import SpeakerSink
from assistant.config import AudioInputConfig, AudioOutputConfig
from assistant.errors import DeviceError

async def main():
    errors = []
    for source in (MicSource(AudioInputConfig(device="usb mic")),
                   MicSource(AudioInputConfig(device="fakemic", channels=200)),
                   SpeakerSink(AudioOutputConfig(device="hdmi"))):
        try:
            await source.open()
        except DeviceError as e:
            errors.append(str(e))
    print(json.dumps(errors))

asyncio.run(main())
"""


@needs_portaudio
def test_unknown_devices_are_clear_errors(tmp_path):
    fake = make_fake_alsa(tmp_path)
    mic_name, channels, speaker = fake.run_json(BAD_MIC_SCRIPT)
    assert mic_name.startswith("audio.input.device: no audio input device matches 'usb mic'")
    assert channels.startswith("audio.input.channels: 200 channels asked")
    assert speaker.startswith("audio.output.device: no audio output device matches 'hdmi'")


SPEAKER_SCRIPT = """
import asyncio, json
import numpy as np
from assistant.audio.speaker import SpeakerSink
from assistant.config import AudioOutputConfig

async def main():
    sink = SpeakerSink(AudioOutputConfig(device="fakespeaker", volume=0.5))
    await sink.open()
    ramp = ((np.arange(sink.sample_rate) % 2000) * 8 + 8).astype(np.int16)
    first = await sink.play(ramp)
    # Overlapping calls play back to back, in call order.
    second, third = await asyncio.gather(sink.play(ramp[:1000]), sink.play(-ramp[:2000]))
    await sink.close()
    print(json.dumps({"rate": sink.sample_rate, "seconds": [first, second, third]}))

asyncio.run(main())
"""


@needs_portaudio
def test_speaker_plays_the_samples_at_the_device_rate(tmp_path):
    fake = make_fake_alsa(tmp_path, playback_rate=22050)
    r = fake.run_json(SPEAKER_SCRIPT)
    assert r["rate"] == 22050
    assert r["seconds"] == [1.0, 1000 / 22050, 2000 / 22050]
    written = fake.read_playback()[:, 0]
    half = ((np.arange(22050) % 2000) * 4 + 4).astype(np.int16)  # volume 0.5
    start = find_signal(written, half)
    assert start >= 0
    rest = written[start + 22050:]
    tail = np.concatenate([half[:1000], -half[:2000]])
    assert find_signal(rest[: len(tail) + 22050], tail) >= 0


def test_audio_modules_import_without_sounddevice():
    code = ("import sys, assistant.audio.mic, assistant.audio.speaker, assistant.audio.devices, "
            "assistant.audio.wav_source, assistant.audio.wav_sink, assistant.vision.camera; "
            "print('sounddevice' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_missing_portaudio_is_one_clear_message(monkeypatch):
    class NoPortAudio:
        def find_spec(self, name, path=None, target=None):
            if name == "sounddevice":
                raise OSError("PortAudio library not found")
            return None

    monkeypatch.setattr(devices, "_sd", None)
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [NoPortAudio(), *sys.meta_path])
    with pytest.raises(DeviceError) as e:
        devices.import_sounddevice()
    assert "sudo apt-get install libportaudio2" in str(e.value)

    async def open_mic():
        await MicSource(AudioInputConfig()).open()
    with pytest.raises(DeviceError, match="libportaudio2"):
        asyncio.run(open_mic())


# ============================================================================ a stand-in sounddevice

class FakePortAudioError(Exception):
    pass


class FakeInputStream:
    def __init__(self, sd: "FakeSoundDevice", **kw):
        if sd.refuse:
            raise FakePortAudioError(sd.refuse)
        self.kw = kw
        self.callback = kw["callback"]
        self.finished_callback = kw["finished_callback"]
        self.active = False
        sd.streams.append(self)

    def start(self):
        self.active = True

    def emit(self, block: np.ndarray, overflow: bool = False) -> None:
        """What PortAudio's thread does with each captured block."""
        self.callback(block, len(block), None, types.SimpleNamespace(input_overflow=overflow))

    def abort(self):
        self.active = False
        self.finished_callback()

    def close(self):
        self.active = False


class FakeOutputStream:
    """Blocking writes that wait for the test to let each one through (`gate`)."""

    def __init__(self, sd: "FakeSoundDevice", **kw):
        if kw["channels"] == 1 and sd.stereo_only:
            raise FakePortAudioError("Invalid number of channels")
        self.sd = sd
        self.kw = kw
        self.active = False
        self.events: list[str] = []
        sd.streams.append(self)

    def start(self):
        self.active = True
        self.events.append("start")

    def write(self, data: np.ndarray) -> bool:
        self.sd.gate.acquire()
        if self.sd.fail_writes:
            raise FakePortAudioError("Unanticipated host error")
        self.sd.written.put(data.copy())
        return False

    def stop(self):
        self.active = False
        self.events.append("stop")

    def abort(self):
        self.active = False
        self.events.append("abort")

    def close(self):
        self.events.append("close")


class FakeSoundDevice(types.SimpleNamespace):
    """Just enough of the sounddevice module for devices.py, mic.py and speaker.py."""

    PortAudioError = FakePortAudioError

    def __init__(self):
        super().__init__()
        self.default = types.SimpleNamespace(device=(0, 1))
        self.streams: list = []
        self.refuse = ""
        self.stereo_only = False
        self.fail_writes = False
        self.gate = threading.Semaphore(1000)
        self.written: queue.Queue = queue.Queue()
        self._devices = [
            {"index": 0, "name": "USB Mic: Audio (hw:1,0)", "hostapi": 0, "max_input_channels": 2,
             "max_output_channels": 0, "default_samplerate": 48000.0},
            {"index": 1, "name": "Speaker (hw:0,0)", "hostapi": 0, "max_input_channels": 0,
             "max_output_channels": 2, "default_samplerate": 16000.0},
        ]

    def query_devices(self, device=None, kind=None):
        if kind is None:
            return list(self._devices)
        index = self.default.device[0 if kind == "input" else 1] if device is None else device
        return self._devices[index]

    def query_hostapis(self):
        return [{"name": "ALSA"}]

    def InputStream(self, **kw):
        return FakeInputStream(self, **kw)

    def OutputStream(self, **kw):
        return FakeOutputStream(self, **kw)


@pytest.fixture
def sd(monkeypatch):
    fake = FakeSoundDevice()
    monkeypatch.setattr(devices, "_sd", fake)
    return fake


def test_mic_overflow_is_logged_not_fatal_and_frames_are_exact(sd, caplog):
    async def run():
        mic = MicSource(AudioInputConfig(device="usb", channels=2), frame_ms=10)
        await mic.open()
        stream = sd.streams[0]
        assert stream.kw["samplerate"] == 48000 and stream.kw["dtype"] == "int16"
        frames = mic.frames()
        block = np.full((480, 2), [100, 300], np.int16)
        for i in range(20):
            stream.emit(block, overflow=(i == 3))
        got = [await frames.__anext__() for _ in range(15)]
        await mic.close()
        return mic, got
    with caplog.at_level(logging.WARNING):
        mic, got = asyncio.run(run())
    assert mic.overflows == 1
    assert any("overflow" in r.message for r in caplog.records)
    assert all(len(f) == 320 for f in got)
    pcm = np.frombuffer(b"".join(got), "<i2")
    assert (pcm[100:] == 200).all()  # mean of the two channels, after the filter's ramp-in


def test_mic_that_stops_or_goes_quiet_is_a_device_error(sd):
    async def stops():
        mic = MicSource(AudioInputConfig())
        await mic.open()
        frames = mic.frames()
        sd.streams[0].abort()
        try:
            await frames.__anext__()
        finally:
            await mic.close()

    async def quiet():
        mic = MicSource(AudioInputConfig(), stall_timeout_s=0.05)
        await mic.open()
        try:
            await mic.frames().__anext__()
        finally:
            await mic.close()

    with pytest.raises(DeviceError, match="the microphone stopped"):
        asyncio.run(stops())
    with pytest.raises(DeviceError, match="no audio for 0.05 s"):
        asyncio.run(quiet())


def test_mic_close_ends_the_frames_quietly(sd):
    async def run():
        mic = MicSource(AudioInputConfig())
        await mic.open()
        frames = mic.frames()
        pending = asyncio.ensure_future(frames.__anext__())
        await asyncio.sleep(0)
        await mic.close()
        with pytest.raises(StopAsyncIteration):
            await pending
        return sd.streams[0]
    stream = asyncio.run(run())
    assert not stream.active


def test_mic_open_failure_is_a_device_error(sd):
    sd.refuse = "Invalid sample rate"

    async def run():
        await MicSource(AudioInputConfig(sample_rate=12345)).open()
    with pytest.raises(DeviceError) as e:
        asyncio.run(run())
    msg = str(e.value)
    assert "12345 Hz" in msg and "Invalid sample rate" in msg and "audio.input.sample_rate" in msg


async def wait_written(sd: FakeSoundDevice, n: int) -> list[np.ndarray]:
    return [await asyncio.to_thread(sd.written.get) for _ in range(n)]


def test_speaker_stop_cuts_the_chunk_and_later_chunks_play(sd):
    sd.gate = threading.Semaphore(0)  # each write waits for the test

    async def run():
        sink = SpeakerSink(AudioOutputConfig(device="speaker", volume=2.0), piece_ms=50)
        await sink.open()
        assert sink.sample_rate == 16000  # the device's default
        playing = asyncio.create_task(sink.play(np.full(16000, 1000, np.int16)))  # 20 pieces
        for _ in range(3):
            sd.gate.release()
        first = await wait_written(sd, 3)
        sink.stop()  # e.g. barge-in, from any thread
        sd.gate.release()  # the piece in progress completes; the rest is cut
        played = await playing
        stream = sd.streams[0]
        for _ in range(100):
            sd.gate.release()
        after = await sink.play(np.full(800, 1000, np.int16))
        await sink.close()
        return first, played, after, stream
    first, played, after, stream = asyncio.run(run())
    assert all((p == 2000).all() for p in first)  # volume 2
    assert played == pytest.approx(0.2)  # 4 pieces of 50 ms
    assert after == pytest.approx(0.05)
    assert "abort" in stream.events  # what the device still held was dropped
    assert stream.events[-2:] == ["stop", "close"]  # drained when idle, closed


def test_speaker_keeps_playing_between_the_chunks_of_a_sentence(sd):
    # A sentence spoken as it is synthesised comes in chunks with more to follow: the stream
    # runs on between them (draining would put a gap inside the sentence) and is drained
    # once, after the last chunk.
    async def run():
        sink = SpeakerSink(AudioOutputConfig(device="speaker"), piece_ms=50)
        await sink.open()
        chunk = np.full(1600, 1000, np.int16)
        secs = [await sink.play(chunk, more=True), await sink.play(chunk, more=True),
                await sink.play(chunk)]
        events = list(sd.streams[0].events)
        await sink.close()
        return secs, events
    secs, events = asyncio.run(run())
    assert secs == [pytest.approx(0.1)] * 3
    assert events == ["start", "stop"]


def test_speaker_cut_between_chunks_drops_what_the_device_still_holds(sd):
    # Talked over after a chunk with more to follow: the stream was left running, and the
    # tail of that chunk still in the device is dropped at once, not played out.
    async def run():
        sink = SpeakerSink(AudioOutputConfig(device="speaker"), piece_ms=50)
        await sink.open()
        await sink.play(np.full(1600, 1000, np.int16), more=True)
        sink.stop()
        for _ in range(100):
            if "abort" in sd.streams[0].events:
                break
            await asyncio.sleep(0.01)
        events = list(sd.streams[0].events)
        after = await sink.play(np.full(800, 1000, np.int16))
        await sink.close()
        return events, after
    events, after = asyncio.run(run())
    assert events == ["start", "abort"]
    assert after == pytest.approx(0.05)       # and the next answer plays


def test_speaker_cancelled_play_cuts_its_chunk(sd):
    sd.gate = threading.Semaphore(0)

    async def run():
        sink = SpeakerSink(AudioOutputConfig())
        await sink.open()
        playing = asyncio.create_task(sink.play(np.ones(16000, np.int16)))
        sd.gate.release()
        await wait_written(sd, 1)
        playing.cancel()
        # Let play() see its cancellation before the writer may go on.
        with pytest.raises(asyncio.CancelledError):
            await playing
        for _ in range(100):
            sd.gate.release()
        await sink.close()
        return sd.written.qsize()
    assert asyncio.run(run()) <= 1  # at most the piece already under way


def test_speaker_write_error_is_a_device_error_for_this_and_later_chunks(sd):
    sd.fail_writes = True

    async def run():
        sink = SpeakerSink(AudioOutputConfig())
        await sink.open()
        errors = []
        for _ in range(2):
            try:
                await sink.play(np.ones(100, np.int16))
            except DeviceError as e:
                errors.append(str(e))
        await sink.close()
        return errors
    errors = asyncio.run(run())
    assert len(errors) == 2 and all("playback failed" in e for e in errors)


def test_speaker_falls_back_to_stereo(sd):
    sd.stereo_only = True

    async def run():
        sink = SpeakerSink(AudioOutputConfig())
        await sink.open()
        await sink.play(np.array([1, 2, 3], np.int16))
        await sink.close()
        return sink.channels
    assert asyncio.run(run()) == 2
    assert sd.written.get().tolist() == [[1, 1], [2, 2], [3, 3]]
