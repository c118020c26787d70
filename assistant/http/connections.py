"""Connections that say nothing are closed: a deadline for a new connection's first request.

aiohttp closes an idle keep-alive connection after ``keepalive_timeout`` (``http.idle_timeout_s``;
that also ends one that sends its next request's headers too slowly), but it has no limit
for a new connection that sends no request, or its headers a byte at a time: hundreds of
those would hold their sockets and file descriptors for ever. So every accepted connection
gets ``http.header_timeout_s`` for its first request to reach the application; past it the
server answers 408 and closes it.

``DeadlineSite`` is aiohttp's TCP site with each connection's protocol (aiohttp's request
handler) wrapped in ``_Watched``; the application's outermost middleware calls
``Arrivals.arrived(request)`` when a request's headers are complete.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

from aiohttp import web

log = logging.getLogger(__name__)

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s")
_TIMEOUT_BODY = (b'{"error": {"message": "no complete request arrived in time '
                 b'(http.header_timeout_s)", "type": "invalid_request_error", "param": null, '
                 b'"code": "request_timeout"}}')


class Arrivals:
    """The connections still waiting for their first request."""

    def __init__(self):
        self._waiting: dict[object, "_Watched"] = {}
        self.closed = 0               # connections closed for saying nothing in time

    def arrived(self, request: web.Request) -> None:
        watched = self._waiting.pop(request.transport, None)
        if watched is not None:
            watched.cancel_deadline()

    def waiting(self, transport, watched: "_Watched") -> None:
        self._waiting[transport] = watched

    def gone(self, transport, expired: bool = False) -> None:
        self._waiting.pop(transport, None)
        self.closed += expired

    def __len__(self) -> int:
        return len(self._waiting)


class _Watched(asyncio.Protocol):
    """aiohttp's protocol for one connection, passed every call, with a deadline."""

    def __init__(self, inner: asyncio.Protocol, timeout_s: float, arrivals: Arrivals):
        self._inner = inner
        self._timeout_s = timeout_s
        self._arrivals = arrivals
        self._timer: Optional[asyncio.TimerHandle] = None
        self._transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._arrivals.waiting(transport, self)
        self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._expire)
        self._inner.connection_made(transport)

    def cancel_deadline(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._arrivals.gone(transport, expired=True)
        peer = transport.get_extra_info("peername")
        log.debug("closing a connection from %s: no complete request within %g s",
                  peer, self._timeout_s)
        transport.write(_TIMEOUT_RESPONSE % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
        transport.close()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received()

    def connection_lost(self, exc) -> None:
        self.cancel_deadline()
        if self._transport is not None:
            self._arrivals.gone(self._transport)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class DeadlineSite(web.BaseSite):
    """A TCP site whose connections must send a request within ``header_timeout_s``."""

    def __init__(self, runner: web.BaseRunner, host: Optional[str], port: int,
                 header_timeout_s: float, arrivals: Arrivals):
        super().__init__(runner)
        self._host = host
        self._port = port
        self._header_timeout_s = header_timeout_s
        self._arrivals = arrivals

    @property
    def name(self) -> str:
        return f"http://{self._host or '0.0.0.0'}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.Protocol:
            return _Watched(server(), self._header_timeout_s, self._arrivals)

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, backlog=self._backlog, reuse_address=True)
