"""A missing speech model's message names the command that fits where it runs (issue 21):
the service, or root on a machine with an installed service: `sudo rkvlm-assistant models
pull NAME` (with --root under a tree); a person: `rkvlm-assistant models pull NAME`; a
person offline (HF_HUB_OFFLINE): the place to put the file by hand first. Never the
package-manager or piper commands that do not fit a service."""

from __future__ import annotations

from pathlib import Path

import pytest

from assistant import paths
from assistant.audio import model_paths
from assistant.audio.model_paths import resolve_voice, resolve_whisper
from assistant.config import AsrConfig, TtsConfig
from assistant.errors import ModelMissingError

VOICE = "zh_CN-huayan-medium"


@pytest.fixture(autouse=True)
def a_person(tmp_path, monkeypatch):
    """A person's PC: no installed service, not the service's user or HOME, online."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(paths, "SYSTEM_CONFIG", str(tmp_path / "etc/rkvlm-assistant/config.yaml"))
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(paths, "_entered_root", None)

    def unreachable(name, cache_dir):
        raise OSError("Name or service not known")
    monkeypatch.setattr(model_paths, "_download_whisper", unreachable)


def messages() -> tuple[str, str]:
    with pytest.raises(ModelMissingError) as w:
        resolve_whisper(AsrConfig(model="small"))
    with pytest.raises(ModelMissingError) as v:
        resolve_voice(TtsConfig(voice=VOICE), VOICE)
    return str(w.value), str(v.value)


def _no_foreign_fix(msg: str) -> None:
    # The fixes issue 21 found offered to a service.
    for wrong in ("pip install", "HF_HUB_OFFLINE=0", "piper.download_voices"):
        assert wrong not in msg, msg


def test_a_person_online_is_given_their_own_command():
    """Bug caught: the person told to use sudo (or no command at all)."""
    whisper, voice = messages()
    assert "install it with `rkvlm-assistant models pull small`" in whisper
    assert f"install it with `rkvlm-assistant models pull {VOICE}`" in voice
    assert "sudo" not in whisper + voice
    _no_foreign_fix(whisper + voice)


def test_a_person_offline_is_told_where_to_put_the_file_first(tmp_path, monkeypatch):
    """Bug caught: an offline machine only told to run a download that cannot work."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    whisper, voice = messages()
    vdir = tmp_path / "data/rkvlm-assistant/voices"
    assert (f"does not download (HF_HUB_OFFLINE is set): put {VOICE}.onnx and {VOICE}.onnx.json "
            f"into {vdir} by hand") in voice
    folder = tmp_path / "data/rkvlm-assistant/models/whisper-small"
    assert f"does not download (HF_HUB_OFFLINE is set): copy a CTranslate2" in whisper
    assert f"to {folder} and set asr.model: {folder}" in whisper
    assert "run `rkvlm-assistant models pull small` where the hub is reachable" in whisper
    _no_foreign_fix(whisper + voice)


def test_root_with_an_installed_service_is_given_the_sudo_command(tmp_path, monkeypatch):
    """Bug caught: `sudo rkvlm-assistant check` on a board naming a person's command, which
    would download into root's home where the service never looks."""
    config = Path(paths.SYSTEM_CONFIG)
    config.parent.mkdir(parents=True)
    config.write_text("{}\n")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")          # the unit's: the command still comes first
    whisper, voice = messages()
    assert "install it with `sudo rkvlm-assistant models pull small`" in whisper
    assert f"install it with `sudo rkvlm-assistant models pull {VOICE}`" in voice
    assert "--root" not in whisper + voice
    _no_foreign_fix(whisper + voice)
    config.unlink()                                     # root on a PC: a person's command
    again = messages()[0]
    assert "`rkvlm-assistant models pull small`" in again and "sudo" not in again


def test_the_service_itself_is_given_the_sudo_command(monkeypatch):
    """The daemon, started by systemd with the unit's HOME: its log line must say what the
    admin runs. Bug caught: the service's message naming a command that writes elsewhere."""
    monkeypatch.setenv("HOME", paths.SERVICE_ENV["HOME"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    whisper, voice = messages()
    assert "`sudo rkvlm-assistant models pull small`" in whisper
    assert f"`sudo rkvlm-assistant models pull {VOICE}`" in voice


def test_root_under_a_tree_is_given_the_command_with_its_root(tmp_path, monkeypatch):
    """`sudo rkvlm-assistant check --root /mnt/board`: the fix must go into the same tree."""
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    monkeypatch.setattr(paths, "_entered_root", tmp_path / "board")
    whisper, voice = messages()
    assert f"`sudo rkvlm-assistant models pull small --root {tmp_path / 'board'}`" in whisper
    assert f"`sudo rkvlm-assistant models pull {VOICE} --root {tmp_path / 'board'}`" in voice
