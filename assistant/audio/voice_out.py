"""The speaking stage: sentences -> piper (worker thread) -> resample -> sink.

Synthesis of the next sentence overlaps playback of the current one, so the first sentence
is heard while the LLM is still writing the rest. ``speaking`` tells the listener to gate the
microphone (no barge-in) or to watch for an interruption (barge-in).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Iterable, Optional, Union

import numpy as np

from assistant.audio.base import AudioSink
from assistant.audio.resample import resample
from assistant.errors import AssistantError
from assistant.turn import Turn

log = logging.getLogger(__name__)

# After the last sample, the room still echoes the answer for a moment: keep the mic gated.
_ECHO_HOLD_S = 0.25

Sentences = Union[Iterable[str], AsyncIterator[str], "asyncio.Queue[Optional[str]]"]


class VoiceOut:
    def __init__(self, voices, sink: AudioSink, pause_ms: int = 150):
        self.voices = voices          # .for_language(lang) -> synthesizer with .synthesize, .sample_rate
        self.sink = sink
        self.pause_ms = pause_ms
        self._speaking_until = 0.0
        self._active = 0
        self._interrupted = False

    @property
    def speaking(self) -> bool:
        return self._active > 0 or time.monotonic() < self._speaking_until

    def interrupt(self) -> None:
        """Stop talking now (barge-in): the chunk playing is cut, the rest is dropped."""
        if self._active:
            self._interrupted = True
            self.sink.stop()

    async def say(self, sentences: Sentences, language: str = "en", turn: Optional[Turn] = None) -> float:
        """Speak the sentences in order; returns the seconds of audio actually played."""
        audio: asyncio.Queue = asyncio.Queue(maxsize=2)
        self._interrupted = False
        synth = asyncio.ensure_future(self._synthesize(sentences, language, audio, turn))
        try:
            return await self._play(audio, turn)
        finally:
            if not synth.done():
                synth.cancel()
            try:
                await synth
            except asyncio.CancelledError:
                pass

    async def _iterate(self, sentences: Sentences) -> AsyncIterator[str]:
        if isinstance(sentences, asyncio.Queue):
            while (s := await sentences.get()) is not None:
                yield s
        elif hasattr(sentences, "__aiter__"):
            async for s in sentences:
                yield s
        else:
            for s in sentences:
                yield s

    async def _synthesize(self, sentences: Sentences, language: str, audio: asyncio.Queue,
                          turn: Optional[Turn]) -> None:
        try:
            tts = self.voices.for_language(language)
            async for sentence in self._iterate(sentences):
                if not sentence.strip() or self._interrupted:
                    continue
                t0 = time.monotonic()
                try:
                    pcm = await asyncio.to_thread(tts.synthesize, sentence)
                except AssistantError as e:
                    log.error("speech synthesis failed: %s", e)
                    continue
                if turn is not None:
                    turn.add("tts", time.monotonic() - t0)
                if len(pcm) and tts.sample_rate != self.sink.sample_rate:
                    pcm = resample(pcm, tts.sample_rate, self.sink.sample_rate)
                await audio.put(pcm)
        finally:
            await audio.put(None)

    async def _play(self, audio: asyncio.Queue, turn: Optional[Turn]) -> float:
        played = 0.0
        gap = np.zeros(int(self.sink.sample_rate * self.pause_ms / 1000), dtype=np.int16)
        first = True
        self._active += 1
        try:
            while (pcm := await audio.get()) is not None:
                if self._interrupted:
                    continue
                if turn is not None:
                    turn.mark("first_audio")
                if not first and len(gap):
                    await self.sink.play(gap)
                first = False
                try:
                    played += await self.sink.play(pcm)
                except AssistantError as e:
                    # A speaker that went away must not end the conversation: the answer is
                    # still in the log and the transcript.
                    log.error("cannot play the answer: %s", e)
                    self._interrupted = True
        finally:
            self._active -= 1
            self._speaking_until = time.monotonic() + _ECHO_HOLD_S
        return played
