"""With ``http.api_key`` set, every route but the page's own files needs the key.

The routes are taken from the application's router, so a route added later without the
check fails here too. The page's three static files stay public: they hold no data, and the
page must load to ask for the key (it then sends it on /events, /camera.jpg and the API).
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from assistant.http.server import CTX, PAGE_FILES
from test_http_support import EchoLLM, in_process, raw_http

aiohttp = pytest.importorskip("aiohttp")

KEY = "sesame-123"


@pytest.fixture(scope="module")
def server():
    s = in_process(EchoLLM(words=2), http={"api_key": KEY})
    yield s
    s.close()


def routes(app) -> list[tuple[str, str]]:
    out = []
    for route in app.router.routes():
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter", "")
        out.append((route.method, path.replace("{model}", "rkvlm")))
    return sorted(set(out))


async def _status(url: str, method: str, headers: dict) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, headers=headers, data=b"{}" if method == "POST" else None,
                             timeout=aiohttp.ClientTimeout(total=30)) as r:
            # /events streams: its first event (or the error) is enough.
            body = await r.content.readany() if r.status == 200 else await r.read()
            return r.status, body


def test_every_route_but_the_page_needs_the_key(server):
    table = routes(server.server.app)
    api = [(m, p) for m, p in table if p not in PAGE_FILES]
    # The table is the whole API: none is forgotten, none is public by accident.
    assert {p for _, p in api} == {"/v1/chat/completions", "/v1/models", "/v1/models/rkvlm",
                                   "/v1/audio/transcriptions", "/v1/audio/speech", "/events",
                                   "/camera.jpg"}, table
    for method, path in api:
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Basic {KEY}"}):
            status, body = asyncio.run(_status(server.url + path, method, headers))
            assert status == 401, (method, path, headers, status)
            if method != "HEAD":
                assert json.loads(body)["error"]["code"] == "invalid_api_key"
        status, body = asyncio.run(_status(server.url + path, method,
                                           {"Authorization": f"Bearer {KEY}"}))
        assert status != 401, (method, path, body)
    for method, path in table:
        if path in PAGE_FILES:
            status, body = asyncio.run(_status(server.url + path, method, {}))
            assert status == 200 and KEY.encode() not in body, (method, path)


def test_a_key_that_is_not_utf8_is_a_401_not_a_crash(server, caplog):
    caplog.set_level(logging.INFO)
    for token in (b"\xff\xfe\x80", b"sesame-123\xc3", b"\xed\xa0\x80"):
        status, headers, body = raw_http(
            server.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + token + b"\r\nConnection: close\r\n\r\n")
        assert status == 401, body
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text
    # The right key still works.
    status, _, body = raw_http(server.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                               b"Authorization: Bearer " + KEY.encode()
                               + b"\r\nConnection: close\r\n\r\n")
    assert status == 200 and b"rkvlm" in body
    assert server.server.app[CTX].cfg.http.api_key == KEY
