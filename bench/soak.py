"""Soak: many turns through the real pipeline in one process; does memory stay flat?

The assistant is meant to run for weeks. This feeds a long conversation (questions, a
"clear" now and then) through the same pipeline code as the daemon, with real whisper,
piper, webrtcvad and llama.cpp (a tiny generated model with a small context, so the
context-full policy is exercised too), and prints the process's resident memory every
block of turns. Not a test: it takes minutes.

    .venv/bin/python bench/soak.py --turns 200
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from assistant import components  # noqa: E402
from assistant.config import Config, parse  # noqa: E402
from assistant.demo import draw_scene  # noqa: E402
from assistant.pipeline import Pipeline  # noqa: E402
from speech_fixtures import synthesize_pcm, write_wav  # noqa: E402
from tiny_models import write_mmproj, write_text_model  # noqa: E402

QUESTIONS = ["What do you see on the table?", "What color is the cup?", "Is there a window?",
             "Clear."]


def rss_mb() -> float:
    """Current resident set size (not the peak), from /proc."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def conversation(path: Path, n: int) -> Path:
    gap = np.zeros(int(1.2 * 16000), np.int16)
    clips = {q: synthesize_pcm(q) for q in QUESTIONS}
    parts = [gap]
    for i in range(n):
        parts += [clips[QUESTIONS[i % len(QUESTIONS)]], gap]
    return write_wav(path, np.concatenate(parts))


async def soak(cfg: Config, wav: Path, image: Path, block: int) -> list[tuple[int, float, float]]:
    source = components.wav_source(cfg, wav)
    parts = await components.assemble(cfg, source, lambda rate: components.wav_sink(None, rate),
                                      image=image, use_camera=False)
    rows: list[tuple[int, float, float]] = [(0, rss_mb(), 0.0)]
    t0 = time.monotonic()

    def on_turn(turn):
        n = turn.id
        if n % block == 0:
            rows.append((n, rss_mb(), time.monotonic() - t0))
            print(f"  turn {n:5d}: rss {rows[-1][1]:7.1f} MB, {rows[-1][2]:6.1f} s", flush=True)

    try:
        await Pipeline(cfg, parts, on_turn=on_turn).run(greet=False)
    finally:
        await components.close(parts)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--block", type=int, default=25, help="report memory every this many turns")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rkvlm-soak-") as d:
        d = Path(d)
        write_text_model(d / "tiny.gguf", scripted_reply="I see a red apple on the wooden table.")
        write_mmproj(d / "tiny-mmproj.gguf")
        image = draw_scene(d / "scene.jpg")
        cfg = parse(f"llm: {{max_context_len: 512, max_new_tokens: 32, llamacpp: "
                    f"{{model: {d / 'tiny.gguf'}, mmproj: {d / 'tiny-mmproj.gguf'}}}}}\n"
                    "persona: {language: en}\n")
        cfg = replace(cfg, logging=replace(cfg.logging, level="WARNING"))
        print(f"soak: {args.turns} turns, memory every {args.block}")
        rows = asyncio.run(soak(cfg, conversation(d / "talk.wav", args.turns), image, args.block))
    first = next((r for r in rows if r[0] >= args.block), rows[-1])
    last = rows[-1]
    per_100 = (last[1] - first[1]) / max(1, last[0] - first[0]) * 100
    print(f"after warm-up (turn {first[0]}): {first[1]:.1f} MB; at turn {last[0]}: {last[1]:.1f} MB; "
          f"growth {per_100:+.2f} MB per 100 turns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
