"""``POST /v1/chat/completions``: OpenAI's chat schema mapped onto the conversation.

The API is stateless: every (user, assistant) pair before the last user message is the
request's history, and the conversation reuses the model's cache when the request extends
what it holds. Only the last user message's image goes to the model (a data: URL, PNG or
JPEG); images of earlier messages are dropped and their text is kept. ``system`` /
``developer`` messages are ignored: the assistant's persona is the system prompt. Model
``rkvlm-camera`` attaches what the camera sees now to the last user message when it carries
no image. Streamed (server-sent ``chat.completion.chunk`` events ending with
``data: [DONE]``) or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from aiohttp import web

from assistant import frontend
from assistant.conversation import Busy, Priority, Request
from assistant.errors import AssistantError
from assistant.health import StageOverrun
from assistant.http.errors import ApiError, bad, error_for
from assistant.http.images import check_image, decode_image, parse_image_url
from assistant.http.server import CTX, Context
from assistant.http.validate import json_body, opt_bool, opt_int, opt_number, type_name
from assistant.llm.base import ImageEmbedding, TurnOptions
from assistant.turn import Turn

log = logging.getLogger(__name__)

MODEL = "rkvlm"
CAMERA_MODEL = "rkvlm-camera"
MAX_STOP = 4


# ---------------------------------------------------------------------------- the request

@dataclass
class ChatParams:
    model: str
    question: str
    history: list[tuple[str, str]]
    image: Optional[bytes] = None
    image_param: str = "messages"          # where the picture was, for its errors
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    options: TurnOptions = field(default_factory=TurnOptions)


def _content(msg: dict, i: int, role: str) -> tuple[str, list[tuple[str, str]]]:
    """(text, [(image URL, its field)]) of one message's content."""
    content = msg.get("content")
    where = f"messages[{i}].content"
    if content is None:
        if role == "assistant":
            return "", []
        raise bad(f"{where} is required for a {role} message", where, "invalid_type")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or an array of parts, found {type_name(content)}",
                  where, "invalid_type")
    texts, images = [], []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad(f"{pw} must be an object, found {type_name(part)}", pw, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"{pw}.text must be a string, found {type_name(text)}", f"{pw}.text",
                          "invalid_type")
            texts.append(text)
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise bad(f"{pw}.image_url.url must be a string, found {type_name(url)}",
                          f"{pw}.image_url.url", "invalid_type")
            images.append((url, f"{pw}.image_url.url"))
        else:
            raise bad(f"{pw}: content part type {kind!r} is not supported (text, image_url)",
                      f"{pw}.type", "unsupported_content")
    return "\n".join(texts), images


def _options(body: dict) -> tuple[list[str], TurnOptions]:
    """The stop strings and sampling options."""
    max_tokens = opt_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = opt_int(body, "max_tokens", 1)
    temperature = opt_number(body, "temperature", 0.0, 2.0)
    top_p = opt_number(body, "top_p", 0.0, 1.0)
    seed = opt_int(body, "seed", 0, 2**31 - 1)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} strings", "stop")
    return [s for s in stops if s], TurnOptions(max_new_tokens=max_tokens,
                                               temperature=temperature, top_p=top_p, seed=seed)


def _refuse_unsupported(body: dict) -> None:
    for key in ("tools", "functions"):
        if body.get(key):
            raise bad(f"'{key}' is not supported by this model", key, "unsupported_parameter")
    if body.get("logprobs"):
        raise bad("'logprobs' is not supported", "logprobs", "unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad("'response_format' supports only {\"type\": \"text\"}", "response_format",
                  "unsupported_parameter")
    if opt_int(body, "n", 1) not in (None, 1):
        raise bad("'n' must be 1: one answer per request", "n")


def parse_chat(body: dict, ctx: Context) -> ChatParams:
    """The request's question, history, picture and options; ApiError naming the field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must be a string: rkvlm or rkvlm-camera", "model",
                  "invalid_type" if model is not None else "missing_required_parameter")
    if model not in (MODEL, CAMERA_MODEL):
        raise ApiError(404, f"the model {model!r} does not exist; use {MODEL!r} or "
                       f"{CAMERA_MODEL!r} (GET /v1/models)", param="model",
                       code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array of messages", "messages",
                  "invalid_type" if messages is not None else "missing_required_parameter")
    _refuse_unsupported(body)
    stream = bool(opt_bool(body, "stream"))
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = bool(so and opt_bool(so, "include_usage", "stream_options"))
    stops, options = _options(body)

    history: list[tuple[str, str]] = []
    pending: list[str] = []
    other_chars = 0                   # system messages: read, not used
    last_images: list[tuple[str, str]] = []
    roles = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object, found {type_name(m)}",
                      f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}].role {role!r} is not supported (system, developer, "
                      f"user, assistant)", f"messages[{i}].role")
        text, images = _content(m, i, role)
        if role in ("system", "developer"):
            other_chars += len(text)   # the persona is the system prompt
            continue
        roles.append(role)
        if role == "user":
            if text:
                pending.append(text)
            # Only the newest user message's picture goes to the model; earlier ones are
            # dropped, their text stays in the history.
            last_images = images
        else:
            history.append(("\n".join(pending), text))
            pending = []
    if not roles or roles[-1] != "user":
        raise bad("the last message must be a user message", "messages")
    # A run of user messages at the end is one question.
    question = "\n".join(pending).strip()
    try:
        frontend.check_size(question, history, ctx.limits, other_chars)
    except frontend.TooLarge as e:
        raise bad(str(e), "messages", "request_too_large") from None
    if len(last_images) > 1:
        raise bad("only one image per request is supported (in the last user message)",
                  "messages", "too_many_images")
    image, image_param = None, "messages"
    if last_images:
        url, image_param = last_images[0]
        image = parse_image_url(url, image_param)
        check_image(image, ctx.cfg.http.max_image_pixels, image_param)
    if not question:
        if image is None and model != CAMERA_MODEL:
            raise bad("the last user message has no text", "messages")
        question = "Describe the picture."
    return ChatParams(model=model, question=question, history=history, image=image,
                      image_param=image_param, stream=stream, include_usage=include_usage,
                      stop=stops, options=options)


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


# ---------------------------------------------------------------------------- turns

async def _prepare(ctx: Context, params: ChatParams) -> tuple[Request, Turn]:
    """The conversation request: the image decoded and encoded in worker threads."""
    scene = ctx.conversation.scene
    image: Optional[ImageEmbedding] = None
    use_camera = False
    if params.image is not None:
        encoder = scene.encoder if scene is not None else None
        if encoder is None:
            raise bad("this model cannot see images here: no vision encoder is loaded "
                      "(vision.encoder is none, or camera.source is null); send text only",
                      params.image_param, "vision_not_available")

        def work() -> ImageEmbedding:
            rgb = decode_image(params.image, ctx.cfg.http.max_image_pixels, params.image_param)
            return encoder.encode(rgb)

        try:
            image = await ctx.pictures.run("encode", work, max_wait_s=ctx.cfg.http.max_wait_s)
        except (ApiError, Busy, StageOverrun) as e:
            raise error_for(e) from None
        except AssistantError as e:
            raise ApiError(500, f"the image could not be encoded: {e}", type="server_error",
                           code="vision_error") from None
    elif params.model == CAMERA_MODEL:
        if scene is None or not scene.enabled:
            raise bad(f"model {CAMERA_MODEL!r} needs a camera and a vision encoder, and "
                      f"this assistant has none (camera.source null, vision.encoder none "
                      f"or vision.attach never); use {MODEL!r}", "model",
                      "camera_not_available")
        use_camera = True
    turn = Turn(source="http")
    if image is not None:    # the request's own picture (the conversation notes the camera's)
        turn.with_image, turn.scene = True, "new"
        turn.counts["image_tokens"] = image.n_tokens
    req = Request(params.question, source="http", priority=Priority.TEXT, language=None,
                  history=list(params.history), image=image, use_camera=use_camera,
                  options=params.options)
    return req, turn


async def _deltas(ctx: Context, req: Request, turn: Turn, stops: list[str]) -> AsyncIterator[str]:
    """The answer's text as it comes, cut at a stop string (the turn is then aborted);
    leading whitespace dropped."""
    conv = ctx.conversation
    filt = StopFilter(stops)
    started = False
    async with contextlib.aclosing(frontend.answer(conv, req, turn)) as pieces:
        async for piece in pieces:
            if filt.hit:
                continue                     # draining until the abort lands
            out = filt.feed(piece)
            if filt.hit:
                conv.abort()
                # Noted now: the turn's row is written when the answer's stream ends.
                turn.note = turn.note or "cut at a stop string"
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
            turn.finish = "stop"             # for finish_reason: the runtime says "aborted"


def _usage(turn: Turn) -> dict:
    prompt = int(turn.counts.get("context_before", 0)) + int(turn.counts.get("prompt_tokens", 0))
    completion = int(turn.counts.get("generated_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _finish_reason(turn: Turn) -> str:
    return "length" if turn.finish == "length" else "stop"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx: Context = request.app[CTX]
    params = parse_chat(await json_body(request, ctx.cfg.http.body_timeout_s), ctx)
    req, turn = await _prepare(ctx, params)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def event(choices: list, **extra) -> bytes:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                "model": params.model, "system_fingerprint": None, "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    def chunk(delta: dict, finish: Optional[str] = None) -> bytes:
        return event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    async with contextlib.aclosing(_deltas(ctx, req, turn, params.stop)) as gen:
        if not params.stream:
            try:
                text = "".join([d async for d in gen])
            except Exception as e:
                raise error_for(e) from None
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": created,
                "model": params.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": text.rstrip(),
                                                     "refusal": None},
                             "logprobs": None, "finish_reason": _finish_reason(turn)}],
                "usage": _usage(turn),
            }, headers={"X-Turn-Id": str(turn.id)})

        # Streamed: wait for the first text (or a refusal) before the 200 goes out, so a
        # busy model or a too-long question is a proper HTTP error.
        try:
            first: Optional[str] = await gen.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:
            raise error_for(e) from None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no",
                                           "X-Turn-Id": str(turn.id)})
        timeout = ctx.cfg.http.body_timeout_s

        async def send(data: bytes) -> None:
            # A client that stops reading is a client gone: it must not hold the model.
            try:
                await asyncio.wait_for(resp.write(data), timeout)
            except asyncio.TimeoutError:
                raise ConnectionResetError(f"the client took no answer for {timeout:g} s") from None

        try:
            await resp.prepare(request)
            await send(chunk({"role": "assistant", "content": ""}))
            try:
                if first is not None:
                    await send(chunk({"content": first}))
                    async for d in gen:
                        await send(chunk({"content": d}))
            except ConnectionError:
                raise
            except Exception as e:
                err = error_for(e)
                log.error("turn %d: %s", turn.id, err.message)
                await send(f"data: {json.dumps(err.body())}\n\n".encode())
                await send(b"data: [DONE]\n\n")
                return resp
            await send(chunk({}, _finish_reason(turn)))
            if params.include_usage:
                await send(event([], usage=_usage(turn)))
            await send(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionError:
            # The client hung up: the answer's generator is closed here (its turn is
            # recorded as interrupted); the half-sent response needs nothing more.
            await gen.aclose()
        return resp
