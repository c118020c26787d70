"""The LLM interface every backend implements, and the async bridge the pipeline uses.

A backend runs one turn at a time, blocking, in a worker thread: ``run_turn`` calls
``on_piece`` with each piece of text as it is generated (from whatever thread the native
runtime uses). ``abort`` may be called from any thread and ends the running turn within one
token. ``stream_turn`` wraps this for the asyncio loop.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

import numpy as np


@dataclass
class ImageEmbedding:
    """An encoded image, ready to feed to the LLM.

    ``data`` is float32 (n_tokens, dim). ``width``/``height`` are the encoder's input size.
    ``native`` carries what a backend needs besides the floats (for llama.cpp, the mtmd
    chunk with its position layout); other backends ignore it.
    """

    data: np.ndarray
    width: int
    height: int
    native: object = None

    @property
    def n_tokens(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])


@dataclass
class TurnStats:
    """What one turn cost; backends fill what they know, timings in milliseconds."""

    prompt_tokens: int = 0          # tokens evaluated for this turn (text + image)
    generated_tokens: int = 0
    prefill_ms: float = 0.0
    generate_ms: float = 0.0
    context_used: int = 0           # tokens in the context after the turn
    aborted: bool = False
    extra: dict = field(default_factory=dict)


class LLMBackend(ABC):
    """One multimodal LLM with its conversation kept in the KV cache."""

    name: str = "?"

    @abstractmethod
    def load(self) -> None:
        """Load the model (slow, blocking; called in a worker thread)."""

    @abstractmethod
    def run_turn(self, text: str, image: Optional[ImageEmbedding], keep_history: bool,
                 on_piece: Callable[[str], None]) -> TurnStats:
        """Run one user turn and stream the answer through on_piece. Blocking.

        With keep_history, the turn is appended to the conversation in the KV cache;
        without it, the cache is reset to the system prompt first. Raises ContextFullError
        when the turn cannot fit, BackendError on a runtime failure.
        """

    @abstractmethod
    def abort(self) -> None:
        """Stop the running turn as soon as possible (thread-safe; no-op when idle)."""

    @abstractmethod
    def clear(self) -> None:
        """Forget the conversation: only the system prompt stays in the cache."""

    @property
    @abstractmethod
    def context_size(self) -> int:
        """Tokens the context holds in all."""

    @property
    @abstractmethod
    def tokens_used(self) -> int:
        """Tokens the conversation currently occupies."""

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` would take; a rough estimate unless the backend knows better."""
        return max(1, len(text.encode("utf-8")) // 3)

    def close(self) -> None:
        """Release the model (idempotent)."""


_DONE = object()


async def stream_turn(backend: LLMBackend, text: str, image: Optional[ImageEmbedding],
                      keep_history: bool, stats_out: Optional[list] = None,
                      lock: Optional[threading.Lock] = None) -> AsyncIterator[str]:
    """Run a turn in a worker thread and yield its pieces on the loop.

    Pieces cross threads with ``call_soon_threadsafe`` into an asyncio queue: no polling.
    If the consumer stops early (cancellation, barge-in), the turn is aborted and waited for,
    so the backend is never entered by two turns at once. The TurnStats land in stats_out.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def work() -> None:
        try:
            if lock is not None:
                with lock:
                    st = backend.run_turn(text, image, keep_history,
                                          lambda p: loop.call_soon_threadsafe(queue.put_nowait, p))
            else:
                st = backend.run_turn(text, image, keep_history,
                                      lambda p: loop.call_soon_threadsafe(queue.put_nowait, p))
            loop.call_soon_threadsafe(queue.put_nowait, (_DONE, st))
        except BaseException as e:  # handed to the loop, re-raised there
            loop.call_soon_threadsafe(queue.put_nowait, (_DONE, e))

    fut = loop.run_in_executor(None, work)
    finished = False
    try:
        while True:
            item = await queue.get()
            if isinstance(item, tuple) and item and item[0] is _DONE:
                finished = True
                if isinstance(item[1], BaseException):
                    raise item[1]
                if stats_out is not None:
                    stats_out.append(item[1])
                return
            yield item
    finally:
        if not finished:
            backend.abort()
        await asyncio.shield(fut)
