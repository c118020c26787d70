"""The daemon as the installed service (systemd's INVOCATION_ID and NOTIFY_SOCKET set): wake.mode
auto listens for the wake word, on a real sounddevice microphone (ALSA's file plugin) with the
tiny llama.cpp model; STATUS says which state it is in, and the transcript how each question
was addressed."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from alsa_support import make_fake_alsa, portaudio_available
from assistant.audio.resample import resample
from test_daemon import BASE_CONFIG, MIC_RATE, REPLY, run_to_exit, start_daemon
from tiny_models import write_text_model

pytestmark = pytest.mark.skipif(not portaudio_available(), reason="needs libportaudio2")
pytest.importorskip("pymicro_wakeword", reason="the wake word needs pymicro-wakeword")


def at_mic_rate(spoken, *parts) -> np.ndarray:
    return np.concatenate([np.zeros(int(p * MIC_RATE), np.int16) if isinstance(p, float)
                           else resample(spoken.pcm(p), 16000, MIC_RATE) for p in parts])


def test_the_service_answers_only_after_the_wake_word(tmp_path, spoken, monkeypatch):
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")      # started by systemd
    fake = make_fake_alsa(tmp_path, capture_rate=MIC_RATE, playback_rate=22050)
    fake.write_capture(at_mic_rate(spoken, 0.4, "What do you see on the table?", 1.2,
                                   "Okay Nabu.", 0.8, "What do you see on the table?", 1.5))
    write_text_model(tmp_path / "tiny.gguf", scripted_reply=REPLY)
    proc, sock = start_daemon(tmp_path, fake, BASE_CONFIG.replace("camera: {source: scene.jpg}",
                                                                  "camera: {source: null}")
                              + "llm: {llamacpp: {model: tiny.gguf}}\nvision: {encoder: none}\n"
                              # chosen: a file without a wake: section keeps answering
                              # everything (tests/test_wake_upgrade.py)
                              + "wake: {mode: auto}\n")
    rows_file = tmp_path / "turns.jsonl"
    end = time.monotonic() + 180
    while time.monotonic() < end and proc.poll() is None and not (
            rows_file.exists() and rows_file.read_text().strip()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = run_to_exit(proc, sock, timeout=60)
    assert proc.returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    # The first question had no wake word: no turn, and it never reached whisper.
    assert [(r["intent"], r["addressed"]) for r in rows] == [("question", "wake word")], rows
    assert rows[0]["answer"] == REPLY
    assert "makes no turn: not addressed: no wake word (Okay Nabu)" in err
    status = [m.removeprefix("STATUS=") for m in sock.messages if m.startswith("STATUS=")]
    assert "waiting for wake word" in status
    assert status.index("waiting for wake word") < status.index("listening") < status.index(
        "thinking")
