"""Fault soak: the real daemon answering spoken questions while a client attacks its HTTP API.

The voice side is bench/soak.py's (read it first): `rkvlm-assistant run` as a process of its
own, a microphone fed at real-time pace through ALSA's file plugin (a named pipe), real
whisper, piper and webrtcvad, llama.cpp with the tiny generated models, the transcript as
the record of what was answered. Questions are said one after another; each waits for its
transcript row.

Meanwhile a client on 127.0.0.1 (the daemon's own HTTP port, nothing else) fires the kinds
of bad input issue 17 found, in a loop, one request at a time, bounded in count
(``--max-requests``) and time (``--minutes``):

    bad_json       a chat request whose body is not JSON
    surrogate      a chat message with a lone surrogate ("\\ud800")
    nul_chat       a chat message with a NUL
    nul_speech     /v1/audio/speech of a text with a NUL
    huge_history   a chat request with ``--history-pairs`` earlier exchanges
    odd_wav_rate   /v1/audio/transcriptions of a short WAV announcing an odd sample rate
    hangup         a streamed chat request whose client hangs up after the first bytes
    slow_headers   a connection that sends its headers a byte at a time (its own thread;
                   at most ``--slow-connections`` open at once, each given up after
                   ``--slow-hold`` seconds)

Beside them, bench/wyoming_attacks.py's three threads attack the daemon's Wyoming port
(issue 24), each attack bounded in time, all of them in count (``--max-wyoming``): 16 MB
audio chunks announced as 1000 Hz and 8 kHz 8-bit, 32 MB of audio queued behind a long
``synthesize`` without reading, 10,000 unpunctuated characters to ``synthesize`` (listened
to for ``--wyoming-read`` s) and 4,096 to HTTP speech; 32 idle connections, 4 audio streams
that never stop and a client that never reads its audio (each held ``--wyoming-hold`` s,
with a ``describe`` beside them); ``--conversation-turns`` ``handle`` turns with one
conversation id, then "Clear.". Each attack's outcomes are counted and printed.

It reports the voice questions asked and answered, whether every transcript line is a valid
(strict) JSON row, the daemon's resident memory growth from the baseline (after the first
``--warmup`` minutes) to the end and its peak (VmHWM), the longest gap between the daemon's
watchdog pings (the soak is its NOTIFY_SOCKET, WATCHDOG_USEC 2 s: a ping a second from the
event loop), the number of 5xx responses, and every kind's response codes ("closed": the
server closed the connection, "timeout": no answer within ``--timeout`` s). The baseline
waits for the daemon's warm-up (its memory grows for the first hundred turns or so, see
README); an hour's run gives the figure that counts. Exit code 0 when every voice question
was answered, every row is valid, RSS grew less than 5 %, the peak stayed under 1.5 GB, no
watchdog gap passed 10 s and no request got a 5xx; 1 otherwise; 2 when the daemon died.

    .venv/bin/python bench/fault_soak.py --minutes 5
    .venv/bin/python bench/fault_soak.py --minutes 60 --json /tmp/fault_soak.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import (CLEAR, CONFIG, QUESTIONS, RATE, REPLY, Rows, free_port,  # noqa: E402
                  sample, stop_daemon, wait_ready)
from alsa_support import make_paced_alsa, portaudio_available  # noqa: E402
from assistant.demo import draw_scene  # noqa: E402
from speech_fixtures import synthesize_pcm  # noqa: E402
from tiny_models import write_mmproj, write_text_model  # noqa: E402
from http_attacks import Attacker  # noqa: E402
from wyoming_attacks import Watchdog, WyomingAttacks, peak_rss_mb  # noqa: E402

GROWTH_LIMIT = 0.05
WATCHDOG_S = 1.0            # the daemon pings every second (WATCHDOG_USEC = 2 s)
GAP_LIMIT_S = 10.0          # the longest gap between two pings that is still clean
PEAK_LIMIT_MB = 1500.0      # the daemon's peak resident memory (VmHWM)
WYOMING = """\
wyoming: {{enabled: true, uri: "tcp://127.0.0.1:{port}"}}
"""


# --------------------------------------------------------------------------- the transcript

def check_rows(path: Path) -> tuple[list[dict], int]:
    """Every row of the transcript (strict JSON objects), and the count of invalid lines."""
    def refuse(name):
        raise ValueError(name)
    rows, bad = [], 0
    if not path.exists():
        return rows, bad
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        try:
            row = json.loads(line.decode("utf-8"), parse_constant=refuse)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            rows.append(row)
        except ValueError:
            bad += 1
    return rows, bad


class VoiceRows(Rows):
    """The transcript's voice rows as they are appended (read on from where it stopped)."""

    def voice(self) -> list[dict]:
        self.poll()
        return [r for r in self.rows if r.get("source") in (None, "voice")]


# --------------------------------------------------------------------------- the soak

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="how long (default 5)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="minutes before the memory baseline is taken (default: a quarter "
                         "of --minutes, at most 10)")
    ap.add_argument("--max-requests", type=int, default=100_000,
                    help="at most this many bad requests (default 100000)")
    ap.add_argument("--interval", type=float, default=0.2,
                    help="seconds between two bad requests (default 0.2)")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="give up on one response after this many seconds (default 30)")
    ap.add_argument("--history-pairs", type=int, default=5000,
                    help="earlier exchanges in a huge_history request (default 5000)")
    ap.add_argument("--wav-rates", default="470001,7919,1,192000",
                    help="sample rates the odd WAVs announce, in turn")
    ap.add_argument("--slow-connections", type=int, default=20,
                    help="slow-header connections open at once, at most (default 20)")
    ap.add_argument("--slow-hold", type=float, default=30.0,
                    help="a slow-header connection is given up after this many seconds")
    ap.add_argument("--answer-timeout", type=float, default=90.0,
                    help="give up waiting for one spoken answer after this many seconds")
    ap.add_argument("--wyoming-hold", type=float, default=20.0,
                    help="seconds the idle, endless and unread Wyoming connections are held")
    ap.add_argument("--wyoming-read", type=float, default=45.0,
                    help="seconds an unpunctuated Wyoming synthesize is listened to")
    ap.add_argument("--conversation-turns", type=int, default=40,
                    help="Wyoming handle turns with one conversation id before \"Clear.\"")
    ap.add_argument("--max-wyoming", type=int, default=1000,
                    help="at most this many Wyoming attacks (default 1000)")
    ap.add_argument("--wyoming-skip", default="",
                    help="Wyoming attacks left out, by name, comma-separated (e.g. "
                         "low_rate_1000,low_rate_8000)")
    ap.add_argument("--workdir", help="keep the models, config, transcript and daemon log here "
                                      "(default: a temporary directory, removed at the end)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.warmup is None:
        args.warmup = min(10.0, args.minutes / 4)
    if not portaudio_available():
        print("fault_soak: needs libportaudio2", file=sys.stderr)
        return 2
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rkvlm-fsoak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return soak(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def soak(args, work: Path) -> int:
    write_text_model(work / "tiny.gguf", scripted_reply=REPLY)
    write_mmproj(work / "tiny-mmproj.gguf")
    draw_scene(work / "scene.jpg")
    port, wport = free_port(), free_port()
    (work / "config.yaml").write_text(CONFIG.format(rate=RATE, port=port) + WYOMING.format(
        port=wport))
    clips = {q: synthesize_pcm(q, RATE) for q in QUESTIONS + [CLEAR]}
    fake = make_paced_alsa(work, capture_rate=RATE)
    mic = fake.paced_mic()
    log = work / "daemon.log"
    transcript = work / "turns.jsonl"
    env = fake.env()
    watchdog = Watchdog(work / "notify.sock")
    env.update(NOTIFY_SOCKET=watchdog.path, WATCHDOG_USEC=str(int(WATCHDOG_S * 2e6)))
    with open(log, "wb") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "assistant", "--config", "config.yaml",
                                 "run"], cwd=work, env=env, stdout=subprocess.DEVNULL,
                                stderr=errf)
    print(f"fault soak: {args.minutes:g} min; daemon pid {proc.pid}, http 127.0.0.1:{port}; "
          f"work dir {work}", flush=True)
    stop = threading.Event()
    attacker = Attacker(port, args, stop)
    wyoming = WyomingAttacks(wport, port, stop, max_attacks=args.max_wyoming,
                             hold_s=args.wyoming_hold, read_s=args.wyoming_read,
                             conversation_turns=args.conversation_turns,
                             skip=tuple(filter(None, args.wyoming_skip.split(","))))
    reader = VoiceRows(transcript)
    asked = answered = 0
    missed: list[int] = []
    base = end = peak = silent = None
    died = None
    t_start = time.monotonic()
    try:
        wait_ready(proc, log)
        ready = sample(proc.pid)
        attack = threading.Thread(target=attacker.run, name="attacker", daemon=True)
        attack.start()
        wyoming.start()
        deadline = t_start + args.minutes * 60
        while time.monotonic() < deadline:
            if base is None and time.monotonic() - t_start >= args.warmup * 60:
                base = sample(proc.pid)
            asked += 1
            q = CLEAR if asked % 50 == 0 else QUESTIONS[asked % len(QUESTIONS)]
            before = len(reader.voice())
            mic.say(clips[q]).wait()
            said = time.monotonic()
            while len(reader.voice()) <= before:
                if proc.poll() is not None:
                    died = proc.returncode
                    break
                if time.monotonic() - said > args.answer_timeout:
                    missed.append(asked)
                    print(f"  question {asked}: no answer within {args.answer_timeout:.0f} s",
                          flush=True)
                    break
                time.sleep(0.1)
            else:
                answered += 1
            if died is not None:
                print(f"fault soak: the daemon exited ({died}) at question {asked}:\n"
                      f"{log.read_text(errors='replace')[-3000:]}", flush=True)
                break
            if asked % 10 == 0:
                s = sample(proc.pid)
                print(f"  {time.monotonic() - t_start:6.0f} s: {asked} asked, {answered} "
                      f"answered, {attacker.sent} bad requests, {attacker.server_errors} 5xx, "
                      f"rss {s['rss_mb']:.1f} MB", flush=True)
            time.sleep(0.8)
        if died is None:
            end = sample(proc.pid)
            peak = peak_rss_mb(proc.pid)
            silent = time.monotonic() - (watchdog.last or t_start)
    finally:
        stop.set()
        stop_daemon(proc)
        mic.close()
        watchdog.close()
    elapsed = time.monotonic() - t_start
    rows, bad_lines = check_rows(transcript)
    voice = [r for r in rows if r.get("source") in (None, "voice")]
    in_full = sum(1 for r in voice if r.get("intent") == "question" and r.get("answer") == REPLY)
    base = base or ready
    growth = (end["rss_mb"] - base["rss_mb"]) / base["rss_mb"] if end else None
    codes = {k: dict(sorted(c.items())) for k, c in attacker.codes.items()}
    print(f"\nfault soak: {elapsed / 60:.1f} min, daemon exit {proc.returncode}")
    print(f"  voice: {asked} questions asked, {answered} answered ({in_full} questions answered "
          f"in full), {len(missed)} unanswered")
    print(f"  transcript: {len(rows)} rows ({len(voice)} voice), {bad_lines} invalid lines")
    print(f"  rss: ready {ready['rss_mb']:.1f} MB, baseline {base['rss_mb']:.1f} MB, end "
          + (f"{end['rss_mb']:.1f} MB, growth {growth:+.2%} (limit {GROWTH_LIMIT:.0%})"
             if end else "- (the daemon died)"))
    print(f"  bad requests: {attacker.sent} (+ {sum(attacker.codes['slow_headers'].values())} "
          f"slow-header connections), {attacker.server_errors} 5xx")
    for kind, c in codes.items():
        print(f"    {kind:13s} " + ", ".join(f"{code}: {n}" for code, n in c.items()))
    gap = max(watchdog.longest, silent or 0.0)
    outcomes = {k: dict(c) for k, c in sorted(wyoming.outcomes.items())}
    print(f"  wyoming attacks: {wyoming.sent}, {wyoming.server_errors} 5xx (HTTP speech)")
    for kind, c in outcomes.items():
        print(f"    {kind}:")
        for what, n in sorted(c.items(), key=lambda x: -x[1]):
            print(f"      {n:4d} x {what}")
    print(f"  watchdog: {watchdog.pings} pings, longest gap {gap:.1f} s (limit {GAP_LIMIT_S:g})")
    print("  peak rss (VmHWM): " + (f"{peak:.0f} MB (limit {PEAK_LIMIT_MB:g})" if peak
                                    else "-"))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "minutes": elapsed / 60, "daemon_exit": proc.returncode, "asked": asked,
            "answered": answered, "answered_in_full": in_full, "unanswered": missed, "rows": len(rows),
            "voice_rows": len(voice), "invalid_lines": bad_lines, "rss_ready": ready,
            "rss_baseline": base, "rss_end": end, "rss_growth": growth,
            "bad_requests": attacker.sent, "server_errors": attacker.server_errors,
            "codes": codes, "wyoming_attacks": wyoming.sent, "wyoming": outcomes,
            "wyoming_server_errors": wyoming.server_errors, "watchdog_pings": watchdog.pings,
            "watchdog_longest_gap_s": gap, "peak_rss_mb": peak}, indent=2))
    if died is not None:
        return 2
    clean = (not missed and answered == asked and bad_lines == 0
             and growth is not None and growth < GROWTH_LIMIT and attacker.server_errors == 0
             and wyoming.server_errors == 0 and gap <= GAP_LIMIT_S and watchdog.pings > 0
             and peak is not None and peak < PEAK_LIMIT_MB)
    print("fault soak: " + ("clean" if clean else "NOT clean"))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
