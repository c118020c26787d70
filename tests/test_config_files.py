"""The config file opened safely: only a regular file (or a link to one), at most
MAX_CONFIG_BYTES, read within a deadline; values Python cannot hold refused by key; `models
use` edits the file a link points to.

The start-up cases run the real `serve` and `run` commands: the process must exit 78 (the
configuration is wrong: systemd does not restart it) with one line, and never hang.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from assistant import config, config_edit, safe_read
from assistant.cli import main
from assistant.config import ConfigError, load, parse

ROOT = Path(__file__).resolve().parents[1]


def run_cli(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RKVLM_CONFIG", None)
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([sys.executable, "-m", "assistant", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- at start

def _fifo(p: Path) -> str:
    os.mkfifo(p)
    return "a FIFO (named pipe), not a regular file"


def _directory(p: Path) -> str:
    p.mkdir()
    return "a directory, not a regular file"


def _device_link(p: Path) -> str:
    p.symlink_to("/dev/zero")                  # a link to an endless device
    return "a character device, not a regular file"


def _oversized(p: Path) -> str:
    p.write_text("# " + "x" * config.MAX_CONFIG_BYTES + "\n")
    return "a config file is at most 1 MB"


@pytest.mark.parametrize("make", [_fifo, _directory, _device_link, _oversized],
                         ids=["fifo", "directory", "device", "oversized"])
@pytest.mark.parametrize("command", ["serve", "run"])
def test_a_config_that_is_no_regular_file_exits_78_with_one_line(tmp_path, make, command):
    # Bug caught: open() of a FIFO waits for a writer for ever (the service hangs in
    # "activating" and never says why); /dev/zero was read to the limit then called too
    # large; a directory was an IsADirectoryError.
    conf = tmp_path / "config.yaml"
    expected = make(conf)
    r = run_cli(tmp_path, "--config", str(conf), command)
    assert r.returncode == 78, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(conf) in lines[0], r.stderr


def test_a_fifo_found_by_the_config_search_is_refused_not_skipped(tmp_path):
    # Bug caught: ./config.yaml as a FIFO was passed over (not is_file) and the daemon ran
    # on the built-in defaults instead of saying the config is wrong.
    _fifo(tmp_path / "config.yaml")
    r = run_cli(tmp_path, "serve")
    assert r.returncode == 78 and "config.yaml: a FIFO" in r.stderr, r.stderr[-2000:]


def test_a_link_to_a_config_file_loads(tmp_path):
    # Bug caught: the regular-file check made on the link itself (lstat), refusing links.
    (tmp_path / "real.yaml").write_text("persona: {name: Linked}\n")
    (tmp_path / "config.yaml").symlink_to("real.yaml")
    assert load(tmp_path / "config.yaml").persona.name == "Linked"


@pytest.mark.parametrize("command", ["serve", "run"])
def test_a_5000_digit_integer_exits_78_naming_the_key(tmp_path, command):
    # Bug caught: int() past Python's int-string conversion limit (4300 digits) raised a
    # ValueError out of the YAML parser: a traceback and exit 1, which systemd restarts.
    conf = tmp_path / "config.yaml"
    conf.write_text("llm:\n  max_new_tokens: " + "9" * 5000 + "\n")
    r = run_cli(tmp_path, "--config", str(conf), command)
    assert r.returncode == 78, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "llm.max_new_tokens" in lines[0], r.stderr[-2000:]
    assert "an integer 5000 digits long" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("text, key, found", [
    ("audio: {output: {volume: 0x" + "f" * 5000 + "}}", "audio.output.volume", "5002 digits"),
    ("audio: {output: {volume: 1" + "0" * 400 + ".5}}", "audio.output.volume", "too large"),
    ("audio: {output: {volume: 1.0e+999}}", "audio.output.volume", "too large"),
    ("audio: {input: {device: " + "7" * 5000 + "}}", "audio.input.device", "5000 digits"),
    ("vision: {rknn: {core_mask: " + "1" * 5000 + "}}", "vision.rknn.core_mask", "5000 digits"),
    ("intent: {exit_phrases: [bye, " + "9" * 5000 + "]}", "intent.exit_phrases[1]",
     "5000 digits"),
    ("llm: {max_new_tokens: !!int abc}", "llm.max_new_tokens", "abc, not an integer"),
    ("audio: {barge_in: !!bool maybe}", "audio.barge_in", "maybe"),
    ("persona: {name: 2001-13-45}", "persona.name", "2001-13-45"),
])
def test_values_python_cannot_hold_are_refused_by_key(text, key, found):
    # Bug caught: each of these raised out of PyYAML's constructors (ValueError, KeyError,
    # AttributeError: a traceback), or a huge number read as .inf and was named so.
    with pytest.raises(ConfigError) as e:
        parse(text, "c.yaml")
    message = str(e.value)
    assert message.startswith(f"c.yaml: {key}: expected ") and found in message, message
    assert len(message) < 300, message       # the value is shortened, not quoted whole


# --------------------------------------------------------------------------- the reading

def test_a_read_that_never_answers_times_out(tmp_path, monkeypatch):
    # Bug caught: a read on a mount that stopped answering held its caller (the start, a
    # reload) for ever. Here os.read blocks until the test lets it go.
    conf = tmp_path / "config.yaml"
    conf.write_text("persona: {name: Slow}\n")
    release = threading.Event()
    real_read = os.read

    def stuck(fd, n):
        release.wait(30)
        return real_read(fd, n)

    monkeypatch.setattr(safe_read.os, "read", stuck)
    monkeypatch.setattr(config, "READ_TIMEOUT_S", 0.3)
    try:
        with pytest.raises(ConfigError, match=r"cannot read the config file: no answer in 0.3 s"):
            load(conf)
    finally:
        release.set()


def test_a_file_that_grows_past_the_limit_while_read_is_refused(tmp_path, monkeypatch):
    # Bug caught: trusting fstat's size alone (a log-like file that grows, or a file
    # system that reports 0) would read without bound.
    f = tmp_path / "grows"
    f.write_bytes(b"x" * 10)
    real_fstat = os.fstat
    monkeypatch.setattr(safe_read.os, "fstat",
                        lambda fd: os.stat_result((*real_fstat(fd)[:6], 0, *real_fstat(fd)[7:])))
    f.write_bytes(b"x" * 100)
    with pytest.raises(safe_read.FileTooLarge):
        safe_read.read_regular(f, 50, 5)
    assert safe_read.read_regular(f, 100, 5) == b"x" * 100


EXIT_WHILE_STUCK = textwrap.dedent("""
    import asyncio, threading
    from assistant import safe_read

    async def main():
        try:
            await asyncio.wait_for(safe_read.to_daemon_thread(threading.Event().wait), 0.2)
        except asyncio.TimeoutError:
            print("gave up", flush=True)

    asyncio.run(main())
""")


def test_a_process_exits_while_a_daemon_thread_is_stuck():
    # Bug caught: asyncio.to_thread's executor threads are joined when the loop closes and
    # at exit, so a reload stuck in a read held SIGTERM's exit for ever. Run with
    # asyncio.to_thread in place of to_daemon_thread, this child never exits.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", EXIT_WHILE_STUCK], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "gave up\n", r.stderr[-2000:]


def test_to_daemon_thread_hands_back_the_result_and_the_error():
    # Bug caught: a result or an exception lost between the thread and the loop.
    async def both():
        ok = await safe_read.to_daemon_thread(lambda a, b: a + b, 2, 3)
        with pytest.raises(ZeroDivisionError):
            await safe_read.to_daemon_thread(lambda: 1 / 0)
        return ok

    assert asyncio.run(both()) == 5


# --------------------------------------------------------------------------- models use

def test_models_use_edits_the_file_a_link_points_to(tmp_path, monkeypatch):
    # Bug caught: the edited copy was renamed over the link itself: the link became a
    # regular file, and the file it pointed to (the one the service reads) kept the old
    # model. The link must stay, and the real file keep its owner and mode.
    from assistant import models_cli

    real = tmp_path / "etc" / "real.yaml"
    real.parent.mkdir()
    real.write_text("# mine\npersona:\n  name: Ada   # hers\n")
    real.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(real, 4321, 4242)
    link = tmp_path / "config.yaml"
    link.symlink_to(os.path.relpath(real, tmp_path))
    before = real.stat()
    models_cli.set_keys(link, {"llm.max_new_tokens": 77})
    assert link.is_symlink() and os.readlink(link) == os.path.relpath(real, tmp_path)
    assert load(link).llm.max_new_tokens == 77
    assert "name: Ada   # hers" in real.read_text()
    after = real.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid,
                                                           before.st_mode)
    assert sorted(p.name for p in real.parent.iterdir()) == ["real.yaml"]   # no temp left


def test_models_use_through_the_cli_on_a_linked_config(tmp_path, monkeypatch):
    # The same through the command: the printed path is the one given, the link stays.
    from assistant.llm import catalog

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("RKVLM_CONFIG", raising=False)
    real = tmp_path / "real.yaml"
    real.write_text("persona: {name: Ada}\nllm: {backend: rkllm}\n")
    link = tmp_path / "config.yaml"
    link.symlink_to(real)
    folder = catalog.default_models_dir() / "smolvlm2-256m"
    folder.mkdir(parents=True)
    for f in catalog.CATALOG["smolvlm2-256m"].files:
        (folder / f.name).write_bytes(b"GGUF")
    assert main(["--config", str(link), "models", "use", "smolvlm2-256m"]) == 0
    assert link.is_symlink() and load(real).llm.backend == "llamacpp"


# --------------------------------------------------------------------------- the edit's meaning

def test_an_edit_that_would_change_another_value_falls_back_to_the_round_trip():
    # Bug caught (config_edit.edit's meaning check removed): a plain scalar folded over two
    # lines has its first line replaced by the line editor, and the second line joins the
    # new value: persona.name read back "Marvin the Great", not "Marvin".
    text = "persona:\n  name: Rocky\n    the Great\n  language: en\n"
    assert config_edit.plain(text)["persona"]["name"] == "Rocky the Great"
    out = config_edit.edit(text, {"persona.name": "Marvin"})
    assert config_edit.plain(out) == {"persona": {"name": "Marvin", "language": "en"}}
    # A value on a line of its own under its key: the same check.
    text = "persona:\n  name:\n    Rocky\n  language: en\n"
    out = config_edit.edit(text, {"persona.name": "Marvin"})
    assert config_edit.plain(out) == {"persona": {"name": "Marvin", "language": "en"}}
