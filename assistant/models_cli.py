"""`rkvlm-assistant models list / pull / use`: every model the assistant can fetch.

``list`` shows the portable and board catalogue (assistant.llm.catalog) and the speech
models (whisper sizes, piper voices) with where each is installed. ``pull NAME`` downloads
one of them; ``use NAME`` (or ``pull NAME --configure``) writes the keys that select it into
the config file (a catalogue model: the llm/vision keys; a whisper size: asr.model; a piper
voice: tts.voice or tts.voice_zh by the voice's language), changing nothing else in it: comments, order and the person's other settings
stay byte for byte (assistant.config_edit), and the result must load before it replaces
the file.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from assistant import paths
from assistant.config import EX_CONFIG, Config, ConfigError, load
from assistant.errors import AssistantError, ModelMissingError
from assistant.llm import catalog
from assistant.llm.catalog import BoardEntry, CatalogEntry

log = logging.getLogger(__name__)

EX_USAGE = 2


def _err(text: str) -> None:
    print(f"rkvlm-assistant: {text}", file=sys.stderr)


# --------------------------------------------------------------------------- list

def cli_list(cfg: Config, models_dir: Path) -> int:
    from assistant.audio import model_paths

    print("Language models (portable: llama.cpp; board: RKLLM + RKNN on the NPU)")
    print(f"  hub: {catalog.hub_endpoint()}  cache: {catalog.hub_cache_dir()}"
          + ("  (HF_HUB_OFFLINE: no downloads)" if catalog.hub_offline() else ""))
    print(f"  placed by hand: {models_dir}/NAME/")
    rows = catalog.installed(models_dir)
    width = max(len(r.entry.name) for r in rows)
    for r in rows:
        kind = f"board {r.entry.chip}" if isinstance(r.entry, BoardEntry) else "portable"
        size = sum(f.shown_size or 0 for f in r.entry.files)
        size_txt = f"{size / 1e6:6.0f} MB" if size else "     ? MB"
        print(f"  {r.entry.name:<{width}}  {kind:<14} {size_txt}  {r.status:<13}  {r.entry.title}")
        for p in r.present:
            print(f"  {'':<{width}}  {'':<14} {'':9}  {p}")
        if not r.complete:
            print(f"  {'':<{width}}  {'':<14} {'':9}  get it: rkvlm-assistant models pull {r.entry.name}")
    print("A config can also name files directly: llm.llamacpp.model / llm.rkllm.model / "
          "vision.rknn.model: /path/file")
    print()
    print("Speech recognition (faster-whisper; asr.model)")
    for name, state in model_paths.whisper_states(cfg.asr, cfg.path):
        print(f"  {name:<16} {state}")
    print()
    print("Speech synthesis (piper voices; tts.voice, tts.voice_zh)")
    for name, state in model_paths.voice_states(cfg.tts, cfg.path):
        print(f"  {name:<24} {state}")
    return 0


# --------------------------------------------------------------------------- pull

def cli_pull(cfg: Config, name: str, models_dir: Path, configure: bool = False,
             config_path: Optional[Path] = None, layout: Optional[paths.Layout] = None) -> int:
    from assistant.audio import model_paths

    if configure and _config_file(cfg, config_path) is None:    # said before the download
        return EX_CONFIG
    try:
        if catalog.lookup(name) is not None:
            files = catalog.pull(name, models_dir, progress=True)
            print(f"{name} is installed:")
            for p in files:
                print(f"  {p}")
        elif model_paths.is_whisper_name(name):
            path = model_paths.pull_whisper(name, cfg.asr, cfg.path)
            print(f"whisper {name} is installed: {path}")
        elif model_paths.is_voice_name(name):
            if configure and _voice_key(name) is None:   # refused before the download
                return _refuse_voice(name, cfg, config_path)
            onnx = model_paths.pull_voice(name, cfg.tts, cfg.path)
            print(f"piper voice {name} is installed: {onnx}")
        else:
            return _unknown(name)
    except AssistantError as e:
        _err(str(e))
        return e.exit_code
    if configure:
        return cli_use(cfg, name, models_dir, config_path, layout)
    print(f"use it: rkvlm-assistant models use {name}")
    return 0


def _unknown(name: str) -> int:
    from assistant.audio import model_paths

    _err(f"no model named {name!r}; known: catalogue models ({catalog.names()}), whisper sizes "
         f"({', '.join(model_paths.whisper_names())}) and piper voices such as "
         f"{', '.join(model_paths.VOICES)}. See `rkvlm-assistant models list`.")
    return EX_USAGE


# --------------------------------------------------------------------------- use

def settings_for(entry: Union[CatalogEntry, BoardEntry], files: list[Path],
                 cfg: Config) -> dict[str, Any]:
    """The config keys (dotted) that select this entry."""
    if isinstance(entry, BoardEntry):
        llm, enc = files
        keys: dict[str, Any] = {
            "llm.backend": "rkllm",
            "llm.rkllm.model": str(llm),
            "llm.rkllm.family": entry.family,
            "vision.encoder": "rknn",
            "vision.rknn.model": str(enc),
        }
        if cfg.vision.family is not None:
            keys["vision.family"] = entry.family   # a stale family would refuse the encoder
        if entry.max_context is not None and cfg.llm.max_context_len > entry.max_context:
            keys["llm.max_context_len"] = entry.max_context
        return keys
    keys = {"llm.backend": "llamacpp", "llm.llamacpp.model": entry.name}
    if cfg.vision.encoder == "rknn":
        keys["vision.encoder"] = "llamacpp"
    if cfg.llm.llamacpp.mmproj is not None:
        keys["llm.llamacpp.mmproj"] = None          # the catalogue's projector goes with it
    return keys


# The voice keys by the language of the voice (its name's first part: en_US-joe-medium).
_VOICE_KEYS = {"en": "tts.voice", "zh": "tts.voice_zh"}


def _voice_key(name: str) -> Optional[str]:
    """tts.voice for an English voice, tts.voice_zh for a Chinese one, None for any other
    language (the assistant answers in English or Chinese only)."""
    return _VOICE_KEYS.get(name.split("_", 1)[0].lower())


def _config_file(cfg: Config, config_path: Optional[Path]) -> Optional[Path]:
    path = config_path or (Path(cfg.source) if cfg.source not in ("<defaults>", "<string>") else None)
    if path is None:
        _err("`models use` writes the config file, and there is none: pass --config FILE (for "
             "example a copy of the project's config.yaml, or /etc/rkvlm-assistant/config.yaml)")
    return path


def _refuse_voice(name: str, cfg: Config, config_path: Optional[Path]) -> int:
    where = config_path or cfg.source
    _err(f"{name} is a voice for neither English nor Chinese, the languages the assistant "
         f"answers in (tts.voice: English, tts.voice_zh: Chinese); nothing was changed. To have "
         f"it read every answer anyway, set tts.voice: {name} in {where} by hand")
    return EX_USAGE


def _speech_keys(cfg: Config, name: str) -> tuple[Optional[dict[str, Any]], int]:
    """The key that selects a whisper size or a piper voice, once it is installed; or
    (None, exit code) after saying why not."""
    from assistant.audio import model_paths

    if model_paths.is_whisper_name(name):
        state = model_paths.whisper_state(name, cfg.asr, cfg.path)
        if not state.startswith("installed"):
            _err(f"whisper {name} is not installed (`rkvlm-assistant models pull {name} "
                 f"--configure` downloads and sets it)")
            return None, EX_CONFIG
        return {"asr.model": name}, 0
    if model_paths.is_voice_name(name):
        key = _voice_key(name)
        if key is None:
            return None, _refuse_voice(name, cfg, None)
        try:
            model_paths.resolve_voice(cfg.tts, name, cfg.path, key=key)
        except ModelMissingError as e:
            _err(f"{e} (`rkvlm-assistant models pull {name} --configure` downloads and sets it)")
            return None, e.exit_code
        return {key: name}, 0
    return None, _unknown(name)


def _write(path: Path, name: str, keys: dict[str, Any]) -> int:
    try:
        set_keys(path, keys)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG
    print(f"{path}: now using {name}")
    for k, v in keys.items():
        print(f"  {k}: {v if v is not None else 'null'}")
    return 0


def cli_use(cfg: Config, name: str, models_dir: Path, config_path: Optional[Path] = None,
            layout: Optional[paths.Layout] = None) -> int:
    entry = catalog.lookup(name)
    if entry is None:
        keys, rc = _speech_keys(cfg, name)
        if keys is None:
            return rc
        path = _config_file(cfg, config_path)
        return EX_CONFIG if path is None else _write(path, name, keys)
    path = _config_file(cfg, config_path)
    if path is None:
        return EX_CONFIG
    try:
        files = catalog.resolve_files(entry, models_dir)
    except ModelMissingError as e:
        _err(f"{e} (`rkvlm-assistant models pull {name} --configure` downloads and sets it)")
        return e.exit_code
    # Under --root the files are written as the installed system will see them.
    keys = settings_for(entry, [(layout or paths.Layout(False)).target(p) for p in files], cfg)
    rc = _write(path, name, keys)
    if rc:
        return rc
    if isinstance(entry, BoardEntry):
        if entry.max_context is None:
            print(f"  llm.max_context_len stays {cfg.llm.max_context_len}: the model's own limit "
                  f"is not published; the runtime prints it at start (max_context_limit)")
        if entry.runtime is None:
            print("  the RKLLM release that converted it is not published: if rkllm_init fails, "
                  "check `rkvlm-assistant doctor` and the runtime's first log lines")
    return 0


def set_keys(path: Path, keys: dict[str, Any]) -> None:
    """Set dotted keys in a YAML config file; every other line stays byte for byte
    (assistant.config_edit). The file keeps its mode and owner (the service's group reads
    /etc/rkvlm-assistant/config.yaml).

    The new text must load with assistant.config.load; otherwise the file is left as it
    was and ConfigError names the problem.
    """
    from assistant import config_edit

    path = config_edit.target(path)     # a link stays a link; the file it names is edited
    try:
        original = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        original = ""
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}", source=str(path)) from None
    try:
        top = config_edit.plain(original)
    except Exception as e:  # ruamel's parser errors have no common public base
        raise ConfigError(f"{path}: not valid YAML, nothing was changed: {e}", source=str(path)) from None
    if not isinstance(top, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, nothing was changed",
                          source=str(path))
    try:
        text = config_edit.edit(original, keys)
    except Exception as e:  # a shape neither the line editor nor the round trip can take
        raise ConfigError(f"{path}: cannot set {', '.join(keys)} in this file, nothing was "
                          f"changed: {e}; set them by hand", source=str(path)) from None
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        load(tmp)  # the new file must be a valid config before it replaces the old one
        if path.exists():
            st = path.stat()
            os.chmod(tmp, st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except ConfigError as e:
        raise ConfigError(f"{path}: the change would make the config invalid, nothing was "
                          f"changed: {e}", source=str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
