"""Soak: the real daemon, spoken to at real-time pace for N turns; does it stay flat?

The assistant is meant to run for weeks. This starts `rkvlm-assistant run` as a process of
its own, on a real sounddevice microphone and speaker (PortAudio over ALSA's `file` plugin,
tests/alsa_support.py), with real whisper, piper, webrtcvad and llama.cpp (tiny generated
models: tests/tiny_models.py, a 512-token context so the conversation is compacted again
and again), the HTTP API on a free loopback port, and a picture camera. Questions spoken by
piper go into the microphone as a person would say them, one after another: each is
said, then the soak waits for its answer (the transcript JSONL, transcript.path, gets its
row), then a short pause, then the next. "Clear." every 50 turns starts a new conversation.

How the microphone keeps time: its capture `infile` is a named pipe (FIFO) that a writer
thread fills at real-time pace (silence between questions; tests/alsa_support.py,
``make_paced_alsa`` / ``PacedMic``). Checked first with a counting signal: the plugin's read
blocks on the empty pipe, so PortAudio receives 16,000 samples a second, each once and in
order, as long as every write is a whole number of the plugin's 960-frame reads and atomic
(<= PIPE_BUF); shorter writes are not waited out (the plugin pads the period with stale
samples), so the writer writes 1920-frame chunks (120 ms).

It reports the daemon's resident memory (VmRSS, /proc/PID/status), open file descriptors
(/proc/PID/fd) and threads (Threads, /proc/PID/status) every --every turns, at turn 100
(the baseline, after warm-up) and at the end, and exits 1 when any of the three grew by
more than 5 % from the baseline to the end (2 when the daemon died or too many questions
went unanswered). Not a test: at real-time pace a turn takes about 3.5 s (1000 turns:
57 min on the development machine).

    .venv/bin/python bench/soak.py --turns 200
    nohup .venv/bin/python bench/soak.py --turns 1000 > /tmp/soak1000.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from alsa_support import make_paced_alsa, portaudio_available  # noqa: E402
from assistant.demo import draw_scene  # noqa: E402
from speech_fixtures import synthesize_pcm  # noqa: E402
from tiny_models import write_mmproj, write_text_model  # noqa: E402

QUESTIONS = ["What do you see on the table?", "What color is the cup?", "Is there a window?",
             "How many apples are there?", "Tell me about the room.", "Is the light on?"]
CLEAR = "Clear."
CLEAR_EVERY = 50
REPLY = "I see a red apple on the wooden table."
RATE = 16000
GROWTH_LIMIT = 0.05

CONFIG = """\
audio:
  input: {{device: fakemic, sample_rate: {rate}}}
  output: {{device: fakespeaker, sample_rate: 22050}}
persona: {{language: en, en: {{greeting: ""}}}}
intent: {{exit_action: idle}}
camera: {{source: scene.jpg}}
transcript: {{path: turns.jsonl, max_bytes: 1000000000}}
http: {{listen: "127.0.0.1:{port}"}}
llm: {{max_context_len: 512, max_new_tokens: 32, llamacpp: {{model: tiny.gguf, mmproj: tiny-mmproj.gguf}}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample(pid: int) -> dict:
    """The process's resident memory (MB), open descriptors and threads, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(fields["Threads"])}


class Rows:
    """The transcript's rows as they are appended."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.rows: list[dict] = []

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return len(self.rows)
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            try:
                self.rows.append(json.loads(line))
            except ValueError:
                pass
        return len(self.rows)


def wait_ready(proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited ({proc.returncode}) while starting:\n"
                             f"{log.read_text()[-3000:]}")
        if "listening (llm" in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise SystemExit(f"the daemon was not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_daemon(proc: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL if it has not exited 30 s later."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fmt(s: dict) -> str:
    return f"rss {s['rss_mb']:7.1f} MB, {s['fds']:3d} fds, {s['threads']:3d} threads"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=200, help="questions to ask (default 200)")
    ap.add_argument("--baseline", type=int, default=100,
                    help="the turn growth is measured from (default 100; half of --turns if "
                         "that is fewer)")
    ap.add_argument("--every", type=int, default=50, help="print the figures every this many turns")
    ap.add_argument("--pause", type=float, default=0.8,
                    help="silence after an answer before the next question, seconds")
    ap.add_argument("--answer-timeout", type=float, default=60.0,
                    help="give up waiting for one answer after this many seconds")
    ap.add_argument("--workdir", help="keep the models, config, transcript and daemon log here "
                                      "(default: a temporary directory, removed at the end)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if not portaudio_available():
        print("soak: needs libportaudio2", file=sys.stderr)
        return 2
    baseline = min(args.baseline, max(1, args.turns // 2))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rkvlm-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return soak(args, baseline, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def soak(args, baseline: int, work: Path) -> int:
    write_text_model(work / "tiny.gguf", scripted_reply=REPLY)
    write_mmproj(work / "tiny-mmproj.gguf")
    draw_scene(work / "scene.jpg")
    (work / "config.yaml").write_text(CONFIG.format(rate=RATE, port=free_port()))
    clips = {q: synthesize_pcm(q, RATE) for q in QUESTIONS + [CLEAR]}
    fake = make_paced_alsa(work, capture_rate=RATE)
    mic = fake.paced_mic()
    log = work / "daemon.log"
    env = fake.env()
    env.pop("NOTIFY_SOCKET", None)
    with open(log, "wb") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "assistant", "--config", "config.yaml", "run"],
                                cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=errf)
    print(f"soak: {args.turns} turns at real-time pace; daemon pid {proc.pid}; work dir {work}",
          flush=True)
    rows = Rows(work / "turns.jsonl")
    figures: dict[int, dict] = {}
    waits: list[float] = []
    missed: list[int] = []
    t_start = time.monotonic()
    code = 0
    try:
        wait_ready(proc, log)
        figures[0] = sample(proc.pid)
        print(f"  ready:      {fmt(figures[0])}", flush=True)
        for i in range(1, args.turns + 1):
            q = CLEAR if i % CLEAR_EVERY == 0 else QUESTIONS[i % len(QUESTIONS)]
            before = rows.poll()
            mic.say(clips[q]).wait()
            said = time.monotonic()
            while rows.poll() <= before:
                if proc.poll() is not None:
                    print(f"soak: the daemon exited ({proc.returncode}) at turn {i}:\n"
                          f"{log.read_text(errors='replace')[-3000:]}", flush=True)
                    return 2
                if time.monotonic() - said > args.answer_timeout:
                    missed.append(i)
                    print(f"  turn {i}: no answer within {args.answer_timeout:.0f} s", flush=True)
                    break
                time.sleep(0.05)
            else:
                waits.append(time.monotonic() - said)
            if i == baseline or i % args.every == 0 or i == args.turns:
                figures[i] = sample(proc.pid)
                print(f"  turn {i:5d}: {fmt(figures[i])}, {time.monotonic() - t_start:7.0f} s",
                      flush=True)
            time.sleep(args.pause)
        rows.poll()
    finally:
        stop_daemon(proc)
        mic.close()
    elapsed = time.monotonic() - t_start
    got = rows.rows
    questions = [r for r in got if r.get("intent") == "question"]
    misheard = [r for r in got if r.get("intent") == "question"
                and not any(r.get("transcript", "").strip().lower().rstrip(".?") ==
                            q.lower().rstrip(".?") for q in QUESTIONS)]
    compactions = [r for r in got if r.get("compaction")]
    answered = [r for r in questions if r.get("answer") == REPLY]
    start, base, end = figures[0], figures[baseline], figures[args.turns]
    growth = {k: (end[k] - base[k]) / base[k] for k in ("rss_mb", "fds", "threads")}
    print(f"\nsoak: {args.turns} turns in {elapsed / 60:.1f} min (daemon exit {proc.returncode}); "
          f"{len(got)} transcript rows, {len(questions)} questions, {len(answered)} answered "
          f"in full, {len(misheard)} heard differently, {len(compactions)} compactions, "
          f"{mic.resyncs} writer resyncs, {len(missed)} unanswered")
    if waits:
        waits.sort()
        print(f"  end of speech to transcript row: median {statistics.median(waits):.2f} s, "
              f"p90 {waits[int(0.9 * (len(waits) - 1))]:.2f} s, max {waits[-1]:.2f} s")
    print(f"  ready:          {fmt(start)}")
    print(f"  turn {baseline:5d}:     {fmt(base)}")
    print(f"  turn {args.turns:5d}:     {fmt(end)}")
    print("  growth from turn {}: rss {:+.2%}, fds {:+.2%}, threads {:+.2%} (limit {:.0%})"
          .format(baseline, growth["rss_mb"], growth["fds"], growth["threads"], GROWTH_LIMIT))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "turns": args.turns, "baseline": baseline, "elapsed_s": elapsed,
            "figures": figures, "growth": growth, "rows": len(got), "questions": len(questions),
            "answered": len(answered), "misheard": len(misheard), "compactions": len(compactions),
            "unanswered": missed, "waits_median_s": statistics.median(waits) if waits else None,
            "daemon_exit": proc.returncode}, indent=2))
    if any(g > GROWTH_LIMIT for g in growth.values()):
        print("soak: FAIL: growth past 5 %")
        code = 1
    if len(missed) > max(1, args.turns // 20):
        print("soak: FAIL: too many questions went unanswered")
        code = code or 2
    return code


if __name__ == "__main__":
    sys.exit(main())
