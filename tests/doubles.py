"""Test doubles shared by several test modules (each says why it is used where it is)."""

from __future__ import annotations

import asyncio
import threading
from typing import Callable

import numpy as np

from assistant.audio.base import AudioSource
from assistant.llm.base import ImageEmbedding
from assistant.vision.base import VisionEncoder

RATE = 16000


class SilentVoices:
    """Speech of the right length, made of silence; remembers which voice said what.

    For tests about conversation and timing where piper's audio itself is not the point
    (a hundred answers through piper would only add minutes)."""

    sample_rate = RATE

    def __init__(self):
        self.said: list[tuple[str, str]] = []

    def for_language(self, lang):
        outer = self

        class Voice:
            sample_rate = RATE

            def synthesize(self, text):
                outer.said.append((lang, text))
                return np.zeros(len(text) * 40, np.int16)
        return Voice()


class CountingEncoder(VisionEncoder):
    """An encoder whose embedding follows the picture's brightness; counts its calls and
    the threads they ran on."""

    name = "counting"

    def __init__(self):
        self.calls = 0
        self.threads = set()

    def load(self):
        pass

    def encode(self, rgb):
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        return ImageEmbedding(np.full((16, 8), float(rgb.mean()), np.float32), 32, 32)


class TurnTakingSource(AudioSource):
    """A person who asks and then waits for the answer: each utterance and the silence after
    it as fast as the pipeline takes them, then nothing until ``ready()`` (the assistant
    listens again). For long conversations that must not take their length in real time: a
    file read at full speed would run ahead of the answers, and a microphone gated while the
    assistant speaks (barge_in off) would drop whole questions, as it does for a person who
    talks over it."""

    name = "turn-taking"

    def __init__(self, utterances: list[np.ndarray], ready: Callable[[], bool],
                 frame_ms: int = 30, lead_s: float = 0.5, gap_s: float = 1.0):
        super().__init__(frame_ms)
        self.utterances = utterances
        self.ready = ready
        self.frame = self.frame_samples
        self.lead = np.zeros(int(lead_s * RATE), np.int16)
        self.gap = np.zeros(int(gap_s * RATE), np.int16)

    async def open(self) -> None:
        pass

    async def frames(self):
        for i, u in enumerate(self.utterances):
            pcm = np.concatenate([self.lead, u, self.gap] if i == 0 else [u, self.gap])
            for k in range(len(pcm) // self.frame):
                yield pcm[k * self.frame:(k + 1) * self.frame].tobytes()
            while not self.ready():
                await asyncio.sleep(0.005)
