"""The HTTP server: an aiohttp application on the daemon's own asyncio loop.

No second loop and no thread per request: handlers are coroutines on the loop that runs the
voice pipeline; blocking work goes to worker threads (whisper and piper to the media
workers of ``assistant.frontend``, a request's picture to one worker of its own).
Every request but the page's own static files carries ``Authorization: Bearer
<http.api_key>`` when a key is set; bodies are limited to ``http.max_body_mb`` (413 before
reading when the length is announced) and must arrive within ``http.body_timeout_s``;
connections that send no request in time are closed (``connections.py``). CORS headers are
sent only for the origins in ``http.cors_origins``. Every error is OpenAI's error object
(``errors.py``). The page's live view is ``events.Hub`` on ``GET /events``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional

from aiohttp import web

from assistant.config import Config, ConfigError
from assistant.conversation import Conversation, TurnGate
from assistant.errors import DeviceError
from assistant.frontend import Limits, MediaWork, media_work, size_limits, started
from assistant.http.connections import Arrivals, DeadlineSite
from assistant.http.errors import ApiError, ServerLog, from_http_exception
from assistant.http.events import Hub

log = logging.getLogger(__name__)

# The page's own files: nothing else is served (no directory listing, no path from the URL).
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
            "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'")

# ---------------------------------------------------------------------------- listen address

def parse_listen(value: str, source: str = "<config>") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); ConfigError otherwise."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{source}: http.listen: expected \"HOST:PORT\" (e.g. "
                           f"\"127.0.0.1:8088\"), found {value!r}: {why}",
                           key="http.listen", source=source)
    text = str(value).strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise bad("an IPv6 address needs the form [ADDRESS]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise bad("no port")
        if ":" in host:
            raise bad("write an IPv6 address in brackets, e.g. [::1]:8088")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise bad("the port must be a number from 0 to 65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False          # a name (or an empty host: every address) is not loopback


def check_listen(cfg: Config) -> tuple[str, int]:
    """The address to listen on; ConfigError (exit 78) when it is not loopback and there is
    no API key."""
    host, port = parse_listen(cfg.http.listen, cfg.source)
    if not is_loopback(host) and not cfg.http.api_key:
        raise ConfigError(
            f"{cfg.source}: http.api_key: required when http.listen is not a loopback address "
            f"(found listen {cfg.http.listen!r} and no key); set http.api_key or listen on "
            f"127.0.0.1", key="http.api_key", source=cfg.source)
    return host, port


def make_gate(cfg: Config) -> TurnGate:
    """The conversation's turn gate with the HTTP queue limits."""
    return TurnGate(max_waiting=cfg.http.max_queue, max_wait_s=cfg.http.max_wait_s)


# ---------------------------------------------------------------------------- the app

CTX = web.AppKey("ctx", object)


@dataclass
class Context:
    cfg: Config
    conversation: Conversation
    parts: object                 # pipeline.Components: asr, voices
    hub: Hub
    started: int
    media: MediaWork              # speech and transcription workers (Wyoming's too)
    pictures: MediaWork           # a chat request's picture: decoded, encoded
    arrivals: Arrivals            # connections that owe their first request
    cache: dict = field(default_factory=dict)     # the camera snapshot's JPEG, by shot id

    @property
    def limits(self) -> Limits:
        """A chat request's size (from cfg, which SIGHUP may replace)."""
        return size_limits(self.cfg)


def _cors_headers(cfg: Config, request: web.Request) -> dict:
    origin = request.headers.get("Origin")
    allowed = cfg.http.cors_origins
    if not origin or not allowed:
        return {}
    if "*" in allowed:
        return {"Access-Control-Allow-Origin": "*"}
    if origin in allowed:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {}


def make_app(cfg: Config, conversation: Conversation, parts, voice=None,
             has_mic: bool = False, media: Optional[MediaWork] = None) -> web.Application:
    """The application: API routes, the page, the event stream; middlewares for CORS, errors,
    limits and auth. ``media``: the process's speech workers (``frontend.media_work``)."""
    from assistant.http import openai_api

    limit = int(cfg.http.max_body_mb * 1024 * 1024)
    key = (cfg.http.api_key or "").encode()
    public = set(PAGE_FILES)
    arrivals = Arrivals()

    @web.middleware
    async def arrived(request: web.Request, handler):
        arrivals.arrived(request)           # its connection's header deadline is met
        return await handler(request)

    @web.middleware
    async def cors(request: web.Request, handler):
        headers = _cors_headers(cfg, request)
        if request.method == "OPTIONS" and headers:
            headers.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                            "Access-Control-Allow-Headers": "Authorization, Content-Type",
                            "Access-Control-Max-Age": "600"})
            return web.Response(status=204, headers=headers)
        resp = await handler(request)
        if headers and not resp.prepared:
            resp.headers.update(headers)
        return resp

    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            resp = await handler(request)
        except ApiError as e:
            if e.status >= 500:
                log.log(logging.INFO if e.status == 503 else logging.ERROR, "%s %r: %d %s",
                        request.method, request.path, e.status, e.message)
            resp = e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = from_http_exception(e).response()
            for h in ("Allow",):
                if h in e.headers:
                    resp.headers[h] = e.headers[h]
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:
            log.exception("%s %r failed", request.method, request.path)
            resp = ApiError(500, f"internal error: {type(e).__name__}: {e}",
                            type="server_error", code="internal_error").response()
        if not resp.prepared:
            resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        return resp

    @web.middleware
    async def guard(request: web.Request, handler):
        if request.path not in public and key:
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            # aiohttp keeps header bytes that are not UTF-8 as surrogates: give them back
            # as bytes (a wrong key, not an internal error).
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode("utf-8", "surrogateescape"), key):
                raise ApiError(401, "missing or wrong API key: send the header "
                               "'Authorization: Bearer <http.api_key>'",
                               code="invalid_api_key",
                               headers={"WWW-Authenticate": 'Bearer realm="rkvlm-assistant"'})
        length = request.content_length
        if length is not None and length > limit:
            raise ApiError(413, f"the request body is {length} bytes; the limit is "
                           f"{limit} bytes (http.max_body_mb: {cfg.http.max_body_mb:g})",
                           code="request_too_large")
        return await handler(request)

    app = web.Application(client_max_size=limit, middlewares=[arrived, cors, errors, guard])
    hub = Hub(conversation, voice, has_mic)
    h = cfg.http
    app[CTX] = Context(cfg, conversation, parts, hub, int(time.time()),
                       media=media if media is not None else media_work(cfg),
                       # One picture decoded and encoded at a time (a 16-megapixel one
                       # takes 48 MB decoded), watched as the voice loop's encodes are.
                       pictures=MediaWork(1, h.max_queue, h.max_wait_s,
                                          cfg.deadlines.encode_s, "deadlines.encode_s"),
                       arrivals=arrivals)

    page = resources.files("assistant.http") / "page"
    files = {name: (page / name).read_bytes() for name, _ in set(PAGE_FILES.values())}

    def static(name: str, ctype: str):
        async def handler(request: web.Request) -> web.Response:
            headers = {"Content-Type": ctype, "Cache-Control": "no-cache"}
            if name == "index.html":
                headers.update({"Content-Security-Policy": PAGE_CSP,
                                "Referrer-Policy": "no-referrer"})
            return web.Response(body=files[name], headers=headers)
        return handler

    for path, (name, ctype) in PAGE_FILES.items():
        app.router.add_get(path, static(name, ctype))
    app.router.add_get("/events", hub.stream, allow_head=False)   # a stream has no head
    openai_api.add_routes(app)
    return app


class HttpServer:
    """The app on a TCP site of the running loop: ``await start()``, ``await stop()``."""

    def __init__(self, cfg: Config, conversation: Conversation, parts, voice=None,
                 has_mic: bool = False, media: Optional[MediaWork] = None):
        """``media``: the speech workers shared with the Wyoming server (whoever made them
        closes them); None: the server's own."""
        self.cfg = cfg
        self.host, self.port = check_listen(cfg)
        self._own_media = media is None
        self.app = make_app(cfg, conversation, parts, voice, has_mic, media)
        self._runner: Optional[web.AppRunner] = None

    @property
    def hub(self) -> Hub:
        return self.app[CTX].hub

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else (self.host or "127.0.0.1")
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Listen; DeviceError when the address cannot be had (in use, not on this host)."""
        # handler_cancellation: a client that goes away cancels its request, so a queued or
        # running turn for nobody stops (the model is freed for the next one).
        # keepalive_timeout: an idle connection between requests is closed (also one that
        # sends its next request's headers too slowly); a new one has header_timeout_s.
        # lingering_time: the rest of a body left unread (a refused request) is waited for
        # that long before the connection is closed. logger: a malformed request is one
        # INFO line, not a traceback at ERROR.
        h = self.cfg.http
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=2.0, keepalive_timeout=h.idle_timeout_s,
                               lingering_time=h.body_timeout_s, logger=ServerLog())
        await runner.setup()
        site = DeadlineSite(runner, self.host or None, self.port, h.header_timeout_s,
                            self.app[CTX].arrivals)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise DeviceError(f"http.listen: cannot listen on {self.cfg.http.listen}: "
                              f"{e.strerror or e}; choose another address or port") from None
        self._runner = runner
        self.hub.start()
        for address in runner.addresses:          # the real port when listen asks for :0
            self.port = address[1]
            break
        log.info("HTTP API and page on %s (%s)", self.url,
                 "API key required" if self.cfg.http.api_key else "no API key: loopback only")

    async def stop(self) -> None:
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        await self.hub.close()
        await runner.cleanup()
        if self._own_media:
            self.app[CTX].media.close()
        self.app[CTX].pictures.close()
        log.info("HTTP server stopped")


async def start_server(cfg: Config, conversation: Conversation, parts, voice=None,
                       has_mic: bool = False, required: bool = True,
                       media: Optional[MediaWork] = None) -> Optional[HttpServer]:
    """Make and start the server. With ``required=False`` (``run``: the voice loop goes on)
    a failure to listen is logged and None returned."""
    return await started(HttpServer(cfg, conversation, parts, voice, has_mic, media),
                         required, "the HTTP API")
