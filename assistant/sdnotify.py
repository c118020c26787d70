"""systemd's sd_notify protocol over $NOTIFY_SOCKET, without libsystemd.

READY=1 once the models are loaded, STATUS= per turn, WATCHDOG=1 from the event loop (so a
blocked loop is noticed and restarted), STOPPING=1 on shutdown. Outside systemd it does
nothing. The daemon pings from its own loop (``assistant.daemon.supervise``), which also
stops the pings when a native call is stuck (``assistant.health``); ``watchdog`` here is
the plain loop for `serve`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Optional

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: Optional[str] = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._addr: Optional[str] = None
        self._sock: Optional[socket.socket] = None
        if address:
            # A leading '@' is Linux's abstract namespace.
            self._addr = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # A datagram socket blocks when the reader's queue is full (10 messages by
            # default): a busy systemd must never stall the event loop.
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def __call__(self, message: str) -> None:
        self.send(message)

    def send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode("utf-8", "replace"), self._addr)
        except OSError as e:  # systemd went away or its queue is full: never fatal
            log.debug("sd_notify %r failed: %s", message, e)

    def watchdog_interval(self) -> Optional[float]:
        """Half the watchdog timeout systemd asked for, or None when there is none."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return max(0.5, int(usec) / 2e6)
        except ValueError:
            return None

    async def watchdog(self) -> None:
        """Ping the watchdog from the loop itself: if the loop blocks, the pings stop."""
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
