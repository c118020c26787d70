"""The speaking stage: sentences -> piper (worker thread) -> resample -> sink.

Synthesis of the next sentence overlaps playback of the current one, so the first sentence
is heard while the LLM is still writing the rest; a voice that streams (tts.py) is played a
chunk at a time, from its first chunk. ``speaking`` is true from the first sound
to a short echo tail after the last one: the listener gates the microphone then (no
barge-in) or watches for the person talking over it (barge-in). A thinking assistant is not
speaking, so a cough while it thinks cuts nothing.

Each sentence is spoken by the voice of its script: a sentence with Chinese characters by
the Chinese voice, any other by the default voice, so the Chinese voice never reads English.
``say`` returns what was actually heard: after a barge-in, the sentences played whole plus
the played share of the one that was cut, so the conversation keeps only that.

Nothing that fails in one answer stops the speaking stage: a sentence that cannot be
synthesised is skipped, a speaker that fails stops the rest of that answer (it is not an
interruption), the end of the audio is always marked, and ``Spoken.error`` tells the turn
what failed. ``progress_at`` (the last chunk synthesised or played) lets the daemon tell a
long answer from a stuck one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Iterator, Optional, Union

import numpy as np

from assistant.audio.base import SAMPLE_RATE, AudioSink
from assistant.audio.echo import EchoGuard
from assistant.audio.resample import StreamResampler, resample
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
    text: str = ""                 # what was heard (all of it, unless cut short)
    interrupted: bool = False      # cut by a barge-in (interrupt())
    speaker_failed: bool = False   # the speaker failed: the rest was not played
    error: str = ""                # the first failure (synthesis or speaker), for the turn's note


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
        self._speaker_failed = False
        self._error = ""
        self.progress_at = time.monotonic()   # the last chunk synthesised or played

    @property
    def speaking(self) -> bool:
        """Sound is coming out of the speaker (or its echo is still in the room)."""
        return self._playing > 0 or time.monotonic() < self._speaking_until

    def speaking_at(self, t: float) -> bool:
        """Was sound coming out at monotonic time ``t`` (now or before; a microphone frame
        read late was captured before it arrived)?"""
        return self._playing > 0 or t < self._speaking_until

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
        """Speak the sentences in order; returns what was actually played. Never raises
        (but for cancellation): a sentence that cannot be synthesised is skipped, a failing
        speaker stops the rest, and ``Spoken.error`` says what failed."""
        audio: asyncio.Queue = asyncio.Queue(maxsize=2)
        self._interrupted = False
        self._speaker_failed = False
        self._error = ""
        self._saying += 1
        self.progress_at = time.monotonic()
        synth = asyncio.ensure_future(self._synthesize(sentences, language, audio, turn))
        try:
            return await self._play(audio, turn)
        finally:
            self._saying -= 1
            if not synth.done():
                synth.cancel()
            # The producer ends (it may be waiting on a TTS call); its outcome never replaces
            # the answer or a cancellation of this call.
            await asyncio.gather(synth, return_exceptions=True)

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

    def _next_chunk(self, chunks, rate: int, to_sink: "_Resampler"
                    ) -> Optional[tuple[np.ndarray, Optional[np.ndarray], float]]:
        """The sentence's next chunk, synthesised and resampled to the sink's rate (and to
        16 kHz for the echo guard), with the share of the sentence it ends at (worker
        thread); None after the last."""
        chunk = next(chunks, None)
        if chunk is None:
            return None
        ref = None
        if self.echo is not None and len(chunk.pcm):
            # Each chunk whole, so the reference starts exactly when the chunk does (a stream
            # resampler would shift every chunk by its filter delay and blur the match).
            ref = chunk.pcm if rate == SAMPLE_RATE else resample(chunk.pcm, rate, SAMPLE_RATE)
        return to_sink(chunk.pcm, chunk.end >= 1.0), ref, chunk.end

    async def _synthesize(self, sentences: Sentences, language: str, audio: asyncio.Queue,
                          turn: Optional[Turn]) -> None:
        """Each sentence's audio into ``audio``, then the end marker (None). Whatever fails,
        the marker is sent: the player never waits for audio that will not come. A sentence
        that cannot be spoken is skipped and the failure kept for the turn (``Spoken.error``)."""
        try:
            async for sentence in self._iterate(sentences):
                if sentence.strip() and not self._stopped:
                    await self._synthesize_one(sentence, audio, turn)
        except Exception as e:      # the sentences' source failed: what came is spoken
            self._failed(f"the answer's sentences failed ({type(e).__name__}: {e})", e)
        # Only on a normal end: a cancelled producer has no consumer left to wait for.
        await audio.put(None)

    async def _synthesize_one(self, sentence: str, audio: asyncio.Queue,
                              turn: Optional[Turn]) -> None:
        from assistant.health import HEALTH  # deadlines.tts_s; stuck: a restart

        start = 0.0
        try:
            tts = self.voices.for_language(script_language(sentence))
            stream = getattr(tts, "stream", None)
            chunks = stream(sentence) if stream is not None else _whole(tts, sentence)
            to_sink = _Resampler(tts.sample_rate, self.sink.sample_rate)
            while not self._stopped:
                t0 = time.monotonic()
                item = await HEALTH.call("tts", self._next_chunk, chunks,
                                         tts.sample_rate, to_sink)
                if turn is not None:
                    turn.add("tts", time.monotonic() - t0)
                if item is None:
                    return
                pcm, ref, end = item
                self.progress_at = time.monotonic()
                await audio.put((sentence, pcm, ref, start, end))
                start = end
        except Exception as e:      # piper, the resampler, a deadline: this sentence only
            why = str(e) if isinstance(e, AssistantError) else f"{type(e).__name__}: {e}"
            self._failed(f"speech synthesis failed ({why}) on {sentence[:60]!r}", e)

    def _failed(self, what: str, e: BaseException, speaker: bool = False) -> None:
        """Keep the first failure of this answer for the turn; log it once (a traceback for
        anything that is not one of ours)."""
        if speaker:
            self._speaker_failed = True
        if self._error:
            log.debug("also: %s", what)
            return
        self._error = what
        if isinstance(e, AssistantError):
            log.error("%s", what)
        else:
            log.error("%s", what, exc_info=e)

    @property
    def _stopped(self) -> bool:
        """Nothing more is played: a barge-in, or a speaker that failed."""
        return self._interrupted or self._speaker_failed

    async def _play(self, audio: asyncio.Queue, turn: Optional[Turn]) -> Spoken:
        out = Spoken()
        heard: list[str] = []
        partial: Optional[tuple[str, float]] = None   # a sentence begun, and the share played
        gap = np.zeros(int(self.sink.sample_rate * self.pause_ms / 1000), dtype=np.int16)
        first = True
        # When a chunk is handed over with more to follow, the device plays the next one
        # right after it: that is when the next one starts (for the echo guard's timeline).
        follows_at = 0.0
        try:
            while (item := await audio.get()) is not None:
                sentence, pcm, ref, start, end = item
                if self._stopped:
                    continue
                if turn is not None:
                    turn.mark("first_audio")
                if not self._playing:
                    self._playing += 1
                more = end < 1.0      # the sentence goes on: no gap, no draining in between
                try:
                    if start == 0.0 and not first and len(gap):
                        began = max(time.monotonic(), follows_at)
                        follows_at = began + await self.sink.play(gap, more=True)
                    first = False
                    began = max(time.monotonic(), follows_at)
                    if self.echo is not None and ref is not None:
                        self.echo.played(ref, started=began)
                    played = await self.sink.play(pcm, more=more)
                    follows_at = began + played if more else 0.0
                except Exception as e:
                    # A speaker that went away must not end the conversation: the answer is
                    # still in the log and the transcript. The rest of it is not played.
                    why = str(e) if isinstance(e, AssistantError) else f"{type(e).__name__}: {e}"
                    self._failed(f"the speaker failed ({why})", e, speaker=True)
                    continue
                self.progress_at = time.monotonic()
                out.seconds += played
                seconds = len(pcm) / self.sink.sample_rate
                share = start + (end - start) * (min(1.0, played / seconds) if seconds else 1.0)
                if share >= 0.999:
                    heard.append(sentence)
                    partial = None
                else:
                    partial = (sentence, share)
        finally:
            if self._playing:
                self._playing -= 1
                self._speaking_until = time.monotonic() + _ECHO_HOLD_S
        if partial is not None:
            part = spoken_part(*partial)
            if part:
                heard.append(part)
        out.interrupted = self._interrupted
        out.speaker_failed = self._speaker_failed
        out.error = self._error
        out.text = " ".join(heard)
        return out


class _Resampler:
    """One sentence's chunks to another rate, block by block: no clicks at chunk edges."""

    def __init__(self, src: int, dst: int):
        self.stream = None if src == dst else StreamResampler(src, dst)

    def __call__(self, pcm: np.ndarray, last: bool) -> np.ndarray:
        if self.stream is None:
            return pcm
        out = self.stream.process(pcm, np.int16)
        return np.concatenate([out, self.stream.flush(np.int16)]) if last else out


def _whole(tts, sentence: str) -> Iterator:
    """A synthesizer without ``stream``: the sentence in one chunk (made on first next())."""
    from assistant.audio.tts import Chunk

    yield Chunk(tts.synthesize(sentence), 1.0)
