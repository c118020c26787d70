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

It reports the voice questions asked and answered, whether every transcript line is a valid
(strict) JSON row, the daemon's resident memory growth from the baseline (after the first
``--warmup`` minutes) to the end, the number of 5xx responses, and every kind's response
codes ("closed": the server closed the connection, "timeout": no answer within
``--timeout`` s). The baseline waits for the daemon's warm-up (its memory grows for the
first hundred turns or so, see README); an hour's run gives the figure that counts. Exit code 0 when every voice question was answered, every row is valid,
RSS grew less than 5 % and no request got a 5xx; 1 otherwise; 2 when the daemon died.

    .venv/bin/python bench/fault_soak.py --minutes 5
    .venv/bin/python bench/fault_soak.py --minutes 60 --json /tmp/fault_soak.json
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import wave
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import (CLEAR, CONFIG, QUESTIONS, RATE, REPLY, Rows, free_port,  # noqa: E402
                  sample, stop_daemon, wait_ready)
from alsa_support import make_paced_alsa, portaudio_available  # noqa: E402
from assistant.demo import draw_scene  # noqa: E402
from speech_fixtures import synthesize_pcm  # noqa: E402
from tiny_models import write_mmproj, write_text_model  # noqa: E402

GROWTH_LIMIT = 0.05
KINDS = ("bad_json", "surrogate", "nul_chat", "nul_speech", "huge_history", "odd_wav_rate",
         "hangup")


# --------------------------------------------------------------------------- the attacker

class Attacker:
    """Fires the bad requests in a loop on 127.0.0.1:port and counts the answers."""

    def __init__(self, port: int, args, stop: threading.Event):
        self.port = port
        self.args = args
        self.stop = stop
        self.codes: dict[str, collections.Counter] = {k: collections.Counter()
                                                      for k in KINDS + ("slow_headers",)}
        self.sent = 0
        self._lock = threading.Lock()
        self._slow = threading.Semaphore(args.slow_connections)
        self.rates = [int(r) for r in args.wav_rates.split(",")]

    def record(self, kind: str, code) -> None:
        with self._lock:
            self.codes[kind][str(code)] += 1

    @property
    def server_errors(self) -> int:
        return sum(n for c in self.codes.values() for code, n in c.items()
                   if code.isdigit() and int(code) >= 500)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set() and self.sent < self.args.max_requests:
            kind = KINDS[i % len(KINDS)]
            i += 1
            if i % len(KINDS) == 1 and self._slow.acquire(blocking=False):
                threading.Thread(target=self._slow_headers, daemon=True).start()
            try:
                code = getattr(self, kind)()
            except socket.timeout:
                code = "timeout"
            except ConnectionError:
                code = "closed"
            except Exception as e:      # whatever it is, the loop goes on and says so
                code = f"error:{type(e).__name__}"
            self.record(kind, code)
            self.sent += 1
            self.stop.wait(self.args.interval)

    # ------------------------------------------------------------------ one request

    def _request(self, method: str, path: str, body: bytes, ctype: str,
                 read_all: bool = True) -> int:
        """One HTTP/1.1 request on a fresh connection; the status code."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.args.timeout) as s:
            head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    f"Connection: close\r\n\r\n").encode("ascii")
            s.sendall(head + body)
            return _read_status(s, read_all)

    def _chat(self, messages: list, stream: bool = False, raw: bytes = b"") -> int:
        body = raw or json.dumps({"model": "rkvlm", "messages": messages, "max_tokens": 8,
                                  "stream": stream}).encode("utf-8")
        return self._request("POST", "/v1/chat/completions", body, "application/json")

    def bad_json(self) -> int:
        return self._chat([], raw=b'{"model": "rkvlm", "messages": [{"role": "user", "con')

    def surrogate(self) -> int:
        # json.dumps writes the lone surrogate as the escape "\ud800": the server decodes it.
        return self._chat([{"role": "user", "content": "What is this \ud800 thing?"}])

    def nul_chat(self) -> int:
        return self._chat([{"role": "user", "content": "Say\u0000 something."}])

    def nul_speech(self) -> int:
        body = json.dumps({"model": "tts-1", "input": "Hello\u0000 there.",
                           "voice": "alloy"}).encode("utf-8")
        return self._request("POST", "/v1/audio/speech", body, "application/json")

    def huge_history(self) -> int:
        pairs = []
        for k in range(self.args.history_pairs):
            pairs += [{"role": "user", "content": f"Question {k} about the table?"},
                      {"role": "assistant", "content": f"Answer {k}: a red apple."}]
        return self._chat(pairs + [{"role": "user", "content": "And now?"}])

    def odd_wav_rate(self) -> int:
        rate = self.rates[self.sent % len(self.rates)]
        boundary = "faultsoak" + "".join(random.choices("0123456789abcdef", k=12))
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"q.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode()
        body += _wav(rate) + f"\r\n--{boundary}--\r\n".encode()
        return self._request("POST", "/v1/audio/transcriptions", body,
                             f"multipart/form-data; boundary={boundary}")

    def hangup(self) -> int:
        body = json.dumps({"model": "rkvlm", "stream": True, "max_tokens": 64, "messages": [
            {"role": "user", "content": "Tell me everything about the room."}]}).encode()
        s = socket.create_connection(("127.0.0.1", self.port), timeout=self.args.timeout)
        try:
            s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                       f"\r\n").encode() + body)
            code = _read_status(s, read_all=False)
        finally:
            # RST, not FIN: the client is gone mid-stream.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        return code

    def _slow_headers(self) -> None:
        """Headers a byte every half second; who gives up first?"""
        head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
        t0 = time.monotonic()
        outcome = "open when given up"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                for byte in head:
                    if time.monotonic() - t0 > self.args.slow_hold or self.stop.is_set():
                        break
                    s.sendall(bytes([byte]))
                    if select.select([s], [], [], 0.5)[0]:
                        data = s.recv(1024)
                        outcome = (f"answered {data.split()[1].decode()}" if data.startswith(b"HTTP/")
                                   else "closed by the server")
                        break
        except (ConnectionError, OSError):
            outcome = "closed by the server"
        finally:
            self._slow.release()
        self.record("slow_headers", outcome)


def _read_status(s: socket.socket, read_all: bool) -> int:
    """The status code of the response on ``s`` (and, with ``read_all``, its whole body)."""
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionResetError("closed before a status line")
        data += chunk
    code = int(data.split(b"\r\n", 1)[0].split()[1])
    while read_all and s.recv(65536):
        pass
    return code


def _wav(rate: int) -> bytes:
    """A 3 KB mono WAV whose header announces ``rate`` Hz."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x01" * 1500)
    data = bytearray(buf.getvalue())
    struct.pack_into("<II", data, 24, rate, rate * 2)     # sample rate, byte rate
    return bytes(data)


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
    port = free_port()
    (work / "config.yaml").write_text(CONFIG.format(rate=RATE, port=port))
    clips = {q: synthesize_pcm(q, RATE) for q in QUESTIONS + [CLEAR]}
    fake = make_paced_alsa(work, capture_rate=RATE)
    mic = fake.paced_mic()
    log = work / "daemon.log"
    transcript = work / "turns.jsonl"
    env = fake.env()
    env.pop("NOTIFY_SOCKET", None)
    with open(log, "wb") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "assistant", "--config", "config.yaml",
                                 "run"], cwd=work, env=env, stdout=subprocess.DEVNULL,
                                stderr=errf)
    print(f"fault soak: {args.minutes:g} min; daemon pid {proc.pid}, http 127.0.0.1:{port}; "
          f"work dir {work}", flush=True)
    stop = threading.Event()
    attacker = Attacker(port, args, stop)
    reader = VoiceRows(transcript)
    asked = answered = 0
    missed: list[int] = []
    base = end = None
    died = None
    t_start = time.monotonic()
    try:
        wait_ready(proc, log)
        ready = sample(proc.pid)
        attack = threading.Thread(target=attacker.run, name="attacker", daemon=True)
        attack.start()
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
    finally:
        stop.set()
        stop_daemon(proc)
        mic.close()
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
    if args.json:
        Path(args.json).write_text(json.dumps({
            "minutes": elapsed / 60, "daemon_exit": proc.returncode, "asked": asked,
            "answered": answered, "answered_in_full": in_full, "unanswered": missed, "rows": len(rows),
            "voice_rows": len(voice), "invalid_lines": bad_lines, "rss_ready": ready,
            "rss_baseline": base, "rss_end": end, "rss_growth": growth,
            "bad_requests": attacker.sent, "server_errors": attacker.server_errors,
            "codes": codes}, indent=2))
    if died is not None:
        return 2
    clean = (not missed and answered == asked and bad_lines == 0
             and growth is not None and growth < GROWTH_LIMIT and attacker.server_errors == 0)
    print("fault soak: " + ("clean" if clean else "NOT clean"))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
