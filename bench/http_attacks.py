"""The fault soak's HTTP attacks (bench/fault_soak.py describes them): bad requests one at
a time on 127.0.0.1, and slow-header connections on threads of their own."""

from __future__ import annotations

import collections
import io
import json
import random
import select
import socket
import struct
import threading
import time
import wave

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
