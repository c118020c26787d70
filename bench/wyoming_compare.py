"""wyoming-bench against our Wyoming ASR and TTS, side by side with the reference servers.

Three servers on this machine, the same models, measured one after another by the same
outside client (wyoming-bench), the servers alternating over ``--passes`` passes, each
run's server CPU time read alongside wyoming-bench's wall-clock figures:

- ours: the assistant's Wyoming server (whisper tiny.en, piper en_US-joe-medium), started
  in this process on 127.0.0.1 (speech only: no language model is needed for asr and tts);
- wyoming-faster-whisper with the same tiny.en directory (beam 1, int8, language en);
- wyoming-piper with the same en_US-joe-medium files.

The reference servers and wyoming-bench pin their own dependencies, so they live in a
separate venv (``--venv``)::

    python3 -m venv /tmp/wyvenv
    /tmp/wyvenv/bin/pip install wyoming-bench==2026.10.0 wyoming-faster-whisper==3.8.1 \
        wyoming-piper==2.5.2
    nice -n 10 python bench/wyoming_compare.py --venv /tmp/wyvenv --out /tmp/wybench

The STT corpus is wyoming-bench's own synthetic one: its four default texts spoken by
wyoming-piper (``generate-corpus``). Everything is local: the models come from the packaged
model files, nothing is downloaded (``--local-files-only``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREADS = min(4, os.cpu_count() or 1)       # whisper's CPU threads, the same for both
sys.path.insert(0, str(HERE.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc=None, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"a reference server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing listens on port {port}")


def start_ours(port: int):
    """Our server on its own loop thread, with whisper and piper only."""
    from assistant import components
    from assistant.config import parse
    from assistant.conversation import Conversation
    from assistant.wyoming.server import WyomingServer

    cfg = parse(f'wyoming: {{enabled: true, uri: "tcp://127.0.0.1:{port}"}}\n'
                f'asr: {{cpu_threads: {THREADS}}}\ncamera: {{source: null}}\n'
                f'vision: {{encoder: none}}')
    asr, voices = components.transcriber(cfg), components.voices(cfg)
    asr.load()
    voices.load()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start():
        server = WyomingServer(cfg, Conversation(cfg, None),
                               type("Parts", (), {"asr": asr, "voices": voices})())
        await server.start()
        return server
    return asyncio.run_coroutine_threadsafe(start(), loop).result(120), loop


def model_files():
    from assistant.audio.model_paths import resolve_voice, resolve_whisper
    from assistant.config import Config

    cfg = Config()
    return resolve_whisper(cfg.asr), resolve_voice(cfg.tts, cfg.tts.voice)


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) a server has used: this process for ours (the bench client
    is a child process, not counted), /proc for a reference server."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(cmd: list[str], log: Path, pid: int | None) -> str:
    """One wyoming-bench run; its output, with the server's CPU time for it appended (the
    figure a loaded machine does not move much, unlike the wall-clock ones)."""
    print("$", " ".join(cmd), flush=True)
    t0, cpu0 = time.monotonic(), cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True)
    cpu = cpu_seconds(pid) - cpu0
    text = out.stdout + out.stderr + f"\nserver CPU time for this run: {cpu:.2f} s\n"
    log.write_text(text)
    print(f"  ({time.monotonic() - t0:.0f} s, server CPU {cpu:.2f} s, exit {out.returncode})"
          f" -> {log}", flush=True)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=Path("/tmp/wyvenv"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/wybench"))
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per sample and mode")
    ap.add_argument("--passes", type=int, default=2, help="alternating passes over the servers")
    args = ap.parse_args()
    vbin = args.venv / "bin"
    args.out.mkdir(parents=True, exist_ok=True)
    whisper_dir, (voice_onnx, voice_json) = model_files()
    voices_dir = args.out / "voices"
    voices_dir.mkdir(exist_ok=True)
    for f in (voice_onnx, voice_json):
        shutil.copy(f, voices_dir / f.name)

    ours, fw, piper = free_port(), free_port(), free_port()
    procs = [
        subprocess.Popen([str(vbin / "wyoming-faster-whisper"), "--uri", f"tcp://127.0.0.1:{fw}",
                          "--model", str(whisper_dir), "--data-dir", str(args.out / "fw"),
                          "--download-dir", str(args.out / "fw"), "--local-files-only",
                          "--beam-size", "1", "--compute-type", "int8", "--language", "en",
                          "--cpu-threads", str(THREADS),
                          "--stt-library", "faster-whisper"],
                         stdout=subprocess.DEVNULL, stderr=open(args.out / "fw.log", "w")),
        subprocess.Popen([str(vbin / "wyoming-piper"), "--uri", f"tcp://127.0.0.1:{piper}",
                          "--voice", voice_onnx.name.removesuffix(".onnx"),
                          "--data-dir", str(voices_dir), "--download-dir", str(voices_dir),
                          "--local-files-only"],
                         stdout=subprocess.DEVNULL, stderr=open(args.out / "piper.log", "w")),
    ]
    server, loop = start_ours(ours)
    try:
        for port, proc in ((fw, procs[0]), (piper, procs[1])):
            wait_port(port, proc)
        bench = str(vbin / "wyoming-bench")
        corpus = args.out / "corpus"
        if not corpus.exists():
            run([bench, "generate-corpus", "--out", str(corpus), f"127.0.0.1:{piper}"],
                args.out / "corpus.log", procs[1].pid)
        common = ["--rounds", str(args.rounds), "--warmup", "1", "--timeout", "120"]
        # Passes alternate the servers, so a change in the shared machine's load falls on
        # both sides rather than on whichever ran second.
        for n in range(1, args.passes + 1):
            for name, port, pid in (("ours", ours, None),
                                    ("wyoming-faster-whisper", fw, procs[0].pid)):
                print(run([bench, "stt", "--corpus", str(corpus), "--config",
                           json.dumps({"language": "en"}), *common, f"127.0.0.1:{port}"],
                          args.out / f"stt-{name}-{n}.txt", pid))
            for name, port, pid in (("ours", ours, None), ("wyoming-piper", piper, procs[1].pid)):
                print(run([bench, "tts", *common, f"127.0.0.1:{port}"],
                          args.out / f"tts-{name}-{n}.txt", pid))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
