"""Streamed LLM text -> sentences to speak, as early as each one is complete.

Pieces arrive a few characters at a time and may split a word, a number or an
abbreviation. A sentence is released as soon as its end is certain:

- English ``.``, ``!``, ``?`` followed by a space (and, for ``.``, not a decimal point, an
  abbreviation, an initial, a list number, or followed by a lower-case word);
- Chinese and full-width ``。！？；…`` at once (Chinese puts no space after them);
- a newline (the end of a line, a list item or a heading).

A long run-on with no end yet is cut after a comma once it grows past ``max_chars``, so the
first sound is not held back by one long sentence; with no comma, at the last word boundary
once it is twice as long. Whatever the punctuation, no piece is longer than ``hard_chars``
(``MAX_PIECE``): piper's memory grows with the square of one piece's length, and every text
spoken (the voice loop's answers, HTTP speech, Wyoming) is cut here. A piece that reaches
the cap is cut after its last comma or word within it, else (no space at all) at the cap.

The text is scanned once: each ``feed`` looks for a sentence end only in what it has not
looked at yet, and what waits for its end is never longer than the cap, so a stream of any
length costs the same per character. Markdown that a voice would read aloud (``*``, ``#``,
backticks, links, emoji) is removed.
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

# The longest piece handed to the voice, in speech_length units. Piper's memory grows with the
# square of a piece's length (4,094 unpunctuated characters in one piece: 10.9 GB); at this
# cap the daemon's peak speaking HTTP's 4,096 or Wyoming's 10,000 unpunctuated characters is
# 1.05 GB (bench/speech_memory.py; 1.06 to 1.36 GB at 300). The voice loop's run-on cut is
# at 2 x 100 too, so normal answers are cut as before.
MAX_PIECE = 200


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

    def __init__(self, max_chars: int = 100, min_chars: int = 20, hard_chars: int = MAX_PIECE):
        self.max_chars = max_chars    # a run-on longer than this is cut at a comma
        self.min_chars = min_chars    # ... leaving at least this much in the piece cut off
        self.hard_chars = hard_chars  # no piece is longer than this, whatever its punctuation
        self.scanned_chars = 0        # characters looked at for a sentence end (each once)
        self._reset()

    def _reset(self) -> None:
        self._buf = ""
        self._units = 0           # speech_length(self._buf)
        self._scanned = 0         # self._buf[:self._scanned] holds no sentence end
        self._line_start = True   # the buffer begins at the start of a line

    @property
    def pending(self) -> int:
        """The speech length of the text waiting for its end (at most ``hard_chars`` between
        two calls)."""
        return self._units

    def feed(self, piece: str) -> list[str]:
        """Add a piece of text; returns the sentences it completed (possibly none)."""
        piece = piece.replace("\r\n", "\n").translate(_MARKUP)
        out: list[str] = []
        # A cap's worth at a time: the buffer stays bounded however long the piece.
        step = max(1, self.hard_chars)
        for k in range(0, len(piece), step):
            part = piece[k:k + step]
            self._buf += part
            self._units += speech_length(part)
            out += self._drain(final=False)
        return out

    def flush(self) -> list[str]:
        """The end of the text: whatever is left, as sentences. The splitter is reset."""
        out = self._drain(final=True)
        rest = clean_for_speech(self._buf)
        if rest:
            out.append(rest)
        self._reset()
        return out

    def reset(self) -> None:
        """Forget any partial sentence (an answer was cut short)."""
        self._reset()

    # ---------------------------------------------------------------- internals

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while self._buf:
            cut = self._find_end(final)
            if cut not in (None, _WAIT) and speech_length(self._buf[:cut]) > self.hard_chars:
                cut = None      # a sentence longer than a piece may be: cut as a run-on
            if cut is None or cut == _WAIT:
                cut = self._find_run_on_cut(final)
            if cut is None:
                break
            sentence, self._buf = self._buf[:cut], self._buf[cut:]
            self._units -= speech_length(sentence)
            self._scanned = max(0, self._scanned - cut)
            self._line_start = sentence.rstrip(" \t").endswith("\n")
            text = clean_for_speech(sentence)
            if text:
                out.append(text)
        return out

    def _find_end(self, final: bool) -> Optional[int]:
        """Index just past the first certain sentence end; _WAIT; or None (no end yet).
        The scan starts where the last one stopped: what it passed holds no end, and a mark
        whose verdict waited for more text is looked at again."""
        buf = self._buf
        n = len(buf)
        start = i = self._scanned
        verdict: Optional[int] = None
        while i < n:
            ch = buf[i]
            if ch == "\n":
                verdict = i + 1
                break
            if ch in CJK_ENDS:
                verdict = self._skip_ends(i, CJK_ENDS)
                break
            if ch in EN_ENDS:
                j = self._skip_ends(i, EN_ENDS)
                verdict = self._english_end(i, j, final)
                if verdict is not None:
                    break
                i = j
                continue
            i += 1
        self.scanned_chars += i - start
        self._scanned = i
        return verdict

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

    def _find_run_on_cut(self, final: bool) -> Optional[int]:
        """A cut for a run-on: past max_chars, after the last comma within it (else the
        first after it); twice as long, at the last word boundary (a space, or after a
        Chinese character) within hard_chars; past hard_chars, at the cap itself when there
        is neither.
        Never a piece past hard_chars. At the end of the text (``final``) only the cap cuts.
        Looks at no more than hard_chars of the buffer."""
        units, hard = self._units, self.hard_chars
        if units <= hard and (final or units < self.max_chars):
            return None
        buf = self._buf
        comma = word = None
        length = 0                # speech_length(buf[:m])
        m = 0
        for m, ch in enumerate(buf):
            if comma is not None and length > self.max_chars:
                return comma      # the last comma within max_chars, or the first past it
            if m and length >= self.min_chars and (ch.isspace() or is_cjk(buf[m - 1])):
                word = m          # the last word boundary within the cap
            w = 3 if is_cjk(ch) else 1
            if length + w > hard:
                break             # buf[:m] is as much as a piece may hold
            length += w
            if ch in COMMAS and length >= self.min_chars:
                after = buf[m + 1] if m + 1 < len(buf) else ""
                if (ch != "," or after.isspace()) and (length <= self.max_chars or comma is None):
                    comma = m + 1  # not the comma of 1,000 (or not known yet)
        else:
            m = len(buf)
        if comma is not None:
            return comma
        if units <= hard and units < 2 * self.max_chars:
            return None
        if word is not None:
            return word
        return max(m, 1) if units > hard else None


__all__ = ["SentenceSplitter", "clean_for_speech", "speech_length", "is_cjk"]
