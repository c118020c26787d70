"""The README's Performance table: `rkvlm-assistant bench` over every profile, in one run.

Each profile runs in its own `rkvlm-assistant bench --json` process, one after the other (so
no two compete for the CPU), with a config whose LLM is the tiny llama.cpp test model and its
projector (generated here: the `measured` profile's stages; board profiles replace the LLM
and encoder with the replayed NPU stages). The JSON reports land in --out; the table is
printed as Markdown.

    .venv/bin/python bench/board_table.py --rounds 3 [--other-rounds 1] [--profiles rk3576-qwen2-vl-2b,measured]
    .venv/bin/python bench/board_table.py --table-only --out bench-out   # reprint
    .venv/bin/python bench/board_table.py --table-only --out bench-out --plot docs/latency.svg

``--plot`` draws where each scenario's wait went (assistant/stages.py: end-of-turn wait, ASR
after the cut, the model to the first clause, TTS to the first sound; the pipelined medians)
per profile, with matplotlib (the bench extra).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from assistant.bench_profiles import PROFILES  # noqa: E402
from assistant.stages import STAGES, stages  # noqa: E402

SCENARIOS = ("same_scene", "new_scene", "idle_encoded")
COLOURS = {"wait": "#9e9e9e", "asr": "#2e7d32", "llm": "#1565c0", "tts": "#ef6c00"}
SHORT = {"wait": "end-of-turn wait", "asr": "ASR after the cut", "llm": "LLM to the first clause",
         "tts": "TTS to the first sound"}

# The tiny model's scripted answer (no word twice: see tests/tiny_models.py).
REPLY = "I see a wooden table, with one red apple and two blue mugs. Behind them is the bright window."


def write_config(d: Path) -> Path:
    from tiny_models import write_mmproj, write_text_model

    d.mkdir(parents=True, exist_ok=True)
    write_text_model(d / "tiny.gguf", scripted_reply=REPLY)
    write_mmproj(d / "tiny-mmproj.gguf")
    cfg = d / "bench.yaml"
    cfg.write_text(f"llm: {{llamacpp: {{model: {d / 'tiny.gguf'}, "
                   f"mmproj: {d / 'tiny-mmproj.gguf'}}}}}\n")
    return cfg


def run(profile: str, rounds: int, cfg: Path, out: Path) -> dict:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "assistant", "--config", str(cfg), "bench",
                        "--profile", profile, "--rounds", str(rounds), "--json"],
                       capture_output=True, text=True, cwd=cfg.parent)
    if r.returncode != 0:
        raise SystemExit(f"bench --profile {profile} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    (out / f"{profile}.json").write_text(r.stdout)
    print(f"{profile}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(r.stdout)


def _ms(x) -> str:
    return "-" if x is None else f"{x / 1000:.2f}"


def table(reports: list[dict]) -> str:
    rows = ["| profile | same scene | serial | x | new scene | serial | x "
            "| idle-encoded | serial | x | ASR s (k) | TTS s (k) | long conversation: median / max (compactions) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rep in reports:
        cells = [rep["resolved"]]
        for s in ("same_scene", "new_scene", "idle_encoded"):
            sc = rep["scenarios"].get(s)
            if sc is None:
                cells += ["-", "-", "-"]
                continue
            p = sc["pipelined"]["last_word_to_first_audio_ms"]
            q = sc["serial"]["last_word_to_first_audio_ms"]
            cells += [f"**{_ms(p['median'])}** ({_ms(p['p90'])})", _ms(q["median"]),
                      f"{sc['speedup']}" if sc["speedup"] else "-"]
        same = rep["scenarios"].get("same_scene") or next(iter(rep["scenarios"].values()))
        st = same["pipelined"]["stages_ms"]
        k = rep.get("scaling", {})
        cells.append(f"{_ms(st.get('asr_ms'))}" + (f" (x{k['asr']['k']})" if "asr" in k else ""))
        cells.append(f"{_ms(st.get('tts_ms'))}" + (f" (x{k['tts']['k']})" if "tts" in k else ""))
        long = rep["scenarios"].get("long_conversation")
        if long is None:
            cells.append("-")
        else:
            w = long["pipelined"]["last_word_to_first_audio_ms"]
            cells.append(f"{_ms(w['median'])} / {_ms(w['max'])} ({long['compactions']}, "
                         f"{long['compactions_while_idle']} while idle)")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def scenario_stages(sc: dict) -> dict | None:
    """The four stages of a scenario's pipelined medians (they add up to about its median)."""
    p = sc["pipelined"]
    return stages({"last_word_to_first_audio_ms": p["last_word_to_first_audio_ms"]["median"],
                   **{k: v for k, v in p["stages_ms"].items() if v is not None}})


def plot(reports: list[dict], path: Path) -> None:
    """Stacked bars, one per profile and scenario: where the wait went."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{rep['resolved']}  {s.replace('_', ' ')}", st) for rep in reports
            for s in SCENARIOS if s in rep["scenarios"]
            for st in [scenario_stages(rep["scenarios"][s])] if st is not None]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.4))
    for y, (_, st) in enumerate(reversed(rows)):
        left = 0.0
        for key, _what in STAGES:
            ax.barh(y, st[key] / 1000, left=left, color=COLOURS[key], height=0.7)
            left += st[key] / 1000
        ax.text(left + 0.05, y, f"{st['total'] / 1000:.2f} s", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)], fontsize=7)
    ax.set_xlabel("seconds from the last word to the first sound (pipelined medians)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=COLOURS[k]) for k, _ in STAGES],
              labels=[SHORT[k] for k, _ in STAGES], fontsize=7, loc="lower left",
              bbox_to_anchor=(0, 1.0), ncol=4, frameon=False)
    ax.set_xlim(0, max(st["total"] for _, st in rows) / 1000 * 1.12)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--other-rounds", type=int, default=None,
                    help="rounds for the profiles other than measured and rk3576-qwen2-vl-2b "
                         "(the targets' profiles); default --rounds")
    ap.add_argument("--profiles", default=",".join(["rk3576-qwen2-vl-2b", "measured"] + [
                        p for p in PROFILES if p != "rk3576-qwen2-vl-2b"]),
                    help="comma-separated (default: measured and every board profile)")
    ap.add_argument("--out", default="bench-out", help="where the JSON reports go")
    ap.add_argument("--table-only", action="store_true", help="print the table from --out")
    ap.add_argument("--plot", metavar="FILE.svg", help="also draw where the time went (matplotlib)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = [p for p in args.profiles.split(",") if p]
    reports = []
    if args.table_only:
        reports = [json.loads((out / f"{p}.json").read_text()) for p in names
                   if (out / f"{p}.json").exists()]
    else:
        cfg = write_config(out / "models")
        for p in names:
            main_profile = p in ("measured", "rk3576-qwen2-vl-2b", "rk3576")
            n = args.rounds if main_profile or args.other_rounds is None else args.other_rounds
            reports.append(run(p, n, cfg, out))
    print(table(reports))
    if args.plot:
        plot(reports, Path(args.plot))
    for rep in reports:
        if rep.get("overhead_ms") is not None:
            print(f"\noverhead_ms ({rep['resolved']}): {rep['overhead_ms']}")
        for t in rep.get("targets", []):
            print(f"target {rep['resolved']} {t['scenario'] or ''} {t['what']} {t['target']}: "
                  f"{t['value']} {'met' if t['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
