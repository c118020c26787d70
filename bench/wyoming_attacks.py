"""The fault soak's Wyoming attacks (issue 24) and its watchdog listener (tests/ on the path).

Three threads on 127.0.0.1 (the daemon's own Wyoming and HTTP ports, nothing else), each a
loop of attacks one after another, every one bounded in time, the whole bounded in count
(``max_attacks``) and by the soak's stop:

- ``speech``: ``low_rate_1000`` / ``low_rate_8000`` (a 16 MB ``audio-chunk`` announced as
  1000 Hz or 8 kHz 8-bit mono: hours of audio), ``queued_payloads`` (a long ``synthesize``,
  then 1 MB audio chunks sent behind it without reading, while the worker speaks),
  ``unpunctuated_synthesize`` (10,000 characters without punctuation, read for at most
  ``read_s``), ``http_unpunctuated`` (HTTP /v1/audio/speech of 4,096 such characters);
- ``idle``: ``idle_connections`` (32 TCP connections that say nothing, held ``hold_s``, a
  ``describe`` tried beside them), ``no_audio_stop`` (4 audio streams that never end),
  ``non_reader`` (a long ``synthesize`` whose client never reads its audio);
- ``conversation``: ``conversation_turns`` ``handle`` turns with one conversation id, then
  "Clear." (``full_conversation``).

Each attack records what happened to it as one short outcome ("error:busy", "closed by the
server after 12 s", ...); the soak prints the counts per attack.
"""

from __future__ import annotations

import collections
import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from test_http_support import raw_http

UNPUNCTUATED = "the quick brown fox jumps over the lazy dog near a river bank".split()
SENTENCES = " ".join(f"This is sentence number {i} of a long text to speak." for i in range(60))


def unpunctuated(chars: int) -> str:
    """Words and spaces, no punctuation, ``chars`` long."""
    text = ""
    i = 0
    while len(text) < chars:
        text += UNPUNCTUATED[i % len(UNPUNCTUATED)] + " "
        i += 1
    return text[:chars].rstrip()


def event(kind: str, data: Optional[dict] = None, payload: bytes = b"") -> bytes:
    """One Wyoming event: header line, data, payload."""
    body = json.dumps(data or {}).encode()
    header = {"type": kind, "data_length": len(body)}
    if payload:
        header["payload_length"] = len(payload)
    return json.dumps(header).encode() + b"\n" + body + payload


class Events:
    """Wyoming events read off a socket: ``next()`` -> (type, data, payload length)."""

    def __init__(self, sock: socket.socket):
        self.f = sock.makefile("rb")

    def next(self) -> tuple[str, dict, int]:
        line = self.f.readline()
        if not line:
            raise ConnectionResetError("closed by the server")
        header = json.loads(line)
        data = dict(header.get("data") or {})
        n = header.get("data_length") or 0
        if n:
            data.update(json.loads(self.f.read(n)))
        size = header.get("payload_length") or 0
        if size:
            self.f.read(size)
        return header["type"], data, size

    def until(self, *last: str) -> tuple[str, dict, int]:
        while True:
            kind, data, size = self.next()
            if kind in last or kind == "error":
                return kind, data, size


def took(seconds: float) -> str:
    """How long an attack took, in a few bands (so outcomes add up over an hour)."""
    for limit in (5, 30, 120):
        if seconds < limit:
            return f"< {limit} s"
    return ">= 120 s"


def outcome_of(kind: str, data: dict) -> str:
    return f"error:{data.get('code')}" if kind == "error" else kind


def rst_close(s: socket.socket) -> None:
    """Close with RST (a client that vanished)."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        s.close()


class WyomingAttacks:
    def __init__(self, wport: int, hport: int, stop: threading.Event, max_attacks: int = 1000,
                 hold_s: float = 20.0, read_s: float = 45.0, conversation_turns: int = 40,
                 timeout: float = 120.0, skip: tuple = ()):
        self.wport, self.hport, self.stop = wport, hport, stop
        self.skip = set(skip)
        self.max_attacks, self.hold_s, self.read_s = max_attacks, hold_s, read_s
        self.turns, self.timeout = conversation_turns, timeout
        self.outcomes: dict[str, collections.Counter] = collections.defaultdict(
            collections.Counter)
        self.sent = 0
        self.server_errors = 0          # 5xx from HTTP speech
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ running

    def start(self) -> list[threading.Thread]:
        loops = {"speech": [self.low_rate_1000, self.low_rate_8000, self.queued_payloads,
                            self.unpunctuated_synthesize, self.http_unpunctuated],
                 "idle": [self.idle_connections, self.no_audio_stop, self.non_reader],
                 "conversation": [self.full_conversation]}
        unknown = self.skip - {a.__name__ for attacks in loops.values() for a in attacks}
        if unknown:
            raise ValueError(f"no such Wyoming attack: {', '.join(sorted(unknown))}")
        loops = {name: kept for name, attacks in loops.items()
                 if (kept := [a for a in attacks if a.__name__ not in self.skip])}
        threads = [threading.Thread(target=self._loop, args=(attacks,), name=f"wy-{name}",
                                    daemon=True) for name, attacks in loops.items()]
        for t in threads:
            t.start()
        return threads

    def _loop(self, attacks: list[Callable[[], str]]) -> None:
        i = 0
        while not self.stop.is_set():
            with self._lock:
                if self.sent >= self.max_attacks:
                    return
                self.sent += 1
            attack = attacks[i % len(attacks)]
            i += 1
            t0 = time.monotonic()
            try:
                outcome = attack()
            except socket.timeout:
                outcome = "timeout"
            except ConnectionError as e:
                outcome = "closed by the server" if isinstance(
                    e, (ConnectionResetError, BrokenPipeError)) else f"closed: {e}"
            except Exception as e:      # whatever it is, the loop goes on and says so
                outcome = f"failed: {type(e).__name__}: {e}"[:80]
            if self.stop.is_set() and outcome in ("timeout", "closed by the server"):
                outcome = "cut short by the end of the soak"
            outcome += f" [{took(time.monotonic() - t0)}]"
            with self._lock:
                self.outcomes[attack.__name__][outcome] += 1
            self.stop.wait(1.0)

    def _connect(self, timeout: Optional[float] = None) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.wport),
                                        timeout=timeout or self.timeout)

    # ------------------------------------------------------------------ speech

    def _low_rate(self, rate: int) -> str:
        """16 MB of 8-bit audio announced at ``rate``: its transcript, an error, or closed."""
        fmt = {"rate": rate, "width": 1, "channels": 1}
        with self._connect() as s:
            s.sendall(event("transcribe", {"language": "en"}) + event("audio-start", fmt))
            s.sendall(event("audio-chunk", fmt, bytes([128]) * (16 << 20)))
            s.sendall(event("audio-stop"))
            kind, data, _ = Events(s).until("transcript")
            return outcome_of(kind, data)

    def low_rate_1000(self) -> str:
        return self._low_rate(1000)

    def low_rate_8000(self) -> str:
        return self._low_rate(8000)

    def queued_payloads(self) -> str:
        """A long synthesize, then 32 x 1 MB audio chunks behind it, never reading."""
        s = self._connect(timeout=10)
        sent = 0
        try:
            s.sendall(event("synthesize", {"text": SENTENCES}))
            s.sendall(event("transcribe") + event("audio-start", {"rate": 16000, "width": 2,
                                                                  "channels": 1}))
            chunk = event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1},
                          bytes(1 << 20))
            for _ in range(32):
                s.sendall(chunk)
                sent += 1
            return "all 32 MB taken"
        except socket.timeout:
            return f"held back after {sent} MB"
        finally:
            rst_close(s)

    def unpunctuated_synthesize(self) -> str:
        """10,000 unpunctuated characters: its audio read for at most read_s."""
        t0 = time.monotonic()
        with self._connect() as s:
            s.sendall(event("synthesize", {"text": unpunctuated(10_000)}))
            events, first = Events(s), None
            s.settimeout(self.read_s)
            while time.monotonic() - t0 < self.read_s:
                kind, data, _ = events.next()
                if kind == "audio-chunk" and first is None:
                    first = time.monotonic() - t0
                if kind in ("audio-stop", "error"):
                    return outcome_of(kind, data)
            return f"speaking after {self.read_s:.0f} s (first sound {first or 0:.0f} s)"

    def http_unpunctuated(self) -> str:
        body = json.dumps({"model": "tts-1", "input": unpunctuated(4096),
                           "voice": "alloy"}).encode()
        try:
            code, _, _ = raw_http(self.hport, (
                f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode() + body, timeout=self.timeout * 3)
        except (IndexError, ValueError):
            return "closed by the server"       # no status line
        if code >= 500:
            with self._lock:
                self.server_errors += 1
        return f"http {code}"

    # ------------------------------------------------------------------ idle

    def _describe(self) -> str:
        """A describe beside the attack: is the server still serving?"""
        try:
            with self._connect(timeout=10) as s:
                s.sendall(event("describe"))
                kind, data, _ = Events(s).until("info")
                return "served" if kind == "info" else outcome_of(kind, data)
        except (OSError, ValueError) as e:
            return f"not served ({type(e).__name__})"

    def _hold(self, socks: list[socket.socket]) -> tuple[int, float]:
        """Hold ``socks`` hold_s, reading whatever comes: how many the server closed, and
        when the last of those was closed."""
        closed: dict[int, float] = {}
        t0 = time.monotonic()
        for s in socks:
            s.setblocking(False)
        while time.monotonic() - t0 < self.hold_s and not self.stop.is_set():
            for i, s in enumerate(socks):
                if i in closed:
                    continue
                try:
                    while s.recv(65536):
                        pass
                    closed[i] = time.monotonic() - t0
                except BlockingIOError:
                    pass
                except OSError:
                    closed[i] = time.monotonic() - t0
            time.sleep(0.2)
        return len(closed), max(closed.values(), default=0.0)

    def _held(self, what: str, socks: list[socket.socket]) -> str:
        beside = self._describe()
        n, last = self._hold(socks)
        for s in socks:
            rst_close(s)
        end = f"{n} closed by the server (the last {took(last)})" if n else \
            f"open after {self.hold_s:.0f} s"
        return f"{what}: {end}; describe beside: {beside}"

    def idle_connections(self) -> str:
        socks = []
        try:
            for _ in range(32):
                socks.append(self._connect(timeout=5))
        except OSError:
            pass
        return self._held(f"{len(socks)} idle", socks)

    def no_audio_stop(self) -> str:
        socks = []
        fmt = {"rate": 16000, "width": 2, "channels": 1}
        for _ in range(4):
            s = self._connect(timeout=10)
            s.sendall(event("transcribe") + event("audio-start", fmt)
                      + event("audio-chunk", fmt, bytes(64000)))
            socks.append(s)
        return self._held("4 streams", socks)

    def non_reader(self) -> str:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", self.wport))
        s.sendall(event("synthesize", {"text": SENTENCES}))
        beside = self._describe()
        self.stop.wait(self.hold_s)
        rst_close(s)
        return f"unread {self.hold_s:.0f} s; describe beside: {beside}"

    # ------------------------------------------------------------------ conversation

    def full_conversation(self) -> str:
        """conversation_turns turns with one id (each turn's outcome counted as a "turn"),
        then "Clear." (the attack's outcome)."""
        cid = f"soak-{time.monotonic_ns()}"
        for k in range(self.turns):
            if self.stop.is_set():
                break
            try:
                got = self._handle(f"Question {k}: what do you see on the table, and what "
                                   f"colour is the cup next to the apple?", cid)
            except (OSError, ValueError) as e:
                got = f"failed: {type(e).__name__}"
            with self._lock:
                self.outcomes["conversation_turn"][got] += 1
            self.stop.wait(0.2)
        return f"Clear.: {self._handle('Clear.', cid)}"

    def _handle(self, text: str, cid: str) -> str:
        with self._connect() as s:
            s.sendall(event("transcript", {"text": text, "language": "en",
                                           "context": {"conversation_id": cid}}))
            kind, data, _ = Events(s).until("handled-stop", "not-handled")
            return outcome_of(kind, data)


class Watchdog:
    """A NOTIFY_SOCKET the daemon pings (``WATCHDOG=1``); the longest gap between pings."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.5)
        self.pings = 0
        self.last: Optional[float] = None
        self.longest = 0.0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.sock.recv(4096)
            except socket.timeout:
                continue
            if msg == b"WATCHDOG=1":
                now = time.monotonic()
                if self.last is not None:
                    self.longest = max(self.longest, now - self.last)
                self.last = now
                self.pings += 1

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0
