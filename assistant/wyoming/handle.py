"""Wyoming ``handle``: Home Assistant's conversation agent, answered by the assistant.

``transcript`` (the person's sentence, ``context.conversation_id``, ``language``) becomes a
stateless request to the shared conversation, exactly as an HTTP request is one: the id's
earlier exchanges are its history, it waits behind the person in the room (``Priority.TEXT``),
and the camera's scene goes with it. The answer streams back as ``handled-start``,
``handled-chunk``s, then ``handled`` (the whole text, for clients that do not stream) and
``handled-stop``; a question that cannot be answered gets ``not-handled`` with a sentence
Home Assistant can speak. Every turn is a transcript row (``source: wyoming``).

A client that goes away mid-answer cancels the connection's task: the answer stream is
closed (the conversation's own path for a turn cut short, as for an HTTP client that hangs
up), the turn is recorded as interrupted ("client disconnected") and the exchange is not
kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Optional

from wyoming.event import Event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop, NotHandled

from assistant.conversation import Busy, Priority, Request
from assistant.errors import AssistantError, BackendError, ContextFullError
from assistant.turn import Turn
from assistant.wyoming.events import ProtocolError, language_code, object_field, text_field

log = logging.getLogger(__name__)

SOURCE = "wyoming"
MAX_QUESTION_CHARS = 4096
LANGUAGES = ("en", "zh")      # the reply languages the persona has lines and hints for


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
        if len(text) > MAX_QUESTION_CHARS:
            await self.send(NotHandled(text=self._lines(language).too_long,
                                       context=context or None).event())
            return True
        thread = self.services.store.get(cid)
        context = {**context, "conversation_id": thread.id}
        async with thread.lock:
            answer = await self._answer(thread, text, language, context)
            if answer is None:
                return True
            thread.add(text, answer)          # kept before the client hears the end
        await self.send(Handled(text=answer, context=context).event())
        await self.send(HandledStop().event())
        return True

    def _lines(self, language: Optional[str]):
        return self.services.cfg.persona.lines(language)

    async def _answer(self, thread, text: str, language: Optional[str],
                      context: dict) -> Optional[str]:
        """Stream the answer's chunks; returns it, or None when the turn did not complete
        (``not-handled`` sent)."""
        conv = self.services.conversation
        scene = conv.scene
        req = Request(text, source=SOURCE, priority=Priority.TEXT, language=language,
                      history=thread.history(),
                      use_camera=scene is not None and scene.enabled)
        turn = Turn(source=SOURCE)
        turn.intent, turn.transcript, turn.language = "question", text, language or ""
        pieces: list[str] = []
        record = True
        try:
            async with contextlib.aclosing(conv.ask(req, turn)) as stream:
                async for piece in stream:
                    if not pieces:
                        piece = piece.lstrip()
                        if not piece:
                            continue
                        await self.send(HandledStart(context=context).event())
                    pieces.append(piece)
                    await self.send(HandledChunk(piece).event())
        except Busy as e:
            record = False                # as HTTP: a refused turn is no turn
            log.info("wyoming conversation %s: %s", thread.id, e)
            await self.send(NotHandled(text=f"I am busy; please ask again in "
                                       f"{max(1, round(e.retry_after))} seconds.",
                                       context=context).event())
            return None
        except (asyncio.CancelledError, ConnectionError):
            turn.interrupted = True       # as an HTTP client that hangs up
            turn.note = "client disconnected"
            raise
        except AssistantError as e:
            turn.note = turn.note or str(e)
            log.error("wyoming conversation %s, turn %d: %s", thread.id, turn.id, e)
            await self.send(NotHandled(text=self._refusal(e, language),
                                       context=context).event())
            return None
        finally:
            if record:
                turn.conversation = f"{SOURCE}:{thread.id}"
                turn.mark("done")
                turn.log_line()
                conv.record(turn)
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
