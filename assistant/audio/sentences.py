"""Streamed LLM text -> sentences to speak, as early as each one is complete.

Pieces arrive a few characters at a time and may split a word, a number or an
abbreviation. A sentence is released as soon as its end is certain:

- English ``.``, ``!``, ``?`` followed by a space (and, for ``.``, not a decimal point, an
  abbreviation, an initial, a list number, or followed by a lower-case word);
- Chinese and full-width ``。！？；…`` at once (Chinese puts no space after them);
- a newline (the end of a line, a list item or a heading).

A long run-on with no end yet is cut after a comma once it grows past ``max_chars``, so the
first sound is not held back by one long sentence. Markdown that a voice would read aloud
(``*``, ``#``, backticks, links, emoji) is removed.
"""

from __future__ import annotations

import re
from typing import Optional

EN_ENDS = ".!?"
CJK_ENDS = "。！？；…"
CLOSERS = "\"'”’)]}」』）》"
COMMAS = ",，、"
# Words that take a full stop without ending the sentence (lower case, inner dots kept).
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "e.g", "i.e", "eg", "ie",
    "a.m", "p.m", "approx", "fig", "inc", "ltd", "u.s", "u.k",
})
# Characters a voice should not read out; removed as they arrive.
_MARKUP = str.maketrans("", "", "*#`")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F\u200D]")
_LINE_PREFIX = re.compile(r"^\s*(?:>\s*|[-+•]\s+)", re.MULTILINE)
_SPACES = re.compile(r"\s+")

_WAIT = -1  # the end depends on text that has not arrived yet


def is_cjk(ch: str) -> bool:
    """A Chinese/Japanese character or full-width punctuation (no spaces around them)."""
    o = ord(ch)
    return (0x3000 <= o <= 0x9FFF) or (0xF900 <= o <= 0xFAFF) or (0xFF00 <= o <= 0xFFEF)


def speech_length(text: str) -> int:
    """Length in Latin-character units: a Chinese character takes about as long to say as
    three Latin letters."""
    return len(text) + 2 * sum(1 for ch in text if is_cjk(ch))


def clean_for_speech(text: str) -> str:
    """Text as it should be spoken: markdown and emoji removed, whitespace collapsed;
    '' when nothing speakable is left."""
    t = _LINK.sub(r"\1", text).translate(_MARKUP)
    t = _EMOJI.sub("", t)
    t = _LINE_PREFIX.sub("", t)
    t = _SPACES.sub(" ", t).strip().lstrip(CLOSERS + COMMAS + " ")
    return t if any(ch.isalnum() for ch in t) else ""


class SentenceSplitter:
    """Accumulates streamed text and hands back complete sentences."""

    def __init__(self, max_chars: int = 100, min_chars: int = 20):
        self.max_chars = max_chars  # a run-on longer than this is cut at a comma
        self.min_chars = min_chars  # ... leaving at least this much in the piece cut off
        self._buf = ""
        self._line_start = True  # the buffer begins at the start of a line

    def feed(self, piece: str) -> list[str]:
        """Add a piece of text; returns the sentences it completed (possibly none)."""
        self._buf += piece.replace("\r\n", "\n").translate(_MARKUP)
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """The end of the text: whatever is left, as sentences. The splitter is reset."""
        out = self._drain(final=True)
        rest = clean_for_speech(self._buf)
        if rest:
            out.append(rest)
        self._buf = ""
        self._line_start = True
        return out

    def reset(self) -> None:
        """Forget any partial sentence (an answer was cut short)."""
        self._buf = ""
        self._line_start = True

    # ---------------------------------------------------------------- internals

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while self._buf:
            cut = self._find_end(final)
            if cut is None or cut == _WAIT:
                cut = None if final else self._find_run_on_cut()
            if cut is None:
                break
            sentence, self._buf = self._buf[:cut], self._buf[cut:]
            self._line_start = sentence.rstrip(" \t").endswith("\n")
            text = clean_for_speech(sentence)
            if text:
                out.append(text)
        return out

    def _find_end(self, final: bool) -> Optional[int]:
        """Index just past the first certain sentence end; _WAIT; or None (no end yet)."""
        buf = self._buf
        n = len(buf)
        i = 0
        while i < n:
            ch = buf[i]
            if ch == "\n":
                return i + 1
            if ch in CJK_ENDS:
                return self._skip_ends(i, CJK_ENDS)
            if ch in EN_ENDS:
                j = self._skip_ends(i, EN_ENDS)
                verdict = self._english_end(i, j, final)
                if verdict is not None:
                    return verdict
                i = j
                continue
            i += 1
        return None

    def _skip_ends(self, i: int, ends: str) -> int:
        """Past a run of end marks and the closing quotes/brackets after it."""
        buf, j = self._buf, i + 1
        while j < len(buf) and buf[j] in ends + CLOSERS:
            j += 1
        return j

    def _english_end(self, i: int, j: int, final: bool) -> Optional[int]:
        """Whether the end marks buf[i:j] end a sentence: j, _WAIT, or None (they don't)."""
        buf = self._buf
        if j == len(buf):
            return j if final else _WAIT
        nxt = buf[j]
        if is_cjk(nxt):
            return j
        if not nxt.isspace():
            return None  # 3.5, e.g, example.com
        if buf[i:j].strip(CLOSERS) != ".":
            return j  # ! ? ... end a sentence whatever follows
        word = self._word_before(i)
        low = word.lower()
        if low in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            return None
        if word.isdigit() and self._starts_line(i - len(word)):
            return None  # "1. " starting a list item
        k = j
        while k < len(buf) and buf[k] in " \t":
            k += 1
        if k == len(buf):
            return j if final else _WAIT
        return None if buf[k].islower() else j

    def _word_before(self, i: int) -> str:
        buf, k = self._buf, i
        while k > 0 and not buf[k - 1].isspace():
            k -= 1
        return buf[k:i].lstrip("\"'“‘([{")

    def _starts_line(self, pos: int) -> bool:
        """Only spaces between the start of the line and pos."""
        line_start = self._buf.rfind("\n", 0, pos) + 1
        if self._buf[line_start:pos].strip():
            return False
        return line_start > 0 or self._line_start

    def _find_run_on_cut(self) -> Optional[int]:
        """A cut for a run-on longer than max_chars: after the last comma, else (when twice
        as long) at the last space or after a Chinese character."""
        buf = self._buf
        if speech_length(buf) < self.max_chars:
            return None
        best = None  # the last comma within max_chars, else the first one past it
        for m, ch in enumerate(buf):
            if ch not in COMMAS:
                continue
            after = buf[m + 1] if m + 1 < len(buf) else ""
            if ch == "," and not after.isspace():
                continue  # the comma of 1,000 (or not known yet)
            length = speech_length(buf[:m + 1])
            if length < self.min_chars:
                continue
            if length > self.max_chars and best is not None:
                break
            best = m + 1
            if length > self.max_chars:
                break
        if best is not None or speech_length(buf) < 2 * self.max_chars:
            return best
        for m in range(len(buf) - 1, 0, -1):
            if buf[m].isspace() or is_cjk(buf[m - 1]):
                if speech_length(buf[:m]) >= self.min_chars:
                    return m
                break
        return None


__all__ = ["SentenceSplitter", "clean_for_speech", "speech_length", "is_cjk"]
