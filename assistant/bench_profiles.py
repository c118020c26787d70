"""Board profiles for `rkvlm-assistant bench`: published figures replayed behind real interfaces.

The board is not here, so the benchmark replays its published NPU stage times behind the
real ``LLMBackend`` / ``VisionEncoder`` interfaces (rknn-llm's ``benchmark.md``, release
1.3.0, max frequency; see shared/reference/edge-figures.md), and slows the CPU stages
(whisper, piper) to the board's published speed, while the VAD, the scene memory, the
conversation and the pipeline run for real. What this measures is the pipeline's shape on
the board: what the person waits for, and how much of the NPU's time hides behind the person
talking and behind speech synthesis. These classes are benchmark props, not backends: no
config setting selects them.

The NPU figures per model and chip:

- ``encoder_s``: the vision encoder, one image at the model's input size;
- ``image_tokens``: the tokens of the published prefill figure ("prefill N tokens in T ms"),
  which is what an image costs the prefill here; ``prefill_tok_s`` = N / T;
- ``text_prefill_tok_s``: 128 / time to first token of a 128-token text prompt, where the
  table publishes it (Qwen3-VL-2B, Qwen3.5-0.8B); the image prefill rate otherwise;
- ``decode_tok_s``: the published decode rate.

The CPU stages: the board's CPU is several times slower than this machine for whisper and
piper. ``ScaledTranscriber`` / ``ScaledVoices`` run the real stage and then wait
``(k - 1) x`` its measured time, so a stage that took t here takes k x t. k is the ratio of
the board's published real-time factor to the one measured here at the start of the run
(see ``calibrate``; best of three, so a busy machine makes k larger, not smaller):

- whisper: faster-whisper tiny on a Raspberry Pi 400 (4x Cortex-A72, 1.8 GHz), RTF 0.36 on a
  3.9 s transcription of an utterance of about 11 s (faster-whisper issue 38). The RK3576's
  big cores are the same A72 at 2.2 GHz; the RK3588's A76 are faster, so the figure is
  pessimistic there. Measured here on an utterance of similar length.
- piper: RTF about 0.65 on the RK3588 CPU (Paroli write-up); no RK3576 CPU figure is
  published (its A72 cores are slower than the A76: optimistic there). Streaming piper on
  the RK3576 reaches about 234 ms to first audio (rkvoice-stream), which the pipeline does
  not do.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from assistant.errors import ContextFullError
from assistant.llm.base import TEMPLATE_OVERHEAD, ImageEmbedding, LLMBackend, TurnStats
from assistant.vision.base import VisionEncoder

BENCHMARK_SOURCE = "rknn-llm 1.3.0 benchmark.md"

# Published real-time factors of the CPU stages on the board (edge-figures.md).
BOARD_ASR_RTF = 0.36     # faster-whisper tiny, Raspberry Pi 400 (Cortex-A72), issue 38
BOARD_TTS_RTF = 0.65     # piper, RK3588 CPU (Paroli write-up)


@dataclass(frozen=True)
class NpuProfile:
    name: str
    chip: str
    model: str
    quant: str
    encoder_s: float              # vision encoder, one image
    image_size: int
    image_tokens: int             # tokens of the published prefill figure
    embed_dim: int                # the LLM's hidden size (the embedding's width)
    prefill_tok_s: float          # image_tokens / published prefill time
    decode_tok_s: float
    text_prefill_tok_s: Optional[float] = None   # from the 128-token text prefill, if published
    source: str = BENCHMARK_SOURCE

    @property
    def text_rate(self) -> float:
        return self.text_prefill_tok_s or self.prefill_tok_s

    def describe(self) -> str:
        return (f"{self.model} {self.quant} on {self.chip.upper()}: encoder {self.encoder_s:g} s "
                f"({self.image_size}x{self.image_size}), prefill {self.prefill_tok_s:.0f} tok/s "
                f"({self.image_tokens} image tokens in {self.image_tokens / self.prefill_tok_s:.2f} s)"
                + (f", text prefill {self.text_prefill_tok_s:.0f} tok/s"
                   if self.text_prefill_tok_s else "")
                + f", decode {self.decode_tok_s:g} tok/s ({self.source})")


def _rows():
    """(slug, model, image size, N prefill tokens, hidden size,
        {chip: (encoder s, prefill ms for N tokens, decode tok/s, text TTFT ms for 128 or None)})"""
    return [
        ("qwen2-vl-2b", "Qwen2-VL-2B", 392, 196, 1536,
         {"rk3588": (3.28, 632.6, 16.6, None), "rk3576": (3.55, 1234.9, 14.57, None)}),
        ("qwen2.5-vl-3b", "Qwen2.5-VL-3B", 392, 196, 2048,
         {"rk3588": (2.93, 1120, 8.66, None), "rk3576": (2.87, 2130, 7.87, None)}),
        ("minicpm-v-2.6", "MiniCPM-V-2.6", 448, 64, 3584,
         {"rk3588": (3.27, 826, 4.18, None), "rk3576": (2.4, 1230, 3.85, None)}),
        ("smolvlm-256m", "SmolVLM-256M", 512, 128, 576,
         {"rk3588": (0.842, 77.3, 78, None), "rk3576": (0.768, 180, 57.73, None)}),
        ("qwen3-vl-2b", "Qwen3-VL-2B", 448, 196, 2048,
         {"rk3588": (2.08, 649, 14.91, 384), "rk3576": (1.61, 1587, 10.36, 803)}),
        ("deepseekocr-3b", "DeepSeekOCR-3B", 448, 128, 1280,
         {"rk3588": (2.09, 696, 31.8, None), "rk3576": (2.27, 1010, 22.3, None)}),
        ("qwen3.5-0.8b", "Qwen3.5-0.8B", 448, 216, 1024,
         {"rk3588": (0.69, 1560, 27, 588), "rk3576": (0.815, 3400, 15.4, 1369)}),
    ]


def _build() -> dict[str, NpuProfile]:
    out: dict[str, NpuProfile] = {}
    for slug, model, size, n, dim, chips in _rows():
        for chip in ("rk3576", "rk3588"):
            enc, prefill_ms, decode, ttft = chips[chip]
            out[f"{chip}-{slug}"] = NpuProfile(
                name=f"{chip}-{slug}", chip=chip, model=model,
                quant="w8a8" if chip == "rk3588" else "w4a16",
                encoder_s=enc, image_size=size, image_tokens=n, embed_dim=dim,
                prefill_tok_s=n / (prefill_ms / 1000.0), decode_tok_s=decode,
                text_prefill_tok_s=128 / (ttft / 1000.0) if ttft else None)
    return out


PROFILES: dict[str, NpuProfile] = _build()
ALIASES = {"rk3576": "rk3576-qwen2-vl-2b", "rk3588": "rk3588-qwen2-vl-2b"}
MEASURED = "measured"
# Stages a board profile simulates (NPU: replayed; CPU: the real stage, slowed).
NPU_STAGES = ["encoder", "prefill", "decode"]
CPU_STAGES = ["asr", "tts"]


def profile_names() -> list[str]:
    """Every name --profile accepts."""
    return [MEASURED, *PROFILES, *ALIASES]


def resolve_profile(name: str) -> Optional[NpuProfile]:
    """The board profile for a name or alias; None for ``measured``; KeyError if unknown."""
    if name == MEASURED:
        return None
    return PROFILES[ALIASES.get(name, name)]


# Stands in for generated text so that sentence splitting and TTS see realistic lengths.
ANSWER = ("I see a wooden table, with a red apple and a blue mug on it. "
          "Behind them there is a bright window with a grey frame. "
          "It looks like a quiet kitchen in the morning.")

# Tokens of the system prompt (always in the context).
SYSTEM_TOKENS = 24


class FastForward:
    """Skips the simulated waits while set: for setting a scene up (a warm-up question),
    never for what is measured."""

    def __init__(self) -> None:
        self._on = threading.Event()

    def __enter__(self):
        self._on.set()
        return self

    def __exit__(self, *exc) -> None:
        self._on.clear()

    def start(self) -> None:
        """Skip from now on (the rest of a turn whose wait was measured)."""
        self._on.set()

    def stop(self) -> None:
        self._on.clear()

    def sleep(self, seconds: float, cancel: Optional[threading.Event] = None) -> None:
        if self._on.is_set() or seconds <= 0:
            return
        if cancel is not None:
            cancel.wait(seconds)
        else:
            time.sleep(seconds)


class SimulatedEncoder(VisionEncoder):
    name = "simulated-npu-encoder"

    def __init__(self, profile: NpuProfile, clock: Optional[FastForward] = None):
        self.p = profile
        self.clock = clock or FastForward()

    def load(self) -> None:
        pass

    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        self.clock.sleep(self.p.encoder_s)
        size = self.p.image_size
        return ImageEmbedding(np.zeros((self.p.image_tokens, self.p.embed_dim), np.float32),
                              size, size)


class SimulatedLLM(LLMBackend):
    """The NPU LLM's timing with a context kept like a real backend's.

    Costs are counted the same way everywhere: a turn takes ``turn_cost`` of its question
    and image (+ the answer, counted like ``count_tokens`` of its text), and exchanges fed
    back with ``load_history`` take ``history_cost``; they are evaluated (and the simulated
    prefill pays for them) with the next turn, as a backend may do.
    """

    name = "simulated-npu-llm"

    def __init__(self, profile: NpuProfile, context: int = 4096,
                 clock: Optional[FastForward] = None, answer: str = ANSWER):
        self.p = profile
        self.ctx = context
        self.clock = clock or FastForward()
        self.answer = answer
        self.used = SYSTEM_TOKENS
        self.pending = 0                  # history loaded, evaluated with the next turn
        self.ahead: Optional[ImageEmbedding] = None   # an image prefilled during speech
        self._abort = threading.Event()

    def load(self) -> None:
        pass

    def count_tokens(self, text: str) -> int:
        return max(1, round(len(text.split()) * 1.3))

    def prompt_tokens(self, text: str, image: Optional[ImageEmbedding]) -> tuple[int, int]:
        """(text tokens, image tokens) this turn evaluates (template included)."""
        return (self.count_tokens(text) + TEMPLATE_OVERHEAD,
                image.n_tokens + 4 if image is not None else 0)

    def prefill_s(self, text_tokens: int, image_tokens: int) -> float:
        return text_tokens / self.p.text_rate + image_tokens / self.p.prefill_tok_s

    def run_turn(self, text: str, image: Optional[ImageEmbedding], keep_history: bool,
                 on_piece: Callable[[str], None], options=None) -> TurnStats:
        self._abort.clear()
        if not keep_history:
            self.clear()
        if self.used + self.turn_cost(text, image) > self.ctx:
            raise ContextFullError(f"the turn needs {self.turn_cost(text, image)} tokens and "
                                   f"{self.ctx - self.used} of {self.ctx} are free")
        text_tok, image_tok = self.prompt_tokens(text, image)
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead is image:
            # Its image went in during the speech (llm.prefill_early): only the rest now.
            self.used -= image_tok
            image_tok_now = 0
        else:
            if ahead is not None:
                self.used -= ahead.n_tokens + 4           # cut away, unused
            image_tok_now = image_tok
        t0 = time.monotonic()
        # History fed back by load_history is evaluated now, with the question.
        self.clock.sleep(self.prefill_s(text_tok + self.pending, image_tok_now), self._abort)
        st = TurnStats(prompt_tokens=text_tok + self.pending + image_tok,
                       prefill_ms=(time.monotonic() - t0) * 1000)
        self.used += text_tok + image_tok
        self.pending = 0
        words = self.answer.split(" ")
        limit = options.max_new_tokens if options is not None and options.max_new_tokens else None
        said: list[str] = []
        t1 = time.monotonic()
        for i, w in enumerate(words):
            if self._abort.is_set():
                st.aborted = True
                break
            if limit is not None and self.count_tokens(" ".join(said + [w])) > limit:
                st.extra["finish"] = "length"
                break
            self.clock.sleep(self.count_tokens(w) / self.p.decode_tok_s, self._abort)
            if self._abort.is_set():
                st.aborted = True
                break
            said.append(w)
            on_piece(w if i == 0 else " " + w)
        st.generated_tokens = self.count_tokens(" ".join(said)) if said else 0
        st.generate_ms = (time.monotonic() - t1) * 1000
        self.used += st.generated_tokens
        st.context_used = self.used
        return st

    def abort(self) -> None:
        self._abort.set()

    def clear(self) -> None:
        self.used = SYSTEM_TOKENS
        self.pending = 0
        self.ahead = None

    def prefill(self, image: ImageEmbedding) -> bool:
        """The image's prefill at the published rate, ahead of the question (what the
        llama.cpp backend does, and what RKLLM's prefix reuse gives where it works). History
        fed back and not yet evaluated goes first: RKLLM's prefill-only run of the next
        turn's opening holds both."""
        if self.used + image.n_tokens + 4 > self.ctx:
            return False
        self._abort.clear()
        self.clock.sleep(self.prefill_s(self.pending, image.n_tokens + 4), self._abort)
        self.pending = 0
        self.used += image.n_tokens + 4
        self.ahead = image
        return True

    def cancel_prefill(self) -> None:
        if self.ahead is not None:
            self.used -= self.ahead.n_tokens + 4
            self.ahead = None

    def load_history(self, exchanges: Sequence[tuple[str, str]]) -> None:
        # Fed back with the next question: the simulated prefill pays for it then.
        self.pending = self.history_cost(exchanges)
        self.used = SYSTEM_TOKENS + self.pending

    @property
    def context_size(self) -> int:
        return self.ctx

    @property
    def tokens_used(self) -> int:
        # A prefill ahead is not the conversation's until its turn uses it.
        return self.used - (self.ahead.n_tokens + 4 if self.ahead is not None else 0)


# ---------------------------------------------------------------------------- CPU stages

class Slowdown:
    """k for one CPU stage: the board's published RTF over the RTF measured here."""

    def __init__(self, stage: str, board_rtf: float, basis: str):
        self.stage = stage
        self.board_rtf = board_rtf
        self.basis = basis
        self.here_rtf: Optional[float] = None
        self.cancel = threading.Event()   # cuts a pending wait short (the bench ends a turn)
        # The stage is not run at all (TTS): the rest of a turn whose wait was measured, in
        # the long conversation, which needs the answers in the history, not their sound.
        self.skip = threading.Event()

    @property
    def k(self) -> float:
        if not self.here_rtf:
            return 1.0
        return max(1.0, self.board_rtf / self.here_rtf)

    def after(self, measured_s: float) -> None:
        """Called after the real stage took measured_s: wait the rest of k x measured_s."""
        extra = (self.k - 1.0) * measured_s
        if extra > 0:
            self.cancel.wait(extra)

    def as_json(self) -> dict:
        return {"k": round(self.k, 2), "board_rtf": self.board_rtf,
                "here_rtf": round(self.here_rtf, 3) if self.here_rtf else None,
                "basis": self.basis}


class ScaledTranscriber:
    """The real whisper, then the wait that makes it as slow as on the board."""

    def __init__(self, inner, slow: Slowdown):
        self.inner = inner
        self.slow = slow

    def transcribe(self, pcm):
        t0 = time.monotonic()
        out = self.inner.transcribe(pcm)
        self.slow.after(time.monotonic() - t0)
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


class ScaledSynthesizer:
    def __init__(self, inner, slow: Slowdown):
        self.inner = inner
        self.slow = slow

    def synthesize(self, text: str, *args, **kwargs):
        if self.slow.skip.is_set():
            return self._blip()
        t0 = time.monotonic()
        out = self.inner.synthesize(text, *args, **kwargs)
        self.slow.after(time.monotonic() - t0)
        return out

    def stream(self, text: str):
        """Each chunk as late as the board would make it (the first one included)."""
        if self.slow.skip.is_set():
            from assistant.audio.tts import Chunk
            yield Chunk(self._blip(), 1.0)
            return
        chunks = self.inner.stream(text)
        while True:
            t0 = time.monotonic()
            chunk = next(chunks, None)
            self.slow.after(time.monotonic() - t0)
            if chunk is None:
                return
            yield chunk

    def _blip(self) -> np.ndarray:
        return np.zeros(int(0.05 * self.inner.sample_rate), np.int16)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class ScaledVoices:
    """A VoiceSet whose voices are as slow as on the board."""

    def __init__(self, inner, slow: Slowdown):
        self.inner = inner
        self.slow = slow

    def for_language(self, language):
        return ScaledSynthesizer(self.inner.for_language(language), self.slow)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def calibrate(asr, voices, long_pcm: np.ndarray, sentences: Sequence[str],
              tries: int = 3) -> tuple[float, float]:
    """This machine's real-time factors (best of ``tries``): whisper on ``long_pcm`` (16 kHz,
    about as long as the board figure's utterance) in whisper's own 30 s window, as the
    board figure was measured, so both sides pay the same encoder; piper on ``sentences``
    one at a time (as the pipeline speaks them; piper's per-call cost included). The
    pipeline's shorter window (asr.window_s) then runs faster here and on the board alike."""
    from assistant.audio.asr import FULL_WINDOW_S
    from assistant.audio.base import SAMPLE_RATE

    asr_rtf = tts_rtf = float("inf")
    tts = voices.for_language("en")
    for _ in range(tries):
        t0 = time.monotonic()
        asr.transcribe(long_pcm, window_s=FULL_WINDOW_S)
        asr_rtf = min(asr_rtf, (time.monotonic() - t0) / (len(long_pcm) / SAMPLE_RATE))
        t0 = time.monotonic()
        n = sum(len(tts.synthesize(s)) for s in sentences)
        tts_rtf = min(tts_rtf, (time.monotonic() - t0) / max(1e-3, n / tts.sample_rate))
    return asr_rtf, tts_rtf
