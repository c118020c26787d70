"""The speaking stage: sentences -> piper (worker thread) -> resample -> sink.

Synthesis of the next sentence overlaps playback of the current one, so the first sentence
is heard while the LLM is still writing the rest. ``speaking`` is true from the first sound
to a short echo tail after the last one: the listener gates the microphone then (no
barge-in) or watches for the person talking over it (barge-in). A thinking assistant is not
speaking, so a cough while it thinks cuts nothing.

Each sentence is spoken by the voice of its script: a sentence with Chinese characters by
the Chinese voice, any other by the default voice, so the Chinese voice never reads English.
``say`` returns what was actually heard: after a barge-in, the sentences played whole plus
the played share of the one that was cut, so the conversation keeps only that.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Optional, Union

import numpy as np

from assistant.audio.base import SAMPLE_RATE, AudioSink
from assistant.audio.echo import EchoGuard
from assistant.audio.resample import resample
from assistant.errors import AssistantError
from assistant.turn import Turn

log = logging.getLogger(__name__)

# After the last sample, the room still echoes the answer for a moment: keep the mic gated.
_ECHO_HOLD_S = 0.25

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

Sentences = Union[Iterable[str], AsyncIterator[str], "asyncio.Queue[Optional[str]]"]


def script_language(sentence: str) -> str:
    """zh for a sentence with Chinese characters, en for any other."""
    return "zh" if _CJK.search(sentence) else "en"


def spoken_part(sentence: str, share: float) -> str:
    """The first ``share`` of a sentence, ending at a word (or character) boundary."""
    if share >= 0.999:
        return sentence
    n = int(len(sentence) * max(share, 0.0))
    if n <= 0:
        return ""
    if script_language(sentence) == "zh":
        return sentence[:n]
    cut = sentence.rfind(" ", 0, n + 1)
    return sentence[:cut] if cut > 0 else ""


@dataclass
class Spoken:
    seconds: float = 0.0
    text: str = ""
    interrupted: bool = False


class VoiceOut:
    def __init__(self, voices, sink: AudioSink, pause_ms: int = 150,
                 echo: Optional[EchoGuard] = None):
        self.voices = voices          # .for_language(lang) -> synthesizer with .synthesize, .sample_rate
        self.sink = sink
        self.pause_ms = pause_ms
        self.echo = echo              # told what is played, to recognise it in the microphone
        self._speaking_until = 0.0
        self._playing = 0
        self._saying = 0
        self._interrupted = False

    @property
    def speaking(self) -> bool:
        """Sound is coming out of the speaker (or its echo is still in the room)."""
        return self._playing > 0 or time.monotonic() < self._speaking_until

    @property
    def busy(self) -> bool:
        """An answer is being spoken or about to be (synthesis under way)."""
        return self._saying > 0

    def interrupt(self) -> None:
        """Stop talking now (barge-in): the chunk playing is cut, the rest is dropped."""
        if self._saying:
            self._interrupted = True
            self.sink.stop()

    async def say(self, sentences: Sentences, language: str = "en",
                  turn: Optional[Turn] = None) -> Spoken:
        """Speak the sentences in order; returns what was actually played."""
        audio: asyncio.Queue = asyncio.Queue(maxsize=2)
        self._interrupted = False
        self._saying += 1
        synth = asyncio.ensure_future(self._synthesize(sentences, language, audio, turn))
        try:
            return await self._play(audio, turn)
        finally:
            self._saying -= 1
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

    def _render(self, sentence: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Synthesise and resample to the sink's rate, and to 16 kHz for the echo guard
        (worker thread)."""
        tts = self.voices.for_language(script_language(sentence))
        speech = tts.synthesize(sentence)
        pcm = speech
        if len(pcm) and tts.sample_rate != self.sink.sample_rate:
            pcm = resample(speech, tts.sample_rate, self.sink.sample_rate)
        ref = None
        if self.echo is not None and len(speech):
            ref = (speech if tts.sample_rate == SAMPLE_RATE
                   else resample(speech, tts.sample_rate, SAMPLE_RATE))
        return pcm, ref

    async def _synthesize(self, sentences: Sentences, language: str, audio: asyncio.Queue,
                          turn: Optional[Turn]) -> None:
        async for sentence in self._iterate(sentences):
            if not sentence.strip() or self._interrupted:
                continue
            t0 = time.monotonic()
            try:
                from assistant.health import HEALTH  # deadlines.tts_s; stuck: a restart
                pcm, ref = await HEALTH.call("tts", self._render, sentence)
            except AssistantError as e:
                log.error("speech synthesis failed: %s", e)
                continue
            if turn is not None:
                turn.add("tts", time.monotonic() - t0)
            await audio.put((sentence, pcm, ref))
        # Only on a normal end: a cancelled producer has no consumer left to wait for.
        await audio.put(None)

    async def _play(self, audio: asyncio.Queue, turn: Optional[Turn]) -> Spoken:
        out = Spoken()
        heard: list[str] = []
        gap = np.zeros(int(self.sink.sample_rate * self.pause_ms / 1000), dtype=np.int16)
        first = True
        try:
            while (item := await audio.get()) is not None:
                sentence, pcm, ref = item
                if self._interrupted:
                    continue
                if turn is not None:
                    turn.mark("first_audio")
                if not self._playing:
                    self._playing += 1
                try:
                    if not first and len(gap):
                        await self.sink.play(gap)
                    first = False
                    if self.echo is not None and ref is not None:
                        self.echo.played(ref)
                    played = await self.sink.play(pcm)
                except AssistantError as e:
                    # A speaker that went away must not end the conversation: the answer is
                    # still in the log and the transcript.
                    log.error("cannot play the answer: %s", e)
                    self._interrupted = True
                    continue
                out.seconds += played
                total = len(pcm) / self.sink.sample_rate if len(pcm) else 0.0
                share = played / total if total else 1.0
                part = spoken_part(sentence, share) if self._interrupted else sentence
                if part:
                    heard.append(part)
        finally:
            if self._playing:
                self._playing -= 1
                self._speaking_until = time.monotonic() + _ECHO_HOLD_S
        out.interrupted = self._interrupted
        out.text = " ".join(heard)
        return out
