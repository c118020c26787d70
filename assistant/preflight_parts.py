"""The start-up probes' work, one function per part (assistant.preflight lists them).

Each ``part(cfg)`` returns ``run(loaded) -> detail``: it loads or validates the part the way
the daemon will at start, puts what it loaded for real in ``loaded`` (preflight.Loaded), and
raises an error whose message names the key, the cause and what to do.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

from assistant.config import Config, ConfigError
from assistant.errors import ModelMissingError

Run = Callable[[object], str]


def http_listen(cfg: Config) -> Run:
    def run(_) -> str:
        from assistant.http.server import check_listen
        host, port = check_listen(cfg)
        return f"http API and page on {host}:{port}"
    return run


def wyoming_uri(cfg: Config) -> Run:
    def run(_) -> str:
        from assistant.http.server import is_loopback
        from assistant.wyoming import check_uri
        host, port = check_uri(cfg)
        return (f"Wyoming server for Home Assistant on {host}:{port}"
                + ("" if is_loopback(host) else " (no authentication: open to the network, "
                   "wyoming.allow_lan)"))
    return run


def asr(cfg: Config) -> Run:
    def run(loaded) -> str:
        from assistant import components
        model = components.transcriber(cfg)
        model.load()                 # the daemon keeps it
        loaded.asr = model
        return str(model.model_path)
    return run


def voice(cfg: Config, key: str) -> Run:
    """tts.voice or tts.voice_zh, loaded (the daemon keeps it: preflight.Loaded.voices)."""
    def run(loaded) -> str:
        from assistant.audio.model_paths import resolve_voice
        from assistant.audio.tts import Synthesizer
        name = cfg.tts.voice if key == "tts.voice" else cfg.tts.voice_zh
        syn = Synthesizer(*resolve_voice(cfg.tts, name, cfg.path, key=key), cfg.tts, key=key)
        syn.load()
        setattr(loaded, "voice" if key == "tts.voice" else "voice_zh", syn)
        return str(syn.voice_onnx)
    return run


def llamacpp_vision(cfg: Config) -> bool:
    """The daemon loads llama.cpp's projector (as components.language_model decides)."""
    return (cfg.vision.encoder == "llamacpp" and cfg.camera.source is not None
            and cfg.llm.backend == "llamacpp")


def language_model(cfg: Config) -> Run:
    def run(_) -> str:
        if cfg.llm.backend == "rkllm":
            from assistant.llm.rkllm import probe_library
            return probe_library(cfg.llm.rkllm, cfg.path)
        from assistant.llm import gguf_probe
        from assistant.llm.catalog import resolve
        # The projector is its own probe: a bad one must not hide the model's state.
        model, _ = resolve(replace(cfg.llm.llamacpp, mmproj=None), cfg.path, want_mmproj=False)
        return gguf_probe.check_model(model)       # llama-cpp-python missing: BackendError
    return run


def projector(cfg: Config) -> Run:
    def run(_) -> str:
        from assistant.llm import gguf_probe
        from assistant.llm.catalog import resolve
        _, mmproj = resolve(cfg.llm.llamacpp, cfg.path, want_mmproj=True)
        if mmproj is None:
            return "none set: the model gets no picture (set llm.llamacpp.mmproj)"
        return gguf_probe.check_projector(mmproj)
    return run


def encoder(cfg: Config) -> Run:
    def run(_) -> str:
        if cfg.vision.encoder == "none" or cfg.camera.source is None:
            return "none" if cfg.vision.encoder == "none" else "not used (camera.source: null)"
        if cfg.vision.encoder == "rknn":
            from assistant.vision.rknn_encoder import probe_rknnlite
            return probe_rknnlite()
        if cfg.llm.backend != "llamacpp":
            raise ConfigError(f"{cfg.source}: vision.encoder: 'llamacpp' needs llm.backend: "
                              f"llamacpp (with llm.backend: rkllm use vision.encoder: rknn)",
                              key="vision.encoder", source=cfg.source)
        return "llamacpp (the language model's projector)"
    return run


def smart_turn(cfg: Config) -> Run:
    def run(loaded) -> str:
        from assistant.audio.smart_turn import SmartTurnModel, model_path
        try:
            path = model_path(cfg)
        except ModelMissingError as e:
            if cfg.vad.smart_turn_model:
                raise
            # The daemon warns and ends utterances by silence (make_turn_ender): not fatal.
            from assistant.preflight import WARNING
            return f"{WARNING}{e}; utterances end after vad.end_silence_ms of silence"
        loaded.smart_turn = SmartTurnModel(path).load()   # the voice loop keeps it
        return str(path)
    return run


def wake_label(cfg: Config, service: bool) -> str:
    """The wake mode in force, as one line: wake.mode with auto decided."""
    from assistant.audio.wake import resolve_mode
    mode = resolve_mode(cfg.wake, service=service)
    how = cfg.wake.mode
    if how == "auto":
        how = ("auto, as the service runs it under systemd" if service
               else "auto, when not run by systemd")
    return f"wake mode {mode} (wake.mode: {how})"


def wake(cfg: Config, service: bool) -> Run:
    def run(_) -> str:
        from assistant.audio.wake import WakeWord, resolve_mode
        mode = resolve_mode(cfg.wake, service=service)
        if mode == "word":
            word = WakeWord(cfg.wake)
            word.load()
            word.close()
            return f"listens for {word.phrase!r} (wake.word: {cfg.wake.word})"
        if mode == "phrase":
            return "an utterance is a question when it starts with " + ", ".join(cfg.wake.phrases)
        if cfg.wake.mode == "auto" and service:
            return ("pymicro-wakeword is not installed, so every utterance is a question "
                    "(install it for the wake word)")
        return "every utterance is a question"
    return run


def record_dir(cfg: Config, service: bool, root: Path) -> Run:
    def run(_) -> str:
        d = cfg.path(cfg.logging.debug_recording)
        if service:
            seen = Path("/") / d.relative_to(root) if root != Path("/") and root in d.parents else d
            allowed, strict = unit_writable(root)
            if strict and not any(seen == a or a in seen.parents for a in allowed):
                use = next((a for a in allowed if a.parent == Path("/var/lib")), None)
                raise ConfigError(
                    f"logging.debug_recording: {seen} is read-only for the service (its unit has "
                    f"ProtectSystem=strict: it may write only in {', '.join(map(str, allowed))}); "
                    f"set logging.debug_recording: "
                    f"{use or '/var/lib/rkvlm-assistant'}/debug-recording",
                    key="logging.debug_recording")
        existing = d
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ConfigError(f"logging.debug_recording: {d} cannot be written here ({existing} "
                              f"is not a writable directory); choose a directory this user may "
                              f"write", key="logging.debug_recording")
        return str(d)
    return run


def unit_writable(root: Path = Path("/")) -> tuple[list[Path], bool]:
    """The directories the unit lets the service write (ReadWritePaths=, StateDirectory=,
    CacheDirectory=, LogsDirectory=, RuntimeDirectory=), and whether the rest is read-only
    (ProtectSystem=strict). Read from the installed unit and its drop-ins, or the shipped one."""
    from assistant.install import UNIT_DIR, UNIT_NAME
    installed = root / UNIT_DIR.lstrip("/") / UNIT_NAME
    shipped = Path(__file__).resolve().parents[1] / "systemd" / UNIT_NAME
    files = [installed] if installed.is_file() else [shipped]
    files += sorted((root / UNIT_DIR.lstrip("/") / f"{UNIT_NAME}.d").glob("*.conf"))
    bases = {"StateDirectory": "/var/lib", "CacheDirectory": "/var/cache",
             "LogsDirectory": "/var/log", "RuntimeDirectory": "/run"}
    allowed: list[Path] = []
    strict = False
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.strip().partition("=")
            if not sep or key.startswith(("#", ";")):
                continue
            key, value = key.strip(), value.strip()
            if key == "ProtectSystem":
                strict = value == "strict"
            elif key == "ReadWritePaths":
                allowed += [Path(v.lstrip("-+")) for v in value.split()]
            elif key in bases:
                allowed += [Path(bases[key]) / v for v in value.split()]
    return allowed, strict


def device(spec, kind: str) -> Run:
    def run(_) -> str:
        from assistant.audio.devices import describe_device
        return describe_device(spec, kind)
    return run


def camera(cfg: Config) -> Run:
    def run(_) -> str:
        if cfg.camera.source is None or cfg.vision.encoder == "none":
            return "none configured"
        from assistant import components
        c = components.camera(cfg)
        c.open()
        try:
            frame = c.snapshot()
            return f"{c.name}: {frame.shape[1]}x{frame.shape[0]}"
        finally:
            c.close()
    return run
