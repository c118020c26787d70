"""Helpers shared by the HTTP tests (no tests here): free ports, a `serve` process, an
in-process server on a loop thread (``in_process``), raw requests, and test backends."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

from scripted_llm import ScriptedLLM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: Optional[subprocess.Popen] = None, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n"
                                 f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


def start_serve(workdir: Path, env_extra: Optional[dict] = None, command: str = "serve"):
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "assistant", "--config", "config.yaml", command],
                            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> str:
    """SIGTERM, then the process's stderr; killed (and the test failed) if it does not
    exit in ``timeout`` s, failed unless it exits 0 (a clean stop)."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, (err or "")[-3000:]
    return err


class LoopThread:
    """An asyncio loop in a thread: the 'daemon' side of in-process tests."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="server-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class EchoLLM(ScriptedLLM):
    """Answers each question with words naming it: "reply to <first word> ..."; crossed
    streams would show."""

    def __init__(self, words: int = 6, **kw):
        super().__init__(**kw)
        self.words = words
        self.answers = _EchoAnswers(self)

    @staticmethod
    def answer_for(question: str, words: int = 6) -> str:
        tag = question.split()[0].strip(":,.?") if question.split() else "nothing"
        return " ".join([f"reply to {tag}"] + [f"{tag}-{i}" for i in range(words)])


class _EchoAnswers:
    def __init__(self, llm: EchoLLM):
        self.llm = llm

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i) -> str:
        text = self.llm.calls[-1]["text"]
        return EchoLLM.answer_for(text.split("\n")[0], self.llm.words)


class FakeEncoder:
    """A vision encoder double: 16 tokens of zeros per image."""

    name = "fake"

    def load(self) -> None:
        pass

    def encode(self, rgb):
        from assistant.llm.base import ImageEmbedding

        return ImageEmbedding(np.zeros((16, 8), np.float32), 32, 32)

    def close(self) -> None:
        pass


def in_process(llm=None, http: Optional[dict] = None, parts=None, scene=None, transcript=None,
               cfg=None) -> SimpleNamespace:
    """The HTTP server on its own loop thread (the daemon's side) over a Conversation:
    ``.url``, ``.conv``, ``.server``, ``.loop``; ``.close()`` when done."""
    from assistant.config import Config, HttpConfig
    from assistant.conversation import Conversation
    from assistant.http.server import CTX, HttpServer, make_gate
    from assistant.vision.scene import Scene

    cfg = cfg or Config()
    cfg = dataclasses.replace(cfg, http=HttpConfig(**{"listen": "127.0.0.1:0", **(http or {})}))
    loop = LoopThread()

    async def build():
        conv = Conversation(cfg, llm, scene=scene or Scene(None, None, cfg.vision),
                            gate=make_gate(cfg), transcript=transcript)
        server = HttpServer(cfg, conv, parts or SimpleNamespace(asr=None, voices=None))
        await server.start()
        return conv, server

    conv, server = loop.run(build())

    def close() -> None:
        loop.run(server.stop())
        loop.close()

    return SimpleNamespace(cfg=cfg, llm=llm, loop=loop, conv=conv, server=server,
                           ctx=server.app[CTX], url=server.url, port=server.port, close=close)


def raw_http(port: int, request: bytes, timeout: float = 30.0) -> tuple[int, dict, bytes]:
    """One request as the bytes given (what no client library would send): status,
    headers (lower-case names) and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (l.decode("latin-1").partition(":") for l in head.split(b"\r\n")[1:])}
                n = int(headers.get("content-length", -1))
                if 0 <= n <= len(body):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (l.decode("latin-1").partition(":") for l in lines[1:])}
    return status, headers, body
