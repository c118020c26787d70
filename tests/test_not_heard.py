"""Speech whisper cannot make out gets a short spoken "Sorry, I didn't catch that." in the
conversation's language (persona.*.not_heard); noise and silence get nothing.

Through the real pipeline: webrtcvad cuts the utterances, tiny.en judges them, piper speaks
into a WAV sink that whisper hears back. The "mumble" is a spoken question played
backwards: a voice's sound, pitch and rhythm with no words, which whisper rejects as low
confidence while its no-speech probability says speech. The LLM is the scripted double of
test_pipeline (the reply to the real question after it is not what is tested here).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from assistant.audio.resample import resample
from assistant.audio.tts import VoiceSet
from assistant.audio.wav_sink import WavSink
from assistant.audio.wav_source import WavSource, read_wav
from assistant.config import Config, PersonaConfig, TtsConfig
from assistant.pipeline import Components, Pipeline
from scripted_llm import ScriptedLLM
from speech_fixtures import hear, white_noise, write_wav

RATE = 16000
SORRY = "Sorry, I didn't catch that."


@pytest.fixture(scope="module")
def voices():
    vs = VoiceSet(TtsConfig())
    vs.load()
    return vs


def silence(s: float) -> np.ndarray:
    return np.zeros(int(s * RATE), np.int16)


def mumble(spoken) -> np.ndarray:
    return spoken.pcm("What do you see on the table?")[::-1].copy()


def run_pipeline(tmp_path, whisper, voices, pcm, persona: PersonaConfig | None = None):
    wav = write_wav(tmp_path / "mic.wav", pcm, RATE)
    cfg = Config(persona=persona or PersonaConfig(language="en"))
    parts = Components(source=WavSource(wav, frame_ms=cfg.vad.frame_ms),
                       sink=WavSink(tmp_path / "said.wav", voices.sample_rate),
                       asr=whisper, voices=voices, llm=ScriptedLLM(["The cup is blue."]))
    pipe = Pipeline(cfg, parts)

    async def main():
        try:
            await pipe.run(greet=False)
        finally:
            await parts.sink.close()

    asyncio.run(main())
    return pipe


def said(whisper, tmp_path) -> str:
    """What whisper hears in the sink's file; "" when nothing was played (no file)."""
    if not (tmp_path / "said.wav").exists():
        return ""
    pcm, rate = read_wav(tmp_path / "said.wav")
    return hear(whisper, resample(pcm, rate, RATE)) if np.abs(pcm).max(initial=0) > 0 else ""


def test_a_mumble_gets_a_spoken_apology_then_a_question_is_answered(tmp_path, spoken,
                                                                     whisper_tiny, voices):
    pcm = np.concatenate([silence(0.5), mumble(spoken), silence(1.5),
                          spoken.pcm("What color is the cup?"), silence(1.5)])
    pipe = run_pipeline(tmp_path, whisper_tiny, voices, pcm)
    first, second = pipe.turns
    assert first.intent == "nothing" and first.note == "low_confidence"
    assert first.transcript                      # whisper wrote words, not trusted
    assert first.answer == SORRY
    assert second.intent == "question" and second.answer == "The cup is blue."
    heard = said(whisper_tiny, tmp_path)
    assert "sorry" in heard and "catch" in heard and "blue" in heard, heard


def test_the_apology_is_in_the_conversation_language_and_can_be_off(tmp_path, spoken,
                                                                    whisper_tiny, voices):
    (tmp_path / "zh").mkdir()
    (tmp_path / "off").mkdir()
    zh = run_pipeline(tmp_path / "zh", whisper_tiny, voices,
                      np.concatenate([silence(0.5), mumble(spoken), silence(1.5)]),
                      PersonaConfig(language="zh"))
    assert [t.answer for t in zh.turns] == ["抱歉，我没听清楚。"]
    off = PersonaConfig(language="en", en=replace(PersonaConfig().en, not_heard=""))
    quiet = run_pipeline(tmp_path / "off", whisper_tiny, voices,
                         np.concatenate([silence(0.5), mumble(spoken), silence(1.5)]), off)
    assert [(t.note, t.answer) for t in quiet.turns] == [("low_confidence", "")]
    assert said(whisper_tiny, tmp_path / "off") == ""


def test_silence_clicks_and_noise_get_no_apology(tmp_path, whisper_tiny, voices):
    rng = np.random.default_rng(0)
    click = np.zeros(RATE // 2, np.int16)
    click[:40] = 20000                                              # too short for the VAD
    knock = (rng.standard_normal(2400) * 8000 * np.exp(-np.arange(2400) / 500)).astype(np.int16)
    pcm = np.concatenate([silence(1.0), click, click, silence(0.5), knock, silence(1.5),
                          white_noise(1.5, level=0.3, seed=3), silence(1.5)])
    pipe = run_pipeline(tmp_path, whisper_tiny, voices, pcm)
    # The clicks and the knock make no utterance; the hiss is long enough to be one, and
    # whisper judges it not speech at all (no-speech probability 0.9): nothing is said.
    assert [(t.note, t.answer) for t in pipe.turns] == [("no_speech", "")], pipe.turns
    assert said(whisper_tiny, tmp_path) == ""
