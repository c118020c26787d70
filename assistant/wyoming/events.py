"""Reading Wyoming events off a socket without trusting them, and the checks on their data.

A Wyoming event is one JSON line (``type``, ``data``, ``data_length``, ``payload_length``),
then ``data_length`` bytes of more JSON data, then ``payload_length`` bytes of payload. The
``wyoming`` package's reader drops the connection silently on a bad line; here a bad event
is answered with an ``error`` event that says what was wrong, and the connection goes on
where the stream can still be followed (a line that is not JSON, data of the wrong type).
Where it cannot (a line past the limit, a length that is not a size), it is closed.

Every string in an event's data, however deep, is checked before anything uses it: a NUL or
a lone surrogate is an ``error`` (``invalid_characters``) naming the field. A ``Budget``
bounds the bytes a connection has read and not yet handled: when it is spent the reader
waits before reading the next event's data, so the client's socket, not our memory, holds
what it sends too fast.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Optional

from wyoming.event import Event

from assistant.conversation import Busy
from assistant.frontend import text_problem
from assistant.health import StageOverrun

MAX_LINE = 64 * 1024          # one header line (the stream reader's limit)
MAX_DATA = 1 << 20            # JSON data after the header
MAX_PAYLOAD = 16 << 20        # one payload (an audio chunk)


class BadEvent(Exception):
    """An event that could not be read; ``fatal``: the stream cannot be followed after it."""

    def __init__(self, message: str, fatal: bool = False, code: str = "malformed_event"):
        super().__init__(message)
        self.fatal = fatal
        self.code = code


class Budget:
    """Bytes read and not yet handled, at most ``limit`` (one event past it when nothing
    else is held, so the largest event allowed can always be read). One taker: the reader."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    async def take(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        self._freed.set()


@dataclass
class Received:
    event: Event
    size: int          # the bytes it was charged to the connection's budget


def _text_problem_at(kind: str, data: dict) -> None:
    """BadEvent naming the first field (``context.conversation_id``, ``names[2]``) whose
    string, or key, holds a NUL or a lone surrogate. A loop, not recursion: data nested
    as deep as the JSON parser allows is walked too."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            found = text_problem(value)
            if found is not None:
                raise BadEvent(f"{kind}: \"{path}\" holds {found[1]} at character "
                               f"{found[0]}; send UTF-8 text without it",
                               code="invalid_characters")
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if text_problem(key) is not None:
                    raise BadEvent(f"{kind}: a key in \"{path or 'data'}\" holds "
                                   f"{text_problem(key)[1]}; send UTF-8 text without it",
                                   code="invalid_characters")
                stack.append((where, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def error_code(e: BaseException) -> str:
    """The ``error`` event's code for a failure: HTTP's codes where HTTP has one (``busy``
    where HTTP answers 503), else the error's class."""
    if isinstance(e, ProtocolError):
        return e.code
    if isinstance(e, Busy):
        return "busy"
    if isinstance(e, StageOverrun):
        return "deadline_exceeded"
    return type(e).__name__


class ProtocolError(Exception):
    """A well-formed event whose data is wrong or out of place, or a request that failed;
    answered with ``error``, then the events in ``then`` (the ones that end the request for
    clients that wait for them, as Home Assistant's do)."""

    def __init__(self, message: str, code: str = "bad_event", then: tuple = ()):
        super().__init__(message)
        self.code = code
        self.then = then


async def read_event(reader: asyncio.StreamReader,
                     budget: Optional[Budget] = None) -> Optional[Received]:
    """The next event, None at the end of the stream; BadEvent for one that is malformed.
    ``budget``: charged with the event's bytes before its data and payload are read (the
    caller gives them back once the event is handled)."""
    try:
        line = await reader.readline()
    except ValueError:           # asyncio's LimitOverrunError, as readline raises it
        raise BadEvent(f"an event header longer than {MAX_LINE} bytes", fatal=True) from None
    if not line.endswith(b"\n"):
        return None              # the end of the stream (a cut line with it)
    try:
        header = json.loads(line)
    except RecursionError:
        raise BadEvent("an event header nested too deep") from None
    except ValueError:
        raise BadEvent("an event header that is not JSON (one JSON object per line)") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise BadEvent("an event header without a \"type\" string")
    if text_problem(header["type"]) is not None:
        raise BadEvent(f"an event type holding {text_problem(header['type'])[1]}",
                       code="invalid_characters")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise BadEvent(f"event {header['type']!r}: \"data\" must be an object")
    sizes = []
    for key, limit in (("data_length", MAX_DATA), ("payload_length", MAX_PAYLOAD)):
        n = header.get(key) or 0
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= limit:
            raise BadEvent(f"event {header['type']!r}: {key} must be a size from 0 to "
                           f"{limit} bytes, found {n!r}", fatal=True)
        sizes.append(n)
    size = len(line) + sizes[0] + sizes[1]
    if budget is not None:
        await budget.take(size)     # back-pressure: the client waits, not our memory
    try:
        event = await _rest(reader, header, data, sizes)
    except BaseException:
        if budget is not None:
            budget.give(size)
        raise
    if event is None:
        if budget is not None:
            budget.give(size)
        return None
    return Received(event, size)


async def _rest(reader: asyncio.StreamReader, header: dict, data: dict,
                sizes: list[int]) -> Optional[Event]:
    try:
        extra = await reader.readexactly(sizes[0]) if sizes[0] else b""
        payload = await reader.readexactly(sizes[1]) if sizes[1] else None
    except asyncio.IncompleteReadError:
        return None
    if extra:
        try:
            more = json.loads(extra)
        except (ValueError, RecursionError):
            more = None
        if not isinstance(more, dict):
            raise BadEvent(f"event {header['type']!r}: its data is not a JSON object")
        data = {**data, **more}
    _text_problem_at(header["type"], data)
    return Event(type=header["type"], data=data, payload=payload)


# ---------------------------------------------------------------------------- data checks

def text_field(event: Event, key: str = "text", required: bool = True) -> Optional[str]:
    value = event.data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{event.type}: \"{key}\" must be a string, found "
                            f"{type(value).__name__ if value is not None else 'nothing'}")
    found = text_problem(value)
    if found is not None:       # never for the model, piper or the transcript
        raise ProtocolError(f"{event.type}: \"{key}\" holds {found[1]} at character "
                            f"{found[0]}; send UTF-8 text without it", "invalid_characters")
    return value


def int_field(event: Event, key: str, lo: int, hi: int) -> int:
    value = event.data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{event.type}: \"{key}\" must be an integer from {lo} to {hi}, "
                            f"found {value!r}")
    return value


def object_field(event: Event, key: str) -> dict[str, Any]:
    value = event.data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{event.type}: \"{key}\" must be an object")
    return value


def language_code(value: Optional[str]) -> Optional[str]:
    """``en``, ``en-US``, ``en_US`` -> ``en``; None or empty -> None."""
    if not value or not isinstance(value, str):
        return None
    return value.replace("_", "-").split("-")[0].strip().lower() or None
