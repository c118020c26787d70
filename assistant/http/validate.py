"""Reading a request: its body and fields checked before anything else sees them.

- A JSON body is parsed with a time limit for its arrival, refused when it nests deeper than
  ``MAX_DEPTH`` (before Python's recursion limit could turn it into an internal error) or
  holds ``NaN`` / ``Infinity``.
- Every string in it (object keys too) is checked once: a lone surrogate (``"\\ud800"``,
  which is not text and cannot be written as UTF-8) or a NUL character is a 400 naming
  the field, e.g. ``messages[1].content[0].text``. NUL is refused rather than stripped in
  every field: it is never part of a real question or a name, and a client that sends one
  should hear about it; the model, piper and the transcript never see it.
- Typed getters (``opt_int``, ``opt_number``, ...) give a 400 naming the field for a wrong
  type or an out-of-range value (NaN included).
- Multipart form fields must be UTF-8 text under the same rule.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Optional

from aiohttp import web

from assistant.frontend import text_problem
from assistant.http.errors import ApiError, bad

# The deepest a real request nests is 5 (messages[i].content[j].image_url.url).
MAX_DEPTH = 32
MAX_FORM_FIELD = 4096   # characters of one multipart text field


def type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The whole body (413 past client_max_size); 408 when it does not arrive in time."""
    try:
        return await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s "
                       f"(http.body_timeout_s)", code="request_timeout") from None


async def json_body(request: web.Request, timeout_s: float) -> dict:
    """The request's JSON object, every string in it checked. A large body (a picture in
    it) is parsed and checked in a worker thread: the loop runs the voice too."""
    raw = await read_body(request, timeout_s)
    if len(raw) > _PARSE_ON_LOOP:
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


_PARSE_ON_LOOP = 64 * 1024


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        raise bad(f"the request body nests deeper than {MAX_DEPTH} levels", None,
                  "too_deeply_nested") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, found {type_name(body)}",
                  code="invalid_type")
    check_tree(body)
    return body


def _path(parent: str, key) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    key = ascii(key)[1:-1] if not key.isascii() or not key.isprintable() else key
    return f"{parent}.{key}" if parent else key


def _name(chain) -> str:
    """A field's name from its chain of (parent chain, key), built only for an error."""
    keys = []
    while chain is not None:
        chain, key = chain
        keys.append(key)
    name = ""
    for key in reversed(keys):
        name = _path(name, key)
    return name


def check_tree(body: dict) -> None:
    """Depth, and every string and key of a parsed body (iterative: no recursion)."""
    stack: list[tuple[object, object, int]] = [(body, None, 1)]
    while stack:
        node, chain, depth = stack.pop()
        if depth > MAX_DEPTH:
            where = _name(chain)
            raise bad(f"{where or 'the request body'} nests deeper than {MAX_DEPTH} levels",
                      where or None, "too_deeply_nested")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            if isinstance(k, str) and text_problem(k):
                check_text(k, _name((chain, k)), what="the key")
            if isinstance(v, str):
                if text_problem(v):
                    check_text(v, _name((chain, k)))
            elif isinstance(v, (dict, list)):
                stack.append((v, (chain, k), depth + 1))


def check_text(text: str, param: str, what: str = "") -> None:
    """400 for a NUL character or a lone surrogate in ``text`` (the field ``param``)."""
    found = text_problem(text)
    if found is not None:
        at, problem = found
        raise bad(f"{what or param} holds {problem} at character {at}"
                  f"{' of ' + param if what else ''}; send UTF-8 text without it",
                  param, "invalid_characters")


def opt_bool(body: dict, key: str, where: str = "") -> Optional[bool]:
    v = body.get(key)
    if v is None or isinstance(v, bool):
        return v
    name = _path(where, key)
    raise bad(f"'{name}' must be a boolean, found {type_name(v)}", name, "invalid_type")


def opt_int(body: dict, key: str, lo: Optional[int] = None,
            hi: Optional[int] = None) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{key}' must be an integer, found {type_name(v)}", key, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"'{key}' must be from {lo} to {hi}, found {v}" if hi is not None
                  else f"'{key}' must be at least {lo}, found {v}", key)
    return v


def opt_number(body: dict, key: str, lo: float, hi: float) -> Optional[float]:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{key}' must be a number, found {type_name(v)}", key, "invalid_type")
    if not (math.isfinite(v) and lo <= v <= hi):
        raise bad(f"'{key}' must be from {lo:g} to {hi:g}, found {v}", key)
    return float(v)


def opt_str(body: dict, key: str) -> Optional[str]:
    v = body.get(key)
    if v is None or isinstance(v, str):
        return v
    raise bad(f"'{key}' must be a string, found {type_name(v)}", key, "invalid_type")


def form_text(name: str, value: bytes) -> str:
    """A multipart text field's value: UTF-8, bounded, no NUL."""
    if len(value) > MAX_FORM_FIELD:
        raise bad(f"the form field '{name}' is longer than {MAX_FORM_FIELD} bytes", name)
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the form field '{name}' is not UTF-8 text (byte {e.start})", name,
                  "invalid_characters") from None
    check_text(text, name)
    return text


def form_name(name: Optional[str]) -> Optional[str]:
    """A multipart part's name, as the client sent it; 400 when it is not clean text
    (aiohttp keeps undecodable header bytes as surrogates)."""
    if name is None:
        return None
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"a form part's name is not UTF-8 text ({ascii(name)})", None,
                  "invalid_characters") from None
    check_text(name, ascii(name)[1:-1], what="a form part's name")
    return name
