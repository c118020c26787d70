"""Tokens per turn with scene memory (vision.attach: when_changed) and without (every_turn).

Twenty spoken questions (piper speaks them, whisper hears them) about a camera whose scene
changes every ten questions, through the real pipeline and the tiny llama.cpp models on a
512-token context; prints what each mode evaluated per turn and how often it compacted.

    .venv/bin/python bench/conversation_tokens.py [--questions 20]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from assistant import components  # noqa: E402
from assistant.audio.null_sink import NullSink  # noqa: E402
from assistant.audio.wav_source import WavSource  # noqa: E402
from assistant.config import load  # noqa: E402
from assistant.pipeline import Components, Pipeline  # noqa: E402
from assistant.vision.file_camera import VideoCamera  # noqa: E402
from speech_fixtures import synthesize_pcm, write_wav  # noqa: E402
from doubles import SilentVoices  # noqa: E402
from test_conversation_long import QUESTIONS, scene_video  # noqa: E402
from tiny_models import write_mmproj, write_text_model  # noqa: E402
from assistant.audio.asr import Transcriber  # noqa: E402
from assistant.audio.model_paths import resolve_whisper  # noqa: E402

RATE = 16000


def run(d: Path, wav: Path, n: int, attach: str, asr) -> dict:
    (d / "config.yaml").write_text(f"""
persona: {{system_prompt: "You are Rocky. Answer briefly.", language: en}}
camera: {{source: scene.avi}}
llm: {{max_context_len: 512, max_new_tokens: 48, temperature: 0,
      llamacpp: {{model: tiny.gguf, mmproj: tiny-mmproj.gguf}}}}
vision: {{encoder: llamacpp, attach: {attach}, watch: false}}
""")
    cfg = load(d / "config.yaml")
    llm, encoder, _ = components.language_model(cfg)
    llm.load()
    encoder.load()
    ticks = itertools.count()
    camera = VideoCamera(d / "scene.avi", clock=lambda: float(next(ticks)))
    camera.open()
    parts = Components(source=WavSource(wav), sink=NullSink(RATE), asr=asr,
                       voices=SilentVoices(), llm=llm, camera=camera, encoder=encoder)
    pipe = Pipeline(cfg, parts)
    try:
        asyncio.run(pipe.run(greet=False))
    finally:
        pipe.scene.close()
        encoder.close()
        llm.close()
    turns = [t for t in pipe.turns if t.intent == "question"]
    prompt = [t.counts.get("prompt_tokens", 0) for t in turns]
    return {"turns": len(turns), "prompt_tokens_mean": statistics.mean(prompt),
            "prompt_tokens_total": sum(prompt),
            "image_turns": sum(1 for t in turns if t.scene == "new"),
            "image_tokens_total": sum(t.counts.get("image_tokens", 0) for t in turns),
            "image_tokens_saved": sum(t.counts.get("image_tokens_saved", 0) for t in turns),
            "compactions": sum(1 for t in turns if t.compaction)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_text_model(d / "tiny.gguf", scripted_reply="I see a red apple.")
        write_mmproj(d / "tiny-mmproj.gguf")
        scene_video(d / "scene.avi", args.questions + 2)
        phrases = itertools.cycle(QUESTIONS)
        pcm = [np.zeros(RATE // 2, np.int16)]
        for _ in range(args.questions):
            pcm += [synthesize_pcm(next(phrases)), np.zeros(RATE, np.int16)]
        wav = write_wav(d / "talk.wav", np.concatenate(pcm), RATE)
        from assistant.config import AsrConfig
        asr = Transcriber(AsrConfig(), resolve_whisper(AsrConfig(), None))
        asr.load()
        rows = {mode: run(d, wav, args.questions, mode, asr) for mode in ("every_turn", "when_changed")}
    print(f"{args.questions} questions, scene changes every 10, 512-token context, tiny llama.cpp")
    print(f"{'attach':<14}{'tokens/turn':>12}{'total':>8}{'image turns':>13}{'image tok':>11}"
          f"{'saved':>7}{'compactions':>13}")
    for mode, r in rows.items():
        print(f"{mode:<14}{r['prompt_tokens_mean']:>12.1f}{r['prompt_tokens_total']:>8}"
              f"{r['image_turns']:>13}{r['image_tokens_total']:>11}{r['image_tokens_saved']:>7}"
              f"{r['compactions']:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
