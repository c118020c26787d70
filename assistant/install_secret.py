"""`install`'s look at an existing config that holds a secret (``http.api_key``, or any key
assistant.config marks ``secret``): kept as it is, but not without a word when people other
than root and the service's group can read it; ``--fix-permissions`` makes it 0640
root:rkvlm."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any, Iterator

from assistant import root_paths

SAFE_MODE = 0o640


def secret_keys(cfg: Any, prefix: str = "") -> Iterator[str]:
    """The dotted keys of ``cfg`` marked secret that hold a value."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from secret_keys(value, key + ".")
        elif f.metadata.get("secret") and value not in (None, ""):
            yield key


def exposure(st: os.stat_result, service_gid: int) -> list[str]:
    """Who besides root and the service's group can read the file (empty: nobody)."""
    who = []
    if st.st_mode & stat.S_IROTH:
        who.append("every user (mode o+r)")
    if st.st_mode & stat.S_IRGRP and st.st_gid not in (0, service_gid):
        who.append(f"group {st.st_gid} (mode g+r)")
    if st.st_uid != 0:
        who.append(f"its owner uid {st.st_uid}")
    return who


def review(inst, config: Path, target: str, service_gid: int, fix: bool) -> None:
    """Warn about (or, with ``fix``, correct) a secret-holding config others can read.
    ``inst`` is the Installer (its out/act)."""
    from assistant.config import ConfigError, load

    if config.is_symlink() or not config.is_file():
        return
    try:
        keys = list(secret_keys(load(config)))
    except ConfigError:
        return                         # `check` reports it below
    if not keys:
        return
    st = config.lstat()
    who = exposure(st, service_gid)
    if not who:
        return
    gid = service_gid if service_gid >= 0 else 0
    if fix:
        inst.act(f"{target}: holds {', '.join(keys)}; mode {SAFE_MODE:04o}, owner 0:{gid} "
                 f"(was {st.st_mode & 0o7777:04o} {st.st_uid}:{st.st_gid})",
                 lambda: root_paths.set_owner_mode(config, SAFE_MODE, 0, gid))
        return
    inst.out(f"  ! warning: {target} holds {', '.join(keys)} and can be read by "
             f"{' and '.join(who)} (mode {st.st_mode & 0o7777:04o}, owner "
             f"{st.st_uid}:{st.st_gid}): kept as it is. `sudo rkvlm-assistant install "
             f"--fix-permissions` makes it {SAFE_MODE:04o} root:rkvlm (or `sudo chmod 640 "
             f"{target} && sudo chown root:rkvlm {target}`)")
