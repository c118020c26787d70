"""A sink that plays nothing: for `ask` without --out, and for benchmarks."""

from __future__ import annotations

import numpy as np

from assistant.audio.base import AudioSink


class NullSink(AudioSink):
    name = "null"

    def __init__(self, sample_rate: int = 22050):
        self.sample_rate = int(sample_rate)
        self.seconds = 0.0

    async def open(self) -> None:
        pass

    async def play(self, pcm: np.ndarray, more: bool = False) -> float:
        s = len(pcm) / self.sample_rate
        self.seconds += s
        return s

    def stop(self) -> None:
        pass
