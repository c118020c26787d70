"""A real `serve` speaks a long unpunctuated text (2,500 characters; the HTTP limit is 4,096)
in bounded memory (issue 24: sent to piper whole, it took 61 s and the daemon's peak went from 0.6 to
10.9 GB; at Wyoming's 10,000 the kernel killed it at 22 GB).

The daemon is its own process (tests/test_http_support.py's ``start_serve``) with the
packaged piper voice; its peak resident memory is read from /proc/PID/status (VmHWM).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from test_http_support import free_port, start_serve, stop_process, wait_for_port
from tiny_models import write_mmproj, write_text_model

# Generous: 1,050 MB measured with 4,096 characters (bench/speech_memory.py); in one piece,
# 2,500 characters took 5.4 GB (MAX_PIECE raised past the text, on purpose).
PEAK_BOUND_MB = 2000


def unpunctuated(chars: int) -> str:
    words = "the quick brown fox jumps over the lazy dog near a river bank".split()
    text, i = "", 0
    while len(text) < chars:
        text += words[i % len(words)] + " "
        i += 1
    return text[:chars].rstrip()


def peak_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(l for l in status.splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_http_speech_of_a_long_unpunctuated_text(tmp_path):
    """Catches: the text handed to piper in one piece (memory with the square of its length:
    the peak bound fails) and pieces lost on the way (the audio is far shorter)."""
    write_text_model(tmp_path / "tiny.gguf", scripted_reply="Yes.")
    write_mmproj(tmp_path / "tiny-mmproj.gguf")
    port = free_port()
    (tmp_path / "config.yaml").write_text(f"""
llm: {{llamacpp: {{model: tiny.gguf, mmproj: tiny-mmproj.gguf}}}}
persona: {{language: en}}
http: {{listen: "127.0.0.1:{port}"}}
""")
    proc = start_serve(tmp_path)
    try:
        wait_for_port(port, proc)
        body = json.dumps({"model": "tts-1", "input": unpunctuated(2500)}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/audio/speech", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            assert r.status == 200
            wav = r.read()
        peak = peak_mb(proc.pid)
    finally:
        stop_process(proc)
    rate = int.from_bytes(wav[24:28], "little")
    seconds = (len(wav) - 44) / 2 / rate
    # 4,096 such characters are 223 s of speech (2,500: 136 s): every piece is in it.
    assert seconds > 120, seconds
    assert peak < PEAK_BOUND_MB, f"the daemon's peak resident memory was {peak:.0f} MB"
