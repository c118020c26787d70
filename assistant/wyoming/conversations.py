"""Home Assistant's conversations, kept by their ids.

Home Assistant sends only the new sentence and a ``conversation_id``; the exchanges before
it are ours to keep. Each id keeps its newest exchanges, and the whole store is bounded in
ids (the least recently used goes first) and in age (an id not heard from for
``conversation_max_age_s`` is forgotten). Nothing here touches the voice conversation: an
id's exchanges go to the model as a stateless request's history, as the HTTP API's do.

Turns of one id run one after another (its lock), so a question sent while the previous
one is still answered builds on that answer.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from assistant.config import WyomingConfig


@dataclass
class Thread:
    """One conversation id's exchanges (question, answer), oldest first."""

    id: str
    exchanges: collections.deque
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def history(self) -> list[tuple[str, str]]:
        return list(self.exchanges)

    def add(self, question: str, answer: str) -> None:
        self.exchanges.append((question, answer))


class ConversationStore:
    def __init__(self, cfg: WyomingConfig, clock: Callable[[], float] = time.monotonic):
        self.max_ids = cfg.conversations
        self.max_age_s = cfg.conversation_max_age_s
        self.max_exchanges = cfg.conversation_max_exchanges
        self.clock = clock
        self._threads: collections.OrderedDict[str, Thread] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._threads)

    def __contains__(self, cid: str) -> bool:
        return cid in self._threads

    def get(self, cid: str | None) -> Thread:
        """The id's conversation (a new one for an unknown or missing id)."""
        now = self.clock()
        self._expire(now)
        if not cid:
            cid = "wyoming-" + uuid.uuid4().hex[:12]
        thread = self._threads.get(cid)
        if thread is None:
            thread = Thread(cid, collections.deque(maxlen=self.max_exchanges), now)
            self._threads[cid] = thread
        thread.last_used = now
        self._threads.move_to_end(cid)
        self._trim()
        return thread

    def _expire(self, now: float) -> None:
        for cid in [c for c, t in self._threads.items()
                    if now - t.last_used > self.max_age_s and not t.lock.locked()]:
            del self._threads[cid]

    def _trim(self) -> None:
        # Least recently used first; a conversation with a turn running stays, and so does
        # the one just asked for (the last).
        for cid in list(self._threads)[:-1]:
            if len(self._threads) <= self.max_ids:
                return
            if not self._threads[cid].lock.locked():
                del self._threads[cid]
