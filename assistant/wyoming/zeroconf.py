"""The ``_wyoming._tcp`` announcement (mDNS, the ``zeroconf`` package) that lets Home
Assistant discover the board: it offers to add the Wyoming integration by itself.

On by default only when the server listens on a LAN address (``wyoming.zeroconf: auto``):
on loopback nobody else could connect anyway. Bound to one address, only that interface
announces; bound to every address (0.0.0.0), the address announced is the one the system
routes multicast through.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from typing import Callable, Optional

log = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
_MDNS_GROUP = "224.0.0.251"


def wanted(setting: str, host: str) -> bool:
    """Whether to announce: ``on``, ``off``, or ``auto`` (on unless loopback)."""
    if setting != "auto":
        return setting == "on"
    from assistant.http.server import is_loopback

    return not is_loopback(host)


def lan_address(host: str) -> str:
    """The IPv4 address to announce for a server bound to ``host``."""
    if host not in ("", "0.0.0.0", "::"):
        return host
    # Connecting a UDP socket sends nothing: it only asks the routing table which
    # local address would reach the mDNS group.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((_MDNS_GROUP, 5353))
        return s.getsockname()[0]


def service_name(name: Optional[str]) -> str:
    label = name or f"rkvlm-assistant-{socket.gethostname()}"
    label = re.sub(r"[^A-Za-z0-9 _-]+", "-", label).strip("-")[:63] or "rkvlm-assistant"
    return f"{label}.{SERVICE_TYPE}"


class Announcer:
    """Registers the service on start, withdraws it on stop. ``make_zeroconf(interfaces)``
    builds the ``AsyncZeroconf`` (tests pass one that records instead of sending)."""

    def __init__(self, host: str, port: int, name: Optional[str] = None,
                 make_zeroconf: Optional[Callable] = None):
        self.address = lan_address(host)
        self.interfaces = None if host in ("", "0.0.0.0", "::") else [self.address]
        self.port = port
        self.name = service_name(name)
        self._make = make_zeroconf
        self._zc = None
        self.info = None

    async def start(self) -> None:
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        self.info = AsyncServiceInfo(
            SERVICE_TYPE, self.name, port=self.port, server=f"{socket.gethostname()}.local.",
            addresses=[ipaddress.ip_address(self.address).packed])
        if self._make is not None:
            self._zc = self._make(self.interfaces)
        elif self.interfaces is None:
            self._zc = AsyncZeroconf()
        else:
            self._zc = AsyncZeroconf(interfaces=self.interfaces)
        await self._zc.async_register_service(self.info)
        log.info("announced %s at %s:%d on the network (zeroconf)", self.name, self.address,
                 self.port)

    async def stop(self) -> None:
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            await zc.async_unregister_service(self.info)
        finally:
            await zc.async_close()
