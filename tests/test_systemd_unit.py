"""The unit file, checked by systemd's own tools where they exist."""

import configparser
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
