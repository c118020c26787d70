#!/usr/bin/env python3
"""Benchmark the llama.cpp backend (not a test): its turn overhead and, on a real model, speed.

1. Overhead: the same text turn (same prompt tokens after the cached system prompt, the
   same number of greedy answer tokens) through ``LlamaCppBackend.run_turn`` and through
   raw llama-cpp-python (``Llama.eval`` + ``Llama.generate``), interleaved, median of N.
2. Speed: image encode time, image and text prefill tokens/s, decode tokens/s and time to
   first token of an image turn.

Without --model it generates tiny random models (tests/tiny_models.py): ``--size tiny``
(n_embd 64, 2 layers: Python overhead dominates, the worst case for the overhead figure)
or ``--size small`` (n_embd 512, 8 layers).

    .venv/bin/python bench/bench_llamacpp.py [--size small] [--turns 30] [--tokens 64]
    .venv/bin/python bench/bench_llamacpp.py --model M.gguf --mmproj mmproj-M.gguf [--image x.jpg]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from assistant.config import LlamaCppConfig, LlmConfig, PersonaConfig  # noqa: E402
from assistant.llm.llamacpp import LlamaCppBackend  # noqa: E402

QUESTION = "What do you see in front of you right now, and what colour is it?"
SIZES = {"tiny": (64, 2), "small": (512, 8)}


def make_models(size: str, folder: Path) -> tuple[Path, Path]:
    from tiny_models import write_mmproj, write_text_model

    n_embd, n_layer = SIZES[size]
    model = write_text_model(folder / f"{size}.gguf", seed=3, n_embd=n_embd, n_layer=n_layer)
    mmproj = write_mmproj(folder / f"{size}-mmproj.gguf", text_n_embd=n_embd)
    return model, mmproj


def load_image(path: str | None) -> np.ndarray:
    if path:
        import cv2

        bgr = cv2.imread(path)
        if bgr is None:
            sys.exit(f"cannot read image {path}")
        return np.ascontiguousarray(bgr[:, :, ::-1])
    y, x = np.mgrid[0:480, 0:640]
    return np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def overhead(backend: LlamaCppBackend, args) -> tuple[float, float, int, int]:
    """Median ms per turn: (ours, raw), with prompt and answer token counts."""
    import llama_cpp

    sink: list[str] = []
    stats = backend.run_turn(QUESTION, None, False, sink.append)   # warm up, learn the work
    sys_n = len(backend._sys_mark.segments)
    prompt = [t for seg in backend._segments[sys_n:-1] for t in seg]
    n_gen = stats.generated_tokens
    system = [t for seg in backend._segments[:sys_n] for t in seg]

    raw = llama_cpp.Llama(str(backend.model_path), n_ctx=args.ctx, n_batch=args.batch,
                          n_ubatch=args.batch, n_threads=args.threads or None,
                          n_threads_batch=args.threads or None, flash_attn=True, verbose=False)
    raw.eval(system)
    n_sys = raw.n_tokens

    def raw_turn() -> float:
        t0 = time.perf_counter()
        raw.n_tokens = n_sys       # eval() drops the cache after n_tokens
        out = []
        for tok in raw.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=False):
            out.append(tok)
            raw.detokenize([tok])
            if len(out) == n_gen:
                break
        return (time.perf_counter() - t0) * 1e3

    def our_turn() -> float:
        t0 = time.perf_counter()
        st = backend.run_turn(QUESTION, None, False, sink.append)
        assert st.generated_tokens == n_gen
        return (time.perf_counter() - t0) * 1e3

    raw_turn()
    ours, theirs = [], []
    for _ in range(args.turns):   # interleaved, so drift hits both alike
        ours.append(our_turn())
        theirs.append(raw_turn())
    raw.close()
    return statistics.median(ours), statistics.median(theirs), len(prompt), n_gen


def speed(backend: LlamaCppBackend, rgb: np.ndarray, turns: int) -> dict:
    enc_ms, img_rate, ttft, dec_rate, txt_rate = [], [], [], [], []
    sink: list[str] = []
    for _ in range(turns):
        t0 = time.perf_counter()
        emb = backend.encode_image(rgb)
        enc_ms.append((time.perf_counter() - t0) * 1e3)
        st = backend.run_turn(QUESTION, emb, False, sink.append)
        img_rate.append(st.prompt_tokens / (st.prefill_ms / 1e3))
        if st.extra.get("ttft_ms") is not None:
            ttft.append(st.extra["ttft_ms"])
        if st.generated_tokens > 1:
            dec_rate.append(st.generated_tokens / (st.generate_ms / 1e3))
        st2 = backend.run_turn(QUESTION + " Please answer in detail.", None, True, sink.append)
        txt_rate.append(st2.prompt_tokens / (st2.prefill_ms / 1e3))
    med = statistics.median
    return {"image tokens": emb.n_tokens, "encode ms": med(enc_ms),
            "image-turn prefill tok/s": med(img_rate),
            "text prefill tok/s": med(txt_rate),
            "decode tok/s": med(dec_rate) if dec_rate else float("nan"),
            "first token ms (image pre-encoded)": med(ttft) if ttft else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a real GGUF language model (default: a generated one)")
    ap.add_argument("--mmproj", help="its multimodal projector")
    ap.add_argument("--image", help="an image file for the speed part (default: synthetic 640x480)")
    ap.add_argument("--size", choices=list(SIZES), default="tiny", help="generated model size")
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=64, help="answer tokens per turn")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model, mmproj = Path(args.model), Path(args.mmproj) if args.mmproj else None
            label = model.name
        else:
            model, mmproj = make_models(args.size, Path(tmp))
            label = f"generated {args.size} (n_embd {SIZES[args.size][0]}, {SIZES[args.size][1]} layers)"
        llm = LlmConfig(max_context_len=args.ctx, max_new_tokens=args.tokens, temperature=0.0,
                        repeat_penalty=1.0,
                        llamacpp=LlamaCppConfig(n_threads=args.threads, n_batch=args.batch))
        backend = LlamaCppBackend(llm, PersonaConfig(), model, mmproj)
        t0 = time.perf_counter()
        backend.load()
        load_ms = (time.perf_counter() - t0) * 1e3
        ours, raw, n_prompt, n_gen = overhead(backend, args)
        print(f"model: {label}; load {load_ms:.0f} ms; context {backend.context_size}")
        print(f"turn: {n_prompt} prompt tokens after the cached system prompt, {n_gen} answer tokens, "
              f"median of {args.turns}")
        print(f"  {'raw llama-cpp-python':32} {raw:9.2f} ms")
        print(f"  {'LlamaCppBackend.run_turn':32} {ours:9.2f} ms   overhead {100 * (ours - raw) / raw:+.1f} %")
        if mmproj is not None:
            for key, value in speed(backend, load_image(args.image), max(3, args.turns // 10)).items():
                shown = f"{value:10d}" if isinstance(value, int) else f"{value:10.1f}"
                print(f"  {key:40} {shown}")
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
