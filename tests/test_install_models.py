"""`install` installs what the config needs besides the code (issue 21): the speech models
through `models pull` (a failure offline is named with the command to run later, and the
install goes on), and `sudo make install` the Python extras of the configured backend."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from assistant import install_models
from assistant.config import parse
from assistant.install import Installer
from test_install import EXEC, make_root

SPEECH = "asr:\n  model: small\ntts:\n  voice: zh_CN-huayan-medium\n  voice_zh: ./my-voice.onnx\n"


@pytest.fixture
def checkout(tmp_path) -> Path:
    from test_install import REPO, UNIT_NAME

    co = tmp_path / "checkout"
    (co / "systemd").mkdir(parents=True)
    (co / "systemd" / UNIT_NAME).write_text((REPO / "systemd" / UNIT_NAME).read_text())
    (co / "config.yaml").write_text(SPEECH)
    return co


def test_the_names_are_the_configs_speech_models_not_its_paths():
    """Bug caught: a voice path handed to `models pull`, or the Chinese voice forgotten."""
    cfg = parse(SPEECH)
    assert install_models.speech_names(cfg) == ["small", "zh_CN-huayan-medium"]
    cfg = parse("asr: {model: /opt/whisper}\ntts: {voice: en_US-joe-medium, voice_zh: zh_CN-huayan-medium}\n")
    assert install_models.speech_names(cfg) == ["en_US-joe-medium", "zh_CN-huayan-medium"]


def test_the_backend_decides_the_extras():
    """`sudo make install` with the shipped llm.backend: llamacpp must install llama.cpp
    (EXTRAS=board alone left the service unable to start)."""
    assert install_models.extras_for(parse("llm: {backend: llamacpp}\nvision: {encoder: none}\n")) == ["portable"]
    assert install_models.extras_for(parse("llm: {backend: rkllm}\nvision: {encoder: rknn}\n")) == []
    assert install_models.extras_for(parse("llm: {backend: rkllm}\nvision: {encoder: llamacpp}\n")) == ["portable"]


def test_offline_the_install_names_the_command_for_later_and_goes_on(tmp_path, checkout,
                                                                      monkeypatch):
    """No hub: each model's line names `sudo rkvlm-assistant models pull NAME --root R`, and
    the install finishes (exit 0). Bug caught: a failed download failing the install, or a
    message without the command."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    root = make_root(tmp_path)
    lines: list[str] = []
    inst = Installer(root=root, exec_start=EXEC, checkout=checkout, out=lines.append,
                     pull=install_models.pull_speech)
    assert inst.install() == 0
    for name in ("small", "zh_CN-huayan-medium"):
        assert f"  + rkvlm-assistant models pull {name} --root {root}" in lines, lines
        failed = [l for l in lines if l.startswith(f"  ! {name} could not be installed now (")]
        assert len(failed) == 1, lines
        assert f"Run `sudo rkvlm-assistant models pull {name} --root {root}` once" in failed[0]
    assert not any("my-voice" in l for l in lines)
    # Nothing half-downloaded where the service looks.
    assert not list((root / "var/lib/rkvlm-assistant/voices").iterdir())


def test_a_dry_run_only_names_the_pulls(tmp_path, checkout):
    root = make_root(tmp_path)
    lines: list[str] = []
    called = []
    inst = Installer(root=root, dry_run=True, exec_start=EXEC, checkout=checkout,
                     out=lines.append, pull=lambda *a: called.append(a) or [])
    inst.install()
    assert f"  + rkvlm-assistant models pull small --root {root}" in lines
    assert called == []
