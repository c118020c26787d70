"""ctypes definitions of librkllmrt.so's ABI, per runtime release, and choosing one.

Struct layouts follow the public ``rkllm.h`` of Rockchip's rknn-llm releases 1.2.1, 1.2.2,
1.2.3 (one ABI: "1.2") and 1.3.0 ("1.3"); fields are declared in header order with the
header's C types, so ctypes reproduces the C compiler's natural (LP64) alignment. What 1.3
changed, and why a binding for one crashes on the other:

- ``RKLLMParam``: ``bool ignore_eos_token`` after ``skip_special_token``; the three image
  tag strings left (they moved into the multimodal input).
- The multimodal input: image fields grouped in an ``image`` struct with the tags, and a
  ``video`` struct after it.
- ``RKLLMInferParam``: ``sampling_params`` pointer before ``keep_history``, and
  ``max_new_tokens`` after it.
- ``rkllm_init`` takes a pointer to an ``RKLLMCallback`` struct instead of the function.

The library exports no version function, so :func:`library_version` reads the banner the
runtime prints at start-up ("rkllm-runtime version: 1.2.1, ...") from the file's bytes, and
:func:`choose_abi` refuses, naming ``llm.rkllm.runtime_version``, whenever the version cannot
be told or does not match the setting. :func:`open_runtime` does all of it for a config.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import re
from ctypes import (CFUNCTYPE, POINTER, Structure, Union, c_bool, c_char_p, c_float,
                    c_int, c_int8, c_int32, c_size_t, c_uint8, c_uint32, c_void_p)
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from assistant.config import RkllmConfig
from assistant.errors import BackendError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- enums (both ABIs)

RKLLM_RUN_NORMAL = 0
RKLLM_RUN_WAITING = 1   # an incomplete UTF-8 character: text follows
RKLLM_RUN_FINISH = 2
RKLLM_RUN_ERROR = 3

RKLLM_INPUT_PROMPT = 0
RKLLM_INPUT_TOKEN = 1
RKLLM_INPUT_EMBED = 2
RKLLM_INPUT_MULTIMODAL = 3

RKLLM_INFER_GENERATE = 0
RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1   # prefill only: nothing is generated

SUPPORTED_VERSIONS = ("1.2.1", "1.2.2", "1.2.3", "1.3.0")
_ABI_OF_VERSION = {"1.2.1": "1.2", "1.2.2": "1.2", "1.2.3": "1.2", "1.3.0": "1.3"}
SETTING = "llm.rkllm.runtime_version"

PathResolver = Callable[[Optional[str]], Optional[Path]]


def plain_path(value: Optional[str]) -> Optional[Path]:
    """The default path resolver: ~ expanded, nothing else (Config.path resolves more)."""
    return Path(value).expanduser() if value else None

# Functions every supported release exports; one missing means an older runtime (< 1.2.1).
REQUIRED_SYMBOLS = (
    "rkllm_createDefaultParam", "rkllm_init", "rkllm_load_lora", "rkllm_load_prompt_cache",
    "rkllm_release_prompt_cache", "rkllm_destroy", "rkllm_run", "rkllm_abort",
    "rkllm_clear_kv_cache", "rkllm_get_kv_cache_size", "rkllm_set_chat_template",
    "rkllm_set_function_tools",
)

# --------------------------------------------------------------------------- shared structs


class RKLLMExtendParam(Structure):
    _fields_ = [
        ("base_domain_id", c_int32),
        ("embed_flash", c_int8),
        ("enabled_cpus_num", c_int8),
        ("enabled_cpus_mask", c_uint32),
        ("n_batch", c_uint8),
        ("use_cross_attn", c_int8),
        ("reserved", c_uint8 * 104),
    ]


class RKLLMLoraAdapter(Structure):
    _fields_ = [
        ("lora_adapter_path", c_char_p),
        ("lora_adapter_name", c_char_p),
        ("scale", c_float),
    ]


class RKLLMEmbedInput(Structure):
    _fields_ = [("embed", POINTER(c_float)), ("n_tokens", c_size_t)]


class RKLLMTokenInput(Structure):
    _fields_ = [("input_ids", POINTER(c_int32)), ("n_tokens", c_size_t)]


class RKLLMLoraParam(Structure):
    _fields_ = [("lora_adapter_name", c_char_p)]


class RKLLMPromptCacheParam(Structure):
    _fields_ = [("save_prompt_cache", c_int), ("prompt_cache_path", c_char_p)]


class RKLLMResultLastHiddenLayer(Structure):
    _fields_ = [("hidden_states", POINTER(c_float)), ("embd_size", c_int), ("num_tokens", c_int)]


class RKLLMResultLogits(Structure):
    _fields_ = [("logits", POINTER(c_float)), ("vocab_size", c_int), ("num_tokens", c_int)]


class RKLLMPerfStat(Structure):
    _fields_ = [
        ("prefill_time_ms", c_float),
        ("prefill_tokens", c_int),
        ("generate_time_ms", c_float),
        ("generate_tokens", c_int),
        ("memory_usage_mb", c_float),
    ]


class RKLLMResult(Structure):
    _fields_ = [
        ("text", c_char_p),
        ("token_id", c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
        ("perf", RKLLMPerfStat),
    ]


# int (*LLMResultCallback)(RKLLMResult*, void* userdata, LLMCallState)
LLMResultCallback = CFUNCTYPE(c_int, POINTER(RKLLMResult), c_void_p, c_int)

# --------------------------------------------------------------------------- 1.2.1 - 1.2.3


class RKLLMParam12(Structure):
    _fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
        ("is_async", c_bool),
        ("img_start", c_char_p),
        ("img_end", c_char_p),
        ("img_content", c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMMultiModalInput12(Structure):
    _fields_ = [
        ("prompt", c_char_p),
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    ]


class _RKLLMInputUnion12(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput12),
    ]


class RKLLMInput12(Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("role", c_char_p),
        ("enable_thinking", c_bool),
        ("input_type", c_int),
        ("u", _RKLLMInputUnion12),
    ]


class RKLLMInferParam12(Structure):
    _fields_ = [
        ("mode", c_int),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("keep_history", c_int),
    ]

# --------------------------------------------------------------------------- 1.3.0


class RKLLMParam13(Structure):
    _fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
        ("ignore_eos_token", c_bool),
        ("is_async", c_bool),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMImageInput13(Structure):
    _fields_ = [
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_start", c_char_p),
        ("image_end", c_char_p),
        ("image_content", c_char_p),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    ]


class RKLLMVideoInput13(Structure):
    _fields_ = [
        ("video_embed", POINTER(c_float)),
        ("n_frame_tokens", c_size_t),
        ("n_frame_per_video", c_size_t),
        ("n_video", c_size_t),
        ("video_start", c_char_p),
        ("video_end", c_char_p),
        ("video_content", c_char_p),
        ("frame_width", c_size_t),
        ("frame_height", c_size_t),
    ]


class RKLLMMultiModalInput13(Structure):
    _fields_ = [
        ("prompt", c_char_p),
        ("image", RKLLMImageInput13),
        ("video", RKLLMVideoInput13),
    ]


class _RKLLMInputUnion13(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput13),
    ]


class RKLLMInput13(Structure):
    _anonymous_ = ("u",)
    _fields_ = [
        ("role", c_char_p),
        ("enable_thinking", c_bool),
        ("input_type", c_int),
        ("u", _RKLLMInputUnion13),
    ]


class RKLLMSamplingParam13(Structure):
    _fields_ = [
        ("top_k", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
    ]


class RKLLMInferParam13(Structure):
    _fields_ = [
        ("mode", c_int),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("sampling_params", POINTER(RKLLMSamplingParam13)),
        ("keep_history", c_int),
        ("max_new_tokens", c_int32),
    ]


class RKLLMCallback13(Structure):
    # The tokenizer and embedding callbacks are optional and unused: plain NULL pointers.
    _fields_ = [
        ("result_callback", LLMResultCallback),
        ("result_userdata", c_void_p),
        ("tokenizer_callback", c_void_p),
        ("tokenizer_userdata", c_void_p),
        ("embed_callback", c_void_p),
        ("embed_userdata", c_void_p),
    ]

# --------------------------------------------------------------------------- one ABI


@dataclass(frozen=True)
class Abi:
    """The struct types of one ABI generation, and how to bind a library with them."""

    name: str                      # "1.2" or "1.3"
    Param: type
    Input: type
    InferParam: type
    tags_in_param: bool            # 1.2: image tags in RKLLMParam; 1.3: in the input
    callback_struct: Optional[type]  # 1.3: RKLLMCallback; 1.2: the function itself

    def bind(self, lib: ctypes.CDLL) -> None:
        """Declare argument and result types of every function used, on this CDLL object."""
        handle_p = POINTER(c_void_p)
        lib.rkllm_createDefaultParam.argtypes = []
        lib.rkllm_createDefaultParam.restype = self.Param
        cb_type = POINTER(self.callback_struct) if self.callback_struct else LLMResultCallback
        lib.rkllm_init.argtypes = [handle_p, POINTER(self.Param), cb_type]
        lib.rkllm_load_lora.argtypes = [c_void_p, POINTER(RKLLMLoraAdapter)]
        lib.rkllm_load_prompt_cache.argtypes = [c_void_p, c_char_p]
        lib.rkllm_release_prompt_cache.argtypes = [c_void_p]
        lib.rkllm_destroy.argtypes = [c_void_p]
        lib.rkllm_run.argtypes = [c_void_p, POINTER(self.Input), POINTER(self.InferParam),
                                  c_void_p]
        lib.rkllm_abort.argtypes = [c_void_p]
        lib.rkllm_clear_kv_cache.argtypes = [c_void_p, c_int, POINTER(c_int), POINTER(c_int)]
        lib.rkllm_get_kv_cache_size.argtypes = [c_void_p, POINTER(c_int)]
        lib.rkllm_set_chat_template.argtypes = [c_void_p, c_char_p, c_char_p, c_char_p]
        for name in ("rkllm_init", "rkllm_load_lora", "rkllm_load_prompt_cache",
                     "rkllm_release_prompt_cache", "rkllm_destroy", "rkllm_run", "rkllm_abort",
                     "rkllm_clear_kv_cache", "rkllm_get_kv_cache_size",
                     "rkllm_set_chat_template"):
            getattr(lib, name).restype = c_int


ABI_12 = Abi("1.2", RKLLMParam12, RKLLMInput12, RKLLMInferParam12, True, None)
ABI_13 = Abi("1.3", RKLLMParam13, RKLLMInput13, RKLLMInferParam13, False, RKLLMCallback13)
ABIS = {"1.2": ABI_12, "1.3": ABI_13}


def abi_for(version: str) -> Abi:
    """The ABI of a supported runtime version ("1.2.1" ... "1.3.0")."""
    return ABIS[_ABI_OF_VERSION[version]]

# --------------------------------------------------------------------------- which version


# The runtime logs "I rkllm: rkllm-runtime version: 1.2.1, rknpu driver version: ..." at init;
# the text sits in the library. Only this banner counts: "rkllm-toolkit version" describes
# the model file, not the library.
_BANNER = re.compile(rb"rkllm-runtime version:\s*v?(\d+\.\d+\.\d+[0-9A-Za-z]*)")


def library_version(path: Path) -> Optional[str]:
    """The runtime version written in the library file, or None when it cannot be told.

    Several different versions in one file also count as "cannot be told".
    """
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            found = {v.decode("ascii") for v in _BANNER.findall(m)}
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        log.warning("cannot read %s to find its version: %s", path, e)
        return None
    if len(found) == 1:
        return found.pop()
    if found:
        log.warning("%s names several runtime versions (%s)", path, ", ".join(sorted(found)))
    return None


def choose_abi(setting: str, path: Optional[Path]) -> tuple[str, Abi]:
    """(version, ABI) from the setting and the library file; BackendError when unsure.

    ``setting`` is ``llm.rkllm.runtime_version`` ("auto" or a version); ``path`` the file the
    dynamic loader opened (None when unknown). The library's own banner, when present,
    must agree with an explicit setting on the ABI; "auto" needs the banner.
    """
    found = library_version(path) if path is not None else None
    where = str(path) if path is not None else "librkllmrt.so"
    supported = ", ".join(SUPPORTED_VERSIONS)
    if found is not None and found not in _ABI_OF_VERSION:
        raise BackendError(
            f"{where} is RKLLM runtime {found}; this program binds runtime {supported} "
            f"(their structs differ, a wrong binding crashes). Install librkllmrt.so from an "
            f"rknn-llm release {supported} (see README.md#the-runtime-version), with models "
            f"converted by the same release's rkllm-toolkit.")
    if setting == "auto":
        if found is None:
            raise BackendError(
                f"cannot tell which RKLLM runtime {where} is (no 'rkllm-runtime version' "
                f"text in it), and a binding for the wrong one crashes: set {SETTING} to the "
                f"release you installed ({supported}). The runtime prints "
                f"'rkllm-runtime version: ...' when it starts.")
        return found, abi_for(found)
    if setting not in _ABI_OF_VERSION:
        raise BackendError(f"{SETTING}: {setting!r} is not supported; use auto or one of "
                           f"{supported}")
    if found is not None and _ABI_OF_VERSION[found] != _ABI_OF_VERSION[setting]:
        raise BackendError(
            f"{SETTING} is {setting} but {where} is runtime {found}, whose ABI differs: set "
            f"{SETTING} to {found} (or auto), or install the {setting} library.")
    if found is None:
        log.warning("%s has no version text; trusting %s = %s", where, SETTING, setting)
    return setting, abi_for(setting)


class _LinkMap(Structure):
    # The head of glibc's struct link_map (<link.h>): enough to read the file name.
    _fields_ = [("l_addr", c_void_p), ("l_name", c_char_p)]


_RTLD_DI_LINKMAP = 2


def loaded_path(lib: ctypes.CDLL) -> Optional[Path]:
    """The file the dynamic loader opened for ``lib``, or None when it cannot be found.

    glibc's dlinfo names it exactly (also for a bare name found through the search path);
    without dlinfo, the process's memory map is searched for the library's name.
    """
    for provider in (None, "libdl.so.2"):  # dlinfo moved into libc in glibc 2.34
        try:
            dlinfo = ctypes.CDLL(provider).dlinfo
            break
        except (OSError, AttributeError):
            continue
    else:
        return mapped_path(Path(lib._name).name)
    dlinfo.argtypes = [c_void_p, c_int, c_void_p]
    dlinfo.restype = c_int
    lm = POINTER(_LinkMap)()
    if dlinfo(lib._handle, _RTLD_DI_LINKMAP, ctypes.byref(lm)) != 0 or not lm \
            or not lm.contents.l_name:
        return mapped_path(Path(lib._name).name)
    return Path(lm.contents.l_name.decode("utf-8", "replace"))


def mapped_path(name: str) -> Optional[Path]:
    """The first file mapped into this process whose name starts with ``name`` (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(None, 5)
                if len(parts) == 6 and Path(parts[5].strip()).name.startswith(name):
                    return Path(parts[5].strip())
    except OSError:
        pass
    return None


def missing_symbols(lib: ctypes.CDLL) -> list[str]:
    """Required functions the library does not export."""
    missing = []
    for name in REQUIRED_SYMBOLS:
        try:
            getattr(lib, name)
        except AttributeError:
            missing.append(name)
    return missing


def open_runtime(rk: RkllmConfig, resolve_path: PathResolver = plain_path
                 ) -> tuple[ctypes.CDLL, Optional[Path], str, Abi]:
    """Open librkllmrt.so and tell its ABI: (library, file, version, ABI).

    Nothing in the library is called: a wrong ABI would crash. BackendError when the
    library cannot be opened, its version cannot be told or is not supported, or it lacks
    functions every supported release has.
    """
    value = rk.library
    if "/" in value or value.startswith("~"):
        path = resolve_path(value)
        if path is None or not path.is_file():
            raise BackendError(
                f"llm.rkllm.library: {path} not found: install librkllmrt.so from an "
                f"rknn-llm release (see README.md#installing-the-runtimes) or fix the path")
        target = str(path)
    else:
        target = value  # a name the dynamic loader searches for
    try:
        lib = ctypes.CDLL(target)
    except OSError as e:
        raise BackendError(
            f"cannot load the RKLLM runtime {target} ({e}): install librkllmrt.so from an "
            f"rknn-llm release (see README.md#installing-the-runtimes) or set "
            f"llm.rkllm.library to its path. It runs only on RK3576 / RK3588 boards; elsewhere "
            f"use llm.backend: llamacpp."
        ) from None
    lib_path = loaded_path(lib) or (Path(target) if "/" in target else None)
    version, abi = choose_abi(rk.runtime_version, lib_path)
    missing = missing_symbols(lib)
    if missing:
        raise BackendError(
            f"{lib_path or target} lacks {', '.join(missing)}: it is older than RKLLM runtime "
            f"1.2.1. Install librkllmrt.so from an rknn-llm release "
            f"{', '.join(SUPPORTED_VERSIONS)} (see README.md#the-runtime-version).")
    return lib, lib_path, version, abi
