"""`rkvlm-assistant doctor`: is this board ready for the NPU backend, and which model fits it?

It reads the SoC (``/proc/device-tree/compatible``), the memory (``/proc/meminfo``), the NPU
driver version (``/sys/kernel/debug/rknpu/version``, else the kernel log), the RKLLM runtime
version written in ``librkllmrt.so`` and the presence and version of ``librknnrt.so``, checks
them against the configuration, and recommends a model pair for the chip and memory with
rknn-llm's published figures. Nothing is loaded or called: a wrong library cannot crash it.

Every path is taken under ``--root DIR`` (default ``/``) so it can run on a copy of another
machine's /proc and /sys. Exit code: 0 when nothing is wrong, 1 when a problem was found
(warnings alone do not count).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from assistant import root_paths
from assistant.config import Config

log = logging.getLogger(__name__)

MIN_DRIVER = (0, 9, 8)
CHIPS = ("rk3588", "rk3576")
LIB_DIRS = ("usr/lib", "usr/local/lib", "usr/lib/aarch64-linux-gnu", "lib", "lib64", "usr/lib64")


@dataclass(frozen=True)
class Pair:
    """A vision-language model rknn-llm 1.3.0 converts, with its published figures per chip.

    Figures: rknn-llm release-v1.3.0 ``benchmark.md`` (maximum frequencies; encoder FP16 on
    all NPU cores; RK3588 w8a8, RK3576 w4a16); LLM memory from the same file's text-model
    table (128 prompt tokens), or rknn-llm 1.2.0's README for Qwen2-VL-2B (with its encoder).
    """

    name: str
    family: str
    # chip -> (encoder s, input side, prefill ms, prefill tokens, decode tok/s, LLM MB or None)
    figures: dict[str, tuple[float, int, float, int, float, Optional[float]]]
    encoder_mb: Optional[float] = None   # published only for Qwen2-VL-2B


# In order of preference for a spoken assistant (better answers first, then lighter).
PAIRS: tuple[Pair, ...] = (
    Pair("Qwen3-VL-2B", "qwen3-vl", {
        "rk3588": (2.08, 448, 649, 196, 14.91, 1868.98),
        "rk3576": (1.61, 448, 1587, 196, 10.36, 1058.56)}),
    Pair("Qwen2-VL-2B", "qwen2-vl", {
        "rk3588": (3.28, 392, 632.6, 196, 16.6, 2470),
        "rk3576": (3.55, 392, 1234.9, 196, 14.57, 1750)}, encoder_mb=1436.52),
    Pair("Qwen3.5-0.8B", "qwen3.5", {
        "rk3588": (0.69, 448, 1560, 216, 27, 1039.66),
        "rk3576": (0.815, 448, 3400, 216, 15.4, 689.50)}),
)


@dataclass
class Finding:
    level: str          # "ok", "warn", "problem", "info"
    text: str


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    chip: Optional[str] = None
    mem_mb: Optional[float] = None

    def add(self, level: str, text: str) -> None:
        self.findings.append(Finding(level, text))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "problem"]


# --------------------------------------------------------------------------- readers

def _under(root: Path, path: str) -> Path:
    # Links resolved inside the tree, as the board sees them (/proc/device-tree is one);
    # root_paths.OutsideRoot for one that leaves it.
    if Path(root) == Path("/"):
        return Path(root) / path.lstrip("/")
    return root_paths.resolve(root, path)


def read_chip(root: Path) -> tuple[Optional[str], str]:
    """(rk3588 / rk3576 / None, the compatible strings) from the device tree."""
    try:
        raw = _under(root, "/proc/device-tree/compatible").read_bytes()
    except OSError:
        return None, ""
    names = [s.decode("ascii", "replace") for s in raw.split(b"\0") if s]
    for n in names:
        m = re.fullmatch(r"rockchip,(rk35\d\d)\w*", n.strip())
        if m and m.group(1) in CHIPS:
            return m.group(1), ", ".join(names)
    return None, ", ".join(names)


def read_mem_mb(root: Path) -> Optional[float]:
    try:
        for line in _under(root, "/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_DRIVER = re.compile(r"(?:RKNPU driver:\s*v?|Initialized rknpu\s+v?)(\d+)\.(\d+)\.(\d+)")


def read_driver(root: Path) -> tuple[Optional[tuple[int, int, int]], str]:
    """(driver version, where it was read); the debugfs file needs root."""
    denied = False
    for p in ("/sys/kernel/debug/rknpu/version", "/var/log/kern.log", "/var/log/dmesg",
              "/var/log/syslog"):
        path = _under(root, p)
        try:
            text = path.read_text(errors="replace")
        except PermissionError:
            denied = True
            continue
        except OSError:
            continue
        found = _DRIVER.findall(text)
        if found:
            return tuple(int(x) for x in found[-1]), p  # type: ignore[return-value]
    return None, "permission denied" if denied else ""


def find_library(root: Path, name: str, setting: Optional[str] = None) -> Optional[Path]:
    """The library file: the configured path, else the usual library folders under root."""
    if setting and ("/" in setting or setting.startswith("~")):
        p = _under(root, str(Path(setting).expanduser()))
        return p if p.is_file() else None
    for d in LIB_DIRS:
        p = _under(root, "/" + d) / name
        if p.is_file():
            return p
    return None


_RKNNRT = re.compile(rb"librknnrt version:\s*v?(\d+\.\d+\.\d+[0-9A-Za-z.]*)")


def rknnrt_version(path: Path) -> Optional[str]:
    try:
        found = _RKNNRT.search(path.read_bytes())   # a few MB, read once
    except OSError:
        return None
    return found.group(1).decode("ascii") if found else None


# --------------------------------------------------------------------------- checks

def _ver(t: tuple[int, ...]) -> str:
    return ".".join(str(x) for x in t)


def check(cfg: Config, root: Path = Path("/")) -> Report:
    from assistant.llm import rkllm_abi
    from assistant.llm.catalog import BOARD
    from assistant.llm.families import FAMILIES, UNCHECKED

    r = Report()
    wants_npu = cfg.llm.backend == "rkllm" or cfg.vision.encoder == "rknn"
    r.chip, compatible = read_chip(root)
    r.mem_mb = read_mem_mb(root)
    mem = f"{r.mem_mb / 1024:.1f} GB RAM" if r.mem_mb else "RAM unknown (no /proc/meminfo)"
    if r.chip is None:
        level = "problem" if wants_npu else "info"
        r.add(level, f"not an RK3576 / RK3588 board ({compatible or 'no device tree'}; {mem}): "
                     "the NPU backend cannot run here"
                     + ("; set llm.backend: llamacpp and vision.encoder: llamacpp" if wants_npu
                        else "; the portable backend (llama.cpp) is what runs here"))
        return r
    r.add("ok", f"SoC {r.chip.upper()} ({compatible}), {mem}")

    driver, where = read_driver(root)
    if driver is None:
        r.add("warn", "NPU driver version unknown" + (
            ": run doctor with sudo (it is in /sys/kernel/debug/rknpu/version)"
            if where == "permission denied" else
            ": no /sys/kernel/debug/rknpu/version and nothing in the kernel log; "
            "`sudo cat /sys/kernel/debug/rknpu/version` shows it"))
    elif driver < MIN_DRIVER:
        r.add("problem", f"NPU driver {_ver(driver)} (from {where}) is older than "
                         f"{_ver(MIN_DRIVER)}: RKLLM fails to load models or to run ('failed to "
                         "malloc npu memory'). Upgrade the board's kernel image, or rebuild it "
                         "with rknn-llm's rknpu_driver_0.9.8 tarball")
    else:
        r.add("ok", f"NPU driver {_ver(driver)} (from {where})")

    rk = cfg.llm.rkllm
    runtime = None
    lib = find_library(root, "librkllmrt.so", rk.library)
    if lib is None:
        r.add("problem" if cfg.llm.backend == "rkllm" else "warn",
              f"librkllmrt.so not found ({rk.library}): install it from an rknn-llm release "
              f"({', '.join(rkllm_abi.SUPPORTED_VERSIONS)}) into /usr/lib")
    else:
        runtime = rkllm_abi.library_version(lib)
        if runtime is None:
            r.add("warn", f"{lib} has no version text: set llm.rkllm.runtime_version to the "
                          "release you installed")
        elif runtime not in rkllm_abi.SUPPORTED_VERSIONS:
            r.add("problem", f"{lib} is RKLLM runtime {runtime}; supported: "
                             f"{', '.join(rkllm_abi.SUPPORTED_VERSIONS)}")
        else:
            r.add("ok", f"RKLLM runtime {runtime} ({lib})")
        setting = rk.runtime_version
        if runtime and setting != "auto" and runtime in rkllm_abi.SUPPORTED_VERSIONS \
                and rkllm_abi.abi_for(runtime).name != rkllm_abi.abi_for(setting).name:
            r.add("problem", f"llm.rkllm.runtime_version is {setting} but {lib} is runtime "
                             f"{runtime}: set it to {runtime} (or auto)")

    rknn = find_library(root, "librknnrt.so")
    if rknn is None:
        r.add("problem" if cfg.vision.encoder == "rknn" else "warn",
              "librknnrt.so not found: the NPU vision encoder needs it (rknn-toolkit2's "
              "rknpu2/runtime/Linux/librknn_api/aarch64/)")
    else:
        v = rknnrt_version(rknn)
        r.add("ok", f"RKNN runtime {v or '(version not written in the file)'} ({rknn})")
    if cfg.vision.encoder == "rknn" and importlib.util.find_spec("rknnlite") is None:
        r.add("warn", "rknn-toolkit-lite2 (the rknnlite Python API) is not installed in this "
                      "Python: pip install -e '.[board]'")

    _check_models(cfg, r, runtime, BOARD, FAMILIES, UNCHECKED)
    _recommend(r, BOARD)
    return r


def _entry_of(path: Optional[Path], board: dict) -> Optional[tuple]:
    if path is None:
        return None
    for e in board.values():
        if path.name == e.llm.name:
            return e, "llm"
        if path.name == e.encoder.name:
            return e, "encoder"
    return None


def _check_models(cfg: Config, r: Report, runtime: Optional[str], board: dict,
                  families: dict, unchecked: dict) -> None:
    rk = cfg.llm.rkllm
    fam_llm = rk.family
    fam_enc = cfg.vision.family or fam_llm
    if cfg.llm.backend == "rkllm" and cfg.vision.encoder == "rknn" and fam_enc != fam_llm:
        a, b = families.get(fam_enc), families.get(fam_llm)
        widths = (f" (encoder widths {a.sizes}; LLM widths {b.sizes})" if a and b else "")
        r.add("problem", f"vision.family is {fam_enc} but llm.rkllm.family is {fam_llm}: the "
                         f"encoder's embedding width would not be the LLM's{widths}. Use an "
                         "encoder converted from the same model and one family")
    llm_path = cfg.path(rk.model) if rk.model else None
    enc_path = cfg.path(cfg.vision.rknn.model) if cfg.vision.rknn.model else None
    llm_e, enc_e = _entry_of(llm_path, board), _entry_of(enc_path, board)
    if llm_e and enc_e and llm_e[0].name != enc_e[0].name:
        r.add("problem", f"llm.rkllm.model is from {llm_e[0].name} but vision.rknn.model is from "
                         f"{enc_e[0].name}: the encoder's width is not the LLM's. "
                         f"`rkvlm-assistant models use NAME` sets a matching pair")
    for found in (llm_e, enc_e):
        if not found:
            continue
        e = found[0]
        if e.family != fam_llm and found[1] == "llm":
            r.add("problem", f"{llm_path.name} is a {e.family} model but llm.rkllm.family is "
                             f"{fam_llm}: set it to {e.family}")
        if r.chip and e.chip != r.chip:
            r.add("problem", f"{e.name} was converted for {e.chip.upper()}, this is "
                             f"{r.chip.upper()}: pull the {r.chip} pair")
        if runtime and e.runtime and e.runtime != runtime:
            r.add("problem", f"{e.name} was converted by rkllm-toolkit {e.runtime} but the "
                             f"runtime is {runtime}: the runtime and the model must come from "
                             f"the same rknn-llm release")
    if cfg.llm.backend == "rkllm" and fam_llm in unchecked:
        r.add("info", f"family {fam_llm}: {', '.join(unchecked[fam_llm])} not published by "
                      "rknn-llm, so not checked at start")


def _recommend(r: Report, board: dict) -> None:
    if r.chip is None:
        return
    # Policy, not a measurement: the LLM may take a quarter of the RAM; the rest is for the
    # encoder (its memory is published only for Qwen2-VL-2B), whisper, piper and the system.
    budget = (r.mem_mb or 0) / 4
    quant = "w8a8" if r.chip == "rk3588" else "w4a16"
    for p in PAIRS:
        enc_s, side, pre_ms, pre_tok, tps, llm_mb = p.figures[r.chip]
        if llm_mb is not None and r.mem_mb and llm_mb > budget:
            continue
        memo = f"LLM {llm_mb / 1024:.2f} GB" if llm_mb else "LLM memory not published"
        memo += (f" + encoder {p.encoder_mb / 1024:.2f} GB" if p.encoder_mb
                 else ", encoder memory not published")
        r.add("info", f"recommended for {r.chip.upper()} with {(r.mem_mb or 0) / 1024:.1f} GB: "
                      f"{p.name} (llm.rkllm.family: {p.family}, {quant}): image encoder "
                      f"{enc_s:g} s at {side}x{side}, prefill {pre_ms:g} ms for {pre_tok} image "
                      f"tokens, {tps:g} tokens/s; {memo} (rknn-llm 1.3.0 benchmark)")
        break
    else:
        r.add("warn", f"no published model pair fits {(r.mem_mb or 0) / 1024:.1f} GB on "
                      f"{r.chip.upper()} with room for speech; use the portable backend")
    ready = [e for e in board.values() if e.chip == r.chip]
    if ready:
        r.add("info", "pre-converted pairs for this chip: " + "; ".join(
            f"{e.name} (rkvlm-assistant models pull {e.name} --configure)" for e in ready))
    else:
        r.add("info", f"no pre-converted pair for {r.chip.upper()} in the catalogue: convert "
                      "one (README, 'Converting models')")


# --------------------------------------------------------------------------- output

_MARK = {"ok": "ok     ", "warn": "warning", "problem": "PROBLEM", "info": "info   "}


def run_doctor(cfg: Config, root: Path = Path("/")) -> int:
    """Print the report; 0 when no problem was found, 1 otherwise."""
    try:
        report = check(cfg, root)
    except Exception as e:  # a report must never end in a traceback
        log.debug("doctor failed", exc_info=True)
        print(f"rkvlm-assistant doctor: could not finish the checks: {e}")
        return 1
    for f in report.findings:
        print(f"{_MARK[f.level]}  {f.text}")
    n = len(report.problems)
    print(f"{n} problem{'s' if n != 1 else ''} found" if n else "no problems found")
    return 1 if n else 0
