"""`rkvlm-assistant install` / `uninstall`: the service in one command.

install: the system user ``rkvlm`` (home /var/lib/rkvlm-assistant, no login shell) in the
audio, video and render groups; the unit in /etc/systemd/system with ExecStart= pointing at
the running installation and the path variables of assistant.paths; the command on root's
PATH (/usr/local/bin/rkvlm-assistant, a wrapper into this installation);
/etc/rkvlm-assistant/config.yaml only when there is none; the directories the service looks
in (assistant.paths.service_dirs); ``check``; then daemon-reload, enable, and start (or
restart once when it is running: an upgrade, ``git pull && sudo make install``). Running it
again changes nothing that is already right.

uninstall: stop, disable, remove the unit and the command on root's PATH. The config, the
state (transcript, models, prompt cache), the logs and the user are kept.

``--root DIR`` acts on a directory tree instead of ``/`` (a board image, or a test): users
and groups are written into DIR/etc/passwd and DIR/etc/group directly, systemctl only
enables (``systemctl --root=DIR``), nothing is started. ``--dry-run`` prints each action and
changes nothing.
"""

from __future__ import annotations

import functools
import grp
import logging
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from assistant import install_models, install_secret, paths, root_paths

log = logging.getLogger(__name__)

EX_NOPERM = 77  # sysexits.h: permission denied
EX_CONFIG = 78  # what `check` returns for a missing model or a bad config
UNIT_NAME = "rkvlm-assistant.service"
USER = paths.SERVICE_USER
GROUPS = ("audio", "video", "render")
HOME = paths.SERVICE_ENV["HOME"]
CONFIG = paths.SYSTEM_CONFIG
UNIT_DIR = "/etc/systemd/system"
COMMAND = "/usr/local/bin/rkvlm-assistant"   # sudo's secure_path has /usr/local/bin
_WRAPPER_MARK = "# written by `rkvlm-assistant install`"
# (path, mode); all owned by the service user. StateDirectory= etc. in the unit match them.
STATE_DIRS = tuple((d, 0o750) for d in paths.service_dirs())
# Where a checkout is invisible to the service, and the unit setting that hides it.
HIDDEN = (("/tmp", "PrivateTmp=yes"), ("/var/tmp", "PrivateTmp=yes"), ("/home", "ProtectHome=yes"),
          ("/root", "ProtectHome=yes"), ("/run/user", "ProtectHome=yes"))
# Where the unit of earlier releases made the service keep things (XDG_DATA_HOME was the
# state directory itself, XDG_STATE_HOME unset): an upgrade moves them where it looks now.
EARLIER = ((f"{HOME}/rkvlm-assistant/models", f"{HOME}/models"),
           (f"{HOME}/rkvlm-assistant/voices", f"{HOME}/voices"),
           (f"{HOME}/.local/state/rkvlm-assistant", HOME))
_SYS_ID_MAX, _SYS_ID_MIN = 999, 100  # the system id range useradd/groupadd allocate from
_NOLOGIN = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")

REPO = Path(__file__).resolve().parents[1]
RUN_SYSTEMD = Path("/run/systemd/system")  # exists when systemd is the running init


class InstallError(Exception):
    """A step failed; the message says which and what to do."""


def entry_point() -> str:
    """How systemd should start this installation: its `rkvlm-assistant` script (in the
    venv), else this Python with ``-m assistant``. Not resolved: a venv's python is a
    symlink whose target lacks the venv."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "rkvlm-assistant" and argv0.is_file():
        return _unit_quote(str(argv0.absolute()))
    script = Path(sys.executable).parent / "rkvlm-assistant"
    if script.is_file():
        return _unit_quote(str(script))
    return f"{_unit_quote(sys.executable)} -m assistant"


def _unit_quote(word: str) -> str:
    return f'"{word}"' if any(c.isspace() for c in word) else word


def render_unit(text: str, exec_start: str, workdir: Path) -> str:
    """The shipped unit with ExecStart=, WorkingDirectory= and Documentation= rewritten, and
    its path variables (Environment=XDG_DATA_HOME=... HOME=...) from assistant.paths."""
    table = [f"Environment={k}={v}" for k, v in paths.SERVICE_ENV.items()]
    out: list[str] = []
    for line in text.splitlines():
        key = line[len("Environment="):].split("=", 1)[0] if line.startswith("Environment=") else ""
        if key in paths.SERVICE_ENV:
            if table:
                out.extend(table)   # the whole table where its first line stood
                table = []
            continue
        if line.startswith("ExecStart="):
            line = f"ExecStart={exec_start} run --config {CONFIG}"
        elif line.startswith("WorkingDirectory="):
            line = f"WorkingDirectory={_unit_quote(str(workdir))}"
        elif line.startswith("Documentation=file://"):
            line = f"Documentation=file://{workdir}/README.md"
        out.append(line)
    if table:  # a unit without them: right after WorkingDirectory=
        at = next(i for i, l in enumerate(out) if l.startswith("WorkingDirectory=")) + 1
        out[at:at] = table
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- accounts

class Accounts:
    """Users and groups of the target: the host's through useradd/groupadd/usermod, or a
    tree's by editing its etc/passwd and etc/group (and shadow files where they exist)."""

    def __init__(self, inst: "Installer"):
        self.inst = inst
        # Ids given in this run but not written (a dry run): later choices and the output
        # see them, so each group gets its own id and the printed ids are the real ones.
        self.pending: dict[str, dict[str, int]] = {"group": {}, "passwd": {}}

    # --- queries
    def gid(self, name: str) -> Optional[int]:
        if name in self.pending["group"]:
            return self.pending["group"][name]
        if self.inst.is_host:
            try:
                return grp.getgrnam(name).gr_gid
            except KeyError:
                return None
        row = self._find("group", name)
        return int(row[2]) if row else None

    def uid(self, name: str) -> Optional[int]:
        if name in self.pending["passwd"]:
            return self.pending["passwd"][name]
        if self.inst.is_host:
            try:
                return pwd.getpwnam(name).pw_uid
            except KeyError:
                return None
        row = self._find("passwd", name)
        return int(row[2]) if row else None

    def members(self, group: str) -> set[str]:
        if self.inst.is_host:
            try:
                g = grp.getgrnam(group)
            except KeyError:
                return set()
            primary = {p.pw_name for p in pwd.getpwall() if p.pw_gid == g.gr_gid}
            return set(g.gr_mem) | primary
        row = self._find("group", group)
        return set(filter(None, row[3].split(","))) if row and len(row) > 3 else set()

    # --- changes
    def ensure_group(self, name: str) -> None:
        if self.gid(name) is not None:
            self.inst.note(f"group {name}: exists (gid {self.gid(name)})")
            return
        gid = self._free_id("group")
        if self.inst.is_host:
            self.inst.run(["groupadd", "--system", name])
            self._settle("group", name, gid)
            return
        self.inst.act(f"add group {name} (gid {gid}) to {self._db('group')}",
                      lambda: self._append("group", f"{name}:x:{gid}:", shadow=f"{name}:!::"))
        self._settle("group", name, gid)

    def ensure_user(self) -> None:
        missing = [g for g in GROUPS if USER not in self.members(g)]
        if self.uid(USER) is not None:
            self.inst.note(f"user {USER}: exists")
            if missing and self.inst.is_host:
                self.inst.run(["usermod", "--append", "--groups", ",".join(missing), USER])
            for g in missing if not self.inst.is_host else ():
                self.inst.act(f"add {USER} to group {g}", lambda g=g: self._add_member(g, USER))
            return
        shell = next((s for s in _NOLOGIN if self.inst.path(s).exists()), _NOLOGIN[0])
        if self.inst.is_host:
            gid = self.gid(USER) or self._free_id("group")
            uid = self._free_id("passwd", prefer=gid)
            self.inst.run(["useradd", "--system", "--user-group", "--home-dir", HOME,
                           "--no-create-home", "--shell", shell, "--comment",
                           "rkvlm-assistant daemon", "--groups", ",".join(GROUPS), USER])
            self._settle("group", USER, gid)
            self._settle("passwd", USER, uid)
            return
        gid = self.gid(USER)
        if gid is None:  # the user's own group, as useradd --user-group makes it
            gid = self._free_id("group")
            self.inst.act(f"add group {USER} (gid {gid}) to {self._db('group')}",
                          lambda: self._append("group", f"{USER}:x:{gid}:", shadow=f"{USER}:!::"))
            self._settle("group", USER, gid)
        uid = self._free_id("passwd", prefer=gid)
        days = int(time.time() // 86400)
        entry = f"{USER}:x:{uid}:{gid}:rkvlm-assistant daemon:{HOME}:{shell}"
        self.inst.act(f"add user {USER} (uid {uid}, home {HOME}, shell {shell}) to "
                      f"{self._db('passwd')}",
                      lambda: self._append("passwd", entry, shadow=f"{USER}:!*:{days}::::::"))
        self._settle("passwd", USER, uid)
        for g in missing:
            self.inst.act(f"add {USER} to group {g}", lambda g=g: self._add_member(g, USER))

    def _settle(self, db: str, name: str, expected: int) -> None:
        """After adding an account: a dry run remembers the id it would have; on the host the
        shadow tools chose it, and a dry run says what they are expected to choose."""
        if self.inst.dry_run:
            self.pending[db][name] = expected
            if self.inst.is_host:
                self.inst.note(f"{'gid' if db == 'group' else 'uid'} {expected} expected for {name}")

    # --- a tree's files
    def _db(self, name: str) -> Path:
        return self.inst.path(f"/etc/{name}")

    def _rows(self, name: str) -> list[list[str]]:
        try:
            text = self._db(name).read_text()
        except FileNotFoundError:
            return []
        return [l.split(":") for l in text.splitlines() if l and not l.startswith("#")]

    def _find(self, name: str, key: str) -> Optional[list[str]]:
        return next((r for r in self._rows(name) if r[0] == key), None)

    def _used(self, name: str) -> set[int]:
        if self.inst.is_host:
            ids = ({g.gr_gid for g in grp.getgrall()} if name == "group"
                   else {p.pw_uid for p in pwd.getpwall()})
        else:
            ids = {int(r[2]) for r in self._rows(name) if len(r) > 2 and r[2].isdigit()}
        return ids | set(self.pending[name].values())

    def _free_id(self, name: str, prefer: Optional[int] = None) -> int:
        # Like useradd --system: the highest free id of the system range.
        used = self._used(name)
        if prefer is not None and prefer not in used and _SYS_ID_MIN <= prefer <= _SYS_ID_MAX:
            return prefer
        for i in range(_SYS_ID_MAX, _SYS_ID_MIN - 1, -1):
            if i not in used:
                return i
        raise InstallError(f"{self._db(name)}: no free system id left between {_SYS_ID_MIN} and "
                           f"{_SYS_ID_MAX}")

    def _append(self, name: str, line: str, shadow: str) -> None:
        db = self._db(name)
        db.parent.mkdir(parents=True, exist_ok=True)
        text = db.read_text() if db.exists() else ""
        _write_atomic(db, text + ("" if not text or text.endswith("\n") else "\n") + line + "\n",
                      0o644 if not db.exists() else db.stat().st_mode & 0o7777)
        # shadow / gshadow only where the tree has them (a minimal tree may not).
        sdb = self._db("shadow" if name == "passwd" else "gshadow")
        if sdb.exists():
            stext = sdb.read_text()
            _write_atomic(sdb, stext + ("" if not stext or stext.endswith("\n") else "\n")
                          + shadow + "\n", sdb.stat().st_mode & 0o7777)

    def _add_member(self, group: str, user: str) -> None:
        for name in ("group", "gshadow"):  # members are the 4th field of both
            db = self._db(name)
            if not db.exists():
                continue
            lines = db.read_text().splitlines()
            for i, l in enumerate(lines):
                f = l.split(":")
                if f[0] == group and len(f) > 3:
                    mem = [m for m in f[3].split(",") if m]
                    if user not in mem:
                        f[3] = ",".join(mem + [user])
                        lines[i] = ":".join(f)
            _write_atomic(db, "\n".join(lines) + "\n", db.stat().st_mode & 0o7777)


_write_atomic = root_paths.write_atomic


# ---------------------------------------------------------------------------- the installer

@dataclass
class Installer:
    root: Path = Path("/")
    dry_run: bool = False
    # run_check(cfg) -> exit code; None skips the check.
    check: Optional[Callable[[object], int]] = None
    exec_start: str = field(default_factory=entry_point)
    checkout: Path = REPO
    out: Callable[[str], None] = print
    # --fix-permissions: a config holding a secret that others can read becomes 0640 root:rkvlm.
    fix_permissions: bool = False
    # pull(names, root, out) -> names not installed; None skips the speech models.
    pull: Optional[Callable[[list[str], Path, Callable[[str], None]], list[str]]] = None

    def __post_init__(self) -> None:
        self.root = Path(os.path.realpath(self.root))
        self.accounts = Accounts(self)

    @property
    def is_host(self) -> bool:
        return self.root == Path("/")

    def path(self, target_path: str, follow_last: bool = True) -> Path:
        """A path of the target system, under the root, every link resolved inside the tree
        (root_paths.OutsideRoot for one that leaves it)."""
        return root_paths.resolve(self.root, target_path, follow_last)

    # --- reporting and acting
    def note(self, text: str) -> None:
        self.out(f"  = {text}")

    def act(self, text: str, fn: Callable[[], object]) -> None:
        self.out(f"  + {text}")
        if not self.dry_run:
            fn()

    def run(self, argv: list[str], check: bool = True) -> int:
        self.out("  + " + shlex.join(argv))
        if self.dry_run:
            return 0
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        except FileNotFoundError:
            raise InstallError(f"{argv[0]} is not installed; it is needed to "
                               f"{'manage the service' if 'systemctl' in argv[0] else 'add users'}")
        except subprocess.TimeoutExpired:
            raise InstallError(f"`{' '.join(argv)}` did not finish in 300 s")
        if r.returncode != 0 and check:
            raise InstallError(f"`{' '.join(argv)}` failed (exit {r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()}")
        return r.returncode

    def _owner(self) -> tuple[int, int]:
        """The service user's uid/gid in the target (-1 = leave as is)."""
        uid, gid = self.accounts.uid(USER), self.accounts.gid(USER)
        return (-1 if uid is None else uid, -1 if gid is None else gid)

    def _dir(self, target_path: str, mode: int, uid: int, gid: int, fix: bool = True) -> None:
        """Make a directory; with ``fix``, also give an existing one this mode and owner. A
        link where the directory should be is left as it is, named (never followed: the
        service user could have planted it)."""
        p = self.path(target_path, follow_last=False)
        if p.is_symlink():
            self.out(f"  ! {target_path} is a symbolic link (to {os.readlink(p)}): left as it "
                     f"is, its owner and mode unchanged")
            return
        st = root_paths.lstat_dir(p)
        right = st is not None and (not fix or st.st_mode & 0o7777 == mode and (
            os.geteuid() != 0 or ((uid < 0 or st.st_uid == uid) and (gid < 0 or st.st_gid == gid))))
        if right:
            self.note(f"{target_path}/ exists")
            return

        def make() -> None:
            self._mkdirs(p.parent)
            try:
                p.mkdir()
            except FileExistsError:
                pass
            root_paths.set_owner_mode(p, mode, uid, gid)
        self.act(f"directory {target_path}/ ({mode:04o} {_who(uid, gid)})", make)

    def _mkdirs(self, p: Path) -> None:
        """The parents of a path already resolved inside the tree (none of them a link)."""
        if not self.is_host and not root_paths.inside(self.root, p):
            raise root_paths.OutsideRoot(f"{p} is outside {self.root}")
        p.mkdir(parents=True, exist_ok=True)

    def _file(self, target_path: str, text: str, mode: int, uid: int, gid: int,
              keep_existing: bool = False) -> bool:
        """Write a file unless it already says this (or exists, with keep_existing)."""
        p = self.path(target_path)
        if p.exists() and (keep_existing or p.read_text() == text):
            self.note(f"{target_path} exists: " + ("kept" if keep_existing else "unchanged"))
            return False

        def write() -> None:
            self._mkdirs(p.parent)
            _write_atomic(p, text, mode, uid, gid)
        self.act(f"write {target_path} ({mode:04o} {_who(uid, gid)})", write)
        return True

    # --- install
    def install(self) -> int:
        self.out(f"installing rkvlm-assistant into {self.root}"
                 + (" (dry run: nothing is changed)" if self.dry_run else ""))
        unit_src = self.checkout / "systemd" / UNIT_NAME
        config_src = self.checkout / "config.yaml"
        for src in (unit_src, config_src):  # before anything is changed
            if not src.is_file():
                raise InstallError(f"{src} is missing: run the install from a checkout of "
                                   "rkvlm-assistant (`git clone ...; pip install -e .`)")
        self._warn_hidden_checkout()
        for g in GROUPS:
            self.accounts.ensure_group(g)
        self.accounts.ensure_user()
        uid, gid = self._owner()

        unit = render_unit(unit_src.read_text(), self.exec_start, self.checkout)
        self._file(f"{UNIT_DIR}/{UNIT_NAME}", unit, 0o644, 0, 0)

        self._dir(str(Path(CONFIG).parent), 0o755, 0, 0, fix=False)  # the admin's directory
        # Readable by the service's group only: it may come to hold an API key.
        self._file(CONFIG, config_src.read_text(), 0o640, 0, gid, keep_existing=True)
        install_secret.review(self, self.path(CONFIG), CONFIG, gid, self.fix_permissions)
        for d, mode in STATE_DIRS:
            self._dir(d, mode, uid, gid)
        self._move_earlier()
        self._command()
        self._speech_models()

        check_ok = self._check(unit)
        self._enable_and_start(start=check_ok)
        return 0

    def _warn_hidden_checkout(self) -> None:
        # PrivateTmp=yes and ProtectHome=yes give the service its own /tmp and no /home,
        # /root or /run/user: a program there does not exist for it.
        program = shlex.split(self.exec_start)[0]
        for path in dict.fromkeys((str(self.checkout), program, _interpreter(program))):
            if not path:
                continue
            hidden = next(((h, why) for h, why in HIDDEN if path.startswith(h + "/")), None)
            if hidden:
                self.out(f"  ! warning: {path} is under {hidden[0]}, which the unit hides from "
                         f"the service ({hidden[1]}): it will not start from there. Clone into "
                         "/opt/rkvlm-assistant, make its venv there and install from it")

    def _move_earlier(self) -> None:
        """An upgrade from a release whose unit kept models, voices and the transcript
        elsewhere: each entry moves to where the service looks now (an entry already there
        is kept, and the older one left where it was, named)."""
        for old, new in EARLIER:
            src = self.path(old)
            if not src.is_dir() or src.is_symlink():
                continue
            for entry in sorted(src.iterdir()):
                dest = self.path(new) / entry.name
                if dest.exists() or dest.is_symlink():
                    self.out(f"  ! {old}/{entry.name} (an earlier release's) is also in {new}/: "
                             "kept both, the service uses the latter")
                    continue
                self.act(f"move {old}/{entry.name} -> {new}/ (where the service looks now)",
                         lambda e=entry, d=dest: os.replace(e, d))

    def _command(self) -> None:
        """/usr/local/bin/rkvlm-assistant: sudo's PATH, a wrapper into this installation."""
        p = self.path(COMMAND, follow_last=False)
        if (p.exists() or p.is_symlink()) and not _is_our_wrapper(p):
            self.out(f"  ! {COMMAND} exists and was not written by install: kept (run this "
                     f"installation's command as {shlex.split(self.exec_start)[0]})")
            return
        text = (f"#!/bin/sh\n{_WRAPPER_MARK} from {self.checkout}; `rkvlm-assistant uninstall` "
                f"removes it.\nexec {shlex.join(shlex.split(self.exec_start))} \"$@\"\n")
        self._file(COMMAND, text, 0o755, 0, 0)

    def _speech_models(self) -> None:
        """The whisper model and voice(s) the installed config names, through `models pull`
        into the service's directories; one that cannot be had now is named with its command."""
        from assistant.config import ConfigError, load

        if self.pull is None:
            self.note("speech models skipped")
            return
        config = self.path(CONFIG)
        if self.dry_run and not config.exists():
            config = self.checkout / "config.yaml"
        try:
            names = install_models.speech_names(load(config))
        except ConfigError:
            return                          # `check` reports it
        if self.dry_run:
            for name in names:
                self.out(f"  + rkvlm-assistant models pull {name}"
                         + ("" if self.is_host else f" --root {self.root}"))
            return
        self.pull(names, self.root, self.out)

    def _service_env(self, unit: str) -> dict[str, str]:
        """The unit's Environment= (HOME, XDG_*...), paths under the root: check then looks
        for models where the service will."""
        env = {}
        for line in unit.splitlines():
            if line.startswith("Environment=") and "=" in line[len("Environment="):]:
                key, value = line[len("Environment="):].split("=", 1)
                env[key] = str(self.path(value)) if value.startswith("/") else value
        return env

    def _check(self, unit: str) -> bool:
        if self.check is None:
            self.note("check skipped")
            return True
        config = self.path(CONFIG)
        if self.dry_run and not config.exists():
            config = self.checkout / "config.yaml"  # what would be installed (check only reads)
        self.out(f"  + rkvlm-assistant check --config {config}")
        from assistant.config import ConfigError, load
        saved = dict(os.environ)
        os.environ.update(self._service_env(unit))
        # The service's paths, resolved inside the tree; its messages name root's commands.
        saved_root, paths._entered_root = paths._entered_root, self.root
        scratch = None
        if self.dry_run:
            # Probing sound devices makes the audio libraries write their client config under
            # HOME, and assembling a packaged model writes the cache: into a scratch
            # directory, removed after, so the dry run leaves no trace.
            scratch = tempfile.mkdtemp(prefix="rkvlm-install-dry-run-")
            os.environ.update(HOME=scratch, XDG_CACHE_HOME=scratch, XDG_CONFIG_HOME=scratch)
        try:
            cfg = load(config)
            from assistant.audio.wake import in_force
            self.out(f"  the service {in_force(cfg.wake, service=True)}")  # never silent
            rc = self.check(paths.in_tree(cfg, self.root))
        except ConfigError as e:
            self.out(f"  ! {e}")
            rc = EX_CONFIG
        finally:
            os.environ.clear()
            os.environ.update(saved)
            paths._entered_root = saved_root
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        if not self.dry_run:
            # What the check wrote as root (the audio client's config in the service's home,
            # an assembled model) becomes the service user's.
            paths.hand_over(paths.Layout(service=True, root=self.root))
        if rc == 0:
            return True
        if rc != EX_CONFIG:
            # Only devices are missing: the service retries them by itself once running.
            self.out(f"  ! check found a missing device (exit {rc}), see above: plug it in, or "
                     f"set it in {CONFIG}; the service is started anyway and retries it")
            return True
        self.out(f"  ! check found problems (exit {rc}), see above. The service is installed and "
                 f"enabled but not started: put the missing model files where the lines above "
                 f"say (or `sudo rkvlm-assistant models pull NAME`), fix {CONFIG}, run "
                 f"`sudo rkvlm-assistant check --config {CONFIG}`, then "
                 f"`sudo systemctl start rkvlm-assistant`")
        return False

    def _enable_and_start(self, start: bool) -> None:
        if not self.is_host:
            self._enable_offline()
            self.note("not started: the tree is not the running system. On a running system "
                      f"this step is `systemctl daemon-reload`, `systemctl enable {UNIT_NAME}`, "
                      f"then `systemctl restart {UNIT_NAME}` when it runs (an upgrade: the new "
                      f"code and unit take over, once) or `systemctl start {UNIT_NAME}`")
            return
        if not RUN_SYSTEMD.exists():
            # A container or chroot: systemctl can still enable, not start.
            self.run(["systemctl", "enable", UNIT_NAME])
            self.out("  ! systemd is not running here: enabled, not started")
            return
        self.run(["systemctl", "daemon-reload"])
        self.run(["systemctl", "enable", UNIT_NAME])
        running = self.is_active()
        if not start:
            if running:
                self.out("  ! the running service was not restarted: it keeps the previous "
                         "version until the problems above are fixed and it is restarted")
            return
        # An upgrade (`git pull && sudo make install`): the running service restarts once
        # into the new code and unit; a stopped one starts.
        self.run(["systemctl", "restart" if running else "start", UNIT_NAME])
        self.out(("restarted" if running else "started") + ": `systemctl status "
                 "rkvlm-assistant`, `journalctl -u rkvlm-assistant -f`")

    def is_active(self) -> bool:
        """Whether the service runs now (a query: also asked in a dry run)."""
        try:
            return subprocess.run(["systemctl", "is-active", "--quiet", UNIT_NAME],
                                  timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _enable_offline(self) -> None:
        # systemctl --root does not find a unit whose directory is a link (to the board's
        # own path): then the link below, which is what `enable` makes.
        linked = self.path(UNIT_DIR) != self.root / UNIT_DIR.lstrip("/")
        if shutil.which("systemctl") and not linked:
            self.run(["systemctl", f"--root={self.root}", "enable", UNIT_NAME])
            return
        # What `enable` does for WantedBy=multi-user.target.
        link = self.path(f"{UNIT_DIR}/multi-user.target.wants/{UNIT_NAME}", follow_last=False)
        if link.is_symlink():
            self.note(f"{UNIT_NAME} enabled")
            return

        def make() -> None:
            self._mkdirs(link.parent)
            link.symlink_to(f"{UNIT_DIR}/{UNIT_NAME}")
        self.act(f"link {link.relative_to(self.root)} -> {UNIT_DIR}/{UNIT_NAME}", make)

    # --- uninstall
    def uninstall(self) -> int:
        self.out(f"uninstalling rkvlm-assistant from {self.root}"
                 + (" (dry run: nothing is changed)" if self.dry_run else ""))
        unit = self.path(f"{UNIT_DIR}/{UNIT_NAME}", follow_last=False)
        if self.is_host and RUN_SYSTEMD.exists():
            if unit.exists():
                self.run(["systemctl", "disable", "--now", UNIT_NAME])
            self._remove(unit)
            self.run(["systemctl", "daemon-reload"])
            self.run(["systemctl", "reset-failed", UNIT_NAME], check=False)
        else:
            if unit.exists():
                if shutil.which("systemctl"):
                    self.run(["systemctl"] + ([] if self.is_host else [f"--root={self.root}"])
                             + ["disable", UNIT_NAME])
                else:
                    self._remove(self.path(f"{UNIT_DIR}/multi-user.target.wants/{UNIT_NAME}",
                                           follow_last=False))
            self._remove(unit)
        command = self.path(COMMAND, follow_last=False)
        if _is_our_wrapper(command):
            self._remove(command)
        tops = [d for d, _ in STATE_DIRS
                if not any(d.startswith(o + "/") for o, _ in STATE_DIRS)]
        kept = [CONFIG] + tops
        self.out("kept: " + ", ".join(p for p in kept if self.path(p).exists())
                 + f" (the config, the transcript and state, the models, the logs) and the user "
                 f"{USER}; remove them by hand if you want them gone "
                 f"(`sudo rm -r {' '.join([str(Path(CONFIG).parent)] + tops)}; "
                 f"sudo userdel {USER}`)")
        return 0

    def _remove(self, path: Path) -> None:
        if not path.exists() and not path.is_symlink():
            self.note(f"/{path.relative_to(self.root)} is not there")
            return
        self.act(f"remove /{path.relative_to(self.root)}", path.unlink)


def _interpreter(program: str) -> Optional[str]:
    """The real file of the Python a program runs on (its #! line, links followed): a venv
    made from a Python under /root is as hidden from the service as a checkout there."""
    try:
        with open(program, "rb") as f:
            first = f.readline(512).decode(errors="replace")
    except OSError:
        return None
    if not first.startswith("#!"):
        return os.path.realpath(program) if os.path.basename(program).startswith("python") else None
    words = first[2:].split()
    return os.path.realpath(words[0]) if words else None


def _is_our_wrapper(path: Path) -> bool:
    try:
        return not path.is_symlink() and _WRAPPER_MARK in path.read_text(errors="replace")[:400]
    except OSError:
        return False


def _who(uid: int, gid: int) -> str:
    return f"{'-' if uid < 0 else uid}:{'-' if gid < 0 else gid}"


# ---------------------------------------------------------------------------- the commands

def _refuse_without_root(args) -> Optional[int]:
    if args.dry_run or args.root or os.geteuid() == 0:
        return None
    print(f"rkvlm-assistant {args.cmd}: must run as root (`sudo rkvlm-assistant {args.cmd}`); "
          "--dry-run shows what it would do, --root DIR acts on a directory tree",
          file=sys.stderr)
    return EX_NOPERM


def _installer(args, check: Optional[Callable[[object], int]] = None) -> Installer:
    pull = None if getattr(args, "no_models", True) else install_models.pull_speech
    return Installer(root=Path(args.root or "/"), dry_run=args.dry_run, check=check,
                     fix_permissions=getattr(args, "fix_permissions", False), pull=pull)


def cli_install(args) -> int:
    refused = _refuse_without_root(args)
    if refused is not None:
        return refused
    check = None
    if not getattr(args, "no_check", False):
        from assistant.check import run_check
        # As the service will run: its wake mode, its unit's writable directories.
        check = functools.partial(run_check, service=True, root=Path(args.root or "/"))
    try:
        return _installer(args, check).install()
    except (InstallError, OSError, root_paths.OutsideRoot) as e:
        print(f"rkvlm-assistant install: {e}", file=sys.stderr)
        return 1


def cli_uninstall(args) -> int:
    refused = _refuse_without_root(args)
    if refused is not None:
        return refused
    try:
        return _installer(args).uninstall()
    except (InstallError, OSError, root_paths.OutsideRoot) as e:
        print(f"rkvlm-assistant uninstall: {e}", file=sys.stderr)
        return 1
