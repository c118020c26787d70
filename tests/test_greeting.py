"""The line said when the daemon is ready, through the real voice pipeline: with wake.mode word
or phrase it tells the person what to say ("Say Okay Nabu to talk to me"), naming the wake
word or phrase the config really has, in the persona's language; with wake.mode none it is
the greeting of every earlier release.

The voices are the silent double that remembers what was said (the words are the point, not
piper's audio); the wake word model is the real one (the pipeline loads it before it greets).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from assistant.audio.wav_sink import WavSink
from assistant.audio.wav_source import WavSource
from assistant.config import Config, PersonaLines, WakeConfig, parse
from assistant.pipeline import Components, Pipeline
from doubles import SilentVoices
from scripted_llm import ScriptedLLM
from speech_fixtures import write_wav

pytest.importorskip("pymicro_wakeword", reason="the wake word needs pymicro-wakeword")


def greeted(tmp_path, cfg: Config, service: bool = False) -> list[tuple[str, str]]:
    """(language, text) of everything said when half a second of silence is served."""
    wav = write_wav(tmp_path / "quiet.wav", np.zeros(8000, np.int16))
    voices = SilentVoices()
    parts = Components(source=WavSource(wav, frame_ms=cfg.vad.frame_ms),
                       sink=WavSink(tmp_path / "said.wav", voices.sample_rate), asr=None,
                       voices=voices, llm=ScriptedLLM([]))
    cfg = replace(cfg, vision=replace(cfg.vision, encoder="none", watch=False),
                  camera=replace(cfg.camera, source=None))

    async def go():
        try:
            return await Pipeline(cfg, parts, service=service).run(greet=True)
        finally:
            await parts.sink.close()
    assert asyncio.run(go()) == 0
    return voices.said


def config(language="en", **wake) -> Config:
    cfg = Config(wake=WakeConfig(**wake))
    return replace(cfg, persona=replace(cfg.persona, language=language))


def test_wake_off_greets_as_every_earlier_release(tmp_path):
    # Bug caught: the wake line said with wake.mode none (it would tell the person to say a
    # word the assistant does not need).
    assert greeted(tmp_path, config(mode="none")) == [("en", "Hello, I'm listening.")]
    assert greeted(tmp_path, config("zh", mode="none")) == [("zh", "你好，我在听。")]


@pytest.mark.parametrize("word, phrase", [("okay_nabu", "Okay Nabu"),
                                          ("hey_jarvis", "Hey Jarvis")])
def test_the_wake_word_greeting_names_the_configured_word(tmp_path, word, phrase):
    # Bug caught: the greeting ignoring the configured word (a fixed "Okay Nabu", or the old
    # "I'm listening" while the daemon waits for a word nobody was told).
    assert greeted(tmp_path, config(mode="word", word=word)) == [
        ("en", f"Hello. Say {phrase} to talk to me.")]
    assert greeted(tmp_path, config("zh", mode="word", word=word)) == [
        ("zh", f"你好。说“{phrase}”来和我说话。")]


def test_the_phrase_greeting_names_a_phrase_of_its_language(tmp_path):
    # Bug caught: the English line naming the Chinese name (or the other way round), or the
    # default phrases instead of the configured ones.
    wake = dict(mode="phrase", phrases=["computer", "hey computer", "电脑"])
    assert greeted(tmp_path, config(**wake)) == [("en", "Hello. Say computer to talk to me.")]
    assert greeted(tmp_path, config("zh", **wake)) == [("zh", "你好。说“电脑”来和我说话。")]
    # Only English names: the Chinese line says the first one.
    assert greeted(tmp_path, config("zh", mode="phrase", phrases=["jarvis"])) == [
        ("zh", "你好。说“jarvis”来和我说话。")]


def test_auto_greets_for_the_mode_it_becomes(tmp_path):
    # Bug caught: the greeting chosen from wake.mode as written (auto) rather than as decided:
    # the installed service waits for the word, a daemon run by hand does not.
    assert greeted(tmp_path, config(mode="auto"), service=True) == [
        ("en", "Hello. Say Okay Nabu to talk to me.")]
    assert greeted(tmp_path, config(mode="auto"), service=False) == [
        ("en", "Hello, I'm listening.")]


def test_the_wake_line_is_configurable_and_an_empty_greeting_is_silence(tmp_path):
    cfg = parse("persona: {language: en, en: {wake_greeting: 'Call me {wake} first.'}}\n"
                "wake: {mode: word, word: alexa}\n")
    assert greeted(tmp_path, cfg) == [("en", "Call me Alexa first.")]
    # Bug caught: greeting: "" (a person who wants no start-up line) overridden by the wake
    # line when the wake word came in.
    quiet = parse("persona: {language: en, en: {greeting: ''}}\nwake: {mode: word}\n")
    assert greeted(tmp_path, quiet) == []
    assert parse("persona: {en: {wake_greeting: ''}}\nwake: {mode: phrase}\n"
                 ).persona.en.wake_greeting == ""


def test_every_language_has_a_wake_line_with_the_placeholder():
    # Bug caught: a translation without {wake}, which would greet without saying the word.
    for lines in (Config().persona.en, Config().persona.zh):
        assert isinstance(lines, PersonaLines) and "{wake}" in lines.wake_greeting
