"""Where things live: a person's PC and the installed service
(README.md#where-the-service-keeps-its-files).

One rule for every command: the assistant's files are under ``$XDG_DATA_HOME/rkvlm-assistant``
(catalogue models, voices), ``$XDG_STATE_HOME/rkvlm-assistant`` (transcript, prompt cache),
``$XDG_CACHE_HOME/rkvlm-assistant`` (assembled models) and ``$HF_HOME`` (hub downloads), with
the XDG defaults under the home directory when a variable is unset.

| what | a person (PC, ``make demo``) | the installed service |
| --- | --- | --- |
| config | ``$RKVLM_CONFIG``, ./config.yaml, ``$XDG_CONFIG_HOME/rkvlm-assistant/`` | /etc/rkvlm-assistant/config.yaml |
| models, voices | ~/.local/share/rkvlm-assistant/ | /var/lib/rkvlm-assistant/ |
| hub downloads | ~/.cache/huggingface | /var/cache/rkvlm-assistant/huggingface |
| transcript, prompt cache | ~/.local/state/rkvlm-assistant/ | /var/lib/rkvlm-assistant/ |

The service's column is ``SERVICE_ENV``: the unit's ``Environment=`` lines are written from it
by ``install`` (which also creates exactly ``service_dirs()``), and root running a command on a
machine with an installed service (``/etc/rkvlm-assistant/config.yaml`` exists, or ``--root DIR``
names a tree that has one) takes the same environment, so what one writes the other finds.
The XDG variables name the parents (``/var/lib``), so each path appears once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from assistant import root_paths

log = logging.getLogger(__name__)

APP = "rkvlm-assistant"
SERVICE_USER = "rkvlm"
SYSTEM_CONFIG = "/etc/rkvlm-assistant/config.yaml"
LOGS_DIR = "/var/log/rkvlm-assistant"

# The service's environment (unit Environment=). The XDG rule appends APP to the first three.
SERVICE_ENV: dict[str, str] = {
    "XDG_DATA_HOME": "/var/lib",
    "XDG_STATE_HOME": "/var/lib",
    "XDG_CACHE_HOME": "/var/cache",
    "HF_HOME": f"/var/cache/{APP}/huggingface",
    "HOME": f"/var/lib/{APP}",
}
# Variables that would override the table's answer for hub downloads.
_OVERRIDES = ("HF_HUB_CACHE",)
# The tree whose service environment this process took (``enter``): the service's paths are
# resolved inside it, links included (assistant.root_paths).
_entered_root: Optional[Path] = None


# --------------------------------------------------------------------------- the rule

def _xdg(var: str, default: str) -> Path:
    return Path(os.environ.get(var) or os.path.join(os.path.expanduser("~"), default))


def _contained(p: Path) -> Path:
    """Under --root: the path with every link resolved inside the tree (OutsideRoot for one
    that leaves it); otherwise as it is."""
    root = _entered_root
    if root is None or root == Path("/"):
        return p
    real = Path(os.path.realpath(root))
    for base in (root, real):
        if p == base or base in p.parents:
            return root_paths.resolve(real, "/" + str(p.relative_to(base)))
    return p


def data_dir() -> Path:
    """Catalogue models (models/) and voices (voices/)."""
    return _contained(_xdg("XDG_DATA_HOME", ".local/share") / APP)


def state_dir() -> Path:
    """The transcript and the prompt cache."""
    return _contained(_xdg("XDG_STATE_HOME", ".local/state") / APP)


def cache_dir() -> Path:
    """Models assembled from packages (whisper parts)."""
    return _contained(_xdg("XDG_CACHE_HOME", ".cache") / APP)


def config_home() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / APP


def hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return _contained(Path(os.path.expanduser(os.environ["HF_HOME"])))
    return _contained(_xdg("XDG_CACHE_HOME", ".cache") / "huggingface")


def hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub computes it, from the environment of now."""
    if os.environ.get("HF_HUB_CACHE"):
        return _contained(Path(os.path.expanduser(os.environ["HF_HUB_CACHE"])))
    return _contained(hf_home() / "hub")


def models_dir() -> Path:
    return _contained(data_dir() / "models")


def voices_dir() -> Path:
    return _contained(data_dir() / "voices")


def transcript_file() -> Path:
    return _contained(state_dir() / "transcript.jsonl")


# --------------------------------------------------------------------------- the service

def under(root: Path, target_path: str) -> Path:
    """A path of the target system, inside the tree at root: links resolved within the tree,
    root_paths.OutsideRoot (a ValueError) for one that leaves it."""
    if Path(root) == Path("/"):
        return Path(root) / target_path.lstrip("/")
    return root_paths.resolve(Path(root), target_path)


def service_env(root: Path = Path("/")) -> dict[str, str]:
    """The unit's path variables, for the installation under root."""
    return {k: str(under(root, v)) for k, v in SERVICE_ENV.items()}


def service_dirs() -> list[str]:
    """The directories the service looks in (target paths), parents first: what install
    creates, owned by the service user."""
    env = SERVICE_ENV
    dirs = [f"{env['XDG_DATA_HOME']}/{APP}", f"{env['XDG_DATA_HOME']}/{APP}/models",
            f"{env['XDG_DATA_HOME']}/{APP}/voices", f"{env['XDG_STATE_HOME']}/{APP}",
            f"{env['XDG_CACHE_HOME']}/{APP}", env["HF_HOME"], env["HOME"], LOGS_DIR]
    return list(dict.fromkeys(dirs))


def system_config(root: Path = Path("/")) -> Path:
    return under(root, SYSTEM_CONFIG)


@dataclass(frozen=True)
class Layout:
    """Which column a command uses. ``service`` with ``root``: the installation in that tree."""

    service: bool
    root: Path = Path("/")

    def config_search(self) -> list[Path]:
        """Config files tried in order when neither --config nor $RKVLM_CONFIG is given."""
        if self.service:
            return [system_config(self.root)]
        return [Path("config.yaml"), config_home() / "config.yaml", system_config()]

    def target(self, path: Path) -> Path:
        """A path as the installed system sees it (the tree's root taken off)."""
        if self.root == Path("/"):
            return Path(path)
        try:
            return Path("/") / Path(path).relative_to(self.root)
        except ValueError:
            return Path(path)


def in_tree(cfg, root: Path):
    """``cfg`` whose ``path()`` finds the absolute paths it names inside the tree at root (the
    config of an installation under --root names the paths of the system it is for)."""
    root = Path(root)
    if root == Path("/"):
        return cfg
    base = type(cfg)

    class InTree(base):  # type: ignore[misc, valid-type]
        def path(self, value):
            p = base.path(self, value)
            if p is not None and p.is_absolute():
                real = Path(os.path.realpath(root))
                rel = next((p.relative_to(b) for b in (root, real) if b in p.parents), None)
                p = under(root, "/" + str(rel) if rel is not None else str(p))
            return p

    InTree.__name__ = InTree.__qualname__ = base.__name__
    new = object.__new__(InTree)
    for f in dataclasses.fields(cfg):
        object.__setattr__(new, f.name, getattr(cfg, f.name))
    return new


def choose(root: Optional[str]) -> Layout:
    """The service's column when root runs a command on a machine with an installed service,
    or when --root names a tree with one; the person's otherwise. A --root without an
    installation is an error (ValueError naming the missing file)."""
    if root:
        r = Path(root).absolute()
        if not system_config(r).is_file():
            raise ValueError(f"{system_config(r)} does not exist: no installation under {r} "
                             f"(`rkvlm-assistant install --root {root}` makes one)")
        return Layout(service=True, root=r)
    if os.geteuid() == 0 and system_config().is_file():
        return Layout(service=True)
    return Layout(service=False)


def enter(layout: Layout) -> dict[str, Optional[str]]:
    """Take the service's environment for this process (a person's layout changes nothing).
    Returns what it replaced, for ``leave``."""
    global _entered_root
    if not layout.service:
        return {}
    new = service_env(layout.root)
    saved = {k: os.environ.get(k) for k in (*new, *_OVERRIDES)}
    for k in _OVERRIDES:
        os.environ.pop(k, None)
    os.environ.update(new)
    _entered_root = Path(layout.root)
    return saved


def leave(saved: dict[str, Optional[str]]) -> None:
    global _entered_root
    _entered_root = None
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def runs_as_service() -> bool:
    """The service itself (its user, or its HOME from the unit), or root acting on an
    installed service (/etc/rkvlm-assistant/config.yaml, or --root): where a missing model is
    installed with ``sudo rkvlm-assistant models pull``."""
    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        me = ""
    if me == SERVICE_USER or os.environ.get("HOME") == SERVICE_ENV["HOME"]:
        return True
    return os.geteuid() == 0 and (_entered_root is not None or system_config().is_file())


def pull_command(name: str) -> str:
    """The command that installs the model ``name`` where it is missing now: the service's
    (as root, into the service's directories, under --root when a tree was entered) or a
    person's own."""
    if not runs_as_service():
        return f"rkvlm-assistant models pull {name}"
    tail = "" if _entered_root in (None, Path("/")) else f" --root {_entered_root}"
    return f"sudo rkvlm-assistant models pull {name}{tail}"


# --------------------------------------------------------------------------- ownership

def service_owner(root: Path = Path("/")) -> Optional[tuple[int, int]]:
    """(uid, gid) of the service user in the target, or None when there is none."""
    if Path(root) == Path("/"):
        try:
            pw = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            return None
        return pw.pw_uid, pw.pw_gid
    try:
        rows = under(root, "/etc/passwd").read_text().splitlines()
    except OSError:
        return None
    for row in rows:
        f = row.split(":")
        if f[0] == SERVICE_USER and len(f) > 3 and f[2].isdigit() and f[3].isdigit():
            return int(f[2]), int(f[3])
    return None


def _walk(top: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(top):
        yield Path(dirpath)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            yield Path(dirpath) / name


def hand_over(layout: Layout) -> int:
    """Give what root wrote into the service's directories to the service user, as systemd
    would at the next start only for a wrongly owned top directory: the service reads its
    models and writes its cache under UMask=0077. Returns how many entries changed."""
    if not layout.service or os.geteuid() != 0:
        return 0
    owner = service_owner(layout.root)
    if owner is None:
        return 0
    uid, gid = owner
    changed = 0
    tops = set()
    for d in service_dirs():
        if d == LOGS_DIR:
            continue
        try:
            # The top itself is not followed: a link there (the service user's to plant in
            # its own directories) would hand over what it points to.
            tops.add(root_paths.resolve(layout.root, d, follow_last=False))
        except root_paths.OutsideRoot as e:
            log.warning("not handed to %s: %s", SERVICE_USER, e)
    for top in sorted(tops):
        if root_paths.lstat_dir(top) is None:
            continue
        for p in _walk(top):
            st = p.lstat()
            if st.st_uid == uid and st.st_gid == gid:
                continue
            os.lchown(p, uid, gid)
            # A directory root made with its own umask: the service must be able to enter it.
            if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o700 != 0o700:
                try:
                    root_paths.set_owner_mode(p, st.st_mode & 0o7777 | 0o700)
                except root_paths.OutsideRoot:   # replaced by a link since: left alone
                    continue
            changed += 1
    if changed:
        log.info("gave %d new file(s) in the service's directories to %s", changed, SERVICE_USER)
    return changed
