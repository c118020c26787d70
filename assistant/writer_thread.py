"""A thread that does a component's file writing, so the event loop only queues work.

The transcript and the debug recordings both write files that must never block the loop
(a slow or full disk) and must be flushed at shutdown: this is their common part. The
writing never stops for good: an item whose writing raises is dropped with one warning
(again only after a success in between) and the thread goes on with the next; a thread
that is gone all the same is started again, with a warning, when the next item is queued.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


class WriterThread:
    def __init__(self, name: str):
        self._name = name
        self._q: queue.Queue = queue.Queue()
        self._closed = False
        self._item_failing = False  # the last item failed (warned once until one succeeds)
        self.failures = 0           # items whose writing raised
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        thread.start()
        return thread

    def _queue(self, item: Any) -> None:
        """Queue one item for the thread (never blocks)."""
        self._q.put(item)
        self._ensure_running()

    def _ensure_running(self) -> None:
        if not self._closed and not self._thread.is_alive():
            log.warning("the %s writer thread had stopped; started again", self._name)
            self._thread = self._start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written (or failed); False on timeout."""
        done = threading.Event()
        self._queue(done)
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._closed = True
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)

    def _handle(self, item) -> None:
        """Write one queued item (on the thread); errors are the subclass's to report."""
        raise NotImplementedError

    def _dropped(self, item) -> None:
        """An item whose writing raised an unexpected error (on the thread)."""

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._handle(item)
            except Exception as e:
                # One item that cannot be written must not end the writing of every later one.
                self.failures += 1
                self._dropped(item)
                if not self._item_failing:
                    log.warning("the %s writer could not write an item (%s: %s); it was "
                                "dropped and the writer goes on", self._name,
                                type(e).__name__, e, exc_info=e)
                self._item_failing = True
                continue
            self._item_failing = False
