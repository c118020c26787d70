"""`models pull NAME --configure` and `models use NAME` for every kind of model: a whisper size
sets asr.model, a piper voice tts.voice (English) or tts.voice_zh (Chinese), and a voice of
another language is refused with the key to set by hand; nothing is ever silently ignored.

Downloads come from the local hub (tests/hub_server.py), which here also answers the hub's
model API that faster-whisper's snapshot download asks first. The whisper pull runs as a real
process: huggingface_hub reads HF_ENDPOINT once, at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from assistant.cli import main
from assistant.config import load
from tests.hub_server import COMMIT, HubServer

ROOT = Path(__file__).resolve().parents[1]
VOICES = "rhasspy/piper-voices"

CONFIG = """\
# Set up by hand: keep these notes.
persona:
  language: auto     # both languages
asr:
  model: tiny.en     # the small board
tts:
  voice: en_US-joe-medium
  voice_zh: null     # not yet
"""


class ApiHub(HubServer):
    """The local hub plus the two model API calls of a snapshot download: the revision
    (its commit and files) and the file tree."""

    def _handler(self):
        hub = self

        class Handler(super()._handler()):
            def do_GET(self):
                if not self.path.startswith("/api/models/"):
                    return super().do_GET()
                hub.requests.append(("GET", self.path, ""))
                repo = "/".join(self.path.split("?")[0].split("/")[3:5])
                names = [f for (r, f) in hub.files if r == repo]
                if "/tree/" in self.path:
                    data = [{"type": "file", "oid": "0" * 40, "path": f,
                             "size": len(hub.files[(repo, f)])} for f in names]
                else:
                    data = {"id": repo, "sha": COMMIT,
                            "siblings": [{"rfilename": f} for f in names]}
                body = json.dumps(data).encode()
                self.send_response(200 if names else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        return Handler


def voice_files(name: str) -> list[str]:
    """Where piper-voices keeps a voice: en/en_GB/alan/low/en_GB-alan-low.onnx(.json)."""
    lang, rest = name.split("-", 1)
    speaker, quality = rest.rsplit("-", 1)
    folder = f"{lang.split('_')[0]}/{lang}/{speaker}/{quality}"
    return [f"{folder}/{name}.onnx", f"{folder}/{name}.onnx.json"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    from huggingface_hub import constants

    values = {"HF_HOME": str(tmp_path / "hf"), "XDG_DATA_HOME": str(tmp_path / "data"),
              "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "RKVLM_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return values


@pytest.fixture
def conf(tmp_path, env) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    return [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]


@pytest.mark.parametrize("name, key, comment", [
    ("en_GB-alan-low", "tts.voice", ""),
    ("zh_CN-huayan-medium", "tts.voice_zh", "# not yet"),
])
def test_pull_configure_a_voice_sets_the_key_of_its_language(conf, monkeypatch, capsys, name,
                                                              key, comment):
    # Bug caught: --configure ignored for voices (exit 0, the config as it was), or a Chinese
    # voice written to tts.voice (every English answer read in Chinese).
    with HubServer() as hub:
        for f in voice_files(name):
            hub.add(VOICES, f, b"{}" if f.endswith(".json") else b"ONNX" * 50)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert main(["--config", str(conf), "models", "pull", name, "--configure"]) == 0
    cfg = load(conf)
    assert {"tts.voice": cfg.tts.voice, "tts.voice_zh": cfg.tts.voice_zh}[key] == name
    # Only that line changed, keeping its comment; the other voice stays.
    [(_, after)] = changed_lines(CONFIG, conf.read_text())
    assert after.startswith(f"  {key.split('.')[1]}: {name}") and after.endswith(comment)
    assert f"now using {name}" in capsys.readouterr().out


def test_pull_configure_a_whisper_size_sets_asr_model(tmp_path, conf, env):
    # Bug caught: `models pull small --configure` downloading and leaving asr.model as it was.
    with ApiHub() as hub:
        for f in ("config.json", "model.bin", "tokenizer.json", "vocabulary.txt"):
            hub.add("Systran/faster-whisper-small", f, b"whisper " + f.encode())
        r = subprocess.run(
            [sys.executable, "-m", "assistant", "--config", str(conf), "models", "pull", "small",
             "--configure"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
            env=dict(os.environ, **env, HF_ENDPOINT=hub.url, PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, r.stderr[-2000:]
        assert hub.gets("model.bin")                    # it came from the hub
    assert load(conf).asr.model == "small"
    [(_, after)] = changed_lines(CONFIG, conf.read_text())
    assert after.startswith("  model: small ") and after.endswith("# the small board")
    # Now installed, `use` takes it without a download (in this process: no hub at all).
    conf.write_text(CONFIG)
    assert main(["--config", str(conf), "models", "use", "small"]) == 0
    assert load(conf).asr.model == "small"


def test_use_of_a_whisper_size_or_voice_that_is_not_installed_says_how_to_get_it(conf, capsys):
    # Bug caught: `use` writing a model the service then cannot find (it would fail at start),
    # or the old "no catalogue model named 'medium'".
    for name in ("medium", "en_GB-alan-low"):
        assert main(["--config", str(conf), "models", "use", name]) != 0
        err = capsys.readouterr().err
        assert f"`rkvlm-assistant models pull {name} --configure`" in err, err
        assert "no catalogue model" not in err
    assert conf.read_text() == CONFIG


def test_a_voice_of_another_language_is_refused_with_the_key_to_set(conf, monkeypatch, capsys):
    # Bug caught: a German voice silently put in tts.voice_zh or dropped; it is refused before
    # any download, and the message names the key a person can set by hand.
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        for argv in (["pull", "de_DE-thorsten-medium", "--configure"],
                     ["use", "de_DE-thorsten-medium"]):
            assert main(["--config", str(conf), "models", *argv]) == 2
            err = capsys.readouterr().err
            assert "neither English nor Chinese" in err and "nothing was changed" in err
            assert f"set tts.voice: de_DE-thorsten-medium in {conf}" in err
        assert hub.requests == []
    assert conf.read_text() == CONFIG


def test_an_unknown_name_lists_every_kind(conf, capsys):
    assert main(["--config", str(conf), "models", "use", "gpt-9"]) == 2
    err = capsys.readouterr().err
    assert "no model named 'gpt-9'" in err and "whisper sizes" in err and "piper voices" in err
    assert conf.read_text() == CONFIG


def test_pull_configure_without_a_config_file_stops_before_downloading(tmp_path, env,
                                                                        monkeypatch, capsys):
    # Bug caught: a long download first, then "there is no config file".
    monkeypatch.chdir(tmp_path)
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert main(["models", "pull", "en_GB-alan-low", "--configure"]) == 78
        assert hub.requests == []
    assert "--config FILE" in capsys.readouterr().err
