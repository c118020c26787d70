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
from typing import TYPE_CHECKING, AsyncIterator, Callable, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from assistant.config import DeadlinesConfig, PersonaConfig


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


@dataclass(frozen=True)
class TurnOptions:
    """Per-turn overrides of the configured generation settings (None: the configured one)."""

    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None


# (question, answer) as text: what load_history feeds back into the context.
Exchange = tuple[str, str]

# Chat-template tokens around a turn (role markers, newlines) that count_tokens does not see;
# for backends that cannot render the template themselves.
TEMPLATE_OVERHEAD = 16

# How long close() waits for a running native call to stop after aborting it; past that the
# model is left to the process's exit (SIGTERM must end the service within seconds).
CLOSE_WAIT_S = 2.0


class LLMBackend(ABC):
    """One multimodal LLM with its conversation kept in the KV cache."""

    name: str = "?"
    answer_reserve: int = 256       # tokens kept free for an answer (llm.max_new_tokens)

    @abstractmethod
    def load(self) -> None:
        """Load the model (slow, blocking; called in a worker thread)."""

    @abstractmethod
    def run_turn(self, text: str, image: Optional[ImageEmbedding], keep_history: bool,
                 on_piece: Callable[[str], None],
                 options: Optional[TurnOptions] = None) -> TurnStats:
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

    @abstractmethod
    def load_history(self, exchanges: Sequence[Exchange]) -> None:
        """Make the context hold exactly the system prompt and these exchanges, as text.

        Used by compaction (the most recent exchanges only), after a barge-in (the answer cut
        to what was spoken) and when another front-end's conversation used the model. A
        backend may evaluate them at once or with the next turn; ``tokens_used`` counts them
        either way.
        """

    def prefill(self, image: ImageEmbedding) -> bool:
        """Evaluate the opening of the next user turn with ``image`` ahead of its question
        (while the person is still talking). False: this backend cannot, or not now."""
        return False

    def cancel_prefill(self) -> None:
        """Drop a prefill the next turn will not use."""

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` would take; a rough estimate unless the backend knows better."""
        return max(1, len(text.encode("utf-8")) // 3)

    def turn_cost(self, text: str, image: Optional[ImageEmbedding] = None) -> int:
        """Context the next turn needs: its question, image and template, plus the answer
        reserve. Backends that can render their template count it exactly."""
        n = self.count_tokens(text) + TEMPLATE_OVERHEAD + self.answer_reserve
        return n + (image.n_tokens + 4 if image is not None else 0)

    def history_cost(self, exchanges: Sequence[Exchange]) -> int:
        """Context these exchanges take when fed back as text."""
        return sum(self.count_tokens(q) + self.count_tokens(a) + TEMPLATE_OVERHEAD
                   for q, a in exchanges)

    def set_persona(self, persona: "PersonaConfig") -> None:
        """Use a new system prompt from now on (a SIGHUP reload), without reloading the model.

        This forgets the conversation: the context is rebuilt on the new system prompt, and
        the caller must forget its record of the conversation too. Backends that keep the
        system prompt in their cache override this; the default cannot and says so.
        """
        from assistant.errors import BackendError

        raise BackendError(f"the {self.name} backend cannot change its system prompt "
                           f"without a restart")

    def close(self) -> None:
        """Abort a running turn and release the model (idempotent); returns within about
        CLOSE_WAIT_S even when the runtime does not stop."""


_DONE = object()
_STARTED = object()


async def stream_turn(backend: LLMBackend, text: str, image: Optional[ImageEmbedding],
                      keep_history: bool, stats_out: Optional[list] = None,
                      lock: Optional[threading.Lock] = None,
                      options: Optional[TurnOptions] = None,
                      deadlines: Optional["DeadlinesConfig"] = None) -> AsyncIterator[str]:
    """Run a turn in a worker thread and yield its pieces on the loop.

    Pieces cross threads with ``call_soon_threadsafe`` into an asyncio queue: no polling.
    If the consumer stops early (cancellation, barge-in), the turn is aborted and waited for,
    so the backend is never entered by two turns at once. The TurnStats land in stats_out.

    With ``deadlines`` the runtime call is watched (``assistant.health``) from the moment it
    holds the lock: no first piece within ``llm_first_piece_s``, or no end within ``llm_s``,
    aborts the turn and raises ``StageOverrun``. The runtime thread is then not waited for
    (the lock keeps the next turn out until it returns); if it never returns, the daemon's
    watchdog loop restarts the service.
    """
    from assistant.health import HEALTH, Watch

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    watch: Optional[Watch] = None
    if deadlines is not None:
        first = min(deadlines.llm_first_piece_s, deadlines.llm_s)
        watch = Watch("llm_first_piece" if first < deadlines.llm_s else "llm", first)

    def piece(p: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, p)

    def run() -> TurnStats:
        kwargs = {"options": options} if options is not None else {}
        if watch is None:
            return backend.run_turn(text, image, keep_history, piece, **kwargs)
        HEALTH.begin(watch)
        loop.call_soon_threadsafe(queue.put_nowait, _STARTED)
        try:
            return backend.run_turn(text, image, keep_history, piece, **kwargs)
        finally:
            HEALTH.end(watch)

    def work() -> None:
        try:
            if lock is not None:
                with lock:
                    st = run()
            else:
                st = run()
            loop.call_soon_threadsafe(queue.put_nowait, (_DONE, st))
        except BaseException as e:  # handed to the loop, re-raised there
            loop.call_soon_threadsafe(queue.put_nowait, (_DONE, e))

    fut = loop.run_in_executor(None, work)
    finished = overran = got_piece = False
    try:
        while True:
            left = watch.remaining() if watch is not None else None
            if left is None or not queue.empty():
                item = await queue.get()
            else:
                # Not wait_for: before Python 3.12 it swallows a cancellation that comes
                # with a piece (a client that hangs up would go unnoticed).
                getter = asyncio.ensure_future(queue.get())
                try:
                    done, _ = await asyncio.wait({getter}, timeout=max(left, 0.0))
                except BaseException:
                    getter.cancel()
                    raise
                if not done:
                    getter.cancel()
                    overran = watch.given_up = True
                    raise watch.overrun()
                item = getter.result()
            if item is _STARTED:
                continue
            if isinstance(item, tuple) and item and item[0] is _DONE:
                finished = True
                if isinstance(item[1], BaseException):
                    raise item[1]
                if stats_out is not None:
                    stats_out.append(item[1])
                return
            if watch is not None and not got_piece:
                got_piece = True
                watch.set_limit("llm", deadlines.llm_s)
            yield item
    finally:
        if not finished:
            backend.abort()
        if overran:
            # Not waited for: a runtime that ignores the abort must not hold the turn; its
            # outcome is dropped.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        else:
            await asyncio.shield(fut)
