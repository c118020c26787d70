"""The front-ends as `serve` runs them, in-process: the real tiny llama.cpp model (with its
projector when the camera is on), a file camera, the Wyoming server and the HTTP API over one
conversation on a loop thread (the daemon's side). The test thread is Home Assistant and the
HTTP client. No helpers' tests here.

``Rig.encoder.calls`` counts the vision encoder's encodes; ``Rig.loads`` records every
history the model evaluated again (``load_history`` calls that did not refuse it).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import cv2
import numpy as np

from assistant import components
from assistant import config as config_mod
from assistant.conversation import Conversation, Request
from assistant.demo import draw_scene
from assistant.http.server import HttpServer, make_gate
from assistant.transcript import TranscriptWriter
from assistant.turn import Turn
from assistant.vision.base import VisionEncoder
from assistant.vision.scene import Scene
from test_http_support import LoopThread
from tiny_models import write_mmproj, write_text_model

from wyoming.asr import Transcript  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402

from assistant.wyoming.server import WyomingServer  # noqa: E402

REPLY = "I see a red apple on the wooden table."


class CountingEncoder(VisionEncoder):
    """The real encoder, its calls counted."""

    def __init__(self, inner: VisionEncoder):
        self.inner = inner
        self.name = inner.name
        self.calls = 0

    def load(self) -> None:
        self.inner.load()

    def encode(self, rgb):
        self.calls += 1
        return self.inner.encode(rgb)

    def close(self) -> None:
        self.inner.close()


def other_scene(path: Path) -> Path:
    """A picture nothing like draw_scene's: a dark room with a yellow lamp."""
    img = np.full((480, 640, 3), (30, 30, 30), np.uint8)
    cv2.circle(img, (320, 200), 120, (0, 220, 255), -1)
    cv2.imwrite(str(path), img)
    return path


class Rig:
    def __init__(self, d: Path, llm: str = "", yaml: str = "", camera: bool = True,
                 reply: str = REPLY):
        """``llm``: more ``llm:`` keys (flow style, e.g. "max_context_len: 512");
        ``yaml``: more top-level sections."""
        self.dir = d
        write_text_model(d / "tiny.gguf", scripted_reply=reply)
        llm = ", " + llm if llm else ""
        if camera:
            write_mmproj(d / "mmproj.gguf")
            draw_scene(d / "scene.jpg")
            cam = (f"llm: {{llamacpp: {{model: tiny.gguf, mmproj: mmproj.gguf}}{llm}}}\n"
                   "camera: {source: scene.jpg}\nvision: {watch: false}\n")
        else:
            cam = f"llm: {{llamacpp: {{model: tiny.gguf}}{llm}}}\ncamera: {{source: null}}\n"
        (d / "config.yaml").write_text(
            cam + "persona: {language: en}\ntranscript: {path: turns.jsonl}\n"
            'http: {listen: "127.0.0.1:0"}\n' + yaml
            + ('' if "wyoming:" in yaml else 'wyoming: {enabled: true, uri: "tcp://127.0.0.1:0"}\n'))
        self.cfg = cfg = config_mod.load(d / "config.yaml")
        self.loop = LoopThread()
        self.loads: list[list] = []

        async def build():
            llm, enc, _ = components.language_model(cfg)
            await asyncio.to_thread(llm.load)
            encoder = cam_ = None
            if enc is not None:
                enc.load()
                encoder = CountingEncoder(enc)
                cam_ = components.camera(cfg, None)
                cam_.open()
            transcript = TranscriptWriter(d / "turns.jsonl", cfg.transcript)
            conv = Conversation(cfg, llm, scene=Scene(cam_, encoder, cfg.vision),
                                transcript=transcript, gate=make_gate(cfg))
            parts = SimpleNamespace(asr=None, voices=None)
            wy = WyomingServer(cfg, conv, parts)
            await wy.start()
            http = HttpServer(cfg, conv, parts)
            await http.start()
            return llm, encoder, cam_, transcript, conv, wy, http

        (self.llm, self.encoder, self.camera, self.transcript, self.conv, self.wyoming,
         self.http) = self.loop.run(build(), timeout=300)
        load_history = self.llm.load_history

        def spy(pairs):
            load_history(pairs)
            self.loads.append(list(pairs))      # what the model holds now (not a refusal)
        self.llm.load_history = spy

    def close(self) -> None:
        self.loop.run(self.wyoming.stop())
        self.loop.run(self.http.stop())
        self.conv.scene.close()
        for part in (self.encoder, self.llm, self.camera):
            if part is not None:
                part.close()
        self.transcript.close()
        self.loop.close()

    # ------------------------------------------------------------------ clients

    @property
    def store(self):
        return self.wyoming.services.store

    def ask(self, text: str, cid: Optional[str] = None, language: Optional[str] = "en"):
        """Home Assistant's question: (event type, text, the conversation id answered)."""
        async def go():
            async with AsyncTcpClient("127.0.0.1", self.wyoming.port) as c:
                ctx = {"conversation_id": cid} if cid else None
                await c.write_event(Transcript(text, context=ctx, language=language).event())
                while True:
                    e = await asyncio.wait_for(c.read_event(), 120)
                    assert e is not None, "the server closed the connection"
                    if e.type in ("handled", "not-handled"):
                        return (e.type, e.data["text"],
                                (e.data.get("context") or {}).get("conversation_id"))
        return asyncio.run(go())

    def chat(self, messages: list[dict], model: str = "rkvlm") -> tuple[int, dict]:
        """An HTTP chat completion: (status, body)."""
        req = urllib.request.Request(
            self.http.url + "/v1/chat/completions", method="POST",
            data=json.dumps({"model": model, "messages": messages}).encode(),
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def voice(self, question: str, use_camera: bool = False) -> Turn:
        """A question of the person in the room (the voice conversation): its turn."""
        async def go():
            turn = Turn()
            async for _ in self.conv.ask(Request(question, use_camera=use_camera), turn):
                pass
            return turn
        return self.loop.run(go())

    def rows(self, n: int) -> list[dict]:
        """The transcript's rows once there are ``n`` (its writer is a thread)."""
        path = self.dir / "turns.jsonl"
        end = time.monotonic() + 10
        got: list = []
        while time.monotonic() < end:
            got = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
            if len(got) >= n:
                break
            time.sleep(0.05)
        return got

    def held(self) -> list[tuple[str, str]]:
        """The (question, answer) pairs the model's context holds, as text."""
        msgs = [m for m in self.llm._messages if m["role"] != "system"]
        text = [m["content"] if isinstance(m["content"], str) else
                " ".join(p["text"] for p in m["content"] if p.get("type") == "text")
                for m in msgs]
        return list(zip(text[0::2], text[1::2]))
