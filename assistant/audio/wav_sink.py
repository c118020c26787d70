"""A WAV file as the speaker: what the assistant says is appended to a 16-bit mono file.

By default ``play`` writes at once. With ``realtime=True`` it takes as long as the audio
lasts and ``stop()`` cuts it short, writing only what was "heard": tests of the mic gating
and of barge-in can then run without a sound card.
"""

from __future__ import annotations

import asyncio
import logging
import os
import wave
from pathlib import Path

import numpy as np

from assistant.audio.base import AudioSink
from assistant.audio.resample import float_to_int16, to_mono
from assistant.errors import AssistantError

log = logging.getLogger(__name__)


def _as_mono_int16(pcm: np.ndarray) -> np.ndarray:
    """Accept int16 or float, mono or (frames, channels); return mono int16."""
    pcm = to_mono(np.asarray(pcm))
    if pcm.dtype != np.int16:
        pcm = float_to_int16(pcm)
    return pcm


def _open_for_writing(path: Path, rate: int) -> wave.Wave_write:
    try:
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        w = wave.open(str(path), "wb")
    except OSError as e:
        raise AssistantError(f"{path}: cannot write the WAV file: {e.strerror or e}; "
                             "check that the folder is writable") from None
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    return w


def write_wav(path: str | os.PathLike, pcm: np.ndarray, rate: int) -> None:
    """Write mono (or mixed-down) audio as a 16-bit WAV file (blocking)."""
    w = _open_for_writing(Path(path), int(rate))
    with w:
        w.writeframes(_as_mono_int16(pcm).astype("<i2").tobytes())


class WavSink(AudioSink):
    """Appends played speech to a WAV file; the header is finalised by ``close()``."""

    def __init__(self, path: str | os.PathLike, sample_rate: int = 22050, realtime: bool = False):
        self.path = Path(path)
        self.sample_rate = int(sample_rate)
        self.realtime = realtime
        self.name = f"wav:{self.path}"
        self.frames_written = 0
        self._w: wave.Wave_write | None = None
        self._lock = asyncio.Lock()
        self._cut: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def seconds_written(self) -> float:
        return self.frames_written / self.sample_rate

    async def open(self) -> None:
        if self._w is None:
            self._loop = asyncio.get_running_loop()
            self._w = await asyncio.to_thread(_open_for_writing, self.path, self.sample_rate)
            log.info("audio sink %s: %d Hz", self.name, self.sample_rate)

    async def play(self, pcm: np.ndarray, more: bool = False) -> float:
        await self.open()
        pcm = _as_mono_int16(pcm)
        async with self._lock:  # overlapping calls play one after the other, in call order
            if self.realtime and len(pcm):
                pcm = await self._wait_played(pcm)
            assert self._w is not None
            await asyncio.to_thread(self._w.writeframes, pcm.astype("<i2").tobytes())
            self.frames_written += len(pcm)
        return len(pcm) / self.sample_rate

    async def _wait_played(self, pcm: np.ndarray) -> np.ndarray:
        """Take the audio's duration, or less if stop() is called; return the part played."""
        loop = asyncio.get_running_loop()
        self._cut = asyncio.Event()
        start = loop.time()
        try:
            await asyncio.wait_for(self._cut.wait(), timeout=len(pcm) / self.sample_rate)
        except asyncio.TimeoutError:
            return pcm
        finally:
            self._cut = None
        played = int((loop.time() - start) * self.sample_rate)
        return pcm[:min(played, len(pcm))]

    def stop(self) -> None:
        cut, loop = self._cut, self._loop
        if cut is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(cut.set)

    async def close(self) -> None:
        w, self._w = self._w, None
        if w is not None:
            await asyncio.to_thread(w.close)
            log.info("audio sink %s: wrote %.2f s", self.name, self.seconds_written)
