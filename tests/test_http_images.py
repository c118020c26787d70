"""A chat request's picture is its last user message's: the one the model receives.

The encoder is a recording double (what it was given is the point of the test); the model is
the scripted one, which keeps every turn's image. Red, green and blue pictures tell apart
which message's picture went through.
"""

from __future__ import annotations

import asyncio
import base64
import time

import cv2
import numpy as np
import pytest

from assistant.llm.base import ImageEmbedding
from assistant.vision.scene import Scene
from test_http_support import EchoLLM, in_process

openai = pytest.importorskip("openai")

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class RecordingEncoder:
    """Encodes a picture to 4 tokens holding its mean colour, and remembers each one."""

    name = "recording"

    def __init__(self):
        self.seen: list[str] = []
        self.running = 0
        self.most = 0              # encodes at once

    def load(self) -> None:
        pass

    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        self.running += 1
        self.most = max(self.most, self.running)
        time.sleep(0.05)           # long enough for requests to overlap
        self.running -= 1
        colour = colour_of(rgb.reshape(-1, 3).mean(axis=0))
        self.seen.append(colour)
        data = np.tile(np.array(COLOURS[colour], np.float32), (4, 1))
        return ImageEmbedding(data, rgb.shape[1], rgb.shape[0])

    def close(self) -> None:
        pass


def colour_of(mean) -> str:
    return min(COLOURS, key=lambda c: float(np.abs(np.array(COLOURS[c]) - mean).sum()))


def picture(colour: str) -> dict:
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[:] = COLOURS[colour]
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    url = "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str, *colours: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [picture(c) for c in colours]}


@pytest.fixture(scope="module")
def server():
    encoder = RecordingEncoder()
    llm = EchoLLM(words=2)
    from assistant.config import Config

    s = in_process(llm, scene=Scene(None, encoder, Config().vision))
    s.encoder = encoder
    s.client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield s
    s.close()


def received(s) -> str | None:
    image = s.llm.calls[-1]["image"]
    return None if image is None else colour_of(image.data[0])


@pytest.mark.parametrize("messages, want", [
    # A picture in each user message: the newest one's.
    ([user("first: this?", "red"), {"role": "assistant", "content": "A red one."},
      user("second: and this?", "blue")], "blue"),
    # Three of them, the newest in the middle of its message's parts.
    ([user("one: look", "green"), {"role": "assistant", "content": "Green."},
      user("two: look", "red"), {"role": "assistant", "content": "Red."},
      {"role": "user", "content": [{"type": "text", "text": "three: and"}, picture("blue"),
                                   {"type": "text", "text": "this one?"}]}], "blue"),
    # Two user messages in a row at the end are one question: the last one's picture.
    ([user("first: this", "red"), user("second: or this?", "green")], "green"),
    # An earlier message's picture is dropped when the newest has none (its text stays).
    ([user("first: this?", "red"), {"role": "assistant", "content": "Red."},
      user("second: what colour was it?")], None),
], ids=["two turns", "three turns", "a run of user messages", "none in the newest"])
def test_the_model_gets_the_last_user_messages_picture(server, messages, want):
    seen = len(server.encoder.seen)
    r = server.client.chat.completions.create(model="rkvlm", messages=messages)
    assert r.choices[0].message.content.startswith("reply to")
    assert received(server) == want
    # Only that one picture was decoded and encoded.
    assert server.encoder.seen[seen:] == ([want] if want else [])
    # The earlier messages are the history, as text; the trailing user ones the question.
    texts = [text_of(m) for m in messages]
    roles = [m["role"] for m in messages]
    first_of_question = max(i for i, role in enumerate(roles) if role == "assistant") + 1 \
        if "assistant" in roles else 0
    assert server.llm.calls[-1]["text"] == "\n".join(texts[first_of_question:])
    assert server.llm.histories[-1] == [(texts[i - 1], texts[i]) for i, role in enumerate(roles)
                                        if role == "assistant"]


def text_of(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p["type"] == "text")


def test_pictures_are_decoded_and_encoded_one_at_a_time(server):
    """Six requests with pictures at once: one decode and encode at a time (a big picture
    takes tens of megabytes decoded), each answered with its own picture."""
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                timeout=60)
    colours = ["red", "green", "blue"] * 2

    async def ask(i: int, colour: str) -> str:
        r = await client.chat.completions.create(
            model="rkvlm", messages=[user(f"q{i}: which colour?", colour)])
        return r.choices[0].message.content

    async def everything():
        return await asyncio.gather(*(ask(i, c) for i, c in enumerate(colours)))

    answers = asyncio.run(everything())
    assert [a.split()[2] for a in answers] == [f"q{i}" for i in range(6)]
    assert server.encoder.most == 1
    assert sorted(server.encoder.seen[-6:]) == sorted(colours)
