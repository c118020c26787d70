"""A thread that does a component's file writing, so the event loop only queues work.

The transcript and the debug recordings both write files that must never block the loop
(a slow or full disk) and must be flushed at shutdown: this is their common part.
"""

from __future__ import annotations

import queue
import threading

_STOP = object()


class WriterThread:
    def __init__(self, name: str):
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written (or failed); False on timeout."""
        done = threading.Event()
        self._q.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)

    def _handle(self, item) -> None:
        """Write one queued item (on the thread); errors are the subclass's to report."""
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            self._handle(item)
