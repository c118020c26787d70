"""Named vision-language models for the llama.cpp backend: where they come from, where they go.

A catalogue name (``smolvlm2-256m``, ...) stands for a GGUF language model and its
multimodal projector (mmproj) in a Hugging Face repository. ``pull`` downloads both into
``<models_dir>/<name>/`` with a progress bar, resumes an interrupted download from its
``.part`` file (HTTP Range), and verifies every file before it takes its final name.

Integrity. A file is verified against, in order of preference: the sha256 (and size)
recorded here, then the sha256 the hub itself publishes for the LFS object (the
``X-Linked-Etag`` header of the ``resolve`` URL, with ``X-Linked-Size``). When both exist and
disagree the download is refused. What is pinned here, and where it was read:

- smolvlm2-500m: revision ccd7aae5, sizes and sha256 of both files (two independent public
  catalogues list the same sha256 values).
- qwen2.5-vl-3b: revision 5037fcf1 and the sha256 of both files (one public catalogue).
- smolvlm2-256m: revision 7b6af08e (one public project); sizes are approximate (display
  only); the sha256 is taken from the hub at download time.
- internvl3-1b: no revision pinned (the hub's ``main``); the commit actually served
  (``X-Repo-Commit``) and the hub's sha256 are recorded in the model's manifest.json.

``resolve`` turns ``llm.llamacpp`` settings into file paths: a catalogue name, or a GGUF path
used as is. A missing model raises ModelMissingError naming the files, the directory and
the ``rkvlm-assistant models pull NAME`` command.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from assistant.config import LlamaCppConfig
from assistant.errors import ModelMissingError
from assistant.llm.llamacpp_download import (ChecksumError, DownloadError, fetch_verified, say,
                                             verify_existing)

log = logging.getLogger(__name__)

HF_BASE = "https://huggingface.co"
MANIFEST = "manifest.json"
__all__ = ["CATALOG", "CatalogEntry", "ChecksumError", "DownloadError", "ModelFile", "cli_models_list",
           "cli_models_pull", "default_models_dir", "installed", "pull", "resolve"]


@dataclass(frozen=True)
class ModelFile:
    """One file of a catalogue model."""

    name: str
    sha256: Optional[str] = None      # enforced when set
    size: Optional[int] = None        # bytes; enforced when set
    approx_size: Optional[int] = None  # bytes; for display when the exact size is not pinned

    @property
    def shown_size(self) -> Optional[int]:
        return self.size or self.approx_size


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    title: str
    repo: str
    revision: Optional[str]           # a commit hash; None: the hub's main (recorded on pull)
    model: ModelFile
    mmproj: ModelFile

    @property
    def files(self) -> tuple[ModelFile, ModelFile]:
        return (self.model, self.mmproj)

    @property
    def ref(self) -> str:
        return self.revision or "main"

    def url(self, f: ModelFile, base_url: str = HF_BASE) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/resolve/{self.ref}/{f.name}"


CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (
    CatalogEntry(
        "smolvlm2-256m", "SmolVLM2 256M Video Instruct (Q8_0)",
        "ggml-org/SmolVLM2-256M-Video-Instruct-GGUF", "7b6af08ec3a985c86542c095a63bab2e68510461",
        ModelFile("SmolVLM2-256M-Video-Instruct-Q8_0.gguf", approx_size=175_056_352),
        ModelFile("mmproj-SmolVLM2-256M-Video-Instruct-Q8_0.gguf", approx_size=103_771_680)),
    CatalogEntry(
        "smolvlm2-500m", "SmolVLM2 500M Video Instruct (Q8_0)",
        "ggml-org/SmolVLM2-500M-Video-Instruct-GGUF", "ccd7aae53bcb1997355c2f094959e72b3642ce17",
        ModelFile("SmolVLM2-500M-Video-Instruct-Q8_0.gguf",
                  "6f67b8036b2469fcd71728702720c6b51aebd759b78137a8120733b4d66438bc", 436_808_704),
        ModelFile("mmproj-SmolVLM2-500M-Video-Instruct-Q8_0.gguf",
                  "921dc7e259f308e5b027111fa185efcbf33db13f6e35749ddf7f5cdb60ef520b", 108_785_184)),
    CatalogEntry(
        "internvl3-1b", "InternVL3 1B Instruct (Q8_0)",
        "ggml-org/InternVL3-1B-Instruct-GGUF", None,
        ModelFile("InternVL3-1B-Instruct-Q8_0.gguf", approx_size=675_000_000),
        ModelFile("mmproj-InternVL3-1B-Instruct-Q8_0.gguf", approx_size=333_000_000)),
    CatalogEntry(
        "qwen2.5-vl-3b", "Qwen2.5-VL 3B Instruct (Q4_K_M, projector Q8_0)",
        "ggml-org/Qwen2.5-VL-3B-Instruct-GGUF", "5037fcf163dd95d1e41d1974465f0898ed108ca2",
        ModelFile("Qwen2.5-VL-3B-Instruct-Q4_K_M.gguf",
                  "d02fe9b69ad8cadbbd228e387667af66612c44bed29ffc8eb1e7caf9ac486c12"),
        ModelFile("mmproj-Qwen2.5-VL-3B-Instruct-Q8_0.gguf",
                  "980c9b2f78c04e6cff93d277ada09e768394f112d75db3b4e9dea8a69f9fb904")),
)}


# --------------------------------------------------------------------------- locations

def default_models_dir() -> Path:
    """$XDG_DATA_HOME/rkvlm-assistant/models (~/.local/share/... when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "rkvlm-assistant" / "models"


def models_dir_for(cfg: LlamaCppConfig, resolve_path: Callable[[Optional[str]], Optional[Path]]) -> Path:
    return resolve_path(cfg.models_dir) if cfg.models_dir else default_models_dir()


def names() -> str:
    return ", ".join(CATALOG)


def _is_path(spec: str) -> bool:
    return spec.endswith(".gguf") or "/" in spec or spec.startswith(("~", "."))


def resolve(cfg: LlamaCppConfig, resolve_path: Callable[[Optional[str]], Optional[Path]],
            want_mmproj: bool = True) -> tuple[Path, Optional[Path]]:
    """(model, mmproj) paths for the llm.llamacpp settings; ModelMissingError if absent.

    ``resolve_path`` is ``Config.path`` (expands ~, relative to the config file).
    ``mmproj`` set in the config wins over the catalogue's; ``want_mmproj=False`` (no
    llama.cpp vision) skips the catalogue's projector.
    """
    spec = cfg.model.strip()
    mmproj = resolve_path(cfg.mmproj) if cfg.mmproj else None
    if mmproj is not None and not mmproj.is_file():
        raise ModelMissingError(f"llm.llamacpp.mmproj: projector file not found: {mmproj}")
    if spec in CATALOG:
        entry = CATALOG[spec]
        folder = models_dir_for(cfg, resolve_path) / entry.name
        model = folder / entry.model.name
        if mmproj is None and want_mmproj:
            mmproj = folder / entry.mmproj.name
        missing = [p for p in (model, mmproj) if p is not None and not p.is_file()]
        if missing:
            raise ModelMissingError(missing_message(entry, folder, missing))
        return model, mmproj
    if _is_path(spec):
        model = resolve_path(spec)
        if not model.is_file():
            raise ModelMissingError(
                f"llm.llamacpp.model: model file not found: {model}. Put the GGUF file there, "
                f"or set llm.llamacpp.model to a catalogue model ({names()}) and run "
                "`rkvlm-assistant models pull NAME`.")
        return model, mmproj
    raise ModelMissingError(
        f"llm.llamacpp.model: {spec!r} is neither a catalogue model ({names()}) nor a path "
        "to a .gguf file. See `rkvlm-assistant models list`.")


def missing_message(entry: CatalogEntry, folder: Path, missing: list[Path]) -> str:
    files = " and ".join(str(p) for p in missing)
    urls = ", ".join(entry.url(f) for f in entry.files if folder / f.name in missing)
    return (f"The model {entry.name} ({entry.title}) is not installed: missing {files}. "
            f"Run `rkvlm-assistant models pull {entry.name}`, or download {urls} "
            f"by hand into {folder}/.")


# --------------------------------------------------------------------------- pulling

def pull(name: str, models_dir: Optional[Path] = None, base_url: str = HF_BASE,
         progress: bool = True, timeout: float = 30.0) -> list[Path]:
    """Download and verify a catalogue model's files; returns their paths.

    Resumes from ``<file>.part``. Raises DownloadError (network, HTTP, nothing to verify
    against) or ChecksumError (the bytes are not the pinned file; the .part is deleted).
    """
    if name not in CATALOG:
        raise ModelMissingError(f"no catalogue model named {name!r}; known models: {names()}")
    entry = CATALOG[name]
    folder = (models_dir or default_models_dir()) / entry.name
    manifest = _read_manifest(folder)
    paths = []
    for f in entry.files:
        dest = folder / f.name
        paths.append(dest)
        known = manifest.get("files", {}).get(f.name)
        if dest.is_file() and known and known.get("size") == dest.stat().st_size \
                and (f.sha256 is None or known.get("sha256") == f.sha256):
            say(progress, f"{f.name}: already installed and verified")
            continue
        url = entry.url(f, base_url)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if dest.is_file():   # placed by hand, or from an older pull: check, don't fetch
                record = verify_existing(url, dest, f.sha256, f.size, timeout)
                say(progress, f"{f.name}: present and verified")
            else:
                record = fetch_verified(url, dest, sha256=f.sha256, size=f.size,
                                        progress=progress, timeout=timeout)
        except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
            raise DownloadError(_offline_message(entry, folder, e)) from None
        record["source"] = url
        manifest.setdefault("files", {})[f.name] = record
        manifest.update(repo=entry.repo, revision=entry.ref)
        if record.get("commit"):
            manifest["commit"] = record.pop("commit")
        _write_manifest(folder, manifest)
    return paths


def _offline_message(entry: CatalogEntry, folder: Path, err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    urls = "\n".join(f"  {entry.url(f)}" for f in entry.files)
    return (f"cannot download {entry.name}: {reason}. Without network, fetch these files on "
            f"another machine and copy them into {folder}/ (keep the names):\n{urls}\n"
            f"then check with `rkvlm-assistant models list`. Running `rkvlm-assistant models "
            f"pull {entry.name}` again resumes an interrupted download.")


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_manifest(folder: Path, data: dict) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


# --------------------------------------------------------------------------- listing

@dataclass(frozen=True)
class Installed:
    """What is on disk for one catalogue model."""

    entry: CatalogEntry
    folder: Path
    present: tuple[Path, ...]
    partial: tuple[Path, ...]
    verified: bool

    @property
    def complete(self) -> bool:
        return len(self.present) == len(self.entry.files)

    @property
    def status(self) -> str:
        if self.complete:
            return "installed" if self.verified else "installed (placed by hand, not verified)"
        if self.present or self.partial:
            return "incomplete"
        return "not installed"


def installed(models_dir: Optional[Path] = None) -> list[Installed]:
    """The state of every catalogue model under models_dir."""
    root = models_dir or default_models_dir()
    out = []
    for entry in CATALOG.values():
        folder = root / entry.name
        manifest = _read_manifest(folder).get("files", {})
        present, partial, verified = [], [], True
        for f in entry.files:
            p = folder / f.name
            if p.is_file():
                present.append(p)
                rec = manifest.get(f.name)
                if not rec or rec.get("size") != p.stat().st_size:
                    verified = False
            else:
                verified = False
                if p.with_name(p.name + ".part").is_file():
                    partial.append(p)
        out.append(Installed(entry, folder, tuple(present), tuple(partial), verified))
    return out


def cli_models_list(models_dir: Optional[Path] = None) -> int:
    """Print the catalogue and what is installed where; returns the exit code."""
    root = models_dir or default_models_dir()
    print(f"Models directory: {root}")
    rows = installed(root)
    width = max(len(r.entry.name) for r in rows)
    for r in rows:
        size = sum(f.shown_size or 0 for f in r.entry.files)
        size_txt = f"{size / 1e6:7.0f} MB" if size else "      ? MB"
        print(f"  {r.entry.name:<{width}}  {size_txt}  {r.status:<13}  {r.entry.title}")
        if r.complete:
            for p in r.present:
                print(f"  {'':<{width}}  {'':10}  {p}")
        else:
            print(f"  {'':<{width}}  {'':10}  get it: rkvlm-assistant models pull {r.entry.name}")
    print("A config can also name files directly: llm.llamacpp.model: /path/model.gguf, "
          "llm.llamacpp.mmproj: /path/mmproj.gguf")
    return 0


def cli_models_pull(name: str, models_dir: Optional[Path] = None, base_url: str = HF_BASE) -> int:
    """Download a catalogue model for a person at a terminal; returns the exit code."""
    if name not in CATALOG:
        print(f"rkvlm-assistant: no catalogue model named {name!r}; known models: {names()}",
              file=sys.stderr)
        return 2
    try:
        paths = pull(name, models_dir, base_url=base_url, progress=True)
    except ModelMissingError as e:
        print(f"rkvlm-assistant: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{name} is installed:")
    for p in paths:
        print(f"  {p}")
    return 0
