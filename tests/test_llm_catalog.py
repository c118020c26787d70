"""The model catalogue: resolving config to files, and pull against a local HTTP server.

The server (127.0.0.1 only) imitates the hub's ``resolve`` URLs: HEAD answers carry
``X-Linked-Etag`` / ``X-Linked-Size`` / ``X-Repo-Commit``, GET honours Range, and it can
redirect to a blob URL the way huggingface.co redirects to its CDN.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from assistant.config import LlamaCppConfig
from assistant.errors import ModelMissingError
from assistant.llm import catalog
from assistant.llm.catalog import CatalogEntry, ChecksumError, DownloadError, ModelFile

MODEL_BYTES = bytes(range(256)) * 40 + b"model-end"      # ~10 KB
MMPROJ_BYTES = b"mmproj" * 700


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHub:
    """A tiny hub: files by URL path, with switches for the failure cases."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.sha_override: dict[str, str] = {}
        self.corrupt: set[str] = set()
        self.ignore_range = False
        self.redirect = False
        self.requests: list[tuple[str, str, str]] = []   # (method, path, Range header)
        self.bytes_sent = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _lookup(self):
                path = self.path
                if path.startswith("/blobs/"):
                    for p, data in hub.files.items():
                        if _sha(data) == path.split("/")[-1]:
                            return p, data
                    return path, None
                return path, hub.files.get(path)

            def _facts(self, path: str, data: bytes) -> None:
                self.send_header("X-Linked-Etag", f'"{hub.sha_override.get(path, _sha(data))}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("X-Repo-Commit", "c0ffee" * 6 + "abcd")

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                hub.requests.append((self.command, self.path, self.headers.get("Range", "")))
                path, data = self._lookup()
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if hub.redirect and not self.path.startswith("/blobs/"):
                    self.send_response(302)
                    self._facts(path, data)
                    self.send_header("Location", f"/blobs/{_sha(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                described = data  # the headers describe the good file
                if path in hub.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                start = 0
                rng = self.headers.get("Range")
                if rng and not hub.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self._facts(path, described)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if body:
                    hub.bytes_sent += len(data) - start  # before the client can see them
                    self.wfile.write(data[start:])

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


TINY = CatalogEntry("tiny-vlm", "Tiny test VLM", "test-org/Tiny-GGUF", "0123456789abcdef" * 2 + "01234567",
                    ModelFile("tiny.gguf"), ModelFile("mmproj-tiny.gguf"))


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setitem(catalog.CATALOG, TINY.name, TINY)
    with FakeHub() as h:
        h.files[f"/{TINY.repo}/resolve/{TINY.ref}/tiny.gguf"] = MODEL_BYTES
        h.files[f"/{TINY.repo}/resolve/{TINY.ref}/mmproj-tiny.gguf"] = MMPROJ_BYTES
        yield h


def _model_url(hub: FakeHub) -> str:
    return f"/{TINY.repo}/resolve/{TINY.ref}/tiny.gguf"


def test_pull_downloads_verifies_and_lists(hub, tmp_path, capsys):
    paths = catalog.pull(TINY.name, tmp_path, base_url=hub.url, progress=True)
    assert [p.read_bytes() for p in paths] == [MODEL_BYTES, MMPROJ_BYTES]
    assert not list(tmp_path.rglob("*.part"))
    assert "verified" in capsys.readouterr().err

    state = {i.entry.name: i for i in catalog.installed(tmp_path)}[TINY.name]
    assert state.complete and state.verified and state.status == "installed"
    assert catalog.cli_models_list(tmp_path) == 0
    out = capsys.readouterr().out
    assert str(paths[0]) in out and "installed" in out
    assert "models pull smolvlm2-256m" in out  # what is not installed says how to get it


def test_pull_follows_hub_redirect_and_reads_hash_from_it(hub, tmp_path):
    hub.redirect = True
    paths = catalog.pull(TINY.name, tmp_path, base_url=hub.url, progress=False)
    assert paths[0].read_bytes() == MODEL_BYTES
    assert any(p.startswith("/blobs/") for _, p, _ in hub.requests)
    manifest = (tmp_path / TINY.name / catalog.MANIFEST).read_text()
    assert _sha(MODEL_BYTES) in manifest and "c0ffee" in manifest


@pytest.mark.parametrize("redirect", [False, True])
def test_pull_resumes_from_part_file(hub, tmp_path, redirect):
    hub.redirect = redirect
    folder = tmp_path / TINY.name
    folder.mkdir()
    half = len(MODEL_BYTES) // 2
    (folder / "tiny.gguf.part").write_bytes(MODEL_BYTES[:half])
    catalog.pull(TINY.name, tmp_path, base_url=hub.url, progress=False)
    assert (folder / "tiny.gguf").read_bytes() == MODEL_BYTES
    served = f"/blobs/{_sha(MODEL_BYTES)}" if redirect else _model_url(hub)
    gets = [r for r in hub.requests if r[0] == "GET" and r[1] == served]
    assert gets == [("GET", served, f"bytes={half}-")]
    assert hub.bytes_sent == len(MODEL_BYTES) - half + len(MMPROJ_BYTES)


def test_pull_restarts_when_server_ignores_range(hub, tmp_path):
    hub.ignore_range = True
    folder = tmp_path / TINY.name
    folder.mkdir()
    (folder / "tiny.gguf.part").write_bytes(b"stale bytes from another file")
    catalog.pull(TINY.name, tmp_path, base_url=hub.url, progress=False)
    assert (folder / "tiny.gguf").read_bytes() == MODEL_BYTES


def test_checksum_mismatch_deletes_download(hub, tmp_path):
    hub.corrupt.add(_model_url(hub))
    with pytest.raises(ChecksumError, match="sha256") as err:
        catalog.pull(TINY.name, tmp_path, base_url=hub.url, progress=False)
    assert "tiny.gguf" in str(err.value)
    folder = tmp_path / TINY.name
    assert not (folder / "tiny.gguf").exists() and not (folder / "tiny.gguf.part").exists()


def test_catalogue_pin_wins_over_a_different_hub_file(hub, tmp_path, monkeypatch):
    pinned = replace(TINY, model=ModelFile("tiny.gguf", sha256="0" * 64))
    monkeypatch.setitem(catalog.CATALOG, TINY.name, pinned)
    with pytest.raises(ChecksumError, match="pinned"):
        catalog.pull(TINY.name, tmp_path, base_url=hub.url, progress=False)
    assert not any(r[0] == "GET" for r in hub.requests)


def test_pinned_size_is_enforced(hub, tmp_path, monkeypatch):
    pinned = replace(TINY, model=ModelFile("tiny.gguf", sha256=_sha(MODEL_BYTES),
                                           size=len(MODEL_BYTES) + 5))
    monkeypatch.setitem(catalog.CATALOG, TINY.name, pinned)
    with pytest.raises(ChecksumError, match="expected"):
        catalog.pull(TINY.name, tmp_path, base_url=hub.url, progress=False)


def test_missing_file_on_server(hub, tmp_path):
    del hub.files[f"/{TINY.repo}/resolve/{TINY.ref}/mmproj-tiny.gguf"]
    with pytest.raises(DownloadError) as err:
        catalog.pull(TINY.name, tmp_path, base_url=hub.url, progress=False)
    msg = str(err.value)
    assert "404" in msg and "mmproj-tiny.gguf" in msg and str(tmp_path / TINY.name) in msg


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_gives_one_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(catalog.CATALOG, TINY.name, TINY)
    code = catalog.cli_models_pull(TINY.name, tmp_path, base_url=f"http://127.0.0.1:{_closed_port()}")
    assert code == DownloadError.exit_code
    err = capsys.readouterr().err
    assert err.count("rkvlm-assistant:") == 1
    for f in TINY.files:
        assert f"https://huggingface.co/{TINY.repo}/resolve/{TINY.ref}/{f.name}" in err
    assert str(tmp_path / TINY.name) in err


def test_pull_of_unknown_name(tmp_path, capsys):
    assert catalog.cli_models_pull("no-such-model", tmp_path) == 2
    assert "smolvlm2-256m" in capsys.readouterr().err


def test_pull_verifies_files_placed_by_hand(hub, tmp_path, monkeypatch):
    folder = tmp_path / TINY.name
    folder.mkdir()
    (folder / "tiny.gguf").write_bytes(MODEL_BYTES)
    (folder / "mmproj-tiny.gguf").write_bytes(MMPROJ_BYTES[:-1] + b"!")
    with pytest.raises(ChecksumError, match="mmproj-tiny.gguf is not the expected file"):
        catalog.pull(TINY.name, tmp_path, base_url=hub.url, progress=False)
    assert not any(r[0] == "GET" for r in hub.requests)   # nothing was downloaded
    # With the sha256 pinned, checking needs no network at all.
    pinned = replace(TINY, model=ModelFile("tiny.gguf", sha256=_sha(MODEL_BYTES)),
                     mmproj=ModelFile("mmproj-tiny.gguf", sha256=_sha(MMPROJ_BYTES)))
    monkeypatch.setitem(catalog.CATALOG, TINY.name, pinned)
    (folder / "mmproj-tiny.gguf").write_bytes(MMPROJ_BYTES)
    offline = f"http://127.0.0.1:{_closed_port()}"
    catalog.pull(TINY.name, tmp_path, base_url=offline, progress=False)
    state = {i.entry.name: i for i in catalog.installed(tmp_path)}[TINY.name]
    assert state.verified


def test_second_pull_skips_verified_files(hub, tmp_path):
    catalog.pull(TINY.name, tmp_path, base_url=hub.url, progress=False)
    hub.requests.clear()
    catalog.pull(TINY.name, tmp_path, base_url=hub.url, progress=False)
    assert hub.requests == []


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
        assert e.url(e.model).startswith("https://huggingface.co/")


def test_missing_catalogue_model_names_files_dir_and_command(tmp_path):
    cfg = LlamaCppConfig(model="smolvlm2-256m", models_dir=str(tmp_path))
    with pytest.raises(ModelMissingError) as err:
        catalog.resolve(cfg, _path_of(tmp_path))
    msg = str(err.value)
    folder = tmp_path / "smolvlm2-256m"
    assert str(folder / "SmolVLM2-256M-Video-Instruct-Q8_0.gguf") in msg
    assert str(folder / "mmproj-SmolVLM2-256M-Video-Instruct-Q8_0.gguf") in msg
    assert "rkvlm-assistant models pull smolvlm2-256m" in msg


def test_installed_catalogue_model_resolves(tmp_path):
    folder = tmp_path / "smolvlm2-256m"
    folder.mkdir()
    e = catalog.CATALOG["smolvlm2-256m"]
    for f in e.files:
        (folder / f.name).write_bytes(b"GGUF")
    cfg = LlamaCppConfig(model="smolvlm2-256m", models_dir=str(tmp_path))
    assert catalog.resolve(cfg, _path_of(tmp_path)) == (folder / e.model.name, folder / e.mmproj.name)
    assert catalog.resolve(cfg, _path_of(tmp_path), want_mmproj=False) == (folder / e.model.name, None)
    state = {i.entry.name: i for i in catalog.installed(tmp_path)}["smolvlm2-256m"]
    assert state.complete and not state.verified


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


def test_default_models_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert catalog.default_models_dir() == tmp_path / "rkvlm-assistant" / "models"
