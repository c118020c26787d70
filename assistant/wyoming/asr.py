"""Wyoming ``asr``: speech-to-text with the assistant's whisper.

``transcribe`` (optional ``language``), ``audio-start``, ``audio-chunk``s, ``audio-stop`` ->
``transcript``. Audio of any rate, width (1, 2 or 4 bytes) and channel count is mixed down
and resampled to whisper's 16 kHz as it arrives (``StreamResampler``: no clicks at chunk
edges). The streaming variant is always sent: ``transcript-start`` when the audio starts,
then at ``audio-stop`` the text as a ``transcript-chunk``, the ``transcript`` and
``transcript-stop``. Whisper reads the utterance as a whole, so the text comes in one chunk
once the audio has ended; clients that do not stream read only the ``transcript``.

Audio is measured before it is converted: a chunk's duration comes from its announced
format (rate, width, channels) and its length, so ``wyoming.max_audio_s`` refuses it before
any work, however low the announced rate (1 kHz 8-bit would make 16 MB into 268 million
samples at 16 kHz). Conversion and resampling run in a worker thread, never on the loop. A
connection has one audio stream: an ``audio-start`` drops the audio of one left open.

Whisper's verdict is kept: audio it judges not to be speech (silence, noise, its
"Thank you." for a fan) gives an empty transcript, as the HTTP API's does. Whisper runs on
the process's speech workers (``frontend.MediaWork``) in line with HTTP's transcriptions and
speech: past the line or ``http.audio_deadline_s`` the client gets an ``error`` (code
``busy`` or ``deadline_exceeded``), then the empty transcript that ends its request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from wyoming.asr import Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.event import Event

from assistant.audio.base import SAMPLE_RATE
from assistant.audio.resample import StreamResampler, to_mono
from assistant.conversation import Busy
from assistant.errors import AssistantError
from assistant.wyoming.events import (ProtocolError, error_code, int_field, language_code,
                                      text_field)

log = logging.getLogger(__name__)

WIDTHS = (1, 2, 4)

# Conversion runs on one thread of its own: each thread allocates from its own malloc arena,
# and the blocks of many connections spread over the default executor's arenas left tens of
# MB that malloc_trim could not give back after the connections closed. A few ms of work per
# second of audio, so one thread keeps up with every connection.
_convert = ThreadPoolExecutor(1, thread_name_prefix="wyoming-audio")


async def off_loop(fn, *args):
    """``fn(*args)`` on the conversion thread."""
    return await asyncio.get_running_loop().run_in_executor(_convert, fn, *args)


def to_int16(audio: bytes, width: int, channels: int) -> np.ndarray:
    """Little-endian PCM of ``width`` bytes per sample, interleaved -> int16 mono."""
    frame = width * channels
    audio = audio[:len(audio) - len(audio) % frame]
    if width == 1:                      # unsigned 8-bit
        x = (np.frombuffer(audio, np.uint8).astype(np.int16) - 128) << 8
    elif width == 2:
        x = np.frombuffer(audio, "<i2")
    else:
        x = (np.frombuffer(audio, "<i4") >> 16).astype(np.int16)
    return to_mono(x.reshape(-1, channels)).astype(np.int16, copy=False)


class AsrSession:
    def __init__(self, services, send):
        self.services = services
        self.send = send
        self.language: Optional[str] = None
        self.held = 0               # the most bytes of audio one stream held (memtrim)
        self._reset()

    def _reset(self) -> None:
        self.format: Optional[tuple[int, int, int]] = None
        self.resampler: Optional[StreamResampler] = None
        self.blocks: list[np.ndarray] = []
        self.seconds = 0.0          # announced duration so far (before any conversion)
        self.nbytes = 0             # of blocks
        self.refused = False        # too long: the rest of this audio is dropped

    async def on_event(self, event: Event) -> bool:
        kind = event.type
        if kind == "transcribe":
            self.language = language_code(text_field(event, "language", required=False))
            self._check_language()
        elif kind == "audio-start":
            self._reset()
            await self._start(self._format(event))
        elif kind == "audio-chunk":
            await self._chunk(event)
        elif kind == "audio-stop":
            await self._stop()
        else:
            return False
        return True

    # ------------------------------------------------------------------ audio in

    def _format(self, event: Event) -> tuple[int, int, int]:
        rate = int_field(event, "rate", 1000, 384000)
        width = int_field(event, "width", 1, 4)
        if width not in WIDTHS:
            raise ProtocolError(f"{event.type}: sample width {width} bytes is not supported "
                                f"(1, 2 or 4)")
        return rate, width, int_field(event, "channels", 1, 32)

    async def _start(self, fmt: tuple[int, int, int]) -> None:
        if self.services.asr is None:
            raise ProtocolError("no speech recognition model is loaded", "asr_not_available")
        self.format = fmt
        self.resampler = StreamResampler(fmt[0], SAMPLE_RATE)
        await self.send(TranscriptStart(language=self.language).event())

    async def _chunk(self, event: Event) -> None:
        fmt = self._format(event)
        if self.format is None:                 # audio without audio-start: its own start
            await self._start(fmt)
        elif fmt != self.format:                # a new format mid-stream: a new filter
            await off_loop(self._flush)
            self.format, self.resampler = fmt, StreamResampler(fmt[0], SAMPLE_RATE)
        if self.refused:
            return
        audio = event.payload or b""
        rate, width, channels = fmt
        self.seconds += len(audio) // (width * channels) / rate
        limit = self.services.cfg.wyoming.max_audio_s
        if self.seconds > limit:                # before any work on it
            self.refused = True
            self.blocks.clear()
            raise ProtocolError(f"the audio is longer than {limit:g} s (wyoming.max_audio_s); "
                                f"send a shorter recording", "audio_too_long")
        resampler = self.resampler
        pcm = await off_loop(lambda: resampler.process(to_int16(audio, width, channels)))
        self.blocks.append(pcm)
        self.nbytes += pcm.nbytes
        self.held = max(self.held, self.nbytes)

    def _flush(self) -> None:
        if self.resampler is not None:
            self.blocks.append(self.resampler.flush(np.int16))

    def _whole(self) -> np.ndarray:
        """The stream's audio in one array (in a worker thread: it copies all of it)."""
        self._flush()
        return np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.int16)

    def close(self) -> None:
        """The connection ended: the audio of a stream left open is dropped."""
        self._reset()

    # ------------------------------------------------------------------ text out

    async def _stop(self) -> None:
        if self.format is None:
            raise ProtocolError("audio-stop without audio: send audio-start and audio-chunk "
                                "events first")
        refused = self.refused
        pcm = await off_loop(self._whole)
        text, language = "", self.language
        self._reset()
        self.language = None            # a transcribe event is for one audio stream
        # Refused audio: the error said why, and an empty transcript still ends the request
        # for clients that wait for one (Home Assistant does).
        if len(pcm) and not refused:
            def work():
                t0 = time.monotonic()
                return self.services.asr.transcribe(pcm, language), time.monotonic() - t0

            try:
                heard, took = await self.services.media.run(
                    "asr", work, max_wait_s=self.services.max_wait_s)
            except AssistantError as e:
                why = str(e) if isinstance(e, Busy) else f"speech recognition failed: {e}"
                raise ProtocolError(why, error_code(e), then=(Transcript(text="").event(),
                                                              TranscriptStop().event())) from None
            text, language = (heard.text if heard.accepted else ""), heard.language
            log.info("wyoming transcription: %.1f s of audio in %.2f s: %r (%s)",
                     len(pcm) / SAMPLE_RATE, took, heard.text, heard.reason)
        if text:
            await self.send(TranscriptChunk(text).event())
        await self.send(Transcript(text=text, language=language).event())
        await self.send(TranscriptStop().event())

    def _check_language(self) -> None:
        lang, asr = self.language, self.services.asr
        if lang is None or lang == "en" or asr is None:
            return
        if not asr.multilingual:
            self.language = None
            raise ProtocolError(f"the whisper model is English-only; it cannot transcribe "
                                f"language {lang!r} (set asr.model to a multilingual model)",
                                "language_not_supported")
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        if lang not in _LANGUAGE_CODES:
            self.language = None
            raise ProtocolError(f"language {lang!r} is not one whisper knows (an ISO-639-1 "
                                f"code such as en or zh)", "language_not_supported")
