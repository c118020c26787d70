"""The speaker: one long-lived sounddevice output stream fed by a writer thread.

``play()`` queues a chunk and awaits it; the writer thread writes it to the stream in short
pieces (blocking writes, which pace it at the device's rate) and settles the caller's
future when it is done. When nothing else is queued the writer drains the stream (so
"done" means heard, and an idle device plays nothing) and restarts it with the next chunk;
chunks queued back to back (``play()`` calls that overlap) play without a gap.

``stop()`` (any thread) cuts every chunk queued before it, within one piece (about 50 ms),
and drops what the device still holds; chunks queued after it play normally. A cancelled
``play()`` cuts its own chunk. A write error (the device went away) is a DeviceError for
that chunk and every later one; ``close()`` then ``open()`` reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from assistant.audio.base import AudioSink
from assistant.audio.devices import import_sounddevice, open_params
from assistant.audio.resample import float_to_int16, to_mono
from assistant.config import AudioOutputConfig
from assistant.errors import DeviceError

log = logging.getLogger(__name__)

_CLOSE = object()  # queued by close(): the writer thread ends


@dataclass
class _Chunk:
    pcm: np.ndarray  # (frames, channels) int16, volume applied
    generation: int  # stop() calls before it was queued
    future: asyncio.Future
    cancelled: bool = field(default=False)


def apply_gain(pcm: np.ndarray, volume: float) -> np.ndarray:
    """Mono int16 (or float) speech with a linear gain, clipped, as int16."""
    pcm = to_mono(np.asarray(pcm))
    if pcm.dtype != np.int16:
        pcm = float_to_int16(pcm)
    if volume == 1.0:
        return pcm
    return np.clip(np.rint(pcm.astype(np.float32) * volume), -32768, 32767).astype(np.int16)


class SpeakerSink(AudioSink):
    """A sounddevice speaker behind the AudioSink interface."""

    def __init__(self, cfg: AudioOutputConfig, piece_ms: int = 50):
        self.cfg = cfg
        self.piece_ms = piece_ms
        self.name = f"speaker:{cfg.device}"
        self.sample_rate = 0  # the device's rate, once open
        self.channels = 1
        self._stream: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._gen_lock = threading.Lock()
        self._broken: DeviceError | None = None

    async def open(self) -> None:
        if self._stream is not None:
            return
        sd = import_sounddevice()
        index, info, device_name, rate = await asyncio.to_thread(
            open_params, self.cfg.device, "output", self.cfg.sample_rate)

        def create() -> tuple[Any, int]:
            # Mono first; a raw hw: device may only take stereo, then each sample is doubled.
            try:
                return sd.OutputStream(device=index, samplerate=rate, channels=1, dtype="int16"), 1
            except sd.PortAudioError:
                if int(info["max_output_channels"]) < 2:
                    raise
                return sd.OutputStream(device=index, samplerate=rate, channels=2, dtype="int16"), 2

        try:
            self._stream, self.channels = await asyncio.to_thread(create)
        except sd.PortAudioError as e:
            raise DeviceError(
                f"cannot open the speaker {device_name!r} at {rate} Hz: {e}; check that it is "
                "plugged in and not in use by another program, and that audio.output.sample_rate "
                "is a rate it supports (see `rkvlm-assistant devices`)") from None
        self._loop = asyncio.get_running_loop()
        self._broken = None
        self.name = f"speaker:{device_name}"
        self.sample_rate = rate
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._writer, args=(self._stream, self._queue),
                                        name="speaker-writer", daemon=True)
        self._thread.start()
        log.info("speaker %r: %d Hz, %d channel(s), volume %.2f", device_name, rate,
                 self.channels, self.cfg.volume)

    async def play(self, pcm: np.ndarray) -> float:
        await self.open()
        if self._broken is not None:
            raise self._broken
        data = apply_gain(pcm, self.cfg.volume)
        if len(data) == 0:
            return 0.0
        if self.channels > 1:
            data = np.repeat(data[:, None], self.channels, axis=1)
        else:
            data = data[:, None]
        assert self._loop is not None
        with self._gen_lock:
            chunk = _Chunk(np.ascontiguousarray(data), self._generation, self._loop.create_future())
        self._queue.put(chunk)
        try:
            return await chunk.future
        except asyncio.CancelledError:
            chunk.cancelled = True  # the writer cuts it at the next piece
            raise

    def stop(self) -> None:
        with self._gen_lock:
            self._generation += 1

    def _is_cut(self, chunk: _Chunk) -> bool:
        return chunk.cancelled or chunk.generation != self._generation

    # ------------------------------------------------------------------ the writer thread

    def _writer(self, stream: Any, chunks: queue.Queue) -> None:
        piece = max(1, self.sample_rate * self.piece_ms // 1000)
        while True:
            chunk = chunks.get()
            if chunk is _CLOSE:
                return
            played, error = 0, self._broken
            if error is None:
                try:
                    played = self._write_chunk(stream, chunk, piece)
                    if self._is_cut(chunk):
                        if stream.active:
                            stream.abort()  # drop what the device still holds: barge-in is now
                    elif chunks.empty() and stream.active:
                        stream.stop()  # returns once the buffered audio has been heard
                except Exception as e:  # PortAudioError mostly; the caller must hear of any
                    error = self._broken = DeviceError(
                        f"{self.name}: playback failed ({e}); the speaker was unplugged or "
                        "stopped working; check `rkvlm-assistant devices`")
                    log.error("%s", error)
            self._settle(chunk, played / self.sample_rate, error)

    def _write_chunk(self, stream: Any, chunk: _Chunk, piece: int) -> int:
        played = 0
        for start in range(0, len(chunk.pcm), piece):
            if self._is_cut(chunk):
                break
            if not stream.active:
                stream.start()
            if stream.write(chunk.pcm[start:start + piece]):
                log.debug("%s: output underflow", self.name)
            played += min(piece, len(chunk.pcm) - start)
        return played

    def _settle(self, chunk: _Chunk, seconds: float, error: DeviceError | None) -> None:
        def settle() -> None:
            if chunk.future.done():
                return
            if error is not None:
                chunk.future.set_exception(error)
            else:
                chunk.future.set_result(seconds)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(settle)

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_CLOSE)  # after whatever is still queued: close() flushes
            await asyncio.to_thread(thread.join)
        if stream is not None:
            def release() -> None:
                if stream.active:
                    stream.stop()
                stream.close()
            try:
                await asyncio.to_thread(release)
            except Exception as e:  # a vanished device can fail to close; nothing to recover
                log.debug("%s: error while closing: %s", self.name, e)
            log.info("%s closed", self.name)
