"""Wyoming ``handle``: Home Assistant's conversation agent, answered by the assistant.

``transcript`` (the person's sentence, ``context.conversation_id``, ``language``) becomes a
stateless request to the shared conversation through ``frontend.answer``, exactly as an HTTP
request is one: the id's earlier exchanges are its history, it waits behind the person in
the room (``Priority.TEXT``), the camera's scene goes with it, and it is bounded by the same
``http.max_*`` sizes (``frontend.check_size``). The answer streams back as
``handled-start``, ``handled-chunk``s, then ``handled`` (the whole text, for clients that do
not stream) and ``handled-stop``; a question that cannot be answered gets ``not-handled``
with a sentence Home Assistant can speak. Every turn is a transcript row (``source:
wyoming``, ``conversation: wyoming:<id>``).

A clear phrase ("Clear.", 清除: the voice loop's ``intent.clear_phrases``) forgets the id's
exchanges and is answered with the persona's ``cleared`` line; an exit phrase does the same
with its ``goodbye`` (the process goes on: Home Assistant's conversation ends, not ours).

The server keeps the history, so Home Assistant cannot shorten it: a history past the size
limits is sent without its oldest exchanges, and one past the model's context is compacted
as the voice conversation is (``Request.compact_history``), instead of being refused. The
scene goes with each question as the voice loop's does: a question about the scene this
conversation was last shown costs no encode and no image prefill (``scene=same``). A client
that goes away mid-answer cancels the connection's task: the answer stream is closed
(``frontend.answer`` records the turn as interrupted, "client disconnected") and the
exchange is not kept.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from typing import Optional

from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled

from assistant import frontend
from assistant.config import IntentConfig
from assistant.conversation import Busy, Priority, Request
from assistant.errors import AssistantError, BackendError, ContextFullError
from assistant.frontend import Limits, TooLarge, check_size
from assistant.intent import Intent, IntentClassifier
from assistant.turn import Turn
from assistant.wyoming.events import ProtocolError, language_code, object_field, text_field

log = logging.getLogger(__name__)

SOURCE = "wyoming"
LANGUAGES = ("en", "zh")      # the reply languages the persona has lines and hints for
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@functools.lru_cache(maxsize=4)
def intents(cfg: IntentConfig) -> IntentClassifier:
    """The classifier of the running config's phrases (SIGHUP may replace them)."""
    return IntentClassifier(cfg)


def fitting_history(question: str, history: list[tuple[str, str]],
                    limits: Limits) -> list[tuple[str, str]]:
    """The newest of ``history`` that fits the limits with ``question``; TooLarge when the
    question alone does not."""
    history = history[len(history) - limits.history:] if limits.history else []
    while True:
        try:
            check_size(question, history, limits)
            return history
        except TooLarge as e:
            if e.part == "question" or not history:
                raise
            history = history[1:]


class HandleSession:
    def __init__(self, services, send):
        self.services = services
        self.send = send

    async def on_event(self, event: Event) -> bool:
        if event.type != "transcript":
            return False
        text = text_field(event).strip()
        context = object_field(event, "context")
        cid = context.get("conversation_id")
        if cid is not None and not isinstance(cid, str):
            raise ProtocolError("transcript: context.conversation_id must be a string")
        language = language_code(text_field(event, "language", required=False))
        language = language if language in LANGUAGES else None
        if not text:
            await self.send(NotHandled(text="I did not hear a question.",
                                       context=context or None).event())
            return True
        thread = self.services.store.get(cid)
        context = {**context, "conversation_id": thread.id}
        intent = intents(self.services.conversation.cfg.intent).classify(text)
        if intent in (Intent.CLEAR, Intent.EXIT):
            await self._forget(thread, intent, text, language, context)
            return True
        async with thread.lock:
            try:
                history = fitting_history(text, thread.history(), self.services.limits)
            except TooLarge as e:
                log.info("wyoming conversation %s: %s", thread.id, e)
                await self.send(NotHandled(text=self._lines(language).too_long,
                                           context=context).event())
                return True
            answer = await self._answer(thread.id, text, history, language, context)
            if answer is None:
                return True
            thread.add(text, answer)          # kept before the client hears the end
        await self.send(Handled(text=answer, context=context).event())
        await self.send(HandledStop().event())
        return True

    def _lines(self, language: Optional[str]):
        return self.services.cfg.persona.lines(language)

    async def _forget(self, thread, intent: Intent, text: str, language: Optional[str],
                      context: dict) -> None:
        """A clear or exit phrase: the id's exchanges forgotten (after a turn of it that
        runs now), the persona's line as the answer, a transcript row."""
        if language is None and _CJK.search(text):
            language = "zh"                     # 清除 with no language given
        async with thread.lock:
            thread.exchanges.clear()
        lines = self._lines(language)
        line = lines.cleared if intent is Intent.CLEAR else lines.goodbye
        turn = Turn(source=SOURCE, intent=intent.value, transcript=text, answer=line,
                    language=language or "", conversation=f"{SOURCE}:{thread.id}")
        turn.mark("done")
        turn.log_line()
        self.services.conversation.record(turn)
        await self.send(HandledStart(context=context).event())
        await self.send(HandledChunk(line).event())
        await self.send(Handled(text=line, context=context).event())
        await self.send(HandledStop().event())

    async def _answer(self, cid: str, text: str, history: list, language: Optional[str],
                      context: dict) -> Optional[str]:
        """Stream the answer's chunks; returns it, or None when the turn did not complete
        (``not-handled`` sent)."""
        conv = self.services.conversation
        scene = conv.scene
        req = Request(text, source=SOURCE, priority=Priority.TEXT, language=language,
                      history=history, use_camera=scene is not None and scene.enabled,
                      compact_history=True)
        turn = Turn(source=SOURCE)
        turn.language = language or ""
        pieces: list[str] = []
        try:
            async with contextlib.aclosing(
                    frontend.answer(conv, req, turn, f"{SOURCE}:{cid}")) as stream:
                async for piece in stream:
                    if not pieces:
                        piece = piece.lstrip()
                        if not piece:
                            continue
                        await self.send(HandledStart(context=context).event())
                    pieces.append(piece)
                    await self.send(HandledChunk(piece).event())
        except Busy as e:
            log.info("wyoming conversation %s: %s", cid, e)
            await self.send(NotHandled(text=f"I am busy; please ask again in "
                                       f"{max(1, round(e.retry_after))} seconds.",
                                       context=context).event())
            return None
        except AssistantError as e:
            log.error("wyoming conversation %s, turn %d: %s", cid, turn.id, e)
            await self.send(NotHandled(text=self._refusal(e, language),
                                       context=context).event())
            return None
        if not pieces:
            await self.send(HandledStart(context=context).event())
        return "".join(pieces).strip()

    def _refusal(self, e: AssistantError, language: Optional[str]) -> str:
        """What Home Assistant says when the turn failed: the persona's own lines."""
        lines = self._lines(language)
        if isinstance(e, ContextFullError):
            return lines.too_long if "after the system prompt" in str(e) else lines.full
        if isinstance(e, BackendError) and "no language model" in str(e):
            return lines.no_model
        return lines.error
