"""What every front-end on the conversation shares: the HTTP API and the Wyoming server.

A front-end (not the voice loop) turns its protocol into three calls:

- ``check_size(question, history, size_limits(cfg))``: a stateless request's size, bounded
  before anything is tokenised (``TooLarge`` names the part at fault);
- ``answer(conversation, request, turn)``: the answer's pieces, queued behind the person in
  the room (the conversation's turn gate), with the request's own history (``Request.history``:
  the conversation feeds it back when the model holds something else). Whatever happens the
  turn is recorded once: one log line and one transcript row. A consumer that stops early
  (a client that hung up) makes the row ``interrupted`` with the note ``client
  disconnected``, and the conversation marks what the model holds as unknown, so the next
  turn feeds its own history back instead of running on top of the cut one;
- ``MediaWork.run(stage, fn, ...)``: speech synthesis and transcription on a small pool of
  threads of their own (they never take the threads the model's turns and the voice loop
  use), queued like chat turns (``Busy`` past the queue or the wait limit) and watched
  against a deadline (``StageOverrun``; a call that never returns restarts the service, as
  every watched native call does). The process has one (``media_work(cfg)``, made by
  ``run`` and ``serve`` and handed to both front-ends), so HTTP's and Home Assistant's
  speech work wait in one line for the same workers.

``voice_names`` is how both name the configured piper voices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable, Optional, Sequence, TypeVar

from assistant.conversation import Busy, Conversation, Request
from assistant.errors import AssistantError, DeviceError, InputError
from assistant.health import HEALTH, Watch
from assistant.turn import Turn

log = logging.getLogger(__name__)

HUNG_UP = "client disconnected"

T = TypeVar("T")


# ---------------------------------------------------------------------------- size

@dataclass(frozen=True)
class Limits:
    """How big one stateless request may be (``http.max_*``)."""

    question_chars: int
    history: int           # exchanges before the question
    chars: int             # every message's text together


def size_limits(cfg) -> Limits:
    """The limits of ``cfg`` (read per request: SIGHUP may replace the config)."""
    h = cfg.http
    return Limits(h.max_question_chars, h.max_history, h.max_chars)


class TooLarge(InputError):
    """A request past a size limit; ``part`` is "question" or "history"."""

    def __init__(self, message: str, part: str):
        super().__init__(message)
        self.part = part


def check_size(question: str, history: Sequence[tuple[str, str]], limits: Limits,
               other_chars: int = 0) -> None:
    """TooLarge when the question, the number of exchanges or all the text together is
    past its limit. ``other_chars``: text the request carries besides these (a system
    message the persona replaces still had to be sent and read)."""
    if len(question) > limits.question_chars:
        raise TooLarge(f"the question is {len(question)} characters; the limit is "
                       f"{limits.question_chars} (http.max_question_chars)", "question")
    if len(history) > limits.history:
        raise TooLarge(f"the request holds {len(history)} exchanges before the question; the "
                       f"limit is {limits.history} (http.max_history): send only the newest",
                       "history")
    total = len(question) + other_chars + sum(len(q) + len(a) for q, a in history)
    if total > limits.chars:
        raise TooLarge(f"the messages hold {total} characters together; the limit is "
                       f"{limits.chars} (http.max_chars): send a shorter history", "history")


def text_problem(text: str) -> Optional[tuple[int, str]]:
    """(where, what) of the first NUL or lone surrogate in ``text``; None when clean. Neither
    is text a model, piper or the transcript should get, whatever the protocol."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return e.start, f"a lone surrogate ({ascii(text[e.start])[1:-1]}), which is not text"
    at = text.find("\x00")
    return (at, "a NUL character (\\u0000)") if at >= 0 else None


# ---------------------------------------------------------------------------- turns

async def answer(conv: Conversation, req: Request, turn: Turn,
                 conversation_id: Optional[str] = None) -> AsyncIterator[str]:
    """The answer's pieces; the turn logged and recorded when it ends, however it ends.

    ``conversation_id``: what the row names as its conversation (a front-end that keeps
    its clients' conversations itself, e.g. ``wyoming:<id>``); default, the conversation's.
    A refused turn (``Busy``) is no turn: no row."""
    turn.intent = turn.intent or "question"
    turn.transcript = turn.transcript or req.question
    busy = False
    try:
        async with contextlib.aclosing(conv.ask(req, turn)) as pieces:
            async for piece in pieces:
                yield piece
    except Busy:
        busy = True             # no turn was had: nothing to record
        raise
    except (GeneratorExit, asyncio.CancelledError):
        turn.interrupted = True
        turn.note = HUNG_UP
        raise
    except AssistantError as e:
        turn.note = turn.note or str(e)
        raise
    finally:
        if not busy:
            if conversation_id is not None:
                turn.conversation = conversation_id
            turn.mark("done")
            turn.log_line()
            conv.record(turn)


# ---------------------------------------------------------------------------- servers

async def started(server: T, required: bool, without: str) -> Optional[T]:
    """``server`` after ``await server.start()``. With ``required=False`` (``run``: the voice
    loop goes on) a failure to listen (DeviceError) is logged, saying the assistant runs
    ``without`` it, and None returned."""
    try:
        await server.start()
    except DeviceError as e:
        if required:
            raise
        log.error("%s; the assistant runs without %s", e, without)
        return None
    return server


# ---------------------------------------------------------------------------- media work

class MediaWork:
    """Blocking speech and transcription jobs: ``workers`` at once on their own threads,
    at most ``max_waiting`` in line for at most ``max_wait_s``, each watched for
    ``deadline_s``. A job's worker is counted busy until its thread returns, even when its
    caller stopped waiting (gave up at the deadline, or its client left)."""

    def __init__(self, workers: int, max_waiting: int, max_wait_s: float, deadline_s: float,
                 deadline_key: str = "http.audio_deadline_s"):
        self.workers = workers
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.deadline_s = deadline_s
        self.deadline_key = deadline_key          # named when a job overruns
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="media-work")
        self._free = asyncio.Semaphore(workers)
        self._waiting = 0
        self._busy = 0

    @property
    def waiting(self) -> int:
        """Jobs in line for a worker."""
        return self._waiting

    @property
    def busy(self) -> int:
        """Workers whose thread has not returned (their callers may have stopped waiting)."""
        return self._busy

    async def run(self, stage: str, fn: Callable[..., T], *args,
                  stop: Optional[threading.Event] = None,
                  max_wait_s: Optional[float] = None) -> T:
        """``fn(*args)`` on a worker. ``stop`` is set when nobody waits for the result any
        more (deadline, client gone): a job that looks at it can end early. ``max_wait_s``
        replaces the wait limit (a reloaded config's)."""
        await self._acquire(self.max_wait_s if max_wait_s is None else max_wait_s)
        loop = asyncio.get_running_loop()
        watch = Watch(stage, self.deadline_s)
        watch.key = self.deadline_key

        def call() -> T:
            HEALTH.begin(watch)
            try:
                return fn(*args)
            finally:
                HEALTH.end(watch)

        try:
            fut = loop.run_in_executor(self._pool, call)
        except BaseException:
            self._free.release()
            raise
        self._busy += 1
        fut.add_done_callback(self._done)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.deadline_s)
        except asyncio.TimeoutError:
            watch.given_up = True
            raise watch.overrun() from None
        finally:
            if not fut.done():
                if stop is not None:
                    stop.set()
                # Its outcome is nobody's now; do not warn that it was never retrieved.
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def stream(self, stage: str, make: Callable[[], Iterable[T]],
                     max_wait_s: Optional[float] = None) -> AsyncIterator[T]:
        """The items of ``make()``, made on a worker as one job (one place in line, one
        deadline for them all) and handed over as each comes, so the first can be used
        while the rest are made. A consumer that stops early stops the job at its next
        item. Use it with ``contextlib.aclosing``."""
        loop = asyncio.get_running_loop()
        # Not bounded: a job's items are bounded by its input (a sentence's or a text's
        # audio), and a worker must never wait on a slow consumer.
        items: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            for item in make():
                if stop.is_set():
                    return
                loop.call_soon_threadsafe(items.put_nowait, item)

        job = asyncio.ensure_future(self.run(stage, produce, stop=stop, max_wait_s=max_wait_s))
        try:
            while True:
                got = asyncio.ensure_future(items.get())
                try:
                    await asyncio.wait({got, job}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not got.done():
                        got.cancel()            # an item it had not taken stays queued
                if got.done() and not got.cancelled():
                    yield got.result()
                    continue
                # The job ended: its items were all queued before its end was seen.
                while not items.empty():
                    yield items.get_nowait()
                job.result()                    # Busy, StageOverrun, the job's own error
                return
        finally:
            stop.set()
            if not job.done():
                job.cancel()                    # out of line, or no longer waited for
                await asyncio.gather(job, return_exceptions=True)

    def _done(self, _fut) -> None:
        self._busy -= 1
        self._free.release()

    async def _acquire(self, max_wait_s: float) -> None:
        if self._free.locked() and self._waiting >= self.max_waiting:
            raise Busy(f"{self._waiting} speech and transcription requests are already "
                       f"waiting; try again shortly", retry_after=5.0)
        self._waiting += 1
        got = asyncio.ensure_future(self._free.acquire())
        try:
            await asyncio.wait({got}, timeout=max_wait_s)
        except BaseException:          # the caller went away while waiting
            self._give_back(got)
            raise
        finally:
            self._waiting -= 1
        if got.done() and not got.cancelled():
            return
        self._give_back(got)
        raise Busy(f"the speech workers were busy for {max_wait_s:.0f} s; try again "
                   f"shortly", retry_after=max(1.0, max_wait_s / 4))

    def _give_back(self, got: asyncio.Future) -> None:
        """A worker slot nobody will use: not taken yet (cancel the wait) or just handed
        over (release it for the next one)."""
        if not got.done():
            got.cancel()
        elif not got.cancelled() and got.exception() is None:
            self._free.release()

    def close(self) -> None:
        """Queued jobs are dropped; running ones finish on their own threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def media_work(cfg) -> MediaWork:
    """The process's speech and transcription workers (``http.audio_*``), shared by the
    HTTP API and the Wyoming server."""
    h = cfg.http
    return MediaWork(h.audio_workers, h.audio_queue, h.max_wait_s, h.audio_deadline_s)


# ---------------------------------------------------------------------------- voices

def voice_names(cfg, voices) -> dict:
    """Configured voice name -> synthesizer: its file name, and the config value
    (``tts.voice``, ``tts.voice_zh``) as written."""
    if voices is None:
        return {}
    out: dict = {}
    for value, synth in ((cfg.tts.voice, voices.default), (cfg.tts.voice_zh, voices.zh)):
        if synth is None:
            continue
        out[synth.name] = synth
        if value:
            out.setdefault(Path(str(value)).name.removesuffix(".onnx"), synth)
    return out
