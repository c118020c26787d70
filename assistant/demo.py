"""`make demo`: a spoken question about a picture, through the whole voice loop.

The question is spoken by the project's own TTS into a WAV, the picture is drawn, and both go
through `ask` with the configured backends. Without the LLM's model files (no network to
pull them) the voice path still runs and the missing model is reported: no answer is invented.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np

from assistant import components
from assistant.config import Config

log = logging.getLogger(__name__)

QUESTION = "What do you see in front of you?"


def draw_scene(path: Path) -> Path:
    """A simple still life: a red apple and a blue mug on a wooden table, under a window."""
    import cv2

    img = np.full((480, 640, 3), (235, 206, 170), np.uint8)          # pale blue wall (BGR)
    cv2.rectangle(img, (380, 40), (600, 220), (250, 245, 240), -1)    # window
    cv2.rectangle(img, (380, 40), (600, 220), (90, 90, 90), 6)
    cv2.line(img, (490, 40), (490, 220), (90, 90, 90), 4)
    cv2.rectangle(img, (0, 300), (640, 480), (40, 90, 150), -1)       # wooden table
    for y in range(310, 480, 22):
        cv2.line(img, (0, y), (640, y + 6), (30, 70, 120), 2)
    cv2.circle(img, (220, 300), 60, (30, 30, 210), -1)                # apple
    cv2.line(img, (220, 242), (228, 215), (20, 60, 60), 6)
    cv2.ellipse(img, (250, 226), (22, 10), -20, 0, 360, (40, 160, 40), -1)
    cv2.rectangle(img, (380, 250), (470, 360), (180, 90, 30), -1)     # mug
    cv2.ellipse(img, (470, 305), (30, 35), 0, -90, 90, (180, 90, 30), 10)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path


def speak_question(cfg: Config, text: str, path: Path) -> Path:
    from assistant.audio.wav_sink import write_wav

    voices = components.voices(cfg)
    voices.load()
    tts = voices.for_language("en")
    pcm = tts.synthesize(text)
    silence = np.zeros(int(tts.sample_rate * 0.5), np.int16)
    write_wav(path, np.concatenate([silence, pcm, silence, silence]), tts.sample_rate)
    return path


def fetch_model(cfg: Config) -> None:
    """Pull the configured catalogue model once, if it is missing and the hub is reachable
    (HF_HUB_OFFLINE=1 says it is not). A failure is reported and the demo goes on."""
    import os

    from assistant.errors import ModelMissingError
    from assistant.llm import catalog

    lc = cfg.llm.llamacpp
    if cfg.llm.backend != "llamacpp" or lc.model not in catalog.CATALOG:
        return
    try:
        catalog.resolve(lc, cfg.path, want_mmproj=cfg.vision.encoder == "llamacpp")
        return
    except ModelMissingError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return
    print(f"demo: the model {lc.model} is not installed; fetching it once")
    catalog.cli_models_pull(lc.model, catalog.models_dir_for(lc, cfg.path))


def run_demo(cfg: Config, out_dir: Path) -> int:
    from assistant.ask import ask

    fetch_model(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = draw_scene(out_dir / "demo-scene.jpg")
    question = speak_question(cfg, QUESTION, out_dir / "demo-question.wav")
    answer_wav = out_dir / "demo-answer.wav"
    print(f"demo: asking {QUESTION!r} ({question}) about {image}")
    result = asyncio.run(ask(cfg, question, image, answer_wav, allow_missing_llm=True))
    print(json.dumps(result, ensure_ascii=False, indent=2))
    print()
    print(f"heard:    {result['transcript']!r} ({result['intent']})")
    if result.get("answer"):
        print(f"answered: {result['answer']!r}")
    if result.get("note"):
        print(f"note:     {result['note']}")
    print(f"spoken answer: {answer_wav}")
    return 0
