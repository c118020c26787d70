"""The wake earcon: a short rising two-note chime, made here (no sound file)."""

from __future__ import annotations

import numpy as np

# Two notes a fifth apart (A5, E6), rising: heard as "yes?" rather than as an alarm.
_NOTES_HZ = (880.0, 1318.5)
_NOTE_S = 0.07
_GAP_S = 0.02
_LEVEL = 0.25          # of full scale: clearly heard, below the speech's peaks
_FADE_S = 0.01         # raised-cosine edges: no click at either end


def chime(rate: int) -> np.ndarray:
    """The earcon as int16 mono at ``rate`` (about 0.16 s)."""
    n = int(_NOTE_S * rate)
    t = np.arange(n) / rate
    fade = max(1, int(_FADE_S * rate))
    envelope = np.ones(n)
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
    envelope[:fade] = ramp
    envelope[-fade:] = ramp[::-1]
    notes = []
    for f in _NOTES_HZ:
        # A little of the octave above makes it a chime, not a test tone.
        tone = np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t)
        notes += [tone / 1.3 * envelope, np.zeros(int(_GAP_S * rate))]
    wave = np.concatenate(notes[:-1]) * _LEVEL
    return np.round(wave * 32767).astype(np.int16)
