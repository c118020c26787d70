"""config.yaml loading: every error path names the file and the key, and exits 78."""

import subprocess
import sys
from pathlib import Path

import pytest

from assistant import config
from assistant.config import Config, ConfigError, WakeConfig, parse
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
    # Every default, but for the wake section it does not have: a file without one answers
    # every utterance, as before the wake word (config_compat; tests/test_wake_upgrade.py).
    assert parse("", "empty.yaml") == Config(source="empty.yaml", wake=WakeConfig(mode="none"))


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


# --------------------------------------------------------------------------- earlier releases

RELEASES = sorted((ROOT / "tests" / "config_releases").glob("*.yaml"))
# The first release's keys and values, and where today's loader puts them.
FIRST_RELEASE_RENAMES = {
    "persona.greeting": "persona.en.greeting", "persona.goodbye": "persona.en.goodbye",
    "persona.cleared": "persona.en.cleared", "logging.transcript": "transcript.enabled",
}


def _leaves(data, prefix=""):
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield from _leaves(v, key)
        else:
            yield key, v


def _value(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return list(cfg) if isinstance(cfg, tuple) else cfg


def test_there_is_a_config_of_each_earlier_release_shape():
    # One per revision that changed config.yaml's keys (git log -p -- config.yaml), oldest
    # first; each file's first line names its revision and date.
    assert [p.stem for p in RELEASES] == [
        "01-7c3296e", "02-30cea41", "03-86b139f", "04-1cbd796", "05-ee3bb66", "06-96da943",
        "07-ed8c734"]


@pytest.mark.parametrize("path", RELEASES, ids=lambda p: p.stem)
def test_a_config_of_an_earlier_release_loads_with_its_values(path):
    import yaml

    cfg = config.load(path)
    old = dict(_leaves(yaml.safe_load(path.read_text(encoding="utf-8"))))
    first = "persona.greeting" in old
    for key, value in old.items():
        if key in FIRST_RELEASE_RENAMES:
            continue
        if key == "llm.on_context_full" and value == "clear":
            assert cfg.llm.on_context_full == "reset"      # the same behaviour, renamed
            continue
        assert _value(cfg, key) == value, key
    # No earlier release had a wake: section: each answered every utterance, and still does.
    assert "wake" not in yaml.safe_load(path.read_text(encoding="utf-8"))
    assert cfg.wake.mode == "none"
    if first:
        assert cfg.persona.en.greeting == old["persona.greeting"]
        assert cfg.persona.en.goodbye == old["persona.goodbye"]
        assert cfg.persona.en.cleared == old["persona.cleared"]
        assert cfg.persona.zh == Config().persona.zh                # its own defaults
        assert cfg.transcript.enabled is False                      # null: no transcript
        # One warning per renamed key or value, each naming the old and the new spelling.
        assert len(cfg.warnings) == 5, cfg.warnings
        for old_key, new_key in FIRST_RELEASE_RENAMES.items():
            line = next(w for w in cfg.warnings if f": {old_key} " in w)
            assert line.startswith(str(path)) and new_key in line and "\n" not in line
        assert any("llm.on_context_full: clear" in w and "reset" in w for w in cfg.warnings)
    else:
        assert cfg.warnings == ()


def test_renamed_keys_carry_what_the_person_wrote():
    text = ("persona:\n  greeting: Hi, Rocky here.\n  goodbye: 再见，朋友！\n  cleared: ''\n"
            "logging: {transcript: logs/turns.jsonl}\nllm: {on_context_full: clear}\n")
    cfg = parse(text, "old.yaml")
    assert cfg.persona.en.greeting == "Hi, Rocky here."
    assert cfg.persona.zh.greeting == Config().persona.zh.greeting
    # A Chinese line goes to the Chinese lines, the English one keeps its default.
    assert cfg.persona.zh.goodbye == "再见，朋友！" and cfg.persona.en.goodbye == "Goodbye!"
    # An empty line turned the reply off: off in both languages.
    assert cfg.persona.en.cleared == "" and cfg.persona.zh.cleared == ""
    assert cfg.transcript.path == "logs/turns.jsonl" and cfg.transcript.enabled is True
    assert cfg.llm.on_context_full == "reset"
    by_key = {w.split(": ")[1].split()[0]: w for w in cfg.warnings}
    assert "persona.zh.goodbye" in by_key["persona.goodbye"]
    assert "Chinese" in by_key["persona.goodbye"]
    assert "persona.en.cleared and persona.zh.cleared" in by_key["persona.cleared"]
    assert "transcript.path" in by_key["logging.transcript"]
    # The warnings are not part of the settings: the same values compare equal.
    assert cfg == parse("persona: {en: {greeting: 'Hi, Rocky here.', cleared: ''}, "
                        "zh: {goodbye: 再见，朋友！, cleared: ''}}\n"
                        "transcript: {path: logs/turns.jsonl}\nllm: {on_context_full: reset}",
                        "old.yaml")


def test_the_new_spelling_wins_over_the_old_one():
    cfg = parse("persona: {greeting: Old hello, en: {greeting: New hello}}", "c.yaml")
    assert cfg.persona.en.greeting == "New hello"
    assert len(cfg.warnings) == 1
    assert "also sets persona.en.greeting" in cfg.warnings[0] and "ignored" in cfg.warnings[0]


def test_a_wrong_value_under_an_old_key_names_the_old_key():
    with pytest.raises(ConfigError) as e:
        parse("persona: {greeting: [hello]}", "c.yaml")
    assert str(e.value).startswith("c.yaml: persona.greeting (read as persona.en.greeting): "
                                   "expected a string, found a list")
    assert e.value.key == "persona.greeting"


def test_cli_logs_each_old_key_once(tmp_path):
    (tmp_path / "old.yaml").write_text("persona: {greeting: Hello there.}\n"
                                       "logging: {transcript: turns.jsonl}\n")
    r = _cli("--config", "old.yaml", "history", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if "earlier release" in l]
    assert len(lines) == 2, r.stderr
    assert all("WARNING" in l for l in lines)
    assert "persona.greeting" in lines[0] and "persona.en.greeting" in lines[0]
    assert "logging.transcript" in lines[1] and "transcript.path" in lines[1]


# --------------------------------------------------------------------------- finite, bounded

def _float_keys():
    """Every float setting, bounded or not (f.type is the annotation's text)."""
    return [key for key, f, _ in config.iter_fields(Config()) if "float" in str(f.type)]


def _nested_text(key: str, value: str) -> str:
    *parents, last = key.split(".")
    text = f"{last}: {value}"
    for p in reversed(parents):
        text = f"{p}: {{{text}}}"
    return text


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e400"])
def test_no_float_takes_nan_or_infinity(value):
    keys = _float_keys()
    assert "tts.length_scale" in keys and "http.max_body_mb" in keys and len(keys) > 20
    for key in keys:
        with pytest.raises(ConfigError) as e:
            parse(_nested_text(key, value), "c.yaml")
        assert str(e.value).startswith(f"c.yaml: {key}: expected a number"), str(e.value)
        assert e.value.key == key


def test_a_huge_integer_for_a_float_is_refused():
    with pytest.raises(ConfigError, match=r"c.yaml: tts.length_scale: expected a number"):
        parse("tts: {length_scale: " + "9" * 400 + "}", "c.yaml")


def test_deep_nesting_is_refused():
    # Before: RecursionError (exit 1, a traceback), or 13 s in PyYAML's scanner first.
    for text in ("a: " + "[" * 10_000 + "]" * 10_000, "[" * 10_000,
                 "a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 500)),
                 "- " * 10_000 + "x"):
        with pytest.raises(ConfigError) as e:
            parse(text, "deep.yaml")
        assert str(e.value).startswith("deep.yaml: line ") and "nested more than" in str(e.value)
    # The real config's depth is well inside the bound.
    assert parse("llm: {rkllm: {model: m.rkllm}}\nintent: {clear_phrases: [clear]}").llm.rkllm.model


def test_a_file_too_large_is_refused_without_reading_it_all(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (config.MAX_CONFIG_BYTES + 10) + "\n")
    with pytest.raises(ConfigError, match=r"big.yaml: a config file is at most 1 MB .*; this one is 1.0 MB"):
        config.load(big)
    with pytest.raises(ConfigError, match=r"a config file is at most 1 MB"):
        parse("#" + "x" * (config.MAX_CONFIG_BYTES + 1))
    # A device is never read (it could be endless): tests/test_config_files.py.
    with pytest.raises(ConfigError, match=r"/dev/zero: a character device, not a regular file"):
        config.load("/dev/zero")


@pytest.mark.parametrize("text, key", [
    ("http: {max_body_mb: .nan}\n", "http.max_body_mb"),
    ("tts: {length_scale: .nan}\n", "tts.length_scale"),
    ("a: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested more than"),
])
def test_cli_exits_78_on_nan_and_nesting(tmp_path, text, key):
    (tmp_path / "bad.yaml").write_text(text)
    r = _cli("--config", "bad.yaml", "history", cwd=tmp_path)
    assert r.returncode == 78, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and key in lines[0], r.stderr
    assert "Traceback" not in r.stderr
