"""The HTTP server: an aiohttp application on the daemon's own asyncio loop.

No second loop and no thread per request: handlers are coroutines on the loop that runs the
voice pipeline; blocking work (image decoding, whisper, piper, encoding) goes to worker
threads with ``asyncio.to_thread``. Every request but the page's own static files carries
``Authorization: Bearer <http.api_key>`` when a key is set; bodies are limited to
``http.max_body_mb`` (413 before reading when the length is announced); CORS headers are
sent only for the origins in ``http.cors_origins``. Every error is OpenAI's error object:
``{"error": {"message", "type", "param", "code"}}``.

The page's live view comes from ``Hub``: it listens to the conversation (every turn of every
front-end) and to the voice output (speaking or not), and streams both as server-sent events
on ``GET /events``.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional

from aiohttp import web

from assistant.config import Config, ConfigError
from assistant.conversation import Conversation, TurnGate
from assistant.errors import DeviceError
from assistant.turn import Turn

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

# Turns the page gets when it (re)connects.
_RECENT_TURNS = 50
# Events a slow page may fall behind by before it is dropped (it reconnects).
_CLIENT_QUEUE = 2000
_HEARTBEAT_S = 15.0
_STATE_POLL_S = 0.2


# ---------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


_STATUS_CODES = {400: "bad_request", 401: "invalid_api_key", 404: "not_found",
                 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type",
                 503: "busy"}


def _from_http_exception(e: web.HTTPException) -> ApiError:
    status = e.status
    if status == 404:
        msg = "no such endpoint; see GET /v1/models, POST /v1/chat/completions, " \
              "POST /v1/audio/transcriptions, POST /v1/audio/speech"
    elif status == 405:
        msg = f"method not allowed here (allowed: {e.headers.get('Allow', '?')})"
    elif status == 413:
        msg = e.text if e.text and "exceeds" in e.text else "the request body is too large"
        msg = f"{msg} (http.max_body_mb)"
    else:
        msg = e.reason or "error"
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return ApiError(status, msg, type=type_, code=_STATUS_CODES.get(status))


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


# ---------------------------------------------------------------------------- live events

class Hub:
    """Turns and state for the page: every front-end's turns, as they happen."""

    def __init__(self, conversation: Conversation, voice=None, has_mic: bool = False):
        self.conversation = conversation
        self.voice = voice                          # VoiceOut (its .speaking), or None
        self.idle = "listening" if has_mic else "ready"
        self.recent: collections.deque[dict] = collections.deque(maxlen=_RECENT_TURNS)
        self.active: dict[int, dict] = {}
        self.state = self.idle
        self._clients: set[asyncio.Queue] = set()
        self._unsubscribe = None
        self._poll: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._unsubscribe = self.conversation.subscribe(self._on_event)
        if self.voice is not None:
            self._poll = asyncio.get_running_loop().create_task(self._watch_voice())

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)
        for q in list(self._clients):
            self._put(q, None)                     # each event stream ends

    # -- sources

    def _on_event(self, event: str, turn: Turn, data: dict) -> None:
        if event == "question":
            row = {"id": turn.id, "source": turn.source, "question": data.get("text", ""),
                   "answer": "", "image": False, "done": False, "time": turn.wall_time}
            self.active[turn.id] = row
            self.publish({"type": "question", **row})
        elif event == "piece":
            row = self.active.get(turn.id)
            if row is not None:
                row["answer"] += data.get("text", "")
            self.publish({"type": "piece", "id": turn.id, "text": data.get("text", "")})
        elif event == "done":
            row = self.active.pop(turn.id, None) or {"id": turn.id, "source": turn.source,
                                                     "question": turn.transcript}
            row.update(answer=data.get("answer", ""), image=turn.with_image, done=True,
                       finish=turn.finish, note=turn.note)
            self.recent.append(row)
            self.publish({"type": "done", **row})
        elif event == "timings":
            # After the turn (its first sound is known then): the page's bar of its wait.
            for row in self.recent:
                if row["id"] == turn.id:
                    row["stages"] = data["stages"]
            self.publish({"type": "timings", "id": turn.id, "stages": data["stages"]})
        self._update_state()

    async def _watch_voice(self) -> None:
        while True:
            await asyncio.sleep(_STATE_POLL_S)
            self._update_state()

    def _update_state(self) -> None:
        if self.voice is not None and getattr(self.voice, "speaking", False):
            state = "speaking"
        elif self.active:
            state = "thinking"
        else:
            state = self.idle
        if state != self.state:
            self.state = state
            self.publish({"type": "state", "state": state})

    # -- clients

    def publish(self, event: dict) -> None:
        for q in list(self._clients):
            self._put(q, event)

    def _put(self, q: asyncio.Queue, event: Optional[dict]) -> None:
        try:
            q.put_nowait(event)
        except asyncio.QueueFull:
            # Too far behind: end its stream; the page reconnects and gets the recent turns.
            self._clients.discard(q)
            while not q.empty():
                q.get_nowait()
            q.put_nowait(None)

    def snapshot(self) -> dict:
        turns = list(self.recent) + [dict(r) for r in self.active.values()]
        return {"type": "hello", "state": self.state, "turns": turns,
                "camera": self.conversation.scene is not None
                and self.conversation.scene.camera is not None}

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue(maxsize=_CLIENT_QUEUE)
        self._clients.add(q)
        try:
            await resp.write(_sse(self.snapshot()))
            while True:
                try:
                    event = await asyncio.wait_for(q.get(), _HEARTBEAT_S)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if event is None:
                    break
                await resp.write(_sse(event))
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self._clients.discard(q)
        return resp


def _sse(event: dict) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


# ---------------------------------------------------------------------------- the app

CTX = web.AppKey("ctx", object)


@dataclass
class Context:
    cfg: Config
    conversation: Conversation
    parts: object                 # pipeline.Components: asr, voices
    hub: Hub
    started: int
    cache: dict = field(default_factory=dict)     # the camera snapshot's JPEG, by shot id


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
             has_mic: bool = False) -> web.Application:
    """The application: API routes, the page, the event stream; middlewares for CORS, errors,
    limits and auth."""
    from assistant.http import openai_api

    limit = int(cfg.http.max_body_mb * 1024 * 1024)
    key = cfg.http.api_key or ""
    public = set(PAGE_FILES)

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
                log.log(logging.INFO if e.status == 503 else logging.ERROR, "%s %s: %d %s",
                        request.method, request.path, e.status, e.message)
            resp = e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = _from_http_exception(e).response()
            for h in ("Allow",):
                if h in e.headers:
                    resp.headers[h] = e.headers[h]
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:
            log.exception("%s %s failed", request.method, request.path)
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
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), key.encode()):
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

    app = web.Application(client_max_size=limit, middlewares=[cors, errors, guard])
    hub = Hub(conversation, voice, has_mic)
    app[CTX] = Context(cfg, conversation, parts, hub, int(time.time()))

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
    app.router.add_get("/events", hub.stream)
    openai_api.add_routes(app)
    return app


class HttpServer:
    """The app on a TCP site of the running loop: ``await start()``, ``await stop()``."""

    def __init__(self, cfg: Config, conversation: Conversation, parts, voice=None,
                 has_mic: bool = False):
        self.cfg = cfg
        self.host, self.port = check_listen(cfg)
        self.app = make_app(cfg, conversation, parts, voice, has_mic)
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
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host or None, self.port, reuse_address=True)
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
        log.info("HTTP server stopped")


async def start_server(cfg: Config, conversation: Conversation, parts, voice=None,
                       has_mic: bool = False, required: bool = True) -> Optional[HttpServer]:
    """Make and start the server. With ``required=False`` (``run``: the voice loop goes on)
    a failure to listen is logged and None returned."""
    server = HttpServer(cfg, conversation, parts, voice, has_mic)
    try:
        await server.start()
    except DeviceError as e:
        if required:
            raise
        log.error("%s; the voice assistant runs without the HTTP API", e)
        return None
    return server


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
