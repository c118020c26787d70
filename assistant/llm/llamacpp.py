"""The portable LLM backend: a GGUF vision-language model on the CPU through llama.cpp.

``LlamaCppBackend`` runs turns with the conversation kept in llama.cpp's KV cache: the
system prompt is evaluated once at load, and each turn evaluates only what it adds (its
question, its image, the template's markup); the answer's tokens are already in the cache
because they were generated there. ``LlamaCppEncoder`` encodes a camera frame with the
model's multimodal projector (mtmd) as a separate, earlier call; the turn later feeds the
embedding without running the vision encoder again: the same shape as the board's NPU
encoder -> embedding -> RKLLM path.

Threads: ``run_turn``, ``clear``, ``load`` and ``close`` serialise on one lock (they own the
llama context). ``encode`` uses only the projector and its own lock, so it can run in
another worker thread while a turn generates; it waits only while a turn decodes an image.
``abort`` is lock-free and may be called from any thread.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from assistant.config import Config, LlmConfig, PersonaConfig
from assistant.errors import BackendError, ContextFullError, ModelMissingError
from assistant.llm.base import (CLOSE_WAIT_S, Exchange, ImageEmbedding, LLMBackend,
                                TurnOptions, TurnStats)
from assistant.llm.llamacpp_chat import ChatFormat, TemplateProblem, TurnText, clean
from assistant.llm.llamacpp_mtmd import EncodedImage, ImagePart, Projector
from assistant.llm.llamacpp_runtime import Aborted, LlamaRuntime, SamplingParams
from assistant.llm.llamacpp_text import spans, strip_marks, tokenize_spans
from assistant.vision.base import VisionEncoder

log = logging.getLogger(__name__)

# What a turn can carry as its image: a frame to encode now, or an earlier encoding.
ImageInput = Union[None, np.ndarray, ImageEmbedding]
# One unit of evaluation: text tokens, an mtmd-encoded image, or raw embedding rows.
Segment = Union[list[int], EncodedImage, np.ndarray]


@dataclass
class _Spec:
    """The opening of the next user turn (with its image), evaluated ahead of its question."""

    mark: "_Mark"        # the conversation before it
    segs: list           # the segments evaluated ahead, ending with the image
    cells: int


@dataclass
class _Mark:
    """A state of the conversation: the cache's extent and what produced it."""

    n_past: int
    n_cells: int
    segments: list
    kv_text: str
    messages: list
    images: list


class LlamaCppBackend(LLMBackend):
    """A GGUF model (and optional mmproj) with the conversation kept in the KV cache."""

    name = "llamacpp"

    def __init__(self, llm: LlmConfig, persona: PersonaConfig, model_path: Path,
                 mmproj_path: Optional[Path] = None):
        self._cfg = llm
        self._persona = persona
        self.answer_reserve = llm.max_new_tokens
        self.model_path = Path(model_path)
        self.mmproj_path = Path(mmproj_path) if mmproj_path else None
        self._lock = threading.RLock()
        self._abort = threading.Event()
        self._closing = threading.Event()      # close() was called: stop, start nothing
        self._rt: Optional[LlamaRuntime] = None
        self._proj: Optional[Projector] = None
        self._chat: Optional[ChatFormat] = None
        self._encoder: Optional[LlamaCppEncoder] = None
        # The conversation, as messages (for the template) and as what the cache holds.
        self._messages: list[dict] = []
        self._images: list[Segment] = []       # one per media marker in _messages, in order
        self._segments: list[Segment] = []     # everything evaluated, in order (for replay)
        self._kv_text = ""
        self._n_past = 0                       # next position
        self._n_cells = 0                      # KV cells in use
        self._sys_mark: Optional[_Mark] = None
        self._spec: Optional[_Spec] = None     # a speculative image prefill, if any
        self._markup_cells: Optional[int] = None   # special tokens of one exchange's markup

    @classmethod
    def from_config(cls, cfg: Config) -> "LlamaCppBackend":
        """Resolve the configured model (catalogue name or path) and build the backend."""
        from assistant.llm import catalog

        want_mmproj = cfg.vision.encoder == "llamacpp"
        model, mmproj = catalog.resolve(cfg.llm.llamacpp, cfg.path, want_mmproj=want_mmproj)
        return cls(cfg.llm, cfg.persona, model, mmproj)

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Load the model (and projector) and evaluate the system prompt. Idempotent."""
        with self._lock:
            if self._rt is not None:
                return
            self._closing.clear()
            for path, key in ((self.model_path, "llm.llamacpp.model"),
                              (self.mmproj_path, "llm.llamacpp.mmproj")):
                if path is not None and not path.is_file():
                    raise ModelMissingError(f"{key}: file not found: {path}")
            lc = self._cfg.llamacpp
            t0 = time.perf_counter()
            rt = LlamaRuntime(self.model_path, self._cfg.max_context_len, lc.n_batch, lc.n_threads)
            try:
                if self.mmproj_path is not None:
                    self._proj = Projector(self.mmproj_path, rt.model, rt_threads(lc.n_threads))
                self._chat = ChatFormat(rt.chat_template(), rt.token_text(rt.bos),
                                        rt.token_text(rt.eos))
                rt.set_sampling(SamplingParams(self._cfg.temperature, self._cfg.top_k,
                                               self._cfg.top_p, self._cfg.repeat_penalty, lc.seed))
                self._rt = rt
                self._start_conversation()
            except BaseException:
                self._rt = None
                if self._proj is not None:
                    self._proj.close()
                    self._proj = None
                rt.close()
                raise
            log.info("llama.cpp model %s loaded in %.0f ms (context %d, template %s, system "
                     "prompt %d tokens%s)", self.model_path.name, (time.perf_counter() - t0) * 1e3,
                     rt.n_ctx, self._chat.source, self._n_cells,
                     f", projector {self.mmproj_path.name}" if self._proj else "")

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Stop a running turn, then free the model. A native call that does not return
        within ``wait_s`` keeps the model: it is left to the process's exit, never freed
        under a running call (and the caller is not held up)."""
        self._closing.set()
        self._abort.set()
        if not self._lock.acquire(timeout=wait_s):
            log.warning("llama.cpp: a model call still runs %.0f s after the abort; the model "
                        "is left to the process's exit", wait_s)
            return
        try:
            if self._proj is not None:
                self._proj.close()   # before the model it refers to
                self._proj = None
            if self._rt is not None:
                self._rt.close()
                self._rt = None
        finally:
            self._lock.release()

    def encoder(self) -> "LlamaCppEncoder":
        """The VisionEncoder that shares this backend's projector."""
        if self._encoder is None:
            self._encoder = LlamaCppEncoder(self)
        return self._encoder

    # ------------------------------------------------------------------ facts

    @property
    def context_size(self) -> int:
        return self._rt.n_ctx if self._rt else self._cfg.max_context_len

    @property
    def tokens_used(self) -> int:
        # A speculative prefill is not the conversation's yet: a turn that does not use it
        # cuts it away.
        return self._n_cells - (self._spec.cells if self._spec is not None else 0)

    @property
    def has_vision(self) -> bool:
        return self._proj is not None

    @property
    def evaluated_tokens(self) -> int:
        """Tokens and image rows llama.cpp has evaluated since load (for tests and benchmarks)."""
        return self._rt.evaluated if self._rt else 0

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes with this model's tokenizer."""
        rt = self._require()
        return len(rt.tokenize(clean(text), parse_special=False))

    def turn_cost(self, text: str, image: ImageInput = None) -> int:
        """KV cells the next turn would need: question, template, image, answer reserve.
        A question that cannot fit is not tokenised: a lower bound past the context."""
        with self._lock:
            rt = self._require()
            least = self._least_text_cells(text)
            if least > rt.n_ctx:
                return least + self._cfg.max_new_tokens
            _, segs, _ = self._plan(text, self._image_segment(image, encode=False))
            return _cells(segs) + self._cfg.max_new_tokens

    def history_cost(self, exchanges: Sequence[Exchange]) -> int:
        """KV cells these exchanges take as text, rendered with the model's template.

        Exact whenever they could fit in the context; a history that cannot is not
        tokenised, and the cheap lower bound (already past the context) is returned."""
        if not exchanges:
            return 0
        with self._lock:
            rt = self._require()
            least = self._least_history_cells(exchanges)
            if least > rt.n_ctx:
                return least
            _, tokens = self._history_tokens(exchanges)
            return len(tokens)

    def _least_history_cells(self, exchanges: Sequence[Exchange]) -> int:
        """A lower bound on the cells of ``exchanges``, in time linear in their length and
        without tokenising: the template's special tokens per exchange, plus the text's
        bytes over the most bytes one token can stand for."""
        rt = self._rt
        text_bytes = sum(len(q.encode("utf-8", "replace")) +
                         len((a or "").encode("utf-8", "replace")) for q, a in exchanges)
        if self._markup_cells is None:
            def specials(pair: Exchange) -> int:
                _, tokens = self._history_tokens([pair])
                return sum(1 for t in tokens if rt.is_special(t))
            self._markup_cells = min(specials(("x", "y")), specials(("What is it? " * 4, "z")))
        return len(exchanges) * self._markup_cells + self._least_bytes_cells(text_bytes)

    def _least_text_cells(self, text: str) -> int:
        return self._least_bytes_cells(len(text.encode("utf-8", "replace")))

    def _least_bytes_cells(self, n: int) -> int:
        """A lower bound on the tokens of n bytes of text (0 for text that may fit anyway:
        reading the vocabulary once is worth it only past the context)."""
        return n // self._rt.max_token_bytes if n > self._rt.n_ctx else 0

    # ------------------------------------------------------------------ encoding

    def encode_image(self, rgb: np.ndarray) -> ImageEmbedding:
        """Encode a frame with the projector, ready for a later turn. Blocking."""
        proj = self._proj
        if proj is None:
            self._require()
            raise BackendError("this model was loaded without a multimodal projector "
                               "(llm.llamacpp.mmproj), so it cannot see images")
        t0 = time.perf_counter()
        enc = proj.encode(rgb)
        log.debug("image %dx%d encoded to %d tokens in %.0f ms", enc.width, enc.height,
                  enc.embeddings.shape[0], (time.perf_counter() - t0) * 1e3)
        return ImageEmbedding(enc.embeddings, enc.width, enc.height, native=enc)

    # ------------------------------------------------------------------ turns

    def abort(self) -> None:
        self._abort.set()

    def clear(self) -> None:
        """Forget the conversation; the system prompt stays evaluated in the cache."""
        with self._lock:
            if self._rt is not None and self._sys_mark is not None:
                self._restore(self._sys_mark)

    def set_persona(self, persona: PersonaConfig) -> None:
        """A new system prompt (SIGHUP): evaluated into an emptied cache; the conversation
        is forgotten."""
        with self._lock:
            self._persona = persona
            if self._rt is not None:
                self._start_conversation()
                log.info("llama.cpp system prompt replaced (%d tokens); the conversation "
                         "starts afresh", self._n_cells)

    def prefill(self, image: ImageEmbedding) -> bool:
        """Evaluate the opening of the next user turn with ``image`` now, while the person
        is still talking; the turn that asks about this image then evaluates only its
        question. Any other turn, clear or history change cuts it away. False when it
        cannot be done (a template that re-renders the past, no room)."""
        with self._lock:
            self._require()
            self.cancel_prefill()
            img = self._image_segment(image, encode=False)
            tt, segs, _ = self._plan("", img)
            at = next((i for i, seg in enumerate(segs) if seg is img), None)
            if tt.replay or at is None:
                return False
            head = segs[:at + 1]
            cells = _cells(head)
            if self._n_cells + cells + self._cfg.max_new_tokens > self._rt.n_ctx:
                return False
            mark = self._mark()
            self._abort.clear()
            try:
                self._eval_segments(head)
            except Aborted:
                self._cut_cache(mark)
                return False
            except BackendError:
                self._cut_cache(mark)
                raise
            self._spec = _Spec(mark, head, cells)
            return True

    def cancel_prefill(self) -> None:
        """Cut a speculative prefill away (noise, a clear, another scene)."""
        with self._lock:
            if self._spec is not None:
                self._cut_cache(self._spec.mark)

    def load_history(self, exchanges: Sequence[Exchange]) -> None:
        """Cut the cache back to the system prompt and evaluate ``exchanges`` as text."""
        with self._lock:
            self._require()
            self._restore(self._sys_mark)
            if not exchanges:
                return
            self._check_history(len(exchanges), self._least_history_cells(exchanges), True)
            msgs, tokens = self._history_tokens(exchanges)
            self._check_history(len(exchanges), len(tokens), False)
            try:
                self._eval_segments([tokens], abortable=False)
            except Aborted:
                self._cut_cache(self._sys_mark)
                self._check_open()
                raise
            self._segments.append(tokens)
            self._messages = msgs
            self._kv_text = self._chat.render(msgs, add_generation_prompt=False)

    def _check_history(self, n: int, cells: int, at_least: bool) -> None:
        room = self._rt.n_ctx - self._sys_mark.n_cells - self._cfg.max_new_tokens
        if cells > room:
            raise ContextFullError(
                f"the conversation to feed back ({n} exchanges, {'at least ' if at_least else ''}"
                f"{cells} tokens) does not fit: the {self._rt.n_ctx}-token context has room for "
                f"{max(room, 0)} beside the system prompt and the answer's reserve; send fewer "
                "or shorter messages, or raise llm.max_context_len")

    def _history_tokens(self, exchanges: Sequence[Exchange]) -> tuple[list, list[int]]:
        """(messages, tokens after the system prompt) of the exchanges as text."""
        msgs = list(self._sys_mark.messages)
        for q, a in exchanges:
            msgs += [self._chat.message("user", clean(q)),
                     self._chat.message("assistant", (a or "").strip())]
        try:
            marked = self._chat.render_marked(msgs, add_generation_prompt=False)
        except TemplateProblem as e:
            raise BackendError(f"the model's chat template failed: {e}") from None
        base = self._sys_mark.kv_text
        if not strip_marks(marked).startswith(base):
            raise BackendError("the chat template does not render the history after the "
                               "system prompt; the history cannot be fed back")
        tokens = tokenize_spans(self._rt, spans(marked, len(base)))
        if self._sys_mark.n_cells == 0:
            tokens = self._with_bos(tokens)
        return msgs, tokens

    def run_turn(self, text: str, image: ImageInput, keep_history: bool,
                 on_piece: Callable[[str], None],
                 options: Optional[TurnOptions] = None) -> TurnStats:
        with self._lock:
            self._require()
            # An abort() from before this turn started belongs to an earlier turn; a close
            # does not (it sets _closing first).
            self._abort.clear()
            self._check_open()
            if not keep_history:
                self._restore(self._sys_mark)
            t0 = time.perf_counter()
            max_new = (options.max_new_tokens if options and options.max_new_tokens
                       else self._cfg.max_new_tokens)
            least = self._least_text_cells(text)
            if least > self._rt.n_ctx:
                raise ContextFullError(
                    f"the question is too long: at least {least} tokens, and the context holds "
                    f"{self._rt.n_ctx}; ask a shorter question or raise llm.max_context_len")
            img = self._image_segment(image, encode=True)
            tt, segs, images = self._plan(text, img)
            replay = tt.replay
            need = _cells(segs)
            ahead = self._take_spec(segs, replay)
            mark = ahead[0] if ahead else self._mark()
            base_cells = self._sys_mark.n_cells if replay else mark.n_cells
            self._check_fits(base_cells, need, max_new)
            stats = TurnStats()
            if ahead:
                stats.extra["prefilled_ahead"] = ahead[1]
            sampling = self._sampling(options)
            try:
                if sampling is not None:
                    self._rt.set_sampling(sampling)
                if replay:
                    log.info("chat template did not extend the cached conversation; "
                             "re-evaluating it")
                    self._cut_cache(self._sys_mark)
                self._eval_segments(segs[len(ahead[2]):] if ahead else segs)
                stats.prompt_tokens = need
                t1 = time.perf_counter()
                stats.prefill_ms = (t1 - t0) * 1e3
                answer, generated, ttft = self._generate(on_piece, stats, max_new)
                stats.generate_ms = (time.perf_counter() - t1) * 1e3
                stats.extra["ttft_ms"] = None if ttft is None else (ttft - t0) * 1e3
            except Aborted:
                self._rollback(mark)
                stats.aborted = True
                stats.context_used = self._n_cells
                return stats
            except BackendError:
                self._rollback(mark)
                raise
            finally:
                if sampling is not None:
                    self._rt.set_sampling(self._sampling(None, configured=True))
            self._messages = tt.messages + [self._chat.answer_message(tt, answer)]
            self._images = images
            self._segments.extend(segs)
            self._segments.append(generated)
            self._kv_text = tt.prompt + answer
            stats.context_used = self._n_cells
            stats.extra["replayed"] = replay
            return stats

    # ------------------------------------------------------------------ internals

    def _take_spec(self, segs: list, replay: bool) -> Optional[tuple]:
        """(mark before it, its cells, its segments) when the turn begins with the
        speculative prefill; otherwise the prefill is cut away and None returned."""
        spec = self._spec
        if spec is None:
            return None
        k = len(spec.segs)
        if not replay and len(segs) > k and all(
                a == b if isinstance(a, list) and isinstance(b, list) else a is b
                for a, b in zip(segs, spec.segs)):
            self._spec = None
            return spec.mark, spec.cells, spec.segs
        self._cut_cache(spec.mark)
        return None

    def _sampling(self, options: Optional[TurnOptions],
                  configured: bool = False) -> Optional[SamplingParams]:
        """The sampler for a turn's options; None when they change nothing."""
        c, lc = self._cfg, self._cfg.llamacpp
        if not configured and (options is None or (options.temperature is None and
                                                   options.top_p is None and options.seed is None)):
            return None
        o = options or TurnOptions()
        return SamplingParams(c.temperature if o.temperature is None else o.temperature,
                              c.top_k, c.top_p if o.top_p is None else o.top_p,
                              c.repeat_penalty, lc.seed if o.seed is None else o.seed)

    def _check_open(self) -> None:
        if self._closing.is_set():
            raise BackendError("the llama.cpp backend is closing")

    def _require(self) -> LlamaRuntime:
        if self._rt is None:
            raise BackendError("the llama.cpp backend is not loaded (call load() first)")
        return self._rt

    def _start_conversation(self) -> None:
        """Evaluate the system prompt into an empty cache and remember that state."""
        rt, chat = self._rt, self._chat
        prompt = self._persona.prompt.strip()
        system = chat.message("system", prompt) if prompt else None
        self._messages = [system] if system else []
        sys_text = chat.system_prefix(system)
        self._images, self._segments = [], []
        self._n_past = self._n_cells = 0
        self._kv_text = ""
        self._spec = None
        rt.clear()
        if sys_text:
            tokens = self._with_bos(rt.tokenize(sys_text))
            self._n_past = rt.eval_tokens(tokens, 0, logits_last=False)
            self._n_cells = len(tokens)
            self._segments.append(tokens)
        self._kv_text = sys_text
        self._sys_mark = self._mark()

    def _with_bos(self, tokens: list[int]) -> list[int]:
        rt = self._rt
        if rt.add_bos and (not tokens or tokens[0] != rt.bos):
            return [rt.bos] + tokens
        return tokens

    def _image_segment(self, image: ImageInput, encode: bool) -> Optional[Segment]:
        """The image as something _eval_segments can feed."""
        if image is None:
            return None
        if isinstance(image, np.ndarray):
            if not encode:
                raise BackendError("turn_cost needs an encoded image (ImageEmbedding)")
            image = self.encode_image(image)
        if not isinstance(image, ImageEmbedding):
            raise BackendError(f"a turn's image must be an RGB frame or an ImageEmbedding, "
                               f"not {type(image).__name__}")
        enc = image.native
        if isinstance(enc, EncodedImage) and self._proj is not None and enc.owner is self._proj.token:
            # The floats may have been replaced (or copied): feed those, with the same layout.
            return enc if image.data is enc.embeddings else enc.with_embeddings(image.data)
        if self._proj is not None and self._proj.uses_mrope:
            log.warning("feeding an embedding from another encoder to an M-RoPE model: "
                        "positions are approximated")
        return np.ascontiguousarray(image.data, np.float32)

    def _plan(self, text: str, img: Optional[Segment]) -> tuple[TurnText, list[Segment], list]:
        """The turn's text, the segments to evaluate, and the images of the new history."""
        rt = self._rt
        try:
            tt = self._chat.plan(self._messages, text, img is not None, self._kv_text,
                                 self._sys_mark.kv_text)
        except TemplateProblem as e:
            raise BackendError(f"the model's chat template failed: {e}") from None
        images = self._images + ([img] if img is not None else [])
        # The last len(texts) - 1 images go between the text pieces (all of them on replay).
        used = images[len(images) - (len(tt.texts) - 1):] if len(tt.texts) > 1 else []
        at_start = (self._sys_mark.n_cells if tt.replay else self.tokens_used) == 0
        segs: list[Segment] = []
        for i, piece in enumerate(tt.texts):
            tokens = tokenize_spans(rt, piece) if piece else []
            if i == 0 and at_start:
                tokens = self._with_bos(tokens)
            if tokens:
                segs.append(tokens)
            if i < len(used):
                segs.append(used[i])
        if not segs or not isinstance(segs[-1], list):
            raise BackendError("the chat template puts no text after the image")
        return tt, segs, images

    def _check_fits(self, base_cells: int, need: int, reserve: Optional[int] = None) -> None:
        n_ctx = self._rt.n_ctx
        reserve = self._cfg.max_new_tokens if reserve is None else reserve
        if base_cells + need + reserve <= n_ctx:
            return
        sys_cells = self._sys_mark.n_cells
        if sys_cells + need + reserve > n_ctx:
            raise ContextFullError(
                f"this turn needs {need} tokens plus {reserve} for the answer, but the "
                f"{n_ctx}-token context holds only {n_ctx - sys_cells} after the system "
                "prompt even when empty; raise llm.max_context_len or lower llm.max_new_tokens")
        raise ContextFullError(
            f"the conversation is full: {base_cells} of {n_ctx} tokens used, this turn needs "
            f"{need} plus {reserve} for the answer; clear the history "
            "(llm.on_context_full: clear does this) or raise llm.max_context_len")

    def _eval_segments(self, segs: list[Segment], abortable: bool = True) -> None:
        rt = self._rt
        # Not abortable: a barge-in cannot cut it short; closing still does.
        abort = self._abort if abortable else self._closing
        for i, seg in enumerate(segs):
            last = i == len(segs) - 1
            if isinstance(seg, list):
                self._n_past = rt.eval_tokens(seg, self._n_past, last, abort)
                self._n_cells += len(seg)
            elif isinstance(seg, EncodedImage):
                for part in seg.parts:
                    if abort is not None and abort.is_set():
                        raise Aborted()
                    if isinstance(part, list):
                        self._n_past = rt.eval_tokens(part, self._n_past, False, abort)
                        self._n_cells += len(part)
                    else:
                        self._decode_image_part(part, seg.embeddings)
            else:
                self._n_past = rt.eval_embeddings(seg, self._n_past, last, abort)
                self._n_cells += len(seg)

    def _decode_image_part(self, part: ImagePart, embeddings: np.ndarray) -> None:
        if self._proj is None:
            raise BackendError("an mtmd image embedding needs the projector that made it")
        self._n_past = self._proj.decode_part(self._rt.ctx, part, embeddings, self._n_past,
                                              self._cfg.llamacpp.n_batch)
        self._n_cells += part.n_tokens
        self._rt.note_evaluated(part.n_tokens)

    def _generate(self, on_piece: Callable[[str], None], stats: TurnStats, max_new: int):
        """Sample until end of turn, max_new tokens or abort; returns (text, tokens, t_first)."""
        rt = self._rt
        rt.reset_sampler()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        tokens: list[int] = []
        t_first: Optional[float] = None
        stats.extra["finish"] = "length"
        for _ in range(max_new):
            if self._abort.is_set():
                stats.aborted = True
                stats.extra["finish"] = "aborted"
                break
            tok = rt.sample()
            if rt.is_eog(tok):
                stats.extra["finish"] = "stop"
                break
            try:
                rt.eval_one(tok, self._n_past)
            except ContextFullError:
                stats.extra["context_full"] = True
                break
            self._n_past += 1
            self._n_cells += 1
            tokens.append(tok)
            piece = decoder.decode(rt.piece(tok))
            if piece:
                if t_first is None:
                    t_first = time.perf_counter()
                pieces.append(piece)
                on_piece(piece)
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            on_piece(tail)
        stats.generated_tokens = len(tokens)
        return "".join(pieces), tokens, t_first

    def _mark(self) -> _Mark:
        return _Mark(self._n_past, self._n_cells, list(self._segments), self._kv_text,
                     list(self._messages), list(self._images))

    def _cut_cache(self, mark: _Mark) -> None:
        """Drop cached positions after ``mark`` and the segments that filled them."""
        self._spec = None       # it sat at the end of the cache: gone with any cut
        self._rt.remove_from(mark.n_past)
        self._n_past, self._n_cells = mark.n_past, mark.n_cells
        self._segments = list(mark.segments)

    def _restore(self, mark: _Mark) -> None:
        """Go back to an earlier state of the conversation (cache and history)."""
        self._cut_cache(mark)
        self._kv_text = mark.kv_text
        self._messages = list(mark.messages)
        self._images = list(mark.images)

    def _rollback(self, mark: _Mark) -> None:
        """Undo a failed or aborted turn; the history was not touched yet, only the cache."""
        kept = len(self._segments) >= len(mark.segments) and all(
            a is b for a, b in zip(self._segments, mark.segments))
        if kept:
            self._cut_cache(mark)
            return
        # A replay had cut the cache below the mark: evaluate the old conversation again.
        self._cut_cache(self._sys_mark)
        again = mark.segments[len(self._sys_mark.segments):]
        try:
            self._eval_segments(again, abortable=False)   # restoring must not be cut short
        except Aborted:                                   # ... but by closing
            self._restore(self._sys_mark)
            self._check_open()
            raise
        self._segments.extend(again)


def rt_threads(n: int) -> int:
    """llamacpp.n_threads, with 0 meaning every core."""
    return n or os.cpu_count() or 1


def _cells(segs: list[Segment]) -> int:
    return sum(s.n_tokens if isinstance(s, EncodedImage) else len(s) for s in segs)


class LlamaCppEncoder(VisionEncoder):
    """Encodes frames with the backend's projector; the result feeds a later turn."""

    name = "llamacpp"

    def __init__(self, backend: LlamaCppBackend):
        self._backend = backend

    def load(self) -> None:
        self._backend.load()

    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        return self._backend.encode_image(rgb)

    def close(self) -> None:
        """The backend owns the projector; closing the encoder leaves it loaded."""
