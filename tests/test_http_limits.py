"""Nothing a client sends is unbounded: request size, speech work, and connections.

- A chat request past ``http.max_history`` / ``max_chars`` / ``max_question_chars`` is a 400
  before the model tokenises anything.
- Speech and transcription run on their own workers (``http.audio_workers``): a flood of
  them is queued and refused with 503 + Retry-After while chat turns go on, and a job past
  ``http.audio_deadline_s`` is a 503 too.
- A connection that sends no request, or its headers a byte at a time, is closed within
  ``http.header_timeout_s``; an idle keep-alive one within ``http.idle_timeout_s``; a body
  that does not arrive within ``http.body_timeout_s`` is a 408 (raw sockets on 127.0.0.1).

The models are scripted doubles; the synthesizer is one that waits for the test to let it
go, because the point is what happens while speech work is still running.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from scripted_llm import ScriptedLLM
from test_http_support import EchoLLM, in_process, raw_http

openai = pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")


# ---------------------------------------------------------------------------- request size

class CountingLLM(EchoLLM):
    """Counts every call that tokenises."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.tokenised = 0

    def count_tokens(self, text: str) -> int:
        self.tokenised += 1
        return super().count_tokens(text)


def pairs(n: int, size: int = 5) -> list[dict]:
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"q{i}".ljust(size, ".")},
                {"role": "assistant", "content": f"a{i}".ljust(size, ".")}]
    return out


@pytest.mark.parametrize("messages, key", [
    (pairs(4) + [{"role": "user", "content": "why?"}], "http.max_history"),
    ([{"role": "user", "content": "x" * 51}], "http.max_question_chars"),
    (pairs(2, 60) + [{"role": "user", "content": "why?"}], "http.max_chars"),
    ([{"role": "system", "content": "s" * 300}, {"role": "user", "content": "why?"}],
     "http.max_chars"),
], ids=["exchanges", "question", "characters", "a system message counts"])
def test_a_request_past_a_size_limit_is_refused_before_tokenising(messages, key):
    llm = CountingLLM(words=2)
    s = in_process(llm, http={"max_history": 3, "max_chars": 200, "max_question_chars": 50})
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="rkvlm", messages=messages)
        err = e.value.body
        assert err["code"] == "request_too_large" and err["param"] == "messages", err
        assert key in err["message"], err
        assert llm.tokenised == 0 and not llm.calls and not llm.histories
        # At the limits exactly, the request is answered.
        ok = pairs(3, 20) + [{"role": "user", "content": "y" * 50}]     # 170 characters
        r = client.chat.completions.create(model="rkvlm", messages=ok)
        assert r.choices[0].message.content.startswith("reply to")
    finally:
        s.close()


# ---------------------------------------------------------------------------- speech work

class HeldSynth:
    """A piper double that speaks each sentence only when the test lets it (or after
    ``hold_s``), and counts the sentences it spoke."""

    name = "held"
    sample_rate = 16000

    def __init__(self, hold_s: float = 30.0):
        self.go = threading.Event()
        self.hold_s = hold_s
        self.running = 0
        self.most = 0
        self.spoken = 0
        self._lock = threading.Lock()

    def synthesize(self, text: str, pause_after: bool = False) -> np.ndarray:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.go.wait(self.hold_s)
            self.spoken += 1
            return np.zeros(1600, np.int16)
        finally:
            with self._lock:
                self.running -= 1


def voices(synth) -> SimpleNamespace:
    return SimpleNamespace(default=synth, zh=None, for_language=lambda lang: synth)


async def _speech(url: str, text: str = "Hello there.") -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/audio/speech", json={"input": text, "voice": "alloy"}) as r:
            return r.status, dict(r.headers), await r.read()


async def _chat(url: str, tag: str) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                timeout=30)
    r = await client.chat.completions.create(
        model="rkvlm", messages=[{"role": "user", "content": f"{tag}: hi"}])
    return r.choices[0].message.content


def test_speech_work_is_queued_refused_when_full_and_chat_goes_on():
    synth = HeldSynth()
    s = in_process(EchoLLM(words=2), http={"audio_workers": 1, "audio_queue": 1},
                   parts=SimpleNamespace(asr=None, voices=voices(synth)))
    try:
        async def go():
            first = asyncio.create_task(_speech(s.url))
            while synth.running == 0:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(_speech(s.url))
            while s.ctx.media.waiting == 0:
                await asyncio.sleep(0.01)
            third = await _speech(s.url)             # the line is full: refused at once
            chat = await _chat(s.url, "meanwhile")   # chat turns are not behind speech
            synth.go.set()
            return await first, await second, third, chat
        first, second, third, chat = asyncio.run(go())
        assert first[0] == 200 and first[2][:4] == b"RIFF"
        assert second[0] == 200
        assert third[0] == 503 and int(third[1]["Retry-After"]) >= 1
        assert json.loads(third[2])["error"]["code"] == "busy"
        assert chat.startswith("reply to meanwhile")
        assert synth.most == 1                        # one worker: never two at once
    finally:
        synth.go.set()
        s.close()


def test_speech_past_its_deadline_is_a_503_and_the_worker_stays_counted():
    synth = HeldSynth()
    s = in_process(EchoLLM(words=2), http={"audio_workers": 1, "audio_deadline_s": 1.0},
                   parts=SimpleNamespace(asr=None, voices=voices(synth)))
    try:
        t0 = time.monotonic()
        status, _, body = asyncio.run(_speech(s.url))
        err = json.loads(body)["error"]
        assert status == 503 and err["code"] == "deadline_exceeded", err
        assert "http.audio_deadline_s" in err["message"]
        assert time.monotonic() - t0 < 20                 # given up, not waited for
        # Its thread still runs: the worker is counted busy until it returns.
        assert synth.running == 1 and s.ctx.media.busy == 1
        synth.go.set()
        end = time.monotonic() + 10
        while s.ctx.media.busy and time.monotonic() < end:
            time.sleep(0.02)
        assert s.ctx.media.busy == 0
        assert asyncio.run(_speech(s.url))[0] == 200
    finally:
        synth.go.set()
        s.close()


def test_a_long_text_nobody_waits_for_stops_at_the_next_sentence():
    synth = HeldSynth(hold_s=0.3)
    s = in_process(EchoLLM(words=2), http={"audio_workers": 1, "audio_deadline_s": 1.0},
                   parts=SimpleNamespace(asr=None, voices=voices(synth)))
    try:
        text = " ".join(f"Sentence number {i} is here." for i in range(20))   # 6 s of work
        status = asyncio.run(_speech(s.url, text))[0]
        assert status == 503
        # Given up after 1 s (3 or 4 sentences): without the stop, 10 would be spoken by
        # 3 s and all 20 by 6 s.
        time.sleep(2.0)
        assert synth.spoken <= 5 and synth.running == 0, synth.spoken
    finally:
        s.close()


# ---------------------------------------------------------------------------- connections

@pytest.fixture(scope="module")
def timed():
    s = in_process(EchoLLM(words=8, piece_delay=0.15),
                   http={"header_timeout_s": 0.5, "idle_timeout_s": 0.5, "body_timeout_s": 0.5})
    yield s
    s.close()


def closed_within(sock: socket.socket, limit: float, feed: bytes = b"",
                  every: float = 0.1) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (sending ``feed`` a byte every ``every``
    seconds meanwhile) and what it sent; AssertionError past ``limit``."""
    sock.settimeout(every)
    t0 = time.monotonic()
    got = b""
    i = 0
    while time.monotonic() - t0 < limit:
        if i < len(feed):
            try:
                sock.sendall(feed[i:i + 1])
            except OSError:
                return time.monotonic() - t0, got
            i += 1
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            return time.monotonic() - t0, got
        if not chunk:
            return time.monotonic() - t0, got
        got += chunk
    raise AssertionError(f"still open after {limit} s")


def test_connections_that_send_no_request_are_closed(timed):
    port = timed.port
    # Silent ones, and ones that send their headers a byte at a time, many at once.
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    slow = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    try:
        took, got = closed_within(socks[0], 5.0, feed=slow)
        assert 0.4 <= took < 5.0 and got.startswith(b"HTTP/1.1 408"), (took, got)
        for sock in socks[1:20]:
            closed_within(sock, 5.0)
        for sock in socks[20:]:
            closed_within(sock, 5.0, feed=slow)
    finally:
        for sock in socks:
            sock.close()
    assert timed.ctx.arrivals.closed >= 40
    assert len(timed.ctx.arrivals) == 0


def test_an_idle_keep_alive_connection_is_closed(timed):
    with socket.create_connection(("127.0.0.1", timed.port)) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        took, _ = closed_within(sock, 5.0)              # idle
        assert took < 5.0
    with socket.create_connection(("127.0.0.1", timed.port)) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        closed_within(sock, 5.0, feed=b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX: " + b"b" * 200)


def test_a_body_that_does_not_arrive_is_a_408(timed):
    with socket.create_connection(("127.0.0.1", timed.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ")
        took, got = closed_within(sock, 5.0)
        assert got.startswith(b"HTTP/1.1 408"), got
        assert b"http.body_timeout_s" in got


def test_a_request_longer_than_the_header_deadline_is_not_cut(timed):
    # The answer takes about 1.2 s, more than twice header_timeout_s: the deadline is
    # for the headers only.
    t0 = time.monotonic()
    text = asyncio.run(_chat(timed.url, "long"))
    assert text == EchoLLM.answer_for("long", 8) and time.monotonic() - t0 > 1.0
    status, _, body = raw_http(timed.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                               b"Connection: close\r\n\r\n")
    assert status == 200 and b"rkvlm" in body


# ---------------------------------------------------------------------------- deadlines

@pytest.mark.parametrize("stream", [False, True])
def test_an_http_turn_past_its_first_piece_deadline_is_a_503(stream):
    """The HTTP turn's prefill has the voice turn's deadline (deadlines.llm_first_piece_s,
    through the conversation's stream_turn): past it the turn is aborted and the client
    gets 503 with Retry-After, not a 500 and not a wait for ever."""
    import dataclasses

    from assistant.config import Config, DeadlinesConfig

    cfg = dataclasses.replace(Config(), deadlines=DeadlinesConfig(llm_first_piece_s=0.5))
    llm = ScriptedLLM(["Too late to say."], think_s=30.0)     # a prefill that never ends
    s = in_process(llm, cfg=cfg)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0,
                               timeout=60)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            r = client.chat.completions.create(model="rkvlm", stream=stream,
                                               messages=[{"role": "user", "content": "Hi."}])
            list(r) if stream else None
        assert e.value.status_code == 503 and int(e.value.response.headers["Retry-After"]) >= 1
        assert e.value.body["code"] == "deadline_exceeded"
        assert "deadlines.llm_first_piece_s" in e.value.body["message"]
        assert time.monotonic() - t0 < 20
        # The model was aborted and is free: the next turn is answered.
        llm.think_s = 0.0
        r = client.chat.completions.create(model="rkvlm",
                                           messages=[{"role": "user", "content": "Again."}])
        assert r.choices[0].message.content == "Too late to say."
    finally:
        s.close()
