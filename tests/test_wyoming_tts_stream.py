"""Wyoming ``synthesize-chunk`` text with no sentence end (issue 24): spoken a piece at a
time, scanned once, never more than ``MAX_PIECE`` waiting.

Through a real Wyoming connection to the in-process server of tests/test_wyoming.py (the
real piper voice); the session's splitter is observed (a subclass recording what waits after
each chunk, the pieces handed on and the characters scanned), everything else is real.
"""

from __future__ import annotations

import asyncio

import pytest

from assistant.audio.sentences import MAX_PIECE, SentenceSplitter, speech_length
from test_wyoming import client, read_until, server  # noqa: F401  (the module's server)

pytest.importorskip("wyoming")
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop  # noqa: E402

from assistant.wyoming import tts as wyoming_tts  # noqa: E402


class Observed(SentenceSplitter):
    made: list["Observed"] = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.fed = 0
        self.waiting: list[int] = []     # what waits for its end after each chunk
        self.pieces: list[str] = []
        Observed.made.append(self)

    def feed(self, piece: str) -> list[str]:
        out = super().feed(piece)
        self.fed += len(piece)
        self.waiting.append(self.pending)
        self.pieces += out
        return out


@pytest.fixture
def observed(monkeypatch):
    Observed.made = []
    monkeypatch.setattr(wyoming_tts, "SentenceSplitter", Observed)
    return Observed.made


def words(n: int, start: int = 0) -> str:
    return " ".join(f"word{i}" for i in range(start, start + n))


def test_many_chunks_without_an_end_are_spoken_piece_by_piece(server, observed):
    """Catches: every chunk rescanning the whole pending text (quadratic: 8 x 1 MB took 23 s
    of loop time); text waiting without bound for a sentence end that never comes."""
    chunks = [words(2, 2 * k) + " " for k in range(60)]          # about 700 characters

    async def go():
        async with client(server.port) as c:
            await c.write_event(SynthesizeStart().event())
            for chunk in chunks:
                await c.write_event(SynthesizeChunk(chunk).event())
            # No sentence end and no stop yet: the first piece is spoken all the same.
            first = await read_until(c, "audio-stop")
            await c.write_event(SynthesizeStop().event())
            return first, await read_until(c, "synthesize-stopped")
    first, rest = asyncio.run(go())
    assert first[0].type == "audio-start" and any(e.type == "audio-chunk" for e in first)
    (splitter,) = observed
    text = "".join(chunks)
    assert splitter.fed == len(text) and len(splitter.waiting) == len(chunks)
    assert max(splitter.waiting) <= MAX_PIECE
    assert splitter.scanned_chars <= len(text) + 10      # each character looked at once
    assert len(splitter.pieces) >= 2                     # handed on before the stop
    starts = sum(1 for e in first + rest if e.type == "audio-start")
    assert starts == len(splitter.pieces) + 1            # + the rest, at the stop


def test_one_huge_chunk_is_cut_into_pieces_within_the_cap(server, observed):
    """Catches: a chunk with no end handed to piper whole (memory with the square of its
    length) or kept whole as the pending text."""
    huge = words(20_000)                                 # about 190,000 characters

    async def go():
        async with client(server.port) as c:
            await c.write_event(SynthesizeStart().event())
            await c.write_event(SynthesizeChunk(huge).event())
            return await read_until(c, "audio-stop")     # then hang up mid-stream
    first = asyncio.run(go())
    assert first[0].type == "audio-start"
    (splitter,) = observed
    assert splitter.waiting[0] <= MAX_PIECE
    assert len(splitter.pieces) >= len(huge) // MAX_PIECE
    assert max(speech_length(p) for p in splitter.pieces) <= MAX_PIECE
    spoken = " ".join(splitter.pieces).split()
    assert spoken == huge.split()[:len(spoken)]          # in order, at word boundaries
    assert splitter.scanned_chars <= len(huge) + 10
