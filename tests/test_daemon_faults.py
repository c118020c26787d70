"""The daemon's faults, end to end: a stage past its deadline, a runtime that hangs, SIGTERM
in the middle of an answer, SIGHUP with a new and with a broken config.

Each test runs `rkvlm-assistant run` as a real process on the fake ALSA microphone and
speaker (tests/alsa_support.py) under a fake systemd (the NotifySocket of test_daemon), with
the RKLLM backend on the compiled fake runtime (tests/fake_rkllm). The fake's hooks are set
through its environment: FAKE_RKLLM_HOLD_AFTER holds an answer until rkllm_abort (a slow
turn), FAKE_RKLLM_HANG_AFTER sleeps ignoring it (a runtime wedged in the driver), and
FAKE_RKLLM_HOOK_RUN picks the turn; FAKE_RKLLM_LOG is the file the fake writes every call to,
so the test sees what the daemon asked of the runtime and when it started holding.

Issue 17 adds: a NUL in a model's answer (the tiny llama.cpp model), SIGTERM while the runtime
hangs, and two faults injected through a `sitecustomize` module on the daemon's PYTHONPATH (a
killed voice task, a speaker whose writes never return).

The fake microphone delivers its whole file at once, so every question is queued at the
start and answered in turn; a signal is sent while the first answer is held.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alsa_support import make_fake_alsa, portaudio_available
from rkllm_fake import build_fake_rkllm, fake_env, read_fake_log, write_fake_model
from test_daemon import MIC_RATE, NotifySocket, heard, speech_at

pytestmark = pytest.mark.skipif(not portaudio_available(), reason="needs libportaudio2")

ERROR_LINE = "Sorry, something went wrong while I was thinking. Please ask again."


def config(lib: Path, extra: str = "", exit_phrases: str = "[exit]",
           name: str = "Rocky", max_new: int = 200) -> str:
    return f"""
audio:
  input: {{device: fakemic, sample_rate: {MIC_RATE}}}
  output: {{device: fakespeaker, sample_rate: 22050}}
persona:
  name: {name}
  system_prompt: "You are {{name}}, a voice assistant."
  language: en
  en: {{greeting: ""}}
intent: {{exit_action: stop, exit_phrases: {exit_phrases}}}
camera: {{source: null}}
vision: {{encoder: none}}
transcript: {{path: turns.jsonl}}
http: {{enabled: false}}
llm:
  backend: rkllm
  max_new_tokens: {max_new}
  rkllm: {{library: "{lib}", runtime_version: auto, model: model.rkllm}}
{extra}"""


class Daemon:
    """`rkvlm-assistant run` in tmp_path; stderr goes to a file, read at any time."""

    def __init__(self, tmp_path: Path, fake_alsa, config_text: str, python_path: str = "",
                 extra_env: dict | None = None, **hooks):
        self.tmp = tmp_path
        (tmp_path / "config.yaml").write_text(config_text)
        self.sock = NotifySocket(tmp_path / "notify.sock")
        self.fake_log = tmp_path / "rkllm-calls.jsonl"
        env = fake_alsa.env()
        env.update(fake_env(log=self.fake_log, **hooks))
        if python_path:
            env["PYTHONPATH"] = os.pathsep.join([python_path, env["PYTHONPATH"]])
        env.update(extra_env or {})
        env["NOTIFY_SOCKET"] = self.sock.path
        env["WATCHDOG_USEC"] = "1000000"          # a ping every 0.5 s
        env.pop("WATCHDOG_PID", None)
        self.err_path = tmp_path / "daemon.err"
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "assistant", "--config", "config.yaml", "run"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=self._err, text=True)

    @property
    def err(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.err_path.read_text(errors="replace")

    def calls(self, fn: str | None = None) -> list[dict]:
        return [c for c in read_fake_log(self.fake_log) if fn is None or c["fn"] == fn]

    def wait_for_call(self, fn: str, timeout: float = 120) -> float:
        """Wait until the fake runtime logs ``fn`` (e.g. "hold"); returns the time seen."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.calls(fn):
                return time.monotonic()
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}) before "
                                     f"{fn}:\n{self.err[-3000:]}")
            time.sleep(0.02)
        raise AssertionError(f"no {fn} from the fake runtime:\n{self.err[-3000:]}")

    def wait_exit(self, timeout: float = 180) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the daemon did not stop:\n{self.err[-3000:]}")
        finally:
            self.sock.drain()
            self._err.close()
        return self.proc.returncode

    def rows(self) -> list[dict]:
        path = self.tmp / "turns.jsonl"
        return ([json.loads(line) for line in path.read_text().splitlines()]
                if path.exists() else [])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def rkllm_lib(tmp_path_factory):
    return build_fake_rkllm("1.3.0", tmp_path_factory.mktemp("rkllm"))


@pytest.fixture
def setup(tmp_path, spoken, rkllm_lib):
    write_fake_model(tmp_path / "model.rkllm", embed_dim=1536)
    fake = make_fake_alsa(tmp_path, capture_rate=MIC_RATE, playback_rate=22050)

    def start(phrases, config_text=None, python_path="", extra_env=None, **hooks) -> Daemon:
        fake.write_capture(speech_at(spoken, *phrases))
        return Daemon(tmp_path, fake, config_text or config(rkllm_lib), python_path, extra_env,
                      **hooks)

    start.fake = fake
    start.lib = rkllm_lib
    return start


def test_an_answer_past_its_deadline_is_aborted_and_apologised_for(setup, whisper_tiny):
    d = setup(["What do you see on the table?", "What color is the cup?", "Exit."],
              config(setup.lib, "deadlines: {llm_s: 3, abort_grace_s: 5}"),
              hold_after=2, hook_run=1)
    try:
        code = d.wait_exit()
    finally:
        d.kill()
    err = d.err
    assert code == 0, err[-3000:]
    rows = d.rows()
    assert [r["intent"] for r in rows] == ["question", "question", "exit"]
    # The held turn: aborted at its deadline, the note names the stage, the reply is the apology.
    assert "llm stage overran" in rows[0]["note"] and "deadlines.llm_s" in rows[0]["note"]
    assert rows[0]["answer"] == ERROR_LINE
    assert d.calls("rkllm_abort"), "the runtime was not asked to abort"
    # The next question is answered normally.
    assert "Echo:" in rows[1]["answer"] and "cup" in rows[1]["answer"].lower()
    assert "something went wrong" in heard(whisper_tiny, setup.fake)
    assert "exiting so systemd restarts" not in err


def test_a_hung_runtime_restarts_the_service(setup):
    llm_s, grace = 3, 2
    d = setup(["What do you see on the table?", "What color is the cup?", "Exit."],
              config(setup.lib, f"deadlines: {{llm_s: {llm_s}, abort_grace_s: {grace}}}"),
              hang_after=2, hook_run=2)
    try:
        hung_at = d.wait_for_call("hang")
        code = d.wait_exit(timeout=llm_s + grace + 30)
        exited_at = time.monotonic()
    finally:
        d.kill()
    err = d.err
    assert code == 70, err[-3000:]
    # Within the deadline and the grace (the runtime ignored the abort), plus a little.
    assert exited_at - hung_at < llm_s + grace + 4, exited_at - hung_at
    stuck = [line for line in err.splitlines() if "exiting so systemd restarts the service" in line]
    assert len(stuck) == 1 and "llm stage stuck" in stuck[0] and "deadlines.llm_s" in stuck[0]
    # systemd was pinged, then the pings stopped before the exit.
    msgs = d.sock.messages
    status = [i for i, m in enumerate(msgs) if m.startswith("STATUS=stuck in llm")]
    pings = [i for i, m in enumerate(msgs) if m == "WATCHDOG=1"]
    assert status and pings and max(pings) < status[0], msgs
    # The transcript holds the answered turn, and the one that hung (with its apology).
    rows = d.rows()
    assert rows[0]["intent"] == "question" and "Echo:" in rows[0]["answer"]
    assert len(rows) == 2 and "llm stage overran" in rows[1]["note"], rows


@pytest.mark.parametrize("hook", ["hold", "hang"])
def test_sigterm_mid_answer_stops_within_5_s(setup, hook):
    # hold: the runtime holds the answer until rkllm_abort. hang: it sleeps 60 s ignoring
    # the abort (wedged in the driver); the turn, the model's close and the interpreter's
    # exit would all wait for it.
    d = setup(["What do you see on the table?", "Exit."], hook_run=1, **{f"{hook}_after": 2})
    try:
        d.wait_for_call(hook)
        time.sleep(0.3)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        code = d.wait_exit(timeout=30)
        took = time.monotonic() - t0
    finally:
        d.kill()
    err = d.err
    assert code == 0, err[-3000:]
    assert took < 5, (took, err[-3000:])
    assert "SIGTERM: stopping" in err and "Traceback" not in err
    assert "STOPPING=1" in d.sock.messages
    assert d.calls("rkllm_abort")
    if hook == "hold":
        assert d.calls("rkllm_destroy")         # the runtime was released
    rows = d.rows()
    assert len(rows) == 1 and rows[0]["intent"] == "question", (rows, err[-3000:])
    assert rows[0]["interrupted"] is True and "service is stopping" in rows[0]["note"]
    assert rows[0]["answer"].startswith("Echo:")


def test_sighup_reloads_persona_and_phrases_without_reloading_the_model(setup):
    # "Thank you." is a question under the first config and an exit phrase under the second.
    d = setup(["What do you see on the table?", "What color is the cup?", "Thank you."],
              config(setup.lib, "deadlines: {llm_s: 3}"), hold_after=2, hook_run=1)
    try:
        d.wait_for_call("hold")
        (d.tmp / "config.yaml").write_text(config(
            setup.lib, "deadlines: {llm_s: 3}", exit_phrases="[exit, thank you]",
            name="Marvin", max_new=100))
        d.proc.send_signal(signal.SIGHUP)
        code = d.wait_exit()
    finally:
        d.kill()
    err = d.err
    assert code == 0, err[-3000:]
    rows = d.rows()
    # The new exit phrase ended the daemon.
    assert [r["intent"] for r in rows] == ["question", "question", "exit"], rows
    # One model load; the new system prompt went to the runtime before the next question.
    assert len(d.calls("rkllm_init")) == 1
    assert len([l for l in err.splitlines() if "rkllm" in l and "loaded in" in l]) == 1
    names = [c["fn"] for c in d.calls() if c["fn"] in ("rkllm_set_chat_template", "rkllm_run")]
    assert names == ["rkllm_set_chat_template", "rkllm_run", "rkllm_set_chat_template",
                     "rkllm_run"], names
    templates = d.calls("rkllm_set_chat_template")
    assert "Rocky" in templates[0]["system"] and "Marvin" in templates[1]["system"]
    assert "new system prompt in use" in err
    # llm.max_new_tokens needs a restart: named once, the running value kept.
    restart = [l for l in err.splitlines() if "SIGHUP: llm changed" in l]
    assert len(restart) == 1
    assert rows[0]["conversation"] != rows[1]["conversation"]   # the prompt forgot it


def test_sighup_with_a_broken_config_keeps_the_running_one(setup):
    d = setup(["What do you see on the table?", "What color is the cup?", "Exit."],
              config(setup.lib, "deadlines: {llm_s: 3}"), hold_after=2, hook_run=1)
    try:
        d.wait_for_call("hold")
        (d.tmp / "config.yaml").write_text(config(setup.lib, "deadlines: {llm_s: 3}",
                                                  exit_phrases="[exit]", max_new=-5))
        d.proc.send_signal(signal.SIGHUP)
        code = d.wait_exit()
    finally:
        d.kill()
    err = d.err
    assert code == 0, err[-3000:]
    lines = [l for l in err.splitlines() if "SIGHUP" in l and "ERROR" in l]
    assert len(lines) == 1 and "llm.max_new_tokens" in lines[0], lines
    assert "keeping the running configuration" in lines[0]
    rows = d.rows()
    assert [r["intent"] for r in rows] == ["question", "question", "exit"]
    assert "Echo:" in rows[1]["answer"]
    assert len(d.calls("rkllm_set_chat_template")) == 1


# --------------------------------------------------------------------------- issue 17

def llamacpp_config(exit_action: str = "stop") -> str:
    return f"""
audio:
  input: {{device: fakemic, sample_rate: {MIC_RATE}}}
  output: {{device: fakespeaker, sample_rate: 22050}}
persona: {{language: en, en: {{greeting: ""}}}}
intent: {{exit_action: {exit_action}}}
camera: {{source: null}}
vision: {{encoder: none}}
transcript: {{path: turns.jsonl}}
http: {{enabled: false}}
llm: {{llamacpp: {{model: tiny.gguf}}}}
"""


def test_a_nul_in_the_answer_does_not_end_the_voice_loop(setup, tmp_path, whisper_tiny):
    from tiny_models import write_text_model

    # The tiny model's answer to anything carries a NUL, which piper refuses (ValueError).
    reply = "I see a red\x00 apple on the table."
    write_text_model(tmp_path / "tiny.gguf", scripted_reply=reply)
    d = setup(["What do you see on the table?", "What color is the cup?", "Exit."],
              llamacpp_config())
    try:
        code = d.wait_exit()
    finally:
        d.kill()
    err = d.err
    assert code == 0, err[-3000:]
    rows = d.rows()
    # Both questions answered in full (the second one is heard at all), then the exit.
    assert [r["intent"] for r in rows] == ["question", "question", "exit"], rows
    assert rows[0]["answer"] == rows[1]["answer"] == reply
    assert not rows[0]["note"] and not rows[1]["note"]
    assert "synthesis failed" not in err and "Traceback" not in err
    said = heard(whisper_tiny, setup.fake)
    assert said.count("apple") >= 2 and "bye" in said, said


# The test's hook into the daemon process: SIGUSR1 cancels the voice loop's "converse"
# task, as a bug elsewhere would (the daemon does not use SIGUSR1).
KILL_HOOK = """
import asyncio, signal

def _kill_converse(signum, frame):
    loop = asyncio.events._get_running_loop()

    def kill():
        for task in asyncio.all_tasks(loop):
            if task.get_name() == "converse":
                task.cancel()
    loop.call_soon_threadsafe(kill)

signal.signal(signal.SIGUSR1, _kill_converse)
"""

# Added to KILL_HOOK: the shutdown after it is slow (the transcript's last write takes 1.5 s,
# as a slow SD card's does), so a watchdog left running would ping during it.
SLOW_CLOSE_HOOK = """
import time

_kill_before = _kill_converse

def _kill_converse(signum, frame):
    from assistant.transcript import TranscriptWriter
    close = TranscriptWriter.close

    def slow_close(self, *a, **kw):
        time.sleep(1.5)
        return close(self, *a, **kw)
    TranscriptWriter.close = slow_close
    _kill_before(signum, frame)

signal.signal(signal.SIGUSR1, _kill_converse)
"""


def test_a_killed_voice_task_ends_the_process_for_a_restart(setup, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK + SLOW_CLOSE_HOOK)
    from tiny_models import write_text_model
    write_text_model(tmp_path / "tiny.gguf", scripted_reply="I see a red apple.")
    # exit_action idle: without the fault the daemon would go on listening for good.
    d = setup(["What do you see on the table?"], llamacpp_config("idle"),
              python_path=str(hook))
    try:
        end = time.monotonic() + 180
        while not d.rows() and time.monotonic() < end and d.proc.poll() is None:
            time.sleep(0.1)
        assert d.rows(), d.err[-3000:]
        d.proc.send_signal(signal.SIGUSR1)
        t0 = time.monotonic()
        code = d.wait_exit(timeout=30)
        took = time.monotonic() - t0
    finally:
        d.kill()
    err = d.err
    assert code == 70, err[-3000:]
    assert took < 10, took
    critical = [l for l in err.splitlines() if "CRITICAL" in l]
    assert len(critical) == 1 and "the voice loop was cancelled" in critical[0], err[-3000:]
    # systemd was pinged while it worked, and never after the voice loop was gone, though
    # the shutdown then took 1.5 s (three ping intervals). Bug caught: the watchdog task
    # left running while the daemon shuts down (systemd then thinks it healthy).
    msgs = d.sock.messages
    gone = msgs.index("STATUS=the voice loop stopped; restarting")
    pings = [i for i, m in enumerate(msgs) if m == "WATCHDOG=1"]
    assert len(pings) >= 2 and max(pings) < gone, msgs
    assert msgs[gone + 1:] == ["STOPPING=1"], msgs
    assert took > 1.5, took                       # the slow close was waited for


# The test's hook: once the file $WEDGE_FILE exists, every write to the speaker blocks for
# good, as a device wedged in its driver does (no error, no return, no deadline of its own).
WEDGE_HOOK = """
import os, threading
import sounddevice

_write = sounddevice.OutputStream.write

def _wedged_write(self, data):
    if os.path.exists(os.environ["WEDGE_FILE"]):
        threading.Event().wait()
    return _write(self, data)

sounddevice.OutputStream.write = _wedged_write
"""


def test_a_stuck_voice_loop_stops_the_pings_and_the_process(setup, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WEDGE_HOOK)
    wedge = tmp_path / "wedge"
    wedge.touch()
    from tiny_models import write_text_model
    write_text_model(tmp_path / "tiny.gguf", scripted_reply="I see a red apple.")
    # Short deadlines: the stall limit is the longest (2 s) + the grace (1 s) + 30 s.
    cfg = llamacpp_config("idle") + ("deadlines: {asr_s: 2, llm_first_piece_s: 2, llm_s: 2, "
                                     "encode_s: 2, tts_s: 2, abort_grace_s: 1}\n")
    d = setup(["What do you see on the table?"], cfg, python_path=str(hook),
              extra_env={"WEDGE_FILE": str(wedge)})
    try:
        code = d.wait_exit(timeout=180)
    finally:
        d.kill()
    err = d.err
    assert code == 70, err[-3000:]
    critical = [l for l in err.splitlines() if "CRITICAL" in l]
    assert len(critical) == 1, err[-3000:]
    assert "the voice loop is stuck: the turn in progress has shown no progress" in critical[0]
    assert "(limit 33 s)" in critical[0]
    msgs = d.sock.messages
    stuck = msgs.index("STATUS=the voice loop is stuck; restarting")
    pings = [i for i, m in enumerate(msgs) if m == "WATCHDOG=1"]
    assert pings and max(pings) < stuck, msgs
