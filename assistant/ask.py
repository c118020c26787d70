"""`rkvlm-assistant ask`: one question from a WAV file (and an image) through the same
pipeline as the daemon, with file devices; returns what happened as a JSON-able dict.

With wake.mode word or phrase the file goes through the same wake logic as the microphone:
speech nobody addressed makes no turn and is listed under ``not_addressed`` with the reason
(wake.mode auto is none here)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from assistant import components
from assistant.config import Config, check_files
from assistant.errors import InputError
from assistant.pipeline import Pipeline

log = logging.getLogger(__name__)


async def ask(cfg: Config, audio: Path, image: Optional[Path], out: Optional[Path], *,
              realtime: bool = False, allow_missing_llm: bool = False) -> dict:
    # A one-off question from files has no idle time worth watching the camera in.
    cfg = replace(cfg, vision=replace(cfg.vision, watch=False))
    for p, what in ((audio, "--audio"), (image, "--image")):
        if p is not None and not p.is_file():
            raise InputError(f"{what}: file not found: {p}")
    missing = check_files(cfg)
    if missing:
        for e in missing[1:]:
            log.error("%s", e)
        raise missing[0]
    t0 = time.monotonic()
    # Bad input files are reported before seconds go into loading models.
    source = components.wav_source(cfg, audio, realtime=realtime)
    await source.open()
    cam = None
    image_note = ""
    if image is not None and cfg.vision.encoder == "none":
        # Say so rather than answer as if the picture had been seen.
        image_note = (f"--image {image} was not used: vision.encoder is none in {cfg.source} "
                      f"(set it to llamacpp or rknn to let the model see it)")
        log.warning("%s", image_note)
    elif image is not None:
        cam = components.camera(cfg, image)
        cam.open()
    parts = await components.assemble(cfg, source, lambda rate: components.wav_sink(out, rate),
                                      image=image, use_camera=False, cam=cam,
                                      allow_missing_llm=allow_missing_llm)
    load_s = time.monotonic() - t0
    done: list = []
    try:
        # One conversation for every question in the file; `ask` prints its turns and
        # leaves the daemon's transcript alone.
        pipeline = Pipeline(cfg, parts, on_turn=done.append)
        await pipeline.run(greet=False)
    finally:
        await components.close(parts)
    turns = [t.as_json() for t in done]
    # Speech that made no turn (wake.mode word / phrase: nobody addressed the assistant).
    skipped = list(pipeline.skipped)
    result = dict(turns[-1]) if turns else {
        "transcript": "", "language": "", "intent": "nothing", "answer": "",
        "note": skipped[-1]["note"] if skipped else "no speech found in the audio",
        "timings_ms": {}}
    result.pop("turn", None)
    result["audio"] = str(audio)
    result["image_file"] = str(image) if image else None
    result["answer_wav"] = str(out) if out else None
    result["load_ms"] = round(load_s * 1000.0, 1)
    if image_note:
        result["image_note"] = image_note
    if len(turns) > 1:
        result["turns"] = turns
    if skipped:
        result["not_addressed"] = skipped
    return result
