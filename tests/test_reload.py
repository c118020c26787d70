"""SIGHUP for `run` and `serve` (assistant/reload.py): what can change is applied, the rest
is named and waits for a restart, a config that does not load keeps the running one.

The process tests start real `run` (fake ALSA microphone and speaker) and `serve`
processes with the tiny llama.cpp models, and talk to them over HTTP before and after each
SIGHUP: the same requests keep working, and the reloaded image limit is the one applied.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from alsa_support import make_fake_alsa, portaudio_available
from assistant.audio.resample import resample
from assistant.config import parse
from assistant.demo import draw_scene
from assistant.reload import RELOADABLE, changed_keys, plan_reload
from test_daemon import NotifySocket
from test_http_support import free_port, wait_for_port
from tiny_models import write_mmproj, write_text_model

REPLY = "I see a red apple on the wooden table."
MIC_RATE = 48000


# --------------------------------------------------------------------------- the plan

def test_each_changed_key_is_applied_or_waits_for_a_restart():
    running = parse("persona: {name: Rocky}\nhttp: {max_queue: 8, api_key: one}\n"
                    "logging: {level: INFO}\nllm: {max_new_tokens: 100}", "c.yaml")
    new = parse("persona: {name: Marvin}\nhttp: {max_queue: 2, api_key: two}\n"
                "logging: {level: DEBUG, debug_recording: /tmp/rec}\n"
                "llm: {max_new_tokens: 50}\ndeadlines: {llm_s: 9}", "c.yaml")
    assert changed_keys(running, new) == [
        "persona.name", "llm.max_new_tokens", "logging.level", "logging.debug_recording",
        "http.api_key", "http.max_queue", "deadlines.llm_s"]
    applied, restart = plan_reload(running, new)
    assert restart == ["llm", "logging", "http"]
    assert applied.persona.name == "Marvin" and applied.http.max_queue == 2
    assert applied.logging.level == "DEBUG" and applied.deadlines.llm_s == 9
    # Read once at start: the running values stay.
    assert applied.http.api_key == "one" and applied.llm.max_new_tokens == 100
    assert applied.logging.debug_recording is None
    assert applied.source == "c.yaml"
    assert plan_reload(running, running) == (running, [])


def test_a_section_not_named_reloadable_waits_for_a_restart():
    # A section added later (its objects built at start) is safe by default: only the keys
    # in RELOADABLE are applied to a running process.
    running = parse("", "c.yaml")
    for key in ("vad.end_silence_ms", "asr.beam_size", "transcript.keep", "tts.length_scale"):
        assert not any(key.startswith(r) for r in RELOADABLE)
    new = parse("vad: {end_silence_ms: 900}\ntts: {length_scale: 1.2}", "c.yaml")
    applied, restart = plan_reload(running, new)
    assert restart == ["vad", "tts"] and applied == running


# --------------------------------------------------------------------------- the processes

def _config(port: int, name: str = "Rocky", key: str = "k1") -> str:
    return f"""
audio:
  input: {{device: fakemic, sample_rate: {MIC_RATE}}}
  output: {{device: fakespeaker, sample_rate: 22050}}
persona:
  name: {name}
  system_prompt: "You are {{name}}, a voice assistant."
  en: {{greeting: ""}}
camera: {{source: scene.jpg}}
transcript: {{path: turns.jsonl}}
llm: {{llamacpp: {{model: tiny.gguf, mmproj: tiny-mmproj.gguf}}}}
http: {{listen: "127.0.0.1:{port}", api_key: {key}}}
"""


class Process:
    """`rkvlm-assistant COMMAND` in a folder; stderr in a file, read at any time."""

    def __init__(self, tmp_path: Path, command: str, env: dict):
        self.err_path = tmp_path / "stderr.log"
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "assistant", "--config", "config.yaml", command],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=self._err, text=True)

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait_log(self, needle: str, count: int = 1, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            if self.err.count(needle) >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"no {needle!r} (x{count}) in the log:\n{self.err[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._err.close()


def start_process(tmp_path: Path, command: str, capture: np.ndarray | None = None):
    """`command` in tmp_path on the tiny models, a camera image, a fake microphone (playing
    ``capture``, else silence) and speaker, and a notify socket: (process, socket, HTTP
    port, the camera image as PNG bytes, 640x480)."""
    draw_scene(tmp_path / "scene.jpg")
    write_text_model(tmp_path / "tiny.gguf", scripted_reply=REPLY)
    write_mmproj(tmp_path / "tiny-mmproj.gguf")
    fake = make_fake_alsa(tmp_path, capture_rate=MIC_RATE, playback_rate=22050)
    if capture is not None:
        fake.write_capture(capture)
    port = free_port()
    (tmp_path / "config.yaml").write_text(_config(port))
    sock = NotifySocket(tmp_path / "notify.sock")
    env = fake.env()
    env["NOTIFY_SOCKET"] = sock.path
    _, png = cv2.imencode(".png", cv2.imread(str(tmp_path / "scene.jpg")))
    return Process(tmp_path, command, env), sock, port, png.tobytes()


def chat(url: str, key: str, image: bytes | None = None) -> tuple[int, dict]:
    content: list = [{"type": "text", "text": "What do you see?"}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(image).decode()}})
    body = {"model": "rkvlm", "messages": [{"role": "user", "content": content}]}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("command", ["serve", "run"])
def test_sighup_reloads_and_a_broken_config_keeps_the_running_one(tmp_path, spoken, command):
    if command == "run" and not portaudio_available():
        pytest.skip("needs libportaudio2")
    p, sock, port, png = start_process(tmp_path, command, np.concatenate([
        np.zeros(int(0.4 * MIC_RATE), np.int16),
        resample(spoken.pcm("What do you see on the table?"), 16000, MIC_RATE),
        np.zeros(int(1.5 * MIC_RATE), np.int16)]))
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.yaml"
    try:
        # A SIGHUP while the models load (its default action would end the process).
        sock.wait_for("STATUS=loading models", p.proc)
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log("SIGHUP while starting")
        wait_for_port(port, p.proc)
        status, r = chat(url, "k1")
        assert status == 200 and r["choices"][0]["message"]["content"] == REPLY
        if command == "run":       # the voice loop answered the microphone's question
            p.wait_log("intent=question")

        config.write_text(_reload_config(port))
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log("SIGHUP: configuration reloaded")
        assert p.proc.poll() is None
        status, r = chat(url, "k1")                      # the running key still holds
        assert status == 200 and r["choices"][0]["message"]["content"] == REPLY
        status, r = chat(url, "k1", png)                 # the new limit is the one applied
        assert status == 400 and "http.max_image_pixels" in r["error"]["message"], r

        # Broken files: one error line each, the running configuration kept.
        config.write_text("persona: " + "[" * 10_000 + "]" * 10_000 + "\n")
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log("keeping the running configuration")
        config.write_text(_reload_config(port).replace("max_image_pixels: 1024",
                                                       "max_image_pixels: .nan"))
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log("keeping the running configuration", count=2)
        status, r = chat(url, "k1")
        assert status == 200 and r["choices"][0]["message"]["content"] == REPLY
        status, r = chat(url, "k1", png)
        assert status == 400 and "http.max_image_pixels" in r["error"]["message"], r
    finally:
        code = p.stop()
        sock.drain()
    err = p.err
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "never retrieved" not in err, err[-3000:]
    assert "new system prompt in use" in err
    restart = [l for l in err.splitlines() if "SIGHUP:" in l and "a restart" in l]
    assert len(restart) == 1, restart
    assert "llm, http changed (llm.max_new_tokens, http.api_key)" in restart[0]
    errors = [l for l in err.splitlines() if "ERROR" in l and "SIGHUP" in l]
    assert len(errors) == 2, errors
    assert "nested more than" in errors[0] and "http.max_image_pixels" in errors[1]
    assert ".nan" in errors[1]


def _reload_config(port: int) -> str:
    """A new persona and image limit (applied); a new key and answer length (they wait)."""
    return _config(port, name="Marvin", key="k2").replace(
        "api_key: k2}", "api_key: k2, max_image_pixels: 1024}").replace(
        "mmproj: tiny-mmproj.gguf}}", "mmproj: tiny-mmproj.gguf}, max_new_tokens: 50}")
