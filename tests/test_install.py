"""`rkvlm-assistant install` / `uninstall` into a temporary root: every file, mode, owner."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from assistant import install
from assistant.cli import build_parser
from assistant.install import COMMAND, CONFIG, HOME, STATE_DIRS, UNIT_NAME, Installer

REPO = Path(__file__).resolve().parents[1]
UNIT = f"/etc/systemd/system/{UNIT_NAME}"
WANTS = f"/etc/systemd/system/multi-user.target.wants/{UNIT_NAME}"
STATE = [d for d, _ in STATE_DIRS]
AS_ROOT = os.geteuid() == 0
EXEC = "/opt/venv/bin/rkvlm-assistant"


def make_root(tmp_path: Path) -> Path:
    """A minimal system tree: root, and an `audio` group that already exists (as on Debian)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n"
                                         "systemd-network:x:998:998::/:/usr/sbin/nologin\n")
    (root / "etc" / "group").write_text("root:x:0:\naudio:x:29:pulse\nsystemd-network:x:998:\n")
    (root / "usr" / "sbin").mkdir(parents=True)
    (root / "usr" / "sbin" / "nologin").write_text("")
    return root


CONFIG_TEXT = "# the checkout's config.yaml\nlogging:\n  level: INFO\n"


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A checkout: the shipped unit, and a config of its own (the repository's config.yaml is
    checked by the CLI test; here a config under edit elsewhere cannot fail these tests)."""
    co = tmp_path / "checkout"
    (co / "systemd").mkdir(parents=True)
    shutil.copyfile(REPO / "systemd" / UNIT_NAME, co / "systemd" / UNIT_NAME)
    (co / "config.yaml").write_text(CONFIG_TEXT)
    return co


def run_install(root: Path, check=None, dry_run: bool = False) -> tuple[int, list[str]]:
    lines: list[str] = []
    inst = Installer(root=root, dry_run=dry_run, check=check, exec_start=EXEC,
                     checkout=root.parent / "checkout", out=lines.append)
    return inst.install(), lines


def run_uninstall(root: Path, dry_run: bool = False) -> tuple[int, list[str]]:
    lines: list[str] = []
    inst = Installer(root=root, dry_run=dry_run, exec_start=EXEC, checkout=root.parent / "checkout",
                     out=lines.append)
    return inst.uninstall(), lines


def db(root: Path, name: str) -> dict[str, list[str]]:
    rows = [l.split(":") for l in (root / "etc" / name).read_text().splitlines()]
    return {r[0]: r for r in rows}


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode, owner and content (or link target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = "/" + str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, p.read_bytes())
    return out


def mode_owner(root: Path, path: str) -> tuple[int, int, int]:
    st = (root / path.lstrip("/")).stat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


# ---------------------------------------------------------------------------- install

def test_install_writes_users_unit_config_and_state(tmp_path, checkout):
    root = make_root(tmp_path)
    checked: list = []

    def check(cfg) -> int:  # stands in for assistant.check.run_check
        from assistant import paths
        checked.append((cfg.source, str(paths.models_dir()), str(paths.hub_cache()),
                        str(paths.transcript_file())))
        return 78  # models missing: reported, the install goes on
    rc, out = run_install(root, check=check)
    assert rc == 0

    # Groups: audio kept (and joined), video and render made as system groups, and rkvlm's own.
    groups = db(root, "group")
    assert groups["audio"] == ["audio", "x", "29", "pulse,rkvlm"]
    for g in ("video", "render", "rkvlm"):
        assert 100 <= int(groups[g][2]) <= 999 and groups[g][2] != "998"  # 998 was taken
    assert groups["video"][3] == "rkvlm" and groups["render"][3] == "rkvlm"
    assert len({groups[g][2] for g in groups}) == len(groups)  # no gid given twice
    user = db(root, "passwd")["rkvlm"]
    uid, gid = int(user[2]), int(user[3])
    assert gid == int(groups["rkvlm"][2]) and 100 <= uid <= 999 and uid != 998
    assert user[5:] == [HOME, "/usr/sbin/nologin"]  # no login shell

    # The unit: the shipped one with ExecStart= and WorkingDirectory= for this installation.
    unit = (root / UNIT.lstrip("/")).read_text()
    shipped = (REPO / "systemd" / UNIT_NAME).read_text().splitlines()
    lines = unit.splitlines()
    assert f"ExecStart={EXEC} run --config {CONFIG}" in lines
    assert f"WorkingDirectory={checkout}" in lines
    assert f"Documentation=file://{checkout}/README.md" in lines
    changed = [(a, b) for a, b in zip(shipped, lines) if a != b]
    assert len(lines) == len(shipped) and len(changed) == 3, changed
    assert mode_owner(root, UNIT) == (0o644, 0, 0) if AS_ROOT else True
    assert os.readlink(root / WANTS.lstrip("/")) == UNIT  # enabled

    # The command on root's PATH (sudo's secure_path): a wrapper into this installation.
    wrapper = (root / COMMAND.lstrip("/")).read_text()
    assert wrapper.startswith("#!/bin/sh\n") and f'exec {EXEC} "$@"' in wrapper
    assert mode_owner(root, COMMAND)[0] == 0o755

    # The config: the repository's, readable by the service's group only.
    assert (root / CONFIG.lstrip("/")).read_text() == CONFIG_TEXT
    assert mode_owner(root, CONFIG)[0] == 0o640
    assert mode_owner(root, "/etc/rkvlm-assistant")[0] == 0o755
    # Exactly the directories the service looks in, each once (no .../rkvlm-assistant/rkvlm-assistant).
    assert set(STATE) == {HOME, HOME + "/models", HOME + "/voices", "/var/cache/rkvlm-assistant",
                          "/var/cache/rkvlm-assistant/huggingface", "/var/log/rkvlm-assistant"}
    made = {"/" + str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_dir() and "rkvlm-assistant" in p.name}
    assert made == {"/etc/rkvlm-assistant", "/var/lib/rkvlm-assistant", "/var/cache/rkvlm-assistant",
                    "/var/log/rkvlm-assistant"}
    for d in STATE:
        assert (root / d.lstrip("/")).is_dir()
        assert mode_owner(root, d)[0] == 0o750
    if AS_ROOT:  # only root can give files to another uid
        assert mode_owner(root, CONFIG)[1:] == (0, gid)
        assert all(mode_owner(root, d)[1:] == (uid, gid) for d in STATE)

    # check ran on the installed config, seeing the service's environment; its failure
    # is reported with what to do next, and the service is not started.
    assert checked == [(str(root / CONFIG.lstrip("/")), f"{root}{HOME}/models",
                        f"{root}/var/cache/rkvlm-assistant/huggingface/hub",
                        f"{root}{HOME}/transcript.jsonl")]
    text = "\n".join(out)
    assert "check found problems (exit 78)" in text and "sudo systemctl start" in text


def test_install_keeps_an_existing_config_and_a_second_run_changes_nothing(tmp_path, checkout):
    root = make_root(tmp_path)
    config = root / CONFIG.lstrip("/")
    config.parent.mkdir(parents=True)
    config.write_text("# the board's own settings\naudio: {barge_in: true}\n")
    config.chmod(0o600)
    rc, _ = run_install(root)
    assert rc == 0
    assert config.read_text() == "# the board's own settings\naudio: {barge_in: true}\n"
    assert mode_owner(root, CONFIG)[0] == 0o600  # not touched at all
    first = tree(root)

    rc, out = run_install(root, check=lambda cfg: 0)
    assert rc == 0
    assert tree(root) == first  # idempotent: every file, mode, owner and link as it was
    actions = [l for l in out if l.startswith("  + ")]
    # Only the (idempotent) enable and the check run again; nothing is written.
    assert all("systemctl" in l or " check " in l for l in actions), actions
    assert any("config.yaml exists: kept" in l for l in out)


def test_an_updated_unit_is_rewritten(tmp_path, checkout):
    root = make_root(tmp_path)
    run_install(root)
    unit = root / UNIT.lstrip("/")
    unit.write_text(unit.read_text().replace("WatchdogSec=60", "WatchdogSec=1"))
    _, out = run_install(root)
    assert "WatchdogSec=60" in unit.read_text()
    assert any(l.startswith(f"  + write {UNIT}") for l in out)


def _like_pulse(seen: list):
    """A check that probes sound devices: the audio client writes its config under HOME."""
    def check(cfg) -> int:
        seen.append((cfg.source, os.environ["HOME"]))
        cookie = Path(os.environ["HOME"]) / ".config" / "pulse" / "cookie"
        cookie.parent.mkdir(parents=True, exist_ok=True)
        cookie.write_bytes(b"x" * 256)
        cookie.chmod(0o600)
        return 0
    return check


def test_dry_run_writes_nothing(tmp_path, checkout):
    root = make_root(tmp_path)
    before = tree(root)
    checked: list = []
    rc, out = run_install(root, check=_like_pulse(checked), dry_run=True)
    assert rc == 0
    assert tree(root) == before
    assert [c[0] for c in checked] == [str(checkout / "config.yaml")]  # what it would install
    assert not Path(checked[0][1]).exists()   # the check's scratch home is gone
    text = "\n".join(out)
    assert "dry run: nothing is changed" in text
    for action in ("add group video", "add user rkvlm", f"write {UNIT}", f"write {CONFIG}",
                   f"write {COMMAND}", f"directory {HOME}/", "systemctl --root="):
        assert action in text, action
    # The ids printed are the ones a real run gives: each group its own, as installed below.
    import re
    said = dict(re.findall(r"add group (\w+) \(gid (\d+)\)", text))
    assert len(set(said.values())) == len(said) == 3, said
    uid = re.search(r"add user rkvlm \(uid (\d+)", text).group(1)
    assert f"({0o750:04o} {uid}:{said['rkvlm']})" in text  # the state dirs' owner

    run_install(root)
    groups = db(root, "group")
    assert {g: groups[g][2] for g in said} == said
    assert db(root, "passwd")["rkvlm"][2] == uid
    installed = tree(root)
    rc, out = run_uninstall(root, dry_run=True)
    assert rc == 0 and tree(root) == installed
    assert f"remove {UNIT}" in "\n".join(out)


# ---------------------------------------------------------------------------- uninstall

def test_uninstall_removes_the_unit_and_keeps_config_state_and_user(tmp_path, checkout):
    root = make_root(tmp_path)
    run_install(root)
    transcript = root / HOME.lstrip("/") / "transcript.jsonl"
    transcript.write_text('{"turn": 1}\n')
    config = (root / CONFIG.lstrip("/")).read_text()
    passwd = (root / "etc/passwd").read_text()

    rc, out = run_uninstall(root)
    assert rc == 0
    assert not (root / UNIT.lstrip("/")).exists()
    assert not (root / WANTS.lstrip("/")).is_symlink()  # disabled
    assert (root / CONFIG.lstrip("/")).read_text() == config
    assert transcript.read_text() == '{"turn": 1}\n'
    assert all((root / d.lstrip("/")).is_dir() for d in STATE)
    assert (root / "etc/passwd").read_text() == passwd
    kept = [l for l in out if l.startswith("kept: ")]
    assert kept and CONFIG in kept[0] and HOME in kept[0] and "transcript" in kept[0]

    rc, out = run_uninstall(root)  # again: nothing left to do, no error
    assert rc == 0 and any("is not there" in l for l in out)


# ---------------------------------------------------------------------------- the command

def test_cli_install_and_uninstall_into_a_root(tmp_path):
    root = make_root(tmp_path)
    exe = Path(sys.executable).parent / "rkvlm-assistant"
    if not exe.is_file():
        pytest.skip("the rkvlm-assistant entry point is not installed in this Python")
    env = dict(os.environ, HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    r = subprocess.run([str(exe), "install", "--root", str(root)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    # The real check ran on the installed config, the repository's (this machine has no
    # models or devices for it: reported, not fatal).
    assert f"+ rkvlm-assistant check --config {root}{CONFIG}" in r.stdout
    assert (root / CONFIG.lstrip("/")).read_text() == (REPO / "config.yaml").read_text()
    # Exactly: the speech models came through `models pull` (installed packages here: no
    # network), the LLM of a fresh tree is missing, named with root's command for this tree,
    # so the service is enabled, not started (exit 78 of check).
    # Bug caught (was an either-or): a check that never ran, or passed on a tree lacking a model.
    assert f"  + rkvlm-assistant models pull tiny.en --root {root}" in r.stdout
    assert "  = whisper tiny.en is installed: " in r.stdout
    assert (f"FAIL language model (llm.backend: llamacpp): llm.backend: The model smolvlm2-256m"
            in r.stdout)
    assert f"Run `sudo rkvlm-assistant models pull smolvlm2-256m --root {root}`" in r.stdout
    assert "  ! check found problems (exit 78), see above." in r.stdout
    assert "all good" not in r.stdout
    unit = (root / UNIT.lstrip("/")).read_text()
    assert f"ExecStart={exe} run --config {CONFIG}" in unit.splitlines()

    r = subprocess.run([str(exe), "uninstall", "--root", str(root)], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (root / UNIT.lstrip("/")).exists() and (root / CONFIG.lstrip("/")).exists()


def test_without_root_it_refuses_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    for cmd in ("install", "uninstall"):
        args = build_parser().parse_args([cmd])
        assert args.func(args, None) == install.EX_NOPERM == 77
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "must run as root" in err[0]
        assert f"sudo rkvlm-assistant {cmd}" in err[0]


@pytest.mark.skipif(Path("/etc/systemd/system", UNIT_NAME).exists(), reason="installed here")
def test_dry_run_on_this_machine_changes_nothing():
    lines: list[str] = []
    snapshot = {p: p.read_bytes() for p in (Path("/etc/passwd"), Path("/etc/group"))}
    Installer(dry_run=True, check=lambda cfg: 0, exec_start=EXEC, checkout=REPO,
              out=lines.append).install()
    assert {p: p.read_bytes() for p in snapshot} == snapshot
    assert not Path("/etc/systemd/system", UNIT_NAME).exists()
    text = "\n".join(lines)
    # Accounts on the real system go through the shadow tools (locking, nscd, shadow files).
    assert "useradd --system" in text or "user rkvlm: exists" in text


def test_entry_point_is_this_installation():
    assert install.entry_point().endswith(("/rkvlm-assistant", " -m assistant"))
    assert shutil.which(install.entry_point().split()[0]) or install.entry_point().startswith("/")


def test_on_a_running_systemd_it_reloads_enables_and_starts(monkeypatch, tmp_path, checkout):
    running = tmp_path / "run-systemd"
    running.mkdir()
    monkeypatch.setattr(install, "RUN_SYSTEMD", running)
    for active in (False, True):
        monkeypatch.setattr(Installer, "is_active", lambda self, a=active: a)
        for rc, started in ((0, True), (69, True), (78, False)):
            lines: list[str] = []
            Installer(dry_run=True, check=lambda cfg, rc=rc: rc, exec_start=EXEC,
                      checkout=checkout, out=lines.append).install()
            commands = [l[4:] for l in lines if l.startswith("  + systemctl")]
            # A missing device does not stop the start (the daemon retries it); a missing
            # model or a bad config does (it would only fail again and again). A running
            # service (an upgrade) restarts once into the new code; with problems it keeps
            # running the old one.
            assert commands == ["systemctl daemon-reload", f"systemctl enable {UNIT_NAME}"] + (
                [f"systemctl {'restart' if active else 'start'} {UNIT_NAME}"] if started else []
            ), (active, rc, lines)
            if active and not started:
                assert any("keeps the previous version" in l for l in lines)


def test_an_upgrade_keeps_config_models_and_transcript(tmp_path, checkout):
    root = make_root(tmp_path)
    run_install(root)
    config = root / CONFIG.lstrip("/")
    config.write_text(CONFIG_TEXT + "persona:\n  name: Ada\n")
    kept = {root / HOME.lstrip("/") / "transcript.jsonl": b'{"turn": 1}\n',
            root / HOME.lstrip("/") / "models" / "m" / "a.gguf": b"GGUF",
            root / "var/cache/rkvlm-assistant/huggingface/hub/x": b"blob"}
    for p, data in kept.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    # A newer checkout: its unit and config changed.
    unit_src = checkout / "systemd" / UNIT_NAME
    unit_src.write_text(unit_src.read_text().replace("RestartSec=5", "RestartSec=6"))
    (checkout / "config.yaml").write_text(CONFIG_TEXT + "# new keys\n")
    rc, out = run_install(root)
    assert rc == 0
    assert config.read_text() == CONFIG_TEXT + "persona:\n  name: Ada\n"
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert "RestartSec=6" in (root / UNIT.lstrip("/")).read_text()
    # Under --root it says what a running system would do instead of doing it.
    assert any(f"systemctl restart {UNIT_NAME}` when it runs" in l for l in out)


def test_an_upgrade_moves_what_an_earlier_unit_put_elsewhere(tmp_path, checkout):
    """Earlier units set XDG_DATA_HOME to the state directory itself and no XDG_STATE_HOME:
    models were looked for in .../rkvlm-assistant/rkvlm-assistant/models, the transcript
    written under .local/state."""
    root = make_root(tmp_path)
    home = root / HOME.lstrip("/")
    old = {home / "rkvlm-assistant/models/smolvlm2-256m/m.gguf": b"GGUF",
           home / "rkvlm-assistant/voices/v.onnx": b"ONNX",
           home / ".local/state/rkvlm-assistant/transcript.jsonl": b'{"turn": 1}\n',
           home / ".local/state/rkvlm-assistant/transcript.jsonl.1": b'{"turn": 0}\n'}
    for p, data in old.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (home / "voices").mkdir(parents=True)
    (home / "voices/v.onnx").write_bytes(b"NEWER")
    rc, out = run_install(root)
    assert rc == 0
    assert (home / "models/smolvlm2-256m/m.gguf").read_bytes() == b"GGUF"
    assert (home / "transcript.jsonl").read_bytes() == b'{"turn": 1}\n'
    assert (home / "transcript.jsonl.1").read_bytes() == b'{"turn": 0}\n'
    assert (home / "voices/v.onnx").read_bytes() == b"NEWER"          # the newer one is kept
    assert (home / "rkvlm-assistant/voices/v.onnx").read_bytes() == b"ONNX"
    assert any("also in" in l and "v.onnx" in l for l in out)
    rc, out = run_install(root)                                         # again: nothing to move
    assert not any(l.startswith("  + move") for l in out)


@pytest.mark.skipif(not AS_ROOT, reason="giving files to another user needs root")
def test_what_the_check_writes_as_root_becomes_the_service_users(tmp_path, checkout):
    root = make_root(tmp_path)
    seen: list = []
    run_install(root, check=_like_pulse(seen))
    assert seen[0][1] == str(root / HOME.lstrip("/"))     # the service's home, under the root
    user = db(root, "passwd")["rkvlm"]
    cookie = root / HOME.lstrip("/") / ".config/pulse/cookie"
    for p in (cookie, cookie.parent, cookie.parent.parent):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (int(user[2]), int(user[3])), p


def test_uninstall_removes_the_command_and_leaves_a_foreign_one(tmp_path, checkout):
    root = make_root(tmp_path)
    run_install(root)
    command = root / COMMAND.lstrip("/")
    assert command.is_file()
    run_uninstall(root)
    assert not command.exists()
    command.write_text("#!/bin/sh\necho someone else's\n")
    _, out = run_install(root)
    assert command.read_text() == "#!/bin/sh\necho someone else's\n"
    assert any(f"{COMMAND} exists and was not written by install: kept" in l for l in out)
    run_uninstall(root)
    assert command.read_text() == "#!/bin/sh\necho someone else's\n"


@pytest.mark.parametrize("where, why", [("/tmp/co", "PrivateTmp=yes"),
                                        ("/home/ada/co", "ProtectHome=yes"),
                                        ("/root/co", "ProtectHome=yes")])
def test_a_checkout_the_service_cannot_see_is_named_with_the_reason(tmp_path, checkout, where, why):
    root = make_root(tmp_path)
    lines: list[str] = []
    Installer(root=root, dry_run=True, exec_start=f"{where}/.venv/bin/rkvlm-assistant",
              checkout=checkout, out=lines.append).install()
    warning = [l for l in lines if l.startswith(f"  ! warning: {where}/.venv/bin")]
    assert warning and why in warning[0] and "/opt/rkvlm-assistant" in warning[0], lines


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_installed_unit_verifies(tmp_path):
    root = make_root(tmp_path)
    lines: list[str] = []
    # This installation's real entry point, so ExecStart= names a program that exists.
    Installer(root=root, checkout=REPO, out=lines.append).install()
    unit = root / UNIT.lstrip("/")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and UNIT_NAME not in r.stdout + r.stderr, r.stdout + r.stderr


def test_install_outside_a_checkout_fails_before_changing_anything(tmp_path):
    root = make_root(tmp_path)
    before = tree(root)
    inst = Installer(root=root, exec_start=EXEC, checkout=tmp_path / "nothing", out=lambda l: None)
    with pytest.raises(install.InstallError, match="run the install from a checkout"):
        inst.install()
    assert tree(root) == before


def test_a_venv_made_from_a_python_under_root_is_named(tmp_path, checkout):
    root = make_root(tmp_path)
    program = tmp_path / "opt" / "rkvlm-assistant"
    program.parent.mkdir()
    program.write_text("#!/root/.pyenv/versions/3.11/bin/python3\nimport sys\n")
    program.chmod(0o755)
    lines: list[str] = []
    Installer(root=root, dry_run=True, exec_start=str(program), checkout=checkout,
              out=lines.append).install()
    warning = [l for l in lines if "/root/.pyenv/versions/3.11/bin/python3 is under /root" in l]
    assert warning and "ProtectHome=yes" in warning[0], lines
