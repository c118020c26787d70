"""`rkvlm-assistant doctor` on fake /proc, /sys and library trees (--root)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from assistant.cli import main
from assistant.config import Config, parse
from assistant.doctor import check, read_chip, read_driver, read_mem_mb
from assistant.llm import catalog
from assistant.llm.catalog import BoardEntry, ModelFile
from rkllm_fake import build_fake_rkllm

BOARD_CONFIG = """\
llm:
  backend: rkllm
  rkllm:
    family: qwen3-vl
vision:
  encoder: rknn
"""


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory):
    out = tmp_path_factory.mktemp("rkllm")
    return {v: build_fake_rkllm(v, out) for v in ("1.2.3", "1.3.0")}


def make_tree(root: Path, chip: str | None, mem_gb: float, driver: str | None = "0.9.8",
              runtime: Path | None = None, rknnrt: str | None = "2.3.2") -> Path:
    """A machine under root: device tree, meminfo, the driver's debugfs file, libraries."""
    (root / "proc" / "device-tree").mkdir(parents=True)
    compat = (f"radxa,rock-5b\0rockchip,{chip}\0" if chip else "qemu,virt\0linux,dummy\0")
    (root / "proc" / "device-tree" / "compatible").write_bytes(compat.encode())
    (root / "proc" / "meminfo").write_text(
        f"MemTotal:       {int(mem_gb * 1024 * 1024)} kB\nMemFree:         1000 kB\n")
    if driver:
        d = root / "sys" / "kernel" / "debug" / "rknpu"
        d.mkdir(parents=True)
        (d / "version").write_text(f"RKNPU driver: v{driver}\n")
    lib = root / "usr" / "lib"
    lib.mkdir(parents=True)
    if runtime is not None:
        shutil.copy(runtime, lib / "librkllmrt.so")
    if rknnrt:
        (lib / "librknnrt.so").write_bytes(b"\x7fELF...librknnrt version: " + rknnrt.encode()
                                           + b" (a1b2c3 build@2025)\0")
    return root


def run(root: Path, cfg_text: str, capsys) -> tuple[int, str]:
    conf = root.parent / f"{root.name}-config.yaml"
    conf.write_text(cfg_text)
    code = main(["--config", str(conf), "doctor", "--root", str(root)])
    return code, capsys.readouterr().out


def test_rk3576_with_4_gb_gets_a_light_pair(tmp_path, runtimes, capsys):
    root = make_tree(tmp_path / "board", "rk3576", 3.8, runtime=runtimes["1.3.0"])
    code, out = run(root, BOARD_CONFIG, capsys)
    assert code == 0, out
    assert "SoC RK3576" in out and "3.8 GB RAM" in out
    assert "NPU driver 0.9.8" in out and "RKLLM runtime 1.3.0" in out and "RKNN runtime 2.3.2" in out
    rec = next(line for line in out.splitlines() if "recommended" in line)
    assert "Qwen3.5-0.8B" in rec and "w4a16" in rec
    assert "0.815 s" in rec and "3400 ms" in rec and "15.4 tokens/s" in rec and "0.67 GB" in rec
    assert "no pre-converted pair for RK3576" in out
    assert "no problems found" in out


def test_rk3588_with_16_gb_gets_qwen3_vl_and_the_catalogue_pair(tmp_path, runtimes, capsys):
    root = make_tree(tmp_path / "board", "rk3588s", 15.6, runtime=runtimes["1.3.0"])
    code, out = run(root, BOARD_CONFIG, capsys)
    assert code == 0, out
    rec = next(line for line in out.splitlines() if "recommended" in line)
    assert "Qwen3-VL-2B" in rec and "w8a8" in rec and "2.08 s" in rec and "14.91 tokens/s" in rec
    assert "models pull internvl3.5-2b-rk3588 --configure" in out


def test_an_old_npu_driver_is_a_problem(tmp_path, runtimes, capsys):
    root = make_tree(tmp_path / "board", "rk3588", 8, driver="0.9.6", runtime=runtimes["1.3.0"])
    code, out = run(root, BOARD_CONFIG, capsys)
    assert code == 1
    assert "PROBLEM  NPU driver 0.9.6" in out and "older than 0.9.8" in out
    assert "1 problem found" in out


def test_the_driver_version_from_the_kernel_log(tmp_path):
    root = make_tree(tmp_path / "board", "rk3588", 8, driver=None)
    (root / "var" / "log").mkdir(parents=True)
    (root / "var" / "log" / "kern.log").write_text(
        "kernel: [drm] Initialized rknpu 0.9.8 20240828 for fdab0000.npu on minor 1\n")
    assert read_driver(root) == ((0, 9, 8), "/var/log/kern.log")


def test_a_runtime_of_another_release_than_the_model(tmp_path, runtimes, capsys, monkeypatch):
    pair = BoardEntry("pair-130", "A 1.3.0 pair", "org/pair", None, "rk3588", "qwen3-vl",
                      ModelFile("pair_w8a8_rk3588.rkllm"), ModelFile("pair_vision_rk3588.rknn"),
                      runtime="1.3.0")
    monkeypatch.setitem(catalog.BOARD, pair.name, pair)
    root = make_tree(tmp_path / "board", "rk3588", 8, runtime=runtimes["1.2.3"])
    cfg = BOARD_CONFIG.replace("    family: qwen3-vl\n",
                               "    family: qwen3-vl\n    model: /m/pair_w8a8_rk3588.rkllm\n")
    code, out = run(root, cfg, capsys)
    assert code == 1
    assert "RKLLM runtime 1.2.3" in out
    assert "converted by rkllm-toolkit 1.3.0 but the runtime is 1.2.3" in out


def test_a_runtime_version_setting_that_disagrees_with_the_library(tmp_path, runtimes, capsys):
    root = make_tree(tmp_path / "board", "rk3576", 8, runtime=runtimes["1.2.3"])
    cfg = BOARD_CONFIG.replace("    family: qwen3-vl\n",
                               '    family: qwen3-vl\n    runtime_version: "1.3.0"\n')
    code, out = run(root, cfg, capsys)
    assert code == 1 and "runtime_version is 1.3.0 but" in out


def test_an_encoder_of_another_family_is_a_problem(tmp_path, runtimes, capsys):
    root = make_tree(tmp_path / "board", "rk3588", 8, runtime=runtimes["1.3.0"])
    code, out = run(root, BOARD_CONFIG + "  family: qwen2.5-vl\n", capsys)
    assert code == 1
    assert "vision.family is qwen2.5-vl but llm.rkllm.family is qwen3-vl" in out
    assert "2048 for Qwen2.5-VL-3B" in out


def test_missing_runtimes_on_a_board(tmp_path, capsys):
    root = make_tree(tmp_path / "board", "rk3576", 8, runtime=None, rknnrt=None)
    code, out = run(root, BOARD_CONFIG, capsys)
    assert code == 1
    assert "librkllmrt.so not found" in out and "librknnrt.so not found" in out


def test_a_non_rockchip_machine(tmp_path, capsys):
    root = make_tree(tmp_path / "pc", None, 16, driver=None, rknnrt=None)
    code, out = run(root, "llm:\n  backend: llamacpp\n", capsys)
    assert code == 0
    assert "not an RK3576 / RK3588 board (qemu,virt" in out and "portable backend" in out
    code, out = run(root, BOARD_CONFIG, capsys)
    assert code == 1 and "set llm.backend: llamacpp" in out


def test_an_empty_root_never_gives_a_traceback(tmp_path, capsys):
    code, out = run(tmp_path / "nothing", BOARD_CONFIG, capsys)
    assert code == 1 and "no device tree" in out and "Traceback" not in out


def test_readers():
    cfg = parse(BOARD_CONFIG)
    assert isinstance(cfg, Config)


def test_reader_details(tmp_path):
    root = make_tree(tmp_path / "b", "rk3588", 2)
    assert read_chip(root)[0] == "rk3588"
    assert read_mem_mb(root) == pytest.approx(2048)
    assert check(parse(BOARD_CONFIG), root).chip == "rk3588"
