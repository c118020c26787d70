"""`rkvlm-assistant run`, the daemon, on a real sounddevice microphone and speaker.

ALSA's file plugin (tests/alsa_support.py) gives PortAudio a capture device that reads a raw
file and a playback device that writes one. The daemon runs as a real process under a fake
systemd: sd_notify goes to a datagram socket the test reads. Both LLM backends are driven:
llama.cpp with tiny generated models, and RKLLM (the compiled fake runtime) with the NPU
encoder (the RKNNLite double).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from alsa_support import make_fake_alsa, portaudio_available
from assistant.audio.resample import resample
from assistant.demo import draw_scene
from speech_fixtures import hear
from tiny_models import write_mmproj, write_text_model

pytestmark = pytest.mark.skipif(not portaudio_available(), reason="needs libportaudio2")

FAKES = Path(__file__).resolve().parent / "fakes"
REPLY = "I see a red apple on the wooden table."
MIC_RATE = 48000


class NotifySocket:
    """The systemd side of sd_notify: reads every datagram as it comes, like systemd does."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return

    def drain(self) -> list[str]:
        """Stop reading (once the daemon has exited) and return everything received."""
        time.sleep(0.2)
        self._stop.set()
        self._reader.join(5)
        return self.messages

    def wait_for(self, message: str, proc: subprocess.Popen, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and proc.poll() is None:
            if any(message in m for m in list(self.messages)):
                return
            time.sleep(0.05)
        raise AssertionError(f"no {message!r} from the daemon; got {self.messages}")


def speech_at(spoken, *phrases, gap_s=1.2):
    """The phrases at the microphone's rate, with silence between."""
    parts = [np.zeros(int(0.4 * MIC_RATE), np.int16)]
    for p in phrases:
        parts += [resample(spoken.pcm(p), 16000, MIC_RATE), np.zeros(int(gap_s * MIC_RATE), np.int16)]
    return np.concatenate(parts)


def start_daemon(tmp_path, fake, config_text, extra_path=None):
    (tmp_path / "config.yaml").write_text(config_text)
    sock = NotifySocket(tmp_path / "notify.sock")
    env = fake.env()
    env["NOTIFY_SOCKET"] = sock.path
    env["WATCHDOG_USEC"] = "2000000"
    env.pop("WATCHDOG_PID", None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env["PYTHONPATH"]])
    proc = subprocess.Popen([sys.executable, "-m", "assistant", "--config", "config.yaml", "run"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc, sock


def heard(whisper, fake) -> str:
    played = fake.read_playback()[:, 0]
    return hear(whisper, resample(played, fake.playback_rate, 16000))


BASE_CONFIG = f"""
audio:
  input: {{device: fakemic, sample_rate: {MIC_RATE}}}
  output: {{device: fakespeaker, sample_rate: 22050}}
persona: {{language: en, en: {{greeting: ""}}}}
intent: {{exit_action: stop}}
camera: {{source: scene.jpg}}
transcript: {{path: turns.jsonl}}
"""


@pytest.fixture
def scene(tmp_path):
    draw_scene(tmp_path / "scene.jpg")
    return tmp_path / "scene.jpg"


def run_to_exit(proc, sock, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the daemon did not stop:\n{err[-3000:]}")
    sock.drain()
    return out, err


# The fake microphone does not keep time: it hands over its whole file at once. So the
# conversations below have no greeting (the microphone is gated while the assistant speaks,
# and would drop the whole burst); the greeting is checked on its own.
def test_daemon_answers_on_the_microphone_and_speaker(tmp_path, scene, spoken, whisper_tiny):
    fake = make_fake_alsa(tmp_path, capture_rate=MIC_RATE, playback_rate=22050)
    fake.write_capture(speech_at(spoken, "What do you see on the table?", "Clear.", "Exit."))
    write_text_model(tmp_path / "tiny.gguf", scripted_reply=REPLY)
    write_mmproj(tmp_path / "tiny-mmproj.gguf")
    proc, sock = start_daemon(tmp_path, fake, BASE_CONFIG +
                              "llm: {llamacpp: {model: tiny.gguf, mmproj: tiny-mmproj.gguf}}\n")
    out, err = run_to_exit(proc, sock)
    assert proc.returncode == 0, err[-3000:]
    # systemd saw it start after the models loaded, get pinged, and stop.
    msgs = sock.messages
    assert "READY=1" in msgs and "STOPPING=1" in msgs and "WATCHDOG=1" in msgs
    assert msgs.index("STATUS=loading models") < msgs.index("READY=1")
    assert any(m.startswith("STATUS=turn") for m in msgs)
    # One log line per turn, with its timings.
    turn_lines = [l for l in err.splitlines() if "assistant.turn: turn" in l]
    assert [l.split("intent=")[1].split()[0] for l in turn_lines] == ["question", "clear", "exit"]
    assert "first_audio_ms=" in turn_lines[0]
    rows = [json.loads(l) for l in (tmp_path / "turns.jsonl").read_text().splitlines()]
    # Every turn is a row: the answer, then the clear and exit replies as spoken.
    assert [r["intent"] for r in rows] == ["question", "clear", "exit"]
    assert rows[0]["answer"] == REPLY and rows[0]["image"] is True and rows[0]["scene"] == "new"
    assert rows[1]["answer"] == "Okay, I've forgotten our conversation."
    # A clear starts a new conversation.
    assert rows[0]["conversation"] != rows[2]["conversation"]
    said = heard(whisper_tiny, fake)
    for words in ("apple", "forgotten", "bye"):   # piper varies: "goodbye" or "bye bye"
        assert words in said, said


@pytest.mark.parametrize("version", ["1.2.1", "1.3.0"])
def test_daemon_on_the_npu_backends(tmp_path, scene, spoken, tmp_path_factory, version):
    from rkllm_fake import build_fake_rkllm, write_fake_model
    sys.path.insert(0, str(FAKES))
    try:
        from rknnlite.api import write_model
    finally:
        sys.path.remove(str(FAKES))
    lib = build_fake_rkllm(version, tmp_path_factory.mktemp("rkllm"))
    write_fake_model(tmp_path / "qwen2-vl.rkllm", embed_dim=1536)
    write_model(tmp_path / "vision.rknn", (392, 392), [[1, 196, 1536]])
    fake = make_fake_alsa(tmp_path, capture_rate=MIC_RATE, playback_rate=22050)
    fake.write_capture(speech_at(spoken, "What do you see on the table?", "Exit."))
    proc, sock = start_daemon(tmp_path, fake, BASE_CONFIG + f"""
llm: {{backend: rkllm, rkllm: {{library: "{lib}", runtime_version: auto, model: qwen2-vl.rkllm}}}}
vision: {{encoder: rknn, rknn: {{model: vision.rknn, core_mask: 0_1}}}}
""", extra_path=FAKES)
    out, err = run_to_exit(proc, sock)
    assert proc.returncode == 0, err[-3000:]
    assert "READY=1" in sock.messages
    assert f"RKLLM runtime {version}" in err or version in err
    rows = [json.loads(l) for l in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert [r["intent"] for r in rows] == ["question", "exit"] and rows[0]["image"] is True
    # The fake runtime echoes what it was sent: the question and the image's 196 tokens.
    assert "image tokens: 196" in rows[0]["answer"]
    assert "table" in rows[0]["answer"].lower()


def test_greeting_then_sigterm_stops_cleanly(tmp_path, scene, whisper_tiny):
    fake = make_fake_alsa(tmp_path, capture_rate=MIC_RATE, playback_rate=22050)
    fake.write_capture(np.zeros(MIC_RATE * 2, np.int16))
    write_text_model(tmp_path / "tiny.gguf", scripted_reply=REPLY)
    cfg = BASE_CONFIG.replace('greeting: ""', 'greeting: "Hello, I am listening."')
    proc, sock = start_daemon(tmp_path, fake, cfg +
                              "llm: {llamacpp: {model: tiny.gguf}}\nvision: {encoder: none}\n")
    sock.wait_for("STATUS=listening", proc)   # sent once the greeting has been spoken
    proc.send_signal(signal.SIGTERM)
    out, err = run_to_exit(proc, sock, timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "STOPPING=1" in sock.messages
    assert "SIGTERM: stopping" in err and "Traceback" not in err
    assert "listening" in heard(whisper_tiny, fake)


def test_a_missing_microphone_is_retried_not_fatal(tmp_path, scene):
    fake = make_fake_alsa(tmp_path, capture_rate=MIC_RATE, playback_rate=22050)
    write_text_model(tmp_path / "tiny.gguf", scripted_reply=REPLY)
    cfg = BASE_CONFIG.replace("device: fakemic", "device: usb-mic-that-is-not-plugged-in")
    proc, sock = start_daemon(tmp_path, fake, cfg +
                              "llm: {llamacpp: {model: tiny.gguf}}\nvision: {encoder: none}\n")
    sock.wait_for("READY=1", proc)
    sock.wait_for("STATUS=microphone unavailable", proc, timeout=30)
    assert proc.poll() is None          # still serving, waiting for the device
    proc.send_signal(signal.SIGTERM)
    out, err = run_to_exit(proc, sock, timeout=60)
    assert proc.returncode == 0
    lines = [l for l in err.splitlines() if "usb-mic-that-is-not-plugged-in" in l]
    assert lines and "retrying" in lines[0]
    assert any("STATUS=microphone unavailable" in m for m in sock.messages)


def test_an_unplugged_camera_does_not_stop_the_assistant(tmp_path, spoken):
    fake = make_fake_alsa(tmp_path, capture_rate=MIC_RATE, playback_rate=22050)
    fake.write_capture(speech_at(spoken, "What do you see on the table?", "Exit."))
    write_text_model(tmp_path / "tiny.gguf", scripted_reply=REPLY)
    write_mmproj(tmp_path / "tiny-mmproj.gguf")
    cfg = BASE_CONFIG.replace("camera: {source: scene.jpg}", "camera: {source: /dev/video97}")
    proc, sock = start_daemon(tmp_path, fake, cfg +
                              "llm: {llamacpp: {model: tiny.gguf, mmproj: tiny-mmproj.gguf}}\n")
    out, err = run_to_exit(proc, sock)
    assert proc.returncode == 0, err[-3000:]
    assert "answering without the picture until it is back" in err
    rows = [json.loads(l) for l in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert rows[0]["answer"] == REPLY and rows[0]["image"] is False
    turn = [l for l in err.splitlines() if "assistant.turn: turn 1" in l][0]
    assert "answered without the image" in turn and "/dev/video97" in turn


def test_the_transcript_survives_kill_9_between_turns(tmp_path, scene, spoken):
    fake = make_fake_alsa(tmp_path, capture_rate=MIC_RATE, playback_rate=22050)
    fake.write_capture(speech_at(spoken, "What do you see on the table?", "What color is the cup?"))
    write_text_model(tmp_path / "tiny.gguf", scripted_reply=REPLY)
    write_mmproj(tmp_path / "tiny-mmproj.gguf")
    # exit_action idle: the daemon keeps listening after the questions, as on a board.
    cfg = BASE_CONFIG.replace("exit_action: stop", "exit_action: idle")
    proc, sock = start_daemon(tmp_path, fake, cfg +
                              "llm: {llamacpp: {model: tiny.gguf, mmproj: tiny-mmproj.gguf}}\n")
    path = tmp_path / "turns.jsonl"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and path.read_text().count("\n") >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGKILL)       # no clean-up of any kind
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.drain()
    # Every answered turn is there, each a whole JSON line.
    lines = path.read_text().splitlines()
    rows = [json.loads(l) for l in lines]
    assert [r["intent"] for r in rows] == ["question", "question"]
    assert all(r["answer"] == REPLY for r in rows)
    assert rows[0]["scene"] == "new" and rows[1]["scene"] == "same"
