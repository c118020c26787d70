"""Speech recognition with real whisper models on speech made by piper."""

from __future__ import annotations

import difflib
import logging

import numpy as np
import pytest

from assistant.audio.asr import FULL_WINDOW_S, Transcriber, judge, normalise, window_frames
from assistant.config import AsrConfig
from assistant.errors import AssistantError, ModelMissingError
from speech_fixtures import add_noise, white_noise

QUESTIONS = ["What do you see?", "What color is the cup on the table?", "clear", "goodbye"]


def similar(heard: str, said: str) -> float:
    return difflib.SequenceMatcher(None, normalise(heard), normalise(said)).ratio()


# --------------------------------------------------------------------------- hearing speech

@pytest.mark.parametrize("phrase", QUESTIONS)
def test_tiny_en_hears_spoken_phrases(whisper_tiny, spoken, phrase):
    utterance = spoken.utterance(phrase)
    t = whisper_tiny.transcribe(utterance)
    assert t.accepted, t
    assert t.reason == "ok"
    assert similar(t.text, phrase) >= 0.85, t.text
    assert t.language == "en"
    assert t.audio_s == pytest.approx(len(utterance) / 16000)
    assert t.elapsed_s > 0
    assert 0.0 <= t.no_speech_prob <= 1.0 and t.avg_logprob <= 0.0


def test_tiny_en_hears_a_question_through_noise(whisper_tiny, spoken):
    phrase = "What color is the cup on the table?"
    t = whisper_tiny.transcribe(add_noise(spoken.utterance(phrase), snr_db=15, seed=3))
    assert t.accepted, t
    assert similar(t.text, phrase) >= 0.85, t.text


def test_base_detects_english_and_hears_the_question(whisper_base, spoken):
    assert whisper_base.multilingual
    phrase = "What color is the cup on the table?"
    t = whisper_base.transcribe(spoken.utterance(phrase))
    assert t.accepted, t
    assert t.language == "en"
    assert t.language_prob > 0.5
    assert similar(t.text, phrase) >= 0.85, t.text


def test_a_clearly_spoken_thank_you_is_kept(whisper_tiny, spoken):
    t = whisper_tiny.transcribe(spoken.utterance("Thank you."))
    assert normalise(t.text) == "thankyou"
    assert t.accepted, t


def test_float_audio_is_accepted_too(whisper_tiny, spoken):
    pcm = spoken.utterance("goodbye")
    t = whisper_tiny.transcribe(pcm.astype(np.float32) / 32768.0)
    assert t.accepted and normalise(t.text) == "goodbye"


# --------------------------------------------------------------------------- the encoder window

def test_the_window_is_the_utterance_plus_its_margin():
    assert window_frames(2.5, 10.0) == 1000           # a short question: the floor
    assert window_frames(11.2, 10.0) == 1320          # a long one: its length plus 2 s
    assert window_frames(28.5, 10.0) is None          # no shorter than whisper's own
    assert window_frames(2.5, 30.0) is None           # asr.window_s: 30 keeps whisper's


def test_a_short_question_is_read_in_a_short_window_with_the_same_words(whisper_tiny, spoken):
    utterance = spoken.utterance("What do you see on the table?")
    short = whisper_tiny.transcribe(utterance)
    full = whisper_tiny.transcribe(utterance, window_s=FULL_WINDOW_S)
    assert short.window_s == 10.0 and full.window_s == FULL_WINDOW_S
    assert short.accepted and normalise(short.text) == normalise(full.text) == "whatdoyouseeonthetable"


def test_a_long_utterance_gets_a_window_that_holds_it(whisper_tiny, spoken):
    said = ["Can you tell me how many people are standing near the window right now?",
            "Which of these two books would you recommend to a child?",
            "And what is written on the sign above the door?"]
    utterance = np.concatenate([spoken.utterance(s) for s in said])      # about 13 s
    t = whisper_tiny.transcribe(utterance)
    assert t.window_s > 10 and t.window_s == pytest.approx(len(utterance) / 16000 + 2, abs=0.011)
    # To the end: nothing was cut off with the window.
    assert similar(t.text, " ".join(said)) >= 0.85, t.text


def test_a_phrase_said_twice_is_read_again_in_the_full_window(whisper_tiny, spoken, caplog):
    # A cut window sometimes makes whisper say a phrase over and over; a transcript that is
    # one phrase repeated is checked in whisper's own window (here the person did say it).
    caplog.set_level(logging.INFO, logger="assistant.audio.asr")
    t = whisper_tiny.transcribe(spoken.utterance("Bye bye."))
    assert normalise(t.text) == "byebye" and t.accepted
    assert t.window_s == FULL_WINDOW_S
    assert "repeated itself in a 10.0 s window" in caplog.text


# --------------------------------------------------------------------------- not speech

def not_speech(t) -> None:
    assert not t.accepted, t
    assert t.reason in {"empty", "no_speech", "low_confidence", "hallucination", "repetitive"}


@pytest.mark.parametrize("model", ["whisper_tiny", "whisper_base"])
def test_silence_does_not_start_a_turn(model, request):
    t = request.getfixturevalue(model).transcribe(np.zeros(2 * 16000, np.int16))
    not_speech(t)


@pytest.mark.parametrize("model", ["whisper_tiny", "whisper_base"])
@pytest.mark.parametrize("level", [0.005, 0.1])
def test_white_noise_does_not_start_a_turn(model, level, request):
    t = request.getfixturevalue(model).transcribe(white_noise(2.0, level=level, seed=7))
    not_speech(t)


def _other_sounds() -> dict[str, np.ndarray]:
    t = np.arange(2 * 16000) / 16000
    rng = np.random.default_rng(0)
    burst = rng.standard_normal(4000) * 0.3 * np.exp(-np.arange(4000) / 800)  # a cough, a knock
    return {
        "mains hum": 0.2 * np.sin(2 * np.pi * 50 * t) + 0.1 * np.sin(2 * np.pi * 150 * t),
        "beeps": 0.3 * np.sin(2 * np.pi * 1000 * t) * (t % 0.5 < 0.2),
        "burst": np.concatenate([burst, np.zeros(len(t) - len(burst))]),
    }


@pytest.mark.parametrize("sound", ["mains hum", "beeps", "burst"])
def test_other_sounds_do_not_start_a_turn(whisper_tiny, sound):
    pcm = np.round(_other_sounds()[sound] * 32767).astype(np.int16)
    not_speech(whisper_tiny.transcribe(pcm))


def test_a_rejected_transcript_is_logged_with_its_figures(whisper_tiny, caplog):
    with caplog.at_level(logging.INFO, logger="assistant.audio.asr"):
        t = whisper_tiny.transcribe(white_noise(1.0, level=0.1, seed=1))
    assert not t.accepted
    line = [r.getMessage() for r in caplog.records if r.name == "assistant.audio.asr"][-1]
    assert line.startswith(f"asr {t.reason} ") and "no_speech=" in line and "logprob=" in line


# --------------------------------------------------------------------------- the verdict rules

CFG = AsrConfig()


@pytest.mark.parametrize("text,nsp,lp,cr,reason", [
    ("What do you see?", 0.05, -0.1, 1.0, "ok"),
    (" .", 0.95, -1.3, 0.1, "empty"),
    ("", 0.1, -0.1, 0.0, "empty"),
    ("What do you see?", 0.9, -0.1, 1.0, "no_speech"),
    ("What do you see?", 0.1, -1.4, 1.0, "low_confidence"),
    ("you you you you you you you you", 0.1, -0.2, 3.1, "repetitive"),
    ("you", 0.45, -0.9, 0.3, "hallucination"),        # what noise turns into
    ("Thanks for watching!", 0.5, -0.4, 0.7, "hallucination"),
    ("字幕由Amara.org社区提供", 0.4, -0.3, 0.8, "hallucination"),
    ("请不吝点赞 订阅 转发 打赏支持明镜与点点栏目", 0.2, -0.7, 0.8, "hallucination"),
    ("Thank you.", 0.08, -0.12, 0.6, "ok"),           # clearly spoken: kept
    ("goodbye", 0.36, -0.53, 0.5, "ok"),              # a short command, not on the list
])
def test_judge(text, nsp, lp, cr, reason):
    assert judge(text, nsp, lp, cr, CFG) == reason


def test_thresholds_come_from_the_config():
    strict = AsrConfig(no_speech_threshold=0.3, logprob_threshold=-0.5)
    assert judge("goodbye", 0.36, -0.4, 0.5, strict) == "no_speech"
    assert judge("goodbye", 0.2, -0.6, 0.5, strict) == "low_confidence"


# --------------------------------------------------------------------------- bad input

def test_a_missing_model_dir_names_asr_model(tmp_path):
    t = Transcriber(AsrConfig(model=str(tmp_path / "nope")), tmp_path / "nope")
    with pytest.raises(ModelMissingError, match=r"^asr\.model: no whisper model\.bin in "):
        t.load()


def test_a_corrupt_model_names_asr_model(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"not a model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelMissingError, match=r"^asr\.model: cannot load the whisper model"):
        Transcriber(AsrConfig(model=str(tmp_path)), tmp_path).load()


def test_empty_audio_is_refused(whisper_tiny):
    with pytest.raises(AssistantError, match="empty audio"):
        whisper_tiny.transcribe(np.zeros(0, np.int16))


def test_stereo_audio_is_refused(whisper_tiny):
    with pytest.raises(AssistantError, match="mono"):
        whisper_tiny.transcribe(np.zeros((1600, 2), np.int16))


def test_transcribe_before_load_says_so(tmp_path):
    with pytest.raises(AssistantError, match="load"):
        Transcriber(AsrConfig(), tmp_path).transcribe(np.zeros(1600, np.int16))


@pytest.mark.parametrize("heard", ["Thank you.", "thank you!", "Thanks for watching.", "谢谢观看。"])
def test_known_phrases_match_whatever_the_punctuation(heard):
    assert judge(heard, 0.6 - 0.05, -0.8, 0.5, CFG) == "hallucination"


def test_chinese_with_an_english_only_model_is_refused(tmp_path):
    from assistant.audio.asr import check_language

    with pytest.raises(AssistantError, match=r"asr\.language is zh .* English-only"):
        check_language(AsrConfig(language="zh"), False, tmp_path)
    check_language(AsrConfig(language="zh"), True, tmp_path)  # multilingual: fine
    check_language(AsrConfig(language="auto"), False, tmp_path)  # .en model: English


@pytest.mark.parametrize("probs,expected", [
    ([("de", 0.6), ("en", 0.1), ("zh", 0.05)], ("en", 0.1)),   # accented English
    ([("nn", 0.5), ("en", 0.15), ("yue", 0.2), ("zh", 0.1)], ("zh", 0.3)),  # Cantonese counts
    ([("zh", 0.9), ("en", 0.05)], ("zh", 0.9)),
])
def test_auto_language_chooses_between_english_and_chinese(tmp_path, probs, expected):
    from types import SimpleNamespace

    t = Transcriber(AsrConfig(language="auto"), tmp_path)
    t._model = SimpleNamespace(model=SimpleNamespace(is_multilingual=True),
                               detect_language=lambda audio: (probs[0][0], probs[0][1], probs))
    lang, p = t._language(np.zeros(16000, np.float32))
    assert lang == expected[0] and p == pytest.approx(expected[1])
