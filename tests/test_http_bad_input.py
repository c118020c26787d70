"""Hostile input on every route is a 400 in OpenAI's error shape naming the field, never a 500.

NUL characters and lone surrogates in any text field, JSON nested 10,000 deep, NaN, wrong
types, undecodable form fields, a WAV header announcing an absurd rate. Each case goes
through the official ``openai`` client where it can send it (it cannot send a lone
surrogate: it encodes the body as UTF-8 first) and as raw HTTP otherwise, against the same
`serve` process as test_http_api (the tiny llama.cpp models, whisper, piper). The process
must log no traceback (checked when it stops) and still answer afterwards.
"""

from __future__ import annotations

import io
import json
import struct
import time

import pytest

from test_http_api import AUTH, KEY, REPLY, assert_error, server  # noqa: F401 (the fixture)
from test_http_support import raw_http

openai = pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")

CHAT = "/v1/chat/completions"
SPEECH = "/v1/audio/speech"
HI = [{"role": "user", "content": "Hi."}]


def wav_header(rate: int, frames: int = 1000) -> bytes:
    """A small 16-bit mono WAV whose header announces ``rate``."""
    data = b"\x00\x00" * frames
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt "
            + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data)


# (name, how it is sent, what, expected param, expected code)
# how: "chat" / "speech" / "transcribe" through the openai client with these arguments;
#      "json" raw to (path, body as JSON text); "bytes" raw to (path, body bytes);
#      "form" raw multipart fields (name bytes, value bytes).
CASES = [
    # NUL anywhere: refused (not stripped), the field named.
    ("chat: NUL in a message", "chat", {"messages": [{"role": "user", "content": "Wh\x00at?"}]},
     "messages[0].content", "invalid_characters"),
    ("chat: NUL in a text part", "chat", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a\x00"}]}]}, "messages[0].content[0].text", "invalid_characters"),
    ("chat: NUL in the history", "chat", {"messages": [
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hel\x00lo."},
        {"role": "user", "content": "And?"}]}, "messages[1].content", "invalid_characters"),
    ("chat: NUL in a system message", "chat", {"messages": [
        {"role": "system", "content": "\x00"}, *HI]}, "messages[0].content", "invalid_characters"),
    ("chat: NUL in a name", "chat", {"messages": [{"role": "user", "content": "Hi.",
                                                  "name": "bo\x00b"}]},
     "messages[0].name", "invalid_characters"),
    ("chat: NUL in stop", "chat", {"messages": HI, "stop": ["\x00"]}, "stop[0]",
     "invalid_characters"),
    ("chat: NUL in user", "chat", {"messages": HI, "user": "u\x00"}, "user",
     "invalid_characters"),
    ("chat: NUL in the model", "chat", {"messages": HI, "model": "rkvlm\x00"}, "model",
     "invalid_characters"),
    ("speech: NUL in input", "speech", {"input": "Hello\x00 there."}, "input",
     "invalid_characters"),
    ("speech: only control characters", "speech", {"input": "\x07\x1b\x7f"}, "input",
     "invalid_value"),
    ("speech: NUL in voice", "speech", {"input": "Hi.", "voice": "al\x00loy"}, "voice",
     "invalid_characters"),
    ("speech: NUL in instructions", "speech", {"input": "Hi.", "instructions": "\x00"},
     "instructions", "invalid_characters"),
    ("transcribe: NUL in language", "transcribe", {"language": "e\x00n"}, "language",
     "invalid_characters"),
    ("transcribe: NUL in prompt", "transcribe", {"prompt": "\x00"}, "prompt",
     "invalid_characters"),
    # Lone surrogates: only raw requests can carry them.
    ("chat: surrogate in a message", "json", (CHAT, {"model": "rkvlm", "messages": [
        {"role": "user", "content": "What is \ud800 this?"}]}), "messages[0].content",
     "invalid_characters"),
    ("chat: surrogate in the history", "json", (CHAT, {"model": "rkvlm", "messages": [
        {"role": "user", "content": "\udfff"}, {"role": "assistant", "content": "Yes."},
        *HI]}), "messages[0].content", "invalid_characters"),
    ("chat: surrogate in an image URL", "json", (CHAT, {"model": "rkvlm", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,\ud800"}}]}]}),
     "messages[0].content[0].image_url.url", "invalid_characters"),
    ("chat: surrogate in a key", "json", (CHAT, {"model": "rkvlm", "messages": HI,
                                                 "\ud800": 1}), "\\ud800", "invalid_characters"),
    ("chat: surrogate in metadata", "json", (CHAT, {"model": "rkvlm", "messages": HI,
                                                    "metadata": {"a": ["\udc80"]}}),
     "metadata.a[0]", "invalid_characters"),
    ("speech: surrogate in input", "json", (SPEECH, {"input": "Hi \ud83d there."}), "input",
     "invalid_characters"),
    ("speech: surrogate in voice", "json", (SPEECH, {"input": "Hi.", "voice": "\ud800"}),
     "voice", "invalid_characters"),
    # Nesting.
    ("chat: 10,000 deep", "bytes", (CHAT, b"[" * 10000 + b"]" * 10000), None,
     "too_deeply_nested"),
    ("chat: 10,000 deep object", "bytes", (CHAT, b'{"a":' * 10000 + b"1" + b"}" * 10000), None,
     "too_deeply_nested"),
    ("chat: 100 deep in a field", "bytes",
     (CHAT, b'{"model": "rkvlm", "messages": [{"role": "user", "content": "Hi."}], "x": '
      + b"[" * 100 + b"]" * 100 + b"}"), "x" + "[0]" * 31, "too_deeply_nested"),
    ("speech: 10,000 deep", "bytes", (SPEECH, b'{"input": ' + b"[" * 10000 + b"]" * 10000
                                      + b"}"), None, "too_deeply_nested"),
    # Numbers JSON does not have, and wrong types anywhere.
    ("chat: NaN", "bytes", (CHAT, b'{"model": "rkvlm", "messages": [{"role": "user", '
                                  b'"content": "Hi."}], "temperature": NaN}'), None,
     "invalid_json"),
    ("chat: Infinity", "bytes", (CHAT, b'{"model": "rkvlm", "messages": [], "top_p": -Infinity}'),
     None, "invalid_json"),
    ("chat: 1e400 tokens", "bytes", (CHAT, b'{"model": "rkvlm", "messages": [{"role": "user", '
                                          b'"content": "Hi."}], "max_tokens": 1e400}'),
     "max_tokens", "invalid_type"),
    ("chat: 1e400 temperature", "bytes",
     (CHAT, b'{"model": "rkvlm", "messages": [{"role": "user", "content": "Hi."}], '
            b'"temperature": 1e400}'), "temperature", "invalid_value"),
    ("chat: role a list", "json", (CHAT, {"model": "rkvlm", "messages": [
        {"role": ["user"], "content": "Hi."}]}), "messages[0].role", "invalid_value"),
    ("chat: image_url a number", "json", (CHAT, {"model": "rkvlm", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]}),
     "messages[0].content[0].image_url.url", "invalid_type"),
    ("chat: part type a dict", "json", (CHAT, {"model": "rkvlm", "messages": [
        {"role": "user", "content": [{"type": {"x": 1}}]}]}), "messages[0].content[0].type",
     "unsupported_content"),
    ("chat: text part a number", "json", (CHAT, {"model": "rkvlm", "messages": [
        {"role": "user", "content": [{"type": "text", "text": 7}]}]}),
     "messages[0].content[0].text", "invalid_type"),
    ("chat: include_usage a string", "json", (CHAT, {"model": "rkvlm", "messages": HI,
                                                     "stream": True,
                                                     "stream_options": {"include_usage": "y"}}),
     "stream_options.include_usage", "invalid_type"),
    ("chat: seed a boolean", "json", (CHAT, {"model": "rkvlm", "messages": HI, "seed": True}),
     "seed", "invalid_type"),
    ("chat: stop a list of numbers", "json", (CHAT, {"model": "rkvlm", "messages": HI,
                                                     "stop": [1]}), "stop", "invalid_type"),
    ("chat: n a string", "json", (CHAT, {"model": "rkvlm", "messages": HI, "n": "2"}), "n",
     "invalid_type"),
    ("chat: body a string", "json", (CHAT, "hello"), None, "invalid_type"),
    ("chat: not UTF-8", "bytes", (CHAT, b'{"model": "rkvlm\xff"}'), None, "invalid_json"),
    ("speech: input a number", "json", (SPEECH, {"input": 5}), "input", "invalid_type"),
    ("speech: voice an object", "json", (SPEECH, {"input": "Hi.", "voice": {"id": "alloy"}}),
     "voice", "invalid_type"),
    ("speech: model a list", "json", (SPEECH, {"input": "Hi.", "model": ["tts-1"]}), "model",
     "invalid_type"),
    ("speech: speed a string", "json", (SPEECH, {"input": "Hi.", "speed": "fast"}), "speed",
     "invalid_type"),
    ("speech: speed NaN-like", "bytes", (SPEECH, b'{"input": "Hi.", "speed": 1e999}'), "speed",
     "invalid_value"),
    # Multipart fields and files.
    ("transcribe: language not UTF-8", "form", [(b"language", b"e\xffn")], "language",
     "invalid_characters"),
    ("transcribe: a part name not UTF-8", "form", [(b"lang\xffuage", b"en")], None,
     "invalid_characters"),
    ("transcribe: a long field", "form", [(b"prompt", b"p" * 5000)], "prompt", "invalid_value"),
    ("transcribe: nested multipart", "form", [(b"x\"\r\nContent-Type: multipart/mixed; "
                                              b"boundary=inner\r\nX-Y: \"z", b"--inner--")],
     "file", "invalid_multipart"),
    ("transcribe: 470001 Hz", "form", [(b"file", wav_header(470001))], "file", "invalid_audio"),
    ("transcribe: 1 Hz", "form", [(b"file", wav_header(1))], "file", "invalid_audio"),
]


def _openai(server, kind: str, args: dict):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    try:
        if kind == "chat":
            client.chat.completions.create(**{"model": "rkvlm", **args})
        elif kind == "speech":
            client.audio.speech.create(**{"model": "tts-1", "voice": "alloy", **args})
        else:
            client.audio.transcriptions.create(model="whisper-1",
                                               file=("a.wav", wav_header(16000)), **args)
    except openai.APIStatusError as e:
        headers = {k.title(): v for k, v in e.response.headers.items()}
        return e.status_code, headers, e.response.content
    raise AssertionError("the request was accepted")


def _multipart(fields: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """A multipart body as bytes (the names and values as given, whatever they hold)."""
    boundary = b"xXxBoundaryxXx"
    out = io.BytesIO()
    if not any(name == b"file" for name, _ in fields):
        fields = fields + [(b"file", wav_header(16000))]
    for name, value in fields:
        extra = b'; filename="a.wav"' if name == b"file" else b""
        out.write(b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + name
                  + b"\"" + extra + b"\r\n\r\n" + value + b"\r\n")
    out.write(b"--" + boundary + b"--\r\n")
    return out.getvalue(), b"multipart/form-data; boundary=" + boundary


def _raw(server, path: str, body: bytes, ctype: bytes = b"application/json"):
    status, headers, data = raw_http(server.port, b"POST " + path.encode() + b" HTTP/1.1\r\n"
                                     b"Host: x\r\nAuthorization: Bearer " + KEY.encode()
                                     + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                                     + body)
    return status, {k.title(): v for k, v in headers.items()}, data


@pytest.mark.parametrize("name, how, what, param, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_400_naming_the_field(server, name, how, what, param, code):
    t0 = time.monotonic()
    if how in ("chat", "speech", "transcribe"):
        answer = _openai(server, how, what)
    elif how == "json":
        path, body = what
        answer = _raw(server, path, json.dumps(body).encode())     # \\ud800 stays escaped
    elif how == "bytes":
        answer = _raw(server, *what)
    else:
        body, ctype = _multipart(what)
        answer = _raw(server, "/v1/audio/transcriptions", body, ctype)
    err = assert_error(*answer, 400, code)
    assert err["param"] == param, err
    assert time.monotonic() - t0 < 30           # refused, not worked on (2 GB for 470001 Hz)
    if "Hz" in name:
        assert "Hz" in err["message"] and "8000-192000" in err["message"], err


@pytest.mark.parametrize("path, code, param", [
    ("/v1/models/%00", "model_not_found", "model"),
    ("/v1/models/%ED%A0%80", "model_not_found", "model"),
    ("/v1/models/%FF", "model_not_found", "model"),
    ("/%00", "not_found", None),
    ("/events%00", "not_found", None)])
def test_odd_paths_are_404(server, path, code, param):
    """Bugs caught: a NUL or an undecodable byte in the path answered with a 500 or aiohttp's
    plain-text page, or echoed back raw into the JSON message."""
    status, headers, body = raw_http(server.port, b"GET " + path.encode() + b" HTTP/1.1\r\n"
                                     b"Host: x\r\nAuthorization: Bearer " + KEY.encode()
                                     + b"\r\nConnection: close\r\n\r\n")
    assert status == 404, body
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error")
    assert "\x00" not in err["message"] and all(not 0xD800 <= ord(c) <= 0xDFFF
                                                 for c in err["message"])
    if code == "model_not_found":
        assert err["message"].startswith("the model '") and "does not exist" in err["message"]
    else:
        assert err["message"].startswith("no such endpoint; see GET /v1/models")


def test_still_answering_after_all_that(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    r = client.chat.completions.create(model="rkvlm", messages=HI)
    assert r.choices[0].message.content == REPLY
    speech = client.audio.speech.create(model="tts-1", voice="alloy",
                                        input="Tabs\tand bells \x07 are skipped.")
    assert speech.content[:4] == b"RIFF" and len(speech.content) > 10000


def test_no_bad_row_reached_the_transcript(server):
    """Every row in the transcript is whole JSON without a NUL or a lone surrogate in any
    field, and the one good question asked here is there (bug caught: a transcript that is
    never written passes a check on the absent file's empty text)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    marker = "Is this the last good question?"
    r = client.chat.completions.create(model="rkvlm", messages=[{"role": "user",
                                                                  "content": marker}])
    assert r.choices[0].message.content == REPLY
    path = server.dir / "turns.jsonl"
    end = time.monotonic() + 10
    rows: list = []
    while time.monotonic() < end and not any(r.get("transcript") == marker for r in rows):
        time.sleep(0.05)
        rows = ([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
                if path.exists() else [])
    assert [r["answer"] for r in rows if r.get("transcript") == marker] == [REPLY], rows[-3:]

    def strings(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
    bad = [s for row in rows for s in strings(row)
           if "\x00" in s or any(0xD800 <= ord(c) <= 0xDFFF for c in s)]
    assert bad == []
