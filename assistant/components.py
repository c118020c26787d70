"""Build the pipeline's parts from the config, and load them in parallel.

This is the one place that maps settings to implementations: a new device or backend is
one new module and one branch here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from pathlib import Path
from typing import Optional

from assistant.audio.base import AudioSink, AudioSource
from assistant.config import Config, ConfigError
from assistant.errors import DeviceError, ModelMissingError
from assistant.pipeline import Components

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- devices

def microphone(cfg: Config) -> AudioSource:
    from assistant.audio.mic import MicSource

    return MicSource(cfg.audio.input, frame_ms=cfg.vad.frame_ms)


def speaker(cfg: Config) -> AudioSink:
    from assistant.audio.speaker import SpeakerSink

    return SpeakerSink(cfg.audio.output)


def wav_source(cfg: Config, path: Path, realtime: bool = False) -> AudioSource:
    from assistant.audio.wav_source import WavSource

    return WavSource(path, frame_ms=cfg.vad.frame_ms, realtime=realtime)


def wav_sink(path: Optional[Path], sample_rate: int) -> AudioSink:
    """A WAV file at the voice's own rate (no resampling), or nothing when path is None."""
    if path is None:
        from assistant.audio.null_sink import NullSink
        return NullSink(sample_rate)
    from assistant.audio.wav_sink import WavSink

    return WavSink(path, sample_rate=sample_rate)


def camera(cfg: Config, image: Optional[Path] = None):
    """The configured camera, or a file camera on ``image`` (ask / demo)."""
    from assistant.vision.camera import make_camera

    if image is not None:
        from dataclasses import replace
        return make_camera(replace(cfg.camera, source=str(image)), cfg.path)
    return make_camera(cfg.camera, cfg.path)


# ---------------------------------------------------------------------------- models

def transcriber(cfg: Config):
    from assistant.audio.asr import Transcriber
    from assistant.audio.model_paths import resolve_whisper

    return Transcriber(cfg.asr, resolve_whisper(cfg.asr, cfg.path))


def voices(cfg: Config):
    from assistant.audio.tts import VoiceSet

    return VoiceSet(cfg.tts, cfg.path)


def language_model(cfg: Config, image_given: bool = False):
    """(backend, encoder or None, encoder loads from the LLM) for the configured backends.

    ``image_given``: a picture comes with the question (`ask --image`), so the encoder is
    needed even when no camera is configured."""
    with_vision = cfg.vision.encoder != "none" and (cfg.camera.source is not None or image_given)
    if cfg.llm.backend == "rkllm":
        from assistant.llm.rkllm import RkllmBackend

        llm = RkllmBackend(cfg.llm, cfg.persona, with_vision=with_vision and cfg.vision.encoder == "rknn",
                           resolve_path=cfg.path)
    else:
        from assistant.llm.catalog import resolve
        from assistant.llm.llamacpp import LlamaCppBackend

        want_mmproj = with_vision and cfg.vision.encoder == "llamacpp"
        model, mmproj = resolve(cfg.llm.llamacpp, cfg.path, want_mmproj=want_mmproj)
        llm = LlamaCppBackend(cfg.llm, cfg.persona, model, mmproj if want_mmproj else None)
    if not with_vision:
        return llm, None, False
    if cfg.vision.encoder == "rknn":
        from assistant.vision.rknn_encoder import RknnEncoder

        family = cfg.vision.family or cfg.llm.rkllm.family
        return llm, RknnEncoder(cfg.vision.rknn, family, cfg.path), False
    if cfg.llm.backend != "llamacpp":
        raise ConfigError(f"{cfg.source}: vision.encoder: 'llamacpp' needs llm.backend: llamacpp "
                          f"(with llm.backend: rkllm use vision.encoder: rknn)",
                          key="vision.encoder", source=cfg.source)
    # llama.cpp's projector is part of the loaded model: it loads after the LLM.
    return llm, llm.encoder(), True


# ---------------------------------------------------------------------------- assembly

async def _timed(name: str, fn, timings: dict) -> None:
    t0 = time.monotonic()
    await asyncio.to_thread(fn)
    timings[name] = time.monotonic() - t0


async def _ready(value):
    return value


async def assemble(cfg: Config, source: AudioSource, sink_factory, *, image: Optional[Path] = None,
                   use_camera: bool = True, allow_missing_llm: bool = False,
                   models: Optional[tuple] = None, cam=None, loading=None) -> Components:
    """Create every part and load the models in parallel (whisper, piper, the LLM and the
    vision encoder at once: on a board the NPU loads overlap the CPU ones).

    ``sink_factory(voice_rate)`` makes the sink once the voice's rate is known (a WAV sink
    writes at the voice's own rate; a speaker ignores it). With ``allow_missing_llm`` a
    missing LLM model does not stop the voice loop: questions get the reason spoken instead.
    ``models`` = (llm, encoder, encoder_loads_from_llm) replaces the configured ones (the
    benchmark's simulated NPU stages); ``cam`` an already made camera. ``loading``: the
    daemon's start-up probes (assistant.preflight.start, or their preflight.Loaded), run
    while the language model loads: whisper, the voices and Smart Turn are the ones they
    loaded, and their problem (exit 78, with check's message) comes before any other.
    """
    t0 = time.monotonic()
    if loading is not None and not inspect.isawaitable(loading):
        loading = _ready(loading)
    try:
        return await _assemble(cfg, source, sink_factory, image, use_camera, allow_missing_llm,
                               models, cam, loading, t0)
    finally:
        if (inspect.iscoroutine(loading)
                and inspect.getcoroutinestate(loading) == inspect.CORO_CREATED):
            loading.close()          # failed before the probes started: no warning about it


async def _assemble(cfg, source, sink_factory, image, use_camera, allow_missing_llm, models, cam,
                    loading, t0) -> Components:
    asr = tts = None
    if loading is None:
        asr = transcriber(cfg)
        tts = voices(cfg)
    llm = encoder = None
    after_llm = False
    problem = ""
    early: Optional[Exception] = None       # the probes say it too, with the rest
    try:
        llm, encoder, after_llm = (models if models is not None
                                   else language_model(cfg, image_given=image is not None))
    except (ModelMissingError, ConfigError) as e:
        if loading is not None:
            early = e
        elif not allow_missing_llm or isinstance(e, ConfigError):
            raise
        else:
            problem = str(e)
            log.error("%s", e)
    if cam is None and (use_camera or image is not None) and cfg.vision.encoder != "none":
        cam = camera(cfg, image)

    timings: dict = {}
    jobs = []
    if loading is not None:
        async def probes():
            t = time.monotonic()
            found = await loading
            timings["probes (asr, tts)"] = time.monotonic() - t
            return found
        jobs.append(probes())
    else:
        jobs += [_timed("asr", asr.load, timings), _timed("tts", tts.load, timings)]
    if llm is not None:
        async def llm_then_encoder():
            await _timed("llm", llm.load, timings)
            if encoder is not None:   # the projector needs the loaded LLM (llama.cpp)
                await _timed("encoder", encoder.load, timings)
        jobs.append(llm_then_encoder() if after_llm else _timed("llm", llm.load, timings))
        if encoder is not None and not after_llm:
            jobs.append(_timed("encoder", encoder.load, timings))
    camera_down = ""
    if cam is not None:
        async def open_camera():
            nonlocal camera_down
            try:
                await _timed("camera", cam.open, timings)
            except DeviceError as e:
                # A camera that is unplugged now may be back later: answer without the
                # picture meanwhile (the vision stage reopens it at each question).
                camera_down = str(e)
                log.error("%s; answering without the picture until it is back", e)
        jobs.append(open_camera())
    results = await asyncio.gather(*jobs, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    smart_turn = None
    if loading is not None and not isinstance(results[0], BaseException):
        asr, tts, smart_turn = results[0].asr, results[0].voices, results[0].smart_turn
        if early is not None:
            errors.append(early)
    sink = None
    if not errors:
        try:
            sink = sink_factory(tts.sample_rate)
            await sink.open()
        except Exception as e:
            errors.append(e)
    if errors:
        for part in (encoder, llm, cam):
            if part is not None:
                part.close()
        raise errors[0]
    log.info("ready in %.1f s (%s)", time.monotonic() - t0,
             ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return Components(source=source, sink=sink, asr=asr, voices=tts, llm=llm,
                      llm_problem=problem, camera=cam, encoder=encoder,
                      camera_down=camera_down,
                      smart_turn=smart_turn)


async def close(parts: Components) -> None:
    """Release everything (idempotent parts; errors logged, never raised at shutdown)."""
    for name, fn in (("source", parts.source.close), ("sink", parts.sink.close)):
        try:
            await fn()
        except Exception as e:
            log.warning("closing the %s: %s", name, e)
    for part in (parts.encoder, parts.llm, parts.camera):
        if part is not None:
            try:
                await asyncio.to_thread(part.close)
            except Exception as e:
                log.warning("closing %s: %s", type(part).__name__, e)
