"""Quick endpointing, measured: false cuts on questions with a pause inside, and the time won
on questions without one.

Each question is spoken by piper; the pausing ones have a 500 ms pause in the middle (less
than the VAD's 700 ms, piper's own silence trimmed away). They go through the real pipeline (webrtcvad, whisper, the partial
pass) at real-time pace with ``vad.quick_end_ms`` set, and the script counts the questions
that came out as two turns (a false cut) and, for the others, the silence waited after the
last word.

    .venv/bin/python bench/quick_end.py [--quick-end-ms 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from assistant.audio.asr import Transcriber  # noqa: E402
from assistant.audio.model_paths import resolve_whisper  # noqa: E402
from assistant.audio.null_sink import NullSink  # noqa: E402
from assistant.audio.wav_source import WavSource  # noqa: E402
from assistant.config import AsrConfig, Config  # noqa: E402
from assistant.pipeline import Components, Pipeline  # noqa: E402
from speech_fixtures import synthesize_pcm, write_wav  # noqa: E402
from doubles import SilentVoices  # noqa: E402

RATE = 16000
# Questions with a pause inside (the first half alone is not the question), and whole ones;
# bench/endpointing.py speaks all of them, this script the first 8 and 6.
PAUSING = [("What colour is", "the car on the left?"), ("Can you tell me", "what is on the table?"),
           ("How many cups", "are next to the window?"), ("What is the name of", "the book?"),
           ("Is the apple", "red or green?"), ("Where did I put", "my keys?"),
           ("What do you think", "about this picture?"), ("Tell me", "what you see."),
           ("Could you read", "the label on the bottle?"), ("What kind of plant", "is by the door?"),
           ("Is there anything", "on the chair?"), ("How far is the lamp", "from the wall?"),
           ("Which of these", "is the biggest?"), ("What time does", "the clock show?"),
           ("Do you see", "a cat anywhere?"), ("What is written", "on the whiteboard?"),
           ("Can you describe", "the person in the photo?"), ("Why is the light", "blinking like that?"),
           ("Is the door", "open or closed?"), ("What brand is", "the laptop on the desk?"),
           ("How many people", "are in the room?"), ("What should I", "cook with these vegetables?"),
           ("Where is the", "remote control?"), ("Would you say", "the room is tidy?")]
WHOLE = ["What do you see on the table?", "What color is the cup?", "Is there a window?",
         "How many apples are there?", "Describe the picture.", "What is on the left?",
         "What is the weather like outside?", "Is the light on?", "What am I holding?",
         "How many chairs are in the room?", "What is behind me?", "Read the sign for me.",
         "Is the cup full or empty?", "What color is my shirt?", "Where is my phone?",
         "What is on the screen?", "Is anyone else here?", "What is the dog doing?",
         "Tell me what is in the box.", "How does the kitchen look?", "Is the window open?",
         "What fruit is in the bowl?", "Can you see my keys?", "What is the time on the clock?"]


def trimmed(text: str) -> np.ndarray:
    """Piper's speech without its own leading and trailing silence, so the pause between
    the halves is exactly the one put there."""
    pcm = synthesize_pcm(text)
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 600)
    return pcm[loud[0]:loud[-1] + 1] if len(loud) else pcm


def run(pcm: np.ndarray, cfg: Config, asr, d: Path) -> list:
    parts = Components(source=WavSource(write_wav(d / "q.wav", pcm, RATE), realtime=True),
                       sink=NullSink(RATE), asr=asr, voices=SilentVoices(), llm=None)
    pipe = Pipeline(cfg, parts)
    asyncio.run(pipe.run(greet=False))
    return [t for t in pipe.turns if t.intent != "nothing"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick-end-ms", type=int, default=300)
    ap.add_argument("--pause-ms", type=int, default=500, help="the pause inside the pausing questions")
    args = ap.parse_args()
    base = Config()
    cfg = replace(base, vad=replace(base.vad, quick_end_ms=args.quick_end_ms),
                  persona=replace(base.persona, language="en"))
    asr = Transcriber(AsrConfig(), resolve_whisper(AsrConfig(), None))
    asr.load()
    gap = np.zeros(int(args.pause_ms / 1000 * RATE), np.int16)
    lead, tail = np.zeros(RATE // 2, np.int16), np.zeros(int(1.5 * RATE), np.int16)
    cuts, waits, reused, asr_wait = [], [], 0, []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for a, b in PAUSING[:8]:
            turns = run(np.concatenate([lead, trimmed(a), gap, trimmed(b), tail]), cfg, asr, d)
            heard = [t.transcript for t in turns]
            cuts.append(len(turns) > 1)
            print(f"{'CUT ' if len(turns) > 1 else 'ok  '} {a} ... {b}  -> {heard}")
        for q in WHOLE[:6]:
            turns = run(np.concatenate([lead, synthesize_pcm(q), tail]), cfg, asr, d)
            t = turns[0]
            # Silence waited after the last word: the cut came this long after it.
            waits.append((t.speech_end - t.last_word) * 1000)
            reused += "asr_in_pause_ms" in t.counts
            asr_wait.append(t.timings.get("asr_ms", 0.0))
            print(f"whole  {q!r}: cut {waits[-1]:.0f} ms after the last word"
                  f"{', transcript from the pause' if 'asr_in_pause_ms' in t.counts else ''}")
    print(f"\nquick_end_ms {args.quick_end_ms}: {sum(cuts)} of {len(cuts)} pausing questions cut "
          f"short; whole questions ended {statistics.median(waits):.0f} ms after the last word "
          f"(median; the VAD alone waits {base.vad.end_silence_ms} ms), {reused} of {len(waits)} "
          f"with the transcript made during the pause (ASR left to wait for after the cut: "
          f"median {statistics.median(asr_wait):.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
