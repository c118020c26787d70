#!/usr/bin/env python3
"""Benchmark the HTTP front-end's overhead (not a test): the same streamed turn through a
direct backend call and through `rkvlm-assistant serve` over a real socket.

- direct: ``LlamaCppBackend`` in this process, ``load_history([])`` then ``stream_turn`` (what
  the conversation does for a stateless request with no history);
- http: ``rkvlm-assistant serve`` in a subprocess with the same model file and settings,
  ``POST /v1/chat/completions`` with ``stream: true`` from an aiohttp client (request JSON,
  the turn gate, the conversation, SSE chunks, the client's parsing included).

Time to the first streamed text and total time to the end of the answer, median of N runs
(after warm-up runs), interleaved per run so drift hits both alike. Models are generated
(tests/tiny_models.py): ``--size tiny`` is the tests' scripted model (9-token answer: the
turn is a few milliseconds, so any fixed cost shows); ``--size small`` (n_embd 512,
8 layers, random weights, ``--tokens`` answer tokens) is a turn that takes long enough to
compare percentages.

    .venv/bin/python bench/bench_http.py [--size tiny|small] [--runs 30] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from assistant.config import Config, parse  # noqa: E402
from assistant.llm.base import TurnOptions, stream_turn  # noqa: E402
from assistant.llm.llamacpp import LlamaCppBackend  # noqa: E402

QUESTION = "What do you see on the table?"
REPLY = "I see a red apple on the wooden table."
SIZES = {"tiny": (64, 2), "small": (512, 8)}


def make_model(size: str, folder: Path) -> Path:
    from tiny_models import write_text_model

    n_embd, n_layer = SIZES[size]
    if size == "tiny":
        return write_text_model(folder / "tiny.gguf", scripted_reply=REPLY)
    return write_text_model(folder / f"{size}.gguf", seed=3, n_embd=n_embd, n_layer=n_layer)


def config_text(model: Path, port: int) -> str:
    return (f"llm: {{llamacpp: {{model: {model}, n_threads: 1}}}}\n"
            f"vision: {{encoder: none}}\ncamera: {{source: null}}\n"
            f"persona: {{language: en}}\ntranscript: {{enabled: false}}\n"
            f"http: {{listen: \"127.0.0.1:{port}\"}}\nlogging: {{level: WARNING}}\n")


async def direct_once(backend: LlamaCppBackend, tokens: int) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    await asyncio.to_thread(backend.load_history, [])
    first = None
    text = []
    async for piece in stream_turn(backend, QUESTION, None, True,
                                   options=TurnOptions(max_new_tokens=tokens)):
        if first is None and piece.strip():
            first = time.perf_counter()
        text.append(piece)
    return first - t0, time.perf_counter() - t0, "".join(text)


async def http_once(session, url: str, tokens: int) -> tuple[float, float, str]:
    body = {"model": "rkvlm", "stream": True, "max_tokens": tokens,
            "messages": [{"role": "user", "content": QUESTION}]}
    t0 = time.perf_counter()
    first = None
    text = []
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                break
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                if first is None:
                    first = time.perf_counter()
                text.append(delta)
    return first - t0, time.perf_counter() - t0, "".join(text)


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"serve exited: {proc.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit("serve did not start")


async def bench(args) -> dict:
    import aiohttp
    from test_http_support import free_port

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_model(args.size, folder)
        port = free_port()
        (folder / "config.yaml").write_text(config_text(model, port))
        cfg: Config = parse(config_text(model, port), str(folder / "config.yaml"))
        backend = LlamaCppBackend(cfg.llm, cfg.persona, model, None)
        backend.load()
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        proc = subprocess.Popen([sys.executable, "-m", "assistant", "--config", "config.yaml",
                                 "serve"], cwd=folder, env=env, stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True)
        try:
            wait_port(port, proc)
            url = f"http://127.0.0.1:{port}"
            d_first, d_total, h_first, h_total = [], [], [], []
            async with aiohttp.ClientSession() as session:
                for i in range(args.warmup + args.runs):
                    df, dt, dtext = await direct_once(backend, args.tokens)
                    hf, ht, htext = await http_once(session, url, args.tokens)
                    if args.size == "tiny":
                        assert dtext.strip() == htext.strip() == REPLY, (dtext, htext)
                    if i >= args.warmup:
                        d_first.append(df), d_total.append(dt)
                        h_first.append(hf), h_total.append(ht)
        finally:
            proc.terminate()
            proc.wait(30)
            backend.close()

    def ms(v):
        return round(statistics.median(v) * 1e3, 2)

    out = {"size": args.size, "runs": args.runs, "answer_tokens": 9 if args.size == "tiny" else args.tokens,
           "direct_first_ms": ms(d_first), "http_first_ms": ms(h_first),
           "direct_total_ms": ms(d_total), "http_total_ms": ms(h_total)}
    for k in ("first", "total"):
        d, h = out[f"direct_{k}_ms"], out[f"http_{k}_ms"]
        out[f"{k}_overhead_ms"] = round(h - d, 2)
        out[f"{k}_overhead_pct"] = round(100.0 * (h - d) / d, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32, help="answer tokens (random models)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(out))
        return
    print(f"model {out['size']}, {out['answer_tokens']} answer tokens, median of {out['runs']} runs")
    print(f"{'':24}{'direct':>10}{'http':>10}{'overhead':>12}")
    for k, name in (("first", "first streamed text"), ("total", "whole answer")):
        print(f"{name:24}{out[f'direct_{k}_ms']:>8.2f}ms{out[f'http_{k}_ms']:>8.2f}ms"
              f"{out[f'{k}_overhead_ms']:>+8.2f}ms ({out[f'{k}_overhead_pct']:+.1f} %)")


if __name__ == "__main__":
    main()
