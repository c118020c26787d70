"""One GGUF language model and its llama context, through llama.cpp's C API (ctypes).

Thin and synchronous: tokenise, evaluate tokens or embedding rows at given positions, sample,
drop the cache from a position on. It keeps no conversation state; ``llamacpp.py`` does.
Used from one thread at a time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from assistant.errors import BackendError, ContextFullError
from assistant.llm import llamacpp_native as native

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# llama_token_attr (llama.h): what llama_tokenize matches as a special token, and the
# attributes that make it swallow neighbouring whitespace.
_SPECIAL_ATTRS = (1 << 0) | (1 << 3) | (1 << 4)     # UNKNOWN | CONTROL | USER_DEFINED
_LSTRIP, _RSTRIP = 1 << 7, 1 << 8
_CACHED_CHARS, _CACHE_ENTRIES = 48, 4096


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_k: int
    top_p: float
    repeat_penalty: float
    seed: int
    penalty_last_n: int = 64


class Aborted(Exception):
    """The turn was aborted between two native calls (internal to the backend)."""


def check_gguf(path: Path, what: str) -> None:
    """Raise BackendError unless ``path`` starts like a GGUF file (cheap, before native code)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise BackendError(f"cannot read the {what} {path}: {e.strerror}") from None
    if head != GGUF_MAGIC:
        raise BackendError(f"the {what} {path} is not a GGUF file (it starts with {head!r}); "
                           "download it again or point the config at the right file")


class LlamaRuntime:
    """A loaded model with one context (sequence 0) and a reusable batch."""

    def __init__(self, model_path: Path, n_ctx: int, n_batch: int, n_threads: int):
        self._l, _ = native.bindings()
        L = self._l
        self.path = Path(model_path)
        check_gguf(self.path, "language model")
        threads = n_threads or os.cpu_count() or 1
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = 0
        native.forget_native_errors()
        model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise BackendError(f"llama.cpp cannot load the language model {self.path}"
                               f"{native.native_reason()}; the file may be incomplete or for "
                               "an architecture this llama.cpp does not know")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = False
        ctx = L.llama_init_from_model(model, cparams)
        if not ctx:
            L.llama_model_free(model)
            raise BackendError(f"llama.cpp cannot create a {n_ctx}-token context for "
                               f"{self.path}{native.native_reason()}; try a smaller "
                               "llm.max_context_len")
        self.model, self.ctx = model, ctx
        self.vocab = L.llama_model_get_vocab(model)
        self.mem = L.llama_get_memory(ctx)
        self.n_ctx = int(L.llama_n_ctx(ctx))
        self.n_batch = n_batch
        self.n_embd_inp = int(L.llama_model_n_embd_inp(model))
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(L.llama_vocab_bos(self.vocab))
        self.eos = int(L.llama_vocab_eos(self.vocab))
        self._batch = L.llama_batch_init(n_batch, 0, 1)
        self._embd_batch: Any = None
        self._piece_buf = ctypes.create_string_buffer(256)
        self._special: dict[int, bool] = {}
        self._tok_cache: dict[tuple[str, bool], tuple[int, ...]] = {}
        self.tokenize_calls = 0     # native tokenisations (for tests of the cost)
        self._max_token_bytes: Optional[int] = None
        self._sampler: Optional[int] = None
        self.evaluated = 0      # tokens and embedding rows passed to llama_decode, all time
        self._closed = False
        self._finalizer = weakref.finalize(self, _free_all, L, model, ctx, self._batch)

    # ------------------------------------------------------------------ vocabulary

    def chat_template(self) -> Optional[str]:
        raw = self._l.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def token_text(self, token: int) -> str:
        raw = self._l.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def tokenize(self, text: str, parse_special: bool = True) -> list[int]:
        # Template markup repeats every message, and each call has a fixed native cost:
        # short texts are remembered.
        short = len(text) <= _CACHED_CHARS
        if short:
            got = self._tok_cache.get((text, parse_special))
            if got is not None:
                return list(got)
        tokens = self._tokenize(text, parse_special)
        if short:
            if len(self._tok_cache) >= _CACHE_ENTRIES:
                self._tok_cache.clear()
            self._tok_cache[(text, parse_special)] = tuple(tokens)
        return tokens

    def _tokenize(self, text: str, parse_special: bool) -> list[int]:
        self.tokenize_calls += 1
        data = text.encode("utf-8", "replace")     # a lone surrogate is not UTF-8
        cap = len(data) + 8
        buf = (self._l.llama_token * cap)()
        n = self._l.llama_tokenize(self.vocab, data, len(data), buf, cap, False, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (self._l.llama_token * cap)()
            n = self._l.llama_tokenize(self.vocab, data, len(data), buf, cap, False, parse_special)
            if n < 0:
                raise BackendError(f"llama.cpp could not tokenise {len(data)} bytes of text")
        return list(buf[:n])

    def is_special(self, token: int) -> bool:
        """A control, user-defined or unknown token: what parse_special would match."""
        got = self._special.get(token)
        if got is None:
            attr = int(self._l.llama_vocab_get_attr(self.vocab, token))
            got = self._special[token] = bool(attr & _SPECIAL_ATTRS)
        return got

    def special_text(self, token: int) -> tuple[str, bool, bool]:
        """(spelling, eats whitespace before it, eats whitespace after it) of a token."""
        attr = int(self._l.llama_vocab_get_attr(self.vocab, token))
        return self.token_text(token), bool(attr & _LSTRIP), bool(attr & _RSTRIP)

    @property
    def max_token_bytes(self) -> int:
        """An upper bound on the bytes of text one token stands for (its spelling's length
        in the vocabulary, which is never shorter); read once, when first needed."""
        if self._max_token_bytes is None:
            get = self._l.llama_vocab_get_text
            self._max_token_bytes = max(
                (len(get(self.vocab, t) or b"") for t in range(self.n_vocab)), default=1) or 1
        return self._max_token_bytes

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (control tokens give b'')."""
        n = self._l.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._l.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(self._l.llama_vocab_is_eog(self.vocab, token))

    # ------------------------------------------------------------------ evaluation

    def eval_tokens(self, tokens: list[int], n_past: int, logits_last: bool,
                    abort: Optional[threading.Event] = None) -> int:
        """Evaluate tokens at positions n_past...; returns the new n_past.

        Checks ``abort`` between batches (raises Aborted). On failure the caller rolls the
        cache back; ContextFullError when llama.cpp finds no room.
        """
        b = self._batch
        i = 0
        while i < len(tokens):
            if abort is not None and abort.is_set():
                raise Aborted()
            n = min(self.n_batch, len(tokens) - i)
            for k in range(n):
                b.token[k] = tokens[i + k]
                b.pos[k] = n_past + k
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = 0
                b.logits[k] = 0
            if logits_last and i + n == len(tokens):
                b.logits[n - 1] = 1
            b.n_tokens = n
            self._decode(b, n)
            n_past += n
            i += n
        return n_past

    def eval_one(self, token: int, n_past: int) -> None:
        """Evaluate one generated token at n_past (logits on)."""
        b = self._batch
        b.token[0] = token
        b.pos[0] = n_past
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = 0
        b.logits[0] = 1
        b.n_tokens = 1
        self._decode(b, 1)

    def eval_embeddings(self, rows: np.ndarray, n_past: int, logits_last: bool,
                        abort: Optional[threading.Event] = None) -> int:
        """Evaluate raw embedding rows (n, n_embd_inp) at sequential positions."""
        rows = np.ascontiguousarray(rows, np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd_inp:
            raise BackendError(f"an image embedding of shape {rows.shape} does not fit this model, "
                               f"which takes rows of {self.n_embd_inp} values: the vision encoder "
                               "and the language model do not belong together")
        if self._embd_batch is None:
            self._embd_batch = self._l.llama_batch_init(self.n_batch, self.n_embd_inp, 1)
            weakref.finalize(self, self._l.llama_batch_free, self._embd_batch)
        b = self._embd_batch
        i = 0
        while i < len(rows):
            if abort is not None and abort.is_set():
                raise Aborted()
            n = min(self.n_batch, len(rows) - i)
            ctypes.memmove(b.embd, rows[i:i + n].ctypes.data, n * self.n_embd_inp * 4)
            for k in range(n):
                b.pos[k] = n_past + k
                b.n_seq_id[k] = 1
                b.seq_id[k][0] = 0
                b.logits[k] = 1 if (logits_last and i + k == len(rows) - 1) else 0
            b.n_tokens = n
            self._decode(b, n)
            n_past += n
            i += n
        return n_past

    def _decode(self, batch: Any, n: int) -> None:
        native.forget_native_errors()
        rc = self._l.llama_decode(self.ctx, batch)
        if rc == 0:
            self.evaluated += n
            return
        if rc == 1:
            raise ContextFullError(
                f"the conversation does not fit in the {self.n_ctx}-token context; clear it "
                "(llm.on_context_full: clear) or raise llm.max_context_len")
        raise BackendError(f"llama_decode failed with code {rc}{native.native_reason()}")

    def note_evaluated(self, n: int) -> None:
        """Count rows evaluated by a helper outside this class (mtmd image decode)."""
        self.evaluated += n

    # ------------------------------------------------------------------ cache

    def remove_from(self, pos: int) -> None:
        """Forget every cached position >= pos."""
        if not self._l.llama_memory_seq_rm(self.mem, 0, pos, -1):
            # Only recurrent models refuse a partial removal; start over then.
            self._l.llama_memory_clear(self.mem, True)
            if pos > 0:
                raise BackendError("this model's cache cannot be cut back; the history was cleared")

    def clear(self) -> None:
        self._l.llama_memory_clear(self.mem, True)

    # ------------------------------------------------------------------ sampling

    def set_sampling(self, p: SamplingParams) -> None:
        L = self._l
        if self._sampler is not None:
            L.llama_sampler_free(self._sampler)
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if p.repeat_penalty != 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
                self.n_vocab, p.penalty_last_n, p.repeat_penalty, 0.0, 0.0))
        if p.temperature <= 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(p.top_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(p.temperature))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(p.seed))
        self._sampler = chain

    def reset_sampler(self) -> None:
        """Forget penalties and rewind the RNG to the seed (each turn is reproducible)."""
        if self._sampler is not None:
            self._l.llama_sampler_reset(self._sampler)

    def sample(self) -> int:
        """Sample (and accept) the next token from the last evaluated logits."""
        return int(self._l.llama_sampler_sample(self._sampler, self.ctx, -1))

    def perf_counts(self) -> tuple[int, int]:
        """llama.cpp's own (prompt tokens evaluated, single tokens evaluated) counters."""
        d = self._l.llama_perf_context(self.ctx)
        return int(d.n_p_eval), int(d.n_eval)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sampler is not None:
            self._l.llama_sampler_free(self._sampler)
            self._sampler = None
        self._finalizer()


def _free_all(L: Any, model: int, ctx: int, batch: Any) -> None:
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
