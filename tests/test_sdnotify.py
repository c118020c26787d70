"""The sd_notify protocol against a real datagram socket, as systemd would listen."""

import asyncio
import os
import socket
import threading

import pytest

from assistant.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield path, s
    s.close()


def test_messages_reach_the_socket(listener):
    path, s = listener
    n = Notifier(path)
    assert n.enabled
    n("READY=1")
    n.send("STATUS=turn 1: question")
    assert s.recv(4096) == b"READY=1"
    assert s.recv(4096) == b"STATUS=turn 1: question"
    n.close()
    n("STOPPING=1")  # after close: silently nothing


def test_abstract_namespace():
    name = f"rkvlm-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        Notifier("@" + name)("READY=1")
        assert s.recv(100) == b"READY=1"
    finally:
        s.close()


def test_outside_systemd_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n("READY=1")
    assert n.watchdog_interval() is None


def test_vanished_socket_is_not_fatal(tmp_path):
    Notifier(str(tmp_path / "gone.sock"))("READY=1")


def test_watchdog_pings_from_the_loop(listener, monkeypatch):
    path, s = listener
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier(path)
    assert n.watchdog_interval() == 0.5

    async def main():
        task = asyncio.create_task(n.watchdog())
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert s.recv(100) == b"WATCHDOG=1"
    monkeypatch.setenv("WATCHDOG_PID", "1")  # another process's watchdog
    assert n.watchdog_interval() is None


def test_a_reader_that_does_not_read_never_blocks_the_sender(listener):
    path, s = listener
    n = Notifier(path)

    def flood():
        for i in range(200):  # far beyond the kernel's queue of unread datagrams
            n(f"WATCHDOG=1 {i}")

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(10)
    assert not sender.is_alive(), "sd_notify blocked on a full socket"
    assert s.recv(100) == b"WATCHDOG=1 0"
