"""The model catalogue: resolving config to files, and pulls through huggingface_hub.

Downloads run against tests/hub_server.py on 127.0.0.1 with HF_ENDPOINT pointed at it (set
after huggingface_hub was imported: the product reads it when a pull starts) and the hub
cache in the test's own folder.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from assistant.config import LlamaCppConfig
from assistant.errors import ModelMissingError
from assistant.llm import catalog
from assistant.llm.catalog import BoardEntry, CatalogEntry, ChecksumError, DownloadError, ModelFile
from tests.hub_server import HubServer, sha256

MODEL_BYTES = bytes(range(256)) * 400 + b"model-end"      # ~100 KB
MMPROJ_BYTES = b"mmproj" * 700

TINY = CatalogEntry("tiny-vlm", "Tiny test VLM", "test-org/Tiny-GGUF", None,
                    ModelFile("tiny.gguf"), ModelFile("mmproj-tiny.gguf"))
PINNED_REV = "0123456789abcdef" * 2 + "01234567"


@pytest.fixture(autouse=True)
def private_hub(tmp_path, monkeypatch):
    """The hub cache, the data folder and the hub settings of this test only."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setitem(catalog.CATALOG, TINY.name, TINY)


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as h:
        h.add(TINY.repo, "tiny.gguf", MODEL_BYTES)
        h.add(TINY.repo, "mmproj-tiny.gguf", MMPROJ_BYTES)
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pull_downloads_into_the_hub_cache_and_verifies(hub, tmp_path, capsys):
    paths = catalog.pull(TINY.name, tmp_path / "models", progress=True)
    assert [p.read_bytes() for p in paths] == [MODEL_BYTES, MMPROJ_BYTES]
    assert all(str(tmp_path / "hf" / "hub") in str(p) for p in paths)
    assert "verified (sha256" in capsys.readouterr().err
    state = {i.entry.name: i for i in catalog.installed(tmp_path / "models")}[TINY.name]
    assert state.complete and state.status == "installed"
    # resolve() finds the pulled files for llm.llamacpp.model: NAME
    cfg = LlamaCppConfig(model=TINY.name, models_dir=str(tmp_path / "models"))
    assert catalog.resolve(cfg, _path_of(tmp_path)) == (paths[0], paths[1])


def test_pull_resumes_after_a_cut_connection(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # The hub client keeps what it has received in 10 MB chunks; small chunks let a 100 KB
    # test file be cut after some of them arrived, as a real model is.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    hub.cut.add("tiny.gguf")
    try:
        catalog.pull(TINY.name, tmp_path, progress=False)
    except DownloadError:      # a client that gives up: the next pull goes on
        catalog.pull(TINY.name, tmp_path, progress=False)
    assert catalog.pull(TINY.name, tmp_path, progress=False)[0].read_bytes() == MODEL_BYTES
    gets = hub.gets("tiny.gguf")
    assert len(gets) == 2 and gets[0][2] == ""
    resumed_at = int(gets[1][2].removeprefix("bytes=").rstrip("-"))   # asked only for the rest
    assert 0 < resumed_at <= len(MODEL_BYTES) // 2
    assert hub.bytes_sent < 2 * len(MODEL_BYTES) + len(MMPROJ_BYTES)


def test_a_corrupted_download_is_refused_and_deleted(hub, tmp_path):
    hub.corrupt.add("tiny.gguf")
    with pytest.raises(ChecksumError) as err:
        catalog.pull(TINY.name, tmp_path, progress=False)
    msg = str(err.value)
    assert "tiny.gguf" in msg and sha256(MODEL_BYTES) in msg and "models pull tiny-vlm" in msg
    assert err.value.exit_code == 65
    assert catalog.cached_file(TINY, TINY.model) is None
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and p.stat().st_size > 50_000]


def test_a_pin_that_disagrees_with_the_hub_is_refused_before_downloading(hub, tmp_path, monkeypatch):
    pinned = replace(TINY, model=ModelFile("tiny.gguf", sha256="0" * 64))
    monkeypatch.setitem(catalog.CATALOG, TINY.name, pinned)
    with pytest.raises(ChecksumError, match="pinned"):
        catalog.pull(TINY.name, tmp_path, progress=False)
    assert not hub.gets("tiny.gguf")


def test_a_pinned_sha256_is_checked_after_download(hub, tmp_path, monkeypatch):
    pinned = replace(TINY, model=ModelFile("tiny.gguf", sha256=sha256(MODEL_BYTES)))
    monkeypatch.setitem(catalog.CATALOG, TINY.name, pinned)
    assert catalog.pull(TINY.name, tmp_path, progress=False)[0].read_bytes() == MODEL_BYTES


def test_offline_with_the_files_cached_needs_no_network(hub, tmp_path, monkeypatch):
    catalog.pull(TINY.name, tmp_path, progress=False)
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = catalog.pull(TINY.name, tmp_path, progress=False)
    assert paths[0].read_bytes() == MODEL_BYTES and hub.requests == []


def test_offline_without_the_files_says_where_to_put_them(hub, tmp_path, monkeypatch, capsys):
    from assistant.config import Config
    from assistant.models_cli import cli_pull

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli_pull(Config(), TINY.name, tmp_path / "models")
    assert code == DownloadError.exit_code == 69
    err = capsys.readouterr().err
    assert err.count("rkvlm-assistant:") == 1 and "HF_HUB_OFFLINE" in err
    assert str(tmp_path / "models" / TINY.name) in err
    assert f"{hub.url}/{TINY.repo}/resolve/main/tiny.gguf" in err
    assert "models pull tiny-vlm" in err
    assert hub.requests == []


def test_a_file_already_in_the_shared_cache_is_not_fetched_again(hub, tmp_path, monkeypatch):
    from huggingface_hub import hf_hub_download

    # Another tool (llama.cpp's -hf, a script) downloaded the model into the shared cache.
    hf_hub_download(TINY.repo, "tiny.gguf", endpoint=hub.url,
                    cache_dir=str(tmp_path / "hf" / "hub"))
    hub.requests.clear()
    hub.bytes_sent = 0
    catalog.pull(TINY.name, tmp_path, progress=False)
    assert hub.gets("tiny.gguf") == []                 # at most a HEAD to check for updates
    assert hub.bytes_sent == len(MMPROJ_BYTES)
    # With the revision pinned to a commit, a cached file costs no request at all.
    from tests.hub_server import COMMIT
    monkeypatch.setitem(catalog.CATALOG, TINY.name, replace(TINY, revision=COMMIT))
    hub.requests.clear()
    catalog.pull(TINY.name, tmp_path, progress=False)
    assert hub.requests == []


def test_the_unreachable_hub_gives_one_clear_message(tmp_path, monkeypatch, capsys):
    from assistant.config import Config
    from assistant.models_cli import cli_pull

    from huggingface_hub import file_download

    # The hub client retries a refused connection with back-off for ~20 s; once is enough here.
    monkeypatch.setattr(file_download, "_DEFAULT_RETRY_ON_EXCEPTIONS", ())
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    code = cli_pull(Config(), TINY.name, tmp_path / "models")
    assert code == 69
    err = capsys.readouterr().err
    assert err.count("rkvlm-assistant:") == 1
    assert str(tmp_path / "models" / TINY.name) in err and "mmproj-tiny.gguf" in err


def test_a_file_missing_on_the_hub(hub, tmp_path):
    del hub.files[(TINY.repo, "mmproj-tiny.gguf")]
    with pytest.raises(DownloadError) as err:
        catalog.pull(TINY.name, tmp_path, progress=False)
    assert "404" in str(err.value) and "mmproj-tiny.gguf" in str(err.value)


def test_unknown_name(tmp_path, capsys):
    from assistant.config import Config
    from assistant.models_cli import cli_pull

    assert cli_pull(Config(), "no-such-model", tmp_path) == 2
    err = capsys.readouterr().err
    assert "smolvlm2-256m" in err and "zh_CN-huayan-medium" in err


def test_files_placed_by_hand_are_used_and_checked(hub, tmp_path, monkeypatch):
    folder = tmp_path / "models" / TINY.name
    folder.mkdir(parents=True)
    (folder / "tiny.gguf").write_bytes(MODEL_BYTES)
    paths = catalog.pull(TINY.name, tmp_path / "models", progress=False)
    assert paths[0] == folder / "tiny.gguf" and not hub.gets("tiny.gguf")
    pinned = replace(TINY, model=ModelFile("tiny.gguf", sha256="0" * 64))
    monkeypatch.setitem(catalog.CATALOG, TINY.name, pinned)
    with pytest.raises(ChecksumError, match="not the expected file"):
        catalog.pull(TINY.name, tmp_path / "models", progress=False)


def test_a_board_pull_fetches_the_rkllm_and_the_rknn(hub, tmp_path, monkeypatch):
    board = BoardEntry("tiny-rk3588", "Tiny pair", "test-org/Tiny-rk3588", None, "rk3588",
                       "qwen2-vl", ModelFile("tiny_w8a8_rk3588.rkllm"),
                       ModelFile("tiny_vision_rk3588.rknn"))
    monkeypatch.setitem(catalog.BOARD, board.name, board)
    hub.add(board.repo, board.llm.name, b"RKLLM" * 1000)
    hub.add(board.repo, board.encoder.name, b"RKNN" * 1000)
    llm, enc = catalog.pull(board.name, tmp_path, progress=False)
    assert llm.name.endswith(".rkllm") and enc.read_bytes() == b"RKNN" * 1000
    assert catalog.resolve_files(board, tmp_path) == [llm, enc]


# --------------------------------------------------------------------------- resolve

def _path_of(base: Path):
    def resolve_path(value):
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    return resolve_path


def test_catalogue_has_the_required_models():
    for name in ("smolvlm2-256m", "smolvlm2-500m", "internvl3-1b", "qwen2.5-vl-3b"):
        e = catalog.CATALOG[name]
        assert e.repo.startswith("ggml-org/") and e.model.name.endswith(".gguf")
        assert e.mmproj.name.startswith("mmproj-")
        assert e.revision is None or len(e.revision) == 40


def test_board_entries_are_complete_pairs():
    from assistant.llm.families import FAMILIES

    for e in catalog.BOARD.values():
        assert e.chip in ("rk3588", "rk3576") and e.family in FAMILIES
        assert e.llm.name.endswith(".rkllm") and e.encoder.name.endswith(".rknn")
        assert e.chip in e.llm.name and e.chip in e.encoder.name and e.source


def test_urls_follow_hf_endpoint_of_now(monkeypatch):
    e = catalog.CATALOG["smolvlm2-256m"]
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert e.url(e.model).startswith("https://huggingface.co/ggml-org/")
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com/")
    assert e.url(e.model).startswith("https://hf-mirror.com/ggml-org/")


def test_missing_catalogue_model_names_files_dir_and_command(tmp_path):
    cfg = LlamaCppConfig(model="smolvlm2-256m", models_dir=str(tmp_path))
    with pytest.raises(ModelMissingError) as err:
        catalog.resolve(cfg, _path_of(tmp_path))
    msg = str(err.value)
    folder = tmp_path / "smolvlm2-256m"
    assert str(folder / "SmolVLM2-256M-Video-Instruct-Q8_0.gguf") in msg
    assert str(folder / "mmproj-SmolVLM2-256M-Video-Instruct-Q8_0.gguf") in msg
    assert "rkvlm-assistant models pull smolvlm2-256m" in msg
    assert err.value.exit_code == 78


def test_models_pulled_by_earlier_versions_still_resolve(tmp_path):
    # Earlier versions downloaded into <models_dir>/<name>/; the same folder takes files by hand.
    folder = tmp_path / "smolvlm2-256m"
    folder.mkdir()
    e = catalog.CATALOG["smolvlm2-256m"]
    for f in e.files:
        (folder / f.name).write_bytes(b"GGUF")
    cfg = LlamaCppConfig(model="smolvlm2-256m", models_dir=str(tmp_path))
    assert catalog.resolve(cfg, _path_of(tmp_path)) == (folder / e.model.name, folder / e.mmproj.name)
    assert catalog.resolve(cfg, _path_of(tmp_path), want_mmproj=False) == (folder / e.model.name, None)


def test_paths_in_config_are_used_as_is(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "p.gguf").write_bytes(b"GGUF")
    cfg = LlamaCppConfig(model="m.gguf", mmproj="p.gguf")
    assert catalog.resolve(cfg, _path_of(tmp_path)) == (tmp_path / "m.gguf", tmp_path / "p.gguf")
    with pytest.raises(ModelMissingError, match="llm.llamacpp.model: model file not found"):
        catalog.resolve(LlamaCppConfig(model="gone.gguf"), _path_of(tmp_path))
    with pytest.raises(ModelMissingError, match="llm.llamacpp.mmproj"):
        catalog.resolve(LlamaCppConfig(model="m.gguf", mmproj="gone.gguf"), _path_of(tmp_path))
    with pytest.raises(ModelMissingError, match="neither a catalogue model"):
        catalog.resolve(LlamaCppConfig(model="llama-9000"), _path_of(tmp_path))


def test_a_board_name_in_the_portable_setting_says_what_to_do(tmp_path):
    name = next(iter(catalog.BOARD))
    with pytest.raises(ModelMissingError, match=f"models use {name}"):
        catalog.resolve(LlamaCppConfig(model=name), _path_of(tmp_path))


def test_default_models_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert catalog.default_models_dir() == tmp_path / "rkvlm-assistant" / "models"
