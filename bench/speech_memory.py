"""Peak memory of a real `serve` speaking the longest text each front-end accepts.

Starts `rkvlm-assistant serve` as its own process (the packaged piper voice, the tiny test
LLM, HTTP and Wyoming on free loopback ports), then, one after another: HTTP
/v1/audio/speech with ``--http-chars`` unpunctuated characters (the limit is 4,096) and a
Wyoming ``synthesize`` of ``--wyoming-chars`` (the limit is 10,000). After each, the
daemon's peak resident memory (VmHWM in /proc/PID/status), the seconds it took and the
seconds of speech it returned.

    .venv/bin/python bench/speech_memory.py
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from test_http_support import free_port, start_serve, stop_process, wait_for_port  # noqa: E402
from tiny_models import write_mmproj, write_text_model  # noqa: E402
from wyoming_attacks import Events, event, peak_rss_mb as peak_mb, unpunctuated  # noqa: E402

CONFIG = """\
llm: {{llamacpp: {{model: tiny.gguf, mmproj: tiny-mmproj.gguf}}}}
persona: {{language: en}}
http: {{listen: "127.0.0.1:{port}"}}
wyoming: {{enabled: true, uri: "tcp://127.0.0.1:{wport}"}}
"""


def http_speech(port: int, text: str, timeout: float) -> tuple[int, float]:
    """Status and seconds of speech of /v1/audio/speech."""
    body = json.dumps({"model": "tts-1", "input": text, "voice": "alloy"}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/audio/speech", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = r.read()
        rate = int.from_bytes(data[24:28], "little")
        return r.status, (len(data) - 44) / 2 / rate


def wyoming_synthesize(port: int, text: str, timeout: float) -> tuple[str, float]:
    """The last event's type and the seconds of speech of a Wyoming ``synthesize``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(event("synthesize", {"text": text}))
        events, samples, rate = Events(s), 0, 1
        while True:
            kind, data, size = events.next()
            if kind == "audio-chunk":
                samples += size // 2
                rate = data.get("rate", rate)
            if kind in ("audio-stop", "error"):
                return kind, samples / rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--http-chars", type=int, default=4096)
    ap.add_argument("--wyoming-chars", type=int, default=10_000)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rkvlm-speechmem-"))
    write_text_model(work / "tiny.gguf", scripted_reply="Yes.")
    write_mmproj(work / "tiny-mmproj.gguf")
    port, wport = free_port(), free_port()
    (work / "config.yaml").write_text(CONFIG.format(port=port, wport=wport))
    proc = start_serve(work)
    try:
        wait_for_port(port, proc)
        wait_for_port(wport, proc)
        print(f"serve pid {proc.pid}: ready, peak {peak_mb(proc.pid):.0f} MB", flush=True)
        t0 = time.monotonic()
        status, speech = http_speech(port, unpunctuated(args.http_chars), args.timeout)
        print(f"HTTP speech, {args.http_chars} unpunctuated characters: {status}, "
              f"{speech:.0f} s of speech in {time.monotonic() - t0:.0f} s; "
              f"peak {peak_mb(proc.pid):.0f} MB", flush=True)
        t0 = time.monotonic()
        last, speech = wyoming_synthesize(wport, unpunctuated(args.wyoming_chars), args.timeout)
        print(f"Wyoming synthesize, {args.wyoming_chars} unpunctuated characters: {last}, "
              f"{speech:.0f} s of speech in {time.monotonic() - t0:.0f} s; "
              f"peak {peak_mb(proc.pid):.0f} MB", flush=True)
    finally:
        stop_process(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
