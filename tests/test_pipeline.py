"""The pipeline's turn logic with real whisper, piper and webrtcvad, and a scripted LLM.

The LLM double (tests/scripted_llm.py) lets these tests steer what the model does (fail,
fill its context, answer slowly) while everything that hears and speaks is real.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from assistant.audio.tts import VoiceSet
from assistant.audio.wav_sink import WavSink
from assistant.audio.wav_source import WavSource, read_wav
from assistant.config import Config, IntentConfig, LlmConfig, TtsConfig
from assistant.errors import DeviceError
from assistant.pipeline import Components, Pipeline
from assistant.vision.base import Camera
from scripted_llm import ScriptedLLM
from doubles import CountingEncoder
from speech_fixtures import hear, write_wav

RATE = 16000


@pytest.fixture(scope="module")
def voices():
    vs = VoiceSet(TtsConfig())
    vs.load()
    return vs


def conversation_wav(tmp_path, spoken, *phrases, gap_s=1.5):
    """One WAV with the phrases spoken one after another, silence between."""
    parts = [np.zeros(int(0.5 * RATE), np.int16)]
    for p in phrases:
        parts += [spoken.pcm(p), np.zeros(int(gap_s * RATE), np.int16)]
    return write_wav(tmp_path / "conversation.wav", np.concatenate(parts), RATE)


class StillCamera(Camera):
    name = "still"

    def __init__(self, fail=False):
        self.fail = fail
        self.opened = 0
        self.shots = 0

    def open(self):
        self.opened += 1

    def snapshot(self):
        self.shots += 1
        if self.fail:
            raise DeviceError("camera /dev/video9 stopped answering: is it still plugged in?")
        return np.full((48, 64, 3), 128, np.uint8)


def make(tmp_path, wav, asr, voices, llm, cfg=None, camera=None, encoder=None, realtime=False,
         sink_realtime=False):
    cfg = cfg or Config()
    cfg = replace(cfg, persona=replace(cfg.persona, language="en"))
    parts = Components(source=WavSource(wav, frame_ms=cfg.vad.frame_ms, realtime=realtime),
                       sink=WavSink(tmp_path / "answer.wav", voices.sample_rate, realtime=sink_realtime),
                       asr=asr, voices=voices, llm=llm, camera=camera, encoder=encoder)
    return Pipeline(cfg, parts), parts


async def drive(pipe, parts, greet=False):
    try:
        return await pipe.run(greet=greet)
    finally:
        await parts.sink.close()


def heard_back(asr, path, gap_s: float = 0.2):
    """What the assistant said in the recording, heard a stretch at a time: it is cut at
    each silence of ``gap_s`` or more (between sentences and answers), because whisper on a
    long multi-sentence recording now and then stops before a last short sentence (seen in
    CI: "A green book." lost after a reset notice)."""
    pcm, rate = read_wav(path)
    from assistant.audio.resample import resample
    pcm = resample(pcm, rate, RATE)
    frame = RATE // 100
    n = len(pcm) // frame
    if n == 0:
        return ""
    level = np.sqrt((pcm[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(axis=1))
    loud = level > max(level.max() * 0.02, 30.0)
    parts, start, quiet = [], None, 0
    for i, on in enumerate(loud):
        if on:
            start = i if start is None else start
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet * 0.01 >= gap_s:
                parts.append((start, i - quiet + 1))
                start, quiet = None, 0
    if start is not None:
        parts.append((start, n))
    heard = [hear(asr, pcm[max(0, a - 10) * frame:(b + 10) * frame]) for a, b in parts
             if b - a >= 15]
    return " ".join(h for h in heard if h)


def test_question_clear_question_exit(tmp_path, spoken, whisper_tiny, voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?", "Clear.",
                           "What color is the cup?", "Exit.")
    llm = ScriptedLLM(["I see a red apple.", "The cup is blue."])
    cam, enc = StillCamera(), CountingEncoder()
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm, camera=cam, encoder=enc)
    code = asyncio.run(drive(pipe, parts))
    assert code == 0
    intents = [t.intent for t in pipe.turns]
    assert intents == ["question", "clear", "question", "exit"]
    assert "table" in pipe.turns[0].transcript.lower()
    assert pipe.turns[0].answer == "I see a red apple."
    assert pipe.turns[2].answer == "The cup is blue."
    # Each question got the image (the clear forgot the one the model held), encoded once in
    # a worker thread, not on the loop: the still camera's scene did not change, so the
    # second question reuses the scene's embedding (scene memory) instead of encoding again.
    assert [c["image"] is not None for c in llm.calls] == [True, True]
    assert enc.calls == 1 and "MainThread" not in enc.threads
    assert all(c["thread"] != "MainThread" for c in llm.calls)
    # clear and exit both forget the conversation.
    assert llm.clears == 2
    # Timings for every stage of a question.
    t0 = pipe.turns[0].summary()
    for key in ("asr_ms", "vision_wait_ms", "encode_ms", "llm_ms", "tts_ms", "first_audio_ms",
                "llm_first_piece_ms"):
        assert key in t0, t0
    # Everything said went to the sink, and it is what whisper hears back.
    said = heard_back(whisper_tiny, tmp_path / "answer.wav")
    assert "apple" in said and "forgotten" in said and "blue" in said and "bye" in said


def test_exit_action_stop_ends_the_run(tmp_path, spoken, whisper_tiny, voices):
    wav = conversation_wav(tmp_path, spoken, "Exit.", "What do you see on the table?")
    cfg = Config(intent=IntentConfig(exit_action="stop"))
    llm = ScriptedLLM()
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm, cfg=cfg)
    assert asyncio.run(drive(pipe, parts)) == 0
    assert [t.intent for t in pipe.turns] == ["exit"]
    assert llm.calls == []


def test_noise_and_silence_start_no_turn(tmp_path, whisper_tiny, voices):
    rng = np.random.default_rng(3)
    pcm = np.concatenate([np.zeros(RATE, np.int16),
                          (rng.standard_normal(RATE * 2) * 300).astype(np.int16),
                          np.zeros(RATE, np.int16)])
    wav = write_wav(tmp_path / "noise.wav", pcm, RATE)
    llm = ScriptedLLM()
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm)
    asyncio.run(drive(pipe, parts))
    assert llm.calls == []
    assert all(t.intent == "nothing" for t in pipe.turns)


def test_backend_error_is_spoken_and_the_loop_goes_on(tmp_path, spoken, whisper_tiny, voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?", "What color is the cup?")
    llm = ScriptedLLM(["unused", "The cup is blue."])
    llm.fail_next = "RKLLM run failed: error -1 from the runtime"
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm)
    asyncio.run(drive(pipe, parts))
    assert [t.intent for t in pipe.turns] == ["question", "question"]
    assert "error -1" in pipe.turns[0].note
    assert pipe.turns[1].answer == "The cup is blue."
    said = heard_back(whisper_tiny, tmp_path / "answer.wav")
    assert "sorry" in said and "blue" in said


@pytest.mark.parametrize("policy", ["compact", "reset", "error"])
def test_full_context_follows_the_policy(tmp_path, spoken, whisper_tiny, voices, policy):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?",
                           "What color is the cup?", "What is on the left?")
    # Compaction at question time (none while idle, llm.compact_at: 0: see
    # test_conversation_idle.py for that).
    cfg = Config(llm=LlmConfig(max_new_tokens=20, on_context_full=policy, compact_at=0))
    llm = ScriptedLLM(["I see an apple on a table and a chair next to it.", "The cup is blue.",
                       "A green book."], context=56)
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm, cfg=cfg)
    asyncio.run(drive(pipe, parts))
    first, second, third = pipe.turns
    assert second.answer == "The cup is blue." and second.compaction is None
    said = heard_back(whisper_tiny, tmp_path / "answer.wav")
    if policy == "compact":
        # The newest exchange that fits is fed back as text; nothing is said about it.
        assert third.answer == "A green book."
        assert third.compaction["kind"] == "compact" and llm.clears == 0
        assert llm.histories == [[(second.transcript, second.answer)]]
        assert third.compaction["tokens_after"] < third.compaction["tokens_before"]
        assert pipe.conversation.first_in_context == 1
    elif policy == "reset":
        assert third.answer == "A green book."
        assert third.compaction["kind"] == "reset" and llm.clears == 1
        assert third.conversation != second.conversation      # a new conversation
        assert "new one" in said and "green" in said
    else:
        assert third.answer == "" and "clear" in third.note and llm.clears == 0
        assert len(llm.calls) == 2
        assert "too long" in said


def test_camera_failure_answers_without_the_image(tmp_path, spoken, whisper_tiny, voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?", "What color is the cup?")
    llm = ScriptedLLM(["I cannot see right now.", "Still blind."])
    cam = StillCamera(fail=True)
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm, camera=cam, encoder=CountingEncoder())
    asyncio.run(drive(pipe, parts))
    assert [t.answer for t in pipe.turns] == ["I cannot see right now.", "Still blind."]
    assert all(c["image"] is None for c in llm.calls)
    assert "plugged in" in pipe.turns[0].note
    assert cam.opened >= 1   # the stage tried to reopen the camera after the failure


def test_missing_llm_speaks_the_reason(tmp_path, spoken, whisper_tiny, voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?")
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, None)
    parts.llm_problem = "llm.llamacpp.model: smolvlm2-256m is not installed: rkvlm-assistant models pull smolvlm2-256m"
    asyncio.run(drive(pipe, parts))
    (turn,) = pipe.turns
    assert turn.intent == "question" and turn.answer == ""
    assert "models pull" in turn.note
    assert "not installed" in heard_back(whisper_tiny, tmp_path / "answer.wav")


def test_first_sentence_is_spoken_before_the_answer_ends(tmp_path, spoken, whisper_tiny, voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?")
    long_answer = ("I see a red apple. " * 3 + "It sits on a wooden table near a window.").strip()
    llm = ScriptedLLM([long_answer], piece_delay=0.05)
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm)
    asyncio.run(drive(pipe, parts))
    (turn,) = pipe.turns
    s = turn.summary()
    # Streaming: audio started while the LLM was still generating.
    assert s["first_audio_ms"] < turn.since_speech_end("done")
    assert turn.marks["first_audio"] < turn.marks["llm_first_piece"] + turn.timings["llm_ms"] / 1000


def test_mic_is_gated_while_speaking(tmp_path, spoken, whisper_tiny, voices):
    """Without barge-in, a question asked over the answer is not heard."""
    q = spoken.pcm("What do you see on the table?")
    # The second question starts right after the first one ends: the answer is playing then.
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), q, np.zeros(int(0.9 * RATE), np.int16),
                          spoken.pcm("What color is the cup?"), np.zeros(RATE, np.int16)])
    wav = write_wav(tmp_path / "overlap.wav", pcm, RATE)
    llm = ScriptedLLM(["Let me describe everything I can see in front of me in great detail. " * 2])
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm, realtime=True, sink_realtime=True)
    asyncio.run(drive(pipe, parts))
    assert [t.intent for t in pipe.turns] == ["question"]


def barged_in_pipeline(tmp_path, spoken, whisper_tiny, voices):
    """A long answer and "Stop." 3.5 s after the question: well into the answer's speech
    (which starts after ASR and the first sentence's synthesis, later on a loaded machine)."""
    q = spoken.pcm("What do you see on the table?")
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), q, np.zeros(int(3.5 * RATE), np.int16),
                          spoken.pcm("Stop."), np.zeros(int(1.5 * RATE), np.int16)])
    wav = write_wav(tmp_path / "barge.wav", pcm, RATE)
    cfg = Config(audio=replace(Config().audio, barge_in=True))
    llm = ScriptedLLM(["Let me describe everything I can see in front of me in great detail. " * 4,
                       "Okay."], piece_delay=0.02)
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm, cfg=cfg, realtime=True,
                       sink_realtime=True)
    return pipe, parts, llm


def test_barge_in_cuts_the_answer(tmp_path, spoken, whisper_tiny, voices):
    pipe, parts, llm = barged_in_pipeline(tmp_path, spoken, whisper_tiny, voices)
    asyncio.run(drive(pipe, parts))
    assert len(pipe.turns) == 2
    first = pipe.turns[0]
    assert first.note == "interrupted by the person speaking" and first.interrupted
    assert parts.sink.seconds_written < 12  # the long answer was cut short
    # The history keeps what the person heard, not what the model wrote: it is fed back
    # before the next question.
    long_answer = llm.answers[0].strip()
    assert first.answer and long_answer.startswith(first.answer) and len(first.answer) < len(long_answer)
    assert llm.histories == [[(first.transcript, first.answer)]]


def test_barge_in_leaves_no_task_behind(tmp_path, spoken, whisper_tiny, voices):
    pipe, parts, _ = barged_in_pipeline(tmp_path, spoken, whisper_tiny, voices)

    async def go():
        await drive(pipe, parts)
        await asyncio.sleep(0.1)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    left = asyncio.run(go())
    assert pipe.turns[0].interrupted
    assert left == []                  # the cut answer's speaking and synthesis are gone


def test_a_cough_while_it_thinks_cuts_nothing(tmp_path, spoken, whisper_tiny, voices):
    """With barge-in, only speech over the answer's sound interrupts it: a person speaking
    while the model is still thinking (3 s before its first word here) does not."""
    q = spoken.pcm("What do you see on the table?")
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), q, np.zeros(int(1.2 * RATE), np.int16),
                          spoken.pcm("Stop."), np.zeros(int(8 * RATE), np.int16)])
    wav = write_wav(tmp_path / "think.wav", pcm, RATE)
    cfg = Config(audio=replace(Config().audio, barge_in=True))
    llm = ScriptedLLM(["I see a red apple.", "Okay."], think_s=3.0)
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm, cfg=cfg, realtime=True,
                       sink_realtime=True)
    asyncio.run(drive(pipe, parts))
    first = pipe.turns[0]
    assert not first.interrupted and first.answer == "I see a red apple."


class FlakyAsr:
    """Real whisper that fails once, like a native library hitting a bad moment."""

    def __init__(self, asr):
        self.asr = asr
        self.failed = False

    def transcribe(self, pcm):
        if not self.failed:
            self.failed = True
            raise RuntimeError("CTranslate2: out of memory")
        return self.asr.transcribe(pcm)


def test_a_failing_turn_does_not_end_the_conversation(tmp_path, spoken, whisper_tiny, voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?", "What color is the cup?")
    llm = ScriptedLLM(["The cup is blue."])
    # The turn's own pass must be the one that fails (a pass made in the pause would
    # absorb the failure: it is retried).
    cfg = Config(vad=replace(Config().vad, transcribe_in_pause=False))
    pipe, parts = make(tmp_path, wav, FlakyAsr(whisper_tiny), voices, llm, cfg=cfg)
    rows = transcribed(pipe, tmp_path)
    asyncio.run(drive(pipe, parts))
    first, second = pipe.turns
    assert "out of memory" in first.note
    assert second.answer == "The cup is blue."
    # The failed turn has its row, saying what failed; the person heard one apology.
    row = rows()[0]
    assert row["intent"] == "unknown" and row["interrupted"] is False
    assert row["note"] == ("speech recognition failed: internal error: RuntimeError: "
                           "CTranslate2: out of memory")
    assert row["answer"] == Config().persona.en.error
    said = heard_back(whisper_tiny, tmp_path / "answer.wav")
    assert said.count("sorry") == 1 and "blue" in said


def transcribed(pipe, tmp_path):
    """Give the pipeline's conversation a real transcript; returns a reader of its rows."""
    from assistant.transcript import TranscriptWriter, read_rows

    writer = pipe.conversation.transcript = TranscriptWriter(tmp_path / "turns.jsonl")

    def rows():
        assert writer.flush(10)
        return list(read_rows(writer.path))
    return rows


class SlowAsr:
    """Real whisper behind a native call that takes longer than deadlines.asr_s once."""

    def __init__(self, asr, seconds):
        self.asr, self.seconds, self.calls = asr, seconds, 0

    def transcribe(self, pcm):
        import time
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.seconds)       # its result is never waited for
            return None
        return self.asr.transcribe(pcm)


def test_speech_recognition_past_its_deadline_gets_a_row(tmp_path, spoken, whisper_tiny, voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?", "What color is the cup?")
    cfg = Config(vad=replace(Config().vad, transcribe_in_pause=False),
                 deadlines=replace(Config().deadlines, asr_s=3.0))
    pipe, parts = make(tmp_path, wav, SlowAsr(whisper_tiny, 5.0), voices,
                       ScriptedLLM(["The cup is blue."]), cfg=cfg)
    rows = transcribed(pipe, tmp_path)
    asyncio.run(drive(pipe, parts))
    first, second = rows()
    assert first["intent"] == "unknown" and "asr stage overran" in first["note"]
    assert "deadlines.asr_s" in first["note"] and first["answer"] == Config().persona.en.error
    assert second["answer"] == "The cup is blue."


class RaisingLLM(ScriptedLLM):
    """A backend that raises what no backend should (a bug, not a BackendError) once."""

    def run_turn(self, text, image, keep_history, on_piece, options=None):
        if not self.calls:
            self.calls.append({"text": text})
            on_piece("Half an")
            raise KeyError("logits")
        return super().run_turn(text, image, keep_history, on_piece, options)


def test_an_unexpected_model_error_is_apologised_for_once(tmp_path, spoken, whisper_tiny, voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?", "What color is the cup?")
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices,
                       RaisingLLM(["unused", "The cup is blue."]))
    rows = transcribed(pipe, tmp_path)
    asyncio.run(drive(pipe, parts))
    first, second = rows()
    assert first["intent"] == "question" and "internal error: KeyError" in first["note"]
    assert first["interrupted"] is False
    assert second["answer"] == "The cup is blue."
    said = heard_back(whisper_tiny, tmp_path / "answer.wav")
    assert said.count("sorry") == 1 and "blue" in said


class FailingSink(WavSink):
    """A WAV sink whose device goes away after ``good`` chunks, for one answer."""

    def __init__(self, path, rate, good):
        super().__init__(path, rate)
        self.good, self.failed = good, 0

    async def play(self, pcm, more=False):
        if self.good == 0 and not self.failed:
            self.failed += 1
            raise DeviceError("speaker:usb: playback failed (device unplugged)")
        self.good -= 1
        return await super().play(pcm, more)


def test_a_failed_speaker_is_noted_not_called_an_interruption(tmp_path, spoken, whisper_tiny,
                                                              voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?", "What color is the cup?")
    llm = ScriptedLLM(["I see a red apple. It is on a wooden table.", "The cup is blue."])
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm)
    parts.sink = pipe.voice.sink = FailingSink(tmp_path / "answer.wav", voices.sample_rate, 1)
    rows = transcribed(pipe, tmp_path)
    asyncio.run(drive(pipe, parts))
    first, second = rows()
    assert first["interrupted"] is False
    assert first["note"].startswith("the speaker failed (speaker:usb: playback failed")
    assert "of the answer was played" in first["note"]
    assert "person speaking" not in first["note"]
    assert first["answer"] == "I see a red apple. It is on a wooden table."   # as written
    assert second["answer"] == "The cup is blue." and not second["note"]


class WedgedSink(WavSink):
    """A speaker whose write never returns (a device wedged in its driver): no exception,
    no deadline, just an await that never ends."""

    async def play(self, pcm, more=False):
        await asyncio.Event().wait()


def test_a_turn_that_makes_no_progress_is_reported_stalled(tmp_path, spoken, whisper_tiny,
                                                          voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?")
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, ScriptedLLM(["I see an apple."]))
    parts.sink = pipe.voice.sink = WedgedSink(tmp_path / "answer.wav", voices.sample_rate)

    async def main():
        run = asyncio.create_task(pipe.run(greet=False))
        assert pipe.stalled(0.5) is None                # nothing in progress yet
        while not pipe.voice.busy:
            await asyncio.sleep(0.05)
        assert pipe.stalled(30) is None
        why = None
        for _ in range(300):       # synthesis may still fill the queue for a moment
            await asyncio.sleep(0.1)
            why = pipe.stalled(0.5)
            if why is not None:
                break
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        return why

    why = asyncio.run(asyncio.wait_for(main(), 120))
    assert why is not None and why.startswith("the turn in progress has shown no progress")
    assert pipe.turns[0].interrupted and "service is stopping" in pipe.turns[0].note


class RecordingVoices:
    """The real voices, noting what each synthesize() call was given."""

    def __init__(self, voices):
        self.voices, self.said = voices, []
        self.sample_rate = voices.sample_rate

    def for_language(self, lang):
        voice = self.voices.for_language(lang)
        outer = self

        class Recorder:
            sample_rate = voice.sample_rate

            def synthesize(self, text):
                outer.said.append(text)
                return voice.synthesize(text)
        return Recorder()


def test_a_long_first_sentence_is_spoken_from_its_first_clause(tmp_path, spoken, whisper_tiny, voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?")
    answer = ("On the wooden table there is a red apple, a blue mug and a small plate. "
              "Behind them, through the window, the sky is clear.")
    rec = RecordingVoices(voices)
    pipe, parts = make(tmp_path, wav, whisper_tiny, rec, ScriptedLLM([answer]))
    asyncio.run(drive(pipe, parts))
    assert rec.said == ["On the wooden table there is a red apple,",
                        "a blue mug and a small plate.",
                        "Behind them, through the window, the sky is clear."]


class ComingBackMic(WavSource):
    """A microphone that is unplugged at first and plugged back a moment later."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.tries = 0

    async def open(self):
        self.tries += 1
        if self.tries == 1:
            raise DeviceError("microphone 'usb mic' not found: is it plugged in?")
        await super().open()


def test_status_says_the_microphone_is_back(tmp_path, spoken, whisper_tiny, voices):
    wav = conversation_wav(tmp_path, spoken, "What do you see on the table?")
    llm = ScriptedLLM(["I see a red apple."])
    pipe, parts = make(tmp_path, wav, whisper_tiny, voices, llm)
    parts.source = ComingBackMic(wav, frame_ms=30)
    sent: list[str] = []
    pipe.notify = sent.append
    asyncio.run(drive(pipe, parts))
    assert pipe.turns[0].answer == "I see a red apple."
    down = next(i for i, m in enumerate(sent) if m.startswith("STATUS=microphone unavailable"))
    assert "STATUS=listening" in sent[down + 1:]       # back to listening once it works
