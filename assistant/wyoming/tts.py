"""Wyoming ``tts``: text-to-speech with the assistant's piper voices.

- ``synthesize`` -> ``audio-start``, ``audio-chunk``s, ``audio-stop``: the text is cut into
  sentences as the voice loop cuts an answer (markdown and emoji dropped), spoken one after
  another with ``tts.sentence_pause_ms`` between them, each sent as its chunks come out of
  the voice (a split voice gives the first sound after a fraction of the sentence).
- ``synthesize-start``, ``synthesize-chunk``s, ``synthesize-stop`` -> one ``audio-start`` /
  chunks / ``audio-stop`` per sentence as soon as the text completes it, then
  ``synthesize-stopped``. The ``synthesize`` a client sends inside the stream (for servers
  that do not stream) is ignored.

``voice``: ``name`` (a configured voice, by its file name or its tts.voice value) or
``language`` (zh picks tts.voice_zh); neither: the default voice. Audio goes out at the
voice's own rate, 16-bit mono.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import AsyncIterator, Optional

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.tts import SynthesizeStopped

from assistant.audio.sentences import SentenceSplitter
from assistant.errors import AssistantError
from assistant.health import HEALTH
from assistant.wyoming.events import ProtocolError, language_code, object_field, text_field

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 10_000
SAMPLES_PER_CHUNK = 2048


def voices_by_name(cfg, voices) -> dict:
    """Configured voice name -> synthesizer: its file name and the config value."""
    if voices is None:
        return {}
    out = {}
    for value, synth in ((cfg.tts.voice, voices.default), (cfg.tts.voice_zh, voices.zh)):
        if synth is None:
            continue
        out[synth.name] = synth
        if value:
            out.setdefault(Path(str(value)).name.removesuffix(".onnx"), synth)
    return out


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
                try:
                    await self._synthesize(event)
                except (ProtocolError, AssistantError) as e:
                    # After the error, the audio-stop the client waits for.
                    raise ProtocolError(str(e), getattr(e, "code", type(e).__name__),
                                        then=(AudioStop().event(),)) from None
        elif kind == "synthesize-start":
            self.synth = self._voice(event)
            self.splitter, self.spoken = SentenceSplitter(), 0
        elif kind == "synthesize-chunk":
            text = text_field(event)
            splitter = self._stream(event)
            for sentence in splitter.feed(text):
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
        splitter = SentenceSplitter()
        sentences = splitter.feed(text) + splitter.flush()
        await self.send(self._start(synth))
        for i, sentence in enumerate(sentences):
            if i:
                await self._send_pcm(synth, synth.silence())
            async for pcm in self._speech(synth, sentence):
                await self._send_pcm(synth, pcm)
        await self.send(AudioStop().event())

    async def _sentence(self, sentence: str) -> None:
        """One sentence of a stream: its own audio-start / chunks / audio-stop."""
        synth = self.synth
        await self.send(self._start(synth))
        if self.spoken:
            await self._send_pcm(synth, synth.silence())
        self.spoken += 1
        async for pcm in self._speech(synth, sentence):
            await self._send_pcm(synth, pcm)
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

    @staticmethod
    async def _speech(synth, text: str) -> AsyncIterator[np.ndarray]:
        """The sentence's audio chunk by chunk, each made in a worker thread and watched
        like the voice loop's (deadlines.tts_s; a stuck call restarts)."""
        chunks = synth.stream(text)
        while True:
            chunk = await HEALTH.call("tts", next, chunks, None)
            if chunk is None:
                return
            yield chunk.pcm

    def _voice(self, event: Event):
        voices = self.services.voices
        if voices is None:
            raise ProtocolError("no piper voice is loaded", "tts_not_available")
        wanted = object_field(event, "voice")
        name = wanted.get("name")
        if name:
            names = voices_by_name(self.services.cfg, voices)
            if name not in names:
                raise ProtocolError(f"{event.type}: unknown voice {name!r}; use one of: "
                                    f"{', '.join(sorted(names))}", "unknown_voice")
            return names[name]
        language = wanted.get("language")
        return voices.for_language(language_code(language) if isinstance(language, str)
                                   else None)
