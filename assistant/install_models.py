"""What the installed config needs besides the code: its speech models, and the Python extras
of its backends.

``speech_names``: the whisper size and the piper voice(s) the config names (paths are the
admin's own files, not pulled). ``install`` runs ``rkvlm-assistant models pull NAME`` for each
(the same command a person runs: root with an installed service takes the service's
directories, and what it writes is handed to the service user); one that cannot be
downloaded now (no network) is reported with the command to run later, and the install goes
on.

``python -m assistant.install_models`` (Makefile) prints the extras the installed config's
``llm.backend`` / ``vision.encoder`` need (``portable`` for llama.cpp), so ``sudo make install``
installs what the service will load.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from assistant.audio.model_paths import looks_like_path

PULL_TIMEOUT_S = 3600   # a whisper model and two voices on a slow link


def speech_names(cfg) -> list[str]:
    """The names ``models pull`` installs for this config, whisper first."""
    names = []
    if cfg.asr.model.strip() and not looks_like_path(cfg.asr.model):
        names.append(cfg.asr.model.strip())
    for voice in (cfg.tts.voice, cfg.tts.voice_zh):
        v = (voice or "").strip()
        if v and not v.endswith(".onnx") and not looks_like_path(v) and v not in names:
            names.append(v)
    return names


def extras_for(cfg) -> list[str]:
    """The pyproject extras the configured backends import."""
    if cfg.llm.backend == "llamacpp" or cfg.vision.encoder == "llamacpp":
        return ["portable"]
    return []


def later_command(name: str, root: Path) -> str:
    return shlex.join(["sudo", "rkvlm-assistant", "models", "pull", name]
                      + ([] if root == Path("/") else ["--root", str(root)]))


def pull_speech(names: list[str], root: Path, out: Callable[[str], None],
                argv0: Optional[list[str]] = None) -> list[str]:
    """``models pull NAME [--root R]`` for each name, through this installation's Python;
    returns the names that could not be installed now (each reported with its command)."""
    base = argv0 or [sys.executable, "-m", "assistant"]
    failed = []
    for name in names:
        argv = base + ["models", "pull", name] + ([] if root == Path("/") else ["--root", str(root)])
        out("  + rkvlm-assistant " + shlex.join(argv[len(base):]))
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=PULL_TIMEOUT_S,
                               stdin=subprocess.DEVNULL)
            ok, why = r.returncode == 0, (r.stderr.strip() or r.stdout.strip())
        except subprocess.TimeoutExpired:
            ok, why = False, f"no answer in {PULL_TIMEOUT_S} s"
        if ok:
            last = r.stdout.strip().splitlines()
            out(f"  = {last[0] if last else name + ' is installed'}")
            continue
        failed.append(name)
        first = why.splitlines()[-1] if why else "failed"
        out(f"  ! {name} could not be installed now ({first[:300]}). Run `{later_command(name, root)}` "
            f"once this machine reaches the hub (or HF_ENDPOINT names a mirror); the service "
            f"starts when it is there")
    return failed


def main() -> int:
    """Print the extras (comma-separated) the config install will use needs: the installed
    /etc/rkvlm-assistant/config.yaml when there is one, else the checkout's config.yaml."""
    from assistant import paths
    from assistant.config import ConfigError, load

    config = paths.system_config()
    if not config.is_file():
        config = Path(__file__).resolve().parents[1] / "config.yaml"
    try:
        cfg = load(config)
    except ConfigError as e:
        print(f"note: {e}; the extras of its backend are not added", file=sys.stderr)
        return 0
    print(",".join(extras_for(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
