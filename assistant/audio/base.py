"""Audio source and sink interfaces shared by the microphone, the speaker and WAV files.

Inside the assistant, audio is mono int16. Sources deliver 16 kHz (what the VAD and whisper
want) in fixed-size frames; sinks take speech at their own ``sample_rate`` (the pipeline
resamples TTS output to it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import AsyncIterator

import numpy as np

SAMPLE_RATE = 16000  # the pipeline's internal rate: webrtcvad and whisper both take 16 kHz


class AudioSource(ABC):
    """Yields fixed-size frames of 16 kHz mono int16 PCM (bytes of 2 * frame_samples)."""

    name: str = "?"

    def __init__(self, frame_ms: int = 30):
        self.frame_ms = frame_ms
        self.frame_samples = SAMPLE_RATE * frame_ms // 1000

    @abstractmethod
    async def open(self) -> None:
        """Open the device or file; raises DeviceError / AssistantError naming the cause."""

    @abstractmethod
    def frames(self) -> AsyncIterator[bytes]:
        """Frames as they arrive. A file source ends at the end of the file; a microphone
        does not end (it raises DeviceError if the device goes away)."""

    async def close(self) -> None:
        """Release the device (idempotent)."""


class AudioSink(ABC):
    """Plays (or writes) mono int16 speech at ``sample_rate``."""

    name: str = "?"
    sample_rate: int = 22050

    @abstractmethod
    async def open(self) -> None:
        """Open the device or file; sets sample_rate."""

    @abstractmethod
    async def play(self, pcm: np.ndarray, more: bool = False) -> float:
        """Play one chunk (int16, mono, at sample_rate); returns when it has been played,
        or early when stop() is called. Returns the seconds actually played.

        ``more``: the caller has the next chunk coming at once (a sentence spoken as it is
        synthesised). A device may then return as soon as the chunk is queued, without
        draining, so the next one follows with no gap; the seconds are those handed over."""

    @abstractmethod
    def stop(self) -> None:
        """Cut the chunk being played short (barge-in); callable from any thread."""

    async def close(self) -> None:
        """Flush and release (idempotent)."""
