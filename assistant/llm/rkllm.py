"""The board backend: one multimodal LLM turn on the RK3576 / RK3588 NPU via librkllmrt.so.

A ctypes binding of Rockchip's RKLLM runtime, releases 1.2.1 - 1.2.3 and 1.3.0 (struct
layouts in :mod:`assistant.llm.rkllm_abi`; the version is set or read from the library,
never guessed). The runtime is synchronous here: ``rkllm_run`` blocks while the runtime's own
thread calls the result callback with each piece of text; pieces cross to the caller
through ``on_piece`` (``stream_turn`` hands them to the asyncio loop). All calls into the
runtime, except ``rkllm_abort``, are serialised by one lock, so it is never entered from two
threads at once; ``rkllm_abort`` is the one call meant to overlap a run.

The callback and every buffer the runtime may keep a pointer to live exactly as long as the
handle: a ``weakref.finalize`` owns them and destroys the handle at ``close()``, when the
backend is garbage-collected, or at interpreter exit, whichever comes first.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import logging
import math
import re
import threading
import time
import weakref
from ctypes import POINTER, byref, c_float, c_int, c_void_p
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from assistant.config import ConfigError, LlmConfig, PersonaConfig, RkllmConfig
from assistant.errors import BackendError, ContextFullError, ModelMissingError
from assistant.llm import rkllm_abi as abi_mod
from assistant.llm.base import (CLOSE_WAIT_S, Exchange, ImageEmbedding, LLMBackend,
                                TurnOptions, TurnStats)
from assistant.llm.families import IMAGE_PLACEHOLDER, Family, get_family
from assistant.llm.rkllm_abi import (RKLLM_INFER_GENERATE, RKLLM_INFER_GET_LAST_HIDDEN_LAYER,
                                     RKLLM_INPUT_MULTIMODAL,
                                     RKLLM_INPUT_PROMPT, RKLLM_RUN_ERROR, RKLLM_RUN_FINISH,
                                     RKLLM_RUN_NORMAL, RKLLM_RUN_WAITING, Abi,
                                     LLMResultCallback, PathResolver, RKLLMLoraAdapter,
                                     RKLLMLoraParam, RKLLMPromptCacheParam,
                                     RKLLMSamplingParam13, plain_path)

log = logging.getLogger(__name__)

_MAX_CPU = 7  # RK3576 / RK3588: CPUs 0-3 little, 4-7 big
_START_BYTES_PER_TOKEN = 3.0
# Sampling fields the config does not set: a 1.3.0 run's own sampling keeps the runtime's.
_KEPT_SAMPLING = ("frequency_penalty", "presence_penalty", "mirostat", "mirostat_tau",
                  "mirostat_eta")
# Runtime error texts that mean the context overflowed (the turn can be compacted and retried).
_OVERFLOW = re.compile(r"context|exceed|kv cache|too long", re.IGNORECASE)


def parse_cpu_mask(spec: Optional[str]) -> Optional[int]:
    """'4-7', '4,5,6,7' or '0-1,4-7' -> a bit mask; None/empty -> None (runtime default)."""
    if spec is None or not str(spec).strip():
        return None
    mask = 0
    for part in str(spec).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        first = int(m.group(1)) if m else -1
        last = int(m.group(2) or first) if m else -1
        if not m or first > last or last > _MAX_CPU:
            raise ConfigError(
                f"llm.rkllm.cpu_mask: expected CPU numbers 0-{_MAX_CPU} as a list or ranges "
                f"like '4-7' or '4,5,6,7' (the big cores of an RK3576 / RK3588), found "
                f"{spec!r}", key="llm.rkllm.cpu_mask")
        for cpu in range(first, last + 1):
            mask |= 1 << cpu
    return mask


def probe_library(rk: RkllmConfig, resolve_path: PathResolver = plain_path) -> str:
    """For `check`: which runtime llm.rkllm.library is, without loading a model."""
    _, path, version, abi = abi_mod.open_runtime(rk, resolve_path)
    how = "from the library" if rk.runtime_version == "auto" else "llm.rkllm.runtime_version"
    return f"RKLLM runtime {version} ({how}, ABI {abi.name}) at {path or rk.library}"


class _Turn:
    """What the callback thread learns during one rkllm_run."""

    def __init__(self, on_piece: Callable[[str], None], max_pieces: Optional[int] = None):
        self.on_piece = on_piece
        self.release = False            # 1.3.0, prefill-only: let the runtime free its buffers
        self.max_pieces = max_pieces    # a per-turn answer limit below the init value (1.2.x)
        self.cut_at_limit = False
        # WAITING pieces end inside a UTF-8 character: the decoder holds those bytes
        # until the rest of the character arrives with the next piece.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pieces = 0
        self.error: Optional[str] = None
        self.perf: Optional[dict] = None
        self.failure: Optional[BaseException] = None
        self.abort_followed_up = False


def _destroy(lib: ctypes.CDLL, handle: int, keepalive: list) -> None:
    """Finalizer: destroy the runtime handle; ``keepalive`` (callback, params) dies after."""
    try:
        ret = lib.rkllm_destroy(c_void_p(handle))
        if ret != 0:
            log.warning("rkllm_destroy returned %d", ret)
    finally:
        keepalive.clear()


class RkllmBackend(LLMBackend):
    """A ``.rkllm`` model on the NPU, its conversation kept in the runtime's KV cache."""

    name = "rkllm"

    def __init__(self, llm: LlmConfig, persona: PersonaConfig, *, with_vision: bool,
                 resolve_path: PathResolver = plain_path):
        self._llm = llm
        self._rk = llm.rkllm
        self.answer_reserve = llm.max_new_tokens
        self.family: Family = get_family(self._rk.family)
        self.with_vision = with_vision
        self._resolve = resolve_path
        self._cpu_mask = parse_cpu_mask(self._rk.cpu_mask)
        self._system = self.family.system_prompt(persona.prompt)
        # Text is counted in UTF-8 bytes per token, measured: the runtime reports the tokens
        # each run prefilled, and the smallest ratio seen is kept (a safe bound; prefix reuse
        # only makes a later ratio look larger). Qwen-style tokenizers start above 3.
        self._bytes_per_token = _START_BYTES_PER_TOKEN
        # Until the runtime reports the KV size, the system prompt's share is estimated.
        self._system_estimate = self.count_tokens(self._system)
        self._overhead = self.count_tokens(self.family.prompt_prefix + self.family.prompt_postfix)

        self._lock = threading.Lock()        # every runtime call but rkllm_abort
        self._state_lock = threading.Lock()  # the handle and the running turn, for abort()
        self._abort = threading.Event()
        self._closing = False                # close() was called: no new run starts
        self._lib: Optional[ctypes.CDLL] = None
        self._abi: Optional[Abi] = None
        self._handle: Optional[int] = None
        self._finalizer: Optional[weakref.finalize] = None
        self._turn: Optional[_Turn] = None
        self._tags: tuple[bytes, bytes, bytes] = (
            self.family.image_start.encode(), self.family.image_end.encode(),
            self.family.image_content.encode())
        self._lora_name: Optional[bytes] = None
        self._cache: Optional[Path] = None
        self._cache_key = ""
        self._save_cache = False
        self._tokens_used = 0
        # Exchanges fed back by load_history, as template text: they go in front of the
        # next question, in the same run, since the runtime takes no assistant messages.
        self._pending = ""
        self._warned_sampling = False
        self._kept_sampling: dict[str, float] = {}   # init sampling values a run keeps
        # llm.rkllm.prefill_early: the prompt and image of the last prefill-only run, the
        # KV size that means "no history held", and whether the runtime showed it reuses.
        self._early: Optional[tuple[str, ImageEmbedding]] = None
        self._system_kv = 0
        self._prefill_off = False
        self.runtime_version: Optional[str] = None

    @classmethod
    def from_config(cls, cfg: Any) -> "RkllmBackend":
        """From the whole Config; base_domain_id 1 when the NPU vision encoder is used too."""
        return cls(cfg.llm, cfg.persona, with_vision=cfg.vision.encoder == "rknn",
                   resolve_path=cfg.path)

    # ------------------------------------------------------------------ loading

    def _model_path(self) -> Path:
        path = self._resolve(self._rk.model)
        if path is None:
            raise ModelMissingError(
                "llm.rkllm.model is not set: point it at the .rkllm model converted with "
                "rkllm-toolkit for this board (see README.md#where-the-model-files-go)")
        if not path.is_file():
            raise ModelMissingError(
                f"llm.rkllm.model: {path} not found: copy the .rkllm model there or fix the "
                f"path (see README.md#where-the-model-files-go)")
        return path

    def load(self) -> None:
        """Load the library and the model, set the chat template, LoRA and prompt cache.

        Blocking and idempotent; safe to run in a worker thread next to the encoder's load.
        """
        with self._lock:
            if self._handle is not None:
                return
            self._closing = False
            t0 = time.monotonic()
            model = self._model_path()
            lib, _, version, abi = abi_mod.open_runtime(self._rk, self._resolve)
            abi.bind(lib)
            param = lib.rkllm_createDefaultParam()
            self._fill_param(param, abi, model)
            self._kept_sampling = {name: getattr(param, name) for name in _KEPT_SAMPLING}

            # The callback reaches the backend through a weak reference, so the finalizer
            # that keeps it alive does not keep the backend alive too.
            me = weakref.ref(self)

            def trampoline(result: Any, userdata: Any, state: int) -> int:
                backend = me()
                return backend._on_result(result, state) if backend is not None else 0

            callback = LLMResultCallback(trampoline)
            keepalive: list = [callback, param]
            if abi.callback_struct is not None:
                cb_arg: Any = abi.callback_struct(result_callback=callback)
                keepalive.append(cb_arg)
                cb_ref: Any = byref(cb_arg)
            else:
                cb_ref = callback
            handle = c_void_p()
            ret = lib.rkllm_init(byref(handle), byref(param), cb_ref)
            if ret != 0 or not handle.value:
                raise BackendError(
                    f"rkllm_init failed (code {ret}) for {model}: the runtime log above says "
                    f"why. Check that the model was converted by rkllm-toolkit {version} for "
                    f"this chip, that the NPU driver is 0.9.8 or newer "
                    f"(cat /sys/kernel/debug/rknpu/version), that llm.max_context_len "
                    f"({self._llm.max_context_len}) is within the model's limit, and that "
                    f"there is enough free memory.")
            self._lib, self._abi, self._handle = lib, abi, handle.value
            self.runtime_version = version
            self._finalizer = weakref.finalize(self, _destroy, lib, handle.value, keepalive)
            try:
                self._setup(model, version)
            except BaseException:
                self._release()
                raise
            log.info("rkllm %s loaded in %.1f s: runtime %s, family %s, context %d, "
                     "new tokens %d, base_domain_id %d, cpus %s",
                     model.name, time.monotonic() - t0, version, self.family.name,
                     self._llm.max_context_len, self._llm.max_new_tokens,
                     param.extend_param.base_domain_id,
                     hex(self._cpu_mask) if self._cpu_mask is not None else "default")

    def _fill_param(self, param: Any, abi: Abi, model: Path) -> None:
        """Every field the runtime reads, from the config; the rest keep the defaults."""
        llm, rk = self._llm, self._rk
        param.model_path = str(model).encode()
        param.max_context_len = llm.max_context_len
        param.max_new_tokens = llm.max_new_tokens
        # temperature 0 means greedy: top_k 1 says so to any sampler.
        param.top_k = 1 if llm.temperature == 0 else llm.top_k
        param.top_p = llm.top_p
        param.temperature = llm.temperature
        param.repeat_penalty = llm.repeat_penalty
        if rk.n_keep >= 0:
            param.n_keep = rk.n_keep
        param.skip_special_token = True
        param.is_async = False
        if abi.tags_in_param:
            param.img_start, param.img_end, param.img_content = self._tags
        else:
            param.ignore_eos_token = False
        ext = param.extend_param
        # The vision encoder's NPU memory lives in IOMMU domain 0; without moving the LLM
        # to domain 1, allocating both fails.
        ext.base_domain_id = 1 if self.with_vision else 0
        ext.embed_flash = 1 if rk.embed_flash else 0
        if self._cpu_mask is not None:
            ext.enabled_cpus_mask = self._cpu_mask
            ext.enabled_cpus_num = bin(self._cpu_mask).count("1")
        ext.n_batch = 1
        ext.use_cross_attn = 0

    def _setup(self, model: Path, version: str) -> None:
        """After init: chat template, LoRA adapter, prompt cache, token count."""
        lib, h = self._lib, c_void_p(self._handle)
        ret = lib.rkllm_set_chat_template(h, self._system.encode(),
                                          self.family.prompt_prefix.encode(),
                                          self.family.prompt_postfix.encode())
        if ret != 0:
            raise BackendError(f"rkllm_set_chat_template failed (code {ret}): the runtime log "
                               f"above says why")
        lora = self._resolve(self._rk.lora)
        if lora is not None:
            if not lora.is_file():
                raise ModelMissingError(f"llm.rkllm.lora: {lora} not found: copy the LoRA "
                                        f"adapter there or set llm.rkllm.lora to null")
            name = lora.stem.encode()
            adapter = RKLLMLoraAdapter(str(lora).encode(), name, self._rk.lora_scale)
            ret = lib.rkllm_load_lora(h, byref(adapter))
            if ret != 0:
                raise BackendError(f"rkllm_load_lora failed (code {ret}) for {lora}: was it "
                                   f"exported for this model by rkllm-toolkit {version}?")
            self._lora_name = name
        self._cache = self._resolve(self._rk.prompt_cache)
        if self._cache is not None:
            self._open_prompt_cache(model, version)
        self._refresh_tokens()
        self._system_kv = self._tokens_used

    def _open_prompt_cache(self, model: Path, version: str) -> None:
        """Load the cache when it was made for this model and system prompt, else plan to save.

        A ``.key`` file beside the cache names what it was made for: a cache of another
        system prompt would silently change who the assistant is.
        """
        cache = self._cache
        key = hashlib.sha256("\n".join([
            str(model.resolve()), str(model.stat().st_size), version, self._system,
            self.family.prompt_prefix, self.family.prompt_postfix]).encode()).hexdigest()
        self._cache_key = key
        keyfile = cache.with_name(cache.name + ".key")
        try:
            matches = cache.is_file() and keyfile.read_text(encoding="ascii").strip() == key
        except OSError:
            matches = False
        if matches:
            ret = self._lib.rkllm_load_prompt_cache(c_void_p(self._handle), str(cache).encode())
            if ret == 0:
                log.info("rkllm prompt cache loaded from %s", cache)
                return
            log.warning("rkllm_load_prompt_cache failed (code %d) for %s; it will be rebuilt",
                        ret, cache)
        elif cache.is_file():
            log.info("rkllm prompt cache %s was made for another model or system prompt; "
                     "it will be rebuilt", cache)
        self._save_cache = True

    # ------------------------------------------------------------------ the callback

    def _on_result(self, result: Any, state: int) -> int:
        """Runs on the runtime's thread; never raises into C."""
        turn = self._turn
        if turn is None:
            return 0
        try:
            if state in (RKLLM_RUN_NORMAL, RKLLM_RUN_WAITING):
                if self._abort.is_set():  # pieces after an abort are dropped
                    self._follow_up_abort(turn)
                    return 0
                raw = result.contents.text if result else None
                turn.pieces += 1
                text = turn.decoder.decode(raw or b"")
                if text:
                    turn.on_piece(text)
                if turn.max_pieces is not None and turn.pieces >= turn.max_pieces:
                    turn.cut_at_limit = True
                    self._abort.set()
                    self._follow_up_abort(turn)
            elif state == RKLLM_RUN_FINISH:
                if result:
                    p = result.contents.perf
                    turn.perf = {"prefill_ms": float(p.prefill_time_ms),
                                 "prefill_tokens": int(p.prefill_tokens),
                                 "generate_ms": float(p.generate_time_ms),
                                 "generate_tokens": int(p.generate_tokens),
                                 "memory_mb": float(p.memory_usage_mb)}
                tail = turn.decoder.decode(b"", final=True)
                if tail and not self._abort.is_set():
                    turn.on_piece(tail)
            elif state == RKLLM_RUN_ERROR:
                raw = result.contents.text if result else None
                turn.error = (raw or b"").decode("utf-8", "replace")
        except BaseException as e:  # on_piece failed (e.g. the loop is gone): stop the turn
            turn.failure = e
            self._abort.set()
            self._follow_up_abort(turn)
        return 2 if turn.release else 0

    def _follow_up_abort(self, turn: _Turn) -> None:
        """Ask the runtime to stop (again) from another thread, once per turn.

        Covers an abort the runtime missed because it came before the task started, and a
        failing on_piece. Not from this thread: the runtime may wait in rkllm_abort for the
        task to end, and the task waits for this callback to return.
        """
        if not turn.abort_followed_up:
            turn.abort_followed_up = True
            threading.Thread(target=self._abort_turn, args=(turn,), name="rkllm-abort",
                             daemon=True).start()

    def _abort_turn(self, turn: _Turn) -> None:
        with self._state_lock:
            if self._turn is turn and self._handle is not None:  # not a later turn
                self._lib.rkllm_abort(c_void_p(self._handle))

    # ------------------------------------------------------------------ one turn

    def _image_array(self, image: ImageEmbedding) -> np.ndarray:
        data = np.ascontiguousarray(image.data, dtype=np.float32)
        if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
            raise BackendError(f"the image embedding has shape {data.shape}; expected "
                               f"(image tokens, embedding size)")
        self.family.check_embedding(data.shape[0], data.shape[1], source="the image embedding")
        return data

    def _check_fits(self, prompt: str, n_image_tokens: int, keep_history: bool) -> None:
        """ContextFullError when the turn cannot fit, before the runtime fails on it."""
        ctx, new = self._llm.max_context_len, self._llm.max_new_tokens
        used = max(self.tokens_used if keep_history else 0, self._system_estimate)
        need = self.count_tokens(prompt) + self._overhead + n_image_tokens
        if n_image_tokens:
            need += self.count_tokens(self.family.image_start + self.family.image_end)
        if used + need + new > ctx:
            what = "question and image" if n_image_tokens else "question"
            raise ContextFullError(
                f"the next turn needs about {need + new} tokens (about {need} for the {what}, "
                f"up to {new} for the answer) but only {max(ctx - used, 0)} of "
                f"llm.max_context_len {ctx} are free: clear the conversation, or raise "
                f"llm.max_context_len / lower llm.max_new_tokens")

    # ------------------------------------------------------------------ history as text

    def _history_text(self, exchanges: Sequence[Exchange]) -> str:
        """Exchanges in the template's own markup, to stand before the next question.

        The runtime wraps a prompt as prefix + prompt + postfix; writing each earlier
        exchange as question + postfix + answer + end-of-turn + prefix makes the whole run
        read as the conversation asked one turn at a time.
        """
        fam = self.family
        end = getattr(fam, "turn_end", "<|im_end|>\n")
        return "".join(self._clean(q) + fam.prompt_postfix + fam.escape((a or "").strip()) +
                       end + fam.prompt_prefix for q, a in exchanges)

    def _clean(self, text: str) -> str:
        """A question as text: only the backend places the image, and markers are escaped."""
        if IMAGE_PLACEHOLDER in text:
            text = text.replace(IMAGE_PLACEHOLDER, " ").strip()
        return self.family.escape(text)

    def load_history(self, exchanges: Sequence[Exchange]) -> None:
        """Clear all but the system prompt; the exchanges go in with the next question."""
        with self._lock:
            if self._handle is None:
                raise BackendError("the rkllm backend is not loaded (call load() first)")
            ret = self._lib.rkllm_clear_kv_cache(c_void_p(self._handle), 1, None, None)
            if ret != 0:
                raise BackendError(f"rkllm_clear_kv_cache failed (code {ret}): the runtime "
                                   f"log above says why")
            self._refresh_tokens()
            self._system_kv = self._tokens_used
            self._early = None
            self._pending = self._history_text(exchanges)

    def history_cost(self, exchanges: Sequence[Exchange]) -> int:
        return self.count_tokens(self._history_text(exchanges)) if exchanges else 0

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` may take: its UTF-8 bytes over the smallest measured ratio."""
        return max(1, math.ceil(len(text.encode("utf-8")) / self._bytes_per_token))

    def _measure(self, turn: "_Turn", text_bytes: int, n_image_tokens: int) -> None:
        """Learn bytes per token from what the runtime says it prefilled."""
        tokens = (turn.perf or {}).get("prefill_tokens", 0) - n_image_tokens
        if tokens > 0 and text_bytes > 0:
            ratio = max(1.0, text_bytes / tokens)
            if ratio < self._bytes_per_token:
                log.info("rkllm: %.2f bytes per token measured (was %.2f); budgets use it",
                         ratio, self._bytes_per_token)
                self._bytes_per_token = ratio

    def run_turn(self, text: str, image: Optional[ImageEmbedding], keep_history: bool,
                 on_piece: Callable[[str], None],
                 options: Optional[TurnOptions] = None) -> TurnStats:
        """One user turn, text or text + image; the answer streams through ``on_piece``."""
        with self._lock:
            if self._handle is None:
                raise BackendError("the rkllm backend is not loaded (call load() first)")
            abi = self._abi
            text = self._clean(text)
            embed = self._image_array(image) if image is not None else None
            prompt = IMAGE_PLACEHOLDER + text if embed is not None else text
            if keep_history and self._pending:
                prompt = self._pending + prompt
            n_image_tokens = embed.shape[0] if embed is not None else 0
            self._check_fits(prompt, n_image_tokens, keep_history)

            prompt_b = prompt.encode("utf-8")
            inp = self._input(prompt_b, embed, image)
            early, self._early = self._early, None
            after_early = (early is not None and early[1] is image and keep_history
                           and prompt.startswith(early[0]))
            infer = abi.InferParam()
            infer.mode = RKLLM_INFER_GENERATE
            infer.keep_history = 1 if keep_history else 0
            lora = RKLLMLoraParam(self._lora_name) if self._lora_name else None
            if lora is not None:
                infer.lora_params = ctypes.pointer(lora)
            # The cache is saved from a text turn: an image's tokens are no use next time.
            saving = self._save_cache and embed is None
            cache = (RKLLMPromptCacheParam(1, str(self._cache).encode()) if saving else None)
            if cache is not None:
                infer.prompt_cache_params = ctypes.pointer(cache)
            max_new = self._llm.max_new_tokens
            if options is not None and options.max_new_tokens:
                max_new = min(max_new, options.max_new_tokens)
            sampling = self._sampling(options) if not abi.tags_in_param else None
            if sampling is not None:
                infer.sampling_params = ctypes.pointer(sampling)
            if not abi.tags_in_param:  # 1.3: NULL sampling = the init values
                infer.max_new_tokens = max_new
            elif options is not None and (options.temperature is not None or
                                          options.top_p is not None) and not self._warned_sampling:
                self._warned_sampling = True
                log.warning("RKLLM runtime %s sets sampling once at load; per-request "
                            "temperature and top_p need runtime 1.3.0", self.runtime_version)

            # 1.2.x takes the answer limit only at init: a lower one is enforced here.
            turn = _Turn(on_piece, max_new if max_new < self._llm.max_new_tokens and
                         abi.tags_in_param else None)
            t0 = time.monotonic()
            ret = self._run(inp, infer, turn)
            wall_ms = (time.monotonic() - t0) * 1000
            aborted = self._abort.is_set() and not turn.cut_at_limit
            self._refresh_tokens(after_turn=(turn, keep_history))
            if keep_history and turn.error is None and (ret == 0 or aborted):
                self._pending = ""      # the runtime holds the fed-back exchanges now
            if turn.failure is not None:
                raise turn.failure
            if turn.error is not None or (ret != 0 and not aborted):
                detail = f": {turn.error}" if turn.error else ""
                if turn.pieces == 0 and turn.error and _OVERFLOW.search(turn.error):
                    raise ContextFullError(f"the RKLLM runtime ran out of context "
                                           f"(rkllm_run returned {ret}{detail})")
                raise BackendError(
                    f"the RKLLM runtime failed during the turn (rkllm_run returned {ret}"
                    f"{detail}); the runtime log above says why. A common cause is a full "
                    f"context: clear the conversation, or raise llm.max_context_len / lower "
                    f"llm.max_new_tokens.")
            if saving and not aborted:
                self._write_cache_key()
            self._measure(turn, len(prompt_b) + len(self.family.prompt_prefix.encode()) +
                          len(self.family.prompt_postfix.encode()), n_image_tokens)
            stats = self._stats(turn, aborted, wall_ms)
            stats.extra["finish"] = ("aborted" if aborted else "length"
                                     if turn.cut_at_limit or stats.generated_tokens >= max_new
                                     else "stop")
            if after_early and turn.perf:
                self._judge_early(stats, n_image_tokens)
            return stats

    # ------------------------------------------------------------------ prefill ahead

    def _input(self, prompt_b: bytes, embed: Optional[np.ndarray],
               image: Optional[ImageEmbedding]) -> Any:
        """The RKLLMInput of a text or text + image prompt."""
        abi = self._abi
        inp = abi.Input()
        inp.role = b"user"
        inp.enable_thinking = False
        if embed is None:
            inp.input_type = RKLLM_INPUT_PROMPT
            inp.prompt_input = prompt_b
            return inp
        inp.input_type = RKLLM_INPUT_MULTIMODAL
        mm = inp.multimodal_input
        mm.prompt = prompt_b
        img = mm if abi.tags_in_param else mm.image
        img.image_embed = embed.ctypes.data_as(POINTER(c_float))
        img.n_image_tokens = embed.shape[0]
        img.n_image = 1
        img.image_width = image.width
        img.image_height = image.height
        if not abi.tags_in_param:
            img.image_start, img.image_end, img.image_content = self._tags
        return inp

    def prefill(self, image: ImageEmbedding) -> bool:
        """llm.rkllm.prefill_early: a prefill-only run of the next turn's opening (the fed-
        back history and the image) while the person talks, for the runtime's automatic
        prefix reuse to skip in the real turn. Only while the KV cache holds no history:
        a run that keeps none would otherwise drop it."""
        if not self._rk.prefill_early or self._prefill_off:
            return False
        with self._lock:
            if self._handle is None or self._tokens_used > self._system_kv:
                return False
            embed = self._image_array(image)
            prompt = self._pending + IMAGE_PLACEHOLDER
            inp = self._input(prompt.encode("utf-8"), embed, image)
            infer = self._abi.InferParam()
            infer.mode = RKLLM_INFER_GET_LAST_HIDDEN_LAYER
            infer.keep_history = 0
            lora = RKLLMLoraParam(self._lora_name) if self._lora_name else None
            if lora is not None:
                infer.lora_params = ctypes.pointer(lora)
            turn = _Turn(lambda piece: None)
            turn.release = not self._abi.tags_in_param
            t0 = time.monotonic()
            ret = self._run(inp, infer, turn)
            self._refresh_tokens()
            if ret != 0 or turn.error is not None:
                log.warning("rkllm: the prefill-only run failed (%s); the image goes with the "
                            "question", turn.error or f"rkllm_run returned {ret}")
                return False
            self._early = (prompt, image)
            log.info("rkllm: image prefilled ahead in %.0f ms (%s tokens)",
                     (time.monotonic() - t0) * 1000, (turn.perf or {}).get("prefill_tokens"))
            return True

    def cancel_prefill(self) -> None:
        self._early = None   # nothing to cut: the run kept no history

    def _judge_early(self, stats: TurnStats, n_image_tokens: int) -> None:
        """Did the real turn reuse the prefilled image? The runtime's prefill count says."""
        reused = stats.prompt_tokens < n_image_tokens
        stats.extra["early_prefill"] = "reused" if reused else "not reused"
        if reused:
            log.info("rkllm: the turn reused the early prefill (%d tokens prefilled, image %d)",
                     stats.prompt_tokens, n_image_tokens)
            return
        self._prefill_off = True
        log.warning("rkllm: runtime %s prefilled the image again (%d tokens for a turn with "
                    "%d image tokens): it does not reuse the early prefill, so "
                    "llm.rkllm.prefill_early is switched off", self.runtime_version,
                    stats.prompt_tokens, n_image_tokens)

    def _run(self, inp: Any, infer: Any, turn: "_Turn") -> int:
        """rkllm_run with ``turn`` receiving the callbacks (blocking; under self._lock)."""
        with self._state_lock:
            if self._closing:       # an abort from close() must not be cleared away
                raise BackendError("the rkllm backend is closing")
            self._abort.clear()
            self._turn = turn
        try:
            return self._lib.rkllm_run(c_void_p(self._handle), byref(inp), byref(infer), None)
        finally:
            with self._state_lock:
                self._turn = None

    def _sampling(self, options: Optional[TurnOptions]) -> Optional[RKLLMSamplingParam13]:
        """1.3.0's per-run sampling from a turn's options; None keeps the init values."""
        if options is None or (options.temperature is None and options.top_p is None):
            return None
        llm = self._llm
        temp = llm.temperature if options.temperature is None else options.temperature
        sp = RKLLMSamplingParam13()
        sp.top_k = 1 if temp == 0 else llm.top_k
        sp.top_p = llm.top_p if options.top_p is None else options.top_p
        sp.temperature = temp
        sp.repeat_penalty = llm.repeat_penalty
        # The rest as the runtime was initialised (not zeros, which would change them).
        for name, value in self._kept_sampling.items():
            setattr(sp, name, value)
        return sp

    def _stats(self, turn: _Turn, aborted: bool, wall_ms: float) -> TurnStats:
        perf = turn.perf or {}
        stats = TurnStats(
            prompt_tokens=perf.get("prefill_tokens", 0),
            generated_tokens=perf.get("generate_tokens", turn.pieces),
            prefill_ms=perf.get("prefill_ms", 0.0),
            generate_ms=perf.get("generate_ms", 0.0),
            context_used=self._tokens_used,
            aborted=aborted,
            extra={"memory_mb": perf.get("memory_mb"), "wall_ms": wall_ms,
                   "runtime_version": self.runtime_version})
        rate = (stats.generated_tokens / stats.generate_ms * 1000) if stats.generate_ms else 0.0
        log.info("rkllm turn: prefill %d tokens in %.0f ms, generate %d tokens in %.0f ms "
                 "(%.1f tokens/s), memory %s MB, context %d/%d%s",
                 stats.prompt_tokens, stats.prefill_ms, stats.generated_tokens,
                 stats.generate_ms, rate,
                 f"{perf['memory_mb']:.0f}" if "memory_mb" in perf else "?",
                 self._tokens_used, self._llm.max_context_len, " (aborted)" if aborted else "")
        return stats

    def _write_cache_key(self) -> None:
        keyfile = self._cache.with_name(self._cache.name + ".key")
        try:
            keyfile.write_text(self._cache_key + "\n", encoding="ascii")
            self._save_cache = False
            log.info("rkllm prompt cache saved to %s", self._cache)
        except OSError as e:
            log.warning("cannot write %s (%s); the prompt cache will be saved again", keyfile, e)

    def _refresh_tokens(self, after_turn: Optional[tuple[_Turn, bool]] = None) -> None:
        """Tokens in the KV cache: asked from the runtime, else followed from perf stats."""
        sizes = (c_int * 8)()  # one per batch; n_batch is 1
        if self._lib.rkllm_get_kv_cache_size(c_void_p(self._handle), sizes) == 0:
            self._tokens_used = int(sizes[0])
        elif after_turn is not None:
            turn, keep = after_turn
            perf = turn.perf or {}
            if keep:
                self._tokens_used += perf.get("prefill_tokens", 0) + perf.get(
                    "generate_tokens", turn.pieces)
            else:
                self._tokens_used = self._system_estimate

    # ------------------------------------------------------------------ control

    def abort(self) -> None:
        """End the running turn within a token (any thread; no-op when idle)."""
        with self._state_lock:
            self._abort.set()
            # Only while rkllm_run runs: the handle is alive, and the runtime has a task.
            if self._turn is not None and self._handle is not None:
                self._lib.rkllm_abort(c_void_p(self._handle))
                log.info("rkllm turn aborted")

    def clear(self) -> None:
        """Forget the conversation; the system prompt stays in the KV cache."""
        with self._lock:
            if self._handle is None:
                return
            ret = self._lib.rkllm_clear_kv_cache(c_void_p(self._handle), 1, None, None)
            if ret != 0:
                raise BackendError(f"rkllm_clear_kv_cache failed (code {ret}): the runtime "
                                   f"log above says why")
            self._pending = ""
            self._early = None
            self._refresh_tokens()
            self._system_kv = self._tokens_used
            log.info("rkllm conversation cleared (%d tokens kept)", self._tokens_used)

    def set_persona(self, persona: PersonaConfig) -> None:
        """A new system prompt (SIGHUP): ``rkllm_set_chat_template`` again, which empties the
        KV cache; the conversation is forgotten. The prompt cache follows the new prompt."""
        with self._lock:
            self._system = self.family.system_prompt(persona.prompt)
            self._system_estimate = self.count_tokens(self._system)
            if self._handle is None:
                return
            ret = self._lib.rkllm_set_chat_template(c_void_p(self._handle), self._system.encode(),
                                                    self.family.prompt_prefix.encode(),
                                                    self.family.prompt_postfix.encode())
            if ret != 0:
                raise BackendError(f"rkllm_set_chat_template failed (code {ret}): the runtime "
                                   f"log above says why")
            self._pending = ""
            self._save_cache = False
            if self._cache is not None:
                self._open_prompt_cache(self._model_path(), self.runtime_version or "")
            self._early = None
            self._refresh_tokens()
            self._system_kv = self._tokens_used
            log.info("rkllm system prompt replaced (%d characters); the conversation starts "
                     "afresh", len(self._system))

    @property
    def context_size(self) -> int:
        return self._llm.max_context_len

    @property
    def tokens_used(self) -> int:
        # Fed-back exchanges count from the moment they are set: the budget must see them.
        return self._tokens_used + (self.count_tokens(self._pending) if self._pending else 0)

    def _release(self) -> None:
        with self._state_lock:
            finalizer, self._finalizer = self._finalizer, None
            self._handle = None
        if finalizer is not None:
            finalizer()

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Abort a running turn, then destroy the handle (idempotent). A runtime that does
        not return from rkllm_run within ``wait_s`` keeps its handle: destroying it under a
        running call would crash, so it is left to the process's exit."""
        with self._state_lock:
            self._closing = True
        self.abort()
        if not self._lock.acquire(timeout=wait_s):
            log.warning("rkllm: the runtime still runs %.0f s after the abort; the model is "
                        "left to the process's exit", wait_s)
            return
        try:
            if self._handle is not None:
                self._release()
                log.info("rkllm model released")
        finally:
            self._lock.release()
