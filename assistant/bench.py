"""`rkvlm-assistant bench`: where a turn's time goes, and what the pipeline saves.

Each round speaks the same question (made by the project's TTS) into the real pipeline at
real-time pace, so vision work started at speech onset overlaps the talking as it would with
a microphone. Then the same components run the same question the naive serial way
(transcribe, snapshot, encode, generate everything, synthesise everything). Both are
measured in the same run, so their ratio holds on a noisy machine.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from assistant import components
from assistant.audio.sentences import SentenceSplitter
from assistant.audio.wav_source import read_wav_16k
from assistant.config import Config
from assistant.demo import draw_scene, speak_question
from assistant.pipeline import Pipeline

QUESTION = "What do you see on the table?"


def _median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


async def _serial(parts, wav: Path) -> float:
    """The naive turn: every stage waits for the one before; seconds to the first audio."""
    pcm = read_wav_16k(wav)
    t0 = time.monotonic()
    heard = await asyncio.to_thread(parts.asr.transcribe, pcm)
    emb = None
    if parts.camera is not None and parts.encoder is not None:
        frame = await asyncio.to_thread(parts.camera.snapshot)
        emb = await asyncio.to_thread(parts.encoder.encode, frame)
    pieces: list[str] = []
    await asyncio.to_thread(parts.llm.run_turn, heard.text, emb, False, pieces.append)
    splitter = SentenceSplitter()
    sentences = splitter.feed("".join(pieces)) + splitter.flush()
    tts = parts.voices.for_language("en")
    for s in sentences:
        await asyncio.to_thread(tts.synthesize, s)
    return time.monotonic() - t0


async def measure(cfg: Config, profile: str, wav: Path, image: Path, rounds: int) -> dict:
    models = None
    if profile != "measured":
        from assistant.bench_profiles import PROFILES, SimulatedEncoder, SimulatedLLM

        p = PROFILES[profile]
        models = (SimulatedLLM(p, cfg.llm.max_context_len), SimulatedEncoder(p), False)
    source = components.wav_source(cfg, wav, realtime=True)
    parts = await components.assemble(cfg, source, lambda rate: components.wav_sink(None, rate),
                                      image=image, use_camera=False, models=models)
    pipelined, serial = [], []
    try:
        for _ in range(rounds):
            parts.source = components.wav_source(cfg, wav, realtime=True)
            pipe = Pipeline(cfg, parts)
            await pipe.run(greet=False)
            pipelined += pipe.turns
            await asyncio.to_thread(parts.llm.clear)
            serial.append(await _serial(parts, wav) * 1000.0)
            await asyncio.to_thread(parts.llm.clear)
    finally:
        await components.close(parts)
    stages = {}
    for key in ("asr_ms", "vision_wait_ms", "encode_ms", "llm_ms", "llm_first_piece_ms",
                "first_sentence_ms", "first_audio_ms"):
        stages[key] = _median(t.summary().get(key) for t in pipelined)
    first_audio = stages["first_audio_ms"]
    serial_ms = _median(serial)
    return {
        "profile": profile,
        "llm": parts.llm.name,
        "rounds": rounds,
        "question": pipelined[-1].transcript if pipelined else "",
        "stages_ms": stages,
        "vad_end_silence_ms": cfg.vad.end_silence_ms,
        "pipelined_first_audio_ms": first_audio,
        "serial_first_audio_ms": serial_ms,
        "speedup": round(serial_ms / first_audio, 2) if first_audio and serial_ms else None,
    }


def run_bench(cfg: Config, args) -> int:
    if args.profile != "measured":
        # The simulated NPU encoder needs a picture to look at.
        cfg = replace(cfg, vision=replace(cfg.vision, encoder="rknn"))
    with tempfile.TemporaryDirectory(prefix="rkvlm-bench-") as d:
        image = draw_scene(Path(d) / "scene.jpg")
        wav = speak_question(cfg, QUESTION, Path(d) / "question.wav")
        report = asyncio.run(measure(cfg, args.profile, wav, image, args.turns))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"profile {report['profile']} (llm: {report['llm']}), {report['rounds']} rounds, "
          f"question heard as {report['question']!r}")
    for k, v in report["stages_ms"].items():
        print(f"  {k:<22} {v if v is not None else '-':>8} ms")
    print(f"  end of utterance -> first audio: pipelined {report['pipelined_first_audio_ms']} ms, "
          f"serial {report['serial_first_audio_ms']} ms, speed-up x{report['speedup']}")
    print(f"  (a person also waits vad.end_silence_ms = {report['vad_end_silence_ms']} ms "
          f"before the utterance is cut)")
    return 0
