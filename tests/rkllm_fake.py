"""Build and drive the fake librkllmrt.so (tests/fake_rkllm/fake_rkllm.c).

For any test that needs the RKLLM backend without a board:

    lib = build_fake_rkllm("1.3.0", tmp_path_factory.mktemp("rkllm"))
    fake = FakeRkllm(lib)          # the same library instance the binding opens
    fake.reset()
    model = write_fake_model(tmp_path / "m.rkllm", embed_dim=1536)
    ... RkllmBackend(LlmConfig(backend="rkllm", rkllm=RkllmConfig(library=str(lib),
                     model=str(model))), ...) ...
    fake.last("rkllm_init")["base_domain_id"]

The library records every call and argument; see the C file's header for its behaviour.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

SOURCE = Path(__file__).resolve().parent / "fake_rkllm" / "fake_rkllm.c"

ABI_OF = {"1.2.1": "1.2", "1.2.2": "1.2", "1.2.3": "1.2", "1.3.0": "1.3"}


def build_fake_rkllm(version: str, outdir: Path, *, abi: Optional[str] = None,
                     banner: bool = True, old: bool = False) -> Path:
    """Compile the fake as ``outdir/<variant>/librkllmrt.so`` and return its path.

    ``version`` is the version text embedded in the library (the banner the real runtime
    carries); ``abi`` the struct layout to compile ("1.2" or "1.3"; default: the version's,
    else 1.2); ``banner=False`` leaves the version text out; ``old=True`` leaves out the
    functions runtimes before 1.2.1 lack.
    """
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc is needed to build the fake librkllmrt.so")
    abi = abi or ABI_OF.get(version, "1.2")
    variant = f"v{version}-abi{abi}" + ("" if banner else "-nobanner") + ("-old" if old else "")
    out = Path(outdir) / variant / "librkllmrt.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-shared", "-fPIC", "-O1", "-pthread", "-Wall", "-Werror",
           f'-DFAKE_RKLLM_VERSION="{version}"']
    if abi == "1.3":
        cmd.append("-DRKLLM_ABI_130")
    if not banner:
        cmd.append("-DFAKE_RKLLM_NO_BANNER")
    if old:
        cmd.append("-DFAKE_RKLLM_OLD")
    cmd += [str(SOURCE), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def write_fake_model(path: Path, embed_dim: int = 1536) -> Path:
    """A fake .rkllm file; the fake runtime reads the LLM's embedding width from it."""
    path = Path(path)
    path.write_text(f"FAKE-RKLLM-MODEL\nembed_dim={embed_dim}\n", encoding="utf-8")
    return path


def fake_env(*, log: Optional[Path] = None, hold_after: Optional[int] = None,
             hang_after: Optional[int] = None, error_at: Optional[int] = None,
             hook_run: Optional[int] = None) -> dict[str, str]:
    """Environment variables that set the fake's hooks in another process (read at
    rkllm_init); ``log`` is the file every recorded call is appended to, one JSON a line."""
    env = {"FAKE_RKLLM_LOG": log, "FAKE_RKLLM_HOLD_AFTER": hold_after,
           "FAKE_RKLLM_HANG_AFTER": hang_after, "FAKE_RKLLM_ERROR_AT": error_at,
           "FAKE_RKLLM_HOOK_RUN": hook_run}
    return {k: str(v) for k, v in env.items() if v is not None}


def read_fake_log(path: Path) -> list[dict]:
    """The calls a fake in another process appended to its FAKE_RKLLM_LOG file."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


class FakeRkllm:
    """Test hooks of a fake librkllmrt.so: its call log, switches and struct layout."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # dlopen of the same path returns the library the binding uses: one shared log.
        self._lib = ctypes.CDLL(str(self.path))
        self._lib.fake_rkllm_dump.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        self._lib.fake_rkllm_dump.restype = ctypes.c_size_t
        self._lib.fake_rkllm_layout.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        self._lib.fake_rkllm_layout.restype = ctypes.c_size_t
        self._lib.fake_rkllm_set.argtypes = [ctypes.c_char_p, ctypes.c_long]
        self._lib.fake_rkllm_set.restype = ctypes.c_int
        self._lib.fake_rkllm_reset.argtypes = []
        self._lib.fake_rkllm_reset.restype = None

    def reset(self) -> None:
        """Forget the log and the switches."""
        self._lib.fake_rkllm_reset()

    def set(self, key: str, value: int) -> None:
        """Switches: hold_after (callbacks before waiting for abort), hang_after (callbacks
        before a 60 s sleep that ignores abort), error_at, hook_run (the run the hooks apply
        to; 0: all), fail_init."""
        if self._lib.fake_rkllm_set(key.encode(), value) != 0:
            raise KeyError(key)

    def _json(self, fn: Any) -> Any:
        n = fn(None, 0)
        buf = ctypes.create_string_buffer(n + 1)
        fn(buf, n + 1)
        return json.loads(buf.value.decode("utf-8"))

    def calls(self, fn: Optional[str] = None) -> list[dict]:
        """Every recorded call since the last reset, oldest first (only ``fn``'s if given)."""
        log = self._json(self._lib.fake_rkllm_dump)
        return [c for c in log if fn is None or c["fn"] == fn]

    def last(self, fn: str) -> dict:
        """The last call of ``fn``."""
        calls = self.calls(fn)
        if not calls:
            raise AssertionError(f"{fn} was not called")
        return calls[-1]

    def names(self) -> list[str]:
        """The names of the calls, in order (rkllm_get_kv_cache_size is not recorded)."""
        return [c["fn"] for c in self.calls()]

    def layout(self) -> dict[str, int]:
        """sizeof / offsetof of the structs as the C compiler laid them out."""
        return self._json(self._lib.fake_rkllm_layout)
