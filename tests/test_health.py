"""Deadlines on native calls (assistant.health), the LLM stream's deadlines, the daemon's
watchdog loop, its speaker STATUS and its SIGHUP reload, in-process.

The daemon runs with these end to end in tests/test_daemon_faults.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import SimpleNamespace

import pytest

from assistant.config import DeadlinesConfig, parse
from assistant.conversation import Conversation, Request
from assistant.daemon import Reloader, DeviceStatus, plan_reload, supervise
from assistant.health import Health, StageOverrun
from assistant.llm.base import stream_turn
from assistant.turn import Turn
from scripted_llm import ScriptedLLM

FAST = DeadlinesConfig(asr_s=0.5, llm_first_piece_s=0.5, llm_s=1.0, encode_s=0.5, tts_s=0.5,
                       abort_grace_s=0.5)


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- the registry

def test_a_call_within_its_deadline_returns_and_leaves_nothing_behind():
    h = Health(FAST)
    assert run(h.call("asr", lambda x: x * 2, 21)) == 42
    assert h.running() == [] and h.stuck() is None


def test_a_call_past_its_deadline_is_given_up_and_stuck_after_the_grace():
    h = Health(FAST)
    release = threading.Event()

    async def main():
        t0 = time.monotonic()
        with pytest.raises(StageOverrun) as e:
            await h.call("asr", release.wait, 30)
        waited = time.monotonic() - t0
        assert 0.4 < waited < 1.5
        assert "asr stage overran" in str(e.value) and "deadlines.asr_s" in str(e.value)
        # The thread is still inside the call: watched, given up, not yet stuck.
        (w,) = h.running()
        assert w.stage == "asr" and w.given_up and h.stuck() is None
        await asyncio.sleep(0.6)                   # the deadline plus the grace have passed
        assert h.stuck() is w
        release.set()                              # it returned after all
        deadline = time.monotonic() + 5
        while h.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert h.running() == [] and h.stuck() is None

    try:
        run(main())
    finally:
        release.set()


def test_call_blocking_from_a_worker_thread():
    h = Health(FAST)
    assert h.call_blocking("encode", lambda: "embedding") == "embedding"
    with pytest.raises(ValueError):
        h.call_blocking("encode", lambda: (_ for _ in ()).throw(ValueError("bad frame")))
    release = threading.Event()
    with pytest.raises(StageOverrun, match="encode stage overran.*deadlines.encode_s"):
        h.call_blocking("encode", release.wait, 30)
    assert [w.stage for w in h.running()] == ["encode"]
    release.set()


# --------------------------------------------------------------------------- the LLM stream

class HoldingLLM(ScriptedLLM):
    """Streams ``before`` pieces, then waits: for abort (honours it) or, with ``deaf``,
    for ``release`` only (a runtime wedged in the driver)."""

    def __init__(self, before=2, deaf=False):
        super().__init__(["one two three four five six"])
        self.before, self.deaf = before, deaf
        self.release = threading.Event()
        self.aborts = 0

    def run_turn(self, text, image, keep_history, on_piece, options=None):
        self._abort.clear()
        for i in range(self.before):
            on_piece(f"w{i} ")
        while not self.release.is_set():
            if self._abort.is_set() and not self.deaf:
                break
            time.sleep(0.01)
        from assistant.llm.base import TurnStats
        return TurnStats(generated_tokens=self.before, aborted=self._abort.is_set())

    def abort(self):
        self.aborts += 1
        super().abort()


async def _collect(backend, deadlines, health_lock=None):
    got = []
    async for p in stream_turn(backend, "q", None, True, lock=health_lock, deadlines=deadlines):
        got.append(p)
    return got


def test_an_llm_turn_past_llm_s_is_aborted(monkeypatch):
    b = HoldingLLM(before=2)
    t0 = time.monotonic()

    async def main():
        got = []
        with pytest.raises(StageOverrun) as e:
            async for p in stream_turn(b, "q", None, True, deadlines=FAST):
                got.append(p)
        return got, e.value

    got, err = run(main())
    assert got == ["w0 ", "w1 "]
    assert err.stage == "llm" and "deadlines.llm_s" in str(err)
    assert 0.9 < time.monotonic() - t0 < 2.5
    assert b.aborts >= 1


def test_no_first_piece_within_llm_first_piece_s():
    b = HoldingLLM(before=0)
    with pytest.raises(StageOverrun, match="llm_first_piece stage overran") as e:
        run(_collect(b, FAST))
    assert e.value.key == "llm_first_piece_s"


def test_a_runtime_that_ignores_the_abort_is_not_waited_for():
    from assistant.health import HEALTH
    b = HoldingLLM(before=1, deaf=True)

    async def main():
        t0 = time.monotonic()
        with pytest.raises(StageOverrun):
            await _collect(b, DeadlinesConfig(llm_first_piece_s=0.5, llm_s=0.8))
        assert time.monotonic() - t0 < 2.0      # the turn was given up, not waited for
        stuck = [w for w in HEALTH.running() if w.stage == "llm"]
        assert stuck and stuck[0].given_up       # still inside run_turn: watched
        b.release.set()
        deadline = time.monotonic() + 5
        while any(w.stage == "llm" for w in HEALTH.running()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not any(w.stage == "llm" for w in HEALTH.running())

    try:
        run(main())
    finally:
        b.release.set()


def test_a_turn_within_its_deadlines_is_untouched():
    b = ScriptedLLM(["Forty two."])
    assert run(_collect(b, FAST)) == ["Forty", " two."]


def test_the_conversation_feeds_its_history_back_after_an_overrun():
    cfg = parse("deadlines: {llm_first_piece_s: 0.5, llm_s: 0.8}")
    b = HoldingLLM(before=1)
    conv = Conversation(cfg, b)

    async def main():
        with pytest.raises(StageOverrun):
            async for _ in conv.ask(Request("hello?"), Turn()):
                pass
        b.release.set()
        b.before = 0
        turn = Turn()
        async for _ in conv.ask(Request("again?"), turn):
            pass
        return turn

    turn = run(main())
    # The cache may hold part of the aborted turn: the (empty) history was fed back first.
    assert b.histories == [[]]
    assert conv.exchanges[-1].question == "again?"


# --------------------------------------------------------------------------- the watchdog loop

class Recorder:
    def __init__(self, interval=0.1):
        self.messages: list[tuple[float, str]] = []
        self.interval = interval
        self.enabled = True

    def __call__(self, message):
        self.messages.append((time.monotonic(), message))

    def watchdog_interval(self):
        return self.interval


def test_the_watchdog_pings_until_a_call_is_stuck():
    h = Health(FAST)
    notify = Recorder()
    release = threading.Event()
    stuck_at = []

    async def on_stuck(w):
        stuck_at.append((time.monotonic(), w))

    async def main():
        loop_task = asyncio.create_task(supervise(notify, h, on_stuck, tick=0.05))
        await asyncio.sleep(0.3)
        with pytest.raises(StageOverrun):
            await h.call("tts", release.wait, 30)
        await asyncio.wait_for(loop_task, 5)        # returns once on_stuck has run
        release.set()

    t0 = time.monotonic()
    try:
        run(main())
    finally:
        release.set()
    (at, w), = stuck_at
    assert w.stage == "tts"
    assert at - t0 >= FAST.tts_s + FAST.abort_grace_s
    pings = [t for t, m in notify.messages if m == "WATCHDOG=1"]
    assert len(pings) >= 5 and max(pings) <= at     # pinged, then never again


def test_the_watchdog_stops_pinging_when_the_voice_loop_stalls():
    h = Health(FAST)
    notify = Recorder(interval=0.05)
    problem: list[str] = []          # what Pipeline.stalled would say, once it says it
    stalled_at = []

    async def on_stalled(why):
        stalled_at.append((time.monotonic(), why))

    async def main():
        task = asyncio.create_task(supervise(notify, h, None, tick=0.02,
                                             voice=lambda: problem[0] if problem else None,
                                             on_stalled=on_stalled))
        await asyncio.sleep(0.3)
        problem.append("the turn in progress has shown no progress for 341 s")
        await asyncio.wait_for(task, 5)          # returns once on_stalled has run

    run(main())
    (at, why), = stalled_at
    assert "no progress" in why
    pings = [t for t, m in notify.messages if m == "WATCHDOG=1"]
    assert len(pings) >= 3 and max(pings) <= at


def test_the_stall_limit_follows_the_deadlines():
    h = Health(DeadlinesConfig())
    # The longest deadline (llm_s, 300 s), its grace (10 s), and a chunk of speech (30 s).
    assert h.stall_limit() == 300 + 10 + 30
    h.configure(DeadlinesConfig(llm_s=20, asr_s=45, abort_grace_s=2))
    assert h.stall_limit() == max(45, DeadlinesConfig().llm_first_piece_s) + 2 + 30


def test_speaker_status_goes_down_and_comes_back():
    sink = SimpleNamespace(state="ready", problem="")
    sent = []
    st = DeviceStatus(sink, sent.append)
    st.poll()
    assert sent == []
    sink.state, sink.problem = "down", "cannot write to the speaker 'usb': device unplugged"
    st.poll()
    st.poll()                                     # said once, not every tick
    assert sent == ["STATUS=speaker unavailable: cannot write to the speaker 'usb': "
                    "device unplugged"]
    sink.problem = "cannot open the speaker 'usb': busy"
    st.poll()
    assert sent[-1] == "STATUS=speaker unavailable: cannot open the speaker 'usb': busy"
    sink.state, sink.problem = "ready", ""
    st.poll()
    st.poll()
    assert sent[-1] == "STATUS=listening" and len(sent) == 3
    sink.state = "closed"                          # shutting down: nothing to say
    st.poll()
    assert len(sent) == 3


def test_the_watchdog_loop_reports_the_speaker():
    h = Health(FAST)
    notify = Recorder(interval=0.05)
    sink = SimpleNamespace(state="down", problem="speaker gone")

    async def main():
        task = asyncio.create_task(supervise(notify, h, None, DeviceStatus(sink, notify),
                                             tick=0.02))
        await asyncio.sleep(0.2)
        sink.state = "ready"
        await asyncio.sleep(0.2)
        task.cancel()

    run(main())
    status = [m for _, m in notify.messages if m.startswith("STATUS=")]
    assert status == ["STATUS=speaker unavailable: speaker gone", "STATUS=listening"]


# --------------------------------------------------------------------------- SIGHUP

def test_plan_reload_keeps_sections_that_need_a_restart():
    running = parse("llm: {max_new_tokens: 128}\npersona: {name: Rocky}", "a.yaml")
    new = parse("llm: {max_new_tokens: 64}\npersona: {name: Marvin}\n"
                "intent: {exit_phrases: [enough]}", "a.yaml")
    applied, restart = plan_reload(running, new)
    assert restart == ["llm"]
    assert applied.llm.max_new_tokens == 128                  # kept until a restart
    assert applied.persona.name == "Marvin" and applied.intent.exit_phrases == ("enough",)
    assert plan_reload(running, running) == (running, [])


class PersonaLLM(ScriptedLLM):
    def __init__(self):
        super().__init__(["Sure."])
        self.personas = []

    def set_persona(self, persona):
        self.personas.append(persona.prompt)
        self.used = self.system_tokens


def _reloader(tmp_path, text, backend):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    from assistant.config import load
    cfg = load(path)
    conv = Conversation(cfg, backend)
    pipeline = SimpleNamespace(cfg=cfg, intents=None)
    return path, Reloader(cfg, pipeline, conv, Health()), pipeline, conv


def test_sighup_applies_persona_intents_and_logging(tmp_path, caplog):
    b = PersonaLLM()
    path, r, pipeline, conv = _reloader(
        tmp_path, "persona: {name: Rocky}\nllm: {max_new_tokens: 100}\n", b)

    async def main():
        async for _ in conv.ask(Request("hi?"), Turn()):
            pass
        old_id = conv.id
        path.write_text("persona: {name: Marvin, en: {greeting: Hi there}}\n"
                        "intent: {exit_phrases: [that will do]}\n"
                        "llm: {max_new_tokens: 50}\nlogging: {level: WARNING}\n"
                        "deadlines: {llm_s: 42}\n")
        with caplog.at_level(logging.INFO):
            assert await r.reload()
        return old_id

    root = logging.getLogger()
    level = root.level
    try:
        old_id = run(main())
        assert root.level == logging.WARNING
    finally:
        root.setLevel(level)
    assert b.personas and "Marvin" in b.personas[-1]
    assert conv.id != old_id and conv.exchanges == []           # forgotten with the prompt
    assert pipeline.cfg.persona.en.greeting == "Hi there" and conv.cfg is pipeline.cfg
    assert pipeline.intents.classify("That will do.").value == "exit"
    assert r.health.deadlines.llm_s == 42
    assert pipeline.cfg.llm.max_new_tokens == 100               # needs a restart: kept
    warn = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warn) == 1 and warn[0].startswith("SIGHUP: llm changed")


def test_sighup_with_a_broken_config_keeps_the_running_one(tmp_path, caplog):
    b = PersonaLLM()
    path, r, pipeline, conv = _reloader(tmp_path, "persona: {name: Rocky}\n", b)
    before = pipeline.cfg
    path.write_text("persona: {name: Marvin}\nllm: {max_new_tokens: -5}\n")
    with caplog.at_level(logging.INFO):
        assert run(r.reload()) is False
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and "llm.max_new_tokens" in errors[0]
    assert pipeline.cfg is before and b.personas == []


# --------------------------------------------------------------------------- set_persona

def test_rkllm_set_persona_sets_the_chat_template_again(tmp_path_factory, tmp_path):
    from assistant.config import LlmConfig, PersonaConfig, RkllmConfig
    from assistant.llm.rkllm import RkllmBackend
    from rkllm_fake import FakeRkllm, build_fake_rkllm, write_fake_model

    lib = build_fake_rkllm("1.3.0", tmp_path_factory.mktemp("rkllm"))
    fake = FakeRkllm(lib)
    fake.reset()
    model = write_fake_model(tmp_path / "m.rkllm")
    cfg = LlmConfig(backend="rkllm", rkllm=RkllmConfig(library=str(lib), model=str(model)))
    b = RkllmBackend(cfg, PersonaConfig(name="Rocky", system_prompt="You are {name}."),
                     with_vision=False)
    try:
        b.load()
        b.run_turn("Hello?", None, True, lambda p: None)
        assert b.tokens_used > len("You are Rocky.")
        b.set_persona(PersonaConfig(name="Marvin", system_prompt="You are {name}, sad."))
        templates = fake.calls("rkllm_set_chat_template")
        assert len(templates) == 2 and "You are Marvin, sad." in templates[1]["system"]
        assert fake.names().count("rkllm_init") == 1          # no model reload
        assert b.tokens_used == 0                              # the cache was emptied
        b.run_turn("Again?", None, True, lambda p: None)
        assert fake.last("rkllm_run")["kv_before"] == 0
    finally:
        b.close()


def test_llamacpp_set_persona_evaluates_the_new_system_prompt(tmp_path):
    from assistant.config import LlamaCppConfig, LlmConfig, PersonaConfig
    from assistant.llm.llamacpp import LlamaCppBackend
    from tiny_models import write_text_model

    path = write_text_model(tmp_path / "tiny.gguf", scripted_reply="Fine.")
    llm = LlmConfig(max_context_len=512, max_new_tokens=8, temperature=0.0,
                    llamacpp=LlamaCppConfig(n_threads=2, n_batch=64))
    b = LlamaCppBackend(llm, PersonaConfig(system_prompt="Be brief."), path)
    try:
        b.load()
        system_only = b.tokens_used
        b.run_turn("Hello?", None, True, lambda p: None)
        assert b.tokens_used > system_only
        b.set_persona(PersonaConfig(system_prompt="Be brief, and speak like a pirate always."))
        assert system_only < b.tokens_used                     # the longer prompt, alone
        assert "pirate" in b._kv_text and "Hello?" not in b._kv_text
    finally:
        b.close()


def test_a_backend_without_set_persona_says_so():
    from assistant.config import PersonaConfig
    from assistant.errors import BackendError

    with pytest.raises(BackendError, match="cannot change its system prompt"):
        ScriptedLLM().set_persona(PersonaConfig())
