"""Wyoming ``describe`` -> ``info``: what this board offers Home Assistant.

Three programs, each ``installed: true`` with attribution and version: ``asr``
(faster-whisper with the configured model and the languages it can transcribe), ``tts``
(piper with every configured voice) and ``handle`` (the assistant's conversation, which sees
through the camera when one is configured). Built from the loaded parts alone, so it is
answered at once.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import Optional

from wyoming.event import Event
from wyoming.info import (AsrModel, AsrProgram, Attribution, HandleModel, HandleProgram, Info,
                          TtsProgram, TtsVoice)

PROGRAM = "rkvlm-assistant"
_PROJECT = Attribution(name="rkvlm-assistant", url="")   # no public home page yet
_FASTER_WHISPER = Attribution(name="SYSTRAN", url="https://github.com/SYSTRAN/faster-whisper")
_WHISPER = Attribution(name="OpenAI", url="https://github.com/openai/whisper")
_PIPER = Attribution(name="Rhasspy", url="https://github.com/rhasspy/piper")


@functools.lru_cache(maxsize=None)
def version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def asr_languages(asr) -> list[str]:
    """What the whisper model transcribes: en for an English-only one, else whisper's list."""
    if asr is None or not asr.multilingual:
        return ["en"]
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return sorted(_LANGUAGE_CODES)


def handle_languages(cfg) -> list[str]:
    lang = cfg.persona.language
    return ["en", "zh"] if lang == "auto" else [lang]


def llm_name(cfg) -> str:
    if cfg.llm.backend == "rkllm":
        return Path(str(cfg.llm.rkllm.model or "rkllm")).name
    return Path(str(cfg.llm.llamacpp.model)).name


def build_info(services) -> Info:
    cfg, asr, voices = services.cfg, services.asr, services.voices
    info = Info()
    if asr is not None:
        info.asr.append(AsrProgram(
            name="faster-whisper", attribution=_FASTER_WHISPER, installed=True,
            description=f"Whisper on the {PROGRAM} board's CPU", version=version("faster-whisper"),
            models=[AsrModel(name=cfg.asr.model, attribution=_WHISPER, installed=True,
                             description=f"whisper {cfg.asr.model} (CTranslate2, int8)",
                             version=None, languages=asr_languages(asr))],
            supports_transcript_streaming=True))
    if voices is not None:
        synths = [voices.default] + ([voices.zh] if voices.zh is not None else [])
        info.tts.append(TtsProgram(
            name="piper", attribution=_PIPER, installed=True,
            description=f"Piper voices of {PROGRAM}", version=version("piper-tts"),
            voices=[TtsVoice(name=s.name, attribution=_PIPER, installed=True,
                             description=f"{s.name} ({s.sample_rate} Hz)", version=None,
                             languages=[s.language or "en_US"]) for s in synths],
            supports_synthesize_streaming=True))
    conv = services.conversation
    camera = conv.scene is not None and conv.scene.enabled
    info.handle.append(HandleProgram(
        name=PROGRAM, attribution=_PROJECT, installed=conv.backend is not None,
        description=("The assistant's conversation: answers questions about what its camera "
                     "sees" if camera else "The assistant's conversation (no camera)"),
        version=version(PROGRAM),
        models=[HandleModel(name=llm_name(cfg), attribution=_PROJECT,
                            installed=conv.backend is not None,
                            description=f"{cfg.llm.backend} language model", version=None,
                            languages=handle_languages(cfg))],
        supports_handled_streaming=True))
    return info


def info_event(services) -> Event:
    return build_info(services).event()
