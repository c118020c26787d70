"""The OpenAI-compatible endpoints, over the shared conversation and speech models.

- ``POST /v1/chat/completions``: OpenAI's schema, streamed (server-sent
  ``chat.completion.chunk`` events ending with ``data: [DONE]``) or not. The API is stateless:
  every (user, assistant) pair before the last user message is the request's history, and
  the conversation reuses the model's cache when the request extends what it holds. Only the
  last user message's image goes to the model (a data: URL, PNG or JPEG); images of earlier
  messages are dropped and their text is kept. ``system`` / ``developer`` messages are ignored:
  the assistant's persona is the system prompt. Model ``rkvlm-camera`` attaches what the
  camera sees now to the last user message when it carries no image.
- ``GET /v1/models``, ``GET /v1/models/{id}``.
- ``POST /v1/audio/transcriptions``: multipart ``file`` (WAV, or any format PyAV decodes),
  ``language``, ``response_format`` json / text / verbose_json -> whisper.
- ``POST /v1/audio/speech``: ``input``, ``voice`` (a configured piper voice; OpenAI's names
  such as ``alloy`` mean the default voice, or the Chinese one for Chinese text),
  ``response_format: wav`` -> piper.
- ``GET /camera.jpg``: the camera's latest snapshot, for the page.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import re
import struct
import tempfile
import time
import uuid
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Optional

import numpy as np
from aiohttp import web

from assistant.conversation import Busy, Priority, Request
from assistant.errors import AssistantError, BackendError, ContextFullError
from assistant.http.server import CTX, ApiError, Context, retry_after
from assistant.llm.base import ImageEmbedding, TurnOptions
from assistant.turn import Turn

log = logging.getLogger(__name__)

MODEL = "rkvlm"
CAMERA_MODEL = "rkvlm-camera"
OWNER = "rkvlm-assistant"

# OpenAI's own voice names: they mean "the default voice" here.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova",
                           "sage", "shimmer", "verse", "marin", "cedar"})
SPEECH_FORMATS = ("wav",)
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")
MAX_SPEECH_CHARS = 4096
MAX_AUDIO_S = 600.0          # longest audio a transcription request may decode to
MAX_STOP = 4
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")
_DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)$", re.S)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model}", get_model)
    r.add_post("/v1/audio/transcriptions", transcriptions)
    r.add_post("/v1/audio/speech", speech)
    r.add_get("/camera.jpg", camera_jpeg)


def _ctx(request: web.Request) -> Context:
    return request.app[CTX]


# ---------------------------------------------------------------------------- validation

def _bad(message: str, param: Optional[str] = None, code: Optional[str] = "invalid_value",
         status: int = 400) -> ApiError:
    return ApiError(status, message, param=param, code=code)


async def _json_body(request: web.Request) -> dict:
    raw = await request.read()       # 413 past client_max_size
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, found {type(body).__name__}",
                   code="invalid_type")
    return body


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _opt_bool(body: dict, key: str) -> Optional[bool]:
    v = body.get(key)
    if v is None or isinstance(v, bool):
        return v
    raise _bad(f"'{key}' must be a boolean, found {_type_name(v)}", key, "invalid_type")


def _opt_int(body: dict, key: str, lo: Optional[int] = None, hi: Optional[int] = None) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{key}' must be an integer, found {_type_name(v)}", key, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(f"'{key}' must be from {lo} to {hi}, found {v}" if hi is not None
                   else f"'{key}' must be at least {lo}, found {v}", key)
    return v


def _opt_number(body: dict, key: str, lo: float, hi: float) -> Optional[float]:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"'{key}' must be a number, found {_type_name(v)}", key, "invalid_type")
    if not lo <= v <= hi:
        raise _bad(f"'{key}' must be from {lo:g} to {hi:g}, found {v}", key)
    return float(v)


def _opt_str(body: dict, key: str) -> Optional[str]:
    v = body.get(key)
    if v is None or isinstance(v, str):
        return v
    raise _bad(f"'{key}' must be a string, found {_type_name(v)}", key, "invalid_type")


# ---------------------------------------------------------------------------- images

def image_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from a PNG's IHDR or a JPEG's SOF header, without decoding."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise _bad("the PNG image is corrupt (no IHDR header)", "messages", "invalid_image")
        w, h = struct.unpack(">II", data[16:24])
        return "png", w, h
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                break
            marker = data[i + 1]
            if marker == 0xFF:                       # fill byte
                i += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:   # no length
                i += 2
                continue
            if marker in (0xD9, 0xDA):               # end of image / scan before a frame header
                break
            seglen = struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if i + 9 > len(data):
                    break
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return "jpeg", w, h
            i += 2 + seglen
        raise _bad("the JPEG image is corrupt (no frame header)", "messages", "invalid_image")
    raise _bad("the image is neither PNG nor JPEG (send a data:image/png or data:image/jpeg "
               "URL)", "messages", "invalid_image")


def parse_image_url(url: str) -> bytes:
    """The bytes of a data: URL (base64 PNG or JPEG); ApiError for anything else."""
    if url.startswith(("http://", "https://")):
        raise _bad("image URLs over http(s) are not fetched: the assistant is offline by "
                   "design; send the picture inline as a data:image/jpeg;base64,... URL",
                   "messages", "image_url_not_supported")
    m = _DATA_URL.match(url)
    if m is None:
        raise _bad("image_url must be a data: URL (data:image/jpeg;base64,...)", "messages",
                   "invalid_image_url")
    mtype = m["type"].strip().lower()
    if mtype not in _IMAGE_TYPES:
        raise _bad(f"unsupported image type {mtype or '(none)'!r}: send image/png or image/jpeg",
                   "messages", "invalid_image_format")
    if "base64" not in [p.strip().lower() for p in m["params"].split(";")]:
        raise _bad("the image data: URL must be base64 encoded (data:image/png;base64,...)",
                   "messages", "invalid_image_url")
    try:
        return base64.b64decode(re.sub(r"\s+", "", m["data"]), validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the image data: URL holds invalid base64", "messages",
                   "invalid_image_url") from None


def check_image(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Refuse a picture whose header announces more than ``max_pixels``: before any decode,
    so a decompression bomb costs nothing."""
    fmt, w, h = image_size(data)
    if w <= 0 or h <= 0:
        raise _bad(f"the {fmt.upper()} image announces a size of {w}x{h}", "messages",
                   "invalid_image")
    if w * h > max_pixels:
        raise _bad(f"the image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} "
                   f"(http.max_image_pixels): send a smaller picture", "messages",
                   "image_too_large")
    return fmt, w, h


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> RGB uint8 (H, W, 3). Blocking: run in a worker thread."""
    import cv2

    check_image(data, max_pixels)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.ndim != 3 or bgr.shape[0] * bgr.shape[1] > max_pixels:
        raise _bad("the image could not be decoded (corrupt or truncated PNG/JPEG)", "messages",
                   "invalid_image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------------------- chat requests

@dataclass
class ChatParams:
    model: str
    question: str
    history: list[tuple[str, str]]
    image: Optional[bytes] = None
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    options: TurnOptions = field(default_factory=TurnOptions)


def _content(msg: dict, i: int, role: str) -> tuple[str, list[str]]:
    """(text, image URLs) of one message's content."""
    content = msg.get("content")
    where = f"messages[{i}].content"
    if content is None:
        if role == "assistant":
            return "", []
        raise _bad(f"{where} is required for a {role} message", where, "invalid_type")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or an array of parts, found {_type_name(content)}",
                   where, "invalid_type")
    texts, images = [], []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _bad(f"{pw} must be an object, found {_type_name(part)}", pw, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{pw}.text must be a string, found {_type_name(text)}", pw,
                           "invalid_type")
            texts.append(text)
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise _bad(f"{pw}.image_url.url must be a string", pw, "invalid_type")
            images.append(url)
        else:
            raise _bad(f"{pw}: content part type {kind!r} is not supported (text, image_url)",
                       pw, "unsupported_content")
    return "\n".join(texts), images


def parse_chat(body: dict, ctx: Context) -> ChatParams:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' must be a string: rkvlm or rkvlm-camera", "model",
                   "invalid_type" if model is not None else "missing_required_parameter")
    if model not in (MODEL, CAMERA_MODEL):
        raise ApiError(404, f"the model {model!r} does not exist; use {MODEL!r} or "
                       f"{CAMERA_MODEL!r} (GET /v1/models)", param="model",
                       code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of messages", "messages",
                   "invalid_type" if messages is not None else "missing_required_parameter")
    for key in ("tools", "functions"):
        if body.get(key):
            raise _bad(f"'{key}' is not supported by this model", key, "unsupported_parameter")
    if body.get("logprobs"):
        raise _bad("'logprobs' is not supported", "logprobs", "unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise _bad("'response_format' supports only {\"type\": \"text\"}", "response_format",
                   "unsupported_parameter")
    n = _opt_int(body, "n", 1)
    if n not in (None, 1):
        raise _bad("'n' must be 1: one answer per request", "n")
    stream = bool(_opt_bool(body, "stream"))
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = bool(so and _opt_bool(so, "include_usage"))
    max_tokens = _opt_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1)
    temperature = _opt_number(body, "temperature", 0.0, 2.0)
    top_p = _opt_number(body, "top_p", 0.0, 1.0)
    seed = _opt_int(body, "seed", 0, 2**31 - 1)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise _bad(f"'stop' takes at most {MAX_STOP} strings", "stop")
    stops = [s for s in stops if s]

    turns: list[tuple[int, str, dict]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object, found {_type_name(m)}",
                       f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role in ("system", "developer"):
            _content(m, i, role)           # still validated; the persona is the system prompt
            continue
        if role not in ("user", "assistant"):
            raise _bad(f"messages[{i}].role {role!r} is not supported (system, developer, "
                       f"user, assistant)", f"messages[{i}].role")
        turns.append((i, role, m))
    if not turns or turns[-1][1] != "user":
        raise _bad("the last message must be a user message", "messages")
    history: list[tuple[str, str]] = []
    pending: list[str] = []
    last_images: list[str] = []
    for k, (i, role, m) in enumerate(turns):
        text, images = _content(m, i, role)
        last = k == len(turns) - 1
        if role == "user":
            if text:
                pending.append(text)
            if last:
                last_images = images
            # Images of earlier messages are dropped; their text stays in the history.
        else:
            history.append(("\n".join(pending), text))
            pending = []
    # A run of user messages at the end is one question.
    question = "\n".join(pending).strip()
    if len(last_images) > 1:
        raise _bad("only one image per request is supported (in the last user message)",
                   "messages", "too_many_images")
    image = parse_image_url(last_images[0]) if last_images else None
    if image is not None:
        check_image(image, ctx.cfg.http.max_image_pixels)
    if not question:
        if image is None and model != CAMERA_MODEL:
            raise _bad("the last user message has no text", "messages")
        question = "Describe the picture."
    return ChatParams(model=model, question=question, history=history, image=image,
                      stream=stream, include_usage=include_usage, stop=stops,
                      options=TurnOptions(max_new_tokens=max_tokens, temperature=temperature,
                                          top_p=top_p, seed=seed))


# ---------------------------------------------------------------------------- stop strings

class StopFilter:
    """Cuts the text at the first stop string; holds back only what may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.buf = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        if self.hit:
            return ""
        self.buf += piece
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf, self.hit = self.buf[:cut], "", True
            return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:n]):
                    hold = n
                    break
        out = self.buf[:len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return "" if self.hit else out


# ---------------------------------------------------------------------------- chat turns

async def _prepare(ctx: Context, params: ChatParams) -> tuple[Request, Turn]:
    """The conversation request: the image decoded and encoded in worker threads."""
    scene = ctx.conversation.scene
    image: Optional[ImageEmbedding] = None
    use_camera = False
    if params.image is not None:
        encoder = scene.encoder if scene is not None else None
        if encoder is None:
            raise _bad("this model cannot see images here: no vision encoder is loaded "
                       "(vision.encoder is none, or camera.source is null); send text only",
                       "messages", "vision_not_available")
        rgb = await asyncio.to_thread(decode_image, params.image, ctx.cfg.http.max_image_pixels)
        try:
            image = await asyncio.to_thread(encoder.encode, rgb)
        except AssistantError as e:
            raise ApiError(500, f"the image could not be encoded: {e}", type="server_error",
                           code="vision_error") from None
    elif params.model == CAMERA_MODEL:
        if scene is None or not scene.enabled:
            raise _bad(f"model {CAMERA_MODEL!r} needs a camera and a vision encoder, and "
                       f"this assistant has none (camera.source null, vision.encoder none "
                       f"or vision.attach never); use {MODEL!r}", "model",
                       "camera_not_available")
        use_camera = True
    turn = Turn(source="http")
    turn.intent = "question"
    turn.transcript = params.question
    if image is not None:          # the request's own picture (the conversation notes the camera's)
        turn.with_image, turn.scene = True, "new"
        turn.counts["image_tokens"] = image.n_tokens
    req = Request(params.question, source="http", priority=Priority.TEXT, language=None,
                  history=list(params.history), image=image, use_camera=use_camera,
                  options=params.options)
    return req, turn


def _error_for(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Busy):
        return ApiError(503, str(e), type="server_error", code="busy",
                        headers={"Retry-After": retry_after(e.retry_after)})
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


async def _deltas(ctx: Context, req: Request, turn: Turn, stops: list[str]) -> AsyncIterator[str]:
    """The answer's text as it comes, cut at a stop string (the turn is then aborted);
    leading whitespace dropped. The turn is logged and recorded when it ends."""
    conv = ctx.conversation
    filt = StopFilter(stops)
    started = False
    busy = False
    try:
        async with contextlib.aclosing(conv.ask(req, turn)) as pieces:
            async for piece in pieces:
                if filt.hit:
                    continue                     # draining until the abort lands
                out = filt.feed(piece)
                if filt.hit:
                    conv.abort()
                if not started:
                    out = out.lstrip()
                if out:
                    started = True
                    yield out
        tail = filt.flush()
        if not started:
            tail = tail.lstrip()
        if tail:
            yield tail
        if filt.hit:
            turn.finish = "stop"
            turn.note = turn.note or "cut at a stop string"
    except Busy:
        busy = True
        raise
    except AssistantError as e:
        turn.note = turn.note or str(e)
        raise
    finally:
        if not busy:
            turn.mark("done")
            turn.log_line()
            conv.record(turn)


def _usage(turn: Turn) -> dict:
    prompt = int(turn.counts.get("context_before", 0)) + int(turn.counts.get("prompt_tokens", 0))
    completion = int(turn.counts.get("generated_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finish_reason(turn: Turn) -> str:
    return "length" if turn.finish == "length" else "stop"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = _ctx(request)
    params = parse_chat(await _json_body(request), ctx)
    req, turn = await _prepare(ctx, params)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    gen = _deltas(ctx, req, turn, params.stop)
    if not params.stream:
        texts = []
        try:
            async for d in gen:
                texts.append(d)
        except BaseException as e:
            if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
                raise
            raise _error_for(e) from None
        return web.json_response({
            "id": cid, "object": "chat.completion", "created": created, "model": params.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": "".join(texts).rstrip(),
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": _finish_reason(turn)}],
            "usage": _usage(turn),
        }, headers={"X-Turn-Id": str(turn.id)})

    # Streamed: wait for the first text (or a refusal) before the 200 goes out, so a busy
    # model or a too-long question is a proper HTTP error.
    async with contextlib.aclosing(gen):
        try:
            first: Optional[str] = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            raise _error_for(e) from None

        def chunk(delta: dict, finish: Optional[str] = None, **extra) -> bytes:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": params.model, "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no",
                                           "X-Turn-Id": str(turn.id)})
        await resp.prepare(request)
        await resp.write(chunk({"role": "assistant", "content": ""}))
        try:
            if first is not None:
                await resp.write(chunk({"content": first}))
                async for d in gen:
                    await resp.write(chunk({"content": d}))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:
            err = _error_for(e)
            log.error("turn %d: %s", turn.id, err.message)
            await resp.write(f"data: {json.dumps(err.body())}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        await resp.write(chunk({}, _finish_reason(turn)))
        if params.include_usage:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": params.model, "system_fingerprint": None, "choices": [],
                    "usage": _usage(turn)}
            await resp.write(f"data: {json.dumps(body)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


# ---------------------------------------------------------------------------- models

def _models(ctx: Context) -> list[dict]:
    ids = [MODEL]
    scene = ctx.conversation.scene
    if scene is not None and scene.enabled:
        ids.append(CAMERA_MODEL)
    return [{"id": i, "object": "model", "created": ctx.started, "owned_by": OWNER} for i in ids]


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": _models(_ctx(request))})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    for m in _models(_ctx(request)):
        if m["id"] == name:
            return web.json_response(m)
    raise ApiError(404, f"the model {name!r} does not exist", param="model",
                   code="model_not_found")


# ---------------------------------------------------------------------------- transcription

def decode_audio(data: bytes, max_s: float = MAX_AUDIO_S) -> np.ndarray:
    """Uploaded audio -> int16 mono 16 kHz. WAV through the project's reader and resampler;
    other formats through PyAV (what faster-whisper uses), decoded with a length limit.
    Blocking: run in a worker thread."""
    from assistant.audio.base import SAMPLE_RATE
    from assistant.audio.resample import resample
    from assistant.audio.wav_source import read_wav
    from assistant.errors import InputError

    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            f.write(data)
            f.flush()
            try:
                pcm, rate = read_wav(f.name)
            except InputError as e:
                msg = str(e).replace(f.name, "the uploaded file")
                raise _bad(msg, "file", "invalid_audio") from None
        if len(pcm) > max_s * rate:
            raise _too_long(len(pcm) / rate, max_s)
        return resample(pcm, rate, SAMPLE_RATE)
    try:
        import av
    except ImportError:
        raise _bad("only WAV audio can be decoded here (PyAV is not installed)", "file",
                   "invalid_audio_format") from None
    out: list[np.ndarray] = []
    n = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise _bad("the uploaded file holds no audio", "file", "invalid_audio")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(audio=0):
                frame.pts = None
                for rf in resampler.resample(frame):
                    a = rf.to_ndarray().reshape(-1).astype(np.int16)
                    n += len(a)
                    if n > max_s * SAMPLE_RATE:
                        raise _too_long(n / SAMPLE_RATE, max_s)
                    out.append(a)
            for rf in resampler.resample(None):
                out.append(rf.to_ndarray().reshape(-1).astype(np.int16))
    except ApiError:
        raise
    except Exception as e:   # PyAV's errors: an unknown or corrupt format
        raise _bad(f"the uploaded audio could not be decoded ({type(e).__name__}: {e}); "
                   f"send WAV, MP3, OGG, FLAC, M4A or WebM", "file", "invalid_audio") from None
    return np.concatenate(out) if out else np.zeros(0, np.int16)


def _too_long(seconds: float, max_s: float) -> ApiError:
    return _bad(f"the audio is longer than {max_s:.0f} s (at least {seconds:.0f} s); send a "
                f"shorter recording", "file", "audio_too_long")


async def _multipart(request: web.Request, limit: int) -> tuple[dict, Optional[bytes]]:
    """(text fields, the 'file' part's bytes) of a multipart/form-data request."""
    if not request.content_type.startswith("multipart/"):
        raise _bad(f"send multipart/form-data with a 'file' part (found content type "
                   f"{request.content_type!r})", "file", "invalid_content_type")
    try:
        reader = await request.multipart()
        fields: dict = {}
        data: Optional[bytes] = None
        total = 0
        while True:
            part = await reader.next()
            if part is None:
                break
            if part.name == "file":
                buf = bytearray()
                while True:
                    chunk = await part.read_chunk(1 << 16)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > limit:
                        raise ApiError(413, f"the upload is larger than {limit} bytes "
                                       f"(http.max_body_mb)", code="request_too_large")
                    buf.extend(chunk)
                data = bytes(buf)
            elif part.name:
                value = await part.read(decode=True)
                total += len(value)
                if len(value) > 4096:
                    raise _bad(f"the form field {part.name!r} is too long", part.name)
                fields[part.name] = value.decode("utf-8", "replace")
        return fields, data
    except ApiError:
        raise
    except (ValueError, AssertionError, RuntimeError) as e:
        raise _bad(f"malformed multipart/form-data body: {e}", "file",
                   "invalid_multipart") from None


async def transcriptions(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    asr = getattr(ctx.parts, "asr", None)
    if asr is None:
        raise ApiError(503, "no speech recognition model is loaded", type="server_error",
                       code="asr_not_available")
    fields, data = await _multipart(request, int(ctx.cfg.http.max_body_mb * 1024 * 1024))
    if not data:
        raise _bad("a non-empty 'file' part is required (the audio to transcribe)", "file",
                   "missing_required_parameter")
    fmt = fields.get("response_format") or "json"
    if fmt not in TRANSCRIPTION_FORMATS:
        raise _bad(f"response_format {fmt!r} is not supported; use one of: "
                   f"{', '.join(TRANSCRIPTION_FORMATS)}", "response_format")
    language = (fields.get("language") or "").strip().lower() or None
    if language is not None:
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        if language not in _LANGUAGE_CODES:
            raise _bad(f"language {language!r} is not an ISO-639-1 code whisper knows "
                       f"(e.g. en, zh)", "language")
        if language != "en" and not await asyncio.to_thread(lambda: asr.multilingual):
            raise _bad(f"the whisper model is English-only; it cannot transcribe "
                       f"language {language!r} (set asr.model to a multilingual model)",
                       "language")
    pcm = await asyncio.to_thread(decode_audio, data)
    if len(pcm) == 0:
        raise _bad("the uploaded audio is empty", "file", "invalid_audio")
    t0 = time.monotonic()
    heard = await asyncio.to_thread(asr.transcribe, pcm, language)
    text = heard.text if heard.accepted else ""
    log.info("http transcription: %.1f s of audio in %.2f s: %r (%s)", len(pcm) / 16000,
             time.monotonic() - t0, heard.text, heard.reason)
    if fmt == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    if fmt == "verbose_json":
        return web.json_response({"task": "transcribe", "language": heard.language,
                                  "duration": round(heard.audio_s, 3), "text": text,
                                  "accepted": heard.accepted, "reason": heard.reason,
                                  "segments": []})
    return web.json_response({"text": text})


# ---------------------------------------------------------------------------- speech

def wav_bytes(pcm: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, dtype="<i2").tobytes())
    return buf.getvalue()


def voice_names(ctx: Context) -> dict:
    """Configured voice name -> synthesizer (its file name, and the config value)."""
    voices = getattr(ctx.parts, "voices", None)
    if voices is None:
        return {}
    out = {voices.default.name: voices.default}
    if ctx.cfg.tts.voice:
        out.setdefault(Path(str(ctx.cfg.tts.voice)).name.removesuffix(".onnx"), voices.default)
    if voices.zh is not None:
        out[voices.zh.name] = voices.zh
        if ctx.cfg.tts.voice_zh:
            out.setdefault(Path(str(ctx.cfg.tts.voice_zh)).name.removesuffix(".onnx"), voices.zh)
    return out


async def speech(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    body = await _json_body(request)
    voices = getattr(ctx.parts, "voices", None)
    if voices is None:
        raise ApiError(503, "no piper voice is loaded", type="server_error",
                       code="tts_not_available")
    _opt_str(body, "model")                    # any (tts-1, ...): there is one speech engine
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise _bad("'input' must be a non-empty string (the text to speak)", "input",
                   "invalid_type" if text is not None else "missing_required_parameter")
    if len(text) > MAX_SPEECH_CHARS:
        raise _bad(f"'input' is {len(text)} characters; the limit is {MAX_SPEECH_CHARS}",
                   "input")
    fmt = _opt_str(body, "response_format") or "wav"
    if fmt not in SPEECH_FORMATS:
        raise _bad(f"response_format {fmt!r} is not supported; use one of: "
                   f"{', '.join(SPEECH_FORMATS)}", "response_format")
    speed = _opt_number(body, "speed", 0.25, 4.0)
    if speed is not None and abs(speed - 1.0) > 1e-6:
        raise _bad("'speed' other than 1.0 is not supported (the pace is tts.length_scale)",
                   "speed")
    name = _opt_str(body, "voice")
    names = voice_names(ctx)
    if name is None or name.lower() in OPENAI_VOICES:
        synth = voices.for_language("zh" if _CJK.search(text) else "en")
    elif name in names:
        synth = names[name]
    else:
        raise _bad(f"unknown voice {name!r}; use one of: "
                   f"{', '.join(sorted(names))} (or an OpenAI name such as alloy for the "
                   f"default voice)", "voice")
    pcm = await asyncio.to_thread(synth.synthesize, text)
    data = await asyncio.to_thread(wav_bytes, pcm, synth.sample_rate)
    return web.Response(body=data, content_type="audio/wav",
                        headers={"X-Voice": synth.name})


# ---------------------------------------------------------------------------- camera

def _jpeg(frame: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ApiError(500, "the snapshot could not be encoded", type="server_error")
    return buf.tobytes()


async def camera_jpeg(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    scene = ctx.conversation.scene
    shot = scene.latest if scene is not None else None
    if shot is None or shot.frame is None:
        raise ApiError(404, "no camera snapshot yet (one is taken with each question that "
                       "uses the camera)", code="no_snapshot")
    cache = ctx.cache
    if cache.get("shot") != shot.id:
        cache["jpeg"] = await asyncio.to_thread(_jpeg, shot.frame)
        cache["shot"] = shot.id
    return web.Response(body=cache["jpeg"], content_type="image/jpeg",
                        headers={"Cache-Control": "no-store", "X-Shot-Id": str(shot.id)})
