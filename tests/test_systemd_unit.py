"""The unit file, checked by systemd's own tools where they exist."""

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "rkvlm-assistant.service"
MAX_EXPOSURE = 2.5

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed")


def _unit():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(UNIT)
    return cp


def _all_values(section: str, key: str) -> list[str]:
    """Every value of a key that may repeat (configparser keeps only the last)."""
    values, current = [], None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(key + "="):
            values.append(line.split("=", 1)[1])
    return values


def test_unit_essentials():
    u = _unit()
    svc = u["Service"]
    assert svc["Type"] == "notify"          # READY=1 comes after the models load
    assert "rkvlm-assistant run" in svc["ExecStart"]
    assert svc["RestartPreventExitStatus"] == "78"
    assert "kill -HUP $MAINPID" in svc["ExecReload"]   # systemctl reload: SIGHUP
    assert svc["Restart"] == "on-failure"
    assert int(svc["WatchdogSec"]) > 0
    assert "audio" in svc["SupplementaryGroups"] and "video" in svc["SupplementaryGroups"]
    assert "render" in svc["SupplementaryGroups"]
    assert svc["StateDirectory"] == "rkvlm-assistant"
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_crash_loop_backs_off():
    unit = _unit()["Unit"]
    # The start limit belongs in [Unit]; in [Service] systemd ignores it with a warning.
    assert int(unit["StartLimitIntervalSec"]) >= 60
    assert 1 < int(unit["StartLimitBurst"]) <= 10
    assert "StartLimitIntervalSec" not in _unit()["Service"]


def test_hardening_keys():
    svc = _unit()["Service"]
    assert svc["DevicePolicy"] == "closed"
    allowed = _all_values("Service", "DeviceAllow")
    for device in ("char-alsa rw", "char-video4linux rw", "char-drm rw", "/dev/rknpu rw"):
        assert device in allowed, allowed
    assert _all_values("Service", "SystemCallFilter")[0] == "@system-service"
    assert svc["SystemCallErrorNumber"] == "EPERM"
    assert svc["ProtectProc"] == "invisible"
    assert svc["NoNewPrivileges"] == "yes" and svc["CapabilityBoundingSet"] == ""
    # The HTTP API listens on localhost; the LAN needs a drop-in (README).
    assert set(svc["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_NETLINK", "AF_INET",
                                                           "AF_INET6"}
    assert svc["IPAddressAllow"] == "localhost" and svc["IPAddressDeny"] == "any"
    # Left off on purpose (see the comments in the unit): group access to devices, /proc
    # reads of the NPU runtime, ctypes closures.
    for key in ("PrivateUsers", "ProcSubset", "MemoryDenyWriteExecute"):
        assert key not in svc


@needs_analyze
def test_systemd_analyze_verify(tmp_path):
    # The ExecStart binary does not exist here; verify everything else about the unit.
    unit = tmp_path / UNIT.name
    text = UNIT.read_text()
    assert "/opt/rkvlm-assistant/.venv/bin/rkvlm-assistant" in text
    unit.write_text(text.replace("/opt/rkvlm-assistant/.venv/bin/rkvlm-assistant", "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    # Only lines about this unit count (the host's own units may have warnings of their own);
    # an unknown key or a bad value shows as "<unit>:<line>: ...".
    problems = [l for l in (r.stdout + r.stderr).splitlines() if UNIT.name in l]
    assert not problems, r.stdout + r.stderr
    assert r.returncode == 0, r.stdout + r.stderr


@needs_analyze
def test_security_exposure_is_low():
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    if "Unknown command verb" in r.stderr or "unrecognized option" in r.stderr:
        pytest.skip("this systemd-analyze has no offline security check")
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, m.group(0)
    # No unknown or misspelt hardening key slipped through as an ignored line.
    assert "Unknown key" not in r.stderr and "Unknown lvalue" not in r.stderr, r.stderr


def test_the_units_paths_are_the_tables_each_once():
    from assistant import paths
    from assistant.install import render_unit

    env = dict(v.split("=", 1) for v in _all_values("Service", "Environment"))
    assert {k: env[k] for k in paths.SERVICE_ENV} == paths.SERVICE_ENV
    # What install writes is the shipped unit (no drift between the file and the table).
    text = UNIT.read_text()
    rendered = render_unit(text, "/opt/rkvlm-assistant/.venv/bin/rkvlm-assistant",
                           Path("/opt/rkvlm-assistant"))
    assert rendered == text
    # The assistant's directories under that environment: the unit's own StateDirectory and
    # CacheDirectory, each once.
    # Each compared with the path written out (bugs caught: a doubled component such as
    # /var/lib/rkvlm-assistant/rkvlm-assistant, the hub cache outside the unit's
    # CacheDirectory, a directory install does not create).
    svc = _unit()["Service"]
    assert (svc["StateDirectory"], svc["CacheDirectory"], svc["LogsDirectory"]) == (
        "rkvlm-assistant",) * 3
    state, cache = "/var/lib/rkvlm-assistant", "/var/cache/rkvlm-assistant"
    saved = {k: os.environ.get(k) for k in (*paths.SERVICE_ENV, "HF_HUB_CACHE")}
    try:
        paths.enter(paths.Layout(service=True))
        assert paths.data_dir() == paths.state_dir() == Path(state) == Path(env["HOME"])
        assert paths.models_dir() == Path(state, "models")
        assert paths.transcript_file() == Path(state, "transcript.jsonl")
        assert paths.cache_dir() == Path(cache)
        assert paths.hub_cache() == Path(cache, "huggingface", "hub")
    finally:
        paths.leave(saved)
    assert paths.service_dirs() == [state, f"{state}/models", f"{state}/voices", cache,
                                    f"{cache}/huggingface", "/var/log/rkvlm-assistant"]


def _bytes(value: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(value[:-1]) * units[value[-1]]) if value[-1] in units else int(value)


def test_limits_fit_the_models_and_bound_the_service():
    from assistant.doctor import PAIRS

    svc = _unit()["Service"]
    # MemoryMax holds the heaviest pair doctor knows (LLM + vision encoder, published MB; an
    # encoder without a figure counted as the largest published one) with whisper small,
    # two piper voices and the runtime (the unit's comment gives the sum), on a board of
    # 8 GB, the README's minimum for such models, with room left for the system.
    enc_max = max(p.encoder_mb for p in PAIRS if p.encoder_mb)
    heaviest = max((f[5] or 0) + (p.encoder_mb or enc_max)
                   for p in PAIRS for f in p.figures.values())
    needed_mb = heaviest + 500 + 300 + 500
    limit = _bytes(svc["MemoryMax"])
    assert needed_mb * (1 << 20) <= limit <= 7 * (1 << 30), (needed_mb, svc["MemoryMax"])
    assert 64 <= int(svc["TasksMax"]) <= 1024
    assert 1024 <= int(svc["LimitNOFILE"]) <= 65536
