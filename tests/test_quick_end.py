"""Speech recognition during the end-of-speech pause, and quick endpointing.

Real time matters here (the pass runs in the pause), so the pipeline reads its WAV at
real-time pace; whisper, webrtcvad and piper (for the questions) are real."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from assistant.audio.null_sink import NullSink
from assistant.audio.quick_end import complete
from assistant.audio.wav_source import WavSource
from assistant.config import Config
from assistant.pipeline import Components, Pipeline
from speech_fixtures import write_wav
from doubles import SilentVoices

RATE = 16000


def trimmed(spoken, text):
    pcm = spoken.pcm(text)
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 600)
    return pcm[loud[0]:loud[-1] + 1]


def run(tmp_path, whisper, pcm, **vad):
    cfg = Config()
    cfg = replace(cfg, vad=replace(cfg.vad, **vad), persona=replace(cfg.persona, language="en"))
    parts = Components(source=WavSource(write_wav(tmp_path / "q.wav", pcm, RATE), realtime=True),
                       sink=NullSink(RATE), asr=whisper, voices=SilentVoices(), llm=None)
    pipe = Pipeline(cfg, parts)
    asyncio.run(pipe.run(greet=False))
    return list(pipe.turns)


@pytest.mark.parametrize("text, done", [
    ("What do you see on the table?", True), ("Describe the picture.", True),
    ("What colour is", False), ("What color is?", False), ("What is the name of?", False),
    ("Can you tell me...", False), ("What?", False), ("", False), ("你看到了什么？", True)])
def test_a_finished_sentence(text, done):
    assert complete(text) is done


def test_the_transcript_is_made_during_the_pause(tmp_path, spoken, whisper_tiny):
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), trimmed(spoken, "What is on the left?"),
                          np.zeros(int(1.5 * RATE), np.int16)])
    (turn,) = run(tmp_path, whisper_tiny, pcm)
    assert "left" in turn.transcript.lower()
    # Whisper started in the pause and was done by the time the VAD ended the utterance.
    assert "asr_in_pause_ms" in turn.counts
    assert turn.timings["asr_ms"] < turn.counts["asr_in_pause_ms"]


def test_quick_endpointing_ends_a_finished_question_sooner(tmp_path, spoken, whisper_tiny):
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), trimmed(spoken, "What is on the left?"),
                          np.zeros(int(1.5 * RATE), np.int16)])
    # A long end-of-speech silence, so the quick end (300 ms, once whisper's pass in the
    # pause says the sentence is finished) shows however slow this machine is right now.
    pcm = np.concatenate([pcm, np.zeros(2 * RATE, np.int16)])
    (turn,) = run(tmp_path, whisper_tiny, pcm, quick_end_ms=300, end_silence_ms=2500)
    assert "left" in turn.transcript.lower()
    waited = turn.speech_end - turn.last_word
    assert waited < 2.0             # ended by the finished sentence, not the 2.5 s silence


def test_quick_endpointing_waits_for_an_unfinished_sentence(tmp_path, spoken, whisper_tiny):
    # "What colour is" cannot end a sentence: the person is thinking, not done.
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), trimmed(spoken, "What colour is"),
                          np.zeros(int(0.6 * RATE), np.int16),
                          trimmed(spoken, "the car on the left?"), np.zeros(int(1.5 * RATE), np.int16)])
    turns = run(tmp_path, whisper_tiny, pcm, quick_end_ms=300, end_silence_ms=2500)
    assert len(turns) == 1 and "left" in turns[0].transcript.lower()
