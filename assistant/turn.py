"""One turn's record: what was heard, what was decided, and where the time went."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

log = logging.getLogger("assistant.turn")

_ids = itertools.count(1)


@dataclass
class Turn:
    """Timestamps are time.monotonic() values; ``ms()`` turns them into durations."""

    id: int = field(default_factory=lambda: next(_ids))
    speech_end: float = field(default_factory=time.monotonic)  # the utterance was cut here
    last_word: Optional[float] = None   # the last voiced frame of the utterance
    wall_time: float = field(default_factory=time.time)
    source: str = "voice"
    conversation: str = ""
    transcript: str = ""
    language: str = ""
    intent: str = ""
    answer: str = ""
    with_image: bool = False
    scene: str = "none"            # same | new | none: the image this question carried
    compaction: Optional[dict] = None  # {kind: compact|reset, tokens_before, tokens_after, ...}
    reset: bool = False            # the context was reset before this answer
    finish: str = ""               # stop | length | aborted (the LLM's end)
    # The answer was cut short on purpose before it was finished: the person spoke over it
    # (barge-in), the HTTP client hung up, or the service was stopped. A failure (speech
    # recognition, the model, synthesis, the speaker) is never an interruption: the note
    # names what failed.
    interrupted: bool = False
    note: str = ""                 # why something was skipped or failed, for a person
    addressed: str = ""            # with wake.mode word/phrase: wake word, wake phrase, follow-up, during an answer
    timings: dict = field(default_factory=dict)   # "<stage>_ms" -> milliseconds
    counts: dict = field(default_factory=dict)    # tokens and the like
    marks: dict = field(default_factory=dict)     # event -> monotonic time

    def mark(self, name: str, at: Optional[float] = None) -> None:
        """Record an event once (the first time it happens)."""
        self.marks.setdefault(name, time.monotonic() if at is None else at)

    def took(self, stage: str, seconds: float) -> None:
        self.timings[f"{stage}_ms"] = round(seconds * 1000.0, 1)

    def add(self, stage: str, seconds: float) -> None:
        """Accumulate a stage that runs several times in a turn (TTS per sentence)."""
        key = f"{stage}_ms"
        self.timings[key] = round(self.timings.get(key, 0.0) + seconds * 1000.0, 1)

    def since_speech_end(self, name: str) -> Optional[float]:
        at = self.marks.get(name)
        return None if at is None else round((at - self.speech_end) * 1000.0, 1)

    def summary(self) -> dict:
        out = dict(self.timings)
        for name in ("llm_first_piece", "first_sentence", "first_audio", "done"):
            v = self.since_speech_end(name)
            if v is not None:
                out[f"{name}_ms"] = v
        if self.last_word is not None and "first_audio" in self.marks:
            # What the person waits: from their last word, the VAD's silence included.
            out["last_word_to_first_audio_ms"] = round(
                (self.marks["first_audio"] - self.last_word) * 1000.0, 1)
        return out

    def log_line(self) -> None:
        parts = [f"turn {self.id}: intent={self.intent or '-'}"]
        if self.intent == "question":
            parts.append(f"scene={self.scene}")
        for k, v in self.summary().items():
            parts.append(f"{k}={v:.0f}")
        for k, v in self.counts.items():
            parts.append(f"{k}={v}")
        if self.compaction:
            c = self.compaction
            parts.append(f"{c['kind']}={c['tokens_before']}->{c['tokens_after']}")
        if self.note:
            parts.append(f"note={self.note!r}")
        log.info(" ".join(parts))

    def as_json(self) -> dict:
        return {
            "turn": self.id,
            "transcript": self.transcript,
            "language": self.language,
            "intent": self.intent,
            "answer": self.answer,
            "image": self.with_image,
            "scene": self.scene,
            "compaction": self.compaction,
            "interrupted": self.interrupted,
            "source": self.source,
            "conversation": self.conversation,
            "note": self.note,
            "timings_ms": self.summary(),
            "counts": dict(self.counts),
            **({"addressed": self.addressed} if self.addressed else {}),
        }
