"""Read a small file that could be anything: a FIFO, a device, a directory, a huge file, a
file on a network mount that has stopped answering.

open(2) of a FIFO waits for a writer and read(2) for data, for ever; /dev/zero never ends.
So the file is opened with O_NONBLOCK (an open that returns at once, even for a FIFO) and
fstat'ed: only a regular file (a link is followed to its file) is read, at most ``limit``
bytes. The reading runs in a daemon thread given a deadline, so a stuck mount costs a
timeout, never a caller (or a process exit) that waits for ever.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class NotRegularFile(OSError):
    """The path is a FIFO, a device, a directory or a socket."""


class FileTooLarge(OSError):
    """The file holds more than the limit."""

    def __init__(self, message: str, size: int):
        super().__init__(message)
        self.size = size


def kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _read(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise FileTooLarge(f"{st.st_size} bytes, more than {limit}", st.st_size)
        chunks, got = [], 0
        while got <= limit:                  # one byte past the limit tells a file that grew
            chunk = os.read(fd, limit + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:
            raise FileTooLarge(f"more than {limit} bytes", got)
        return b"".join(chunks)
    finally:
        os.close(fd)


def in_thread(fn: Callable[..., T], *args: Any, timeout: float, what: str) -> T:
    """``fn(*args)`` in a daemon thread; TimeoutError when it takes longer than ``timeout``
    (the thread is left to finish or hang on its own: a daemon, it holds nothing up)."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn(*args)))
        except BaseException as e:          # handed to the caller, raised there
            result.append((False, e))

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        raise TimeoutError(f"no answer in {timeout:g} s (a network mount that stopped "
                           f"answering?)")
    ok, value = result[0]
    if not ok:
        raise value
    return value


def read_regular(path: str | os.PathLike, limit: int, timeout: float) -> bytes:
    """The bytes of the regular file at ``path`` (a link is followed). Raises
    FileNotFoundError, NotRegularFile, FileTooLarge, TimeoutError or another OSError."""
    return in_thread(_read, os.fspath(path), limit, timeout=timeout, what="read-file")


async def to_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """``await`` fn(*args) run in a daemon thread. Unlike asyncio.to_thread, a caller that
    is cancelled (SIGTERM) leaves at once, and the process does not wait for the thread at
    exit (the default executor's threads are joined there)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def done(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            outcome = (True, fn(*args))
        except BaseException as e:
            outcome = (False, e)
        try:
            loop.call_soon_threadsafe(done, *outcome)
        except RuntimeError:                 # the loop has closed: nobody is waiting
            pass

    threading.Thread(target=run, name=getattr(fn, "__name__", "worker"), daemon=True).start()
    return await future
