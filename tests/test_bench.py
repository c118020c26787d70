"""`rkvlm-assistant bench`: profiles, scenarios and the JSON report's shape (never timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from assistant.bench_profiles import (ALIASES, PROFILES, SYSTEM_TOKENS, FastForward,
                                      SimulatedEncoder, SimulatedLLM, profile_names,
                                      resolve_profile)
from assistant.errors import ContextFullError
from tiny_models import write_mmproj, write_text_model

SCENARIOS = ("same_scene", "new_scene", "idle_encoded")


def cli(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "assistant", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    write_text_model(d / "tiny.gguf", scripted_reply="I see a red apple on the wooden table.")
    write_mmproj(d / "tiny-mmproj.gguf")
    (d / "c.yaml").write_text(
        f"llm: {{llamacpp: {{model: {d / 'tiny.gguf'}, mmproj: {d / 'tiny-mmproj.gguf'}}}}}\n")
    return d


def check_scenario(sc: dict) -> None:
    for mode in ("pipelined", "serial"):
        figure = sc[mode]["last_word_to_first_audio_ms"]
        assert set(figure) >= {"median", "p90"}
        assert isinstance(figure["median"], float) and isinstance(figure["p90"], float)
    assert "speedup" in sc


def test_measured_profile_reports_every_scenario(config):
    # long_conversation shortened to a smoke run of 2 questions (60 by default).
    r = cli("--config", "c.yaml", "bench", "--profile", "measured", "--rounds", "1", "--json",
            "--questions", "2", cwd=config)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["profile"] == "measured" and report["rounds"] == 1
    assert report["simulated"] == [] and "asr" in report["measured"]
    assert set(report["scenarios"]) == set(SCENARIOS) | {"long_conversation"}
    long = report["scenarios"].pop("long_conversation")
    assert long["questions"] == 2 and long["answered"] == 2 and long["context"] == 4096
    figure = long["pipelined"]["last_word_to_first_audio_ms"]
    assert set(figure) >= {"median", "p90", "max"} and isinstance(figure["max"], float)
    assert isinstance(long["compactions"], int) and "compactions_while_idle" in long
    assert isinstance(long["max_over_same_scene_median"], float)
    for sc in report["scenarios"].values():
        check_scenario(sc)
        assert "overhead_ms" in sc["alone_ms"]
    assert report["scenarios"]["same_scene"]["pipelined"]["scene"] == ["same"]
    assert report["scenarios"]["new_scene"]["pipelined"]["scene"] == ["new"]
    assert isinstance(report["overhead_ms"], float)


def test_board_profile_one_scenario(config):
    r = cli("--config", "c.yaml", "bench", "--profile", "rk3588-smolvlm-256m",
            "--scenario", "same_scene", "--rounds", "1", "--json", cwd=config)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["profile"] == "rk3588-smolvlm-256m" and report["rounds"] == 1
    assert report["simulated"] == ["encoder", "prefill", "decode", "asr", "tts"]
    assert set(report["scaling"]) == {"asr", "tts"}
    assert list(report["scenarios"]) == ["same_scene"]
    check_scenario(report["scenarios"]["same_scene"])
    assert report["overhead_ms"] is None          # measured on the measured profile only


def test_unknown_profile_is_a_usage_error(tmp_path):
    r = cli("bench", "--profile", "rk9999-nothing", cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    assert "unknown profile 'rk9999-nothing'" in r.stderr and "rk3576-qwen2-vl-2b" in r.stderr


def test_profiles_and_aliases():
    for name in ("rk3576-qwen2-vl-2b", "rk3588-qwen2-vl-2b", "rk3576-qwen2.5-vl-3b",
                 "rk3588-qwen2.5-vl-3b", "rk3576-qwen3-vl-2b", "rk3576-smolvlm-256m",
                 "rk3576-qwen3.5-0.8b"):
        assert name in PROFILES and name in profile_names()
    assert resolve_profile("rk3576") is PROFILES["rk3576-qwen2-vl-2b"]
    assert resolve_profile("rk3588") is PROFILES["rk3588-qwen2-vl-2b"]
    assert set(ALIASES) == {"rk3576", "rk3588"}
    assert resolve_profile("measured") is None
    with pytest.raises(KeyError):
        resolve_profile("rk3576-nothing")
    # "prefill 196 tokens in 1234.9 ms" is the rate replayed.
    assert PROFILES["rk3576-qwen2-vl-2b"].prefill_tok_s == pytest.approx(196 / 1.2349)


def test_simulated_llm_keeps_its_context_consistently():
    clock = FastForward()
    p = PROFILES["rk3576-qwen2-vl-2b"]
    llm = SimulatedLLM(p, context=1024, clock=clock)
    image = SimulatedEncoder(p, clock)
    with clock:
        emb = image.encode(None)
        assert emb.n_tokens == p.image_tokens
        pieces: list[str] = []
        st = llm.run_turn("What is on the table?", emb, True, pieces.append)
        assert st.prompt_tokens == llm.count_tokens("What is on the table?") + 16 + emb.n_tokens + 4
        assert llm.tokens_used == SYSTEM_TOKENS + st.prompt_tokens + st.generated_tokens
        assert st.generated_tokens == llm.count_tokens("".join(pieces))
        # Fed back as text: exactly history_cost, and paid by the next prefill.
        history = [("What is on the table?", "".join(pieces).strip())]
        llm.load_history(history)
        assert llm.tokens_used == SYSTEM_TOKENS + llm.history_cost(history)
        st2 = llm.run_turn("And behind it?", None, True, lambda s: None)
        assert st2.prompt_tokens == llm.history_cost(history) + llm.count_tokens("And behind it?") + 16
        assert llm.turn_cost("x", emb) == llm.turn_cost("x") + emb.n_tokens + 4
        llm.clear()
        assert llm.tokens_used == SYSTEM_TOKENS
        # A turn that cannot fit is refused before any prefill.
        with pytest.raises(ContextFullError):
            llm.run_turn("word " * 800, emb, True, lambda s: None)
        # Without keep_history the context starts again from the system prompt.
        llm.run_turn("Hello?", None, True, lambda s: None)
        before = llm.tokens_used
        st3 = llm.run_turn("Hello?", None, False, lambda s: None)
        assert llm.tokens_used == SYSTEM_TOKENS + st3.prompt_tokens + st3.generated_tokens < before + 1
