"""Transcript -> intent: clear, exit, question, or nothing.

Phrases match the *whole* normalised utterance, so "Is the sky clear?" stays a question
while "Clear." (whisper adds the period) clears.
"""

from __future__ import annotations

import enum
import re
import unicodedata

from assistant.config import IntentConfig


class Intent(enum.Enum):
    CLEAR = "clear"
    EXIT = "exit"
    QUESTION = "question"
    NOTHING = "nothing"


# Punctuation and symbols of any script (full-width too), after NFKC folding.
_PUNCT = re.compile(r"[\W_]+", re.UNICODE)
# Politeness around a command does not change it: "please clear", "ok, goodbye".
_FILLERS = ("please", "okay", "ok", "now", "thanks", "thank you", "好的", "请", "吧", "了")


# Whisper writes the same words with or without a contraction ("That's it." / "That is it."):
# both sides of a match are spelt out.
_CONTRACTIONS = {"that's": "that is", "it's": "it is", "what's": "what is", "let's": "let us",
                 "i'm": "i am", "i've": "i have", "don't": "do not", "we're": "we are",
                 "you're": "you are", "that'll": "that will", "we'll": "we will"}
_CONTRACTION = re.compile(r"\b(" + "|".join(re.escape(c) for c in _CONTRACTIONS) + r")\b")


def normalise(text: str) -> str:
    """Lower case, NFKC (full-width -> ASCII), contractions spelt out, punctuation to
    spaces, spaces collapsed."""
    t = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    t = _CONTRACTION.sub(lambda m: _CONTRACTIONS[m.group(1)], t)
    t = _PUNCT.sub(" ", t)
    return " ".join(t.split())


def _strip_fillers(t: str) -> str:
    """Drop politeness words at either end; Latin words only at word boundaries."""
    changed = True
    while changed and t:
        changed = False
        for f in _FILLERS:
            sep = " " if f.isascii() else ""
            if t.startswith(f + sep) and len(t) > len(f + sep):
                t, changed = t[len(f + sep):].strip(), True
            elif t.endswith(sep + f) and len(t) > len(sep + f):
                t, changed = t[: -len(sep + f)].strip(), True
    return t


class IntentClassifier:
    def __init__(self, cfg: IntentConfig):
        self._clear = {normalise(p) for p in cfg.clear_phrases}
        self._exit = {normalise(p) for p in cfg.exit_phrases}
        self._clear.discard("")
        self._exit.discard("")

    def classify(self, text: str) -> Intent:
        t = normalise(text)
        if not t:
            return Intent.NOTHING
        for cand in (t, _strip_fillers(t), t.replace(" ", "")):
            if cand in self._clear:
                return Intent.CLEAR
            if cand in self._exit:
                return Intent.EXIT
        return Intent.QUESTION
