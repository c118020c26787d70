"""`check` is the truth about the service: every part the service loads at start (whisper, the
voices, the Chinese voice, Smart Turn, the GGUF model and projector, the backend packages,
the wake word) missing, empty, cut short, random bytes or the wrong kind of file makes
`check` fail naming it, and makes `run` (a real process) exit 78, the code systemd does not
restart, with the same message, before it loads anything else. Both go through one list of
probes (assistant.preflight).

Also: onnxruntime's telemetry writes nothing under HOME / XDG_CACHE_HOME, the wake mode in
force is one line of check, and logging.debug_recording is checked against the unit's
writable directories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from assistant import preflight
from assistant.audio.smart_turn import bundled_model
from assistant.config import Config, load
from assistant.demo import draw_scene
from tiny_models import write_mmproj, write_text_model

REPO = Path(__file__).resolve().parents[1]
KINDS = ("missing", "empty", "truncated", "random", "wrong_kind")
# The parts a config names, by the key their message must name.
PARTS = ("asr.model", "tts.voice", "tts.voice_zh", "vad.smart_turn_model",
         "llm.llamacpp.model", "llm.llamacpp.mmproj")
# Variables that make onnxruntime keep quiet by itself (CI): the telemetry check needs them off.
_CI_VARS = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS",
            "JENKINS_URL", "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR",
            "BITBUCKET_BUILD_NUMBER", "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI", "ORT_RUNNING_UNIT_TESTS")


def _good_files(d: Path) -> dict[str, Path]:
    """The real thing for each part (the packaged whisper and voice, pipecat's Smart Turn)."""
    from assistant.audio.model_paths import resolve_voice, resolve_whisper

    cfg = Config()
    whisper = resolve_whisper(cfg.asr, cfg.path)
    voice, voice_json = resolve_voice(cfg.tts, cfg.tts.voice, cfg.path)
    write_text_model(d / "text.gguf")
    write_mmproj(d / "mmproj.gguf")
    return {"asr.model": whisper / "model.bin", "tts.voice": voice, "tts.voice_zh": voice,
            "vad.smart_turn_model": bundled_model(), "llm.llamacpp.model": d / "text.gguf",
            "llm.llamacpp.mmproj": d / "mmproj.gguf", "voice_json": voice_json,
            "whisper_dir": whisper}


def _bad(kind: str, key: str, good: dict, out: Path) -> None:
    """Write the ``kind`` of broken ``good[key]`` at ``out`` (nothing for missing)."""
    src = good[key]
    if kind == "empty":
        out.write_bytes(b"")
    elif kind == "truncated":
        with open(src, "rb") as f:           # a download cut short: the file's first part
            out.write_bytes(f.read(min(os.path.getsize(src) * 2 // 3, 1 << 20)))
    elif kind == "random":
        out.write_bytes(np.random.default_rng(len(key)).bytes(64 * 1024))
    elif kind == "wrong_kind":
        # A GGUF where ONNX (or CTranslate2) is expected; a projector as the language model,
        # a language model as the projector.
        other = good["llm.llamacpp.mmproj" if key == "llm.llamacpp.model" else "llm.llamacpp.model"]
        shutil.copyfile(other, out)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """One directory per kind, each part in it broken that way; its config.yaml names them."""
    base = tmp_path_factory.mktemp("preflight")
    good = _good_files(base)
    draw_scene(base / "scene.jpg")
    configs = {}
    for kind in KINDS:
        d = base / kind
        (d / "whisper").mkdir(parents=True)
        for f in good["whisper_dir"].iterdir():   # everything but the weights is whole
            if f.name != "model.bin" and f.is_file():
                shutil.copyfile(f, d / "whisper" / f.name)
        paths = {"asr.model": d / "whisper" / "model.bin", "tts.voice": d / "en.onnx",
                 "tts.voice_zh": d / "zh.onnx", "vad.smart_turn_model": d / "smart-turn.onnx",
                 "llm.llamacpp.model": d / "model.gguf", "llm.llamacpp.mmproj": d / "mmproj.gguf"}
        for key, p in paths.items():
            _bad(kind, key, good, p)
        for voice in ("en", "zh"):                # the voices' configs are whole
            shutil.copyfile(good["voice_json"], d / f"{voice}.onnx.json")
        if kind == "missing":
            (d / "en.onnx.json").unlink()
            (d / "zh.onnx.json").unlink()
        (d / "config.yaml").write_text(f"""
asr: {{model: {d / 'whisper'}}}
tts: {{voice: {paths['tts.voice']}, voice_zh: {paths['tts.voice_zh']}}}
vad: {{end_of_turn: smart_turn, smart_turn_model: {paths['vad.smart_turn_model']}}}
llm: {{backend: llamacpp, llamacpp: {{model: {paths['llm.llamacpp.model']},
                                   mmproj: {paths['llm.llamacpp.mmproj']}}}}}
vision: {{encoder: llamacpp}}
camera: {{source: {base / 'scene.jpg'}}}
http: {{enabled: false}}
wake: {{mode: none}}
persona: {{language: en}}
""")
        configs[kind] = d
    return configs


def _env(home: Path, python_path: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _CI_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (python_path, str(REPO)) if p)
    env["HOME"] = str(home)
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    for k in ("NOTIFY_SOCKET", "INVOCATION_ID", "RKVLM_CONFIG"):
        env.pop(k, None)
    return env


def _assistant(cwd: Path, env: dict, *args: str, timeout: float = 240):
    return subprocess.run([sys.executable, "-m", "assistant", "--config", "config.yaml", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _fails(out: str, key: str) -> list[str]:
    """check's FAIL lines that name ``key`` (what follows "FAIL ")."""
    return [line.strip()[len("FAIL "):] for line in out.splitlines()
            if line.strip().startswith("FAIL ") and key + ":" in line]


def _check_and_run_agree(d: Path, keys, home: Path, python_path: str = "") -> None:
    env = _env(home, python_path)
    check = _assistant(d, env, "check")
    run = _assistant(d, env, "run")
    report = f"check:\n{check.stdout}\n{check.stderr[-2000:]}\nrun:\n{run.stderr[-4000:]}"
    assert check.returncode == 78, report
    assert "all good" not in check.stdout, report
    assert run.returncode == 78, report
    for key in keys:
        lines = _fails(check.stdout, key)
        assert lines, f"check names no problem with {key}\n{report}"
        for line in lines:                  # the daemon logged the very same line
            assert line in run.stderr, f"run did not say {line!r}\n{report}"
    # The daemon's last word (exit 78) is one of check's messages.
    last = [l for l in run.stderr.splitlines() if l.startswith("rkvlm-assistant: ")]
    assert last and last[-1][len("rkvlm-assistant: "):] in check.stdout, report
    assert "Traceback" not in check.stderr + run.stderr, report
    # Bug caught: "listening" means the daemon went on loading past a broken part.
    assert "listening (llm" not in run.stderr, report


@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_part_fails_check_and_stops_run_with_78(bad_files, kind, tmp_path):
    """Bug caught: check only resolved paths (a corrupt GGUF, ONNX or whisper passed: "all
    good"), and run exited 70 when it met them (systemd restarted it five times), Smart
    Turn's six seconds after start. Also: nothing of onnxruntime's telemetry under HOME or
    XDG_CACHE_HOME (bug caught: a Microsoft/DeveloperTools directory with a device id)."""
    _check_and_run_agree(bad_files[kind], PARTS, tmp_path / "home")
    left = [str(p) for p in (tmp_path / "home").rglob("*") if "Microsoft" in p.name]
    assert not left, left


def test_a_missing_backend_package_fails_check_and_stops_run_with_78(tmp_path, bad_files):
    """llama-cpp-python (the default install of a board has none) and pymicro-wakeword made
    unimportable by a shim on PYTHONPATH. Bug caught: `ok language model (llm.backend:
    llamacpp)` and `all good`, then run exiting 70 in a restart loop."""
    shim = tmp_path / "shim"
    for pkg in ("llama_cpp", "pymicro_wakeword"):
        (shim / pkg).mkdir(parents=True)
        (shim / pkg / "__init__.py").write_text(f'raise ImportError("No module named {pkg!r}")\n')
    base = bad_files["missing"].parent
    d = tmp_path / "cfg"
    d.mkdir()
    # The speech models are left missing too: they are not what this is about, and nothing
    # heavy loads.
    (d / "config.yaml").write_text(f"""
asr: {{model: {d / 'no-whisper'}}}
tts: {{voice: {d / 'no-voice.onnx'}}}
llm: {{backend: llamacpp, llamacpp: {{model: {base / 'text.gguf'}}}}}
vision: {{encoder: none}}
http: {{enabled: false}}
wake: {{mode: word}}
""")
    _check_and_run_agree(d, ("llm.backend", "wake.mode"), tmp_path / "home", str(shim))
    out = _assistant(d, _env(tmp_path / "home", str(shim)), "check").stdout
    assert "llama-cpp-python is not installed" in out and "pymicro-wakeword" in out, out


def test_serve_stops_with_78_on_a_broken_part(bad_files, tmp_path):
    """serve goes through the same probes (bug caught: its own shorter list, no GGUF check)."""
    d = bad_files["truncated"]
    r = _assistant(d, _env(tmp_path / "home"), "serve")
    assert r.returncode == 78, r.stderr[-3000:]
    assert "llm.llamacpp.model: llama.cpp cannot load" in r.stderr, r.stderr[-3000:]
    assert not [p for p in (tmp_path / "home").rglob("*") if "Microsoft" in p.name]


# ---------------------------------------------------------------------------- in process

def _cfg(text: str, tmp_path: Path) -> Config:
    (tmp_path / "c.yaml").write_text(text)
    return load(tmp_path / "c.yaml")


def _probe(cfg: Config, key: str, **kw) -> preflight.Outcome:
    found = [p for p in preflight.probes(cfg, **kw) if p.key == key]
    assert len(found) == 1, [p.key for p in preflight.probes(cfg, **kw)]
    return preflight.run_probe(found[0], preflight.Loaded())


@pytest.mark.parametrize("mode, service, line", [
    ("auto", True, "wake mode word (wake.mode: auto, as the service runs it under systemd)"),
    ("auto", False, "wake mode none (wake.mode: auto, when not run by systemd)"),
    ("phrase", True, "wake mode phrase (wake.mode: phrase)"),
])
def test_check_says_the_wake_mode_in_force(tmp_path, mode, service, line):
    """Bug caught: the wake mode as written (auto), not as the service resolves it."""
    cfg = _cfg(f"wake: {{mode: {mode}}}\n", tmp_path)
    found = [p for p in preflight.probes(cfg, service=service) if p.key == "wake.mode"]
    assert [p.label for p in found] == [line]
    outcome = preflight.run_probe(found[0], preflight.Loaded())
    assert outcome.error is None, outcome.message
    if mode == "auto" and service:
        assert "Okay Nabu" in outcome.detail      # the word model loaded for real


def test_the_debug_recording_directory_must_be_writable_by_the_unit(tmp_path):
    """Under the unit (ProtectSystem=strict) only its State/Cache/Logs directories and
    ReadWritePaths are writable. Bug caught: a directory elsewhere passed check, and the
    recorder then failed with a read-only file system."""
    root = tmp_path / "root"
    outside = _cfg(f"logging: {{debug_recording: {root}/home/pi/rec}}\n", tmp_path)
    o = _probe(outside, "logging.debug_recording", service=True, root=root)
    assert o.error is not None and o.permanent
    assert "/home/pi/rec is read-only for the service" in o.message, o.message
    assert "set logging.debug_recording: /var/lib/rkvlm-assistant/debug-recording" in o.message
    inside = _cfg(f"logging: {{debug_recording: {root}/var/lib/rkvlm-assistant/rec}}\n", tmp_path)
    assert _probe(inside, "logging.debug_recording", service=True, root=root).error is None
    # A drop-in's ReadWritePaths= adds its directories.
    dropin = root / "etc/systemd/system/rkvlm-assistant.service.d"
    dropin.mkdir(parents=True)
    (dropin / "rec.conf").write_text("[Service]\nReadWritePaths=-/home/pi/rec\n")
    assert _probe(outside, "logging.debug_recording", service=True, root=root).error is None
    # Not as the service: the unit does not apply.
    person = _cfg(f"logging: {{debug_recording: {tmp_path}/rec}}\n", tmp_path)
    assert _probe(person, "logging.debug_recording", service=False).error is None


def test_the_daemon_keeps_what_the_probes_loaded(tmp_path):
    """Heavy loads are not done twice at start: the parts assemble hands the voice loop are
    the ones the probes loaded. Bug caught: assemble making (and loading) its own whisper,
    voices and Smart Turn after the probes did."""
    import asyncio

    from assistant import components
    from assistant.audio.null_sink import NullSink

    class Part:
        sample_rate = 22050

        def __init__(self):
            self.loads = 0

        def load(self):
            self.loads += 1

        def close(self):
            pass

    cfg = _cfg("vad: {end_of_turn: smart_turn}\nvision: {encoder: none}\n", tmp_path)
    loaded = preflight.Loaded(asr=Part(), voice=Part())
    o = preflight.run_probe(next(p for p in preflight.probes(cfg) if p.key == "vad.end_of_turn"),
                            loaded)
    assert o.error is None, o.message
    assert loaded.smart_turn is not None and loaded.smart_turn.loaded
    parts = asyncio.run(components.assemble(cfg, None, lambda rate: NullSink(rate),
                                            models=(Part(), None, False), loading=loaded))
    assert parts.asr is loaded.asr and parts.voices.default is loaded.voice
    assert loaded.asr.loads == 0 and loaded.voice.loads == 0     # assemble loads none again
    assert parts.smart_turn is loaded.smart_turn


def test_smart_turn_without_pipecat_is_a_warning_not_a_failure(tmp_path, monkeypatch):
    """The daemon ends utterances by silence then (make_turn_ender warns): check must not
    fail, nor say plain ok. Bug caught: a missing pipecat-ai failing check (and the service's
    start) though the service runs, or an ok line hiding the fallback."""
    import assistant.audio.smart_turn as smart_turn

    monkeypatch.setattr(smart_turn, "bundled_model", lambda: None)
    cfg = _cfg("vad: {end_of_turn: smart_turn}\n", tmp_path)
    o = _probe(cfg, "vad.end_of_turn")
    assert o.error is None, o.message
    assert o.detail.startswith(preflight.WARNING) and "pipecat-ai" in o.detail
    assert "utterances end after vad.end_silence_ms of silence" in o.detail
