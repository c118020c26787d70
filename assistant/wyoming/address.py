"""Where the Wyoming server listens: ``wyoming.uri`` parsed, and the LAN rule (a
non-loopback address needs ``wyoming.allow_lan``: Wyoming has no authentication)."""

from __future__ import annotations

from typing import Optional
from urllib.parse import urlparse

from assistant.config import Config, ConfigError
from assistant.http.server import is_loopback


def parse_uri(cfg: Config) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> (host, port); ConfigError naming wyoming.uri otherwise."""
    value = cfg.wyoming.uri

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{cfg.source}: wyoming.uri: expected \"tcp://HOST:PORT\" (e.g. "
                           f"\"tcp://127.0.0.1:10700\"), found {value!r}: {why}",
                           key="wyoming.uri", source=cfg.source)
    try:
        u = urlparse(str(value).strip())
        port = u.port
    except ValueError as e:
        raise bad(str(e)) from None
    if u.scheme != "tcp":
        raise bad("only tcp:// is served (Home Assistant connects over TCP)")
    if not u.hostname or port is None:
        raise bad("a host and a port are needed")
    return u.hostname, port


def check_uri(cfg: Config) -> Optional[tuple[str, int]]:
    """The address to listen on (None when the server is off); ConfigError (exit 78) for a
    non-loopback address without ``wyoming.allow_lan``."""
    if not cfg.wyoming.enabled:
        return None
    host, port = parse_uri(cfg)
    if not is_loopback(host) and not cfg.wyoming.allow_lan:
        raise ConfigError(
            f"{cfg.source}: wyoming.allow_lan: required when wyoming.uri is not a loopback "
            f"address (found {cfg.wyoming.uri!r}): Wyoming has no authentication, so anyone "
            f"on the network could use the assistant and its camera; set "
            f"wyoming.allow_lan: true or listen on tcp://127.0.0.1", key="wyoming.allow_lan",
            source=cfg.source)
    return host, port
