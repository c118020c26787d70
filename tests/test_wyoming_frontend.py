"""The Wyoming front-end around the conversation: clients that go away, answers queued behind
the person in the room, speech work in the line it shares with the HTTP API, the LAN rule,
the zeroconf announcement, and `serve` starting it.

Where a turn must last long enough to be cut or overtaken, the model is the scripted one
that streams a piece every ``piece_delay`` (the tiny llama.cpp model answers in
milliseconds, too fast to hang up in the middle of); everything else is real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from alsa_support import make_fake_alsa, portaudio_available
from assistant.audio.asr import Transcript as AsrTranscript
from assistant.audio.resample import resample
from assistant.audio.tts import Chunk
from assistant.config import Config, ConfigError, HttpConfig, WyomingConfig, parse
from assistant.conversation import Conversation, Request
from assistant.transcript import TranscriptWriter
from assistant.demo import draw_scene
from assistant.turn import Turn
from assistant.vision.scene import Scene
from test_http_support import EchoLLM, LoopThread, free_port, start_serve, stop_process, wait_for_port
from tiny_models import write_mmproj, write_text_model

pytest.importorskip("wyoming")
from wyoming.asr import Transcript  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.info import Describe  # noqa: E402
from wyoming.tts import Synthesize  # noqa: E402

from assistant.wyoming.server import WyomingServer, check_uri  # noqa: E402
from assistant.wyoming.zeroconf import SERVICE_TYPE, Announcer, wanted  # noqa: E402


def make_server(piece_delay=0.15, transcript=None, http=None, **wyoming):
    cfg = dataclasses.replace(Config(), http=HttpConfig(**(http or {})), wyoming=WyomingConfig(
        enabled=True, uri="tcp://127.0.0.1:0", **wyoming))
    llm = EchoLLM(words=8, piece_delay=piece_delay)
    loop = LoopThread()
    events: list = []

    async def build():
        conv = Conversation(cfg, llm, scene=Scene(None, None, cfg.vision),
                            transcript=transcript and TranscriptWriter(transcript, cfg.transcript))
        conv.subscribe(lambda ev, turn, data: events.append((ev, turn.source, dict(data))))
        server = WyomingServer(cfg, conv, SimpleNamespace(asr=None, voices=None))
        await server.start()
        return conv, server
    conv, server = loop.run(build())
    return SimpleNamespace(cfg=cfg, llm=llm, loop=loop, conv=conv, server=server,
                           port=server.port, events=events)


def close(s) -> None:
    s.loop.run(s.server.stop())
    s.loop.close()
    if s.conv.transcript is not None:
        s.conv.transcript.close()


def client(port):
    return AsyncTcpClient("127.0.0.1", port, connect_timeout=10, read_timeout=60)


async def handled(port, text, cid) -> str:
    async with client(port) as c:
        await c.write_event(Transcript(text, context={"conversation_id": cid}).event())
        while True:
            e = await c.read_event()
            if e.type == "handled":
                return e.data["text"]


def test_a_client_that_disconnects_mid_answer_cuts_the_turn(tmp_path):
    s = make_server(transcript=tmp_path / "turns.jsonl")
    try:
        async def go():
            c = client(s.port)
            await c.connect()
            await c.write_event(Transcript("gone: tell me", context={"conversation_id": "x"}).event())
            assert (await c.read_event()).type == "handled-start"
            assert (await c.read_event()).type == "handled-chunk"
            await c.disconnect()                                 # hang up mid-answer
            return await handled(s.port, "next: hi", "y")
        assert asyncio.run(go()) == EchoLLM.answer_for("next", 8)
        done = [d for ev, src, d in s.events if ev == "done"]
        full = EchoLLM.answer_for("gone", 8)
        # The cut turn ended early (the stream was closed and the model aborted) ...
        assert done[0]["answer"] and full.startswith(done[0]["answer"]) and done[0]["answer"] != full
        assert done[1]["answer"] == EchoLLM.answer_for("next", 8)
        # ... and its conversation keeps nothing of it (bug caught: the cut answer stored as
        # an exchange, the next request on "x" then continuing from half an answer).
        store = s.server.services.store
        assert "x" in store                       # made when the request came
        assert store.get("x").history() == []
        assert store.get("y").history() == [("next: hi", EchoLLM.answer_for("next", 8))]
    finally:
        close(s)
    rows = [json.loads(l) for l in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert [(r["source"], r["conversation"], r["interrupted"]) for r in rows] == [
        ("wyoming", "wyoming:x", True), ("wyoming", "wyoming:y", False)]
    assert rows[0]["note"] == "client disconnected" and rows[0]["answer"] == done[0]["answer"]


def test_describe_is_answered_while_an_answer_streams():
    s = make_server()
    try:
        async def go():
            async with client(s.port) as c:
                await c.write_event(Transcript("slow: go", context={"conversation_id": "z"}).event())
                assert (await c.read_event()).type == "handled-start"
                await c.write_event(Describe().event())
                kinds = []
                while not kinds or kinds[-1] != "handled-stop":
                    kinds.append((await c.read_event()).type)
                return kinds
        kinds = asyncio.run(go())
        assert kinds.index("info") < kinds.index("handled")
    finally:
        close(s)


def test_home_assistant_waits_behind_the_person_in_the_room():
    s = make_server()
    try:
        async def voice(question):
            out = []
            async for piece in s.conv.ask(Request(question, use_camera=False), Turn()):
                out.append(piece)
            return "".join(out)

        async def go():
            first = asyncio.create_task(handled(s.port, "first: a", "ha"))
            while not any(ev == "question" for ev, *_ in s.events):
                await asyncio.sleep(0.02)
            second = asyncio.create_task(handled(s.port, "second: b", "ha2"))
            await asyncio.sleep(0.3)                   # queued behind the first
            v = asyncio.run_coroutine_threadsafe(voice("voice: c"), s.loop.loop)
            await asyncio.gather(first, second)
            return v.result(30)
        assert asyncio.run(go()) == EchoLLM.answer_for("voice", 8)
        order = [d["text"].split(":")[0] for ev, src, d in s.events if ev == "question"]
        assert order == ["first", "voice", "second"]
    finally:
        close(s)


def test_home_assistant_requests_are_bounded_by_the_http_sizes():
    s = make_server(piece_delay=0, http={"max_question_chars": 40, "max_chars": 300},
                    conversation_max_exchanges=50)
    sent = []
    ask = s.conv.ask

    def spy(req, turn):
        sent.append(req.history)
        return ask(req, turn)
    s.conv.ask = spy
    try:
        async def go():
            async with client(s.port) as c:
                await c.write_event(Transcript("long: " + "x" * 40,
                                               context={"conversation_id": "h"}).event())
                refused = await c.read_event()
            for i in range(7):
                await handled(s.port, f"q{i}: hello there", "h")
            return refused
        refused = asyncio.run(go())
        # A question past http.max_question_chars: Home Assistant says why; no turn.
        assert refused.type == "not-handled"
        assert refused.data["text"] == s.cfg.persona.lines(None).too_long
        assert len(sent) == 7 and not any("long" in d["text"] for ev, _, d in s.events
                                          if ev == "question")
        # The server keeps the history, so past http.max_chars its oldest exchanges are
        # left out (Home Assistant could not shorten it); the newest that fit go.
        stored = s.server.services.store.get("h").history()[:-1]     # before the last
        last, question = sent[-1], "q6: hello there"

        def size(exchanges):
            return len(question) + sum(len(q) + len(a) for q, a in exchanges)
        assert 0 < len(last) < len(stored) and last == stored[len(stored) - len(last):]
        assert size(last) <= 300 < size(stored[len(stored) - len(last) - 1:])
    finally:
        close(s)


def test_connections_past_the_limit_are_refused_with_a_reason(monkeypatch):
    from assistant.wyoming import server as server_mod

    monkeypatch.setattr(server_mod, "MAX_CONNECTIONS", 2)
    s = make_server()
    try:
        async def go():
            held = [client(s.port), client(s.port)]
            for c in held:
                await c.connect()
                await c.write_event(Describe().event())
                assert (await c.read_event()).type == "info"     # both are being served
            async with client(s.port) as extra:
                refused = await extra.read_event()
                gone = await extra.read_event()
            for c in held:
                await c.disconnect()
            await asyncio.sleep(0.2)
            return refused, gone, await handled(s.port, "again: hi", "r")
        refused, gone, answer = asyncio.run(go())
        assert refused.type == "error" and refused.data["code"] == "too_many_connections"
        assert gone is None and answer == EchoLLM.answer_for("again", 8)
    finally:
        close(s)



def _raw(port: int, source: str = "127.0.0.1"):
    """A raw client from a loopback source address of its own (127.0.0.0/8)."""
    import socket

    from test_wyoming_limits import Events, event

    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return s, Events(s), event


def test_an_idle_connection_makes_room_at_the_cap(monkeypatch):
    """Slots held by connections that do nothing must not lock Home Assistant out until the
    idle timeout: at the cap, the longest-idle one is closed with a reason and the newcomer
    is served. Bugs caught: refusing while every slot is idle (the lockout), evicting a
    connection that is still active instead of the idle one."""
    from assistant.wyoming import server as server_mod

    monkeypatch.setattr(server_mod, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(server_mod, "EVICT_IDLE_S", 0.5)
    s = make_server()
    held = []
    try:
        idle, idle_events, event = _raw(s.port)
        held.append(idle)
        time.sleep(1.0)                              # idle for longer than EVICT_IDLE_S
        busy, busy_events, _ = _raw(s.port)
        held.append(busy)
        busy.sendall(event("describe"))
        assert busy_events.next()["type"] == "info"  # just active: not the one to go
        new, new_events, _ = _raw(s.port)
        held.append(new)
        new.sendall(event("describe"))
        assert new_events.next()["type"] == "info"   # served, not too_many_connections
        gone = idle_events.next()
        assert gone["type"] == "error" and gone["data"]["code"] == "evicted", gone
        assert idle_events.next() is None            # and closed
        busy.sendall(event("describe"))
        assert busy_events.next()["type"] == "info"  # the active one still serves
    finally:
        for c in held:
            c.close()
        close(s)


def test_one_address_cannot_take_every_slot(monkeypatch):
    """A client on one address that keeps all its connections busy (pinging, so never idle)
    can hold at most PER_ADDRESS of them: another address is still served. Bug caught: the
    cap counted over all addresses only (one stranger takes every slot)."""
    from assistant.wyoming import server as server_mod

    monkeypatch.setattr(server_mod, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(server_mod, "PER_ADDRESS", 2)
    s = make_server()
    held = []
    try:
        for _ in range(2):
            c, events, event = _raw(s.port, "127.0.0.2")
            held.append(c)
            c.sendall(event("describe"))
            assert events.next()["type"] == "info"
        third, events, event = _raw(s.port, "127.0.0.2")
        held.append(third)
        refused = events.next()
        assert refused["type"] == "error" and refused["data"]["code"] == "too_many_connections"
        assert "at most 2 from one address" in refused["data"]["text"]
        other, other_events, _ = _raw(s.port, "127.0.0.3")
        held.append(other)
        other.sendall(event("describe"))
        assert other_events.next()["type"] == "info"
    finally:
        for c in held:
            c.close()
        close(s)


# ---------------------------------------------------------------------------- the LAN rule

def test_a_lan_address_needs_allow_lan():
    lan = parse('wyoming: {enabled: true, uri: "tcp://0.0.0.0:10700"}')
    with pytest.raises(ConfigError, match="wyoming.allow_lan: required") as e:
        check_uri(lan)
    assert e.value.key == "wyoming.allow_lan"
    ok = parse('wyoming: {enabled: true, uri: "tcp://0.0.0.0:10700", allow_lan: true}')
    assert check_uri(ok) == ("0.0.0.0", 10700)
    assert check_uri(parse('wyoming: {uri: "tcp://0.0.0.0:1"}')) is None     # off: no check
    for bad in ("http://127.0.0.1:10700", "tcp://127.0.0.1", "tcp://127.0.0.1:99999"):
        with pytest.raises(ConfigError, match="wyoming.uri"):
            check_uri(parse(f'wyoming: {{enabled: true, uri: "{bad}"}}'))


def test_check_reports_the_lan_rule(capsys):
    from assistant.check import run_check

    code = run_check(parse('wyoming: {enabled: true, uri: "tcp://192.168.1.20:10700"}'))
    out = capsys.readouterr().out
    assert code == 78
    assert "FAIL <string>: wyoming.allow_lan: required" in out


# ---------------------------------------------------------------------------- zeroconf

class RecordingZeroconf:
    """Stands in for AsyncZeroconf: records what would be announced, sends nothing."""

    def __init__(self, interfaces):
        self.interfaces = interfaces
        self.registered, self.unregistered, self.closed = [], [], False

    async def async_register_service(self, info):
        self.registered.append(info)

    async def async_unregister_service(self, info):
        self.unregistered.append(info)

    async def async_close(self):
        self.closed = True


def test_zeroconf_is_on_for_a_lan_address_only_by_default():
    assert wanted("auto", "192.168.1.20") and wanted("auto", "0.0.0.0")
    assert not wanted("auto", "127.0.0.1") and not wanted("auto", "::1")
    assert wanted("on", "127.0.0.1") and not wanted("off", "192.168.1.20")


def test_the_announcement_is_registered_and_withdrawn():
    made = []

    def make(interfaces):
        made.append(RecordingZeroconf(interfaces))
        return made[-1]

    async def go():
        a = Announcer("192.168.1.20", 10700, "kitchen board", make_zeroconf=make)
        await a.start()
        await a.stop()
    asyncio.run(go())
    zc = made[0]
    assert zc.interfaces == ["192.168.1.20"]           # only the interface it listens on
    info = zc.registered[0]
    assert info.type == SERVICE_TYPE == "_wyoming._tcp.local."
    assert info.name == "kitchen board._wyoming._tcp.local." and info.port == 10700
    assert info.parsed_addresses() == ["192.168.1.20"]
    assert zc.unregistered == [info] and zc.closed


def test_the_server_announces_its_real_port():
    made = []
    cfg = dataclasses.replace(Config(), wyoming=WyomingConfig(
        enabled=True, uri="tcp://127.0.0.1:0", zeroconf="on", zeroconf_name="board"))

    async def go():
        conv = Conversation(cfg, EchoLLM(), scene=Scene(None, None, cfg.vision))
        server = WyomingServer(cfg, conv, SimpleNamespace(asr=None, voices=None),
                               make_zeroconf=lambda i: made.append(RecordingZeroconf(i)) or made[-1])
        await server.start()
        port = server.port
        await server.stop()
        return port
    port = asyncio.run(go())
    assert made[0].registered[0].port == port != 0
    assert made[0].registered[0].parsed_addresses() == ["127.0.0.1"] and made[0].closed


def test_a_failed_announcement_leaves_the_server_serving(caplog):
    cfg = dataclasses.replace(Config(), wyoming=WyomingConfig(
        enabled=True, uri="tcp://127.0.0.1:0", zeroconf="on"))

    def broken(interfaces):
        raise OSError("no multicast route")

    async def go():
        conv = Conversation(cfg, EchoLLM(), scene=Scene(None, None, cfg.vision))
        server = WyomingServer(cfg, conv, SimpleNamespace(asr=None, voices=None),
                               make_zeroconf=broken)
        await server.start()
        try:
            return await handled(server.port, "hello: there", "z")
        finally:
            await server.stop()
    assert asyncio.run(go()) == EchoLLM.answer_for("hello")
    assert "could not be announced (zeroconf): no multicast route" in caplog.text


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM: a clean exit (0) that started and stopped the Wyoming server; its log."""
    err = stop_process(proc)
    assert "Wyoming server on tcp://127.0.0.1" in err and "Wyoming server stopped" in err
    return err


# ---------------------------------------------------------------------------- serve

def test_serve_starts_and_stops_the_wyoming_server(tmp_path):
    reply = "I see a red apple on the wooden table."
    write_text_model(tmp_path / "tiny.gguf", scripted_reply=reply)
    write_mmproj(tmp_path / "tiny-mmproj.gguf")
    draw_scene(tmp_path / "scene.jpg")
    port, http_port = free_port(), free_port()
    (tmp_path / "config.yaml").write_text(f"""
llm: {{llamacpp: {{model: tiny.gguf, mmproj: tiny-mmproj.gguf}}}}
camera: {{source: scene.jpg}}
transcript: {{path: turns.jsonl}}
http: {{listen: "127.0.0.1:{http_port}"}}
wyoming: {{enabled: true, uri: "tcp://127.0.0.1:{port}"}}
""")
    proc = start_serve(tmp_path)
    try:
        wait_for_port(port, proc)
        assert asyncio.run(handled(port, "What do you see?", "ha")) == reply
    finally:
        stop(proc)


# ---------------------------------------------------------------------------- run

@pytest.mark.skipif(not portaudio_available(), reason="needs libportaudio2")
def test_run_serves_the_voice_loop_and_wyoming_together(tmp_path, spoken):
    reply = "I see a red apple on the wooden table."
    write_text_model(tmp_path / "tiny.gguf", scripted_reply=reply)
    write_mmproj(tmp_path / "tiny-mmproj.gguf")
    draw_scene(tmp_path / "scene.jpg")
    fake = make_fake_alsa(tmp_path, capture_rate=48000, playback_rate=22050)
    fake.write_capture(np.concatenate([
        np.zeros(int(0.4 * 48000), np.int16),
        resample(spoken.pcm("What do you see on the table?"), 16000, 48000),
        np.zeros(int(1.5 * 48000), np.int16)]))
    port = free_port()
    (tmp_path / "config.yaml").write_text(f"""
audio:
  input: {{device: fakemic, sample_rate: 48000}}
  output: {{device: fakespeaker, sample_rate: 22050}}
persona: {{language: en, en: {{greeting: ""}}}}
camera: {{source: scene.jpg}}
transcript: {{path: turns.jsonl}}
llm: {{llamacpp: {{model: tiny.gguf, mmproj: tiny-mmproj.gguf}}}}
http: {{enabled: false}}
wyoming: {{enabled: true, uri: "tcp://127.0.0.1:{port}"}}
""")
    env = fake.env()
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([sys.executable, "-m", "assistant", "--config", "config.yaml", "run"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    path = tmp_path / "turns.jsonl"
    try:
        wait_for_port(port, proc)
        assert asyncio.run(handled(port, "What do you see?", "ha")) == reply
        end = time.monotonic() + 60
        while time.monotonic() < end:
            rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
            if {r["source"] for r in rows} >= {"voice", "wyoming"}:
                break
            time.sleep(0.2)
    finally:
        stop(proc)
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert {r["source"] for r in rows} == {"voice", "wyoming"}, rows
    assert all(r["answer"] == reply for r in rows)


# ---------------------------------------------------------------------------- speech work
#
# Whisper and piper are doubles here that work only when the test lets them go: the point is
# what happens to requests that arrive while the speech workers are still busy, and the real
# models finish too fast (and too variably) to hold a worker for a known time.

class HeldSpeech:
    """A whisper and a piper voice that each hold their worker until ``go`` is set (or
    ``hold_s`` passes), counting how many run at once across both."""

    name = "held"                  # piper's side
    sample_rate = 16000
    language = "en_US"
    multilingual = False           # whisper's side

    def __init__(self, hold_s: float = 30.0):
        self.go = threading.Event()
        self.hold_s = hold_s
        self.running = self.most = 0
        self._lock = threading.Lock()

    def _hold(self) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.go.wait(self.hold_s)
        finally:
            with self._lock:
                self.running -= 1

    def transcribe(self, pcm, language=None):
        self._hold()
        return AsrTranscript(text="held words", language="en", accepted=True, reason="ok",
                             no_speech_prob=0.0, avg_logprob=0.0, audio_s=len(pcm) / 16000,
                             elapsed_s=0.0)

    def stream(self, text):
        self._hold()
        yield Chunk(np.ones(1600, np.int16), 1.0)

    def synthesize(self, text, pause_after=False):          # the HTTP API's call
        self._hold()
        return np.ones(1600, np.int16)

    def silence(self, ms=None):
        return np.zeros(160, np.int16)


def speech_servers(held: HeldSpeech, **http):
    """The HTTP API and the Wyoming server on one loop over one conversation, sharing one
    set of speech workers as `run` and `serve` make them."""
    from assistant.frontend import media_work
    from assistant.http.server import HttpServer, make_gate

    cfg = dataclasses.replace(
        Config(), http=HttpConfig(listen="127.0.0.1:0", **http),
        wyoming=WyomingConfig(enabled=True, uri="tcp://127.0.0.1:0"))
    parts = SimpleNamespace(asr=held, voices=SimpleNamespace(
        default=held, zh=None, for_language=lambda lang: held))
    loop = LoopThread()

    async def build():
        media = media_work(cfg)
        conv = Conversation(cfg, EchoLLM(words=2), scene=Scene(None, None, cfg.vision),
                            gate=make_gate(cfg))
        http_server = HttpServer(cfg, conv, parts, media=media)
        wyoming = WyomingServer(cfg, conv, parts, media=media)
        await http_server.start()
        await wyoming.start()
        return media, http_server, wyoming
    media, http_server, wyoming = loop.run(build())

    def close() -> None:
        loop.run(http_server.stop())
        loop.run(wyoming.stop())
        media.close()
        loop.close()
    return SimpleNamespace(media=media, url=http_server.url, port=wyoming.port, loop=loop,
                           close=close)


async def until_ended(c, last: str) -> list:
    events = []
    while not events or events[-1].type != last:
        e = await c.read_event()
        assert e is not None, [x.type for x in events]
        events.append(e)
    return events


async def wyoming_synthesize(port: int, text: str = "Hello there.") -> list:
    async with client(port) as c:
        await c.write_event(Synthesize(text).event())
        return await until_ended(c, "audio-stop")


async def wyoming_transcribe(port: int) -> list:
    async with client(port) as c:
        await c.write_event(AudioStart(16000, 2, 1).event())
        await c.write_event(AudioChunk(16000, 2, 1, bytes(16000)).event())
        await c.write_event(AudioStop().event())
        return await until_ended(c, "transcript-stop")


def test_wyoming_speech_past_the_shared_line_is_refused_and_the_server_goes_on():
    import aiohttp

    held = HeldSpeech()
    s = speech_servers(held, audio_workers=1, audio_queue=1)
    try:
        async def http_speech():
            async with aiohttp.ClientSession() as session:
                async with session.post(s.url + "/v1/audio/speech",
                                        json={"input": "Hello.", "voice": "alloy"}) as r:
                    return r.status, await r.read()

        async def until(cond):
            while not cond():
                await asyncio.sleep(0.01)

        async def go():
            # HTTP takes the one worker; Home Assistant's synthesis waits in the one place.
            web = asyncio.create_task(http_speech())
            await until(lambda: held.running == 1)
            waiting = asyncio.create_task(wyoming_synthesize(s.port))
            await until(lambda: s.media.waiting == 1)
            # The line is full: refused at once, each with the events that end its request.
            heard = await wyoming_transcribe(s.port)
            spoken = await wyoming_synthesize(s.port)
            # The server goes on: describe and the conversation are not behind speech.
            async with client(s.port) as c:
                await c.write_event(Describe().event())
                info = await until_ended(c, "info")
            answer = await handled(s.port, "meanwhile: hi", "ha")
            held.go.set()
            return heard, spoken, info, answer, await web, await waiting
        heard, spoken, info, answer, web, waiting = asyncio.run(go())
        assert [e.type for e in heard] == ["transcript-start", "error", "transcript",
                                           "transcript-stop"]
        assert heard[1].data["code"] == "busy" and "already waiting" in heard[1].data["text"]
        assert heard[2].data["text"] == ""
        assert [e.type for e in spoken] == ["error", "audio-stop"]
        assert spoken[0].data["code"] == "busy"
        assert info[-1].type == "info" and answer == EchoLLM.answer_for("meanwhile", 2)
        # The ones in line were served once the worker was free, one at a time.
        assert web[0] == 200 and web[1][:4] == b"RIFF"
        assert [e.type for e in waiting] == ["audio-start", "audio-chunk", "audio-stop"]
        assert held.most == 1
        # And the next transcription is served.
        after = asyncio.run(wyoming_transcribe(s.port))
        assert [e.type for e in after][-2:] == ["transcript", "transcript-stop"]
        assert after[-2].data["text"] == "held words"
    finally:
        held.go.set()
        s.close()


def test_wyoming_speech_past_the_deadline_is_an_error_and_the_worker_stays_counted():
    held = HeldSpeech()
    s = speech_servers(held, audio_workers=1, audio_deadline_s=1.0)
    try:
        t0 = time.monotonic()
        spoken = asyncio.run(wyoming_synthesize(s.port))
        assert time.monotonic() - t0 < 20                        # given up, not waited for
        assert [e.type for e in spoken] == ["error", "audio-stop"]
        assert spoken[0].data["code"] == "deadline_exceeded"
        assert "http.audio_deadline_s" in spoken[0].data["text"]
        assert held.running == 1 and s.media.busy == 1           # its thread still runs
        held.go.set()
        end = time.monotonic() + 10
        while s.media.busy and time.monotonic() < end:
            time.sleep(0.02)
        assert s.media.busy == 0
        assert [e.type for e in asyncio.run(wyoming_synthesize(s.port))] == [
            "audio-start", "audio-chunk", "audio-stop"]
    finally:
        held.go.set()
        s.close()
