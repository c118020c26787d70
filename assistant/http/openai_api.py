"""The OpenAI-compatible routes, and the small ones that need no module of their own.

- ``POST /v1/chat/completions``: ``chat.py``;
- ``POST /v1/audio/transcriptions``, ``POST /v1/audio/speech``: ``audio.py``;
- ``GET /v1/models``, ``GET /v1/models/{id}``: the models (``rkvlm``, and ``rkvlm-camera``
  with a camera and an encoder);
- ``GET /camera.jpg``: the camera's latest snapshot, for the page.
"""

from __future__ import annotations

import asyncio

import numpy as np
from aiohttp import web

from assistant.http import audio, chat
from assistant.http.errors import ApiError
from assistant.http.server import CTX, Context

OWNER = "rkvlm-assistant"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", chat.chat_completions)
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model}", get_model)
    r.add_post("/v1/audio/transcriptions", audio.transcriptions)
    r.add_post("/v1/audio/speech", audio.speech)
    r.add_get("/camera.jpg", camera_jpeg)


# ---------------------------------------------------------------------------- models

def _models(ctx: Context) -> list[dict]:
    ids = [chat.MODEL]
    scene = ctx.conversation.scene
    if scene is not None and scene.enabled:
        ids.append(chat.CAMERA_MODEL)
    return [{"id": i, "object": "model", "created": ctx.started, "owned_by": OWNER} for i in ids]


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": _models(request.app[CTX])})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    for m in _models(request.app[CTX]):
        if m["id"] == name:
            return web.json_response(m)
    raise ApiError(404, f"the model {name!r} does not exist", param="model",
                   code="model_not_found")


# ---------------------------------------------------------------------------- camera

def _jpeg(frame: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ApiError(500, "the snapshot could not be encoded", type="server_error")
    return buf.tobytes()


async def camera_jpeg(request: web.Request) -> web.Response:
    ctx: Context = request.app[CTX]
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
