"""Give freed heap memory back to the system after a client's big buffers are gone.

glibc keeps freed memory in its heaps (and raises its mmap threshold after big frees), so
megabytes a closed connection held can stay in the daemon's RSS for good: with a 6 GB
MemoryMax, a few hostile connections would leave the service near its limit.
``malloc_trim(0)`` returns the free pages of every heap. Elsewhere (musl, macOS) a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

_lock = threading.Lock()
_trim = None


def _load():
    global _trim
    if _trim is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = libc.malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            _trim = fn
        except (OSError, AttributeError):
            _trim = False
    return _trim


def give_back() -> bool:
    """Free heap pages back to the system (blocking: run it in a worker thread); True
    when something was returned."""
    fn = _load()
    if not fn:
        return False
    with _lock:                  # one trim at a time: a second would find nothing left
        return bool(fn(0))


_scheduled: set = set()     # loops with a give_back pending


def soon(delay_s: float = 1.0) -> None:
    """``give_back`` in a worker thread ``delay_s`` from now, once for all the calls made
    meanwhile (many connections closing at once trim once). Call it on the loop."""
    import asyncio

    loop = asyncio.get_running_loop()
    if loop in _scheduled:
        return
    _scheduled.add(loop)

    def run() -> None:
        _scheduled.discard(loop)
        if not loop.is_closed():
            loop.run_in_executor(None, give_back)

    loop.call_later(delay_s, run)
