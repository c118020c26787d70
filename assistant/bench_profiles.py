"""Simulated NPU stages for `rkvlm-assistant bench --profile rk3576|rk3588`.

The board is not here, so the benchmark can replay its published stage times (rknn-llm's
benchmark.md, release 1.3.0, Qwen2-VL-2B; see shared/reference/edge-figures.md) behind the
real interfaces, while whisper, piper, the VAD and the pipeline run for real. What this
measures is the pipeline's shape: how much of the NPU's time hides behind the person
talking and behind speech synthesis. These classes are benchmark props, not backends: no
config setting selects them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from assistant.llm.base import ImageEmbedding, LLMBackend, TurnStats
from assistant.vision.base import VisionEncoder


@dataclass(frozen=True)
class NpuProfile:
    name: str
    encoder_s: float          # vision encoder, one image
    image_tokens: int
    embed_dim: int
    prefill_tok_s: float      # prefill rate measured on 196 image tokens
    decode_tok_s: float
    source: str


PROFILES = {
    "rk3576": NpuProfile("rk3576", 3.55, 196, 1536, 196 / 1.2349, 14.57,
                         "Qwen2-VL-2B w4a16, rknn-llm 1.3.0 benchmark.md"),
    "rk3588": NpuProfile("rk3588", 3.28, 196, 1536, 196 / 0.6326, 16.6,
                         "Qwen2-VL-2B w8a8, rknn-llm 1.3.0 benchmark.md"),
}

# Stands in for generated text so that sentence splitting and TTS see realistic lengths.
_TEXT = ("I can see a red apple and a blue mug on a wooden table. "
         "Behind them there is a bright window with a grey frame. "
         "The scene looks like a quiet kitchen in the morning.")


class SimulatedEncoder(VisionEncoder):
    name = "simulated-npu-encoder"

    def __init__(self, profile: NpuProfile):
        self.p = profile

    def load(self) -> None:
        pass

    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        time.sleep(self.p.encoder_s)
        return ImageEmbedding(np.zeros((self.p.image_tokens, self.p.embed_dim), np.float32), 392, 392)


class SimulatedLLM(LLMBackend):
    name = "simulated-npu-llm"

    def __init__(self, profile: NpuProfile, context: int = 4096):
        self.p = profile
        self.ctx = context
        self.used = 0
        self._abort = threading.Event()

    def load(self) -> None:
        pass

    def count_tokens(self, text: str) -> int:
        return max(1, int(len(text.split()) * 1.3))

    def run_turn(self, text: str, image: Optional[ImageEmbedding], keep_history: bool,
                 on_piece: Callable[[str], None], options=None) -> TurnStats:
        self._abort.clear()
        prompt = self.count_tokens(text) + (image.n_tokens if image is not None else 0)
        t0 = time.monotonic()
        time.sleep(prompt / self.p.prefill_tok_s)
        st = TurnStats(prompt_tokens=prompt, prefill_ms=(time.monotonic() - t0) * 1000)
        words = _TEXT.split(" ")
        t1 = time.monotonic()
        for i, w in enumerate(words):
            if self._abort.is_set():
                st.aborted = True
                break
            time.sleep(1.3 / self.p.decode_tok_s)   # ~1.3 tokens a word
            on_piece(w if i == 0 else " " + w)
            st.generated_tokens += 1
        st.generate_ms = (time.monotonic() - t1) * 1000
        self.used += prompt + st.generated_tokens
        st.context_used = self.used
        return st

    def abort(self) -> None:
        self._abort.set()

    def clear(self) -> None:
        self.used = 0

    def load_history(self, exchanges) -> None:
        # Fed back with the next question: the simulated prefill pays for it then.
        self.used = self.history_cost(exchanges)

    @property
    def context_size(self) -> int:
        return self.ctx

    @property
    def tokens_used(self) -> int:
        return self.used
