"""`rkvlm-assistant run` with the HTTP front-end: the voice loop on a (fake ALSA) microphone
and speaker, and the API on the same asyncio loop, sharing one model."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from alsa_support import make_fake_alsa, portaudio_available
from assistant.audio.resample import resample
from assistant.demo import draw_scene
from test_http_support import free_port, stop_process, wait_for_port
from tiny_models import write_mmproj, write_text_model

pytestmark = pytest.mark.skipif(not portaudio_available(), reason="needs libportaudio2")

REPLY = "I see a red apple on the wooden table."
MIC_RATE = 48000


def get_json(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def first_event(url: str) -> dict:
    with urllib.request.urlopen(url + "/events", timeout=30) as r:
        line = r.readline().decode()
    assert line.startswith("data: ")
    return json.loads(line[6:])


def test_run_serves_voice_and_http_together(tmp_path, spoken):
    import sys

    draw_scene(tmp_path / "scene.jpg")
    write_text_model(tmp_path / "tiny.gguf", scripted_reply=REPLY)
    write_mmproj(tmp_path / "tiny-mmproj.gguf")
    fake = make_fake_alsa(tmp_path, capture_rate=MIC_RATE, playback_rate=22050)
    speech = [np.zeros(int(0.4 * MIC_RATE), np.int16),
              resample(spoken.pcm("What do you see on the table?"), 16000, MIC_RATE),
              np.zeros(int(1.5 * MIC_RATE), np.int16)]
    fake.write_capture(np.concatenate(speech))
    port = free_port()
    (tmp_path / "config.yaml").write_text(f"""
audio:
  input: {{device: fakemic, sample_rate: {MIC_RATE}}}
  output: {{device: fakespeaker, sample_rate: 22050}}
persona: {{language: en, en: {{greeting: ""}}}}
camera: {{source: scene.jpg}}
transcript: {{path: turns.jsonl}}
llm: {{llamacpp: {{model: tiny.gguf, mmproj: tiny-mmproj.gguf}}}}
http: {{listen: "127.0.0.1:{port}"}}
""")
    env = fake.env()
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([sys.executable, "-m", "assistant", "--config", "config.yaml", "run"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        url = f"http://127.0.0.1:{port}"
        assert [m["id"] for m in get_json(url + "/v1/models")["data"]] == ["rkvlm", "rkvlm-camera"]
        r = get_json(url + "/v1/chat/completions", {
            "model": "rkvlm", "messages": [{"role": "user", "content": "Hello?"}]})
        assert r["choices"][0]["message"]["content"] == REPLY
        # The page's event stream knows both front-ends' turns.
        end = time.monotonic() + 60
        while True:
            hello = first_event(url)
            sources = [t["source"] for t in hello["turns"] if t.get("done")]
            if "voice" in sources and "http" in sources or time.monotonic() > end:
                break
            time.sleep(0.3)
        assert hello["type"] == "hello" and hello["camera"] is True
        assert {"voice", "http"} <= set(sources), hello
        voice = next(t for t in hello["turns"] if t["source"] == "voice")
        assert "table" in voice["question"].lower() and voice["answer"] == REPLY
        assert hello["state"] in ("listening", "speaking", "thinking")
        # Both turns become transcript rows (the voice one once it has been spoken).
        path = tmp_path / "turns.jsonl"
        while time.monotonic() < end:
            rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
            if {r["source"] for r in rows} == {"voice", "http"}:
                break
            time.sleep(0.2)
    finally:
        err = stop_process(proc)
    assert "HTTP API and page on" in err and "HTTP server stopped" in err
    rows = [json.loads(l) for l in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert {r["source"] for r in rows} == {"voice", "http"}
