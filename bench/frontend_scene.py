"""What the scene memory saves a Home Assistant (Wyoming) or HTTP conversation on the board.

`rkvlm-assistant bench` has no front-end scenario, so this replays a board profile's NPU
figures (``assistant/bench_profiles.py``: the published encoder, prefill and decode times
behind the real ``VisionEncoder`` / ``LLMBackend`` interfaces) under the real conversation
and scene memory, and asks what a Wyoming ``handle`` asks: questions of one conversation id
(its history sent back with each, ``source: wyoming``), with the camera, about a scene that
does not change; then one about a changed scene.

Two runs: ``with reuse`` (the code as it is) and ``without`` (what every Wyoming question
did before: no scene reference for a stateless conversation and no embedding reused, so
each question encodes the picture and evaluates it again). Per question: the wall time to
the last piece, the encodes, and the image tokens evaluated::

    PYTHONPATH=. .venv/bin/python bench/frontend_scene.py --profile rk3576 --questions 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from assistant.bench import SwitchCamera, scene_frames  # noqa: E402
from assistant.bench_profiles import (PROFILES, FastForward, SimulatedEncoder,  # noqa: E402
                                      SimulatedLLM, resolve_profile)
from assistant.config import Config  # noqa: E402
from assistant.conversation import Conversation, Priority, Request  # noqa: E402
from assistant.demo import draw_scene  # noqa: E402
from assistant.turn import Turn  # noqa: E402
from assistant.vision.scene import Scene  # noqa: E402


class Counting(SimulatedEncoder):
    calls = 0

    def encode(self, rgb):
        self.calls += 1
        return super().encode(rgb)


async def run(profile_name: str, questions: int, reuse: bool) -> list[dict]:
    board = resolve_profile(profile_name)
    cfg = Config()
    clock = FastForward()
    llm = SimulatedLLM(board, cfg.llm.max_context_len, clock)
    encoder = Counting(board, clock)
    with tempfile.TemporaryDirectory() as d:
        camera = SwitchCamera(scene_frames(draw_scene(Path(d) / "scene.jpg")))
    scene = Scene(camera, encoder, cfg.vision)
    conv = Conversation(cfg, llm, scene=scene)
    history: list[tuple[str, str]] = []
    out = []
    patches = [] if reuse else [
        mock.patch.object(Conversation, "scene_reference",
                          lambda self, history=None: None),
        mock.patch.object(Scene, "_embed", lambda self, res: self._encode(res))]
    for p in patches:
        p.start()
    try:
        for i in range(questions + 1):
            if i == questions:
                camera.show("B")                  # the scene changes
            q = f"Question {i}: what do you see now?"
            turn = Turn(source="wyoming")
            calls = encoder.calls
            t0 = time.monotonic()
            req = Request(q, source="wyoming", priority=Priority.TEXT, language="en",
                          history=list(history), use_camera=True, compact_history=True)
            answer = "".join([p async for p in conv.ask(req, turn)])
            took = time.monotonic() - t0
            history.append((q, answer))
            out.append({"question": i + 1, "scene": turn.scene, "seconds": round(took, 2),
                        "encodes": encoder.calls - calls,
                        "image_tokens": turn.counts.get("image_tokens", 0)})
    finally:
        for p in patches:
            p.stop()
        scene.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="rk3576", help=f"a board profile ({', '.join(PROFILES)})")
    ap.add_argument("--questions", type=int, default=3,
                    help="questions about the unchanged scene (then one about a new one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    board = resolve_profile(args.profile)
    report = {"profile": board.describe(),
              "with_reuse": asyncio.run(run(args.profile, args.questions, True)),
              "without_reuse": asyncio.run(run(args.profile, args.questions, False))}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(report["profile"])
    for name in ("with_reuse", "without_reuse"):
        print(f"{name}:")
        for r in report[name]:
            print(f"  question {r['question']}: scene={r['scene']} {r['seconds']:.2f} s, "
                  f"{r['encodes']} encode(s), {r['image_tokens']} image tokens evaluated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
