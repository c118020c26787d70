"""WAV files in and out: read_wav, WavSource, WavSink, write_wav."""

from __future__ import annotations

import asyncio
import math
import struct
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from assistant.audio.base import SAMPLE_RATE
from assistant.audio.resample import float_to_int16
from assistant.audio.wav_sink import WavSink, write_wav
from assistant.audio.wav_source import WavSource, read_wav, read_wav_16k
from assistant.errors import AssistantError

_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


# ---------------------------------------------------------------------------- fixtures

def tone(rate: int, seconds: float = 0.25, freq: float = 440.0, amp: float = 0.5,
         channels: int = 1) -> np.ndarray:
    """(frames, channels) float in [-1, 1]; channel c has amplitude amp / (c + 1)."""
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([amp / (c + 1) * np.sin(2 * np.pi * freq * t) for c in range(channels)], 1)


def encode_pcm(x: np.ndarray, width: int) -> bytes:
    """Float (frames, channels) -> interleaved little-endian integer PCM of `width` bytes."""
    flat = x.reshape(-1)
    if width == 1:
        return (np.rint(flat * 127) + 128).astype(np.uint8).tobytes()
    full = (1 << (8 * width - 1)) - 1
    v = np.rint(flat * full).astype(np.int64)
    if width == 3:
        v = v & 0xFFFFFF
        return np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], 1).astype(np.uint8).tobytes()
    return v.astype({2: "<i2", 4: "<i4"}[width]).tobytes()


def write_pcm(path: Path, x: np.ndarray, rate: int, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(encode_pcm(x, width))
    return path


def riff(fmt: bytes, data: bytes, data_size: int | None = None, before: bytes = b"") -> bytes:
    """A RIFF/WAVE file from a fmt chunk body and raw data; `before` goes ahead of fmt."""
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + before + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def fmt_chunk(tag: int, channels: int, rate: int, bits: int, extensible_tag: int | None = None) -> bytes:
    block = channels * bits // 8
    head = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    if extensible_tag is None:
        return head + struct.pack("<H", 0)
    return head + struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", extensible_tag) + _GUID_TAIL


def expected_int16(x: np.ndarray) -> np.ndarray:
    return float_to_int16(x.mean(axis=1))


# ---------------------------------------------------------------------------- read_wav

@pytest.mark.parametrize("width,tol", [(1, 400), (2, 1), (3, 1), (4, 1)])
def test_integer_pcm_widths(tmp_path, width, tol):
    x = tone(16000)
    pcm, rate = read_wav(write_pcm(tmp_path / "a.wav", x, 16000, width))
    assert rate == 16000 and pcm.dtype == np.int16 and pcm.ndim == 1
    assert np.abs(pcm.astype(int) - expected_int16(x)).max() <= tol


def test_16_bit_mono_is_read_exactly(tmp_path):
    x = np.array([0, 1, -1, 32767, -32768, 1234], dtype=np.int16)
    path = tmp_path / "exact.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(x.tobytes())
    assert read_wav(path)[0].tolist() == x.tolist()


@pytest.mark.parametrize("channels", [2, 3, 6])
def test_channels_are_mixed_down(tmp_path, channels):
    x = tone(22050, channels=channels)
    pcm, _ = read_wav(write_pcm(tmp_path / "multi.wav", x, 22050, 2))
    assert len(pcm) == len(x)
    assert np.abs(pcm.astype(int) - expected_int16(x)).max() <= 1


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_any_rate_becomes_16k(tmp_path, rate):
    x = tone(rate, seconds=0.5, channels=2)
    pcm = read_wav_16k(write_pcm(tmp_path / f"r{rate}.wav", x, rate, 2))
    assert pcm.dtype == np.int16
    assert len(pcm) == math.ceil(len(x) * SAMPLE_RATE / rate)
    expected = expected_int16(tone(SAMPLE_RATE, seconds=len(pcm) / SAMPLE_RATE + 0.01, channels=2))
    diff = np.abs(pcm.astype(int) - expected[: len(pcm)])[160:-160]  # edges see the silence around
    assert diff.max() <= 40  # about -60 dB of the tone


@pytest.mark.parametrize("bits,dtype", [(32, "<f4"), (64, "<f8")])
def test_float_wav(tmp_path, bits, dtype):
    x = tone(16000, channels=2)
    x[0, :] = 1.7  # out of range: clipped, not wrapped
    path = tmp_path / "float.wav"
    path.write_bytes(riff(fmt_chunk(3, 2, 16000, bits), x.astype(dtype).tobytes()))
    pcm, rate = read_wav(path)
    assert rate == 16000 and pcm[0] == 32767
    assert np.abs(pcm[1:].astype(int) - expected_int16(x)[1:]).max() <= 1


@pytest.mark.parametrize("tag,bits", [(1, 24), (1, 16), (3, 32)])
def test_wave_format_extensible(tmp_path, tag, bits):
    x = tone(48000, channels=3)
    data = x.astype("<f4").tobytes() if tag == 3 else encode_pcm(x, bits // 8)
    path = tmp_path / "ext.wav"
    path.write_bytes(riff(fmt_chunk(0xFFFE, 3, 48000, bits, extensible_tag=tag), data))
    pcm, rate = read_wav(path)
    assert rate == 48000
    assert np.abs(pcm.astype(int) - expected_int16(x)).max() <= 1


def test_other_chunks_and_odd_padding_are_skipped(tmp_path):
    x = tone(16000)
    odd_list = b"LIST" + struct.pack("<I", 3) + b"abc" + b"\x00"  # padded to even
    path = tmp_path / "chunks.wav"
    path.write_bytes(riff(fmt_chunk(3, 1, 16000, 32), x.astype("<f4").tobytes(), before=odd_list))
    assert np.abs(read_wav(path)[0].astype(int) - expected_int16(x)).max() <= 1


def test_streamed_wav_with_unknown_length(tmp_path):
    # Writers piping to stdout leave 0xFFFFFFFF as the length: the data runs to the end.
    x = tone(16000)
    for tag, bits, data in [(1, 16, encode_pcm(x, 2)), (3, 32, x.astype("<f4").tobytes())]:
        path = tmp_path / f"stream{tag}.wav"
        path.write_bytes(riff(fmt_chunk(tag, 1, 16000, bits), data, data_size=0xFFFFFFFF))
        pcm, _ = read_wav(path)
        assert len(pcm) == len(x)


def test_empty_but_valid_wav_gives_no_frames(tmp_path):
    path = write_pcm(tmp_path / "empty.wav", np.zeros((0, 1)), 16000)
    pcm, rate = read_wav(path)
    assert len(pcm) == 0 and rate == 16000

    async def run():
        src = WavSource(path)
        return [f async for f in src.frames()]
    assert asyncio.run(run()) == []


# ---------------------------------------------------------------------------- bad files

def make_bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.wav"
    good = riff(fmt_chunk(1, 1, 16000, 16), encode_pcm(tone(16000), 2))
    good_float = riff(fmt_chunk(3, 1, 16000, 32), tone(16000).astype("<f4").tobytes())
    content = {
        "empty": b"",
        "text": b"hello, this is not audio at all\n" * 4,
        "riff-not-wave": b"RIFF" + struct.pack("<I", 100) + b"AVI " + b"\x00" * 100,
        "truncated-data": good[: len(good) // 2],
        "truncated-header": good[:30],
        "truncated-float": good_float[: len(good_float) - 100],
        "adpcm": riff(fmt_chunk(2, 1, 16000, 4), b"\x00" * 100),
        "no-fmt": b"RIFF" + struct.pack("<I", 112) + b"WAVEdata" + struct.pack("<I", 100) + b"\x00" * 100,
        "no-channels": riff(fmt_chunk(1, 0, 16000, 16), b"\x00" * 100),
    }[kind]
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("kind,words", [
    ("empty", "empty"),
    ("text", "not a WAV file"),
    ("riff-not-wave", "not a WAV file"),
    ("truncated-data", "truncated"),
    ("truncated-header", "truncated"),
    ("truncated-float", "truncated"),
    ("adpcm", "unsupported"),
    ("no-fmt", "corrupt"),
    ("no-channels", "corrupt"),
])
def test_bad_files_say_what_is_wrong(tmp_path, kind, words):
    path = make_bad_file(tmp_path, kind)
    with pytest.raises(AssistantError) as e:
        read_wav(path)
    msg = str(e.value)
    assert str(path) in msg and words in msg
    assert len(msg.splitlines()) == 1


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(AssistantError, match="not found"):
        read_wav(tmp_path / "nope.wav")
    with pytest.raises(AssistantError, match="directory"):
        read_wav(tmp_path)

    async def open_missing():
        await WavSource(tmp_path / "nope.wav").open()
    with pytest.raises(AssistantError, match="nope.wav: audio file not found"):
        asyncio.run(open_missing())


# ---------------------------------------------------------------------------- WavSource

async def collect(src: WavSource) -> list[bytes]:
    await src.open()
    frames = [f async for f in src.frames()]
    await src.close()
    return frames


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_source_yields_fixed_frames_padding_the_last(tmp_path, frame_ms):
    pcm = (np.arange(16000 + 123) % 1000).astype(np.int16)
    path = tmp_path / "s.wav"
    write_wav(path, pcm, 16000)
    frames = asyncio.run(collect(WavSource(path, frame_ms=frame_ms)))
    n = 16000 * frame_ms // 1000
    assert len(frames) == math.ceil(len(pcm) / n)
    assert all(len(f) == 2 * n for f in frames)
    joined = np.frombuffer(b"".join(frames), dtype="<i2")
    assert np.array_equal(joined[: len(pcm)], pcm)
    assert not joined[len(pcm):].any()


def test_source_converts_to_16k_mono(tmp_path):
    path = write_pcm(tmp_path / "st.wav", tone(44100, seconds=0.3, channels=2), 44100, 3)
    src = WavSource(path)
    frames = asyncio.run(collect(src))
    expected = read_wav_16k(path)
    joined = np.frombuffer(b"".join(frames), dtype="<i2")
    assert np.array_equal(joined[: len(expected)], expected)
    assert src.name.endswith("st.wav")


def test_realtime_source_does_not_run_ahead_of_the_clock(tmp_path):
    path = tmp_path / "rt.wav"
    write_wav(path, np.zeros(16000 * 3 // 10, np.int16), 16000)  # 10 frames of 30 ms

    async def run():
        loop = asyncio.get_running_loop()
        src = WavSource(path, realtime=True)
        await src.open()
        start = loop.time()
        arrivals = [loop.time() - start async for _ in src.frames()]
        return arrivals
    arrivals = asyncio.run(run())
    assert len(arrivals) == 10
    # Frame i is only complete once (i + 1) * 30 ms have passed, like a microphone's.
    # (1 ms slack: the event loop may fire a timer up to its clock resolution early.)
    assert all(t >= (i + 1) * 0.030 - 0.001 for i, t in enumerate(arrivals))


def test_fast_source_lets_other_tasks_run(tmp_path):
    path = tmp_path / "fast.wav"
    write_wav(path, np.zeros(16000, np.int16), 16000)
    ticks = []

    async def ticker():
        while True:
            ticks.append(1)
            await asyncio.sleep(0)

    async def run():
        t = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        frames = await collect(WavSource(path))
        t.cancel()
        return frames
    frames = asyncio.run(run())
    assert len(ticks) >= len(frames)


# ---------------------------------------------------------------------------- WavSink

def read_back(path: Path) -> tuple[np.ndarray, int, int, int]:
    with wave.open(str(path), "rb") as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return data, w.getframerate(), w.getnchannels(), w.getsampwidth()


def test_sink_appends_chunks_and_finalises_on_close(tmp_path):
    path = tmp_path / "out" / "speech.wav"  # the folder is created
    a = (np.arange(22050) % 300).astype(np.int16)
    b = np.full(11025, -7, np.int16)

    async def run():
        sink = WavSink(path, sample_rate=22050)
        await sink.open()
        s1 = await sink.play(a)
        s2 = await sink.play(b)
        sink.stop()  # nothing playing: harmless
        await sink.close()
        await sink.close()  # idempotent
        return s1, s2, sink.seconds_written
    s1, s2, total = asyncio.run(run())
    assert (s1, s2, total) == (1.0, 0.5, 1.5)
    data, rate, channels, width = read_back(path)
    assert (rate, channels, width) == (22050, 1, 2)
    assert np.array_equal(data, np.concatenate([a, b]))


def test_sink_takes_float_and_stereo(tmp_path):
    path = tmp_path / "f.wav"

    async def run():
        sink = WavSink(path, sample_rate=16000)
        await sink.play(np.array([0.5, -0.5, 2.0], dtype=np.float32))
        await sink.play(np.array([[100, 300], [-100, -300]], dtype=np.int16))
        await sink.close()
    asyncio.run(run())
    assert read_back(path)[0].tolist() == [16384, -16384, 32767, 200, -200]


def test_realtime_sink_is_cut_short_by_stop_from_another_thread(tmp_path):
    path = tmp_path / "cut.wav"
    ten_seconds = np.ones(160000, np.int16)

    async def run():
        sink = WavSink(path, sample_rate=16000, realtime=True)
        await sink.open()
        playing = asyncio.create_task(sink.play(ten_seconds))
        while sink._cut is None:  # wait until the chunk is playing
            await asyncio.sleep(0)
        stopper = threading.Thread(target=sink.stop)
        stopper.start()
        played = await playing
        stopper.join()
        after = await sink.play(np.ones(160, np.int16))  # stop is not sticky
        await sink.close()
        return played, after
    played, after = asyncio.run(run())
    assert played < 10.0 and after == 0.01
    data, *_ = read_back(path)
    assert len(data) == round(played * 16000) + 160


def test_write_wav_round_trip_and_unwritable_path(tmp_path):
    pcm = (np.arange(-500, 500) * 30).astype(np.int16)
    write_wav(tmp_path / "rt.wav", pcm, 8000)
    back, rate = read_wav(tmp_path / "rt.wav")
    assert rate == 8000 and np.array_equal(back, pcm)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AssistantError, match="cannot write"):
        write_wav(blocker / "x.wav", pcm, 8000)
