"""Log lines rate-limited per cause, for one client's connection.

A client that sends 20,000 bad events must not write 20,000 log lines: the first few of
each cause are logged as usual, the rest are counted, and one line says how many were left
out, when the connection ends (``close``) and at most every ``every_s`` while it goes on.
One ``LogLimit`` per connection (Wyoming's, an HTTP client's), so one noisy client does not
hide another's first lines.
"""

from __future__ import annotations

import logging
import time
from typing import Callable


class LogLimit:
    def __init__(self, logger: logging.Logger, who: str, first: int = 5, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        """``who``: names the client in the count lines; ``first``: lines logged per cause
        before counting starts."""
        self.logger, self.who, self.first, self.every_s = logger, who, first, every_s
        self.clock = clock
        self._seen: dict[str, int] = {}        # cause -> lines asked for
        self._left_out: dict[str, int] = {}    # cause -> lines not logged since the last count
        self._counted_at = clock()

    def log(self, level: int, cause: str, msg: str, *args, **kwargs) -> bool:
        """``msg % args`` at ``level``, unless ``cause`` already had its ``first`` lines on
        this connection; True when the line was written."""
        n = self._seen[cause] = self._seen.get(cause, 0) + 1   # causes: a fixed set of codes
        if n <= self.first:
            self.logger.log(level, msg, *args, **kwargs)
            return True
        self._left_out[cause] = self._left_out.get(cause, 0) + 1
        if self.clock() - self._counted_at >= self.every_s:
            self.flush()
        return False

    def flush(self) -> None:
        """One line per cause with lines left out since the last count."""
        for cause, n in self._left_out.items():
            self.logger.info("%s: %d more %r line%s not logged", self.who, n, cause,
                             "" if n == 1 else "s")
        self._left_out.clear()
        self._counted_at = self.clock()

    close = flush
