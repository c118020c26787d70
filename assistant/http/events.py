"""The page's live view: every front-end's turns and the assistant's state, as they happen.

``Hub`` listens to the conversation (every turn of every front-end) and to the voice output
(speaking or not), and streams both as server-sent events on ``GET /events``.
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Callable, Optional

from aiohttp import web

from assistant.conversation import Conversation
from assistant.turn import Turn

# Turns the page gets when it (re)connects.
_RECENT_TURNS = 50
# Events a slow page may fall behind by before it is dropped (it reconnects).
_CLIENT_QUEUE = 2000
_HEARTBEAT_S = 15.0
_STATE_POLL_S = 0.2


class Hub:
    """Turns and state for the page: every front-end's turns, as they happen."""

    def __init__(self, conversation: Conversation, voice=None, has_mic: bool = False):
        self.conversation = conversation
        self.voice = voice                          # VoiceOut (its .speaking), or None
        self.idle = "listening" if has_mic else "ready"
        self.recent: collections.deque[dict] = collections.deque(maxlen=_RECENT_TURNS)
        self.active: dict[int, dict] = {}
        self.state = self.idle
        self.idle_state: Optional[Callable[[], str]] = None   # the voice loop's, when it waits for a wake
        self._clients: set[asyncio.Queue] = set()
        self._unsubscribe = None
        self._poll: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._unsubscribe = self.conversation.subscribe(self._on_event)
        if self.voice is not None:
            self._poll = asyncio.get_running_loop().create_task(self._watch_voice())

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)
        for q in list(self._clients):
            self._put(q, None)                     # each event stream ends

    # -- sources

    def _on_event(self, event: str, turn: Turn, data: dict) -> None:
        if event == "question":
            row = {"id": turn.id, "source": turn.source, "question": data.get("text", ""),
                   "answer": "", "image": False, "done": False, "time": turn.wall_time}
            self.active[turn.id] = row
            self.publish({"type": "question", **row})
        elif event == "piece":
            row = self.active.get(turn.id)
            if row is not None:
                row["answer"] += data.get("text", "")
            self.publish({"type": "piece", "id": turn.id, "text": data.get("text", "")})
        elif event == "done":
            row = self.active.pop(turn.id, None) or {"id": turn.id, "source": turn.source,
                                                     "question": turn.transcript}
            row.update(answer=data.get("answer", ""), image=turn.with_image, done=True,
                       finish=turn.finish, note=turn.note)
            self.recent.append(row)
            self.publish({"type": "done", **row})
        elif event == "timings":
            # After the turn (its first sound is known then): the page's bar of its wait.
            for row in self.recent:
                if row["id"] == turn.id:
                    row["stages"] = data["stages"]
            self.publish({"type": "timings", "id": turn.id, "stages": data["stages"]})
        self._update_state()

    async def _watch_voice(self) -> None:
        while True:
            await asyncio.sleep(_STATE_POLL_S)
            self._update_state()

    def _update_state(self) -> None:
        if self.voice is not None and getattr(self.voice, "speaking", False):
            state = "speaking"
        elif self.active:
            state = "thinking"
        else:
            state = self.idle_state() if self.idle_state is not None else self.idle
        if state != self.state:
            self.state = state
            self.publish({"type": "state", "state": state})

    # -- clients

    def publish(self, event: dict) -> None:
        for q in list(self._clients):
            self._put(q, event)

    def _put(self, q: asyncio.Queue, event: Optional[dict]) -> None:
        try:
            q.put_nowait(event)
        except asyncio.QueueFull:
            # Too far behind: end its stream; the page reconnects and gets the recent turns.
            self._clients.discard(q)
            while not q.empty():
                q.get_nowait()
            q.put_nowait(None)

    def snapshot(self) -> dict:
        turns = list(self.recent) + [dict(r) for r in self.active.values()]
        return {"type": "hello", "state": self.state, "turns": turns,
                "camera": self.conversation.scene is not None
                and self.conversation.scene.camera is not None}

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue(maxsize=_CLIENT_QUEUE)
        self._clients.add(q)
        try:
            await resp.write(_sse(self.snapshot()))
            while True:
                try:
                    event = await asyncio.wait_for(q.get(), _HEARTBEAT_S)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if event is None:
                    break
                await resp.write(_sse(event))
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self._clients.discard(q)
        return resp


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode("utf-8", "replace")
