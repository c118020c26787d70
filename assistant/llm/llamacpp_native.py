"""Loading llama-cpp-python's ctypes bindings, and routing native logs into Python logging.

llama.cpp, ggml and mtmd print hundreds of lines to stderr per model load and image. Here
every line goes to the ``assistant.llm.native`` logger at DEBUG instead; the most recent
warnings and errors are also kept, so a failed native call can say *why* in its exception.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from types import ModuleType
from typing import Any

from assistant.errors import BackendError

log = logging.getLogger("assistant.llm.native")

# ggml_log_level (ggml.h)
_NONE, _DEBUG, _INFO, _WARN, _ERROR, _CONT = range(6)

_lock = threading.Lock()
_state: dict[str, Any] = {}
_partial: list[str] = []          # a line arrives in pieces; join until "\n"
_partial_level = [_INFO]
_recent = collections.deque(maxlen=8)   # recent WARN/ERROR lines, for error messages


def bindings() -> tuple[ModuleType, ModuleType]:
    """(llama_cpp.llama_cpp, llama_cpp.mtmd_cpp), imported once, with logging routed.

    Raises BackendError when llama-cpp-python is missing or too old.
    """
    with _lock:
        if "llama" in _state:
            return _state["llama"], _state["mtmd"]
        try:
            import llama_cpp  # noqa: F401  (imports its own stderr logger; replaced below)
            import llama_cpp.llama_cpp as llama
            import llama_cpp.mtmd_cpp as mtmd
        except ImportError as e:
            raise BackendError(
                f"llama-cpp-python is not installed ({e}); install it with "
                "`pip install 'llama-cpp-python>=0.3.36'` (or the project's [portable] extra), "
                "or set llm.backend: rkllm on a Rockchip board") from None
        except OSError as e:
            raise BackendError(f"llama-cpp-python cannot load its native library: {e}") from None
        for name in ("mtmd_helper_decode_image_chunk", "mtmd_input_chunk_get_placeholder",
                     "llama_memory_seq_rm", "llama_model_n_embd_inp"):
            if not hasattr(llama, name) and not hasattr(mtmd, name):
                raise BackendError(
                    f"llama-cpp-python is too old (no {name}); upgrade to 0.3.36 or newer")
        # Keep the callback object alive for the life of the process: a collected ctypes
        # callback that native code still calls is a segfault.
        callback = llama.llama_log_callback(_on_native_log)
        _state["callback"] = callback
        llama.llama_log_set(callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
        llama.llama_backend_init()
        _state["llama"], _state["mtmd"] = llama, mtmd
        return llama, mtmd


def _on_native_log(level: int, text: bytes, _user: Any) -> None:
    """ggml log callback: may run on any native thread, must never raise."""
    try:
        msg = text.decode("utf-8", "replace") if text else ""
        with _lock:
            if level != _CONT:
                _partial_level[0] = level
            _partial.append(msg)
            if not msg.endswith("\n"):
                return
            line = "".join(_partial).rstrip()
            _partial.clear()
            lvl = _partial_level[0]
            if lvl in (_WARN, _ERROR) and line:
                _recent.append(" ".join(line.split()))
        if line:
            log.debug("%s", line)
    except Exception:  # an exception here would unwind through C
        pass


def recent_native_errors(clear: bool = True) -> str:
    """The latest native warning/error lines, joined, for an exception message."""
    with _lock:
        text = " | ".join(_recent)
        if clear:
            _recent.clear()
    return text


def forget_native_errors() -> None:
    """Drop remembered native warnings (before a call whose failure we want to explain)."""
    recent_native_errors(clear=True)


def native_reason() -> str:
    """' (llama.cpp: ...)' with the latest native complaint, or '' when there is none."""
    text = recent_native_errors()
    return f" (llama.cpp: {text})" if text else ""
