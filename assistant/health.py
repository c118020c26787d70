"""Deadlines for the blocking native calls: a stuck stage is a restart, not a silent hang.

Every blocking call into a native runtime (whisper, the vision encoder, the LLM, piper)
runs in a worker thread, so the event loop, and with it the systemd watchdog ping, carries
on while it runs. A call that never returns would leave the assistant deaf while systemd
thinks all is well. So each such call is *watched*: it is registered here with its stage,
start time and deadline (``deadlines:`` in the config) while its thread is inside it.

- Past the deadline, the caller stops waiting: the LLM turn is aborted, the others are left
  to finish on their own, and the turn is apologised for (``StageOverrun``).
- Past the deadline plus ``deadlines.abort_grace_s`` with the call still inside the native
  code, the call is *stuck*: ``Health.stuck`` names it, and the daemon's watchdog loop stops
  pinging systemd, flushes the transcript and exits 70 (EX_SOFTWARE) so systemd restarts
  the service. A thread stuck in native code cannot be stopped from Python, and it would
  block a normal interpreter exit too.

A hang that is not inside a native call (an await that never ends, a device write that
never returns) is caught by the voice loop's own progress check, ``Pipeline.stalled``, with
``Health.stall_limit``: the daemon's watchdog loop exits 70 for it too.

One registry, ``HEALTH``, serves the process; the daemon configures it from the config and
consults it from its watchdog loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator, Optional

from assistant.config import DeadlinesConfig
from assistant.errors import BackendError

log = logging.getLogger(__name__)

EX_SOFTWARE = 70  # sysexits.h: internal software error (a stuck native call)

# Past the longest deadline and its grace, what a voice turn may still wait without a sign
# of progress: the longest chunk of speech playing (a whole sentence from a voice that does
# not stream).
STALL_MARGIN_S = 30.0

# stage -> (what it is, in words; its deadline key)
STAGES = {
    "asr": ("speech recognition", "asr_s"),
    "llm_first_piece": ("the language model's first piece", "llm_first_piece_s"),
    "llm": ("the language model", "llm_s"),
    "encode": ("the image encoder", "encode_s"),
    "tts": ("speech synthesis", "tts_s"),
}


class StageOverrun(BackendError):
    """A stage passed its deadline; the caller stopped waiting (and aborted what it could)."""

    def __init__(self, stage: str, seconds: float, key: Optional[str] = None):
        what, default_key = STAGES.get(stage, (stage, stage))
        self.stage = stage
        self.seconds = seconds
        self.key = key or default_key
        super().__init__(f"{stage} stage overran: {what} did not finish within {seconds:g} s "
                         f"(deadlines.{self.key}); the turn was given up")


class Watch:
    """One native call in progress: its stage, start and current deadline."""

    def __init__(self, stage: str, limit_s: float, what: str = ""):
        self.stage = stage
        self.limit_s = limit_s                  # seconds from start (may be changed, see llm)
        self.key = STAGES.get(stage, (stage, stage))[1]
        self.what = what
        self.started: Optional[float] = None    # monotonic; None until the call starts
        self.thread: Optional[str] = None
        self.given_up = False                    # the caller stopped waiting

    @property
    def running(self) -> bool:
        return self.started is not None

    def elapsed(self, now: Optional[float] = None) -> float:
        if self.started is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.started

    def remaining(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds left before the deadline; None while the call has not started."""
        if self.started is None:
            return None
        return self.limit_s - self.elapsed(now)

    def set_limit(self, stage: str, limit_s: float) -> None:
        """Move to another deadline (the LLM: first piece, then the whole turn)."""
        self.stage, self.limit_s = stage, limit_s
        self.key = STAGES.get(stage, (stage, stage))[1]

    def overrun(self) -> StageOverrun:
        return StageOverrun(self.stage, self.limit_s, self.key)

    def __repr__(self) -> str:
        return (f"Watch({self.stage}, {self.elapsed():.1f} s of {self.limit_s:g} s"
                f"{', given up' if self.given_up else ''})")


class Health:
    """The registry of watched native calls."""

    def __init__(self, deadlines: DeadlinesConfig = DeadlinesConfig()):
        self.deadlines = deadlines
        self._lock = threading.Lock()
        self._running: list[Watch] = []

    def configure(self, deadlines: DeadlinesConfig) -> None:
        """New deadlines for calls that start from now on (and the grace for all)."""
        self.deadlines = deadlines

    @property
    def grace_s(self) -> float:
        return self.deadlines.abort_grace_s

    def limit(self, stage: str) -> float:
        return float(getattr(self.deadlines, STAGES[stage][1]))

    def stall_limit(self) -> float:
        """How long the voice loop may show no progress in a turn before it counts as
        stuck: the longest deadline (a voice turn may wait that long behind another turn),
        its grace, and one chunk of speech playing."""
        return max(self.limit(s) for s in STAGES) + self.grace_s + STALL_MARGIN_S

    # ------------------------------------------------------------------ registration

    def begin(self, watch: Watch) -> Watch:
        """The watched call starts now (in the thread that makes it)."""
        watch.started = time.monotonic()
        watch.thread = threading.current_thread().name
        with self._lock:
            self._running.append(watch)
        return watch

    def end(self, watch: Watch) -> None:
        """The watched call returned (or raised)."""
        with self._lock:
            if watch in self._running:
                self._running.remove(watch)

    @contextlib.contextmanager
    def watch(self, stage: str, limit_s: Optional[float] = None, what: str = "") -> Iterator[Watch]:
        """Register the blocking call made inside the block (in its own thread)."""
        w = self.begin(Watch(stage, self.limit(stage) if limit_s is None else limit_s, what))
        try:
            yield w
        finally:
            self.end(w)

    def running(self) -> list[Watch]:
        with self._lock:
            return list(self._running)

    def stuck(self, now: Optional[float] = None) -> Optional[Watch]:
        """A call past its deadline and the grace after it, still inside native code."""
        now = time.monotonic() if now is None else now
        grace = self.grace_s
        for w in self.running():
            if w.started is not None and w.elapsed(now) > w.limit_s + grace:
                return w
        return None

    # ------------------------------------------------------------------ calls

    async def call(self, stage: str, fn: Callable[..., Any], *args: Any,
                   limit_s: Optional[float] = None) -> Any:
        """``fn(*args)`` in a worker thread, watched; StageOverrun past the deadline.

        The thread is left to finish on its own (it stays watched: if it never returns,
        the daemon restarts). Cancelling the caller also stops waiting for it.
        """
        w = Watch(stage, self.limit(stage) if limit_s is None else limit_s)

        def run() -> Any:
            self.begin(w)
            try:
                return fn(*args)
            finally:
                self.end(w)

        fut = asyncio.get_running_loop().run_in_executor(None, run)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), w.limit_s)
        except asyncio.TimeoutError:
            w.given_up = True
            # The thread's eventual outcome is nobody's business now; do not warn about it.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            log.error("%s: still running after %.1f s; no longer waiting for it",
                      STAGES.get(stage, (stage,))[0], w.elapsed())
            raise w.overrun() from None

    def call_blocking(self, stage: str, fn: Callable[..., Any], *args: Any,
                      limit_s: Optional[float] = None) -> Any:
        """``call`` for code already on a worker thread: ``fn`` runs on a helper thread
        that is waited for until the deadline; StageOverrun past it."""
        w = Watch(stage, self.limit(stage) if limit_s is None else limit_s)
        box: dict = {}
        done = threading.Event()

        def run() -> None:
            self.begin(w)
            try:
                box["result"] = fn(*args)
            except BaseException as e:
                box["error"] = e
            finally:
                self.end(w)
                done.set()

        threading.Thread(target=run, name=f"{stage}-call", daemon=True).start()
        if not done.wait(w.limit_s):
            w.given_up = True
            log.error("%s: still running after %.1f s; no longer waiting for it",
                      STAGES.get(stage, (stage,))[0], w.elapsed())
            raise w.overrun()
        if "error" in box:
            raise box["error"]
        return box.get("result")


HEALTH = Health()
