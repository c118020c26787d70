"""A Wyoming `transcribe` event's language is for the one audio stream that follows it.

The server is the real one (its connection, its AsrSession); whisper is a multilingual double
that records the language each transcription is given, so the test reads exactly what the
server passed on instead of guessing it from what a model heard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from types import SimpleNamespace

import pytest

from assistant.audio.asr import Transcript as AsrTranscript
from assistant.config import Config, WyomingConfig
from assistant.conversation import Conversation
from assistant.vision.scene import Scene
from test_http_support import EchoLLM, LoopThread

pytest.importorskip("wyoming")
from wyoming.asr import Transcribe  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402

from assistant.wyoming.server import WyomingServer  # noqa: E402


class LanguageSpy:
    """A multilingual whisper that answers at once and keeps the language of every call."""

    multilingual = True

    def __init__(self):
        self.languages: list = []
        self._lock = threading.Lock()

    def transcribe(self, pcm, language=None):
        with self._lock:
            self.languages.append(language)
        return AsrTranscript(text="some words", language=language or "en", accepted=True,
                             reason="ok", no_speech_prob=0.0, avg_logprob=0.0,
                             audio_s=len(pcm) / 16000, elapsed_s=0.0)


@pytest.fixture
def server():
    cfg = dataclasses.replace(Config(), wyoming=WyomingConfig(enabled=True,
                                                              uri="tcp://127.0.0.1:0"))
    spy = LanguageSpy()
    loop = LoopThread()

    async def build():
        conv = Conversation(cfg, EchoLLM(words=2), scene=Scene(None, None, cfg.vision))
        srv = WyomingServer(cfg, conv, SimpleNamespace(asr=spy, voices=None))
        await srv.start()
        return srv
    srv = loop.run(build())
    try:
        yield SimpleNamespace(port=srv.port, spy=spy)
    finally:
        loop.run(srv.stop())
        loop.close()


async def transcribe(c: AsyncTcpClient, language=None) -> dict:
    """One audio stream (a transcribe event first when ``language`` is given); the
    transcript event's data."""
    if language is not None:
        await c.write_event(Transcribe(language=language).event())
    await c.write_event(AudioStart(16000, 2, 1).event())
    await c.write_event(AudioChunk(16000, 2, 1, bytes(3200)).event())
    await c.write_event(AudioStop().event())
    data = None
    while True:
        e = await c.read_event()
        assert e is not None and e.type != "error", e and e.data
        if e.type == "transcript":
            data = e.data
        if e.type == "transcript-stop":
            return data


def test_a_transcribe_language_is_not_carried_to_the_next_stream(server):
    """Bug caught: the language of one `transcribe` kept for the connection's next audio
    stream (Home Assistant sends one per request: a question in Chinese would make every later
    one on that connection be transcribed as Chinese)."""
    async def go():
        async with AsyncTcpClient("127.0.0.1", server.port, connect_timeout=10,
                                  read_timeout=30) as c:
            return [await transcribe(c, "zh"), await transcribe(c), await transcribe(c, "de"),
                    await transcribe(c)]
    results = asyncio.run(go())
    # Each stream's whisper call got its own request's language, None (detect) when none.
    assert server.spy.languages == ["zh", None, "de", None]
    assert [r["language"] for r in results] == ["zh", "en", "de", "en"]
