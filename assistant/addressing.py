"""Listening only when addressed (README.md#listening-only-when-addressed): when is speech
meant for the assistant?

Speech is addressed when it starts
- after a wake (the wake word heard on the microphone, or a wake phrase said alone) that is
  still waiting for its question (``wake.listen_s``),
- inside the follow-up window (``wake.follow_up_s`` after the answer's last sound),
- while an addressed turn is being answered (talking over it, or adding to the question),
- always, with ``wake.mode: none``.

In phrase mode the transcript decides the rest: an utterance that starts with one of
``wake.phrases`` is addressed, with the phrase taken off.

Time is the microphone's audio clock (seconds of audio heard), so a WAV file fed faster than
real time is judged as it would be live; for a microphone it is the wall clock.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from typing import Iterable, Optional

from assistant.audio.wake import phrase_of
from assistant.config import PersonaLines, WakeConfig

log = logging.getLogger(__name__)

WAITING = "waiting for wake word"
LISTENING = "listening"

# Reasons an utterance was addressed (turn.addressed and the logs).
BY_WORD = "wake word"
BY_PHRASE = "wake phrase"
FOLLOW_UP = "follow-up"
DURING_ANSWER = "during an answer"
WOKEN = (BY_WORD, BY_PHRASE)


_CJK = "\u3400-\u4dbf\u4e00-\u9fff"
# A word: one CJK character (Chinese has no spaces between words), or a run of other word
# characters with inner apostrophes ("what's").
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+(?:'[^\W{_CJK}]+)*")
_PUNCT = " ,.!?;:，。！？、；：-—…\"'"


def _words(text: str) -> list[str]:
    """Lower-case words without punctuation."""
    return [m.group(0).lower() for m in _WORD.finditer(unicodedata.normalize("NFKC", text))]


class PhraseMatcher:
    """Finds a wake phrase at the start of a transcript and takes it off."""

    def __init__(self, phrases: Iterable[str]):
        self.phrases = sorted({tuple(_words(p)) for p in phrases if _words(p)},
                              key=len, reverse=True)

    def strip(self, text: str) -> Optional[str]:
        """``text`` without its leading wake phrase (and the comma after it), or None when it
        does not start with one. "Rocky, what do you see?" -> "what do you see?"."""
        norm = unicodedata.normalize("NFKC", text)
        found = list(_WORD.finditer(norm))
        words = [m.group(0).lower() for m in found]
        for phrase in self.phrases:
            if tuple(words[:len(phrase)]) == phrase:
                return norm[found[len(phrase) - 1].end():].lstrip(_PUNCT).strip()
        return None


class Addressing:
    """The awake / asleep state of the voice loop, on the audio clock."""

    def __init__(self, cfg: WakeConfig, mode: str, word_phrase: Optional[str] = None):
        self.cfg = cfg
        self.mode = mode                      # none | word | phrase (auto already decided)
        names = list(cfg.phrases) if mode == "phrase" else []
        if mode == "word" and word_phrase:
            # What whisper may still hear of the wake word at the start of the question.
            names += [word_phrase, re.sub(r"(?i)^okay\b", "ok", word_phrase),
                      word_phrase.split()[-1]]
        self.matcher = PhraseMatcher(names)
        self.word_phrase = word_phrase
        self.now = 0.0                        # seconds of audio heard
        self._wake_at: Optional[float] = None  # a wake waiting for its question
        self._wake_kind = ""
        self._spent: Optional[tuple[float, str]] = None  # the wake the speech now took
        self._until = float("-inf")           # end of the follow-up window
        self._busy = 0                        # addressed turns queued or being answered

    @property
    def needed(self) -> bool:
        return self.mode != "none"

    @property
    def state(self) -> str:
        """listening or waiting for wake word (the loop adds thinking / speaking)."""
        return LISTENING if self.awake else WAITING

    @property
    def awake(self) -> bool:
        return (not self.needed or self._busy > 0 or self._wake_at is not None
                or self._spent is not None or self.now <= self._until)

    def heard(self, seconds: float) -> bool:
        """The clock moves on by one frame; True when a wake timed out with no speech after
        it (the assistant says sorry)."""
        self.now += seconds
        if self._wake_at is not None and self.now - self._wake_at > self.cfg.listen_s:
            log.info("woken by the %s, but no question came within %g s", self._wake_kind,
                     self.cfg.listen_s)
            self._wake_at = None
            return True
        return False

    def woken(self, kind: str) -> None:
        """The wake word was heard, or a wake phrase said alone."""
        log.info("woken by the %s", kind)
        self._wake_at, self._wake_kind = self.now, kind
        self._spent = None

    def speech_started(self) -> str:
        """Is the speech starting now addressed? Its reason, or "" (not addressed)."""
        if not self.needed:
            return "always"
        if self._wake_at is not None:
            # The wake is this speech's; given back if the speech turns out to be a cough.
            self._spent = (self._wake_at, self._wake_kind)
            self._wake_at = None
            return self._spent[1]
        if self._busy:
            return DURING_ANSWER
        if self.now <= self._until:
            return FOLLOW_UP
        return ""

    def speech_discarded(self) -> None:
        """The speech was too short to be a question, or dropped: a wake it took waits on."""
        if self._spent is not None:
            self._wake_at, self._wake_kind = self._spent
            self._spent = None

    def taken(self) -> None:
        """An addressed utterance goes to be answered."""
        self._spent = None
        if self.needed:
            self._busy += 1

    def answered(self) -> None:
        """The answer's last sound: the follow-up window opens."""
        if not self.needed:
            return
        self._busy = max(0, self._busy - 1)
        self._until = self.now + self.cfg.follow_up_s

    def wake_name(self, language: Optional[str]) -> str:
        """What the person says to address it: the wake word, or the first wake phrase
        written in the language (Chinese characters for zh); "" with wake.mode none."""
        if self.mode == "word":
            return self.word_phrase or phrase_of(self.cfg.word)
        if self.mode != "phrase" or not self.cfg.phrases:
            return ""
        zh = (language or "").lower().startswith("zh")
        return next((p for p in self.cfg.phrases if bool(re.search(f"[{_CJK}]", p)) == zh),
                    self.cfg.phrases[0])

    def greeting(self, lines: PersonaLines, language: Optional[str]) -> str:
        """The line said once when ready: persona greeting, or, when only addressed speech
        is answered, wake_greeting naming what to say ("Say Okay Nabu to talk to me"), so
        nobody is left talking to a device that waits for its name. "" for none."""
        name = self.wake_name(language)
        if not lines.greeting or not name:
            return lines.greeting
        return lines.wake_greeting.replace("{wake}", name)

    def not_addressed_note(self) -> str:
        """Why an utterance made no turn, for the logs and `ask`."""
        if self.mode == "word":
            return (f"not addressed: no wake word ({self.word_phrase or self.cfg.word}) before "
                    f"it, and not within wake.follow_up_s of an answer")
        names = ", ".join(self.cfg.phrases)
        return (f"not addressed: it does not start with a wake phrase ({names}), and not "
                f"within wake.follow_up_s of an answer")
