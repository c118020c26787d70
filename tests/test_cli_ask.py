"""`rkvlm-assistant ask` and `demo` end to end, as a person runs them: a real process, real
whisper and piper, and llama.cpp with tiny generated models (a scripted one answers exactly)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from assistant.audio.resample import resample
from assistant.audio.wav_source import read_wav
from assistant.demo import draw_scene
from speech_fixtures import hear, write_wav
from tiny_models import write_mmproj, write_text_model

REPLY = "I see a red apple on the wooden table."


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ask")
    write_text_model(d / "tiny.gguf", scripted_reply=REPLY)
    write_mmproj(d / "tiny-mmproj.gguf")
    draw_scene(d / "scene.jpg")
    (d / "config.yaml").write_text(
        "llm:\n  llamacpp: {model: tiny.gguf, mmproj: tiny-mmproj.gguf}\n"
        "persona: {language: en}\n")
    return d


def ask(workdir, *args, config="config.yaml"):
    r = subprocess.run([sys.executable, "-m", "assistant", "--config", config, "ask", *args],
                       cwd=workdir, capture_output=True, text=True, timeout=300)
    return r


def said(whisper, path: Path) -> str:
    pcm, rate = read_wav(path)
    return hear(whisper, resample(pcm, rate, 16000))


def test_a_spoken_question_about_an_image(workdir, spoken, whisper_tiny):
    q = spoken("What do you see on the table?")
    r = ask(workdir, "--audio", str(q), "--image", "scene.jpg", "--out", "answer.wav")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["transcript"].lower().rstrip("?.") == "what do you see on the table"
    assert out["language"] == "en"
    assert out["intent"] == "question"
    assert out["answer"] == REPLY
    assert out["image"] is True and out["counts"]["image_tokens"] == 16
    t = out["timings_ms"]
    assert "snapshot_ms" in t          # a still image: may take under 0.05 ms
    for key in ("asr_ms", "encode_ms", "llm_ms", "tts_ms", "llm_first_piece_ms"):
        assert t[key] > 0, key         # each stage ran, and took time
    assert t["llm_first_piece_ms"] <= t["first_audio_ms"]
    # The answer WAV holds the spoken answer: whisper hears it back.
    heard = said(whisper_tiny, workdir / "answer.wav")
    assert "apple" in heard and "table" in heard


def test_without_an_image_it_is_text_only(workdir, spoken):
    r = ask(workdir, "--audio", str(spoken("What do you see on the table?")), "--compact")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["intent"] == "question" and out["image"] is False and out["answer"] == REPLY


@pytest.mark.parametrize("phrase, intent, reply_word", [("Clear.", "clear", "forgot"),
                                                        ("Exit.", "exit", "bye"),
                                                        ("exit", "exit", "bye")])
def test_clear_and_exit_take_their_paths(workdir, spoken, whisper_tiny, phrase, intent, reply_word):
    out_wav = f"{intent}-{len(phrase)}.wav"
    r = ask(workdir, "--audio", str(spoken(phrase)), "--image", "scene.jpg", "--out", out_wav)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # The answer is the reply as spoken, not a model's answer.
    assert out["intent"] == intent and reply_word in out["answer"].lower()
    assert "encode_ms" not in out["timings_ms"]   # no image work for a command
    assert reply_word in said(whisper_tiny, workdir / out_wav)


def test_silence_is_no_turn(workdir):
    write_wav(workdir / "silence.wav", np.zeros(16000 * 2, np.int16))
    r = ask(workdir, "--audio", "silence.wav")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["intent"] == "nothing" and out["answer"] == ""


@pytest.mark.parametrize("name, content", [
    ("random.wav", bytes(range(256)) * 4),
    ("empty.wav", b""),
    ("text.wav", b"RIFF\x10\x00\x00\x00WAVEnot really a wave file"),
])
def test_a_bad_wav_is_one_clear_line(workdir, name, content):
    (workdir / name).write_bytes(content)
    r = ask(workdir, "--audio", name)
    assert r.returncode == 65
    lines = [l for l in r.stderr.splitlines() if l.startswith("rkvlm-assistant:")]
    assert len(lines) == 1 and name in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_a_bad_image_is_one_clear_line(workdir, spoken):
    (workdir / "broken.jpg").write_bytes((workdir / "scene.jpg").read_bytes()[:200])
    r = ask(workdir, "--audio", str(spoken("What do you see on the table?")), "--image", "broken.jpg")
    assert r.returncode == 65
    assert "broken.jpg" in r.stderr and "Traceback" not in r.stderr
    r = ask(workdir, "--audio", str(spoken("What do you see on the table?")), "--image", "nope.jpg")
    assert r.returncode == 65 and "nope.jpg" in r.stderr


def test_missing_catalogue_model_is_reported_not_invented(workdir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"llm:\n  llamacpp: {{model: smolvlm2-256m, models_dir: {tmp_path / 'models'}}}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")   # no download attempt from a test
    r = subprocess.run([sys.executable, "-m", "assistant", "--config", str(cfg), "demo",
                        "--out-dir", str(tmp_path / "out")],
                       cwd=workdir, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "rkvlm-assistant models pull smolvlm2-256m" in r.stdout + r.stderr
    result = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert result["intent"] == "question" and result["answer"] == ""
    assert "smolvlm2-256m" in result["note"]
    assert (tmp_path / "out" / "demo-answer.wav").stat().st_size > 10_000   # it said why
    # ask (not the demo) refuses outright: nothing to answer with.
    r = subprocess.run([sys.executable, "-m", "assistant", "--config", str(cfg), "ask",
                        "--audio", str(tmp_path / "out" / "demo-question.wav")],
                       cwd=workdir, capture_output=True, text=True, timeout=300)
    assert r.returncode == 78 and "models pull smolvlm2-256m" in r.stderr


def test_demo_with_a_model_answers(workdir, tmp_path, whisper_tiny):
    r = subprocess.run([sys.executable, "-m", "assistant", "--config", "config.yaml", "demo",
                        "--out-dir", str(tmp_path)], cwd=workdir, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"answered: {REPLY!r}" in r.stdout
    assert "apple" in said(whisper_tiny, tmp_path / "demo-answer.wav")


def test_several_questions_are_one_conversation_with_scene_memory(workdir, spoken, tmp_path):
    from speech_fixtures import write_wav
    import numpy as np
    pcm = np.concatenate([np.zeros(8000, np.int16), spoken.pcm("What do you see on the table?"),
                          np.zeros(16000, np.int16), spoken.pcm("What color is the cup?"),
                          np.zeros(16000, np.int16)])
    wav = write_wav(tmp_path / "two.wav", pcm, 16000)
    r = ask(workdir, "--audio", str(wav), "--image", "scene.jpg", "--compact")
    assert r.returncode == 0, r.stderr
    first, second = json.loads(r.stdout)["turns"]
    # The picture goes in once; the second question about the same scene goes as text.
    assert first["scene"] == "new" and first["counts"]["image_tokens"] > 0
    assert second["scene"] == "same" and second["counts"]["image_tokens_saved"] > 0
    assert "image_tokens" not in second["counts"]
    assert first["conversation"] == second["conversation"] and second["compaction"] is None


@pytest.mark.parametrize("config, used", [("camera: {source: null}\n", True),
                                          ("vision: {encoder: none}\n", False)])
def test_ask_image_is_used_or_the_reason_is_said(workdir, spoken, config, used):
    (workdir / "alt.yaml").write_text((workdir / "config.yaml").read_text() + config)
    r = ask(workdir, "--audio", str(spoken("What do you see on the table?")), "--image",
            "scene.jpg", "--compact", config="alt.yaml")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["image"] is used
    if not used:
        assert "vision.encoder is none" in out["image_note"]
