"""The wake word, measured: false wakes per hour on speech nobody addressed, missed wakes on
spoken wake words, and the model's CPU share, for each wake word of the pymicro-wakeword
wheel.

The speech is piper's (the packaged en_US-joe-medium voice), as in the tests:
- not addressed: a television-like stream of news, weather, sport, adverts and talk (and
  questions said to somebody else, and words that sound a little like the wake words), at
  three speaking paces with short pauses, at least 2 minutes, clean and again under white
  noise at 15 dB SNR;
- addressed: the wake word alone and followed by a question, at five paces, piper's
  variation off and on, clean and at 10 dB SNR.

Each stream goes through ``WakeWord.heard`` in 30 ms frames, as the microphone's frames do
(offline, so faster than real time). The CPU share is the model's thread CPU time over the
seconds of audio (one core = 100 %); the board figure scales it by whisper's slow-down from
this machine to the board's Cortex-A72 cores in CPU time: the published faster-whisper tiny
real-time factor that assistant/bench_profiles.py uses (0.36 on a Raspberry Pi 400) times
its 4 cores, over whisper tiny.en's CPU seconds per audio second measured here. That
counts the board's whisper as keeping all 4 cores busy, so the board share errs high; it is
a planning figure, not a measurement of a board.

    .venv/bin/python bench/wake.py [--words okay_nabu,hey_jarvis] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from assistant.audio.wake import WakeWord, builtin  # noqa: E402
from assistant.bench_profiles import BOARD_ASR_RTF  # noqa: E402
from assistant.config import WakeConfig  # noqa: E402
from speech_fixtures import _voice, add_noise, resample, to_int16  # noqa: E402
from wake_speech import TV  # noqa: E402

RATE = 16000
FRAME = RATE * 30 // 1000
WORDS = ["okay_nabu", "hey_jarvis", "alexa", "hey_mycroft"]
PACES = (0.85, 1.0, 1.2)
WAKE_PACES = (0.8, 0.9, 1.0, 1.1, 1.25)


WAKE_FOLLOW = "what do you see?"
BOARD_CORES = 4          # the Raspberry Pi 400 (4x Cortex-A72) of the published whisper figure


def speak(text: str, pace: float, vary: bool = False) -> np.ndarray:
    """Piper speech at 16 kHz, int16, at ``pace`` (its length_scale); ``vary``: piper's own
    variation on (noise_scale 0.667, noise_w 0.8), else off (repeatable)."""
    from piper import SynthesisConfig

    voice = _voice()
    noise = (0.667, 0.8) if vary else (0.0, 0.0)
    cfg = SynthesisConfig(noise_scale=noise[0], noise_w_scale=noise[1], length_scale=pace)
    audio = np.concatenate([c.audio_float_array for c in voice.synthesize(text, cfg)])
    return to_int16(resample(audio, voice.config.sample_rate, RATE) * 0.5)


def not_addressed(min_s: float, rng: np.random.Generator) -> np.ndarray:
    """The television: every sentence at each pace, short random pauses, at least min_s."""
    parts: list[np.ndarray] = []
    total = 0
    while total < min_s * RATE:
        for pace in PACES:
            for text in TV:
                pcm = speak(text, pace)
                gap = np.zeros(int(rng.uniform(0.15, 0.8) * RATE), np.int16)
                parts += [pcm, gap]
                total += len(pcm) + len(gap)
    return np.concatenate(parts)


def wake_fixtures(phrase: str) -> list[tuple[str, np.ndarray]]:
    """(label, pcm) of the wake word said, each with a second of silence around it."""
    pad = np.zeros(RATE, np.int16)
    out = []
    for pace in WAKE_PACES:
        for vary in (False, True):
            for text in (f"{phrase}.", f"{phrase}, {WAKE_FOLLOW}"):
                pcm = np.concatenate([pad, speak(text, pace, vary), pad])
                label = f"{text!r} pace {pace} {'varied' if vary else 'plain'}"
                out.append((label, pcm))
                out.append((label + " 10 dB", add_noise(pcm, 10.0, seed=len(out))))
    return out


def feed(word: WakeWord, pcm: np.ndarray) -> tuple[int, float]:
    """(detections, thread CPU seconds) for ``pcm`` in 30 ms frames."""
    data = pcm.astype("<i2").tobytes()
    step = FRAME * 2
    fired = 0
    t0 = time.thread_time()
    for i in range(0, len(data) - step + 1, step):
        fired += word.heard(data[i:i + step])
    return fired, time.thread_time() - t0


def whisper_cpu_rtf() -> float | None:
    """whisper tiny.en's CPU seconds (all its threads) per second of audio here (best of 3,
    an 11 s utterance in its own 30 s window, as the board figure was measured), or None
    without the model. CPU time, not wall time: the wake model's share is CPU time too, and
    neither then depends on how busy this shared machine is."""
    try:
        from assistant.audio.asr import FULL_WINDOW_S, Transcriber
        from assistant.audio.model_paths import resolve_whisper
        from assistant.config import AsrConfig

        cfg = AsrConfig(model="tiny.en")
        asr = Transcriber(cfg, resolve_whisper(cfg))
        asr.load()
    except Exception as e:          # the board figure is left out, with the reason
        print(f"no whisper for the board scale: {e}", file=sys.stderr)
        return None
    pcm = np.concatenate([speak(TV[1], 1.0), speak(TV[2], 1.0), speak(TV[6], 1.0)])[:11 * RATE]
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        asr.transcribe(pcm, window_s=FULL_WINDOW_S)
        best = min(best, (time.process_time() - t0) / (len(pcm) / RATE))
    return best


def measure(name: str, tv: np.ndarray, tv_noisy: np.ndarray) -> dict:
    model = builtin(name)
    word = WakeWord(WakeConfig(word=name))
    word.load()
    false_clean, cpu_clean = feed(word, tv)
    false_noisy, cpu_noisy = feed(word, tv_noisy)
    hours = 2 * len(tv) / RATE / 3600
    missed = []
    fixtures = wake_fixtures(model.phrase)
    for label, pcm in fixtures:
        word = WakeWord(WakeConfig(word=name))   # fresh state: each is its own occasion
        word.load()
        if feed(word, pcm)[0] == 0:
            missed.append(label)
    audio_s = 2 * len(tv) / RATE
    return {
        "word": name, "phrase": model.phrase, "cutoff": model.cutoff,
        "not_addressed_s": round(audio_s, 1),
        "false_wakes": false_clean + false_noisy,
        "false_wakes_clean": false_clean, "false_wakes_noisy": false_noisy,
        "false_wakes_per_hour": round((false_clean + false_noisy) / hours, 2),
        "wake_fixtures": len(fixtures), "missed": len(missed), "missed_which": missed,
        "cpu_share_pct": round(100 * (cpu_clean + cpu_noisy) / audio_s, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--words", default=",".join(WORDS), help="wake words, comma-separated")
    ap.add_argument("--min-s", type=float, default=150.0,
                    help="seconds of not-addressed speech (at least 120)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    rng = np.random.default_rng(7)
    tv = not_addressed(max(120.0, args.min_s), rng)
    tv_noisy = add_noise(tv, 15.0, seed=1)
    rtf = whisper_cpu_rtf()
    # The board's whisper CPU time per audio second, if its real-time factor kept all of the
    # Pi 400's cores busy: an upper bound, so the board share below errs high.
    k = BOARD_ASR_RTF * BOARD_CORES / rtf if rtf else None
    rows = []
    for name in args.words.split(","):
        row = measure(name.strip(), tv, tv_noisy)
        if k:
            row["board_scale"] = round(k, 2)
            row["board_cpu_share_pct"] = round(row["cpu_share_pct"] * k, 2)
        rows.append(row)
    if args.json:
        print(json.dumps({"speech_s": round(len(tv) / RATE, 1), "whisper_cpu_rtf_here": rtf,
                          "board_asr_rtf": BOARD_ASR_RTF, "board_cores": BOARD_CORES,
                          "words": rows}, indent=2))
        return 0
    print(f"not addressed: {len(tv) / RATE:.0f} s of speech, clean and at 15 dB SNR; "
          f"wake fixtures per word: {rows[0]['wake_fixtures'] if rows else 0}")
    print("| wake word | cut-off | false wakes (clean + noisy) | per hour | missed | CPU here | board |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        board = (f"{r['board_cpu_share_pct']:.2f} % (x{r['board_scale']})"
                 if "board_scale" in r else "-")
        print(f"| {r['word']} | {r['cutoff']} | {r['false_wakes_clean']} + "
              f"{r['false_wakes_noisy']} | {r['false_wakes_per_hour']} | "
              f"{r['missed']} / {r['wake_fixtures']} | {r['cpu_share_pct']:.3f} % | {board} |")
        for m in r["missed_which"]:
            print(f"    missed: {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
