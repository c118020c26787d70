"""SIGHUP when the config path holds something that is not a config file, and what a reload
applies to the running parts.

The process test starts real `serve` and `run` processes (as tests/test_reload.py does) and
puts a FIFO where the config was: the reload refuses it at once, the next SIGHUP still
reloads, a good file put back is applied, and SIGTERM ends the process promptly with a FIFO
there again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from types import SimpleNamespace

import pytest

from alsa_support import portaudio_available
from assistant import config as config_mod
from assistant import safe_read
from assistant.config import load
from assistant.conversation import Busy, Priority, TurnGate
from assistant.health import Health
from assistant.reload import Reloader
from test_http_support import wait_for_port
from test_reload import REPLY, _reload_config, chat, start_process

FIFO_ERROR = "a FIFO (named pipe), not a regular file"


def _fifo_in_place(path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("command", ["serve", "run"])
def test_a_fifo_in_place_of_the_config_never_wedges_reload_or_sigterm(tmp_path, command):
    # Bugs caught: the reload opened the FIFO in asyncio.to_thread and waited there for a
    # writer for ever, holding the reload lock (every later SIGHUP queued behind it: a good
    # file put back was never applied), and SIGTERM's exit joined that thread (no exit).
    if command == "run" and not portaudio_available():
        pytest.skip("needs libportaudio2")
    p, sock, port, png = start_process(tmp_path, command)
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.yaml"
    try:
        sock.wait_for("READY=1", p.proc)
        wait_for_port(port, p.proc)

        _fifo_in_place(config)
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log(FIFO_ERROR, timeout=30)
        p.proc.send_signal(signal.SIGHUP)            # not queued behind a stuck reload
        p.wait_log(FIFO_ERROR, count=2, timeout=30)
        status, r = chat(url, "k1")
        assert status == 200 and r["choices"][0]["message"]["content"] == REPLY

        config.unlink()                              # the good file back: applied
        config.write_text(_reload_config(port))
        p.proc.send_signal(signal.SIGHUP)
        p.wait_log("SIGHUP: configuration reloaded", timeout=30)
        status, r = chat(url, "k1", png)
        assert status == 400 and "http.max_image_pixels" in r["error"]["message"], r

        _fifo_in_place(config)                       # and SIGTERM during a reload of it
        p.proc.send_signal(signal.SIGHUP)
        p.proc.send_signal(signal.SIGTERM)
        code = p.proc.wait(30)                       # TimeoutExpired: the bug
    finally:
        p.stop()
        sock.drain()
    err = p.err
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "never retrieved" not in err, err[-3000:]
    errors = [l for l in err.splitlines() if "ERROR" in l]
    assert len(errors) >= 2 and all(FIFO_ERROR in l and "keeping the running configuration"
                                    in l for l in errors), errors


# --------------------------------------------------------------------------- in process

def _reloader(tmp_path, text: str):
    """A Reloader over a config file and a real TurnGate, as `serve` has them (no model)."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    cfg = load(path)
    gate = TurnGate(max_waiting=cfg.http.max_queue, max_wait_s=cfg.http.max_wait_s)
    conv = SimpleNamespace(cfg=cfg, gate=gate, backend=None)
    return path, Reloader(cfg, None, conv, health=Health()), gate


def test_a_reload_applies_max_wait_s_to_the_chat_gate(tmp_path):
    # Bug caught (reload.py: the gate's max_wait_s no longer set): a chat request queued
    # behind a running turn waited the old 120 s instead of the reloaded 1 s.
    path, reloader, gate = _reloader(tmp_path, "http: {max_wait_s: 120}\n")

    async def scenario() -> tuple[bool, str]:
        path.write_text("http: {max_wait_s: 1}\n")
        applied = await reloader.reload()
        async with gate.slot(Priority.TEXT):       # a turn runs
            try:
                async with asyncio.timeout(20):
                    async with gate.slot(Priority.TEXT):
                        return applied, "got a slot"
            except Busy as e:
                return applied, str(e)
            except TimeoutError:
                return applied, "still waiting after 20 s"

    applied, outcome = asyncio.run(scenario())
    assert applied
    assert outcome == "the model was busy for 1 s; try again shortly", outcome


def test_a_reload_stuck_in_a_read_gives_up_and_the_next_one_applies(tmp_path, monkeypatch,
                                                                      caplog):
    # Bug caught: a config on a mount that stopped answering held the reload (and its
    # lock) for ever. The read gives up after READ_TIMEOUT_S; the next SIGHUP reloads.
    path, reloader, gate = _reloader(tmp_path, "persona: {name: Rocky}\n")
    real_read = os.read
    calls = []

    def read(fd, n):
        calls.append(n)
        if len(calls) == 1:
            time.sleep(3)                           # the stuck mount (longer than the timeout)
        return real_read(fd, n)

    monkeypatch.setattr(safe_read.os, "read", read)
    monkeypatch.setattr(config_mod, "READ_TIMEOUT_S", 0.3)

    async def scenario() -> tuple[bool, bool]:
        path.write_text("persona: {name: Marvin}\n")
        first = await reloader.reload()
        second = await reloader.reload()
        return first, second

    with caplog.at_level(logging.ERROR):
        first, second = asyncio.run(scenario())
    assert (first, second) == (False, True)
    assert reloader.cfg.persona.name == "Marvin"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "no answer in 0.3 s" in errors[0], errors
