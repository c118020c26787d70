"""Start-up probes: everything the service loads at start, as one list that `check` and the
daemon's start-up (`run`, `serve`) both go through, so the two cannot drift.

Each probe names its config key; its failure says the cause and what to do. `check` runs
them all and prints one line each. `run` / `serve` run the same probes (the devices apart:
the daemon opens and retries those itself) at start, in worker threads at once, while the
language model loads (components.assemble); a problem found there that a restart cannot
fix (a missing or corrupt model, a backend package that is not installed) ends the process
with exit 78, which the unit does not restart, and the same message `check` prints.

A probe is the real load where the part is loaded at start anyway (whisper, the voices,
Smart Turn: the daemon keeps what the probe loaded, nothing is loaded twice) and a cheap
equivalent for the language model (llama.cpp's loader on the GGUF index and vocabulary,
the RKLLM library), which the daemon then loads in full.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from assistant.config import (Config, ConfigError, active_file_keys, file_settings,
                              missing_file_error)
from assistant.errors import AssistantError, DeviceError

log = logging.getLogger(__name__)

EX_CONFIG = 78
# A probe's detail that starts so is a warning: the part works, not as configured.
WARNING = "WARNING: "
# A message that already names its key near the start ("tts.voice_zh: ...").
_NAMES_KEY = re.compile(r"\b[a-z_]+(?:\.[a-z0-9_]+)+:")


class StartupError(AssistantError):
    """A problem found at start that a restart will not fix: exit 78."""

    exit_code = EX_CONFIG


@dataclass
class Loaded:
    """What the probes loaded for real, for the daemon to use instead of loading it again."""

    asr: object = None
    voice: object = None             # tts.voice's Synthesizer
    voice_zh: object = None          # tts.voice_zh's, when it is set
    smart_turn: object = None

    @property
    def voices(self):
        """The VoiceSet of the loaded voices (None when tts.voice was not loaded)."""
        if self.voice is None:
            return None
        from assistant.audio.tts import VoiceSet
        return VoiceSet.of(self.voice, self.voice_zh)


@dataclass(frozen=True)
class Probe:
    label: str                       # check's line ("" for a rule whose message says it all)
    key: str                         # the config key it is about
    run: Callable[[Loaded], str]     # the detail for an ok line; raises on a problem
    device: bool = False             # a device: may come back, so never exit 78 for it
    at_start: bool = True            # the daemon runs it too (devices: it opens them itself)
    show_ok: bool = True


@dataclass
class Outcome:
    probe: Probe
    detail: str = ""
    error: Optional[BaseException] = None

    @property
    def message(self) -> str:
        """The problem in one line, naming the config key."""
        e = self.error
        known = isinstance(e, (AssistantError, ConfigError))
        text = str(e) if known else f"{type(e).__name__}: {e}"
        return text if _NAMES_KEY.search(text[:60]) else f"{self.probe.key}: {text}"

    @property
    def line(self) -> str:
        """What check prints and the daemon logs for a problem."""
        return f"{self.probe.label}: {self.message}" if self.probe.label else self.message

    @property
    def permanent(self) -> bool:
        """A restart will not fix it (a device may come back, memory may be free later)."""
        return not (self.probe.device or isinstance(self.error, (DeviceError, MemoryError)))


# --------------------------------------------------------------------------- the list

def probes(cfg: Config, *, command: str = "run", service: bool = False,
           root: Path = Path("/")) -> list[Probe]:
    """Every start-up probe for ``command`` (run, serve; check asks for run's, the
    service's command); ``service``: as the installed service runs (wake.mode auto,
    the unit's writable directories); ``root``: the installation's tree (check --root)."""
    from assistant import preflight_parts as parts

    out: list[Probe] = []
    keys = active_file_keys(cfg)
    if parts.llamacpp_vision(cfg):
        keys.discard("llm.llamacpp.mmproj")     # its own probe reads it
    for key, path in file_settings(cfg):
        if key in keys:
            out.append(Probe("", key, _file_exists(cfg, key, path), show_ok=False))
    if cfg.http.enabled or command == "serve":
        out.append(Probe("", "http.listen", parts.http_listen(cfg)))
    if cfg.wyoming.enabled:
        out.append(Probe("", "wyoming.uri", parts.wyoming_uri(cfg)))
    out += [
        Probe(f"speech recognition (asr.model: {cfg.asr.model})", "asr.model", parts.asr(cfg)),
        Probe(f"speech synthesis (tts.voice: {cfg.tts.voice})", "tts.voice",
              parts.voice(cfg, "tts.voice")),
    ]
    if cfg.tts.voice_zh and cfg.tts.voice_zh != cfg.tts.voice:
        out.append(Probe(f"Chinese voice (tts.voice_zh: {cfg.tts.voice_zh})", "tts.voice_zh",
                         parts.voice(cfg, "tts.voice_zh")))
    out += [
        Probe(f"language model (llm.backend: {cfg.llm.backend})", "llm.backend",
              parts.language_model(cfg)),
        Probe("vision encoder (vision.encoder)", "vision.encoder", parts.encoder(cfg)),
    ]
    if parts.llamacpp_vision(cfg):
        out.append(Probe("vision projector (llm.llamacpp.mmproj)", "llm.llamacpp.mmproj",
                         parts.projector(cfg)))
    if command == "run":
        if cfg.vad.end_of_turn == "smart_turn":
            key = "vad.smart_turn_model" if cfg.vad.smart_turn_model else "vad.end_of_turn"
            out.append(Probe("end of turn (vad.end_of_turn: smart_turn)", key,
                             parts.smart_turn(cfg)))
        out.append(Probe(parts.wake_label(cfg, service), "wake.mode", parts.wake(cfg, service)))
        if cfg.logging.debug_recording:
            out.append(Probe("debug recording (logging.debug_recording)",
                             "logging.debug_recording", parts.record_dir(cfg, service, root)))
        out += [
            Probe(f"microphone (audio.input.device: {cfg.audio.input.device})",
                  "audio.input.device", parts.device(cfg.audio.input.device, "input"),
                  device=True, at_start=False),
            Probe(f"speaker (audio.output.device: {cfg.audio.output.device})",
                  "audio.output.device", parts.device(cfg.audio.output.device, "output"),
                  device=True, at_start=False),
        ]
    out.append(Probe(f"camera (camera.source: {cfg.camera.source})", "camera.source",
                     parts.camera(cfg), device=True, at_start=False))
    return out


def _file_exists(cfg: Config, key: str, path: Path) -> Callable[[Loaded], str]:
    def run(_: Loaded) -> str:
        if not path.is_file():
            raise missing_file_error(cfg, key, path)
        return str(path)
    return run


# --------------------------------------------------------------------------- running them

def run_probe(probe: Probe, loaded: Loaded) -> Outcome:
    try:
        return Outcome(probe, probe.run(loaded) or "")
    except Exception as e:          # a probe reports; it never ends the caller
        return Outcome(probe, error=e)


def run_all(found: list[Probe], loaded: Optional[Loaded] = None) -> list[Outcome]:
    """Every probe, in order, one after the other (check)."""
    loaded = loaded if loaded is not None else Loaded()
    return [run_probe(p, loaded) for p in found]


async def start(cfg: Config, *, command: str, service: bool) -> Loaded:
    """The daemon's start: every probe it runs, at once in worker threads. Every problem is
    logged; a permanent one raises StartupError (exit 78) with check's message, a device's
    its own error. Returns what the probes loaded."""
    loaded = Loaded()
    found = [p for p in probes(cfg, command=command, service=service) if p.at_start]
    outcomes = await asyncio.gather(*(asyncio.to_thread(run_probe, p, loaded) for p in found))
    failed = [o for o in outcomes if o.error is not None]
    for o in failed:
        log.error("%s", o.line)
    permanent = [o for o in failed if o.permanent]
    if permanent:
        raise StartupError(permanent[0].message)
    if failed:
        raise failed[0].error
    return loaded


__all__ = ["EX_CONFIG", "Loaded", "Outcome", "Probe", "StartupError", "probes", "run_all",
           "run_probe", "start"]
