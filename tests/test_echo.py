"""Barge-in in a room where the microphone hears the speaker.

``Room`` is a microphone and a speaker sharing the air: whatever the speaker plays comes back
into the microphone, delayed and quieter, mixed with what the person says. Everything else
is real: piper speaks, whisper hears, webrtcvad cuts, the tiny llama.cpp model answers.
Real time is the point (the echo must overlap the answer), so these run at real-time pace.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from assistant.audio.base import SAMPLE_RATE, AudioSink, AudioSource
from assistant.audio.echo import EchoGuard
from assistant.audio.resample import resample
from assistant.audio.tts import VoiceSet
from assistant.config import TtsConfig
from assistant.llm.llamacpp import LlamaCppBackend
from assistant.pipeline import Components, Pipeline
from test_conversation import CFG, LONG, models  # noqa: F401  (the models fixture)

FRAME = SAMPLE_RATE * 30 // 1000


class Room:
    """``stalls``: (at, seconds) of a starved process: the microphone's frames captured
    then reach the loop together when the stall ends (a capture buffer read late), their
    sound that of when they were captured."""

    def __init__(self, person: np.ndarray, echo_gain: float, delay_s: float = 0.08,
                 stalls: tuple = (), stall_at_ends: bool = False):
        self.person = person.astype(np.float32)
        self.gain = echo_gain
        self.delay = delay_s
        self.stalls = list(stalls)
        # Also a stall over the end of each long piece played: its last 0.8 s of sound
        # reach the loop 0.6 s after it ended (after the answer, for the last one).
        self.stall_at_ends = stall_at_ends
        self.t0 = 0.0
        self.timeline: list[tuple[float, np.ndarray]] = []   # (start, 16 kHz float) played
        room = self

        class Mic(AudioSource):
            name = "room-mic"

            async def open(self):
                pass

            async def frames(self):
                t0 = room.t0 = time.monotonic()
                for k in range(len(room.person) // FRAME):
                    due = t0 + (k + 1) * FRAME / SAMPLE_RATE
                    late = max([a + s for a, s in room.stalls if a <= due - t0 < a + s],
                               default=due - t0)
                    await asyncio.sleep(max(0.0, t0 + late - time.monotonic()))
                    frame = room.person[k * FRAME:(k + 1) * FRAME] + room.echo(due)
                    yield np.clip(frame, -32768, 32767).astype(np.int16).tobytes()

        class Speaker(AudioSink):
            name = "room-speaker"
            sample_rate = 22050

            def __init__(self):
                self._stop = asyncio.Event()
                self.seconds = 0.0

            async def open(self):
                pass

            async def play(self, pcm, more=False):
                self._stop.clear()
                start = time.monotonic()
                room.timeline.append((start, resample(pcm, self.sample_rate, SAMPLE_RATE)
                                      .astype(np.float32)))
                length = len(pcm) / self.sample_rate
                if room.stall_at_ends and length > 0.9:
                    room.stalls.append((start + length - 0.8 - room.t0, 1.4))
                try:
                    await asyncio.wait_for(self._stop.wait(), length)
                except asyncio.TimeoutError:
                    pass
                played = min(time.monotonic() - start, length)
                if self._stop.is_set():      # the rest never reached the air
                    t, audio = room.timeline[-1]
                    room.timeline[-1] = (t, audio[:int(played * SAMPLE_RATE)])
                self.seconds += played
                return played

            def stop(self):
                self._stop.set()

        self.mic, self.speaker = Mic(), Speaker()

    def echo(self, until: float) -> np.ndarray:
        """What the speaker put in the air during the frame ending ``delay`` before now."""
        end = until - self.delay
        start = end - FRAME / SAMPLE_RATE
        out = np.zeros(FRAME, np.float32)
        for t, audio in self.timeline:
            a = int(round((t - start) * SAMPLE_RATE))
            lo, hi = max(a, 0), min(a + len(audio), FRAME)
            if lo < hi:
                out[lo:hi] += audio[lo - a:hi - a]
        return out * self.gain


@pytest.fixture
def cpu_hog():
    """A busy machine: one process spinning on each core for the test's length (a board is
    busy too; the guard must not depend on the loop reading the microphone on time)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for p in hogs:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def voices():
    v = VoiceSet(TtsConfig())
    v.load()
    return v


def run_room(spoken, whisper, voices, models, *, stop_at_s=None, echo_match=0.7, gain=0.5,
             stalls=(), stall_at_ends=False, tail_s=12.0):
    q = spoken.pcm("What do you see on the table?")
    parts = [np.zeros(SAMPLE_RATE // 2, np.int16), q, np.zeros(int(tail_s * SAMPLE_RATE), np.int16)]
    person = np.concatenate(parts)
    if stop_at_s is not None:
        stop = spoken.pcm("Stop.")
        at = len(parts[0]) + len(q) + int(stop_at_s * SAMPLE_RATE)
        person = person.copy()
        person[at:at + len(stop)] += stop
    room = Room(person, gain, stalls=stalls, stall_at_ends=stall_at_ends)
    cfg = replace(CFG, audio=replace(CFG.audio, barge_in=True, echo_match=echo_match))
    b = LlamaCppBackend(cfg.llm, cfg.persona, models["long"])
    b.load()
    parts_ = Components(source=room.mic, sink=room.speaker, asr=whisper, voices=voices, llm=b)
    pipe = Pipeline(cfg, parts_)
    try:
        asyncio.run(pipe.run(greet=False))
    finally:
        b.close()
    return pipe, room


def test_its_own_voice_from_the_speaker_cuts_nothing(spoken, whisper_tiny, voices, models,
                                                    cpu_hog):
    pipe, room = run_room(spoken, whisper_tiny, voices, models)
    (turn,) = pipe.turns
    assert not turn.interrupted and turn.answer == LONG
    assert room.speaker.seconds > 6          # the whole answer was played


# A starved process every 1.5 s through the answer and past its end: 0.7 s of the
# microphone's frames each time reach the loop at once, up to 0.7 s after they were captured.
STALLS = tuple((4.0 + 1.5 * k, 0.7) for k in range(7))


def test_its_own_voice_read_late_from_the_microphone_cuts_nothing(spoken, whisper_tiny,
                                                                   voices, models, cpu_hog):
    """A busy CPU (other work on the machine, a board's own load): the microphone's frames
    come in bursts, late. Bugs caught: the guard timing a frame by when it arrived rather
    than by its own sample clock (the echo then lies further back than it looks, and the
    guard takes it for a person: a barge-in on its own voice), and speech heard in a late
    frame captured while the answer played taken for a new question once it ended."""
    pipe, room = run_room(spoken, whisper_tiny, voices, models, stalls=STALLS)
    (turn,) = pipe.turns
    assert not turn.interrupted and turn.answer == LONG
    assert room.speaker.seconds > 6


def test_its_last_words_read_late_from_the_microphone_are_no_question(spoken, whisper_tiny,
                                                                      voices, models, cpu_hog):
    """The process starved as each long piece of speech ends: the answer's last 0.8 s reach
    the loop 0.6 s after it stopped. Bug caught: asking whether the answer plays now, not whether it
    played when the frame was captured (its own last words then make a second turn)."""
    # The microphone goes on past the answer's end (its last frames are the point here).
    pipe, room = run_room(spoken, whisper_tiny, voices, models, stall_at_ends=True, tail_s=18.0)
    (turn,) = pipe.turns
    assert not turn.interrupted and turn.answer == LONG
    assert len(room.stalls) >= 4, room.stalls     # a stall at each long piece's end


def test_without_the_guard_the_echo_would_cut_the_answer(spoken, whisper_tiny, voices, models):
    pipe, _ = run_room(spoken, whisper_tiny, voices, models, echo_match=0.0)
    assert pipe.turns[0].interrupted         # what the guard is there to prevent


def test_a_person_talking_over_the_echo_still_cuts_it(spoken, whisper_tiny, voices, models):
    pipe, _ = run_room(spoken, whisper_tiny, voices, models, stop_at_s=3.5)
    first = pipe.turns[0]
    # Cut where the person spoke: the history keeps only the part played before it.
    assert first.interrupted and len(first.answer) < len(LONG) and LONG.startswith(first.answer)


def test_the_match_tells_echo_from_a_person(spoken):
    speech = spoken.pcm("Let me describe the table.").astype(np.float32)
    other = spoken.pcm("What color is the cup?").astype(np.float32)
    t0 = time.monotonic()
    delay = int(0.1 * SAMPLE_RATE)
    heard = np.zeros(len(speech) + delay, np.float32)
    heard[delay:] += 0.4 * speech

    def feed(signal):
        guard = EchoGuard()
        guard.played(speech, started=t0)
        for k in range(len(signal) // FRAME):
            guard.heard(np.clip(signal[k * FRAME:(k + 1) * FRAME], -32768, 32767)
                        .astype(np.int16).tobytes(), at=t0 + (k + 1) * FRAME / SAMPLE_RATE)
        return guard.match()

    assert feed(heard) > 0.9                                   # the speaker alone
    person = heard.copy()
    # A person over it, as loud as a near talker, in the window the guard looks at.
    voiced = other[np.abs(other) > 500]
    person[-len(voiced):] += 1.5 * voiced[-len(person):]
    assert feed(person) < 0.5
    # Another sentence in the same voice, no echo at all: below the default threshold.
    assert feed(np.concatenate([other, np.zeros(delay, np.float32)])[:len(heard)]) < 0.5


def test_a_person_is_not_taken_for_an_answer_that_has_just_begun(spoken):
    # The answer started playing 0.1 s ago: most lags the guard tries hold nothing played.
    # Those must not count as a match (the FFT's rounding noise over a silent reference).
    person = spoken.pcm("Stop talking please, I have a question.")
    answer = spoken.pcm("I see a wooden table with two red apples.")
    t0 = time.monotonic()
    guard = EchoGuard()
    n = SAMPLE_RATE // FRAME                     # a second of the person talking
    guard.played(answer, started=t0 + n * FRAME / SAMPLE_RATE - 0.1)
    for k in range(n):
        guard.heard(person[k * FRAME:(k + 1) * FRAME].tobytes(),
                    at=t0 + (k + 1) * FRAME / SAMPLE_RATE)
    assert guard.match() < 0.5


def test_the_mic_clock_is_the_sample_clock():
    """Frames that reach the guard late and in bursts are placed where their samples were
    captured (bug caught: their arrival time taken as their time, which puts an echo that
    came back 0.08 s after it was played 0.68 s back, out of the guard's reach)."""
    rng = np.random.default_rng(3)
    answer = (rng.standard_normal(3 * SAMPLE_RATE) * 3000).astype(np.float32)
    t0, delay = 1000.0, int(0.08 * SAMPLE_RATE)
    heard = np.zeros(len(answer), np.float32)
    heard[delay:] = 0.5 * answer[:-delay]
    guard = EchoGuard()
    guard.played(answer, started=t0)
    n = len(heard) // FRAME
    end = t0 + n * FRAME / SAMPLE_RATE
    for k in range(n):
        captured = t0 + (k + 1) * FRAME / SAMPLE_RATE
        # On time for the first second; the rest read all at once, 0.6 s after the last.
        arrived = captured if captured <= t0 + 1.0 else end + 0.6
        guard.heard(heard[k * FRAME:(k + 1) * FRAME].astype(np.int16).tobytes(), at=arrived)
    assert guard.captured_at == pytest.approx(end, abs=1e-6)
    assert guard.match() > 0.9


def test_a_reopened_microphone_starts_its_clock_afresh():
    """Bug caught: the sample clock carried over a microphone that went away and came back:
    the gap holds no samples, so every later frame would be placed seconds too early (and
    the echo of what plays then never found)."""
    guard, t0 = EchoGuard(), 500.0
    silence = np.zeros(FRAME, np.int16).tobytes()
    for k in range(50):
        guard.heard(silence, at=t0 + (k + 1) * FRAME / SAMPLE_RATE)
    guard.new_stream()
    back = t0 + 50 * FRAME / SAMPLE_RATE + 3.0          # 3 s without a microphone
    guard.heard(silence, at=back)
    assert guard.captured_at == pytest.approx(back, abs=1e-6)
