"""`rkvlm-assistant check` and `rkvlm-assistant devices`.

check reports every problem at once (a missing model, an absent device, a runtime that will
not load, a language the models cannot hear or speak), not just the first, so a person fixes
them in one go; and lists the keys of an earlier release the config still uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from assistant import components
from assistant.config import EX_CONFIG, Config, check_files
from assistant.errors import AssistantError, DeviceError

log = logging.getLogger(__name__)


def _probe(label: str, fn: Callable[[], object], failures: list, kind: str) -> None:
    try:
        detail = fn()
        print(f"  ok   {label}" + (f": {detail}" if detail else ""))
    except AssistantError as e:
        print(f"  FAIL {label}: {e}")
        failures.append(kind)
    except Exception as e:  # a probe must report, not crash the check
        print(f"  FAIL {label}: {type(e).__name__}: {e}")
        failures.append(kind)


def _english_only_whisper(model: str) -> bool:
    """A .en whisper (tiny.en, or a directory named like one) hears English only."""
    return Path(model.rstrip("/\\")).name.endswith(".en")


def language_problems(cfg: Config) -> list[str]:
    """What keeps a Chinese (or auto) persona from hearing or speaking Chinese, each with the
    key to set. An English persona needs nothing more."""
    lang = cfg.persona.language
    if lang == "en":
        return []
    who = f"persona.language is {lang}"
    instead = " (or persona.language: en)" if lang == "auto" else ""
    problems = []
    if _english_only_whisper(cfg.asr.model):
        problems.append(f"asr.model: {who} but {cfg.asr.model} is an English-only whisper, it "
                        f"cannot hear Chinese; set asr.model to a multilingual one (base, "
                        f"small){instead}")
    elif cfg.asr.language == "en":
        problems.append(f"asr.language: {who} but asr.language is en, whisper writes Chinese "
                        f"speech as English; set asr.language to auto or zh{instead}")
    if cfg.tts.voice_zh is None and not Path(str(cfg.tts.voice)).name.lower().startswith("zh"):
        problems.append(f"tts.voice_zh: {who} but tts.voice_zh is null, Chinese answers would "
                        f"be read by the English voice {cfg.tts.voice}; set tts.voice_zh to a "
                        f"Chinese piper voice (zh_CN-huayan-medium){instead}")
    return problems


def run_check(cfg: Config) -> int:
    print(f"config: {cfg.source}: valid")
    for w in cfg.warnings:
        print(f"  WARN {w}")
    failures: list[str] = []
    for e in check_files(cfg):
        print(f"  FAIL {e}")
        failures.append("model")
    # zh cannot work with English-only models: a configuration error. auto still answers in
    # English with them (every earlier release's default), so it is a warning: an upgrade
    # that runs `check` before restarting the service must not be blocked by it.
    fatal = cfg.persona.language == "zh"
    for problem in language_problems(cfg):
        print(f"  {'FAIL' if fatal else 'WARN'} {cfg.source}: {problem}")
        if fatal:
            failures.append("model")       # a configuration problem: exit 78
    if cfg.http.enabled:
        from assistant.config import ConfigError
        from assistant.http.server import check_listen
        try:
            host, port = check_listen(cfg)
            print(f"  ok   http API and page on {host}:{port}")
        except ConfigError as e:
            print(f"  FAIL {e}")
            failures.append("model")       # a configuration problem: exit 78
    if cfg.wyoming.enabled:
        from assistant.config import ConfigError
        from assistant.http.server import is_loopback
        from assistant.wyoming import check_uri
        try:
            host, port = check_uri(cfg)
            print(f"  ok   Wyoming server for Home Assistant on {host}:{port}"
                  + ("" if is_loopback(host) else " (no authentication: open to the network, "
                     "wyoming.allow_lan)"))
        except ConfigError as e:
            print(f"  FAIL {e}")
            failures.append("model")

    def asr():
        from assistant.audio.model_paths import resolve_whisper
        return str(resolve_whisper(cfg.asr, cfg.path))

    def tts():
        from assistant.audio.model_paths import resolve_voice
        names = [("tts.voice", cfg.tts.voice)] + ([("tts.voice_zh", cfg.tts.voice_zh)] if cfg.tts.voice_zh else [])
        return ", ".join(str(resolve_voice(cfg.tts, n, cfg.path, key=k)[0]) for k, n in names)

    def llm():
        if cfg.llm.backend == "rkllm":
            from assistant.llm.rkllm import probe_library
            return probe_library(cfg.llm.rkllm, cfg.path)
        from assistant.llm.catalog import resolve
        model, mmproj = resolve(cfg.llm.llamacpp, cfg.path)
        return f"{model}" + (f" + {mmproj}" if mmproj and cfg.vision.encoder == "llamacpp" else "")

    def encoder():
        if cfg.vision.encoder == "rknn":
            from assistant.vision.rknn_encoder import probe_rknnlite
            return probe_rknnlite()
        return f"{cfg.vision.encoder}"

    _probe(f"speech recognition (asr.model: {cfg.asr.model})", asr, failures, "model")
    _probe(f"speech synthesis (tts.voice: {cfg.tts.voice})", tts, failures, "model")
    _probe(f"language model (llm.backend: {cfg.llm.backend})", llm, failures, "model")
    _probe("vision encoder (vision.encoder)", encoder, failures, "model")

    def mic():
        from assistant.audio.devices import describe_device
        return describe_device(cfg.audio.input.device, "input")

    def spk():
        from assistant.audio.devices import describe_device
        return describe_device(cfg.audio.output.device, "output")

    def cam():
        if cfg.camera.source is None or cfg.vision.encoder == "none":
            return "none configured"
        c = components.camera(cfg)
        c.open()
        try:
            frame = c.snapshot()
            return f"{c.name}: {frame.shape[1]}x{frame.shape[0]}"
        finally:
            c.close()

    _probe(f"microphone (audio.input.device: {cfg.audio.input.device})", mic, failures, "device")
    _probe(f"speaker (audio.output.device: {cfg.audio.output.device})", spk, failures, "device")
    _probe(f"camera (camera.source: {cfg.camera.source})", cam, failures, "device")
    if not failures:
        print("all good")
        return 0
    print(f"{len(failures)} problem(s) found")
    return EX_CONFIG if "model" in failures else DeviceError.exit_code


def print_devices() -> int:
    from assistant.audio.devices import list_audio_devices
    from assistant.vision.camera import list_cameras

    try:
        inputs, outputs = list_audio_devices()
    except DeviceError as e:
        print(f"audio: {e}")
        inputs, outputs = [], []
    for title, devs in (("microphones (audio.input.device)", inputs),
                        ("speakers (audio.output.device)", outputs)):
        print(f"{title}:")
        for d in devs:
            print(f"  {d}")
        if not devs:
            print("  (none)")
    print("cameras (camera.source):")
    cams = list_cameras()
    for c in cams:
        print(f"  {c}")
    if not cams:
        print("  (none)")
    return 0
