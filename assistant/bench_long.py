"""The bench's ``long_conversation`` scenario: many questions in one conversation, so its
context fills and is compacted, and the scene changes now and then.

A person at a microphone (``TurnTakingMic``: frames at real-time pace) asks ``questions``
questions spoken by piper, one after another. Each answer's wait (last word to first sound)
is measured with every stage at the board's speed; on a board profile the rest of the
answer is then fast-forwarded (simulated NPU stages skipped, piper not run) but goes into
the history whole, and the person listens to it (the answer's length at the voice's speaking rate, from
its first sound) and stays silent ``GAP_S`` more: the model's free time, when
``llm.compact_at`` compaction runs. The camera shows another scene every ``SCENE_EVERY``
questions, ``IDLE_LEAD_S`` before the question (the idle watch on, as in idle_encoded). On a
``CONTEXT``-token context, through the real ``Pipeline`` and ``Conversation``.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import replace
from typing import Callable

import numpy as np

from assistant.audio.base import AudioSource
from assistant.pipeline import Pipeline, make_conversation
from assistant.turn import Turn

QUESTIONS = 60
SCENE_EVERY = 15
CONTEXT = 4096
GAP_S = 1.5              # the person's silence after hearing an answer, before the next question
IDLE_LEAD_S = 5.0        # the same before a question about a new scene (as in idle_encoded)
TEXTS = ("What do you see on the table?", "What color is the mug?", "Is the window open?",
         "What is next to the apple?", "Describe the room for me.",
         "How many things are on the table?")


class TurnTakingMic(AudioSource):
    """Real-time frames: silence, a question, silence. Before each question the person
    listens to the answer (until ``heard_at``, set from its first sound), then stays silent
    ``quiet(i)`` seconds (``before(i)`` is called as that silence starts: the scene may
    change then)."""

    name = "turn-taking-mic"

    def __init__(self, questions: list[np.ndarray], idle: Callable[[], bool],
                 quiet: Callable[[int], float], start: Callable[[int], None],
                 frame_ms: int = 30):
        super().__init__(frame_ms)
        self.questions = questions
        self.idle = idle
        self.quiet = quiet
        self.start = start
        self.heard_at = 0.0            # the answer has been heard by then

    async def open(self) -> None:
        pass

    async def frames(self):
        n = self.frame_samples
        silence = np.zeros(n, np.int16).tobytes()
        step = self.frame_ms / 1000.0
        due = time.monotonic()

        async def paced(frame: bytes):
            nonlocal due
            due += step
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            return frame

        for i, q in enumerate(self.questions + [None]):
            while not self.idle() or time.monotonic() < self.heard_at:
                yield await paced(silence)
            if q is None:
                return
            gap, since = self.quiet(i), time.monotonic()
            while time.monotonic() - since < gap:
                yield await paced(silence)
            self.start(i)
            for k in range(len(q) // n):
                yield await paced(q[k * n:(k + 1) * n].tobytes())


def speaking_rate(voices) -> float:
    """Characters per second of the voice (the time a person listens to an answer)."""
    tts = getattr(voices, "inner", voices).for_language("en")
    text = "I see a wooden table, with a red apple and a blue mug on it."
    return len(text) / (len(tts.synthesize(text)) / tts.sample_rate)


async def run(bench, questions: list[np.ndarray], n: int = QUESTIONS) -> dict:
    """One long conversation through ``bench``'s parts (assistant.bench.Bench); the report."""
    p = bench.parts
    # The idle watch on (the scene changes in the quiet before a question, as in
    # idle_encoded), looking often.
    cfg = replace(bench.cfg, llm=replace(bench.cfg.llm, max_context_len=CONTEXT),
                  vision=replace(bench.cfg.vision, watch=True, watch_interval_s=0.25))
    await bench._locked(p.llm.clear)
    conv = make_conversation(cfg, p)
    bench.camera.show("A")
    fast = bench.clock
    rate = await asyncio.to_thread(speaking_rate, p.voices)

    def normal() -> None:
        fast.stop()
        bench._reset_cuts()
        for s in bench.slows:
            s.skip.clear()

    def quiet(i: int) -> float:
        if i and i % SCENE_EVERY == 0:
            bench.camera.show({"A": "B", "B": "A"}[bench.camera.showing])
        return IDLE_LEAD_S if i % SCENE_EVERY == 0 else GAP_S

    def start(i: int) -> None:
        # Measured from here: every stage at its own (board) speed.
        normal()
        bench.sink.on_sound = first_sound

    def first_sound() -> None:
        # The wait is measured: the rest of the answer at full speed and not synthesised
        # (it still goes into the history whole; the person listens to it, see turn_done).
        fast.start()
        for s in bench.slows:
            s.cancel.set()
            s.skip.set()

    def turn_done(turn: Turn) -> None:
        normal()      # the quiet after the answer at the board's speed (compaction while idle)
        heard = turn.marks.get("first_audio", time.monotonic())
        mic.heard_at = heard + len(turn.answer) / rate

    pipe: Pipeline
    mic = TurnTakingMic([questions[i % len(questions)] for i in range(n)],
                        idle=lambda: pipe.idle(), quiet=quiet, start=start,
                        frame_ms=cfg.vad.frame_ms)
    p.source = mic
    pipe = Pipeline(cfg, p, conversation=conv, on_turn=turn_done)
    t0 = time.monotonic()
    try:
        await pipe.run(greet=False)
    finally:
        normal()
        bench.sink.on_sound = None
    turns = [t for t in pipe.turns if t.intent == "question"]
    return report(turns, conv, n, time.monotonic() - t0)


def report(turns: list[Turn], conv, n: int, took_s: float) -> dict:
    waits = [t.summary().get("last_word_to_first_audio_ms") for t in turns]
    waits = [w for w in waits if w is not None]
    waited = [t.counts["waited_for_idle_compaction_ms"] for t in turns
              if "waited_for_idle_compaction_ms" in t.counts]
    at_question = sum(1 for t in turns if t.compaction is not None)
    stats = {"median": None, "p90": None, "max": None, "runs": []}
    if waits:
        v = sorted(waits)
        stats = {"median": round(statistics.median(v), 1),
                 "p90": round(v[min(len(v) - 1, math.ceil(0.9 * len(v)) - 1)], 1),
                 "max": round(v[-1], 1), "runs": [round(w, 1) for w in waits]}
    # The questions right after a compaction done while idle (their image evaluated then).
    after = [t.summary().get("last_word_to_first_audio_ms") for t in turns
             if "image_evaluated_while_idle" in t.counts or "waited_for_idle_compaction_ms" in t.counts]
    slowest = max(turns, key=lambda t: t.summary().get("last_word_to_first_audio_ms") or 0,
                  default=None)
    return {
        "pipelined": {"last_word_to_first_audio_ms": stats,
                      "scene": sorted({t.scene for t in turns}),
                      "slowest_turn": None if slowest is None else {
                          "question": turns.index(slowest) + 1, "scene": slowest.scene,
                          "compaction": slowest.compaction, "counts": slowest.counts,
                          "timings_ms": slowest.summary()}},
        "questions": n, "answered": len(turns), "scene_every": SCENE_EVERY, "context": CONTEXT,
        "gap_s": GAP_S,
        "compactions": conv.compactions,
        "compactions_while_idle": conv.idle_compactions,
        "compactions_at_question_time": at_question,
        "waited_for_idle_compaction_ms": {"turns": len(waited),
                                          "max": max(waited) if waited else None},
        "after_idle_compaction_ms": [round(w, 1) for w in after if w is not None],
        "took_s": round(took_s, 1),
    }
