"""config.yaml loading: every error path names the file and the key, and exits 78."""

import subprocess
import sys
from pathlib import Path

import pytest

from assistant import config
from assistant.config import Config, ConfigError, parse
from assistant.config_doc import default_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_the_documented_default():
    # config.yaml is rendered from the field docs: regenerate it with
    # `python -c "from assistant.config_doc import default_yaml; print(default_yaml(), end='')" > config.yaml`
    assert (ROOT / "config.yaml").read_text(encoding="utf-8") == default_yaml()
    assert config.load(ROOT / "config.yaml") == Config(source=str(ROOT / "config.yaml"))


def test_every_field_is_documented():
    for key, f, _ in config.iter_fields(Config()):
        assert f.metadata.get("doc"), key


def test_values_are_typed_and_frozen():
    cfg = parse("vad: {frame_ms: 20, aggressiveness: 3}\naudio: {input: {device: 2}}\n"
                "camera: {source: /dev/video1}\nvision: {rknn: {core_mask: 0_1}}")
    assert cfg.vad.frame_ms == 20 and cfg.vad.aggressiveness == 3
    assert cfg.audio.input.device == 2
    assert cfg.camera.source == "/dev/video1"
    assert cfg.vision.rknn.core_mask == "0_1"   # not YAML 1.1's integer 1
    assert parse("vision: {rknn: {core_mask: 0}}").vision.rknn.core_mask == "0"
    assert parse("llm: {llamacpp: {seed: 0x10}}").llm.llamacpp.seed == 16
    with pytest.raises(Exception):
        cfg.vad.frame_ms = 10  # frozen


@pytest.mark.parametrize("text, key, fragment", [
    ("llm: {max_context_len: lots}", "llm.max_context_len", "expected an integer from 128 to 131072, found 'lots'"),
    ("llm: {max_context_len: 64}", "llm.max_context_len", "found 64"),
    ("llm: {temperature: 9}", "llm.temperature", "expected a number from 0 to 5, found 9"),
    ("llm: {keep_history: yes please}", "llm.keep_history", "expected true or false"),
    ("llm: {backend: openai}", "llm.backend", "expected one of 'llamacpp', 'rkllm'"),
    ("llm: {rkllm: {runtime_version: 1.1.4}}", "llm.rkllm.runtime_version", "found '1.1.4'"),
    ("vad: {frame_ms: 25}", "vad.frame_ms", "expected one of 10, 20, 30, found 25"),
    ("vad: {aggressiveness: 4}", "vad.aggressiveness", "from 0 to 3"),
    ("llm: {tempreature: 0.5}", "llm.tempreature", "unknown key (expected one of: backend,"),
    ("persona: {language: fr}", "persona.language", "found 'fr'"),
    ("asr: [tiny]", "asr", "expected a mapping, found a list"),
    ("intent: {clear_phrases: clear}", "intent.clear_phrases", "expected a list of strings"),
    ("intent: {clear_phrases: [clear, 3]}", "intent.clear_phrases[1]", "expected a string, found 3"),
    ("camera: {source: [0]}", "camera.source", "found a list"),
    ("audio: {input: {sample_rate: 100}}", "audio.input.sample_rate", "found 100"),
    ("unknown_section: {}", "unknown_section", "unknown key"),
])
def test_bad_values_name_the_key(text, key, fragment):
    with pytest.raises(ConfigError) as e:
        parse(text, "my.yaml")
    msg = str(e.value)
    assert msg.startswith(f"my.yaml: {key}: "), msg
    assert fragment in msg
    assert "\n" not in msg
    assert e.value.key == key


def test_broken_yaml_and_wrong_top_level():
    with pytest.raises(ConfigError, match=r"my.yaml: line \d+, column \d+: not valid YAML"):
        parse("llm:\n  backend: [llamacpp\n", "my.yaml")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        parse("- a\n- b\n", "my.yaml")
    assert parse("", "empty.yaml") == Config(source="empty.yaml")


def test_missing_files_are_all_reported(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("llm: {backend: rkllm, rkllm: {model: models/q.rkllm, lora: l.rkllm}}\n"
                        "vision: {encoder: rknn, rknn: {model: /nonexistent/v.rknn}}\n")
    cfg = config.load(cfg_file)
    errors = config.check_files(cfg)
    keys = sorted(e.key for e in errors)
    assert keys == ["llm.rkllm.lora", "llm.rkllm.model", "vision.rknn.model"]
    model_err = next(e for e in errors if e.key == "llm.rkllm.model")
    # Relative paths are relative to the config file's folder.
    assert str(tmp_path / "models" / "q.rkllm") in str(model_err)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "q.rkllm").write_bytes(b"x")
    assert "llm.rkllm.model" not in {e.key for e in config.check_files(cfg)}


def test_unused_backend_files_are_not_required():
    cfg = parse("llm: {backend: llamacpp, rkllm: {model: /nope.rkllm}}\nvision: {encoder: none}")
    assert config.check_files(cfg) == []


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "assistant", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("text, key", [
    ("llm: {max_new_tokens: many}\n", "llm.max_new_tokens"),
    ("vad: {frame_size: 30}\n", "vad.frame_size"),
    ("llm: {backend: rkllm, rkllm: {model: missing.rkllm}}\nvision: {encoder: none}\n", "llm.rkllm.model"),
])
def test_cli_exits_78_with_one_line(tmp_path, text, key):
    (tmp_path / "bad.yaml").write_text(text)
    (tmp_path / "q.wav").write_bytes(b"")
    r = _cli("--config", "bad.yaml", "ask", "--audio", "q.wav", cwd=tmp_path)
    assert r.returncode == 78, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert key in lines[0] and "bad.yaml" in lines[0]
    assert "Traceback" not in r.stderr


def test_cli_missing_config_file(tmp_path):
    r = _cli("--config", "nope.yaml", "check", cwd=tmp_path)
    assert r.returncode == 78
    assert "nope.yaml: config file not found" in r.stderr
