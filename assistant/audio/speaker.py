"""The speaker: one long-lived sounddevice output stream fed by a writer thread.

``play()`` queues a chunk and awaits it; the writer thread writes it to the stream in short
pieces (blocking writes, which pace it at the device's rate) and settles the caller's
future when it is done. When nothing else is queued the writer drains the stream (so
"done" means heard, and an idle device plays nothing) and restarts it with the next chunk;
chunks queued back to back (``play()`` calls that overlap) play without a gap.

``stop()`` (any thread) cuts every chunk queued before it, within one piece (about 50 ms),
and drops what the device still holds; chunks queued after it play normally. A cancelled
``play()`` cuts its own chunk.

The speaker recovers by itself. A write error (the device went away) is a DeviceError for
that chunk and every one already queued, and the speaker goes ``down``: a later ``play()``
reopens the device, at most once per back-off step (1, 2, 5, 10, then every 30 s), and
raises DeviceError at once between attempts and while the device stays away, so nothing
waits on a missing speaker. When the device is back it plays again. ``state`` ("closed",
"ready", "down") and ``problem`` (why it is down) are for the service's STATUS line.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from assistant.audio.base import AudioSink
from assistant.audio.devices import import_sounddevice, open_params
from assistant.audio.resample import float_to_int16, to_mono
from assistant.config import AudioOutputConfig
from assistant.errors import DeviceError

log = logging.getLogger(__name__)

_CLOSE = object()  # queued by close(): the writer thread ends
# Queued by stop(): a stream left running after a chunk with more to follow still holds that
# chunk's tail in the device; a barge-in drops it too.
_CUT = object()

# Seconds between attempts to reopen a speaker that went away (the last one repeats).
REOPEN_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# A device that vanished can make PortAudio slow to open or close: never wait longer.
_OPEN_TIMEOUT_S = 5.0
_RELEASE_TIMEOUT_S = 3.0


@dataclass
class _Chunk:
    pcm: np.ndarray  # (frames, channels) int16, volume applied
    generation: int  # stop() calls before it was queued
    future: asyncio.Future
    more: bool = False  # the next chunk follows at once: keep the stream running
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

    def __init__(self, cfg: AudioOutputConfig, piece_ms: int = 50,
                 reopen_backoff_s: tuple[float, ...] = REOPEN_BACKOFF_S,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.piece_ms = piece_ms
        self.reopen_backoff_s = reopen_backoff_s
        self.clock = clock  # for the back-off; injectable so tests can step time
        self.name = f"speaker:{cfg.device}"
        self.sample_rate = 0  # the device's rate, once open
        self.channels = 1
        self._stream: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._gen_lock = threading.Lock()
        self._broken: DeviceError | None = None  # set by the writer thread on a write error
        self.state = "closed"  # "ready" once open, "down" after an error until it reopens
        self.problem = ""  # why it is down, naming the device
        self.reopen_attempts = 0  # failed attempts since it went down
        self._next_attempt = 0.0  # clock() time of the next reopen attempt
        self._recover_lock: asyncio.Lock | None = None

    async def open(self) -> None:
        """Open the device now; DeviceError naming it if it cannot be opened."""
        if self._stream is not None:
            return
        sd = import_sounddevice()
        index, info, device_name, rate = await _bounded(
            asyncio.to_thread(open_params, self.cfg.device, "output", self.cfg.sample_rate),
            _OPEN_TIMEOUT_S, f"the speaker {self.cfg.device!r} did not answer")

        def create() -> tuple[Any, int]:
            # Mono first; a raw hw: device may only take stereo, then each sample is doubled.
            try:
                return sd.OutputStream(device=index, samplerate=rate, channels=1, dtype="int16"), 1
            except sd.PortAudioError:
                if int(info["max_output_channels"]) < 2:
                    raise
                return sd.OutputStream(device=index, samplerate=rate, channels=2, dtype="int16"), 2

        try:
            self._stream, self.channels = await _bounded(
                asyncio.to_thread(create), _OPEN_TIMEOUT_S,
                f"the speaker {device_name!r} did not open",
                on_late=lambda r: threading.Thread(target=r[0].close, daemon=True).start())
        except sd.PortAudioError as e:
            raise DeviceError(
                f"cannot open the speaker {device_name!r} at {rate} Hz: {e}; check that it is "
                "plugged in and not in use by another program, and that audio.output.sample_rate "
                "is a rate it supports (see `rkvlm-assistant devices`)") from None
        self._loop = asyncio.get_running_loop()
        self._broken = None
        self.state, self.problem, self.reopen_attempts = "ready", "", 0
        self.name = f"speaker:{device_name}"
        self.sample_rate = rate
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._writer, args=(self._stream, self._queue),
                                        name="speaker-writer", daemon=True)
        self._thread.start()
        log.info("speaker %r: %d Hz, %d channel(s), volume %.2f", device_name, rate,
                 self.channels, self.cfg.volume)

    async def play(self, pcm: np.ndarray, more: bool = False) -> float:
        await self.recover()
        data = apply_gain(pcm, self.cfg.volume)
        if len(data) == 0:
            return 0.0
        if self.channels > 1:
            data = np.repeat(data[:, None], self.channels, axis=1)
        else:
            data = data[:, None]
        assert self._loop is not None
        with self._gen_lock:
            chunk = _Chunk(np.ascontiguousarray(data), self._generation,
                           self._loop.create_future(), more)
        self._queue.put(chunk)
        try:
            return await chunk.future
        except asyncio.CancelledError:
            chunk.cancelled = True  # the writer cuts it at the next piece
            raise

    # ------------------------------------------------------------------ recovery

    async def recover(self) -> None:
        """Make the speaker ready: open it, or reopen it after an error when the back-off
        allows. Raises DeviceError at once while it is down (the caller skips the audio)."""
        if self._recover_lock is None:
            self._recover_lock = asyncio.Lock()
        async with self._recover_lock:  # overlapping play() calls make one attempt
            if self._broken is not None and self.state != "down":
                self._went_down(self._broken)
            if self.state != "down":
                if self._stream is not None:
                    return
                try:
                    await self.open()
                except DeviceError as e:
                    self._went_down(e)
                    raise
                return
            now = self.clock()
            if now < self._next_attempt:
                raise DeviceError(f"{self.problem} (the speaker is down; next attempt to reopen "
                                  f"it in {self._next_attempt - now:.0f} s)")
            await self._release()
            try:
                await self.open()
            except DeviceError as e:
                self.reopen_attempts += 1
                backoff = self.reopen_backoff_s
                delay = backoff[min(self.reopen_attempts, len(backoff) - 1)]
                self._next_attempt = self.clock() + delay
                self.problem = str(e)
                log.warning("%s; retrying in %g s", e, delay)
                raise DeviceError(f"{e} (retrying in {delay:g} s)") from None
            log.info("%s is back", self.name)

    def _went_down(self, error: DeviceError) -> None:
        self.state, self.problem, self.reopen_attempts = "down", str(error), 0
        self._next_attempt = self.clock() + self.reopen_backoff_s[0]
        log.error("%s; reopening it in %g s", error, self.reopen_backoff_s[0])

    async def _release(self) -> None:
        """Drop the failed stream and its writer, without waiting on a device that is gone."""
        stream, self._stream = self._stream, None
        thread, self._thread = self._thread, None
        chunks = self._queue

        def release() -> None:
            if thread is not None:
                chunks.put(_CLOSE)
                thread.join()
            if stream is not None:
                try:
                    stream.abort()
                finally:
                    stream.close()
        try:
            await _bounded(asyncio.to_thread(release), _RELEASE_TIMEOUT_S, "")
        except DeviceError:
            log.warning("%s: the failed stream did not close in %g s; left behind", self.name,
                        _RELEASE_TIMEOUT_S)
        except Exception as e:  # a vanished device often fails to close; nothing to recover
            log.debug("%s: error while releasing: %s", self.name, e)

    def stop(self) -> None:
        with self._gen_lock:
            self._generation += 1
        self._queue.put(_CUT)

    def _is_cut(self, chunk: _Chunk) -> bool:
        return chunk.cancelled or chunk.generation != self._generation

    # ------------------------------------------------------------------ the writer thread

    def _writer(self, stream: Any, chunks: queue.Queue) -> None:
        piece = max(1, self.sample_rate * self.piece_ms // 1000)
        while True:
            chunk = chunks.get()
            if chunk is _CLOSE:
                return
            if chunk is _CUT:
                if stream.active and self._broken is None:
                    try:
                        stream.abort()
                    except Exception as e:  # the next chunk's write reports a dead device
                        log.debug("%s: abort after a cut failed: %s", self.name, e)
                continue
            played, error = 0, self._broken
            if error is None:
                try:
                    played = self._write_chunk(stream, chunk, piece)
                    if self._is_cut(chunk):
                        if stream.active:
                            stream.abort()  # drop what the device still holds: barge-in is now
                    elif chunks.empty() and stream.active and not chunk.more:
                        stream.stop()  # returns once the buffered audio has been heard
                except Exception as e:  # PortAudioError mostly; the caller must hear of any
                    error = self._broken = DeviceError(
                        f"{self.name}: playback failed ({e}); the speaker was unplugged or "
                        "stopped working; check `rkvlm-assistant devices`")
                    self._call_on_loop(self._write_failed, stream, error)
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

    def _call_on_loop(self, fn, *args) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _write_failed(self, stream: Any, error: DeviceError) -> None:
        # On the loop: STATUS shows "down" now, not only at the next play().
        if stream is self._stream and self.state == "ready":
            self._went_down(error)

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
        if self.state == "down":  # nothing queued can play: do not wait on the device
            await self._release()
            self.state = "closed"
            return
        self.state = "closed"
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


async def _bounded(aw, timeout: float, what: str, on_late=None):
    """Await a worker-thread call for at most ``timeout`` s; past it, DeviceError(what). The
    thread cannot be stopped: ``on_late(result)`` disposes of a result that comes later."""
    fut = asyncio.ensure_future(aw)

    def late(f: asyncio.Future) -> None:
        if not f.cancelled() and f.exception() is None and on_late is not None:
            try:
                on_late(f.result())
            except Exception as e:
                log.debug("disposing of a late result failed: %s", e)
    try:
        done, _ = await asyncio.wait({fut}, timeout=timeout)
    except asyncio.CancelledError:  # e.g. a barge-in while reopening: nobody takes the result
        fut.add_done_callback(late)
        raise
    if fut in done:
        return fut.result()
    fut.add_done_callback(late)
    raise DeviceError(f"{what} within {timeout:g} s; check that it is plugged in and working "
                      "(`rkvlm-assistant devices`)")
