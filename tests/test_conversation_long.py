"""A hundred spoken questions on a 512-token context, through the voice pipeline.

Real whisper hears every question; the real tiny llama.cpp model (and, for the board, the
real ctypes binding over the compiled RKLLM runtime with the RKNNLite double) answers; the
camera is a video file whose scene changes every ten utterances. Speech synthesis is the one
double here (silence of the sentence's length): these tests are about what the context
holds, and a hundred answers through piper would only add minutes. The person waits for each
answer before asking again, without the real-time wait (``TurnTakingSource``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from assistant import components
from assistant.audio.null_sink import NullSink
from assistant.pipeline import Components, Pipeline, make_conversation
from assistant.transcript import TranscriptWriter, read_rows
from assistant.vision.file_camera import VideoCamera
from rkllm_fake import build_fake_rkllm, write_fake_model
from doubles import SilentVoices, TurnTakingSource
from tiny_models import write_mmproj, write_text_model

RATE = 16000
FAKES = Path(__file__).resolve().parent / "fakes"
QUESTIONS = ["What do you see on the table?", "What color is the cup?",
             "What is on the left?", "Is there a book?"]
SCENE_EVERY = 10
CLEAR_AT = 50            # utterance index of "Clear."


def scene_video(path: Path, frames: int) -> Path:
    """Frame i >= 1 shows scene (i - 1) // SCENE_EVERY; frames of one scene differ by noise."""
    rng = np.random.default_rng(5)
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 1.0, (64, 48))
    for i in range(frames):
        s = max(i - 1, 0) // SCENE_EVERY
        img = np.full((48, 64, 3), 40 + (s * 70) % 180, np.uint8)
        x = 8 + (s * 13) % 40
        img[10:38, x:x + 16] = (255 - 30 * (s % 5), 60 * (s % 4), 90)
        img = np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
        out.write(img)
    out.release()
    return path


def talk(spoken) -> tuple[list[np.ndarray], list[str]]:
    said = []
    questions = itertools.cycle(QUESTIONS)
    for u in range(101):
        said.append("Clear." if u == CLEAR_AT else next(questions))
    return [spoken.pcm(p) for p in said], said


def backend_config(kind: str, tmp_path: Path, tmp_path_factory) -> str:
    common = """
persona: {system_prompt: "You are Rocky. Answer briefly.", language: en}
camera: {source: scene.avi}
"""
    # (The camera's clock steps per snapshot: no idle watching, which would take more.)
    # Compaction at question time, the fallback: llm.compact_at: 0 (none while idle).
    if kind == "llamacpp":
        write_text_model(tmp_path / "tiny.gguf", scripted_reply="I see a red apple.")
        write_mmproj(tmp_path / "tiny-mmproj.gguf")
        return common + """
llm: {max_context_len: 512, max_new_tokens: 48, temperature: 0, compact_at: 0,
      llamacpp: {model: tiny.gguf, mmproj: tiny-mmproj.gguf}}
vision: {encoder: llamacpp, watch: false}
"""
    lib = build_fake_rkllm("1.3.0", tmp_path_factory.mktemp("rkllm"))
    write_fake_model(tmp_path / "qwen2-vl.rkllm", embed_dim=1536)
    sys.path.insert(0, str(FAKES))
    try:
        from rknnlite.api import write_model
    finally:
        sys.path.remove(str(FAKES))
    write_model(tmp_path / "vision.rknn", (392, 392), [[1, 196, 1536]])
    # The fake runtime echoes the prompt: 16 words of answer keep exchanges small.
    return common + f"""
llm: {{backend: rkllm, max_context_len: 512, max_new_tokens: 16, compact_at: 0,
      rkllm: {{library: "{lib}", runtime_version: auto, model: qwen2-vl.rkllm}}}}
vision: {{encoder: rknn, watch: false, rknn: {{model: vision.rknn}}}}
"""


@pytest.fixture
def rknnlite_on_path():
    sys.path.insert(0, str(FAKES))
    yield
    sys.path.remove(str(FAKES))
    for name in [m for m in sys.modules if m.startswith("rknnlite")]:
        del sys.modules[name]


@pytest.mark.parametrize("kind", ["llamacpp", "rkllm"])
def test_a_hundred_questions_on_a_small_context(kind, tmp_path, tmp_path_factory, spoken,
                                                whisper_tiny, rknnlite_on_path):
    speech, said = talk(spoken)
    video = scene_video(tmp_path / "scene.avi", len(said) + 2)
    (tmp_path / "config.yaml").write_text(backend_config(kind, tmp_path, tmp_path_factory))
    from assistant.config import load
    cfg = load(tmp_path / "config.yaml")
    llm, encoder, _ = components.language_model(cfg)
    llm.load()
    encoder.load()
    # The camera's clock steps one frame per snapshot, and there is one snapshot per
    # utterance (at speech onset): utterance u sees frame u + 1, scene u // SCENE_EVERY.
    ticks = itertools.count()
    camera = VideoCamera(video, clock=lambda: float(next(ticks)))
    camera.open()
    voices = SilentVoices()
    # The person asks, then waits for the answer (at full speed, not in real time).
    source = TurnTakingSource(speech, ready=lambda: pipe.idle(), frame_ms=cfg.vad.frame_ms)
    parts = Components(source=source, sink=NullSink(RATE),
                       asr=whisper_tiny, voices=voices, llm=llm, camera=camera, encoder=encoder)
    writer = TranscriptWriter(tmp_path / "transcript.jsonl")
    conv = make_conversation(cfg, parts, writer)
    pipe = Pipeline(cfg, parts, conversation=conv)
    try:
        asyncio.run(pipe.run(greet=False))
    finally:
        writer.close()
        encoder.close()
        llm.close()
    turns = list(pipe.turns)
    # Every utterance made a turn (whisper may hear "what colors the cup": no matter).
    assert [t.intent for t in turns] == ["clear" if p == "Clear." else "question" for p in said]
    ctx = cfg.llm.max_context_len
    held_scene = None            # the scene whose image the context holds
    compactions = 0
    for u, turn in enumerate(turns):
        if u == CLEAR_AT:
            assert turn.intent == "clear"
            held_scene = None
            continue
        assert turn.intent == "question" and turn.answer, (u, turn.note)
        assert not turn.note, (u, turn.note)
        c = turn.counts
        would_fit = c["context_before"] + c["turn_need"] <= ctx
        # Compaction runs exactly when the next turn would not fit, and it fits afterwards.
        assert (turn.compaction is not None) == (not would_fit), (u, c, turn.compaction)
        if turn.compaction is not None:
            compactions += 1
            assert turn.compaction["kind"] == "compact"
            assert turn.compaction["tokens_after"] < turn.compaction["tokens_before"]
            assert turn.compaction["tokens_after"] + c["turn_need"] <= ctx + c.get("image_tokens", 0)
            held_scene = None                       # the image left the context
        assert c["context_used"] <= ctx
        scene = u // SCENE_EVERY
        # The image goes in on a new scene or when the context lost it, and only then.
        expected = "same" if held_scene == scene else "new"
        assert turn.scene == expected, (u, turn.scene, held_scene, scene, c)
        assert ("image_tokens" in c) == (expected == "new")
        held_scene = scene
    assert compactions >= 5
    # Every turn is in the transcript, with its scene and compaction; the clear began a
    # new conversation.
    rows = list(read_rows(tmp_path / "transcript.jsonl"))
    assert [r["turn"] for r in rows] == [t.id for t in turns]
    assert sum(1 for r in rows if r["compaction"]) == compactions
    assert rows[CLEAR_AT + 1]["conversation"] != rows[CLEAR_AT - 1]["conversation"]
    # Each row says what its turn did: the words, the image, the compaction and the counts.
    for r, t in zip(rows, turns):
        assert (r["transcript"], r["answer"], r["intent"]) == (t.transcript, t.answer, t.intent)
        assert (r["scene"], r["image"], r["compaction"]) == (t.scene, t.with_image, t.compaction)
        assert r["counts"] == json.loads(json.dumps(t.counts))
    # English questions, the English voice only.
    assert {lang for lang, _ in voices.said} == {"en"}
