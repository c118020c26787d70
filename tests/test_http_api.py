"""`rkvlm-assistant serve`: the OpenAI-compatible API on a real socket, with real clients.

One `serve` process per module (tiny llama.cpp models: a scripted text model that answers
exactly, and a projector; whisper tiny.en; the piper voice; a file camera), driven by the
official ``openai`` package and by raw HTTP (aiohttp) for every bad input.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import wave
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from assistant.audio.resample import resample
from assistant.demo import draw_scene
from test_http_support import free_port, start_serve, wait_for_port
from speech_fixtures import hear
from tiny_models import write_mmproj, write_text_model

openai = pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")

REPLY = "I see a red apple on the wooden table."
KEY = "test-key-123"


class NotifySocket:
    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    write_text_model(d / "tiny.gguf", scripted_reply=REPLY)
    write_mmproj(d / "tiny-mmproj.gguf")
    draw_scene(d / "scene.jpg")
    port = free_port()
    (d / "config.yaml").write_text(f"""
llm: {{llamacpp: {{model: tiny.gguf, mmproj: tiny-mmproj.gguf}}}}
persona: {{language: en}}
camera: {{source: scene.jpg}}
transcript: {{path: turns.jsonl}}
http: {{listen: "127.0.0.1:{port}", api_key: {KEY}, max_body_mb: 2}}
""")
    sock = NotifySocket(d / "notify.sock")
    proc = start_serve(d, {"NOTIFY_SOCKET": sock.path})
    try:
        wait_for_port(port, proc)
        end = time.monotonic() + 30
        msgs: list[str] = []
        while "READY=1" not in msgs and time.monotonic() < end:
            msgs += sock.messages()
            time.sleep(0.05)
        assert "READY=1" in msgs and "STATUS=loading models" in msgs
        yield type("Server", (), {"url": f"http://127.0.0.1:{port}", "dir": d, "proc": proc,
                                  "port": port})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        msgs += sock.messages()
        # SIGTERM: a clean exit, systemd told.
        assert proc.returncode == 0, err[-3000:]
        assert "STOPPING=1" in msgs
        assert "Traceback" not in err, err[-3000:]


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def rows(server) -> list[dict]:
    """The transcript rows (written by a thread: wait for them a little)."""
    path = server.dir / "turns.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def wait_rows(server, n: int) -> list[dict]:
    end = time.monotonic() + 10
    while len(rows(server)) < n and time.monotonic() < end:
        time.sleep(0.05)
    return rows(server)


def scene_data_url(server, kind: str = "png") -> str:
    bgr = cv2.imread(str(server.dir / "scene.jpg"))
    ok, buf = cv2.imencode("." + kind, bgr)
    assert ok
    return f"data:image/{kind};base64," + base64.b64encode(buf.tobytes()).decode()


# ---------------------------------------------------------------------------- openai client

def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["rkvlm", "rkvlm-camera"]
    assert client.models.retrieve("rkvlm").owned_by == "rkvlm-assistant"


def test_chat_not_streamed(client, server):
    n = len(rows(server))
    r = client.chat.completions.create(
        model="rkvlm", messages=[{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What is on the table?"}])
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == REPLY
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 9 and r.usage.prompt_tokens > 9
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    row = wait_rows(server, n + 1)[-1]
    assert row["source"] == "http" and row["intent"] == "question"
    assert row["transcript"] == "What is on the table?" and row["answer"] == REPLY


def test_chat_streamed_with_usage(client):
    stream = client.chat.completions.create(
        model="rkvlm", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is on the table?"}])
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 9  # streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_chat_with_an_image(client, server, stream, kind):
    n = len(rows(server))
    messages = [
        # An earlier image is dropped (its text stays in the history).
        {"role": "user", "content": [{"type": "text", "text": "Hello."},
                                     {"type": "image_url", "image_url": {"url": scene_data_url(server)}}]},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [
            {"type": "text", "text": "What do you see?"},
            {"type": "image_url", "image_url": {"url": scene_data_url(server, kind)}}]},
    ]
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="rkvlm", messages=messages, stream=True) if c.choices)
    else:
        text = client.chat.completions.create(model="rkvlm", messages=messages).choices[0].message.content
    assert text == REPLY
    row = wait_rows(server, n + 1)[-1]
    assert row["image"] is True and row["counts"]["image_tokens"] == 16
    assert row["transcript"] == "What do you see?"


def test_camera_model_attaches_the_snapshot(client, server):
    n = len(rows(server))
    r = client.chat.completions.create(model="rkvlm-camera",
                                       messages=[{"role": "user", "content": "What do you see?"}])
    assert r.choices[0].message.content == REPLY
    row = wait_rows(server, n + 1)[-1]
    assert row["image"] is True and row["scene"] == "new" and row["counts"]["image_tokens"] == 16
    # The snapshot is what the page shows.
    import urllib.request
    req = urllib.request.Request(server.url + "/camera.jpg", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["Content-Type"] == "image/jpeg"
        img = cv2.imdecode(np.frombuffer(resp.read(), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[2] == 3


def test_plain_model_does_not_use_the_camera(client, server):
    n = len(rows(server))
    client.chat.completions.create(model="rkvlm", messages=[{"role": "user", "content": "Hi there."}])
    assert wait_rows(server, n + 1)[-1]["image"] is False


def test_max_tokens_and_stop(client, server):
    r = client.chat.completions.create(model="rkvlm", max_tokens=3,
                                       messages=[{"role": "user", "content": "Tell me."}])
    assert r.choices[0].message.content == "I see a" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    r = client.chat.completions.create(model="rkvlm", max_completion_tokens=2,
                                       messages=[{"role": "user", "content": "Tell me."}])
    assert r.choices[0].message.content == "I see"
    # A stop string cuts the text (the turn is aborted); streamed, nothing past it leaks.
    r = client.chat.completions.create(model="rkvlm", stop=["apple"],
                                       messages=[{"role": "user", "content": "Tell me."}])
    assert r.choices[0].message.content == "I see a red" and r.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="rkvlm", stop=["wood", "zzz"], stream=True,
        messages=[{"role": "user", "content": "Tell me."}]) if c.choices)
    assert text == "I see a red apple on the "     # streamed: cut exactly at the stop string
    end = time.monotonic() + 10
    while True:
        cut = [r for r in rows(server) if r.get("note") == "cut at a stop string"]
        if len(cut) >= 2 or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert len(cut) == 2 and not any(r["interrupted"] for r in cut)
    # The conversation continues from the cut answer (the cache is rebuilt, not trusted).
    r = client.chat.completions.create(model="rkvlm", temperature=0.0, top_p=1.0, seed=7, messages=[
        {"role": "user", "content": "Tell me."}, {"role": "assistant", "content": "I see a red"},
        {"role": "user", "content": "And then?"}])
    assert r.choices[0].message.content == REPLY


def test_a_conversation_that_extends_the_cache(client, server):
    history = [{"role": "user", "content": "First question?"}]
    r1 = client.chat.completions.create(model="rkvlm", messages=history)
    history += [{"role": "assistant", "content": r1.choices[0].message.content},
                {"role": "user", "content": "Second question?"}]
    r2 = client.chat.completions.create(model="rkvlm", messages=history)
    assert r2.choices[0].message.content == REPLY
    # The second request extended what the model held: its prompt was not fed back.
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens


def test_transcription_of_a_spoken_question(client, spoken):
    with open(spoken("What do you see on the table?"), "rb") as f:
        r = client.audio.transcriptions.create(model="whisper-1", file=f, language="en")
    assert r.text.lower().rstrip("?.") == "what do you see on the table"


def test_transcription_of_other_formats(client, spoken, tmp_path):
    av = pytest.importorskip("av")
    pcm = spoken.pcm("Where are my keys?")
    path = tmp_path / "q.flac"
    with av.open(str(path), "w") as out:
        st = out.add_stream("flac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.rate = 16000
        for p in st.encode(frame):
            out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    with open(path, "rb") as f:
        r = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="text")
    assert "keys" in r.lower()
    # A 48 kHz stereo WAV goes through the project's reader and resampler.
    stereo = np.repeat(resample(pcm, 16000, 48000)[:, None], 2, axis=1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(stereo.astype("<i2").tobytes())
    r = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", buf.getvalue()),
                                           response_format="verbose_json")
    assert "keys" in r.text.lower() and r.language == "en"


def test_speech_comes_back_as_words(client, whisper_tiny):
    audio = client.audio.speech.create(model="tts-1", voice="alloy", response_format="wav",
                                       input="The red apple is on the wooden table.")
    data = audio.content
    with wave.open(io.BytesIO(data), "rb") as w:
        rate, pcm = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16)
    assert rate == 22050 and len(pcm) > rate   # more than a second of speech
    heard = hear(whisper_tiny, resample(pcm, rate, 16000))
    assert "apple" in heard and "table" in heard
    # The configured voice by its name works too.
    audio = client.audio.speech.create(model="tts-1", voice="en_US-joe-medium", input="Yes.")
    assert audio.content[:4] == b"RIFF"


# ---------------------------------------------------------------------------- raw HTTP

def png_header(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\x00" * 10000)
    chunk += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def b64url(kind: str, data: bytes) -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def chat(messages=None, **kw) -> dict:
    return {"model": "rkvlm", "messages": messages or [{"role": "user", "content": "Hi."}], **kw}


def image_message(url: str) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
BAD_JSON_CASES = [
    # (name, path, json body or raw bytes, status, code)
    ("malformed json", CHAT, b'{"model": "rkvlm", "messages": [', 400, "invalid_json"),
    ("not an object", CHAT, [1, 2], 400, "invalid_type"),
    ("no messages", CHAT, {"model": "rkvlm"}, 400, "missing_required_parameter"),
    ("messages not a list", CHAT, {"model": "rkvlm", "messages": "hi"}, 400, "invalid_type"),
    ("empty messages", CHAT, {"model": "rkvlm", "messages": []}, 400, "invalid_type"),
    ("no model", CHAT, {"messages": [{"role": "user", "content": "Hi."}]}, 400, "missing_required_parameter"),
    ("model not a string", CHAT, chat(model=5), 400, "invalid_type"),
    ("unknown model", CHAT, chat(model="gpt-4o"), 404, "model_not_found"),
    ("temperature a string", CHAT, chat(temperature="hot"), 400, "invalid_type"),
    ("temperature too high", CHAT, chat(temperature=5), 400, "invalid_value"),
    ("top_p too high", CHAT, chat(top_p=1.5), 400, "invalid_value"),
    ("max_tokens zero", CHAT, chat(max_tokens=0), 400, "invalid_value"),
    ("max_tokens a float", CHAT, chat(max_tokens=2.5), 400, "invalid_type"),
    ("seed a string", CHAT, chat(seed="x"), 400, "invalid_type"),
    ("stream a string", CHAT, chat(stream="yes"), 400, "invalid_type"),
    ("stop a number", CHAT, chat(stop=5), 400, "invalid_type"),
    ("too many stops", CHAT, chat(stop=list("abcde")), 400, "invalid_value"),
    ("n two", CHAT, chat(n=2), 400, "invalid_value"),
    ("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "unsupported_parameter"),
    ("last is assistant", CHAT, chat([{"role": "user", "content": "Hi."},
                                      {"role": "assistant", "content": "Hello."}]), 400, "invalid_value"),
    ("tool role", CHAT, chat([{"role": "tool", "content": "42"}]), 400, "invalid_value"),
    ("message not an object", CHAT, chat(["hi"]), 400, "invalid_type"),
    ("content a number", CHAT, chat([{"role": "user", "content": 42}]), 400, "invalid_type"),
    ("audio part", CHAT, chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     400, "unsupported_content"),
    ("http image", CHAT, chat(image_message("https://example.com/cat.jpg")), 400,
     "image_url_not_supported"),
    ("gif image", CHAT, chat(image_message(b64url("image/gif", b"GIF89a..."))), 400,
     "invalid_image_format"),
    ("bad base64", CHAT, chat(image_message("data:image/png;base64,@@@not base64@@@")), 400,
     "invalid_image_url"),
    ("not an image", CHAT, chat(image_message(b64url("image/png", b"hello, not a png"))), 400,
     "invalid_image"),
    ("decompression bomb", CHAT, chat(image_message(b64url("image/png", png_header(50000, 50000)))),
     400, "image_too_large"),
    ("corrupt png", CHAT, chat(image_message(b64url("image/png", png_header(64, 64)[:60]))), 400,
     "invalid_image"),
    ("two images", CHAT, chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": b64url("image/png", png_header(8, 8))}},
        {"type": "image_url", "image_url": {"url": b64url("image/png", png_header(8, 8))}}]}]),
     400, "too_many_images"),
    ("speech without input", "/v1/audio/speech", {"model": "tts-1", "voice": "alloy"}, 400,
     "missing_required_parameter"),
    ("speech as mp3", "/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": "Hi.",
                                           "response_format": "mp3"}, 400, "invalid_value"),
    ("unknown voice", "/v1/audio/speech", {"model": "tts-1", "voice": "darth", "input": "Hi."},
     400, "invalid_value"),
    ("speech speed", "/v1/audio/speech", {"input": "Hi.", "voice": "alloy", "speed": 2}, 400,
     "invalid_value"),
]


async def _raw(server, method, path, *, body=None, headers=None, data=None):
    async with aiohttp.ClientSession() as s:
        kw = {"headers": {**AUTH, **(headers or {})}}
        if data is not None:
            kw["data"] = data
        elif isinstance(body, bytes):
            kw["data"] = body
            kw["headers"]["Content-Type"] = "application/json"
        elif body is not None:
            kw["json"] = body
        async with s.request(method, server.url + path, **kw) as r:
            raw = await r.read()
            return r.status, dict(r.headers), raw


def assert_error(status, headers, raw, want_status, want_code=None):
    assert status == want_status, raw[:500]
    assert headers["Content-Type"].startswith("application/json")
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and isinstance(err["message"], str)
    if want_code is not None:
        assert err["code"] == want_code, err
    return err


@pytest.mark.parametrize("name, path, body, status, code", BAD_JSON_CASES,
                         ids=[c[0] for c in BAD_JSON_CASES])
def test_bad_requests_get_an_error_object(server, name, path, body, status, code):
    st, headers, raw = asyncio.run(_raw(server, "POST", path, body=body))
    err = assert_error(st, headers, raw, status, code)
    if name == "http image":
        assert "offline" in err["message"]
    if name == "speech as mp3":
        assert "wav" in err["message"]
    if name == "unknown voice":
        assert "en_US-joe-medium" in err["message"]


def test_auth_limits_and_paths(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            out = {}
            for name, headers in (("none", {}), ("wrong", {"Authorization": "Bearer nope"}),
                                  ("basic", {"Authorization": f"Basic {KEY}"})):
                async with s.get(server.url + "/v1/models", headers=headers) as r:
                    out[name] = (r.status, dict(r.headers), await r.read())
            # Bigger than http.max_body_mb (2): refused from its Content-Length, unread.
            big = b'{"model": "rkvlm", "messages": [], "x": "' + b"a" * (3 << 20) + b'"}'
            async with s.post(server.url + CHAT, data=big,
                              headers={**AUTH, "Content-Type": "application/json"}) as r:
                out["big"] = (r.status, dict(r.headers), await r.read())
            for path in ("/nope", "/../config.yaml", "/config.yaml", "/page/app.js",
                         "/assistant/http/server.py", "/%2e%2e/config.yaml"):
                async with s.get(server.url + path, headers=AUTH) as r:
                    out[path] = (r.status, dict(r.headers), await r.read())
            async with s.get(server.url + CHAT, headers=AUTH) as r:
                out["get chat"] = (r.status, dict(r.headers), await r.read())
            # No CORS unless configured.
            async with s.get(server.url + "/v1/models",
                             headers={**AUTH, "Origin": "http://evil.example"}) as r:
                out["cors"] = r.headers.get("Access-Control-Allow-Origin")
            async with s.options(server.url + CHAT, headers={
                    "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}) as r:
                out["preflight"] = (r.status, r.headers.get("Access-Control-Allow-Origin"))
            # The page's own files need no key (the page asks for it).
            for path in ("/", "/app.js", "/style.css"):
                async with s.get(server.url + path) as r:
                    out[path] = (r.status, r.headers.get("Content-Type"), await r.read())
            return out
    out = asyncio.run(go())
    for name in ("none", "wrong", "basic"):
        err = assert_error(*out[name], 401, "invalid_api_key")
        assert "Authorization: Bearer" in err["message"]
        assert out[name][1]["WWW-Authenticate"].startswith("Bearer")
    assert_error(*out["big"], 413, "request_too_large")
    for path in ("/nope", "/../config.yaml", "/config.yaml", "/page/app.js",
                 "/assistant/http/server.py", "/%2e%2e/config.yaml"):
        assert_error(*out[path], 404)
        assert b"llamacpp" not in out[path][2]
    assert_error(*out["get chat"], 405)
    assert out["cors"] is None and out["preflight"][1] is None
    assert out["/"][0] == 200 and out["/"][1].startswith("text/html") and b"app.js" in out["/"][2]
    assert out["/app.js"][0] == 200 and out["/style.css"][0] == 200


def test_bad_audio_uploads(server):
    async def post(form: aiohttp.FormData | bytes, ctype=None):
        headers = {"Content-Type": ctype} if ctype else None
        return await _raw(server, "POST", "/v1/audio/transcriptions", data=form, headers=headers)

    def form(file: bytes | None, **fields):
        f = aiohttp.FormData(default_to_multipart=True)
        if file is not None:
            f.add_field("file", file, filename="a.bin", content_type="application/octet-stream")
        f.add_field("model", "whisper-1")
        for k, v in fields.items():
            f.add_field(k, v)
        return f

    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(1600, np.int16).tobytes())
    cases = [
        (post(b'{"file": "x"}', "application/json"), 400, "invalid_content_type"),
        (post(form(None)), 400, "missing_required_parameter"),
        (post(form(b"garbage that is no audio at all" * 10)), 400, "invalid_audio"),
        (post(form(b"RIFF\x10\x00\x00\x00WAVEbroken")), 400, "invalid_audio"),
        (post(form(wav.getvalue(), language="xx")), 400, "invalid_value"),
        (post(form(wav.getvalue(), language="zh")), 400, "invalid_value"),   # tiny.en
        (post(form(wav.getvalue(), response_format="srt")), 400, "invalid_value"),
    ]
    for coro, status, code in cases:
        assert_error(*asyncio.run(coro), status, code)
    # Silence is no speech: an empty text, not whisper's "you".
    st, _, raw = asyncio.run(post(form(wav.getvalue())))
    assert st == 200 and json.loads(raw) == {"text": ""}


def test_still_serving_after_the_errors(client):
    r = client.chat.completions.create(model="rkvlm", messages=[{"role": "user", "content": "Still there?"}])
    assert r.choices[0].message.content == REPLY


# ---------------------------------------------------------------------------- the address

@pytest.mark.parametrize("command", ["serve", "run"])
def test_an_open_address_needs_a_key(tmp_path, command):
    (tmp_path / "config.yaml").write_text(
        "llm: {llamacpp: {model: tiny.gguf}}\nvision: {encoder: none}\n"
        "http: {listen: \"0.0.0.0:8088\"}\n")
    proc = start_serve(tmp_path, command=command)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 78, err
    lines = [l for l in err.splitlines() if l.startswith("rkvlm-assistant:")]
    assert len(lines) == 1 and "http.api_key" in lines[0] and "0.0.0.0:8088" in lines[0], err
    assert "Traceback" not in err


def test_a_bad_listen_value_is_a_config_error(tmp_path):
    (tmp_path / "config.yaml").write_text("http: {listen: \"localhost\"}\n")
    proc = start_serve(tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 78 and "http.listen" in err and "HOST:PORT" in err
