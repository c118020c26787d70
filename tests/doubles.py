"""Test doubles shared by several test modules (each says why it is used where it is)."""

from __future__ import annotations

import threading

import numpy as np

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
