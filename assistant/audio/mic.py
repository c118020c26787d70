"""The microphone: a sounddevice input stream -> 16 kHz mono int16 frames of a fixed size.

The stream runs at a rate the device offers (``audio.input.sample_rate``, else the device's
default) with the configured channel count. PortAudio's callback thread only copies each
block and hands it to the event loop (``call_soon_threadsafe``); mixdown, streaming
resampling to 16 kHz and cutting into exact frames happen in ``frames()`` on the loop.

Overflows (the device dropped samples) and a consumer that falls more than
``max_backlog_s`` behind (new blocks are dropped) are logged, not fatal. A device that goes
away -- the stream ends by itself or no audio arrives for ``stall_timeout_s`` -- raises
DeviceError from ``frames()``; ``close()`` then ``open()`` reconnects (open() raises
DeviceError naming the device while it is still away), and a new ``frames()`` delivers the
device's audio again. Blocks the old stream handed over late are dropped, never mixed in.

There is no mute: while the assistant speaks the pipeline keeps reading and discards the
frames (or feeds them to barge-in detection), so the backlog never grows.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, AsyncIterator

import numpy as np

from assistant.audio.base import SAMPLE_RATE, AudioSource
from assistant.audio.devices import import_sounddevice, open_params
from assistant.audio.resample import StreamResampler
from assistant.config import AudioInputConfig
from assistant.errors import DeviceError

log = logging.getLogger(__name__)

_CLOSED = object()  # queued by close(): frames() ends quietly


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _mixdown(block: np.ndarray) -> np.ndarray:
    """(frames, channels) int16 -> mono: int16 as is, or the channel mean as float (the
    resampler rounds once, at the end)."""
    if block.shape[1] == 1:
        return block[:, 0]
    return block.astype(np.float32).mean(axis=1)


class MicSource(AudioSource):
    """A sounddevice microphone behind the AudioSource interface."""

    def __init__(self, cfg: AudioInputConfig, frame_ms: int = 30, max_backlog_s: float = 10.0,
                 stall_timeout_s: float = 5.0):
        super().__init__(frame_ms)
        self.cfg = cfg
        self.max_backlog_s = max_backlog_s
        self.stall_timeout_s = stall_timeout_s
        self.name = f"mic:{cfg.device}"
        self.sample_rate = 0  # the device's rate, once open
        self.channels = cfg.channels
        self.overflows = 0
        self.dropped_blocks = 0
        self._stream: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._resampler: StreamResampler | None = None
        self._closing = False
        # Blocks handed to the loop but not yet taken: bounds memory on PortAudio's side when
        # the loop is slow or a device delivers faster than real time.
        self._in_flight = 0
        self._max_in_flight = 1
        self._last_block = 0.0
        self._stall_timer: asyncio.TimerHandle | None = None
        # Which open() a callback belongs to: after a reopen, late calls of the old stream
        # (already queued on the loop) must not feed the new queue.
        self._generation = 0

    async def open(self) -> None:
        if self._stream is not None:
            return
        sd = import_sounddevice()
        index, info, device_name, rate = await asyncio.to_thread(
            open_params, self.cfg.device, "input", self.cfg.sample_rate)
        if self.cfg.channels > int(info["max_input_channels"]):
            raise DeviceError(f"audio.input.channels: {self.cfg.channels} channels asked, but "
                              f"{device_name!r} has {int(info['max_input_channels'])}; lower it")
        blocksize = rate * self.frame_ms // 1000
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=max(1, int(self.max_backlog_s * 1000 / self.frame_ms)))
        self._max_in_flight = self._queue.maxsize
        self._in_flight = 0
        self._resampler = StreamResampler(rate, SAMPLE_RATE)
        self._closing = False
        self._generation += 1
        generation = self._generation

        def start() -> Any:
            # int16: what USB microphones deliver and the pipeline uses, so ALSA's plug layer
            # has no format conversion to do.
            stream = sd.InputStream(device=index, samplerate=rate, channels=self.cfg.channels,
                                    dtype="int16", blocksize=blocksize,
                                    callback=functools.partial(self._callback, generation),
                                    finished_callback=functools.partial(self._finished, generation))
            stream.start()
            return stream

        try:
            self._stream = await asyncio.to_thread(start)
        except sd.PortAudioError as e:
            raise DeviceError(
                f"cannot open the microphone {device_name!r} at {rate} Hz with "
                f"{self.cfg.channels} channel(s): {e}; check that it is plugged in and not in use "
                "by another program, and that audio.input.sample_rate / channels are values it "
                "supports (see `rkvlm-assistant devices`)") from None
        self.name = f"mic:{device_name}"
        self.sample_rate = rate
        self._last_block = self._loop.time()
        self._stall_timer = self._loop.call_later(self.stall_timeout_s, self._check_stall)
        log.info("microphone %r: %d Hz, %d channel(s) -> %d Hz mono, %d ms frames",
                 device_name, rate, self.cfg.channels, SAMPLE_RATE, self.frame_ms)

    # ------------------------------------------------------------------ PortAudio's thread

    def _callback(self, generation: int, indata: np.ndarray, frames: int, time_info: Any,
                  status: Any) -> None:
        # Nothing here may block or log: copy (PortAudio reuses the buffer) and hand over.
        loop = self._loop
        if loop is None or generation != self._generation:
            return
        if self._in_flight >= self._max_in_flight:
            # The loop is not taking blocks: drop here rather than pile up callbacks (the
            # count is approximate across threads, which is all a bound needs).
            self.dropped_blocks += 1
            return
        self._in_flight += 1
        try:
            loop.call_soon_threadsafe(self._on_block, generation, indata.copy(),
                                      bool(status.input_overflow))
        except RuntimeError:  # the loop is closed: we are shutting down
            pass

    def _finished(self, generation: int) -> None:
        loop = self._loop
        if self._closing or loop is None or generation != self._generation:
            return
        error = DeviceError(f"{self.name}: the microphone stopped (unplugged or failed); plug it "
                            "back in and check `rkvlm-assistant devices`")
        try:
            loop.call_soon_threadsafe(self._push, error)
        except RuntimeError:
            pass

    # ------------------------------------------------------------------ the event loop

    def _on_block(self, generation: int, block: np.ndarray, overflow: bool) -> None:
        if generation != self._generation:
            return  # from the stream before a reopen (its in-flight count was reset)
        self._in_flight -= 1
        if self._loop is not None:
            self._last_block = self._loop.time()
        if overflow:
            self.overflows += 1
            if _is_power_of_two(self.overflows):  # 1, 2, 4, 8...: visible, never a flood
                log.warning("%s: input overflow, the device dropped audio (%d so far)",
                            self.name, self.overflows)
        if self._queue is None or self._closing:
            return
        try:
            self._queue.put_nowait(block)
        except asyncio.QueueFull:
            self.dropped_blocks += 1
            if _is_power_of_two(self.dropped_blocks):
                log.warning("%s: the pipeline is %.0f s behind, dropping new audio (%d blocks so "
                            "far)", self.name, self.max_backlog_s, self.dropped_blocks)

    def _push(self, item: object) -> None:
        """Queue a control item even when the queue is full (it replaces the oldest block)."""
        if self._queue is None:
            return
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    async def frames(self) -> AsyncIterator[bytes]:
        await self.open()
        queue, resampler = self._queue, self._resampler
        assert queue is not None and resampler is not None
        step = 2 * self.frame_samples
        pending = bytearray()
        while True:
            # A plain get(): asyncio.wait_for on Python 3.10/3.11 can swallow a cancellation
            # when the item arrives at the same moment, so stalls are found by _check_stall.
            item = await queue.get()
            if item is _CLOSED:
                return
            if isinstance(item, DeviceError):
                raise item
            pcm = resampler.process(_mixdown(item), dtype=np.int16)
            pending += pcm.astype("<i2", copy=False).tobytes()
            while len(pending) >= step:
                frame = bytes(pending[:step])
                del pending[:step]
                yield frame

    def _check_stall(self) -> None:
        """Timer on the loop: no block for stall_timeout_s means the device went away."""
        loop = self._loop
        if loop is None or self._closing or self._stream is None:
            return
        quiet = loop.time() - self._last_block
        if quiet >= self.stall_timeout_s:
            self._push(DeviceError(
                f"{self.name}: no audio for {self.stall_timeout_s:g} s; the microphone was "
                "unplugged or stopped working (check `rkvlm-assistant devices`)"))
            return
        self._stall_timer = loop.call_later(self.stall_timeout_s - quiet, self._check_stall)

    async def close(self) -> None:
        self._closing = True
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        stream, self._stream = self._stream, None
        if stream is not None:
            def stop() -> None:
                try:
                    stream.abort()  # no need to wait for the last block: we are done with it
                finally:
                    stream.close()
            try:
                await asyncio.to_thread(stop)
            except Exception as e:  # a vanished device can fail to close; nothing to recover
                log.debug("%s: error while closing: %s", self.name, e)
            log.info("%s closed", self.name)
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_CLOSED)
