"""End of turn by Smart Turn (vad.end_of_turn: smart_turn): the model from the pipecat-ai
wheel, run with onnxruntime on faster-whisper's features, in the real endpointer and the
real voice loop. The speech is piper's (deterministic), whisper and webrtcvad are real."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from assistant.audio.null_sink import NullSink
from assistant.audio.smart_turn import (SmartTurnModel, TurnEnder, bundled_model, cut_recording,
                                        make_turn_ender)
from assistant.audio.wav_source import WavSource
from assistant.config import Config
from assistant.errors import ModelMissingError
from assistant.pipeline import Components, Pipeline
from speech_fixtures import write_wav
from doubles import SilentVoices

RATE = 16000
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    path = bundled_model()
    if path is None:
        pytest.skip("the Smart Turn model ships in pipecat-ai: pip install -e '.[smart-turn]'")
    return SmartTurnModel(path).load()


@pytest.fixture(scope="module")
def endpointing():
    """bench/endpointing.py's speech: a question said whole, or with a pause put inside."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import endpointing
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return endpointing


def smart_cfg(**vad) -> Config:
    cfg = Config()
    return replace(cfg, vad=replace(cfg.vad, end_of_turn="smart_turn", **vad),
                   persona=replace(cfg.persona, language="en"))


def test_the_features_are_those_smart_turn_was_made_with(model):
    """Bugs caught: the short speech padded at the wrong end, and a long one cut to its
    first 8 s instead of its last (the model would judge how the question began, not how
    it ends: the 12 s here differ entirely between the two)."""
    # pipecat's own numpy copy of transformers' WhisperFeatureExtractor, loaded from the
    # wheel's file (importing pipecat would pull in its dependencies).
    ref_file = model.path.parent.parent / "_whisper_features.py"
    spec = importlib.util.spec_from_file_location("pipecat_whisper_features", ref_file)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    rng = np.random.default_rng(1)
    pcm = (rng.standard_normal(3 * RATE) * 3000).astype(np.int16)
    audio = np.concatenate([np.zeros(5 * RATE, np.float32), pcm.astype(np.float32) / 32768])
    expected = ref.compute_whisper_log_mel_features(audio, do_normalize=True)
    ours = model.features(pcm)
    assert ours.shape == (1, 80, 800)
    assert np.abs(ours[0] - expected).max() < 1e-4
    # 12 s: loud noise, then 2 s of silence and 6 s of quieter noise (the last 8 s).
    long = np.concatenate([(rng.standard_normal(4 * RATE) * 9000).astype(np.int16),
                           np.zeros(2 * RATE, np.int16),
                           (rng.standard_normal(6 * RATE) * 2000).astype(np.int16)])
    last = ref.compute_whisper_log_mel_features(long[-8 * RATE:].astype(np.float32) / 32768,
                                                do_normalize=True)
    first = ref.compute_whisper_log_mel_features(long[:8 * RATE].astype(np.float32) / 32768,
                                                 do_normalize=True)
    assert np.abs(last - first).max() > 0.5              # the two windows are told apart
    assert np.abs(model.features(long)[0] - last).max() < 1e-4


def LONG_QUESTION(endpointing) -> np.ndarray:
    """Over 8 s of one question, said slowly."""
    return endpointing.speak("Is the window in the kitchen open, and is the back door shut, "
                             "and did somebody leave the big lamp on in the hall by the "
                             "stairs again?", 1.3)


class Asked:
    """The real model, keeping the audio of every call (what pipecat is then given)."""

    loaded = True

    def __init__(self, model):
        self.model, self.calls = model, []

    def predict(self, pcm):
        p = self.model.predict(pcm)
        self.calls.append((pcm, p))
        return p


def test_our_glue_gives_pipecats_own_probabilities(model, endpointing):
    # pipecat's LocalSmartTurnAnalyzerV3 (its own truncation, padding, int16 scaling and
    # features) given the audio our TurnEnder sent, at each pause of a pausing and a whole
    # question: the same probability. Its whole buffer is the segment here (fed at once, so
    # its pre-speech window reaches back past the start).
    try:
        from loguru import logger
        from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
    except ImportError:
        pytest.skip("pipecat-ai's dependencies are not installed (--no-deps)")
    logger.disable("pipecat")
    cfg = smart_cfg()
    lead, tail = np.zeros(RATE // 2, np.int16), np.zeros(2 * RATE, np.int16)
    asked = Asked(model)
    for pcm in (endpointing.speak_with_pause("Which of these", "is the biggest?", 0.8, 400),
                endpointing.speak("Is the window open?", 1.25), LONG_QUESTION(endpointing)):
        asyncio.run(cut_recording(np.concatenate([lead, pcm, tail]), cfg.vad,
                                  TurnEnder(cfg.vad, asked)))
    assert len(asked.calls) >= 4
    # Speech longer than the model's 8 s window was asked about too (the cut to its last
    # 8 s is then compared with pipecat's own, not only its zero-padding).
    assert max(len(pcm) for pcm, _ in asked.calls) > 8 * RATE

    async def pipecats(pcm):
        analyzer = LocalSmartTurnAnalyzerV3(smart_turn_model_path=str(model.path), sample_rate=RATE)
        analyzer.set_sample_rate(RATE)
        analyzer.append_audio(pcm.tobytes(), True)
        _, metrics = await analyzer.analyze_end_of_turn()
        await analyzer.cleanup()
        return metrics.probability

    try:
        for pcm, ours in asked.calls:
            assert asyncio.run(pipecats(pcm)) == pytest.approx(ours, abs=1e-4)
    finally:
        logger.enable("pipecat")


def test_the_model_file_is_found_without_importing_pipecat():
    code = ("import sys; from assistant.audio.smart_turn import bundled_model; "
            "p = bundled_model(); print(p is not None and p.is_file(), "
            "any(m == 'pipecat' or m.startswith('pipecat.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("pipecat-ai is not installed")
    assert out[1] == "False"


def test_no_model_falls_back_to_silence_and_a_wrong_path_is_an_error(monkeypatch, caplog, tmp_path):
    import assistant.audio.smart_turn as st

    monkeypatch.setattr(st, "bundled_model", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert make_turn_ender(smart_cfg()) is None
    assert "pipecat-ai" in caplog.text and "end_of_turn: silence" in caplog.text
    with pytest.raises(ModelMissingError, match="smart_turn_model"):
        make_turn_ender(smart_cfg(smart_turn_model=str(tmp_path / "nope.onnx")))
    assert make_turn_ender(Config()) is None      # the silence rule asks for no model


def test_a_complete_question_is_cut_by_the_model(model, endpointing):
    # "What do you see on the table?" said whole: complete after 200 ms of silence, long
    # before the 2.5 s limit (set long so only the model can have cut it).
    cfg = smart_cfg(max_pause_ms=2500)
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), endpointing.speak("What do you see on the table?", 1.0),
                          np.zeros(3 * RATE, np.int16)])
    ender = TurnEnder(cfg.vad, model)
    (utt,) = asyncio.run(cut_recording(pcm, cfg.vad, ender))
    assert utt.silence_ms < 2500 and ender.last is not None and ender.last["probability"] > 0.5


def test_an_unfinished_question_keeps_listening(model, endpointing):
    # "What is the name of ... the book?": the model hears the opening as incomplete, so the
    # 1.2 s pause (longer than the silence rule's 700 ms) does not cut it; max_pause_ms does
    # not come either.
    cfg = smart_cfg()
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16),
                          endpointing.speak_with_pause("What is the name of", "the book?", 1.0, 1200),
                          np.zeros(3 * RATE, np.int16)])
    assert len(asyncio.run(cut_recording(pcm, replace(cfg.vad, end_of_turn="silence")))) == 2
    utts = asyncio.run(cut_recording(pcm, cfg.vad, TurnEnder(cfg.vad, model)))
    assert len(utts) == 1


def test_the_voice_loop_ends_the_turn_by_the_model_with_whisper_in_the_pause(
        tmp_path, model, endpointing, whisper_tiny):
    cfg = smart_cfg(max_pause_ms=2500)
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), endpointing.speak("What do you see on the table?", 1.0),
                          np.zeros(4 * RATE, np.int16)])
    parts = Components(source=WavSource(write_wav(tmp_path / "q.wav", pcm, RATE), realtime=True),
                       sink=NullSink(RATE), asr=whisper_tiny, voices=SilentVoices(), llm=None,
                       smart_turn=model)
    pipe = Pipeline(cfg, parts)
    asyncio.run(pipe.run(greet=False))
    (turn,) = [t for t in pipe.turns if t.intent != "nothing"]
    assert "table" in turn.transcript.lower()
    assert pipe.turn_end.last is not None          # the model ended it, not the 2.5 s limit
    assert turn.speech_end - turn.last_word < 2.4
    # Whisper started in the pause; the turn used that pass (waited for what was left of it).
    assert "asr_in_pause_ms" in turn.counts


class BrokenModel:
    """A model whose runtime fails on every call (a fault: nothing real fails on demand)."""

    loaded = True

    def predict(self, pcm):
        raise RuntimeError("onnxruntime: bad input")


def test_a_failing_model_leaves_the_silence_limit_and_says_so_once(endpointing, caplog):
    cfg = smart_cfg(max_pause_ms=900)
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), endpointing.speak("Is the light on?", 1.0),
                          np.zeros(2 * RATE, np.int16)] * 2)
    ender = TurnEnder(cfg.vad, BrokenModel())
    with caplog.at_level(logging.WARNING):
        utts = asyncio.run(cut_recording(pcm, cfg.vad, ender))
    assert len(utts) == 2 and all(u.silence_ms >= 900 for u in utts)
    assert caplog.text.count("Smart Turn failed") == 1 and "bad input" in caplog.text


class Scripted:
    """A model giving set probabilities in turn, keeping the length of the audio it got."""

    loaded = True

    def __init__(self, *p):
        self.p, self.calls = list(p), []

    def predict(self, pcm):
        self.calls.append(len(pcm))
        return self.p[min(len(self.calls), len(self.p)) - 1]


def test_a_verdict_is_not_used_once_the_person_spoke_on(endpointing):
    """Bug caught: the verdict on the first pause ("incomplete") reused at the next pause
    after the person spoke on, so the model is never asked about the whole question and
    the max_pause_ms limit ends it instead of the model."""
    cfg = smart_cfg(max_pause_ms=2500)
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16),
                          endpointing.speak_with_pause("Which of these", "is the biggest?", 1.0, 500),
                          np.zeros(3 * RATE, np.int16)])
    model = Scripted(0.1, 0.9)             # the first pause incomplete, the end complete
    ender = TurnEnder(cfg.vad, model)
    (utt,) = asyncio.run(cut_recording(pcm, cfg.vad, ender))
    assert len(model.calls) == 2 and model.calls[1] > model.calls[0]   # asked again, on more
    assert ender.last is not None and ender.last["probability"] == 0.9
    assert utt.silence_ms < 1000                  # cut by the model, long before 2.5 s
