"""The Wyoming server, driven by the ``wyoming`` package's own client (AsyncTcpClient).

The server runs in-process on its own loop thread (the daemon's side) with the real models
a `serve` loads: whisper tiny.en and the piper voice from the packaged models, a tiny
scripted llama.cpp model with its projector, and a file camera. The test thread is Home
Assistant: real sockets, real events.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from types import SimpleNamespace

import numpy as np
import pytest

from assistant import config as config_mod
from assistant.audio.resample import resample
from assistant.demo import draw_scene
from assistant.pipeline import make_conversation
from assistant.serve import assemble_headless
from assistant.transcript import TranscriptWriter
from speech_fixtures import hear
from test_http_support import LoopThread
from tiny_models import write_mmproj, write_text_model

pytest.importorskip("wyoming")
from wyoming.asr import Transcribe, Transcript  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402
from wyoming.tts import (Synthesize, SynthesizeChunk, SynthesizeStart,  # noqa: E402
                         SynthesizeStop, SynthesizeVoice)

from assistant.wyoming.server import WyomingServer  # noqa: E402

REPLY = "I see a red apple on the wooden table."
QUESTION = "What do you see on the table?"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("wyoming")
    write_text_model(d / "tiny.gguf", scripted_reply=REPLY)
    write_mmproj(d / "tiny-mmproj.gguf")
    draw_scene(d / "scene.jpg")
    (d / "config.yaml").write_text("""
llm: {llamacpp: {model: tiny.gguf, mmproj: tiny-mmproj.gguf}}
persona: {language: en}
camera: {source: scene.jpg}
transcript: {path: turns.jsonl}
wyoming: {enabled: true, uri: "tcp://127.0.0.1:0", conversation_max_exchanges: 3,
          max_audio_s: 20}
""")
    cfg = config_mod.load(d / "config.yaml")
    loop = LoopThread()

    async def build():
        parts = await assemble_headless(cfg)
        transcript = TranscriptWriter(d / "turns.jsonl", cfg.transcript)
        conv = make_conversation(cfg, parts, transcript)
        srv = WyomingServer(cfg, conv, parts)
        await srv.start()
        return parts, conv, srv, transcript
    parts, conv, srv, transcript = loop.run(build(), timeout=300)
    # What the model is given as each request's history (the real backend, observed).
    histories: list = []
    load_history = conv.backend.load_history

    def spy(pairs):
        histories.append(list(pairs))
        return load_history(pairs)
    conv.backend.load_history = spy
    try:
        yield SimpleNamespace(cfg=cfg, dir=d, conv=conv, server=srv, port=srv.port,
                              histories=histories, transcript=transcript, parts=parts)
    finally:
        loop.run(srv.stop())
        from assistant import components
        loop.run(components.close(parts))
        transcript.close()
        loop.close()


def client(port: int) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", port, connect_timeout=10, read_timeout=120)


async def read_until(c: AsyncTcpClient, last: str) -> list:
    events = []
    while True:
        e = await c.read_event()
        assert e is not None, f"connection closed before {last}: {[x.type for x in events]}"
        events.append(e)
        if e.type in (last, "error"):
            return events


def rows(server, n: int) -> list[dict]:
    path = server.dir / "turns.jsonl"
    end = time.monotonic() + 10
    while time.monotonic() < end:
        got = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
        if len(got) >= n:
            return got
        time.sleep(0.05)
    return got


def pcm_of(events) -> tuple[np.ndarray, int]:
    starts = [e for e in events if e.type == "audio-start"]
    rate = starts[0].data["rate"]
    assert starts[0].data["width"] == 2 and starts[0].data["channels"] == 1
    data = b"".join(e.payload or b"" for e in events if e.type == "audio-chunk")
    return np.frombuffer(data, "<i2"), rate


# ---------------------------------------------------------------------------- describe

def test_describe_lists_asr_tts_and_handle(server):
    async def go():
        async with client(server.port) as c:
            await c.write_event(Describe().event())
            return Info.from_event((await read_until(c, "info"))[-1])
    info = asyncio.run(go())
    asr, tts, handle = info.asr[0], info.tts[0], info.handle[0]
    assert asr.name == "faster-whisper" and asr.installed and asr.version
    assert asr.models[0].name == "tiny.en" and asr.models[0].languages == ["en"]
    assert asr.supports_transcript_streaming and asr.attribution.url
    assert [v.name for v in tts.voices] == ["en_US-joe-medium"] and tts.installed
    assert tts.voices[0].languages == ["en_US"] and tts.voices[0].installed and tts.version
    assert tts.supports_synthesize_streaming
    assert handle.installed and handle.supports_handled_streaming and handle.version
    assert "camera" in handle.description and handle.models[0].languages == ["en"]
    assert handle.models[0].name == "tiny.gguf"


# ---------------------------------------------------------------------------- asr

def _pcm_as(pcm16k: np.ndarray, rate: int, width: int, channels: int) -> bytes:
    x = resample(pcm16k, 16000, rate).astype(np.int32)
    if width == 1:
        x = ((x >> 8) + 128).astype(np.uint8)
    elif width == 4:
        x = (x << 16).astype("<i4")
    else:
        x = x.astype("<i2")
    return np.repeat(x[:, None], channels, axis=1).tobytes()


@pytest.mark.parametrize("rate,width,channels", [(48000, 2, 2), (22050, 4, 1), (8000, 1, 1)])
def test_transcribe_any_rate_and_width(server, spoken, rate, width, channels):
    audio = _pcm_as(spoken.utterance(QUESTION), rate, width, channels)

    async def go():
        async with client(server.port) as c:
            await c.write_event(Transcribe(language="en").event())
            await c.write_event(AudioStart(rate, width, channels).event())
            step = 1024 * width * channels
            for i in range(0, len(audio), step):
                await c.write_event(AudioChunk(rate, width, channels, audio[i:i + step]).event())
            await c.write_event(AudioStop().event())
            return await read_until(c, "transcript-stop")
    events = asyncio.run(go())
    kinds = [e.type for e in events]
    assert kinds == ["transcript-start", "transcript-chunk", "transcript", "transcript-stop"]
    text = Transcript.from_event(events[2]).text
    assert events[1].data["text"] == text and events[2].data["language"] == "en"
    words = text.lower()
    assert "what" in words and "see" in words and "table" in words, text


def test_silence_gives_an_empty_transcript(server):
    async def go():
        async with client(server.port) as c:
            await c.write_event(AudioStart(16000, 2, 1).event())
            await c.write_event(AudioChunk(16000, 2, 1, bytes(16000 * 2)).event())
            await c.write_event(AudioStop().event())
            return await read_until(c, "transcript-stop")
    events = asyncio.run(go())
    assert [e.type for e in events] == ["transcript-start", "transcript", "transcript-stop"]
    assert events[1].data["text"] == ""


def test_audio_past_the_limit_is_refused(server):
    async def go():
        async with client(server.port) as c:
            await c.write_event(AudioStart(16000, 2, 1).event())
            for _ in range(25):                               # 25 s; the limit is 20 s
                await c.write_event(AudioChunk(16000, 2, 1, bytes(32000)).event())
            await c.write_event(AudioStop().event())
            events = await read_until(c, "error")
            ended = await read_until(c, "transcript-stop")
            # describe is answered by the reader at once (never queued behind work), so it
            # is asked only once the refused stream has ended: the connection still serves.
            await c.write_event(Describe().event())
            return events, ended, await read_until(c, "info")
    events, ended, after = asyncio.run(go())
    assert [e.type for e in events] == ["transcript-start", "error"]
    assert events[-1].data["code"] == "audio_too_long" and "20 s" in events[-1].data["text"]
    # The refused audio's request still ends (Home Assistant waits for a transcript).
    assert [(e.type, e.data.get("text")) for e in ended] == [
        ("transcript", ""), ("transcript-stop", None)]
    assert [e.type for e in after] == ["info"]


# ---------------------------------------------------------------------------- tts

def test_synthesize(server, whisper_tiny):
    async def go():
        async with client(server.port) as c:
            await c.write_event(Synthesize("Hello there. How are **you** today?").event())
            return await read_until(c, "audio-stop")
    events = asyncio.run(go())
    assert events[0].type == "audio-start" and events[-1].type == "audio-stop"
    assert sum(e.type == "audio-start" for e in events) == 1
    pcm, rate = pcm_of(events)
    assert rate == 22050 and len(pcm) > rate            # two sentences, over a second
    heard = hear(whisper_tiny, resample(pcm, rate, 16000))
    # piper's noise makes each rendering differ a little: tiny.en once heard "below there".
    assert "there" in heard and "how are you today" in heard, heard


def test_synthesize_streaming_speaks_each_sentence_as_it_arrives(server, whisper_tiny):
    async def go():
        async with client(server.port) as c:
            voice = SynthesizeVoice(name="en_US-joe-medium")
            await c.write_event(SynthesizeStart(voice=voice).event())
            await c.write_event(SynthesizeChunk("The cat sat on ").event())
            await c.write_event(SynthesizeChunk("the mat. The dog").event())
            # The first sentence is complete: its audio comes before the text ends.
            first = await read_until(c, "audio-stop")
            await c.write_event(SynthesizeChunk(" ran away.").event())
            await c.write_event(Synthesize("The cat sat on the mat. The dog ran away.",
                                           voice=voice).event())     # for old servers: ignored
            await c.write_event(SynthesizeStop().event())
            return first, await read_until(c, "synthesize-stopped")
    first, rest = asyncio.run(go())
    assert [e.type for e in first][0] == "audio-start"
    assert [e.type for e in rest if e.type != "audio-chunk"] == [
        "audio-start", "audio-stop", "synthesize-stopped"]
    pcm1, rate = pcm_of(first)
    pcm2, _ = pcm_of(rest)
    # Each audio is its one sentence: as long as piper's own rendering of that sentence alone
    # (piper's noise varies a rendering by a few per cent; the two sentences together would
    # be about twice as long), and whisper hears its words and not the other's. Bugs caught:
    # the first sentence held back until the text ends, both sentences in one audio, the
    # first spoken twice.
    voice = server.parts.voices.default
    assert voice.sample_rate == rate
    for pcm, text in ((pcm1, "The cat sat on the mat."), (pcm2, "The dog ran away.")):
        alone = len(voice.synthesize(text))
        assert abs(len(pcm) - alone) < 0.2 * alone, (text, len(pcm), alone)
    heard1 = hear(whisper_tiny, resample(pcm1, rate, 16000))
    heard2 = hear(whisper_tiny, resample(pcm2, rate, 16000))
    assert "cat" in heard1 and "dog" not in heard1, heard1
    assert "dog" in heard2 and "cat" not in heard2, heard2


def test_clients_that_hang_up_mid_stream_leave_the_server_serving(server):
    long_text = " ".join(f"This is sentence number {i} of a long text." for i in range(30))

    async def go():
        c = client(server.port)                     # hangs up while audio comes
        await c.connect()
        await c.write_event(Synthesize(long_text).event())
        assert (await c.read_event()).type == "audio-start"
        assert (await c.read_event()).type == "audio-chunk"
        await c.disconnect()
        c = client(server.port)                     # hangs up in the middle of its audio
        await c.connect()
        await c.write_event(AudioStart(16000, 2, 1).event())
        await c.write_event(AudioChunk(16000, 2, 1, bytes(3200)).event())
        await c.disconnect()
        async with client(server.port) as c:
            await c.write_event(Synthesize("Still here.").event())
            return await read_until(c, "audio-stop")
    events = asyncio.run(go())
    assert events[0].type == "audio-start" and len(pcm_of(events)[0]) > 0


def test_unknown_voice_is_an_error_and_the_connection_goes_on(server):
    async def go():
        async with client(server.port) as c:
            await c.write_event(Synthesize("Hi.", voice=SynthesizeVoice(name="nobody")).event())
            err = (await read_until(c, "error"))[-1]
            await c.write_event(Describe().event())
            return err, await read_until(c, "info")
    err, after = asyncio.run(go())
    assert err.data["code"] == "unknown_voice" and "en_US-joe-medium" in err.data["text"]
    # The audio-stop a client such as Home Assistant waits for ends the request.
    assert [e.type for e in after] == ["audio-stop", "info"]


# ---------------------------------------------------------------------------- handle

async def ask(port: int, text: str, cid: str | None) -> list:
    async with client(port) as c:
        ctx = {"conversation_id": cid} if cid else None
        await c.write_event(Transcript(text, context=ctx, language="en").event())
        return await read_until(c, "handled-stop")


def test_handle_streams_the_answer_with_the_camera(server):
    n = len(rows(server, 0))
    events = asyncio.run(ask(server.port, QUESTION, "ha-1"))
    kinds = [e.type for e in events]
    assert kinds[0] == "handled-start" and kinds[-2:] == ["handled", "handled-stop"]
    assert set(kinds[1:-2]) == {"handled-chunk"} and len(kinds) >= 3 + 5    # streamed
    assert "".join(e.data["text"] for e in events[1:-2]) == REPLY
    assert events[-2].data["text"] == REPLY
    assert events[0].data["context"]["conversation_id"] == "ha-1"
    row = rows(server, n + 1)[-1]
    assert row["source"] == "wyoming" and row["intent"] == "question"
    assert row["transcript"] == QUESTION and row["answer"] == REPLY
    assert row["conversation"] == "wyoming:ha-1"
    assert row["image"] is True and row["counts"]["image_tokens"] == 16      # the camera


def test_two_conversation_ids_are_kept_apart(server):
    server.histories.clear()
    a1, b1, a2 = "Alpha one?", "Bravo one?", "Alpha two?"
    for text, cid in ((a1, "conv-a"), (b1, "conv-b"), (a2, "conv-a")):
        assert asyncio.run(ask(server.port, text, cid))[-2].data["text"] == REPLY
    # Each request's history is its own id's exchanges, never the other's.
    assert server.histories == [[], [], [(a1, REPLY)]]
    store = server.server.services.store
    assert store.get("conv-a").history() == [(a1, REPLY), (a2, REPLY)]
    assert store.get("conv-b").history() == [(b1, REPLY)]
    assert server.conv.exchanges == []          # the voice conversation is untouched


def test_a_conversation_keeps_its_newest_exchanges(server):
    for i in range(5):
        asyncio.run(ask(server.port, f"Question {i}?", "long-one"))
    kept = server.server.services.store.get("long-one").history()
    assert [q for q, _ in kept] == ["Question 2?", "Question 3?", "Question 4?"]


def test_no_conversation_id_gets_one(server):
    """Bugs caught: one id for every request without one (strangers would share a
    conversation), an id not kept (the client cannot continue it), an id in the answer that
    is not the one the exchange was stored under."""
    import re

    first = asyncio.run(ask(server.port, "Hello?", None))
    second = asyncio.run(ask(server.port, "Hi there?", None))
    ids = [e[-2].data["context"]["conversation_id"] for e in (first, second)]
    assert all(re.fullmatch(r"wyoming-[0-9a-f]{12}", cid) for cid in ids), ids
    assert ids[0] != ids[1]
    assert first[0].data["context"]["conversation_id"] == ids[0]     # handled-start too
    assert first[-2].data["text"] == second[-2].data["text"] == REPLY
    store = server.server.services.store
    assert store.get(ids[0]).history() == [("Hello?", REPLY)]
    assert store.get(ids[1]).history() == [("Hi there?", REPLY)]
    # The rows of these two ids, in order (an earlier test's row may land late: the writer
    # is a thread of its own, so rows are picked by id, not by position).
    end = time.monotonic() + 10
    while True:
        mine = [r["conversation"] for r in rows(server, 0)
                if r["conversation"] in (f"wyoming:{c}" for c in ids)]
        if len(mine) >= 2 or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert mine == [f"wyoming:{c}" for c in ids]


# ---------------------------------------------------------------------------- bad input

def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    return s


def _read_json_events(s: socket.socket, n: int, f=None) -> list[dict]:
    """n events (header + data merged) read by hand from a raw socket; ``f``: the socket's
    buffered reader when more reads follow (a new one would lose what the last one read)."""
    f = f or s.makefile("rb")
    out = []
    for _ in range(n):
        header = json.loads(f.readline())
        if header.get("data_length"):
            header.setdefault("data", {}).update(json.loads(f.read(header["data_length"])))
        if header.get("payload_length"):
            f.read(header["payload_length"])
        out.append(header)
    return out


def test_malformed_events_are_answered_and_the_server_keeps_serving(server):
    s = _raw(server.port)
    try:
        s.sendall(b"this is not json\n")
        s.sendall(b'["a list"]\n')
        s.sendall(b'{"type": "audio-chunk", "data": {"rate": "fast", "width": 2, "channels": 1}}\n')
        s.sendall(b'{"type": "synthesize-chunk", "data": {"text": "hi"}}\n')
        s.sendall(b'{"type": "transcript", "data": {"text": 42}}\n')
        s.sendall(b'{"type": "audio-stop"}\n')
        s.sendall(b'{"type": "something-new"}\n')          # unknown: dropped, as the spec says
        s.sendall(b'{"type": "describe"}\n')
        got = _read_json_events(s, 7)
        # describe is answered by the reading side at once, so it may overtake the errors
        # of events still waiting for the connection's worker.
        assert sorted(e["type"] for e in got) == ["error"] * 6 + ["info"]
        events = [e for e in got if e["type"] == "error"]
        codes = [e["data"]["code"] for e in events]
        assert codes == ["malformed_event", "malformed_event", "bad_event", "bad_event",
                         "bad_event", "bad_event"]
        assert "rate" in events[2]["data"]["text"]
        assert "synthesize-start" in events[3]["data"]["text"]
        # A length that is not a size: the stream cannot be followed; that connection ends.
        s.sendall(b'{"type": "audio-chunk", "payload_length": -5}\n')
        err = _read_json_events(s, 1)[0]
        assert err["type"] == "error" and "payload_length" in err["data"]["text"]
        assert s.recv(1) == b""
    finally:
        s.close()
    # The server still serves everyone else.
    assert asyncio.run(ask(server.port, "Still there?", "after-bad"))[-2].data["text"] == REPLY


def test_nul_surrogates_and_deep_nesting_are_refused_and_the_server_keeps_serving(server):
    """Text with a NUL or a lone surrogate never reaches the model, piper or the transcript
    (an error event naming it, as HTTP's 400 does); a header nested 10,000 deep is one
    malformed event, not a RecursionError that ends the connection."""
    s = _raw(server.port)
    try:
        deep = b'{"type": "transcript", "data": {"text": "hi", "x": ' + b"[" * 10_000 + \
            b"]" * 10_000 + b"}}\n"
        s.sendall(deep)
        s.sendall(b'{"type": "transcript", "data": {"text": "what do you see\\u0000"}}\n')
        s.sendall(b'{"type": "synthesize", "data": {"text": "hello \\ud800 there"}}\n')
        s.sendall(b'{"type": "describe"}\n')
        got, f = [], s.makefile("rb")        # one buffered reader for every event
        while not any(e["type"] == "info" for e in got) or \
                sum(e["type"] == "error" for e in got) < 3:
            got += _read_json_events(s, 1, f)
            assert len(got) < 20, got
        errors = [e["data"] for e in got if e["type"] == "error"]
        assert errors[0]["code"] == "malformed_event" and "deep" in errors[0]["text"]
        assert [e["code"] for e in errors[1:3]] == ["invalid_characters"] * 2, errors
        assert "NUL" in errors[1]["text"] and "surrogate" in errors[2]["text"]
        assert not any(e["type"] in ("handled", "audio-chunk") for e in got), got
    finally:
        s.close()
    assert asyncio.run(ask(server.port, "Still there?", "after-nul"))[-2].data["text"] == REPLY
