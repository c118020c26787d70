"""OpenAI's error object, and how the assistant's errors map onto HTTP statuses.

Every error the API answers is ``{"error": {"message", "type", "param", "code"}}``: 400 for
a request that is wrong (``param`` names the field), 401, 404, 408, 413, and 503 with
``Retry-After`` when the model or the speech workers are busy.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any, Optional

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from assistant.conversation import Busy
from assistant.errors import AssistantError, BackendError, ContextFullError
from assistant.health import StageOverrun


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


def bad(message: str, param: Optional[str] = None, code: Optional[str] = "invalid_value",
        status: int = 400) -> ApiError:
    """A 400 (by default) naming the request's field at fault."""
    return ApiError(status, message, param=param, code=code)


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def busy(message: str, retry_s: float, code: str = "busy") -> ApiError:
    return ApiError(503, message, type="server_error", code=code,
                    headers={"Retry-After": retry_after(retry_s)})


_STATUS_CODES = {400: "bad_request", 401: "invalid_api_key", 404: "not_found",
                 405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large",
                 415: "unsupported_media_type", 503: "busy"}


def from_http_exception(e: web.HTTPException) -> ApiError:
    """aiohttp's own errors (no route, wrong method, body too large) as error objects."""
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


def error_for(e: BaseException) -> ApiError:
    """The HTTP answer to an error of the conversation or a speech worker."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Busy):
        return busy(str(e), e.retry_after)
    if isinstance(e, StageOverrun):
        return busy(str(e), 5.0, code="deadline_exceeded")
    if isinstance(e, ContextFullError):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, BackendError):
        if "no language model" in str(e):
            return ApiError(503, str(e), type="server_error", code="model_not_loaded")
        return ApiError(500, f"the language model failed: {e}", type="server_error",
                        code="backend_error")
    if isinstance(e, AssistantError):
        return ApiError(500, str(e), type="server_error", code="internal_error")
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                    code="internal_error")


class ServerLog(logging.LoggerAdapter):
    """aiohttp's server logger (``AppRunner(logger=...)``) with a request its parser refuses
    (a NUL in a header, a bad request line: a 400 the client caused) logged as one INFO line
    without a traceback; everything else as aiohttp logs it (an ERROR with its traceback)."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        e = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(e, HttpProcessingError) and 400 <= e.code < 500:
            # aiohttp's message spans lines (the bytes at fault, a caret under them).
            words = " ".join(l.strip() for l in str(e.message).splitlines()
                             if l.strip() and l.strip() != "^")
            where = f" from {args[0]}" if args else ""
            self.info("refused a malformed request%s (%d): %s", where, e.code, words[:300])
            return
        super().exception(msg, *args, exc_info=exc_info, **kw)
