"""`rkvlm-assistant check` and `rkvlm-assistant devices`.

check reports every problem at once (a missing or corrupt model, an absent device, a runtime
that will not load, a language the models cannot hear or speak), not just the first, so a
person fixes them in one go; and lists the keys of an earlier release the config still uses.
It loads what the service loads at start through the same probes (assistant.preflight): a
config check passes is one the service starts with.
"""

from __future__ import annotations

import logging
from pathlib import Path

from assistant import preflight
from assistant.config import EX_CONFIG, Config
from assistant.errors import DeviceError

log = logging.getLogger(__name__)


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


def run_check(cfg: Config, service: bool = False, root: Path = Path("/")) -> int:
    """Every start-up probe the service's `run` goes through (assistant.preflight), and the
    devices; ``service``: as the installed service (root, or --root DIR)."""
    print(f"config: {cfg.source}: valid")
    for w in cfg.warnings:
        print(f"  WARN {w}")
    failures: list[str] = []
    # zh cannot work with English-only models: a configuration error. auto still answers in
    # English with them (every earlier release's default), so it is a warning: an upgrade
    # that runs `check` before restarting the service must not be blocked by it.
    fatal = cfg.persona.language == "zh"
    for problem in language_problems(cfg):
        print(f"  {'FAIL' if fatal else 'WARN'} {cfg.source}: {problem}")
        if fatal:
            failures.append("model")       # a configuration problem: exit 78
    for o in preflight.run_all(preflight.probes(cfg, command="run", service=service, root=root)):
        if o.error is not None:
            print(f"  FAIL {o.line}")
            failures.append("model" if o.permanent else "device")
        elif o.probe.show_ok:
            label, detail = o.probe.label, o.detail
            warn = detail.startswith(preflight.WARNING)      # works, but not as configured
            detail = detail.removeprefix(preflight.WARNING)
            print(f"  {'WARN' if warn else 'ok  '} {label}"
                  + (f": {detail}" if label and detail else detail))
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
