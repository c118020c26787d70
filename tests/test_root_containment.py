"""`--root DIR` stays inside DIR (issue 24 item 8): a tree whose links point out of it (a board
image prepared by someone else, or a link the service user planted in its own directories)
must not make root write, chmod or chown anything outside. Every path of the target goes
through assistant.root_paths.resolve: an absolute link is the target system's path (taken
under the tree, as the board will see it), a link climbing out with '..' is refused, and
owners and modes are changed without following a link.

Each test takes a snapshot of a directory outside the tree (every entry's type, mode, owner,
content, mtime) before and after, as root where ownership changes happen."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from assistant import install_secret, paths, root_paths
from assistant.cli import main
from assistant.install import CONFIG, Installer
from test_install import EXEC, checkout, make_root  # noqa: F401 (fixture)

AS_ROOT = os.geteuid() == 0
as_root = pytest.mark.skipif(not AS_ROOT, reason="ownership changes need root")


def snapshot(top: Path) -> dict[str, tuple]:
    out = {}
    for p in [top, *sorted(top.rglob("*"))]:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            what = ("link", os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            what = ("dir", sorted(os.listdir(p)))
        else:
            what = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        out[str(p)] = (*what, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
    return out


@pytest.fixture
def outside(tmp_path) -> Path:
    """What must not change: a root-only directory (as /etc/systemd/system or /root would be),
    with a secret file in it."""
    o = tmp_path / "outside"
    for d in ("unitdir", "bin", "state", "cache"):
        (o / d).mkdir(parents=True)
        (o / d).chmod(0o700)
    (o / "victim").write_text("root's own file\n")
    (o / "victim").chmod(0o600)
    (o / "state" / "transcript.jsonl").write_text('{"turn": 1}\n')
    return o


def link(tree: Path, target_path: str, to: Path, relative: bool) -> None:
    at = tree / target_path.lstrip("/")
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(os.path.relpath(to, at.parent) if relative else str(to))


def installer(root: Path, **kw) -> tuple[Installer, list[str]]:
    lines: list[str] = []
    return Installer(root=root, exec_start=EXEC, checkout=root.parent / "checkout",
                     out=lines.append, **kw), lines


# The places issue 24 found followed: the unit directory, the command's directory, the
# service's state and cache directories.
HOSTILE = [("/etc/systemd/system", "unitdir"), ("/usr/local/bin", "bin"),
           ("/var/lib/rkvlm-assistant", "state"), ("/var/cache/rkvlm-assistant", "cache")]


@as_root
@pytest.mark.parametrize("relative", [True, False], ids=["dotdot-link", "absolute-link"])
@pytest.mark.parametrize("where,to", HOSTILE, ids=[h[1] for h in HOSTILE])
def test_install_changes_nothing_outside_the_tree(tmp_path, outside, checkout, where, to,
                                                  relative):
    """Bug caught: install writing the unit / the wrapper / directories through a link, or
    chmod/chown of an outside directory (0700 root -> 0750 rkvlm), as issue 24 saw."""
    root = make_root(tmp_path)
    link(root, where, outside / to, relative)
    before = snapshot(outside)
    inst, out = installer(root)
    if relative:
        # '..' past the tree's top: refused, with the path named.
        with pytest.raises(root_paths.OutsideRoot, match=f"leads out of {root}"):
            inst.install()
    else:
        assert inst.install() == 0, out
        # An absolute link names the board's own path: followed inside the tree.
        inner = root / str(outside / to).lstrip("/")
        assert inner.is_dir(), out
    assert snapshot(outside) == before


@as_root
def test_a_planted_link_in_the_services_directory_is_not_chmodded(tmp_path, outside, checkout):
    """The service user owns /var/lib/rkvlm-assistant: a link it puts at models/ must not
    make root's install chmod/chown where it points (even inside the tree)."""
    root = make_root(tmp_path)
    inst, out = installer(root)
    inst.install()
    models = root / "var/lib/rkvlm-assistant/models"
    models.rmdir()
    target = root / "etc"                              # inside the tree, root's own
    before = (stat.S_IMODE(target.stat().st_mode), target.stat().st_uid, target.stat().st_gid)
    models.symlink_to("/etc")
    inst, out = installer(root)
    assert inst.install() == 0
    assert (stat.S_IMODE(target.stat().st_mode), target.stat().st_uid,
            target.stat().st_gid) == before
    assert any("/var/lib/rkvlm-assistant/models is a symbolic link (to /etc): left as it is"
               in line for line in out), out


@as_root
@pytest.mark.parametrize("relative", [True, False], ids=["dotdot-link", "absolute-link"])
@pytest.mark.parametrize("linked", ["transcript", "hub-cache"])
def test_history_root_changes_nothing_outside(tmp_path, outside, checkout, capsys, relative,
                                              linked):
    """Bug caught: `history --root` handing an outside file to the service user (its
    hand-over walked a linked directory), or reading an outside transcript."""
    root = make_root(tmp_path)
    installer(root)[0].install()
    (outside / "victim").write_text('{"turn": 1, "transcript": "outside words", "answer": "x"}\n')
    if linked == "transcript":
        link(root, "/var/lib/rkvlm-assistant/transcript.jsonl", outside / "victim", relative)
    else:
        (root / "var/cache/rkvlm-assistant/huggingface").rmdir()   # empty after install
        link(root, "/var/cache/rkvlm-assistant/huggingface", outside / "cache", relative)
    before = snapshot(outside)
    rc = main(["history", "--root", str(root)])
    out = capsys.readouterr()
    assert snapshot(outside) == before
    assert "outside words" not in out.out + out.err
    if relative:
        assert rc == 78 and "leads out of" in out.err, out


@as_root
def test_hand_over_does_not_follow_a_linked_top(tmp_path, outside, checkout):
    """Bug caught: the hand-over after a root command walking into a linked state directory
    (os.walk follows its top) and re-owning what is there."""
    root = make_root(tmp_path)
    installer(root)[0].install()
    data = root / "var/lib/rkvlm-assistant"
    for p in sorted(data.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    data.rmdir()
    data.symlink_to(os.path.relpath(outside / "state", data.parent))
    before = snapshot(outside)
    paths.hand_over(paths.Layout(service=True, root=root))
    assert snapshot(outside) == before
    # A link further up (/var/lib itself) climbing out to a directory holding one of the
    # service's names: refused, nothing there handed over.
    data.unlink()
    (outside / "rkvlm-assistant").mkdir()
    (outside / "rkvlm-assistant" / "models").mkdir()
    lib = root / "var/lib"
    os.rename(lib, root / "var/lib.real")
    lib.symlink_to(os.path.relpath(outside, lib.parent))
    before = snapshot(outside)
    paths.hand_over(paths.Layout(service=True, root=root))
    assert snapshot(outside) == before


def test_a_configs_absolute_paths_are_the_boards(tmp_path):
    """`models use/pull --root`: a model path the config names is found (and written)
    through the tree's links as the board sees them, not the host's. Bug caught:
    paths.under joining without resolving, so the host follows an absolute link out."""
    from assistant.config import parse

    root = tmp_path / "board"
    (root / "var/lib").mkdir(parents=True)
    (root / "var/lib/rkvlm-assistant").symlink_to("/data/rkvlm")
    cfg = paths.in_tree(parse("llm:\n  llamacpp:\n    model: /var/lib/rkvlm-assistant/m.gguf\n"),
                        root)
    assert cfg.path("/var/lib/rkvlm-assistant/m.gguf") == root / "data/rkvlm/m.gguf"
    (root / "var/lib/rkvlm-assistant").unlink()
    (root / "var/lib/rkvlm-assistant").symlink_to("../../../..")
    with pytest.raises(root_paths.OutsideRoot):
        cfg.path("/var/lib/rkvlm-assistant/m.gguf")


def test_resolve_follows_links_inside_and_refuses_out(tmp_path):
    """The one helper: absolute links under the tree, '..' out refused, loops refused, a
    final link kept when asked."""
    root = tmp_path / "r"
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "var").mkdir()
    (root / "var/run").symlink_to("/run")
    (root / "loop").symlink_to("/loop")
    (root / "out").symlink_to("../..")
    assert root_paths.resolve(root, "/bin/x") == root / "usr/bin/x"
    assert root_paths.resolve(root, "/var/run/a") == root / "run/a"
    assert root_paths.resolve(root, "/bin", follow_last=False) == root / "bin"
    with pytest.raises(root_paths.OutsideRoot, match="leads out of"):
        root_paths.resolve(root, "/out/etc")
    with pytest.raises(root_paths.OutsideRoot, match="too many links"):
        root_paths.resolve(root, "/loop/x")
    assert root_paths.resolve(Path("/"), "/etc/passwd") == Path("/etc/passwd")


# ---------------------------------------------------------------------------- a readable secret

SECRET = "http:\n  api_key: a-long-random-string\n"


def _secret_config(root: Path, mode: int) -> Path:
    config = root / CONFIG.lstrip("/")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(SECRET)
    config.chmod(mode)
    return config


def test_install_warns_about_a_world_readable_api_key_and_keeps_it(tmp_path, checkout):
    """Bug caught: an existing config with http.api_key readable by every user kept
    without a word (issue 24)."""
    root = make_root(tmp_path)
    config = _secret_config(root, 0o644)
    inst, out = installer(root)
    assert inst.install() == 0
    warning = [l for l in out if l.startswith(f"  ! warning: {CONFIG} holds http.api_key")]
    assert len(warning) == 1, out
    assert "every user (mode o+r)" in warning[0] and "--fix-permissions" in warning[0]
    assert stat.S_IMODE(config.stat().st_mode) == 0o644 and config.read_text() == SECRET


def test_no_warning_without_a_secret_or_when_only_the_service_reads_it(tmp_path, checkout):
    root = make_root(tmp_path)
    config = _secret_config(root, 0o640)
    inst, out = installer(root)
    inst.install()
    assert not [l for l in out if "holds http.api_key" in l], out
    config.write_text("http:\n  api_key: null\n")
    config.chmod(0o644)
    inst, out = installer(root)
    inst.install()
    assert not [l for l in out if "holds" in l], out


@as_root
def test_fix_permissions_makes_it_0640_root_rkvlm(tmp_path, checkout):
    root = make_root(tmp_path)
    config = _secret_config(root, 0o664)
    os.chown(config, 0, 29)                            # group audio could read it
    inst, out = installer(root, fix_permissions=True)
    assert inst.install() == 0
    gid = int(next(l.split(":")[2] for l in (root / "etc/group").read_text().splitlines()
                   if l.startswith("rkvlm:")))
    st = config.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, gid)
    assert config.read_text() == SECRET
    assert any(f"+ {CONFIG}: holds http.api_key; mode 0640, owner 0:{gid} (was 0664 0:29)" in l
               for l in out), out


def test_the_secret_keys_come_from_the_config_marks():
    """Any key marked secret in assistant.config counts, not a list kept by install."""
    from assistant.config import Config, parse

    assert list(install_secret.secret_keys(Config())) == []
    cfg = parse(SECRET)
    assert list(install_secret.secret_keys(cfg)) == ["http.api_key"]


def test_cli_has_fix_permissions():
    r = subprocess.run([sys.executable, "-m", "assistant", "install", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert "--fix-permissions" in r.stdout and "--no-models" in r.stdout


@as_root
@pytest.mark.parametrize("relative", [True, False], ids=["dotdot-link", "absolute-link"])
def test_models_pull_root_downloads_inside_the_tree(tmp_path, outside, checkout, capsys,
                                                    monkeypatch, relative):
    """`models pull NAME --root R` with the service's hub cache linked out of the tree.
    Bug caught: the download (and its hand-over to the service user) landing outside."""
    from assistant.llm import catalog
    from hub_server import HubServer

    root = make_root(tmp_path)
    installer(root)[0].install()
    (root / "var/cache/rkvlm-assistant/huggingface").rmdir()
    link(root, "/var/cache/rkvlm-assistant/huggingface", outside / "cache", relative)
    entry = catalog.CATALOG["internvl3-1b"]
    before = snapshot(outside)
    with HubServer() as hub:
        hub.add(entry.repo, entry.model.name, b"GGUF model")
        hub.add(entry.repo, entry.mmproj.name, b"GGUF mmproj")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        rc = main(["models", "pull", "internvl3-1b", "--root", str(root)])
    err = capsys.readouterr().err
    assert snapshot(outside) == before
    if relative:
        assert rc == 78 and "leads out of" in err, err
    else:
        assert rc == 0, err
        inner = root / str(outside / "cache").lstrip("/")
        assert len(list(inner.glob("hub/models--*/blobs/*"))) == 2


def test_doctor_root_reads_the_boards_links_inside_the_copy(tmp_path, capsys):
    """`doctor --root COPY`: /proc/device-tree is an absolute link on a board; it must be
    read inside the copy, not on this machine. Bug caught: doctor joining paths itself."""
    root = tmp_path / "copy"
    base = root / "sys/firmware/devicetree/base"
    base.mkdir(parents=True)
    (base / "compatible").write_bytes(b"radxa,rock-5b\0rockchip,rk3588\0")
    (root / "proc").mkdir()
    (root / "proc/device-tree").symlink_to("/sys/firmware/devicetree/base")
    main(["doctor", "--root", str(root)])
    assert "SoC RK3588 (radxa,rock-5b, rockchip,rk3588)" in capsys.readouterr().out
    (root / "proc/device-tree").unlink()
    (root / "proc/device-tree").symlink_to("../../../..")
    rc = main(["doctor", "--root", str(root)])
    out = capsys.readouterr()
    assert rc != 0 and "/proc/device-tree/compatible leads out of" in out.out + out.err, out
