"""A client that hangs up: its turn is a transcript row marked interrupted, one log line, and
the model forgets the cut question and answer (the next request runs as on a fresh server).

Through the real tiny llama.cpp backend (random weights: every answer runs to its
``max_tokens``, about a millisecond a token, so a hang-up after the first chunk is always
mid-answer) and the server on real sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time

import pytest

from assistant.config import Config, LlamaCppConfig, LlmConfig, PersonaConfig
from assistant.frontend import HUNG_UP
from assistant.llm.llamacpp import LlamaCppBackend
from assistant.transcript import TranscriptWriter
from test_http_support import in_process
from tiny_models import write_text_model

openai = pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")

LONG = 1500          # tokens a cut answer was asked for


@pytest.fixture
def server(tmp_path):
    cfg = dataclasses.replace(
        Config(), persona=PersonaConfig(language="en"),
        llm=LlmConfig(max_context_len=2048, max_new_tokens=64, temperature=0.0,
                      repeat_penalty=1.0, llamacpp=LlamaCppConfig(n_threads=1, n_batch=64)))
    backend = LlamaCppBackend(cfg.llm, cfg.persona, write_text_model(tmp_path / "r.gguf", seed=1))
    backend.load()
    transcript = TranscriptWriter(tmp_path / "turns.jsonl")
    s = in_process(backend, cfg=cfg, transcript=transcript)
    s.rows_path = tmp_path / "turns.jsonl"
    s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
    yield s
    s.close()
    transcript.close()
    backend.close()


def rows(s, n: int) -> list[dict]:
    end = time.monotonic() + 20
    while time.monotonic() < end:
        got = [json.loads(l) for l in s.rows_path.read_text().splitlines()] \
            if s.rows_path.exists() else []
        if len(got) >= n:
            return got
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} transcript rows")


def fresh_prompt_tokens(s) -> int:
    r = s.client.chat.completions.create(
        model="rkvlm", max_tokens=4, messages=[{"role": "user", "content": "Hello there."}])
    return r.usage.prompt_tokens


async def hang_up_streamed(url: str) -> str:
    """Read the answer's first words, then close the connection."""
    async with aiohttp.ClientSession() as session:
        resp = await session.post(url + "/v1/chat/completions", json={
            "model": "rkvlm", "stream": True, "max_tokens": LONG,
            "messages": [{"role": "user", "content": "Tell me a long story."}]})
        assert resp.status == 200
        got = ""
        while not got:
            line = (await resp.content.readline()).decode()
            if line.startswith("data: {"):
                got = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        resp.close()
        return got


def hang_up_waiting(port: int) -> None:
    """Ask for a whole (not streamed) answer and give up before it comes."""
    body = json.dumps({"model": "rkvlm", "max_tokens": LONG,
                       "messages": [{"role": "user", "content": "And another one."}]}).encode()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.3)


def test_a_hang_up_is_an_interrupted_row_and_the_model_forgets_it(server, caplog):
    caplog.set_level(logging.INFO)
    p0 = fresh_prompt_tokens(server)

    first = asyncio.run(hang_up_streamed(server.url))
    cut = rows(server, 2)[1]
    assert cut["interrupted"] is True and cut["note"] == HUNG_UP, cut
    assert cut["source"] == "http" and cut["transcript"] == "Tell me a long story."
    # The part generated before the hang-up is kept in the row, and it is a part.
    assert cut["answer"].startswith(first.strip())
    assert 0 < server.llm.count_tokens(cut["answer"]) < LONG - 100
    # A fresh single-message request runs as on a fresh server: nothing of the cut turn
    # is left in the model's context.
    assert fresh_prompt_tokens(server) == p0

    hang_up_waiting(server.port)
    waited = rows(server, 4)[3]
    assert waited["interrupted"] is True and waited["note"] == HUNG_UP, waited
    assert fresh_prompt_tokens(server) == p0
    # A long answer still fits (on top of the cut turns it would not).
    r = server.client.chat.completions.create(
        model="rkvlm", max_tokens=LONG, messages=[{"role": "user", "content": "Hello there."}])
    assert r.usage.completion_tokens == LONG and r.usage.prompt_tokens == p0

    done = rows(server, 6)
    assert [r["interrupted"] for r in done] == [False, True, False, True, False, False]
    # One log line per hang-up (the turn's own), no traceback, no error.
    lines = [r for r in caplog.records if HUNG_UP in r.getMessage()]
    assert len(lines) == 2, [r.getMessage() for r in lines]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        caplog.text
