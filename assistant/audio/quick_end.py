"""Quick endpointing: end an utterance after a short pause when its words already form a
complete question.

The VAD waits ``vad.end_silence_ms`` (700 ms) of silence before it ends an utterance, because a
person pausing mid-sentence ("What colour is ... the car on the left?") must not be cut. But
most questions end plainly. When the person pauses, whisper transcribes the speech so far (a
worker thread, only while no turn is running); if that reads as a finished sentence (whisper
punctuates it, and it does not stop on a word that needs a continuation), the utterance ends
after ``vad.quick_end_ms`` instead, and the partial transcript is the turn's transcript (the
audio is the same), so the turn skips its own ASR pass too.
"""

from __future__ import annotations

import re

# Words a finished English sentence does not end on.
_DANGLING = frozenset("""
a an the this that these those my your his her its our their some any every no
of on in at to for from with by about into onto over under between behind near like as
and or but nor so because if when while whether than then
is are was were be been am do does did can could will would shall should may might must
what which who whom whose where why how
""".split())

_ENDS = re.compile(r"[.?!。？！]\s*$")


def complete(text: str) -> bool:
    """Whether a partial transcript reads as a finished sentence."""
    t = text.strip()
    if not t or t.endswith(("...", "…", ",", "-", "—")) or not _ENDS.search(t):
        return False
    words = re.findall(r"[A-Za-z']+", t.lower())
    if words and words[-1] in _DANGLING:
        return False
    # A question needs a few words ("What?" alone is more likely a start than a question).
    return len(words) >= 3 or bool(re.search(r"[\u4e00-\u9fff]{3,}", t))
