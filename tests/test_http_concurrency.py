"""One model, many front-ends: parallel HTTP streams and a voice turn share the conversation.

The server runs in-process on its own loop thread (the daemon's side); the clients are the
official ``openai`` package (async) on real sockets in the test's thread. The model is a
scripted one that names the question it answers, so crossed streams would show.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from assistant.conversation import Conversation, Request
from assistant.turn import Turn
from test_http_support import EchoLLM, in_process

openai = pytest.importorskip("openai")


def make_server(max_queue=4, max_wait_s=60.0, piece_delay=0.03):
    return in_process(EchoLLM(words=6, piece_delay=piece_delay),
                      http={"max_queue": max_queue, "max_wait_s": max_wait_s})


def close(s) -> None:
    s.close()


async def voice_turn(conv: Conversation, question: str) -> str:
    turn = Turn()
    out = []
    async for piece in conv.ask(Request(question, use_camera=False), turn):
        out.append(piece)
    conv.record(turn)
    return "".join(out)


def test_parallel_streams_a_voice_turn_first_and_the_voice_history_intact():
    s = make_server(max_queue=4)
    order: list[tuple[str, str]] = []           # (source, question) as turns start
    s.conv.subscribe(lambda ev, turn, data: order.append((turn.source, data["text"]))
                     if ev == "question" else None)
    try:
        first = s.loop.run(voice_turn(s.conv, "voiceone: what is this?"))
        assert first == EchoLLM.answer_for("voiceone:")

        client = openai.AsyncOpenAI(base_url=s.server.url + "/v1", api_key="none",
                                    max_retries=0, timeout=60)

        async def one(i: int):
            tag = f"req{i}"
            try:
                stream = await client.chat.completions.create(
                    model="rkvlm", stream=True,
                    messages=[{"role": "user", "content": f"{tag}: tell me"}])
                text = ""
                async for c in stream:
                    if c.choices:
                        text += c.choices[0].delta.content or ""
                return tag, 200, text, None
            except openai.APIStatusError as e:
                return tag, e.status_code, e.body, e.response.headers.get("Retry-After")

        async def everything():
            tasks = [asyncio.create_task(one(i)) for i in range(8)]
            # While the HTTP turns run (and others wait), the person speaks.
            while not any(src == "http" for src, _ in order):
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            started_before = len(order)
            voice = asyncio.wrap_future(s.loop.submit(voice_turn(s.conv, "voicetwo: and now?")))
            results = await asyncio.gather(*tasks)
            return results, await voice, started_before

        results, voice_answer, started_before = asyncio.run(everything())
        assert voice_answer == EchoLLM.answer_for("voicetwo:")
        answered = [r for r in results if r[1] == 200]
        refused = [r for r in results if r[1] != 200]
        # Every request is answered, or refused with 503 and Retry-After.
        assert all(r[1] == 503 and r[3] and int(r[3]) >= 1 for r in refused), refused
        assert all(r[2]["code"] == "busy" for r in refused)
        # One running and max_queue waiting are served; the rest are refused.
        assert len(answered) >= 5 and len(refused) >= 1, results
        # None receives another's tokens.
        for tag, _, text, _ in answered:
            assert text == EchoLLM.answer_for(tag), (tag, text)
        # The voice turn went ahead of every HTTP request still waiting.
        sources = [src for src, _ in order]
        voice_at = [q for _, q in order].index("voicetwo: and now?")
        assert voice_at == started_before, order
        assert "http" in sources[voice_at + 1:], "HTTP requests were still waiting"

        # The voice conversation is intact: the next voice turn gets its own history back.
        third = s.loop.run(voice_turn(s.conv, "voicethree: still you?"))
        assert third == EchoLLM.answer_for("voicethree:")
        assert [e.question for e in s.conv.exchanges] == [
            "voiceone: what is this?", "voicetwo: and now?", "voicethree: still you?"]
        assert s.llm.histories[-1] == [("voiceone: what is this?", first),
                                       ("voicetwo: and now?", voice_answer)]
        # Every turn ran alone in the model (ScriptedLLM asserts it), and none is left waiting.
        assert s.conv.gate.waiting == 0
    finally:
        close(s)


def test_a_wait_past_max_wait_is_refused():
    s = make_server(max_queue=8, max_wait_s=1.0, piece_delay=0.25)   # a turn takes 1.75 s
    try:
        client = openai.AsyncOpenAI(base_url=s.server.url + "/v1", api_key="none",
                                    max_retries=0, timeout=60)

        async def two():
            async def ask(tag):
                try:
                    r = await client.chat.completions.create(
                        model="rkvlm", messages=[{"role": "user", "content": f"{tag}: hi"}])
                    return 200, r.choices[0].message.content
                except openai.APIStatusError as e:
                    return e.status_code, e.response.headers.get("Retry-After")
            a = asyncio.create_task(ask("slow"))
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            b = await ask("late")
            return await a, b, time.monotonic() - t0
        a, b, waited = asyncio.run(two())
        assert a == (200, EchoLLM.answer_for("slow"))
        assert b[0] == 503 and int(b[1]) >= 1 and waited > 0.9   # refused after max_wait_s
    finally:
        close(s)


def test_a_client_that_goes_away_frees_the_model():
    s = make_server(max_queue=8, piece_delay=0.2)
    try:
        import aiohttp

        async def go():
            async with aiohttp.ClientSession() as session:
                resp = await session.post(s.server.url + "/v1/chat/completions", json={
                    "model": "rkvlm", "stream": True,
                    "messages": [{"role": "user", "content": "gone: tell me"}]})
                await resp.content.readline()          # the first chunk: generating
                resp.close()                           # hang up mid-answer
            await asyncio.sleep(0.5)
            client = openai.AsyncOpenAI(base_url=s.server.url + "/v1", api_key="none",
                                        max_retries=0, timeout=60)
            t0 = time.monotonic()
            r = await client.chat.completions.create(
                model="rkvlm", messages=[{"role": "user", "content": "next: hi"}])
            return r.choices[0].message.content, time.monotonic() - t0
        text, took = asyncio.run(go())
        assert text == EchoLLM.answer_for("next")
        # The abandoned turn was aborted: the next one did not wait for its 7 pieces.
        assert took < 2.5
    finally:
        close(s)
