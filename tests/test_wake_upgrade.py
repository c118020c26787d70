"""An upgrade never silently changes what the board does: a config written before the wake word
(no wake: section) keeps answering every utterance as the installed service, and says once how
to turn the wake word on; the shipped config.yaml, which chooses wake.mode auto, waits for the
word there, and the install output says which of the two is in force.

The pipeline tests use real whisper and the file microphone of tests/test_wake.py, and
``service=True``: the daemon as systemd starts it (where auto means the wake word).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from assistant.audio.wav_sink import WavSink
from assistant.audio.wav_source import WavSource
from assistant.config import Config, load, parse
from assistant.pipeline import Components, Pipeline
from doubles import SilentVoices
from scripted_llm import ScriptedLLM
from speech_fixtures import write_wav

pytest.importorskip("pymicro_wakeword", reason="the wake word needs pymicro-wakeword")

ROOT = Path(__file__).resolve().parents[1]
RELEASES = sorted((ROOT / "tests" / "config_releases").glob("*.yaml"))
OLDEST, NEWEST = RELEASES[0], RELEASES[-1]
RATE = 16000


@pytest.fixture
def as_the_service(monkeypatch):
    """The environment systemd gives the installed unit."""
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")


def wake_warnings(cfg: Config) -> list[str]:
    return [w for w in cfg.warnings if "wake" in w]


def answer_plain_question(tmp_path, cfg: Config, spoken, whisper) -> tuple[Pipeline, ScriptedLLM]:
    """A person asks "What do you see on the table?" (no wake word) of the installed service."""
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), spoken.pcm("What do you see on the table?"),
                          np.zeros(int(1.5 * RATE), np.int16)])
    wav = write_wav(tmp_path / "heard.wav", pcm, RATE)
    cfg = replace(cfg, persona=replace(cfg.persona, language="en"),
                  vision=replace(cfg.vision, encoder="none", watch=False),
                  camera=replace(cfg.camera, source=None))
    voices = SilentVoices()
    llm = ScriptedLLM(["I see a red apple."])
    parts = Components(source=WavSource(wav, frame_ms=cfg.vad.frame_ms),
                       sink=WavSink(tmp_path / "said.wav", voices.sample_rate), asr=whisper,
                       voices=voices, llm=llm)
    pipe = Pipeline(cfg, parts, service=True)

    async def go():
        try:
            return await pipe.run(greet=False)
        finally:
            await parts.sink.close()
    assert asyncio.run(go()) == 0
    return pipe, llm


@pytest.mark.parametrize("path", [OLDEST, NEWEST], ids=lambda p: p.stem)
def test_a_config_of_an_earlier_release_still_answers_a_plain_question(tmp_path, path, spoken,
                                                                       whisper_tiny, as_the_service):
    # Bug caught: the wake section's default (auto: the wake word for the service) applied to
    # a file that never chose it, so the board that answered yesterday drops the question.
    cfg = load(path)
    assert cfg.wake.mode == "none"
    pipe, llm = answer_plain_question(tmp_path, cfg, spoken, whisper_tiny)
    assert [t.answer for t in pipe.turns] == ["I see a red apple."]
    assert "table" in llm.calls[0]["text"].lower() and not pipe.skipped


def test_the_shipped_config_waits_for_the_wake_word_as_the_service(tmp_path, spoken, whisper_tiny,
                                                                   as_the_service):
    # The other side (and what makes the test above mean something): the same question to the
    # shipped config, which chose auto, is not addressed.
    cfg = load(ROOT / "config.yaml")
    assert cfg.wake.mode == "auto" and wake_warnings(cfg) == []
    pipe, llm = answer_plain_question(tmp_path, cfg, spoken, whisper_tiny)
    assert not pipe.turns and llm.calls == []
    assert pipe.skipped[0]["note"].startswith("not addressed: no wake word (Okay Nabu)")


def test_the_service_is_told_once_which_key_turns_the_wake_word_on(as_the_service):
    # Bug caught: the old behaviour kept without a word (nobody learns the wake word exists),
    # or a warning for a file that chose (a wake: section, even without mode).
    cfg = load(NEWEST)
    [line] = wake_warnings(cfg)
    assert line.startswith(f"{NEWEST}: no wake: section") and "\n" not in line
    assert "wake.mode: auto (or word)" in line and '"Okay Nabu"' in line
    chose = parse("wake: {word: hey_jarvis}\n", "c.yaml")
    assert chose.wake.mode == "auto" and wake_warnings(chose) == []
    assert wake_warnings(parse("wake: {mode: none}\n", "c.yaml")) == []


def test_off_the_service_nothing_changed_and_nothing_is_said(monkeypatch):
    # `ask`, the demo and a daemon run by hand take auto as none: for them the file means what
    # it did, and a warning in every command would only be noise.
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    cfg = load(NEWEST)
    assert cfg.wake.mode == "none" and cfg.warnings == ()


def test_the_service_logs_it_once_at_start(tmp_path):
    (tmp_path / "old.yaml").write_text(NEWEST.read_text(encoding="utf-8"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), INVOCATION_ID="0123456789abcdef",
               NOTIFY_SOCKET=str(tmp_path / "nobody"))
    r = subprocess.run([sys.executable, "-m", "assistant", "--config", "old.yaml", "history"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "no wake: section" in line]
    assert len(lines) == 1 and lines[0].startswith("WARNING "), r.stderr


@pytest.mark.parametrize("text, said", [
    (NEWEST.read_text(encoding="utf-8"), "the service answers everything it hears (wake.mode none"),
    ((ROOT / "config.yaml").read_text(encoding="utf-8"),
     'the service answers only after the wake word "Okay Nabu" (wake.mode auto, here word'),
    ("wake: {mode: phrase, phrases: [computer]}\n",
     "the service answers only speech that starts with a wake phrase (computer)"),
])
def test_install_prints_the_wake_mode_in_force(tmp_path, text, said):
    # Bug caught: an install (or upgrade) that says nothing about the wake word, or reports
    # the mode as written (auto) instead of what the service will do.
    from test_install import make_root, run_install

    root = make_root(tmp_path)
    (tmp_path / "checkout" / "systemd").mkdir(parents=True)
    (tmp_path / "checkout" / "systemd" / "rkvlm-assistant.service").write_text(
        (ROOT / "systemd" / "rkvlm-assistant.service").read_text())
    (tmp_path / "checkout" / "config.yaml").write_text(text)
    rc, out = run_install(root, check=lambda cfg: 0, dry_run=True)
    assert rc == 0
    told = [line.strip() for line in out if "answers" in line]
    assert len(told) == 1 and told[0].startswith(said), out
