"""The Wyoming server: Home Assistant's speech-to-text, text-to-speech and conversation
services, on the daemon's own asyncio loop (no thread, no second loop).

Each connection reads its events in one task and works through them in order in another,
so a long answer or a stream of text to speak never stops the reading: ``describe`` is
answered at once whatever else the connection does, and a client that goes away is seen at
once and its work cancelled. Malformed events get an ``error`` event and the connection
goes on where it can (events.py); an event with wrong data gets an ``error`` naming the
field. Blocking work runs off the loop: whisper and piper on the process's speech workers
(``frontend.MediaWork``, shared with the HTTP API: queued, refused with an ``error`` event of
code ``busy`` past the line, given up past ``http.audio_deadline_s``), the model's turns
through the conversation.

Wyoming has no authentication, so what one client can hold is bounded: bytes read and not
yet handled (``CONNECTION_BYTES``, then the reader stops reading and TCP pushes back),
connections (``MAX_CONNECTIONS``, at most ``PER_ADDRESS`` from one address; at the cap a
connection with nothing to do for ``EVICT_IDLE_S`` makes room, the longest idle first, so
held slots cannot lock Home Assistant out), time without anything to do
(``wyoming.idle_timeout_s``: nothing read while nothing is handled, or a send the client does
not take), and log lines
(a few per cause, then a count: log_limit). A closed connection drops everything it held
(unsent data too: a stop never waits on a client) and the heap's free pages are given back.

A non-loopback ``wyoming.uri`` is refused unless
``wyoming.allow_lan`` says the network may use it: the rule the HTTP API applies with its
key (address.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Optional

from wyoming.error import Error
from wyoming.event import Event, async_write_event

from assistant.config import Config
from assistant.errors import AssistantError, DeviceError
from assistant.frontend import Limits, MediaWork, media_work, size_limits, started
from assistant import memtrim
from assistant.log_limit import LogLimit
from assistant.wyoming.address import check_uri, parse_uri
from assistant.wyoming.asr import AsrSession
from assistant.wyoming.conversations import ConversationStore
from assistant.wyoming.events import (MAX_LINE, BadEvent, Budget, ProtocolError, error_code,
                                      read_event)
from assistant.wyoming.handle import HandleSession
from assistant.wyoming.info import info_event
from assistant.wyoming.tts import TtsSession

log = logging.getLogger(__name__)

_QUEUE = 64          # events a connection may have waiting for its worker (then TCP waits)
MAX_CONNECTIONS = 32  # Home Assistant opens one per request; more at once is a runaway client
PER_ADDRESS = 24      # one address cannot take every slot: the rest stay for other clients
EVICT_IDLE_S = 2.0    # at the cap, a connection idle this long is closed to make room
# Bytes of events a connection may have read and not yet handled; past it the reader waits
# and TCP pushes back on the client. One event of any allowed size is always read when the
# connection holds nothing, so a connection holds at most this plus one largest event.
CONNECTION_BYTES = 1 << 20
_TRIM_AFTER = 1 << 20  # a connection that held this much: free heap pages go back (memtrim)


@dataclass
class Services:
    """What the sessions serve from: the shared conversation, the loaded speech models and
    the process's speech workers."""

    cfg: Config
    conversation: object               # assistant.conversation.Conversation
    asr: object = None                 # assistant.audio.asr.Transcriber
    voices: object = None              # assistant.audio.tts.VoiceSet
    media: MediaWork = field(default=None)
    store: ConversationStore = field(default=None)

    def __post_init__(self):
        if self.store is None:
            self.store = ConversationStore(self.cfg.wyoming)

    # From the running config (the conversation's, which SIGHUP replaces), as HTTP reads
    # its own per request.
    @property
    def limits(self) -> Limits:
        """A conversation request's size: the HTTP API's (``http.max_*``)."""
        return size_limits(self.conversation.cfg)

    @property
    def max_wait_s(self) -> float:
        """How long speech work may wait for a worker: ``http.max_wait_s``, as HTTP's."""
        return self.conversation.cfg.http.max_wait_s

    @property
    def idle_timeout_s(self) -> float:
        return self.conversation.cfg.wyoming.idle_timeout_s


class Connection:
    """One client: a reading task, a worker that handles its events in order, and an idle
    watch; whichever ends first ends the connection, and everything it held is dropped."""

    def __init__(self, services: Services, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.peer = writer.get_extra_info("peername")
        self.address = self.peer[0] if isinstance(self.peer, tuple) and self.peer else ""
        self._evicted = asyncio.Event()
        self.queue: asyncio.Queue = asyncio.Queue(_QUEUE)
        self.budget = Budget(CONNECTION_BYTES)
        self.held = 0                   # the most bytes this connection had read and not handled
        self._write = asyncio.Lock()
        self.logs = LogLimit(log, f"wyoming {self.peer}")
        self.sessions = (AsrSession(services, self.send), TtsSession(services, self.send),
                         HandleSession(services, self.send))
        self.services = services
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        self._last = self._clock()      # the last sign of life (see _idle)
        self._working = False           # the worker handles an event
        self._sends = 0                 # sends under way (a client that does not read: stuck)

    async def send(self, event: Event) -> None:
        self._sends += 1
        try:
            async with self._write:
                await async_write_event(event, self.writer)
        finally:
            self._sends -= 1
            self._last = self._clock()

    async def error(self, text: str, code: str) -> None:
        self.logs.log(logging.INFO, code, "wyoming %s: %s (%s)", self.peer, text, code)
        await self.send(Error(text=text, code=code).event())

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._work(), name=f"wyoming {self.peer}"),
                 asyncio.create_task(self._read(), name=f"wyoming {self.peer} reader"),
                 asyncio.create_task(self._idle(), name=f"wyoming {self.peer} idle")]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()               # a turn for nobody stops here
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close()

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                try:
                    got = await read_event(self.reader, self.budget)
                except BadEvent as e:
                    self._last = self._clock()
                    await self.error(str(e), e.code)
                    if e.fatal:
                        return
                    continue
                if got is None:
                    return                      # the client went away (or said all)
                self._last = self._clock()
                self.held = max(self.held, self.budget.used)
                event = got.event
                if event.type == "describe":
                    await self.send(info_event(self.services))
                elif event.type == "ping":
                    await self.send(Event("pong", {"text": event.data.get("text")}))
                else:
                    await self.queue.put(got)   # full: TCP pushes back on the client
                    continue
                self.budget.give(got.size)

    def idle_for(self) -> float:
        """Seconds with nothing to do (0 while a turn or speech job runs for it)."""
        if self._working and not self._sends:
            return 0.0
        return self._clock() - self._last

    def evict(self) -> None:
        """Close this connection to make room for another client (it was idle)."""
        self._evicted.set()

    async def _idle(self) -> None:
        """Return once the connection has been idle for ``wyoming.idle_timeout_s`` (read
        per check, so a SIGHUP's value applies): nothing read from the client and nothing
        being handled, or a send the client has not read for that long."""
        while True:
            timeout = self.services.idle_timeout_s
            now = self._clock()
            if self._working and not self._sends:
                self._last = now                # a turn or a speech job runs: not idle
            left = self._last + timeout - now
            evicted = self._evicted.is_set()
            if left <= 0 or evicted:
                if evicted:
                    code, text = "evicted", ("closed to make room for another client (every "
                                             "connection slot was taken; this one was idle)")
                else:
                    code, text = "idle_timeout", (f"nothing was sent for {timeout:g} s "
                                                  f"(wyoming.idle_timeout_s); connection closed")
                self.logs.log(logging.INFO, code, "wyoming %s: %s", self.peer, text)
                if not self.writer.transport.get_write_buffer_size():   # it reads: tell it
                    with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                        await asyncio.wait_for(self.send(Error(text=text, code=code).event()),
                                               1.0)
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._evicted.wait(), min(left, 1.0))

    async def _close(self) -> None:
        """Close the socket without waiting on the client: unsent data (a client that does
        not read) is dropped. What the sessions held is dropped with them, and the heap's
        free pages go back to the system after a connection that held much."""
        transport = self.writer.transport
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            self.writer.close()
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        self.logs.close()
        held = max(self.held, *(getattr(s, "held", 0) for s in self.sessions))
        for session in self.sessions:
            close = getattr(session, "close", None)
            if close is not None:
                close()
        self.sessions = ()
        while not self.queue.empty():
            self.queue.get_nowait()
        if held >= _TRIM_AFTER:
            memtrim.soon()

    async def _work(self) -> None:
        while True:
            got = await self.queue.get()
            event = got.event
            self._working = True
            try:
                if not await self._dispatch(event):     # not ours: dropped, as the spec says
                    log.debug("wyoming %s: %s ignored", self.peer, event.type)
            except ProtocolError as e:
                await self.error(str(e), e.code)
                for done in e.then:
                    await self.send(done)
            except AssistantError as e:
                await self.error(str(e), error_code(e))
            except ConnectionError:
                return
            except Exception as e:              # one bad request must not end the server
                self.logs.log(logging.ERROR, "internal_error", "wyoming %s: %s failed",
                              self.peer, event.type, exc_info=True)
                await self.error(f"internal error: {type(e).__name__}: {e}", "internal_error")
            finally:
                self._working = False
                self._last = self._clock()
                del event
                self.budget.give(got.size)
                got = None

    async def _dispatch(self, event: Event) -> bool:
        for session in self.sessions:
            if await session.on_event(event):
                return True
        return False


class WyomingServer:
    """The listening socket and its connections: ``await start()``, ``await stop()``."""

    def __init__(self, cfg: Config, conversation, parts, make_zeroconf=None,
                 media: Optional[MediaWork] = None):
        """``media``: the speech workers shared with the HTTP API (whoever made them closes
        them); None: the server's own."""
        self.cfg = cfg
        self.host, self.port = check_uri(cfg) or parse_uri(cfg)
        self._own_media = media is None
        self.services = Services(cfg, conversation, getattr(parts, "asr", None),
                                 getattr(parts, "voices", None),
                                 media if media is not None else media_work(cfg))
        self._server: Optional[asyncio.AbstractServer] = None
        self._connections: dict[asyncio.Task, Connection] = {}
        self._make_zeroconf = make_zeroconf
        self.announcer = None

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    async def start(self) -> None:
        """Listen (DeviceError when the address cannot be had) and announce."""
        try:
            self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                      limit=MAX_LINE, reuse_address=True)
        except OSError as e:
            raise DeviceError(f"wyoming.uri: cannot listen on {self.cfg.wyoming.uri}: "
                              f"{e.strerror or e}; choose another address or port") from None
        self.port = self._server.sockets[0].getsockname()[1]    # the real one for port 0
        log.info("Wyoming server on %s (speech-to-text, text-to-speech, conversation)",
                 self.uri)
        from assistant.wyoming.zeroconf import Announcer, wanted

        if wanted(self.cfg.wyoming.zeroconf, self.host):
            try:
                self.announcer = Announcer(self.host, self.port,
                                           self.cfg.wyoming.zeroconf_name, self._make_zeroconf)
                await self.announcer.start()
            except Exception as e:      # discovery is a convenience: the server still serves
                log.error("the Wyoming service could not be announced (zeroconf): %s; add it "
                          "in Home Assistant by host and port", e)
                self.announcer = None

    def _make_room(self, address: str) -> bool:
        """Whether a new connection from ``address`` may be served: under the caps, or once
        the longest-idle connection (of that address first, when it holds its share) is
        evicted. Connections already evicted and closing do not count."""
        open_ = [c for c in self._connections.values() if not c._evicted.is_set()]
        for pool, cap in (([c for c in open_ if c.address == address], PER_ADDRESS),
                          (open_, MAX_CONNECTIONS)):
            if len(pool) < cap:
                continue
            victim = max(pool, key=Connection.idle_for)
            if victim.idle_for() < EVICT_IDLE_S:
                return False
            victim.evict()
            open_.remove(victim)
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else ""
        if not self._make_room(address):
            log.warning("wyoming: %d connections are open and none idle; refusing one more "
                        "from %s", len(self._connections), peer)
            with contextlib.suppress(ConnectionError):
                await async_write_event(Error(
                    text=f"too many connections ({MAX_CONNECTIONS} are open, at most "
                         f"{PER_ADDRESS} from one address); try again shortly",
                    code="too_many_connections").event(), writer)
            writer.close()
            return
        task = asyncio.current_task()
        connection = Connection(self.services, reader, writer)
        self._connections[task] = connection
        try:
            await connection.run()
        except asyncio.CancelledError:
            pass                 # the server stops: this task is the connection's top level
        finally:
            self._connections.pop(task, None)

    async def stop(self) -> None:
        if self.announcer is not None:
            with contextlib.suppress(Exception):
                await self.announcer.stop()
            self.announcer = None
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await server.wait_closed()
            log.info("Wyoming server stopped")
        if self._own_media:
            self.services.media.close()


async def start_wyoming(cfg: Config, conversation, parts, required: bool = True,
                        media: Optional[MediaWork] = None) -> Optional[WyomingServer]:
    """The server started, or None when ``wyoming.enabled`` is false. With ``required=False``
    (``run``: the voice loop goes on) a failure to listen is logged and None returned.
    ``media``: the process's speech workers (``frontend.media_work``), shared with HTTP."""
    if not cfg.wyoming.enabled:
        return None
    return await started(WyomingServer(cfg, conversation, parts, media=media), required,
                         "the Wyoming server")
