"""The conversation: one model, one turn at a time, for every front-end.

Front-ends (the voice loop, the HTTP API) turn their input into a ``Request`` and stream the
answer from ``Conversation.ask``. This module knows what the model's context holds and keeps
it honest:

- **whose** conversation is in the KV cache: the voice conversation, or the history of the
  last stateless (HTTP) request. A turn of the other kind feeds its own history back first
  (``LLMBackend.load_history``), so neither side corrupts the other;
- **which image** is in it (scene memory): a question about an unchanged scene goes as text,
  whether the voice conversation or a stateless one continuing what the context holds asks
  it; a new scene, or a context with no image left, gets the camera's image;
- **the budget**: before a turn its cost is asked from the backend; when it does not fit,
  ``llm.on_context_full`` compacts (the newest exchanges fed back as text, within
  ``llm.compact_share`` of the context), resets (and says so) or refuses. A runtime that
  still overflows gets one compaction and one retry. A stateless conversation's compaction
  holds for its next requests, and one its front-end keeps (Home Assistant's) is compacted
  when fed back if it no longer fits;
- **ahead of the next question**: once an answer leaves the context past ``llm.compact_at``,
  the voice front-end has it compacted while the answer is spoken and the person listens
  (``work_when_idle``: the model is free then; on a board the NPU does it while the CPU
  speaks), and the scene's image evaluated again as the opening of the next turn, so the
  next question finds room; compaction at question time stays the fallback.

Turns are scheduled by priority (``turn_gate``): the person in the room (voice) goes ahead
of queued HTTP requests; the queue is bounded and a request that cannot get a turn in time
is refused with ``Busy``. Every turn, of every kind, becomes one transcript row. Nothing here knows
about audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from assistant.config import Config
from assistant.errors import AssistantError, BackendError, ContextFullError
from assistant.health import StageOverrun
from assistant.llm.base import ImageEmbedding, LLMBackend, TurnOptions, stream_turn
from assistant.stages import stages
from assistant.transcript import TranscriptWriter
from assistant.turn import Turn
from assistant.turn_gate import Busy, Priority, TurnGate  # noqa: F401 (the front-ends' names)
from assistant.vision.scene import Scene, SceneResult, Shot

log = logging.getLogger(__name__)

# How often work waiting for quiet looks again (the person talks or an answer is spoken).
_IDLE_POLL_S = 0.05


@dataclass
class Exchange:
    """One answered question of the voice conversation."""

    question: str
    answer: str                  # as spoken (cut at a barge-in)
    language: str = ""
    with_image: bool = False
    turn: int = 0

    @property
    def pair(self) -> tuple[str, str]:
        return (self.question, self.answer)


@dataclass
class Request:
    """A question for the model, from any front-end."""

    question: str
    source: str = "voice"
    priority: Priority = Priority.VOICE
    language: Optional[str] = None            # the reply language hint; None: none
    # Stateless front-ends send the conversation before the question; None: the voice one.
    history: Optional[list[tuple[str, str]]] = None
    image: Optional[ImageEmbedding] = None    # an image that comes with the question
    use_camera: bool = True                   # attach the camera's scene per vision.attach
    options: Optional[TurnOptions] = None
    snapshot: Optional[asyncio.Task] = None   # the scene job started at the speech's onset
    # The front-end keeps this history itself and its client cannot shorten it (Home
    # Assistant's): one that does not fit is compacted, not refused.
    compact_history: bool = False

    @property
    def stateless(self) -> bool:
        return self.history is not None


@dataclass
class _Plan:
    """What the context must become before a turn runs."""

    text: str
    image: Optional[ImageEmbedding]
    needs_image: bool = False     # compaction emptied the context of its image


class Conversation:
    def __init__(self, cfg: Config, backend: Optional[LLMBackend], *,
                 scene: Optional[Scene] = None, transcript: Optional[TranscriptWriter] = None,
                 lock: Optional[threading.Lock] = None, gate: Optional[TurnGate] = None):
        self.cfg = cfg
        self.backend = backend
        self.scene = scene
        self.transcript = transcript
        self.lock = lock or threading.Lock()     # the model is single-entry
        self.gate = gate or TurnGate()
        self.id = _new_id()
        self.exchanges: list[Exchange] = []      # the voice conversation since the last clear
        self.first_in_context = 0                # older exchanges were compacted away
        self.image: Optional[Shot] = None        # the scene image the context holds
        self._held: object = "voice"             # "voice", or the tuple of a request's history
        self._held_from = 0                      # of that tuple, older ones were compacted away
        self._stale = False                      # the voice context must be fed back
        self._listeners: list[Callable[[str, Turn, dict], None]] = []
        self.compactions = 0
        self.idle_compactions = 0                # of those, done while nobody spoke
        self._ahead: Optional[Shot] = None       # its image, evaluated as the next turn's opening
        self._idle_busy = False                  # idle work holds the model now
        self._idle_task: Optional[asyncio.Task] = None

    # ------------------------------------------------------------------ observers

    def subscribe(self, fn: Callable[[str, Turn, dict], None]) -> Callable[[], None]:
        """fn(event, turn, data) for "question", "piece", "done" (a page, a log); returns
        the function that unsubscribes."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _emit(self, event: str, turn: Turn, **data) -> None:
        for fn in list(self._listeners):
            try:
                fn(event, turn, data)
            except Exception:
                log.exception("a conversation listener failed")

    # ------------------------------------------------------------------ facts

    @property
    def in_context(self) -> list[Exchange]:
        return self.exchanges[self.first_in_context:]

    def scene_reference(self, history: Optional[list] = None) -> Optional[Shot]:
        """The image a fresh snapshot is compared with (None: the context holds none): of
        the voice conversation, or of the stateless one ``history`` continues (a Home
        Assistant or HTTP conversation asking again about the scene it was shown)."""
        if history is not None:
            return self.image if self._continues(history) is not None else None
        if self._held != "voice" or self._stale:
            return None
        return self.image if self.image is not None else self._ahead

    def _continues(self, history: list) -> Optional[int]:
        """None unless the context holds the stateless conversation ``history``; else how
        many of its compacted-away oldest exchanges it no longer carries (a front-end that
        keeps only the newest, as Home Assistant's store does, lets them go)."""
        held, history = self._held, tuple(history)
        if held == history:
            return 0
        drop = len(held) - len(history) if isinstance(held, tuple) else -1
        return drop if 0 < drop <= self._held_from and held[drop:] == history else None

    # ------------------------------------------------------------------ turns

    async def ask(self, req: Request, turn: Turn,
                  scene: Optional[SceneResult] = None) -> AsyncIterator[str]:
        """Answer ``req``, streaming the answer's pieces; ``turn`` gets the record.

        ``scene`` is what the voice loop's early snapshot found; without it (and with
        ``req.use_camera``) the scene is looked at now. Raises ContextFullError (policy
        error, or a question too long on its own), BackendError, Busy.
        """
        if self.backend is None:
            raise BackendError("no language model is loaded")
        turn.source, turn.conversation = req.source, self.id
        t_wait, idle_work = time.monotonic(), self._idle_busy
        async with self.gate.slot(req.priority):
            turn.took("queue", time.monotonic() - t_wait)
            if idle_work:
                self._waited_for_idle_work(turn, time.monotonic() - t_wait)
            self._emit("question", turn, text=req.question)
            pieces: list[str] = []
            ended = False
            try:
                # Closed here, not by the garbage collector: its clean-up (the runtime's
                # abort) must be over before the next turn gets the gate.
                async with contextlib.aclosing(self._answer(req, turn, scene, pieces)) as answer:
                    async for piece in answer:
                        self._emit("piece", turn, text=piece)
                        yield piece
                ended = True
            finally:
                if not ended:
                    # Failed, cut off or abandoned (a client that hung up): the cache may
                    # hold a question and part of an answer that no history records, so
                    # the next turn feeds its own conversation back first.
                    if req.stateless:
                        self._held = "unknown"
                    else:
                        self._stale = True
                turn.answer = "".join(pieces).strip()
                self._emit("done", turn, answer=turn.answer)

    async def _answer(self, req: Request, turn: Turn, scene: Optional[SceneResult],
                      pieces: list[str]) -> AsyncIterator[str]:
        image = req.image
        if image is None and req.use_camera and self.scene is not None and self.scene.enabled:
            reference = self.scene_reference(req.history)
            if scene is None:
                t0 = time.monotonic()
                scene = await self.scene.take(reference, req.snapshot)
                turn.took("vision_wait", time.monotonic() - t0)
            image = self._scene_image(scene, turn)
        ahead = None if req.stateless else self._take_ahead(turn, image)
        if ahead is not None:
            image = ahead.embedding
        text = self._with_hint(req.question, req.language)
        plan = await self._locked(self._fit, req, text, image, turn, False)
        if plan.needs_image and scene is not None and scene.shot is not None:
            # Compaction took the image out of the context: this question needs it again.
            if scene.shot.embedding is None:
                t0 = time.monotonic()
                await self.scene.encode(scene)
                turn.took("encode", turn.timings.get("encode_ms", 0) / 1000 + time.monotonic() - t0)
            if scene.shot.embedding is not None:
                image = scene.shot.embedding
                self._note_image(turn, image, "new")
                plan = await self._locked(self._fit, req, text, image, turn, False)
        stats: list = []
        t0 = time.monotonic()
        for attempt in (1, 2):
            try:
                stream = stream_turn(self.backend, plan.text, plan.image, True, stats,
                                     lock=self.lock, options=req.options,
                                     deadlines=self.cfg.deadlines)
                async with contextlib.aclosing(stream):
                    async for piece in stream:
                        turn.mark("llm_first_piece")
                        pieces.append(piece)
                        yield piece
                break
            except StageOverrun:
                # Aborted past its deadline: what the cache kept of it is unknown, so the
                # next turn feeds its conversation back first.
                turn.took("llm", time.monotonic() - t0)
                if req.stateless:
                    self._held = "unknown"
                else:
                    self._stale = True
                raise
            except ContextFullError:
                # The estimate was short (or the runtime overflowed): compact harder, once.
                if attempt == 2 or pieces or self.cfg.llm.on_context_full == "error":
                    raise
                log.warning("turn %d: the context overflowed after all; compacting and "
                            "trying again", turn.id)
                plan = await self._locked(self._fit, req, text, plan.image, turn, True)
        turn.took("llm", time.monotonic() - t0)
        st = stats[0] if stats else None
        if st is not None and st.extra.get("prefilled_ahead"):
            turn.counts["prefilled_ahead"] = st.extra["prefilled_ahead"]
        if st is not None:
            turn.counts.update(prompt_tokens=st.prompt_tokens,
                               generated_tokens=st.generated_tokens)
            turn.finish = st.extra.get("finish", "stop")
            if st.aborted:
                turn.finish = "aborted"
        turn.counts["context_used"] = self.backend.tokens_used
        answer = "".join(pieces).strip()
        if req.stateless:
            # An aborted turn (an HTTP stop string) may be rolled back by the backend: the
            # next request feeds its history back rather than trust the cache.
            self._held = (tuple(req.history) + ((req.question, answer),)
                          if turn.finish != "aborted" else "unknown")
        else:
            self.exchanges.append(Exchange(req.question, answer, req.language or "",
                                           plan.image is not None, turn.id))
        if ahead is not None and plan.image is ahead.embedding:
            self.image = ahead               # the shot that has the embedding
        elif plan.image is not None:
            # The camera's scene, or a picture of the request's own (no shot to compare).
            shot = scene.shot if scene is not None else None
            self.image = shot if shot is not None and plan.image is shot.embedding else None

    def _scene_image(self, scene: Optional[SceneResult], turn: Turn) -> Optional[ImageEmbedding]:
        """The image a question carries after the scene comparison, noted in the turn."""
        if scene is None:
            return None
        turn.took("snapshot", scene.snapshot_s)
        if scene.encode_s:
            turn.took("encode", scene.encode_s)
        if scene.error:
            turn.note = f"answered without the image: {scene.error}"
        if scene.difference is not None:
            turn.counts["scene_difference"] = round(scene.difference, 4)
        if scene.shot is None:
            turn.scene = "none"
            return None
        if not scene.changed:
            turn.scene = "same"
            held = self.image.embedding if self.image is not None else None
            if held is not None:
                turn.counts["image_tokens_saved"] = held.n_tokens
            return None
        emb = scene.embedding
        if emb is None:
            turn.scene = "none"
            return None
        self._note_image(turn, emb, "new")
        if scene.reused:
            turn.counts["encoded_while_idle"] = 1
        elif scene.remembered:
            turn.counts["embedding_remembered"] = 1    # this scene was encoded for another turn
        return emb

    @staticmethod
    def _note_image(turn: Turn, image: ImageEmbedding, scene: str) -> None:
        turn.scene = scene
        turn.with_image = True
        turn.counts["image_tokens"] = image.n_tokens
        turn.counts.pop("image_tokens_saved", None)

    def _with_hint(self, question: str, language: Optional[str]) -> str:
        if not language:
            return question
        hint = self.cfg.persona.lines(language).reply_hint.strip()
        return f"{question}\n{hint}" if hint else question

    # ------------------------------------------------------------------ the budget

    def _fit(self, req: Request, text: str, image: Optional[ImageEmbedding], turn: Turn,
             harder: bool) -> _Plan:
        """Make the context hold the request's conversation and room for the turn.

        Runs in a worker thread under the model lock (it calls the backend).
        """
        b, llm = self.backend, self.cfg.llm
        t0 = time.monotonic()
        if req.stateless:
            drop = self._continues(req.history)
            if drop is not None:
                self._held, self._held_from = self._held[drop:], self._held_from - drop
            else:
                self._feed_back(req, text, image, turn)
                log.info("turn %d: %s conversation of %d exchanges fed back in %.0f ms "
                         "(%d tokens)", turn.id, req.source, len(req.history),
                         (time.monotonic() - t0) * 1e3, b.tokens_used)
        elif self._held != "voice" or self._stale:
            kept = [e.pair for e in self.in_context]
            b.load_history(kept)
            self._held, self._stale, self.image, self._ahead = "voice", False, None, None
            log.info("turn %d: voice conversation fed back (%d exchanges, %d tokens) in %.0f ms",
                     turn.id, len(kept), b.tokens_used, (time.monotonic() - t0) * 1e3)
            turn.took("switch", time.monotonic() - t0)
        ctx = b.context_size
        need = b.turn_cost(text, image)
        before = b.tokens_used
        # The first check's figures: the one that decided whether to compact.
        turn.counts.setdefault("context_before", before)
        turn.counts.setdefault("turn_need", need)
        if before + need <= ctx and not harder:
            return _Plan(text, image)
        system = before - b.history_cost(self._held_pairs())
        if system + need > ctx:
            raise ContextFullError(
                f"this question needs {need} tokens (answer reserve included) but the "
                f"{ctx}-token context holds only {max(ctx - system, 0)} after the system "
                f"prompt: raise llm.max_context_len or lower llm.max_new_tokens")
        policy = llm.on_context_full
        if policy == "error":
            raise ContextFullError(
                f"the conversation fills the context ({before} of {ctx} tokens used, this "
                f"turn needs {need}): say \"clear\" to start over, or set "
                f"llm.on_context_full: compact")
        if policy == "reset" and not req.stateless:
            b.clear()
            self._forget(new_id=True)
            turn.conversation = self.id
            after = b.tokens_used
            turn.compaction = {"kind": "reset", "tokens_before": before, "tokens_after": after,
                               "exchanges_dropped": None}
            turn.reset = True
            log.info("turn %d: context full (%d of %d tokens, %d needed): conversation "
                     "reset, %d tokens after", turn.id, before, ctx, need, after)
            return _Plan(text, image, needs_image=image is None and req.use_camera)
        return self._compact(req, text, image, turn, before, need, harder)

    def _feed_back(self, req: Request, text: str, image: Optional[ImageEmbedding],
                   turn: Turn) -> None:
        """Put a stateless request's conversation into the context. One its front-end
        keeps (``req.compact_history``) that does not fit is compacted as the voice
        conversation is (its newest exchanges within compact_share), not refused: Home
        Assistant cannot send a shorter one."""
        b, llm = self.backend, self.cfg.llm
        history = tuple(req.history)
        self._stale = True                   # the voice context is gone
        self.image = self._ahead = None
        self._held, self._held_from = "unknown", 0       # until it is in
        try:
            b.load_history(history)
        except ContextFullError:
            if not req.compact_history or llm.on_context_full == "error":
                raise
            b.load_history(())
            system = b.tokens_used
            before = system + b.history_cost(history)
            need = b.turn_cost(text, image)
            kept = self._newest(list(history), system, need, llm.compact_share)
            b.load_history(kept)
            self._held_from = len(history) - len(kept)
            self._compacted(turn, before, need, len(kept), len(history) - len(kept))
        self._held = history

    def _held_pairs(self) -> list[tuple[str, str]]:
        """The exchanges the context holds as history."""
        if self._held == "voice":
            return [e.pair for e in self.in_context]
        return list(self._held[self._held_from:]) if isinstance(self._held, tuple) else []

    def _newest(self, pairs: list, system: int, need: int, share: float) -> list:
        """The newest exchanges that fit within ``share`` of the context and leave ``need``."""
        b = self.backend
        ctx = b.context_size

        def fits(n: int) -> bool:
            cost = b.history_cost(pairs[len(pairs) - n:])
            return cost <= share * ctx and system + cost + need <= ctx

        # The most newest exchanges that fit; a binary search, so a long history costs
        # O(n log n) tokenising, not O(n^2).
        lo, hi = 0, len(pairs)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return list(pairs[len(pairs) - lo:]) if lo else []

    def _compact(self, req: Request, text: str, image: Optional[ImageEmbedding], turn: Turn,
                 before: int, need: int, harder: bool) -> _Plan:
        """Keep the newest exchanges that fit within compact_share, feed them back."""
        b, llm = self.backend, self.cfg.llm
        pairs = self._held_pairs()
        share = llm.compact_share * (0.5 if harder else 1.0)
        # The image goes back in with this question if the context loses it.
        with_image = image
        kept = self._newest(pairs, before - b.history_cost(pairs), need, share)
        while True:
            try:
                b.load_history(kept)
                break
            except ContextFullError:
                # The system prompt's share was estimated short (an answer's text takes
                # more tokens fed back than it was generated in): one exchange fewer.
                if not kept:
                    raise
                kept = kept[1:]
        if req.stateless:
            # The request's conversation stays what the context stands for (its client
            # sends it again with the next question); only its newest are in it.
            self._held_from = len(self._held) - len(kept)
        else:
            self.first_in_context = len(self.exchanges) - len(kept)
            self._held, self._stale = "voice", False
        self.image = self._ahead = None
        self._compacted(turn, before, need, len(kept), len(pairs) - len(kept))
        return _Plan(text, with_image, needs_image=with_image is None and req.use_camera)

    def _compacted(self, turn: Turn, before: int, need: int, kept: int, dropped: int) -> None:
        after = self.backend.tokens_used
        self.compactions += 1
        turn.compaction = {"kind": "compact", "tokens_before": before, "tokens_after": after,
                           "exchanges_dropped": dropped, "exchanges_kept": kept}
        log.info("turn %d: context full (%d of %d tokens, %d needed): compacted to the %d "
                 "newest exchanges (%d dropped), %d tokens after", turn.id, before,
                 self.backend.context_size, need, kept, dropped, after)

    # ------------------------------------------------------------------ ahead of the question

    async def prefill(self, snapshot: asyncio.Task,
                      dropped: Optional[asyncio.Event] = None) -> bool:
        """Speech started and its snapshot may show a new scene: put that image into the
        model's context now, while the person talks (llm.prefill_early). The turn that
        asks about it then evaluates only its question; anything else cuts it away."""
        if self.backend is None or self.scene is None or not self.cfg.llm.prefill_early:
            return False
        try:
            res = await asyncio.shield(snapshot)
        except Exception:
            return False
        if res.shot is None or not res.changed or res.embedding is None:
            return False
        async with self.gate.slot(Priority.VOICE):
            # Checked again with the model ours: the speech may have come to nothing, a
            # turn may have taken this image already, and the context must hold the voice
            # conversation as it is.
            if (dropped is not None and dropped.is_set()) or (
                    self._held != "voice" or self._stale or self.image is res.shot
                    or (self.image is not None and self.scene.is_same(res.shot, self.image)[0])):
                return False
            t0 = time.monotonic()
            try:
                ok = await self._locked(self.backend.prefill, res.embedding)
            except AssistantError as e:
                # Only a head start was lost: the question's turn feeds the image itself.
                log.warning("the image could not be evaluated ahead of the question: %s", e)
                return False
            if ok and dropped is not None and dropped.is_set():
                await self._locked(self.backend.cancel_prefill)   # dropped meanwhile
                return False
            if ok:
                self._ahead = None           # the backend holds this opening instead
                log.info("image of the new scene evaluated ahead of the question in %.0f ms",
                         (time.monotonic() - t0) * 1e3)
            return ok

    async def cancel_prefill(self) -> None:
        """The speech was not a question after all: cut its image prefill away."""
        if self.backend is not None:
            await self._locked(self.backend.cancel_prefill)

    # ------------------------------------------------------------------ while nobody speaks

    def wants_compaction(self) -> bool:
        """The voice context is past ``llm.compact_at``: compact it before the next question."""
        b, llm = self.backend, self.cfg.llm
        return (b is not None and llm.compact_at > 0 and llm.on_context_full == "compact"
                and self._held == "voice" and not self._stale and bool(self.in_context)
                and b.tokens_used > llm.compact_at * b.context_size)

    def work_when_idle(self, idle: Callable[[], bool]) -> None:
        """After a voice answer: if the context wants compacting, do it once ``idle()`` (the
        person is silent, no question on its way). One such job at a time."""
        if (self._idle_task is None or self._idle_task.done()) and self.wants_compaction():
            self._idle_task = asyncio.create_task(self._when_idle(idle), name="idle-compaction")

    async def finish_idle_work(self) -> None:
        """At the end: a job still waiting for quiet is dropped; one holding the model ends."""
        task, self._idle_task = self._idle_task, None
        if task is None:
            return
        if not self._idle_busy:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _when_idle(self, idle: Callable[[], bool]) -> None:
        try:
            while self.wants_compaction():
                while not idle():
                    await asyncio.sleep(_IDLE_POLL_S)
                if await self.compact_idle(idle):
                    return
        except AssistantError as e:
            # Only a head start is lost: the next question compacts if it must.
            log.warning("the compaction while idle failed: %s", e)

    async def compact_idle(self, idle: Callable[[], bool] = lambda: True) -> bool:
        """Compact the voice context now (the newest exchanges within ``compact_share``, room
        left for a question with its image), then evaluate the current scene's image as the
        opening of the next turn: the next question about the same scene evaluates only
        itself. A question that comes meanwhile waits for the part under way only: the
        image is left to it. False when not done (not needed, or someone spoke first)."""
        async with self.gate.slot(Priority.VOICE):
            if not self.wants_compaction() or not idle():
                return False
            self._idle_busy = True
            try:
                shot = self._current_shot()
                t0 = time.monotonic()
                before, after, kept, dropped = await self._locked(self._compact_now, shot)
                took = time.monotonic() - t0
                log.info("compacted while idle in %.0f ms: %d -> %d tokens, the %d newest "
                         "exchanges kept (%d dropped)", took * 1e3, before, after, kept, dropped)
                if shot is None or self.gate.waiting:
                    return True
                t0 = time.monotonic()
                if await self._locked(self.backend.prefill, shot.embedding):
                    self._ahead = shot
                    log.info("the scene's image evaluated again while idle in %.0f ms",
                             (time.monotonic() - t0) * 1e3)
                return True
            finally:
                self._idle_busy = False

    def _current_shot(self) -> Optional[Shot]:
        """The scene's image to put back: a settled new scene the idle watch encoded, else
        the one the context held."""
        ready = self.scene.ready if self.scene is not None else None
        if (ready is not None and ready.embedding is not None
                and (self.image is None or not self.scene.is_same(ready, self.image)[0])):
            return ready
        held = self.image if self.image is not None else self._ahead
        return held if held is not None and held.embedding is not None else None

    def _compact_now(self, shot: Optional[Shot]) -> tuple[int, int, int, int]:
        """Worker thread, model lock held: feed back the newest exchanges."""
        b = self.backend
        pairs = self._held_pairs()
        before = b.tokens_used
        image = shot.embedding if shot is not None else None
        # Room for a question like the last one, with the image.
        need = b.turn_cost(self.exchanges[-1].question if self.exchanges else "", image)
        kept = self._newest(pairs, before - b.history_cost(pairs), need, self.cfg.llm.compact_share)
        b.load_history(kept)
        self.first_in_context = len(self.exchanges) - len(kept)
        self._held, self._stale = "voice", False
        self.image = self._ahead = None
        self.compactions += 1
        self.idle_compactions += 1
        return before, b.tokens_used, len(kept), len(pairs) - len(kept)

    def _take_ahead(self, turn: Turn, image: Optional[ImageEmbedding]) -> Optional[Shot]:
        """A voice question about the scene whose image the idle work evaluated as this
        turn's opening: it carries that image (the backend evaluates only the question)."""
        ahead, self._ahead = self._ahead, None
        if (ahead is None or image is not None or turn.scene != "same" or self._held != "voice"
                or self._stale):
            return None
        turn.with_image = True       # the same scene: its image is in the context again
        turn.counts["image_evaluated_while_idle"] = ahead.embedding.n_tokens
        return ahead

    @staticmethod
    def _waited_for_idle_work(turn: Turn, waited: float) -> None:
        turn.counts["waited_for_idle_compaction_ms"] = round(waited * 1000)
        log.info("turn %d: waited %.0f ms for the compaction done while idle", turn.id,
                 waited * 1000)

    # ------------------------------------------------------------------ control

    def abort(self) -> None:
        """Stop the running turn (barge-in); the stream ends and ask() records the part."""
        if self.backend is not None:
            self.backend.abort()

    def keep_spoken(self, turn: Turn, spoken: str) -> None:
        """After a barge-in: the last exchange holds only what the person heard."""
        if not self.exchanges or self.exchanges[-1].turn != turn.id:
            return
        ex = self.exchanges[-1]
        spoken = spoken.strip()
        if spoken == ex.answer:
            return
        log.info("turn %d: %d of %d characters of the answer were spoken; the history keeps "
                 "those", turn.id, len(spoken), len(ex.answer))
        ex.answer = spoken
        self._stale = True      # fed back before the next voice turn

    async def clear(self, turn: Optional[Turn] = None) -> None:
        """Forget the voice conversation (a clear or exit phrase); a new conversation id."""
        if self.backend is not None:
            async with self.gate.slot(Priority.VOICE):
                await self._locked(self.backend.clear)
        self._forget(new_id=True)
        if turn is not None:
            turn.conversation = self.id

    def _forget(self, new_id: bool) -> None:
        self.exchanges.clear()
        self.first_in_context = 0
        self.image = self._ahead = None
        self._held, self._stale = "voice", False
        if new_id:
            self.id = _new_id()

    async def _locked(self, fn, *args):
        """A blocking backend call in a worker thread, under the model lock (taken inside
        the thread, so a cancelled caller cannot leave it held)."""
        def call():
            with self.lock:
                return fn(*args)
        return await asyncio.to_thread(call)

    # ------------------------------------------------------------------ the record

    def record(self, turn: Turn) -> None:
        """The turn's transcript row (queued to the writer thread); listeners get where its
        time went ("timings": assistant.stages) once the turn is over."""
        took = stages(turn.summary())
        if took is not None:
            self._emit("timings", turn, stages=took)
        if self.transcript is not None and turn.intent and turn.intent != "nothing":
            row = turn.as_json()
            row["time"] = turn.wall_time
            row.setdefault("conversation", turn.conversation or self.id)
            self.transcript.write(row)


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]

