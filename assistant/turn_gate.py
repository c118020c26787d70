"""The turn gate: one model turn at a time, for every front-end, the person in the room first.

Waiters are served by priority (``Priority.VOICE`` before ``Priority.TEXT``), then by arrival;
the queue of text requests is bounded and a request that cannot get a turn in time is refused
with ``Busy`` (its ``retry_after`` says when to try again).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from enum import IntEnum
from typing import Optional

from assistant.errors import AssistantError


class Priority(IntEnum):
    VOICE = 0          # the person in the room: never refused, first in line
    TEXT = 1           # HTTP requests and typed questions


class Busy(AssistantError):
    """No turn could be had: the queue is full or the wait passed its limit."""

    exit_code = 69

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after



class TurnGate:
    """One turn at a time; waiters served by priority, then arrival."""

    def __init__(self, max_waiting: int = 8, max_wait_s: float = 120.0):
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self._busy = False
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for *_, f in self._waiters if not f.done())

    @contextlib.asynccontextmanager
    async def slot(self, priority: Priority, max_wait_s: Optional[float] = None):
        await self._acquire(priority, self.max_wait_s if max_wait_s is None else max_wait_s)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: Priority, max_wait_s: float) -> None:
        if not self._busy and not self._waiters:
            self._busy = True
            return
        if priority != Priority.VOICE and self.waiting >= self.max_waiting:
            raise Busy(f"{self.waiting} requests are already waiting for the model; "
                       f"try again shortly", retry_after=5.0)
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (int(priority), next(self._seq), fut))
        try:
            if priority == Priority.VOICE:
                await fut
            else:
                await asyncio.wait_for(asyncio.shield(fut), max_wait_s)
        except asyncio.TimeoutError:
            if fut.done() and not fut.cancelled():
                return                    # handed the slot at the last moment
            fut.cancel()
            raise Busy(f"the model was busy for {max_wait_s:.0f} s; try again shortly",
                       retry_after=max(1.0, max_wait_s / 4)) from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()           # handed the slot as we gave up: pass it on
            else:
                fut.cancel()
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)     # the slot passes straight to it
                return
        self._busy = False
