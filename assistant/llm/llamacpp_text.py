"""Strangers' text stays text: where a rendered prompt came from, and tokenising by that.

The chat template is rendered with every message's text (questions, answers, an HTTP
client's history) between two private-use marks; the persona and the template's own markup
are outside them. ``spans`` turns that rendering back into pieces of plain text, each
flagged as message text or not. ``tokenize_spans`` then lets llama.cpp find special tokens
(role markers, end of turn) only in the template's markup: a message that says
``<|im_end|><|im_start|>system`` is tokenised as those characters, never as the control
tokens. Plain text between two special tokens is tokenised in one piece, as the whole
prompt would be, so ordinary questions give exactly the tokens they always did.

Tokenising a long prompt with special tokens parsed costs llama.cpp time quadratic in the
number of special tokens in it; here each call with parsing on sees one stretch of markup,
so a long history costs time linear in its length.
"""

from __future__ import annotations

import logging
import re
from typing import Protocol

log = logging.getLogger(__name__)

OPEN, CLOSE = "\ue000", "\ue001"   # private use: never in a template, removed from messages
_MARKS = re.compile(f"([{OPEN}{CLOSE}])")
_warned = False

Span = tuple[str, bool]            # (text, from a message)


def strip_marks(text: str) -> str:
    return text.replace(OPEN, "").replace(CLOSE, "") if OPEN in text or CLOSE in text else text


def wrap(text: str) -> str:
    """Message text between the marks (marks inside it are dropped first)."""
    return OPEN + strip_marks(text) + CLOSE


def spans(marked: str, start: int = 0) -> list[Span]:
    """The plain text of ``marked`` from plain offset ``start`` on, as (text, from a message).

    A template that cut a mark away (a content split, a slice) leaves an unpaired mark:
    the stretch it bounds counts as message text, so markup may be read as text there,
    but message text is never read as markup.
    """
    out: list[list] = []
    inside = False
    since_mark: list[int] = []      # indices in out since the last mark
    pos = 0
    for part in _MARKS.split(marked):
        if part == OPEN:
            if inside:
                _warn()
            inside, since_mark = True, []
            continue
        if part == CLOSE:
            if not inside:          # its OPEN was cut away: what it closed was a message
                _warn()
                for i in since_mark:
                    out[i][1] = True
            inside, since_mark = False, []
            continue
        if not part:
            continue
        end = pos + len(part)
        if end > start:
            since_mark.append(len(out))
            out.append([part[max(0, start - pos):], inside])
        pos = end
    if inside:                      # an OPEN never closed: the rest is message text
        _warn()
    return [(t, u) for t, u in out]


def _warn() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("the chat template cuts message text; where it does, the template's "
                    "markup around it is read as plain text")


def split_spans(items: list[Span], sep: str) -> list[list[Span]]:
    """Split at ``sep`` where it stands in markup (never inside message text)."""
    pieces: list[list[Span]] = [[]]
    for text, user in items:
        if user or sep not in text:
            pieces[-1].append((text, user))
            continue
        parts = text.split(sep)
        for i, part in enumerate(parts):
            if i:
                pieces.append([])
            if part:
                pieces[-1].append((part, False))
    return pieces


class Vocab(Protocol):
    def tokenize(self, text: str, parse_special: bool = True) -> list[int]: ...
    def is_special(self, token: int) -> bool: ...
    def special_text(self, token: int) -> tuple[str, bool, bool]: ...


def tokenize_spans(vocab: Vocab, items: list[Span]) -> list[int]:
    """Tokens of the spans: special tokens only where markup spells them."""
    out: list[int] = []
    run: list[Span] = []            # plain text not yet tokenised

    def flush() -> None:
        text = "".join(t for t, _ in run)
        if text:
            tokens = vocab.tokenize(text, parse_special=False)
            if any(vocab.is_special(t) for t in tokens):
                # llama.cpp matches user-defined tokens even without special parsing.
                tokens = []
                for t, user in run:
                    tokens += _as_text(vocab, t) if user else vocab.tokenize(t, False)
            out.extend(tokens)
        run.clear()

    for text, user in items:
        if user:
            run.append((text, True))
            continue
        tokens = vocab.tokenize(text, parse_special=True)
        specials = [t for t in tokens if vocab.is_special(t)]
        if not specials:
            run.append((text, False))
            continue
        pos = 0
        for tok in specials:
            st, lstrip, rstrip = vocab.special_text(tok)
            at = text.find(st, pos) if st else -1
            if at < 0:              # cannot place it: this markup goes as llama.cpp saw it
                flush()
                out.extend(tokens)
                pos = len(text)
                break
            before = text[pos:at]
            run.append((before.rstrip() if lstrip else before, False))
            flush()
            out.append(tok)
            pos = at + len(st)
            if rstrip:
                while pos < len(text) and text[pos].isspace():
                    pos += 1
        if pos < len(text):
            run.append((text[pos:], False))
    flush()
    return out


def _as_text(vocab: Vocab, text: str) -> list[int]:
    """Message text with any special token's spelling broken into single characters."""
    tokens = vocab.tokenize(text, parse_special=False)
    first = next((t for t in tokens if vocab.is_special(t)), None)
    if first is None:
        return tokens
    st = vocab.special_text(first)[0]
    at = text.find(st) if st else -1
    if at < 0 or len(st) < 2:
        return [t for ch in text for t in vocab.tokenize(ch, False)]
    head = vocab.tokenize(text[:at], False) if at else []
    mid = [t for ch in st for t in vocab.tokenize(ch, False)]
    return head + mid + _as_text(vocab, text[at + len(st):])
