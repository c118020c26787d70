"""Texts to speak are cut into pieces piper can say in bounded memory (issue 24).

Piper's memory grows with one piece's length (a 4,094-character unpunctuated text in one
piece took 10 GB), so the sentence splitter, which every front-end's text passes through,
caps every piece at ``MAX_PIECE`` whatever the punctuation, and scans streamed text once.
"""

from __future__ import annotations

import random

import pytest

from assistant.audio.sentences import MAX_PIECE, SentenceSplitter, speech_length

WORDS = "the quick brown fox jumps over the lazy dog near a river bank".split()


def unpunctuated(n_words: int) -> list[str]:
    return [f"{WORDS[i % len(WORDS)]}{i}" for i in range(n_words)]


@pytest.mark.parametrize("max_chars", [24, 100, 400])
@pytest.mark.parametrize("chunk", [None, 1, 7, 5000])
def test_a_long_unpunctuated_text_is_cut_at_words_within_the_cap(max_chars, chunk):
    """Catches: the run-on cut only at the last space of the whole buffer (one 4,000-char
    piece); a cut inside a word where there are spaces; the tail dropped or doubled."""
    words = unpunctuated(800)                   # about 6,000 characters, no punctuation
    text = " ".join(words)
    splitter = SentenceSplitter(max_chars=max_chars)
    pieces: list[str] = []
    parts = [text] if chunk is None else [text[i:i + chunk] for i in range(0, len(text), chunk)]
    for part in parts:
        pieces += splitter.feed(part)
        assert splitter.pending <= MAX_PIECE
    pieces += splitter.flush()
    assert max(speech_length(p) for p in pieces) <= MAX_PIECE
    # Cut at the last word within twice max_chars (or the cap), not at the first one: a
    # piece falls short of it by at most a word (catches: many tiny pieces).
    longest_word = max(len(w) for w in words)
    reach = min(2 * max_chars, MAX_PIECE)
    assert all(len(p) >= reach - longest_word - 1 for p in pieces[:-1])
    # Every cut at a space: the pieces' words are the text's words, in order, none lost.
    assert " ".join(pieces).split() == words


def test_text_without_spaces_is_cut_hard_at_the_cap():
    """Catches: a text with no word boundary kept whole (or its tail dropped)."""
    text = "".join(random.Random(1).choice("abcdefgh") for _ in range(10 * MAX_PIECE + 37))
    splitter = SentenceSplitter(max_chars=400)
    pieces = splitter.feed(text) + splitter.flush()
    assert [len(p) for p in pieces] == [MAX_PIECE] * 10 + [37]
    assert "".join(pieces) == text


def test_chinese_counts_three_units_and_is_cut_between_characters():
    """Catches: the cap counted in characters (a Chinese character takes as long to say as
    three Latin letters) or no cut in text with no spaces and no punctuation."""
    text = "我们看见桌子上有一个红色的苹果和一个蓝色的杯子" * 40
    splitter = SentenceSplitter()
    pieces = splitter.feed(text) + splitter.flush()
    assert max(speech_length(p) for p in pieces) <= MAX_PIECE
    assert "".join(pieces) == text


def test_a_long_sentence_with_an_end_is_cut_too():
    """Catches: a sentence end found past the cap handed on whole."""
    words = unpunctuated(60)
    head = " ".join(words)[:MAX_PIECE + 50]
    words = head.split()
    text = head + ". And a short one."
    splitter = SentenceSplitter(max_chars=400)
    pieces = splitter.feed(text) + splitter.flush()
    assert max(speech_length(p) for p in pieces) <= MAX_PIECE
    assert pieces[-1] == "And a short one."
    assert " ".join(pieces).replace(".", "").split() == words + ["And", "a", "short", "one"]


def test_clauses_are_preferred_to_words_at_the_cap():
    """Catches: the cap cutting at a word when a comma within it makes a clause."""
    clause = " ".join(unpunctuated(30))         # about 200 characters
    text = f"{clause}, {clause}, {clause}"
    splitter = SentenceSplitter(max_chars=400)
    pieces = splitter.feed(text) + splitter.flush()
    assert pieces[0] == clause + ","


def test_streamed_text_is_scanned_once():
    """Catches: every feed rescanning the whole pending text for a sentence end (quadratic
    in a stream with no end: 8 x 1 MB took 23 s on the event loop)."""
    text = " ".join(unpunctuated(2000)) + " e.g. 3.5 is a number and "
    splitter = SentenceSplitter()
    for ch in text:
        splitter.feed(ch)
    # Once per character, plus the marks whose verdict waited for the next character.
    assert splitter.scanned_chars <= len(text) + 10


def test_normal_answers_are_cut_as_before():
    """The cap changes nothing for an ordinary answer streamed in small pieces: the first
    clause still comes at its first comma past max_chars (voice loop latency)."""
    answer = ("Well, looking at the table, I can see a red apple and a blue cup, and behind "
              "them there is a window. It is open!")
    splitter = SentenceSplitter(max_chars=24)
    first = []
    for i in range(0, len(answer), 3):
        first += splitter.feed(answer[i:i + 3])
        if first:
            break
    assert first == ["Well, looking at the table,"]
