"""The VAD endpointer on real (piper) speech padded with silence and with noise."""

import numpy as np
import pytest

from assistant.audio.vad import Endpointer, SpeechDiscarded, SpeechStarted, Utterance
from assistant.config import VadConfig
from speech_fixtures import add_noise, white_noise

RATE = 16000


def frames(pcm, frame_ms=30):
    n = RATE * frame_ms // 1000
    pad = (-len(pcm)) % n
    pcm = np.concatenate([pcm, np.zeros(pad, np.int16)])
    for i in range(0, len(pcm), n):
        yield pcm[i:i + n].tobytes()


def run(ep, pcm):
    events = []
    for f in frames(pcm, ep.frame_ms):
        events += ep.process(f)
    return events + ep.flush()


def silence(s):
    return np.zeros(int(s * RATE), np.int16)


@pytest.fixture(scope="module")
def question(spoken):
    return spoken.pcm("What do you see on the table?")


def test_one_question_in_silence(question):
    ep = Endpointer(VadConfig())
    pcm = np.concatenate([silence(1.0), question, silence(1.5)])
    events = run(ep, pcm)
    assert [type(e) for e in events] == [SpeechStarted, Utterance]
    started, utt = events
    # Speech starts near 1.0 s (piper leaves a short lead-in); the utterance keeps the pre-roll.
    assert 0.9 <= started.at_s <= 1.4
    assert utt.start_s <= started.at_s - 0.2
    speech_len = len(question) / RATE
    assert speech_len - 0.4 <= utt.duration_s <= speech_len + 0.3 + 0.2 + 0.2
    assert utt.end_s <= 1.0 + speech_len + 0.1
    assert not utt.truncated
    # The first syllable survives: the voiced audio starts after the utterance does.
    first = np.argmax(np.abs(utt.pcm) > 500) / RATE
    assert first >= 0.1


def test_two_questions_make_two_utterances(question):
    ep = Endpointer(VadConfig(end_silence_ms=600))
    pcm = np.concatenate([silence(0.5), question, silence(1.2), question, silence(1.0)])
    events = run(ep, pcm)
    assert [type(e) for e in events] == [SpeechStarted, Utterance, SpeechStarted, Utterance]


def test_a_short_pause_does_not_end_the_utterance(spoken):
    a, b = spoken.pcm("What is this"), spoken.pcm("on the left?")
    ep = Endpointer(VadConfig(end_silence_ms=800))
    events = run(ep, np.concatenate([silence(0.5), a, silence(0.3), b, silence(1.2)]))
    assert [type(e) for e in events] == [SpeechStarted, Utterance]


def test_speech_in_noise(question):
    noisy = add_noise(np.concatenate([silence(1.0), question, silence(1.5)]), snr_db=15, seed=1)
    events = run(Endpointer(VadConfig(aggressiveness=3)), noisy)
    utts = [e for e in events if isinstance(e, Utterance)]
    assert len(utts) == 1
    assert utts[0].voiced_ms >= 500


def test_silence_and_steady_noise_make_no_turn():
    assert run(Endpointer(VadConfig()), silence(3.0)) == []
    noise = white_noise(3.0, level=0.01, seed=2)
    assert not [e for e in run(Endpointer(VadConfig(aggressiveness=3)), noise) if isinstance(e, Utterance)]


def test_a_click_is_discarded():
    click = np.zeros(int(0.15 * RATE), np.int16)
    t = np.arange(len(click)) / RATE
    click[:] = (8000 * np.sin(2 * np.pi * 220 * t) * np.exp(-t * 20)).astype(np.int16)
    ep = Endpointer(VadConfig(min_speech_ms=300, start_ms=30))
    events = run(ep, np.concatenate([silence(0.5), click, silence(1.0)]))
    assert not [e for e in events if isinstance(e, Utterance)]
    if events:  # if the VAD noticed it at all, it was started and then discarded
        assert isinstance(events[0], SpeechStarted) and isinstance(events[-1], SpeechDiscarded)


def test_max_utterance_length_cuts(question):
    ep = Endpointer(VadConfig(max_utterance_s=1.0))
    events = run(ep, np.concatenate([silence(0.3), question, question, silence(1.0)]))
    utts = [e for e in events if isinstance(e, Utterance)]
    assert utts[0].truncated
    assert utts[0].duration_s == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_frame_sizes(question, frame_ms):
    ep = Endpointer(VadConfig(frame_ms=frame_ms))
    events = run(ep, np.concatenate([silence(0.5), question, silence(1.0)]))
    assert [type(e) for e in events] == [SpeechStarted, Utterance]
    with pytest.raises(ValueError):
        ep.process(b"\0" * 10)


def test_reset_forgets_speech_in_progress(question):
    ep = Endpointer(VadConfig())
    events = []
    for f in frames(np.concatenate([silence(0.3), question[: RATE // 2]])):
        events += ep.process(f)
    assert ep.in_speech
    ep.reset()
    assert not ep.in_speech and ep.flush() == []
