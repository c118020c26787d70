"""A request aiohttp's parser refuses (a NUL in a header, in the path) is a 400 and one INFO
line, never a traceback at ERROR: a client's malformed bytes are not the server's error, and
a scanner sending them would fill the journal with tracebacks.

The real HttpServer on its own loop thread, raw bytes on a socket (no client library sends
these).
"""

from __future__ import annotations

import logging

import pytest

from assistant.http.errors import ServerLog
from test_http_support import in_process, raw_http

MALFORMED = [
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", "Invalid header value char"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-\x00A: ab\r\n\r\n", "Invalid header token"),
    (b"GET /v1/mo\x00dels HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid char in url path"),
]


@pytest.fixture(scope="module")
def server():
    s = in_process()
    yield s
    s.close()


@pytest.mark.parametrize("request_bytes, reason", MALFORMED, ids=["value", "name", "path"])
def test_a_malformed_request_is_a_400_and_one_info_line(server, caplog, request_bytes, reason):
    # Bug caught: aiohttp's default server logger wrote "Error handling request" with the
    # whole traceback at ERROR for each of these.
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        status, _, _ = raw_http(server.port, request_bytes)
    assert status == 400
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(records) == 1, [r.getMessage() for r in records]
    r = records[0]
    assert r.levelno == logging.INFO and r.exc_info is None and r.exc_text is None
    message = r.getMessage()
    assert "\n" not in message and "\x00" not in message, message
    assert message.startswith("refused a malformed request from 127.0.0.1 (400): ") and \
        reason in message, message


def test_the_server_still_answers_afterwards(server):
    status, _, body = raw_http(server.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                                            b"Connection: close\r\n\r\n")
    assert status == 200 and b'"data"' in body


def test_any_other_error_keeps_its_traceback_at_error(caplog):
    # Bug caught: an adapter that quieted every exception aiohttp logs (a server bug, a
    # handler failing outside the error middleware) along with the clients' 400s.
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        ServerLog().exception("Error handling request from %s", "127.0.0.1",
                              exc_info=RuntimeError("a bug"))
    [r] = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert r.levelno == logging.ERROR and r.exc_info[1].args == ("a bug",)
    assert r.getMessage() == "Error handling request from 127.0.0.1"
