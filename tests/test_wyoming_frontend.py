"""The Wyoming front-end around the conversation: clients that go away, answers queued behind
the person in the room, the LAN rule, the zeroconf announcement, and `serve` starting it.

Where a turn must last long enough to be cut or overtaken, the model is the scripted one
that streams a piece every ``piece_delay`` (the tiny llama.cpp model answers in
milliseconds, too fast to hang up in the middle of); everything else is real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from alsa_support import make_fake_alsa, portaudio_available
from assistant.audio.resample import resample
from assistant.config import Config, ConfigError, WyomingConfig, parse
from assistant.conversation import Conversation, Request
from assistant.transcript import TranscriptWriter
from assistant.demo import draw_scene
from assistant.turn import Turn
from assistant.vision.scene import Scene
from test_http_support import EchoLLM, LoopThread, free_port, start_serve, wait_for_port
from tiny_models import write_mmproj, write_text_model

pytest.importorskip("wyoming")
from wyoming.asr import Transcript  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.info import Describe  # noqa: E402

from assistant.wyoming.server import WyomingServer, check_uri  # noqa: E402
from assistant.wyoming.zeroconf import SERVICE_TYPE, Announcer, wanted  # noqa: E402


def make_server(piece_delay=0.15, transcript=None, **wyoming):
    cfg = dataclasses.replace(Config(), wyoming=WyomingConfig(
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
        # ... and its conversation keeps nothing of it.
        store = s.server.services.store
        assert "x" not in store or store.get("x").history() == []
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
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
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
