"""WAV files as an audio source: any rate, channel count and sample format -> 16 kHz mono.

``read_wav`` decodes 8/16/24/32-bit integer PCM with the stdlib ``wave`` module, and 32/64-bit
float or WAVE_FORMAT_EXTENSIBLE files (which ``wave`` refuses before Python 3.12) with a small
RIFF parser of its own. Anything else -- a missing file, a file that is not WAV, a compressed
encoding, a header that lies about the data length -- is an ``InputError`` naming the file
and the problem.

``WavSource`` feeds a file through the same interface as the microphone, as fast as the
consumer takes it or paced in real time (``realtime=True``), so the whole pipeline can be
driven by fixtures.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import wave
from pathlib import Path
from typing import AsyncIterator

import numpy as np

from assistant.audio.base import SAMPLE_RATE, AudioSource
from assistant.audio.resample import float_to_int16, resample, to_mono
from assistant.errors import InputError

log = logging.getLogger(__name__)

_PCM = 1
_FLOAT = 3
_EXTENSIBLE = 0xFFFE
# Writers that stream to a pipe cannot seek back to fill in the length: they leave the
# maximum there. Such a data chunk simply runs to the end of the file.
_UNKNOWN_SIZE = 0xFFFFFFFF

_CONVERT_HINT = "convert it, e.g. `ffmpeg -i INPUT -ar 16000 -ac 1 OUTPUT.wav`"
# Sample rates read at all: telephone audio to studio audio. A header announcing anything
# else is broken or hostile, and resampling from it would cost memory for nothing.
MIN_RATE = 8000
MAX_RATE = 192000


def _bad(path: Path, problem: str) -> InputError:
    return InputError(f"{path}: {problem}")


def _decode(raw: bytes, width: int, channels: int, tag: int) -> np.ndarray:
    """Interleaved little-endian samples -> (frames, channels) int16 (16-bit PCM) or float32."""
    if tag == _FLOAT:
        dtype = {4: "<f4", 8: "<f8"}[width]
        return np.frombuffer(raw, dtype=dtype).reshape(-1, channels).astype(np.float32)
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        return np.frombuffer(raw, dtype="<i2").reshape(-1, channels)
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = (v << 8) >> 8  # sign-extend 24 -> 32 bits
        x = v.astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(1 << 31)
    else:
        raise ValueError(width)
    return x.reshape(-1, channels)


def _to_mono_int16(samples: np.ndarray) -> np.ndarray:
    """(frames, channels) int16 or float -> mono int16."""
    if samples.dtype == np.int16:
        return np.ascontiguousarray(to_mono(samples))
    return float_to_int16(to_mono(samples))


def _read_with_wave(path: Path) -> tuple[np.ndarray, int]:
    """Integer PCM through the stdlib; raises wave.Error / EOFError on what it cannot read."""
    with wave.open(str(path), "rb") as w:
        channels, width, rate, nframes = (w.getnchannels(), w.getsampwidth(),
                                          w.getframerate(), w.getnframes())
        if width not in (1, 2, 3, 4):
            raise _bad(path, f"unsupported sample width of {width * 8} bits; {_CONVERT_HINT}")
        _check_rate(path, rate)
        raw = w.readframes(nframes)
    block = channels * width
    declared = nframes * block
    if len(raw) < declared and declared < _UNKNOWN_SIZE - block:
        raise _bad(path, f"truncated WAV file: the header announces {nframes} frames but only "
                         f"{len(raw) // block} are there; re-create or re-download it")
    raw = raw[: len(raw) - len(raw) % block]
    return _decode(raw, width, channels, _PCM), rate


def _read_with_riff(path: Path) -> tuple[np.ndarray, int]:
    """Float and WAVE_FORMAT_EXTENSIBLE files: walk the RIFF chunks ourselves."""
    data = path.read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise _bad(path, f"not a WAV file (no RIFF/WAVE header); {_CONVERT_HINT}")
    fmt = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            if size < 16 or body + size > len(data):
                raise _bad(path, "corrupt WAV file: the format chunk is cut short")
            tag, channels, rate, _, block, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == _EXTENSIBLE:
                if size < 40:
                    raise _bad(path, "corrupt WAV file: the extensible format chunk is cut short")
                tag = struct.unpack_from("<H", data, body + 24)[0]  # first two bytes of the GUID
            fmt = (tag, channels, rate, block, bits)
        elif cid == b"data":
            if fmt is None:
                raise _bad(path, "corrupt WAV file: audio data comes before the format chunk")
            tag, channels, rate, block, bits = fmt
            if size != _UNKNOWN_SIZE and body + size > len(data):
                raise _bad(path, f"truncated WAV file: the header announces {size} bytes of audio "
                                 f"but only {len(data) - body} are there; re-create or re-download it")
            raw = data[body:] if size == _UNKNOWN_SIZE else data[body:body + size]
            return _decode_checked(path, raw, tag, channels, rate, block, bits), rate
        pos = body + size + (size & 1)  # chunks are padded to an even length
    if fmt is None:
        raise _bad(path, "corrupt WAV file: no format chunk")
    raise _bad(path, "corrupt WAV file: no audio data chunk")


def _check_rate(path: Path, rate: int) -> None:
    if rate <= 0:
        raise _bad(path, f"corrupt WAV header (sample rate {rate})")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise _bad(path, f"the WAV header announces a sample rate of {rate} Hz; only "
                         f"{MIN_RATE}-{MAX_RATE} Hz is read; {_CONVERT_HINT}")


def _decode_checked(path: Path, raw: bytes, tag: int, channels: int, rate: int, block: int,
                    bits: int) -> np.ndarray:
    width = bits // 8
    if channels < 1 or rate <= 0 or block != channels * width:
        raise _bad(path, f"corrupt WAV header ({channels} channels, {rate} Hz, {bits} bits, "
                         f"block size {block})")
    _check_rate(path, rate)
    ok = (tag == _PCM and width in (1, 2, 3, 4) and bits % 8 == 0) or (tag == _FLOAT and width in (4, 8))
    if not ok:
        kind = "float" if tag == _FLOAT else "PCM" if tag == _PCM else f"encoding 0x{tag:04x}"
        raise _bad(path, f"unsupported WAV format ({kind}, {bits} bits); {_CONVERT_HINT}")
    raw = raw[: len(raw) - len(raw) % block]
    return _decode(raw, width, channels, tag)


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a WAV file as mono int16 at its own rate: ``(pcm, sample_rate)``."""
    p = Path(path)
    if not p.exists():
        raise _bad(p, "audio file not found; check the path")
    if p.is_dir():
        raise _bad(p, "is a directory, not a WAV file")
    if p.stat().st_size == 0:
        raise _bad(p, "the file is empty, not a WAV file")
    try:
        samples, rate = _read_with_wave(p)
    except wave.Error as e:
        msg = str(e)
        if msg.startswith("unknown format"):
            samples, rate = _read_with_riff(p)  # float or extensible: our own parser
        elif "RIFF" in msg or "WAVE" in msg:
            raise _bad(p, f"not a WAV file (no RIFF/WAVE header); {_CONVERT_HINT}") from None
        else:
            raise _bad(p, f"corrupt WAV file ({msg}); re-create or re-download it") from None
    except EOFError:
        raise _bad(p, "truncated WAV file: it ends inside the header") from None
    except (RuntimeError, struct.error, ValueError, OverflowError, MemoryError):
        # The stdlib parser fails this way on chunk sizes that point past the file's end.
        raise _bad(p, "corrupt WAV file (its chunk sizes do not match its contents); "
                      "re-create or re-download it") from None
    except OSError as e:
        raise _bad(p, f"cannot read the file: {e.strerror or e}") from None
    return _to_mono_int16(samples), rate


def read_wav_16k(path: str | os.PathLike) -> np.ndarray:
    """Read a WAV file as mono int16 at 16 kHz, the pipeline's rate."""
    pcm, rate = read_wav(path)
    return resample(pcm, rate, SAMPLE_RATE)


class WavSource(AudioSource):
    """A WAV file behind the microphone interface.

    ``realtime=False`` yields frames as fast as they are consumed (still giving the event
    loop a turn between frames); ``realtime=True`` yields each frame once its duration has
    elapsed since the start, like a microphone. The last partial frame is padded with
    silence. The iteration ends at the end of the file.
    """

    def __init__(self, path: str | os.PathLike, frame_ms: int = 30, realtime: bool = False):
        super().__init__(frame_ms)
        self.path = Path(path)
        self.realtime = realtime
        self.name = f"wav:{self.path}"
        self._pcm: np.ndarray | None = None

    @property
    def duration(self) -> float:
        """Seconds of audio (after open)."""
        return 0.0 if self._pcm is None else len(self._pcm) / SAMPLE_RATE

    async def open(self) -> None:
        if self._pcm is None:
            self._pcm = await asyncio.to_thread(read_wav_16k, self.path)
            log.info("audio source %s: %.2f s", self.name, self.duration)
            if len(self._pcm) == 0:
                log.warning("audio source %s holds no audio", self.name)

    async def frames(self) -> AsyncIterator[bytes]:
        await self.open()
        assert self._pcm is not None
        n = self.frame_samples
        pcm = self._pcm
        if len(pcm) % n:
            pcm = np.concatenate([pcm, np.zeros(n - len(pcm) % n, dtype=np.int16)])
        data = pcm.astype("<i2").tobytes()
        step = 2 * n
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(len(pcm) // n):
            if self.realtime:
                # Scheduled from the start, so pacing does not drift with loop latency.
                await asyncio.sleep(max(0.0, start + (i + 1) * self.frame_ms / 1000 - loop.time()))
            else:
                await asyncio.sleep(0)  # let other tasks run between frames
            yield data[i * step:(i + 1) * step]

    async def close(self) -> None:
        self._pcm = None
