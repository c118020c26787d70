"""Wyoming ``tts``: text-to-speech with the assistant's piper voices.

- ``synthesize`` -> ``audio-start``, ``audio-chunk``s, ``audio-stop``: the text is cut into
  sentences as the voice loop cuts an answer (markdown and emoji dropped), spoken one after
  another with ``tts.sentence_pause_ms`` between them, each sent as its chunks come out of
  the voice (a split voice gives the first sound after a fraction of the sentence).
- ``synthesize-start``, ``synthesize-chunk``s, ``synthesize-stop`` -> one ``audio-start`` /
  chunks / ``audio-stop`` per sentence as soon as the text completes it, then
  ``synthesize-stopped``. The ``synthesize`` a client sends inside the stream (for servers
  that do not stream) is ignored. Each chunk's text is scanned once (the splitter looks only
  at what is new); text with no sentence end is spoken a piece at a time once it reaches
  the splitter's cap (``sentences.MAX_PIECE``), so what waits is never longer than that. A
  chunk longer than ``INLINE_CHARS`` is split in a worker thread, off the event loop.

Every text goes to piper in pieces of at most ``MAX_PIECE`` characters (piper's memory grows
with the square of a piece's length), cut at clauses or words where it can.

``voice``: ``name`` (a configured voice, by its file name or its tts.voice value) or
``language`` (zh picks tts.voice_zh); neither: the default voice. Audio goes out at the
voice's own rate, 16-bit mono.

Piper runs on the process's speech workers (``frontend.MediaWork``) in line with HTTP's
speech and transcriptions: a ``synthesize`` is one job, a stream's sentence is one (a
client slow to send its text holds no worker). Past the line or ``http.audio_deadline_s``
the client gets an ``error`` (code ``busy`` or ``deadline_exceeded``), then the
``audio-stop`` that ends the audio it waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Iterator, Optional

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.tts import SynthesizeStopped

from assistant.audio.sentences import SentenceSplitter
from assistant.errors import AssistantError
from assistant.frontend import voice_names
from assistant.wyoming.events import (ProtocolError, error_code, language_code, object_field,
                                      text_field)

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 10_000
SAMPLES_PER_CHUNK = 2048
INLINE_CHARS = 1024     # a streamed chunk up to this long is split on the loop (bounded work)


class TtsSession:
    def __init__(self, services, send):
        self.services = services
        self.send = send
        self.splitter: Optional[SentenceSplitter] = None    # a stream is open
        self.synth = None
        self.spoken = 0                                      # sentences of this stream

    async def on_event(self, event: Event) -> bool:
        kind = event.type
        if kind == "synthesize":
            if self.splitter is None:
                with _ended_by_audio_stop():
                    await self._synthesize(event)
        elif kind == "synthesize-start":
            self.synth = self._voice(event)
            self.splitter, self.spoken = SentenceSplitter(), 0
        elif kind == "synthesize-chunk":
            text = text_field(event)
            splitter = self._stream(event)
            pieces = (splitter.feed(text) if len(text) <= INLINE_CHARS
                      else await asyncio.to_thread(splitter.feed, text))
            for sentence in pieces:
                await self._sentence(sentence)
        elif kind == "synthesize-stop":
            splitter = self._stream(event)
            for sentence in splitter.flush():
                await self._sentence(sentence)
            self.splitter = None
            await self.send(SynthesizeStopped().event())
        else:
            return False
        return True

    def _stream(self, event: Event) -> SentenceSplitter:
        if self.splitter is None:
            raise ProtocolError(f"{event.type} outside a stream: send synthesize-start first")
        return self.splitter

    async def _synthesize(self, event: Event) -> None:
        text = text_field(event)
        if len(text) > MAX_TEXT_CHARS:
            raise ProtocolError(f"synthesize: the text is {len(text)} characters; the limit "
                                f"is {MAX_TEXT_CHARS}", "text_too_long")
        synth = self._voice(event)

        def speech() -> Iterator[np.ndarray]:
            # Split on the speech worker: the work grows with the text.
            splitter = SentenceSplitter()
            sentences = splitter.feed(text) + splitter.flush()
            for i, sentence in enumerate(sentences):
                if i:
                    yield synth.silence()
                yield from (chunk.pcm for chunk in synth.stream(sentence))

        await self._audio(synth, speech)

    async def _sentence(self, sentence: str) -> None:
        """One sentence of a stream: its own audio-start / chunks / audio-stop."""
        synth, pause = self.synth, self.spoken > 0
        self.spoken += 1

        def speech() -> Iterator[np.ndarray]:
            if pause:
                yield synth.silence()
            yield from (chunk.pcm for chunk in synth.stream(sentence))

        with _ended_by_audio_stop():
            await self._audio(synth, speech)

    async def _audio(self, synth, speech) -> None:
        """``audio-start``, the chunks of ``speech()``, ``audio-stop``. ``speech`` is one job
        on the speech workers and each chunk is sent as it is made (a split voice's first
        after a fraction of a sentence); ``audio-start`` waits for the job to start, so a
        refused one is an ``error`` and the ``audio-stop`` alone."""
        services = self.services
        started = False
        async with contextlib.aclosing(services.media.stream(
                "tts", speech, max_wait_s=services.max_wait_s)) as pcms:
            async for pcm in pcms:
                if not started:
                    await self.send(self._start(synth))
                    started = True
                await self._send_pcm(synth, pcm)
        if not started:
            await self.send(self._start(synth))
        await self.send(AudioStop().event())

    @staticmethod
    def _start(synth) -> Event:
        return AudioStart(rate=synth.sample_rate, width=2, channels=1).event()

    async def _send_pcm(self, synth, pcm: np.ndarray) -> None:
        data = np.asarray(pcm, dtype="<i2").tobytes()
        step = SAMPLES_PER_CHUNK * 2
        for i in range(0, len(data), step):
            await self.send(AudioChunk(rate=synth.sample_rate, width=2, channels=1,
                                       audio=data[i:i + step]).event())

    def _voice(self, event: Event):
        voices = self.services.voices
        if voices is None:
            raise ProtocolError("no piper voice is loaded", "tts_not_available")
        wanted = object_field(event, "voice")
        name = wanted.get("name")
        if name:
            names = voice_names(self.services.cfg, voices)
            if name not in names:
                raise ProtocolError(f"{event.type}: unknown voice {name!r}; use one of: "
                                    f"{', '.join(sorted(names))}", "unknown_voice")
            return names[name]
        language = wanted.get("language")
        return voices.for_language(language_code(language) if isinstance(language, str)
                                   else None)


@contextlib.contextmanager
def _ended_by_audio_stop():
    """A failure as an ``error`` event followed by the ``audio-stop`` the client waits for
    (Home Assistant's does)."""
    try:
        yield
    except (ProtocolError, AssistantError) as e:
        raise ProtocolError(str(e), error_code(e), then=(AudioStop().event(),)) from None
