"""Named models: where they come from (a Hugging Face repository), where they end up.

Two kinds of entries share one download path:

- ``CATALOG``: the portable backend's models, a GGUF language model and its multimodal
  projector (mmproj) for llama.cpp (``llm.llamacpp.model: NAME``).
- ``BOARD``: per chip, the ``.rkllm`` language model and the ``.rknn`` vision encoder
  converted for the NPU, only where public pre-converted files exist.

Downloads go through ``huggingface_hub.hf_hub_download``, so they land in the shared hub
cache (``HF_HUB_CACHE``, ``HF_HOME``; a file another tool already fetched is not fetched
again), resume an interrupted transfer, honour ``HF_ENDPOINT`` (mirrors), ``HF_TOKEN`` and
``HF_HUB_OFFLINE``. These variables are read when a download starts, not when the library
was imported. After a download, the file is checked against the sha256 pinned here, else
against the sha256 the hub states for LFS files (its ETag, which is also the blob's name in
the cache); a file that disagrees is deleted and refused. A pin that disagrees with the hub
is refused before anything is downloaded.

Files can also be put by hand into ``<models_dir>/<name>/`` (keep the names); such files
(and those of pulls made by earlier versions, which used that folder) are found first.

What is pinned for the portable models, and where it was read:

- smolvlm2-500m: revision ccd7aae5, sizes and sha256 of both files (two independent public
  catalogues list the same sha256 values).
- qwen2.5-vl-3b: revision 5037fcf1 and the sha256 of both files (one public catalogue).
- smolvlm2-256m: revision 7b6af08e (one public project); sizes are approximate (display
  only); the sha256 is the hub's.
- internvl3-1b: no revision pinned (the hub's ``main``); the sha256 is the hub's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from assistant import paths
from assistant.config import LlamaCppConfig
from assistant.errors import ModelMissingError

log = logging.getLogger(__name__)

HF_BASE = "https://huggingface.co"
__all__ = ["ALL", "BOARD", "CATALOG", "BoardEntry", "CatalogEntry", "ChecksumError", "DownloadError",
           "ModelFile", "default_models_dir", "installed", "lookup", "pull", "resolve", "resolve_files"]


class DownloadError(ModelMissingError):
    """A pull failed; the message says why and how to place the files by hand."""

    exit_code = 69  # EX_UNAVAILABLE


class ChecksumError(DownloadError):
    """A downloaded file is not the file the catalogue or the hub describes."""

    exit_code = 65  # EX_DATAERR


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


class _Entry:
    """What portable and board entries share: a repository, a revision, files."""

    name: str
    title: str
    repo: str
    revision: Optional[str]

    @property
    def files(self) -> tuple[ModelFile, ...]:
        raise NotImplementedError

    @property
    def ref(self) -> str:
        return self.revision or "main"

    def url(self, f: ModelFile, base_url: Optional[str] = None) -> str:
        base = (base_url or hub_endpoint()).rstrip("/")
        return f"{base}/{self.repo}/resolve/{self.ref}/{f.name}"


@dataclass(frozen=True)
class CatalogEntry(_Entry):
    """A portable model: GGUF language model + projector for llama.cpp."""

    name: str
    title: str
    repo: str
    revision: Optional[str]           # a commit hash; None: the hub's main
    model: ModelFile
    mmproj: ModelFile

    @property
    def files(self) -> tuple[ModelFile, ...]:
        return (self.model, self.mmproj)


@dataclass(frozen=True)
class BoardEntry(_Entry):
    """An NPU model pair for one chip: the .rkllm LLM and the .rknn vision encoder."""

    name: str
    title: str
    repo: str
    revision: Optional[str]
    chip: str                          # "rk3588" or "rk3576"
    family: str                        # a key of assistant.llm.families.FAMILIES
    llm: ModelFile
    encoder: ModelFile
    runtime: Optional[str] = None      # the RKLLM release that converted it; None: not stated
    max_context: Optional[int] = None  # the model's context limit; None: not stated
    source: str = ""                   # where the facts were read

    @property
    def files(self) -> tuple[ModelFile, ...]:
        return (self.llm, self.encoder)


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

# Board entries. Only pairs whose repository and file names a public source states are
# listed; nothing here is guessed.
# - internvl3.5-2b-rk3588: the model card of huggingface.co/Qengineering/InternVL3.5-2B-rk3588
#   (read through a public mirror of its README.md) lists "LLM internvl3_5-2b-instruct_w8a8_
#   rk3588.rkllm W8A8" and "Vision Encoder internvl3_5-2b_vision_rk3588.rknn FP16" for
#   RK3588. It names no revision (the hub's main is used, the sha256 is the hub's), no RKLLM
#   release and no context limit.
# Looked at and left out: Qengineering/Qwen3.5-{0.8B,2B,4B}-rk3588 (public sources disagree on
# the vision file's name: "qwen3.5-0.8b-vision_rk3588.rknn" in the publisher's README,
# "..._vision_rk3588.rknn" in a downstream download script); no RK3576 pair with stated
# file names was found. Rockchip's own rkllm_model_zoo is a file share, not a hub repository.
BOARD: dict[str, BoardEntry] = {e.name: e for e in (
    BoardEntry(
        "internvl3.5-2b-rk3588", "InternVL3.5 2B (LLM w8a8, encoder fp16) for RK3588",
        "Qengineering/InternVL3.5-2B-rk3588", None, "rk3588", "internvl3.5",
        ModelFile("internvl3_5-2b-instruct_w8a8_rk3588.rkllm"),
        ModelFile("internvl3_5-2b_vision_rk3588.rknn"),
        source="model card of Qengineering/InternVL3.5-2B-rk3588"),
)}

ALL: dict[str, Union[CatalogEntry, BoardEntry]] = {**CATALOG, **BOARD}


def lookup(name: str) -> Union[CatalogEntry, BoardEntry, None]:
    """The entry called name, from either table (read at call time: tests add entries)."""
    return CATALOG.get(name) or BOARD.get(name)


def names() -> str:
    return ", ".join([*CATALOG, *BOARD])


# --------------------------------------------------------------------------- locations

def default_models_dir() -> Path:
    """$XDG_DATA_HOME/rkvlm-assistant/models (~/.local/share/... when unset; the service's
    /var/lib/rkvlm-assistant/models): assistant.paths."""
    return paths.models_dir()


def models_dir_for(cfg: LlamaCppConfig, resolve_path: Callable[[Optional[str]], Optional[Path]]) -> Path:
    return resolve_path(cfg.models_dir) if cfg.models_dir else default_models_dir()


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now (a mirror such as https://hf-mirror.com), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or HF_BASE).rstrip("/")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The shared hub cache as huggingface_hub computes it, from the environment of now."""
    return paths.hub_cache()


def hub_token() -> Optional[str]:
    return os.environ.get("HF_TOKEN") or None


def _is_path(spec: str) -> bool:
    return spec.endswith(".gguf") or "/" in spec or spec.startswith(("~", "."))


def cached_file(entry: _Entry, f: ModelFile) -> Optional[Path]:
    """The file in the shared hub cache, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(entry.repo, f.name, cache_dir=str(hub_cache_dir()),
                                   revision=entry.revision)
    if isinstance(found, str) and os.path.isfile(found):
        return Path(found)
    return None


def local_file(entry: _Entry, f: ModelFile, models_dir: Path) -> Optional[Path]:
    """Where the file is on this machine: placed by hand first, then the hub cache."""
    by_hand = models_dir / entry.name / f.name
    if by_hand.is_file():
        return by_hand
    return cached_file(entry, f)


def resolve_files(entry: _Entry, models_dir: Path) -> list[Path]:
    """Paths of all of an entry's files; ModelMissingError naming what is missing."""
    found = [local_file(entry, f, models_dir) for f in entry.files]
    missing = [f for f, p in zip(entry.files, found) if p is None]
    if missing:
        raise ModelMissingError(missing_message(entry, models_dir / entry.name, missing))
    return [p for p in found if p is not None]


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
        root = models_dir_for(cfg, resolve_path)
        wanted = [entry.model] + ([entry.mmproj] if mmproj is None and want_mmproj else [])
        found = [local_file(entry, f, root) for f in wanted]
        missing = [f for f, p in zip(wanted, found) if p is None]
        if missing:
            raise ModelMissingError(missing_message(entry, root / entry.name, missing))
        return found[0], (found[1] if len(found) > 1 else mmproj)
    if spec in BOARD:
        raise ModelMissingError(
            f"llm.llamacpp.model: {spec!r} is a board model (.rkllm + .rknn for the NPU), not "
            f"a GGUF model: run `rkvlm-assistant models use {spec}` to set llm.backend: rkllm "
            f"and its files, or pick a portable model ({', '.join(CATALOG)}).")
    if _is_path(spec):
        model = resolve_path(spec)
        if not model.is_file():
            raise ModelMissingError(
                f"llm.llamacpp.model: model file not found: {model}. Put the GGUF file there, "
                f"or set llm.llamacpp.model to a catalogue model ({', '.join(CATALOG)}) and run "
                "`rkvlm-assistant models pull NAME`.")
        return model, mmproj
    raise ModelMissingError(
        f"llm.llamacpp.model: {spec!r} is neither a catalogue model ({', '.join(CATALOG)}) nor "
        "a path to a .gguf file. See `rkvlm-assistant models list`.")


def missing_message(entry: _Entry, folder: Path, missing: list[ModelFile]) -> str:
    files = " and ".join(str(folder / f.name) for f in missing)
    urls = ", ".join(entry.url(f) for f in missing)
    return (f"The model {entry.name} ({entry.title}) is not installed: missing {files}. "
            f"Run `{paths.pull_command(entry.name)}`, or download {urls} "
            f"by hand into {folder}/.")


# --------------------------------------------------------------------------- pulling

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hub_errors() -> tuple:
    """The hub's exception classes (their module moved between huggingface_hub versions)."""
    try:
        from huggingface_hub import errors as e
    except ImportError:  # older huggingface_hub
        from huggingface_hub import utils as e  # type: ignore[no-redef]
    return (e.LocalEntryNotFoundError, e.EntryNotFoundError, e.RepositoryNotFoundError,
            e.RevisionNotFoundError, e.GatedRepoError)


def _offline_message(entry: _Entry, folder: Path, reason: str) -> str:
    urls = "\n".join(f"  {entry.url(f)}" for f in entry.files)
    return (f"cannot download {entry.name}: {reason}. Without network, fetch these files on "
            f"another machine and copy them into {folder}/ (keep the names):\n{urls}\n"
            f"then check with `rkvlm-assistant models list`. Running `rkvlm-assistant models "
            f"pull {entry.name}` again resumes an interrupted download (HF_ENDPOINT selects a "
            f"mirror, HF_TOKEN a token).")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_pin(entry: _Entry, f: ModelFile) -> None:
    """Refuse before downloading when the hub serves another file than the pinned one."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(entry.repo, f.name, revision=entry.ref, endpoint=hub_endpoint())
    meta = get_hf_file_metadata(url, token=hub_token())
    etag = (meta.etag or "").strip('"').lower()
    if f.sha256 and _HEX64.match(etag) and etag != f.sha256:
        raise ChecksumError(f"the hub's {f.name} (sha256 {etag}) is not the pinned file "
                            f"(sha256 {f.sha256}) of {entry.name}; refusing to download it")


def _verify(entry: _Entry, f: ModelFile, path: Path) -> str:
    """Check a downloaded file; delete it and raise ChecksumError when it is not the one."""
    blob = Path(os.path.realpath(path))
    hub_sha = blob.name if _HEX64.match(blob.name) else None  # LFS blobs are named by sha256
    want = f.sha256 or hub_sha
    if want is None:
        log.info("%s: the hub states no sha256 (not an LFS file); its size was checked", f.name)
        return ""
    got = sha256_of(blob)
    size_ok = f.size is None or blob.stat().st_size == f.size
    if got != want or not size_ok:
        for p in (path, blob):
            try:
                os.unlink(p)
            except OSError:
                pass
        against = "pinned in the catalogue" if f.sha256 else "stated by the hub"
        raise ChecksumError(
            f"{f.name} of {entry.name}: sha256 {got} does not match the expected {want} "
            f"({against}); the download was deleted, run `rkvlm-assistant models pull "
            f"{entry.name}` again (a mirror in HF_ENDPOINT may serve a damaged copy)")
    return got


def pull(name: str, models_dir: Optional[Path] = None, progress: bool = True) -> list[Path]:
    """Download and verify an entry's files into the shared hub cache; returns their paths.

    Files placed by hand in ``<models_dir>/<name>/`` are used (checked against a pinned
    sha256) instead of being downloaded. Raises DownloadError (network, offline, not on the
    hub) or ChecksumError (not the expected bytes; the download is deleted).
    """
    from huggingface_hub import constants, hf_hub_download

    # huggingface_hub read HF_HUB_OFFLINE when it was imported; follow the setting of now.
    constants.HF_HUB_OFFLINE = hub_offline()
    entry = lookup(name)
    if entry is None:
        raise ModelMissingError(f"no catalogue model named {name!r}; known models: {names()}")
    root = models_dir or default_models_dir()
    folder = root / entry.name
    local_missing, not_found, repo_missing, rev_missing, gated = _hub_errors()
    paths = []
    for f in entry.files:
        by_hand = folder / f.name
        if by_hand.is_file():
            if f.sha256 and sha256_of(by_hand) != f.sha256:
                raise ChecksumError(f"{by_hand} is not the expected file (sha256 {f.sha256}); "
                                    f"delete it and run `rkvlm-assistant models pull {name}`")
            _say(progress, f"{f.name}: placed by hand in {folder}")
            paths.append(by_hand)
            continue
        try:
            if f.sha256 and not hub_offline() and cached_file(entry, f) is None:
                _check_pin(entry, f)
            got = hf_hub_download(entry.repo, f.name, revision=entry.revision,
                                  cache_dir=str(hub_cache_dir()), endpoint=hub_endpoint(),
                                  token=hub_token(), local_files_only=hub_offline())
        except ChecksumError:
            raise
        except local_missing as e:
            why = ("HF_HUB_OFFLINE is set and the file is not in the hub cache "
                   f"{hub_cache_dir()}" if hub_offline() else f"the hub is unreachable ({_first_line(e)})")
            raise DownloadError(_offline_message(entry, folder, why)) from None
        except gated as e:  # before repo_missing: a subclass of it
            raise DownloadError(_offline_message(
                entry, folder, f"the repository is gated: set HF_TOKEN to a token that has "
                f"accepted its terms ({_first_line(e)})")) from None
        except (not_found, repo_missing, rev_missing) as e:
            raise DownloadError(_offline_message(
                entry, folder, f"{entry.url(f)} does not exist on {hub_endpoint()} (HTTP 404: "
                f"{_first_line(e)})")) from None
        except Exception as e:  # network and HTTP errors (requests or httpx, by version)
            raise DownloadError(_offline_message(entry, folder, _first_line(e))) from None
        path = Path(got)
        sha = _verify(entry, f, path)
        _say(progress, f"{f.name}: verified" + (f" (sha256 {sha[:12]}...)" if sha else "")
             + f" in {path}")
        paths.append(path)
    return paths


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, file=sys.stderr)


# --------------------------------------------------------------------------- listing

@dataclass(frozen=True)
class Installed:
    """What is on this machine for one entry."""

    entry: Union[CatalogEntry, BoardEntry]
    folder: Path                       # where files go by hand
    present: tuple[Path, ...]
    partial: bool

    @property
    def complete(self) -> bool:
        return len(self.present) == len(self.entry.files)

    @property
    def status(self) -> str:
        if self.complete:
            return "installed"
        if self.present or self.partial:
            return "incomplete"
        return "not installed"


def _has_partial(entry: _Entry) -> bool:
    repo_dir = hub_cache_dir() / ("models--" + entry.repo.replace("/", "--")) / "blobs"
    return repo_dir.is_dir() and any(p.name.endswith(".incomplete") for p in repo_dir.iterdir())


def installed(models_dir: Optional[Path] = None) -> list[Installed]:
    """The state of every entry (portable, then board)."""
    root = models_dir or default_models_dir()
    out = []
    for entry in [*CATALOG.values(), *BOARD.values()]:
        found = [local_file(entry, f, root) for f in entry.files]
        present = tuple(p for p in found if p is not None)
        out.append(Installed(entry, root / entry.name, present,
                             len(present) < len(entry.files) and _has_partial(entry)))
    return out


def cli_models_pull(name: str, models_dir: Optional[Path] = None) -> int:
    """Download a catalogue model for a person at a terminal; returns the exit code.

    (The demo uses this; `rkvlm-assistant models pull` goes through assistant.models_cli.)
    """
    if lookup(name) is None:
        print(f"rkvlm-assistant: no catalogue model named {name!r}; known models: {names()}",
              file=sys.stderr)
        return 2
    try:
        paths = pull(name, models_dir, progress=True)
    except ModelMissingError as e:
        print(f"rkvlm-assistant: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{name} is installed:")
    for p in paths:
        print(f"  {p}")
    return 0
