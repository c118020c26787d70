"""The multimodal projector (mtmd) through ctypes: encode an image now, decode it into the LLM later.

``Projector.encode`` turns an RGB frame into an ``EncodedImage``: the float32 output
embeddings of every image chunk plus the layout needed to put them into the language model
(the model-specific text tokens around the image, and one placeholder chunk per image
chunk that carries its positions, e.g. the 2-D M-RoPE grid of Qwen2.5-VL). The pixel data is
released right after encoding. ``Projector.decode`` evaluates an EncodedImage into a llama
context at a given position without running the vision encoder again.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from assistant.errors import BackendError
from assistant.llm import llamacpp_native as native

log = logging.getLogger(__name__)

_TEXT, _IMAGE = 0, 1


@dataclass
class ImagePart:
    """One image chunk: its rows in ``EncodedImage.embeddings`` and its placeholder chunk."""

    chunk: int          # owned mtmd_input_chunk* (placeholder: metadata only, no pixels)
    row: int
    n_tokens: int
    n_pos: int


@dataclass
class EncodedImage:
    """An image encoded by one Projector; ``parts`` are token lists and ImageParts in order."""

    embeddings: np.ndarray                      # float32 (n_image_tokens, n_embd)
    parts: list[Union[list[int], ImagePart]]
    width: int
    height: int
    owner: object                               # the Projector.token of its maker
    _release: Any = field(default=None, repr=False)   # frees the chunks (or the original's owner)

    @property
    def n_tokens(self) -> int:
        """KV cells this image takes (image tokens plus the text tokens around them)."""
        return sum(len(p) if isinstance(p, list) else p.n_tokens for p in self.parts)

    def with_embeddings(self, data: np.ndarray) -> "EncodedImage":
        """The same layout with other floats (the copy keeps this one, and its chunks, alive)."""
        return EncodedImage(np.ascontiguousarray(data, np.float32), self.parts, self.width,
                            self.height, self.owner, _release=self)

    @property
    def n_pos(self) -> int:
        """Positions this image advances (fewer than n_tokens with M-RoPE)."""
        return sum(len(p) if isinstance(p, list) else p.n_pos for p in self.parts)


def _free_chunks(mtmd: Any, chunks: list[int]) -> None:
    for c in chunks:
        mtmd.mtmd_input_chunk_free(c)


class Projector:
    """An mtmd context bound to one loaded llama model.

    ``encode`` may be called from any thread while no other encode runs on this projector
    (it holds its own lock); it does not touch the llama context, so it can overlap a turn
    that is generating text. ``decode`` needs the caller to own the llama context.
    """

    def __init__(self, mmproj_path: Path, model: int, n_threads: int):
        self._llama, self._mtmd = native.bindings()
        self.path = Path(mmproj_path)
        self._lock = threading.Lock()
        self.token = object()   # identifies the images this projector encoded
        m = self._mtmd
        params = m.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = n_threads
        params.warmup = False
        native.forget_native_errors()
        ctx = m.mtmd_init_from_file(str(self.path).encode(), model, params)
        if not ctx:
            raise BackendError(
                f"cannot load the multimodal projector {self.path}{native.native_reason()}; "
                "check that it is the mmproj file made for this language model")
        self._ctx = ctx
        self.n_embd = int(self._llama.llama_model_n_embd_inp(model))
        self.marker = m.mtmd_default_marker().decode()
        self.uses_mrope = bool(m.mtmd_decode_use_mrope(ctx))
        if not m.mtmd_support_vision(ctx):
            self.close()
            raise BackendError(f"the projector {self.path} has no vision encoder")
        # A NULL post-decode callback (ctypes wants a function-pointer object, not None).
        self._no_callback = ctypes.cast(None, m.mtmd_helper_post_decode_callback)
        self._finalizer = weakref.finalize(self, m.mtmd_free, ctx)

    # ------------------------------------------------------------------ encode

    def encode(self, rgb: np.ndarray) -> EncodedImage:
        """Encode an RGB uint8 (H, W, 3) frame. Blocking; raises BackendError on failure."""
        frame = _check_frame(rgb)
        h, w = frame.shape[:2]
        m = self._mtmd
        with self._lock:
            if self._ctx is None:
                raise BackendError("the multimodal projector is closed")
            buf = (ctypes.c_uint8 * frame.size).from_buffer(frame)
            bitmap = m.mtmd_bitmap_init(w, h, buf)
            if not bitmap:
                raise BackendError(f"mtmd could not take a {w}x{h} image")
            chunks = m.mtmd_input_chunks_init()
            owned: list[int] = []
            try:
                marker = self.marker.encode()
                text = m.mtmd_input_text(marker, len(marker), False, True)
                bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
                native.forget_native_errors()
                rc = m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
                if rc != 0:
                    raise BackendError(f"mtmd could not preprocess the image (code {rc})"
                                       f"{native.native_reason()}")
                parts: list[Union[list[int], ImagePart]] = []
                rows: list[np.ndarray] = []
                row = 0
                for i in range(m.mtmd_input_chunks_size(chunks)):
                    chunk = m.mtmd_input_chunks_get(chunks, i)
                    kind = m.mtmd_input_chunk_get_type(chunk)
                    if kind == _TEXT:
                        n = ctypes.c_size_t(0)
                        toks = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                        parts.append([int(toks[k]) for k in range(n.value)])
                        continue
                    if kind != _IMAGE:
                        raise BackendError(f"mtmd returned an unexpected chunk type {kind}")
                    n_tok = int(m.mtmd_input_chunk_get_n_tokens(chunk))
                    if m.mtmd_encode_chunk(self._ctx, chunk) != 0:
                        raise BackendError(f"mtmd failed to encode the image{native.native_reason()}")
                    out = m.mtmd_get_output_embd(self._ctx)
                    # Copy now: the buffer belongs to the context and the next encode reuses it.
                    rows.append(np.ctypeslib.as_array(out, shape=(n_tok * self.n_embd,))
                                .reshape(n_tok, self.n_embd).copy())
                    placeholder = m.mtmd_input_chunk_get_placeholder(chunk)
                    if not placeholder:
                        raise BackendError("mtmd could not copy the image chunk")
                    owned.append(placeholder)
                    parts.append(ImagePart(placeholder, row, n_tok,
                                           int(m.mtmd_input_chunk_get_n_pos(chunk))))
                    row += n_tok
            except BaseException:
                _free_chunks(m, owned)
                raise
            finally:
                m.mtmd_input_chunks_free(chunks)
                m.mtmd_bitmap_free(bitmap)
        emb = np.concatenate(rows) if rows else np.zeros((0, self.n_embd), np.float32)
        enc = EncodedImage(emb.astype(np.float32, copy=False), parts, w, h, self.token)
        enc._release = weakref.finalize(enc, _free_chunks, m, owned)
        return enc

    # ------------------------------------------------------------------ decode

    def decode_part(self, lctx: int, part: ImagePart, embeddings: np.ndarray, n_past: int,
                    n_batch: int) -> int:
        """Evaluate one image part's embedding rows at n_past; returns the new n_past."""
        rows = np.ascontiguousarray(embeddings[part.row:part.row + part.n_tokens], np.float32)
        if rows.shape != (part.n_tokens, self.n_embd):
            raise BackendError(f"image embedding has shape {embeddings.shape}; this model needs "
                               f"{part.n_tokens} rows of {self.n_embd}")
        ptr = rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        new_past = self._llama.llama_pos(0)
        with self._lock:
            if self._ctx is None:
                raise BackendError("the multimodal projector is closed")
            native.forget_native_errors()
            rc = self._mtmd.mtmd_helper_decode_image_chunk(
                self._ctx, lctx, part.chunk, ptr, n_past, 0, n_batch,
                ctypes.byref(new_past), self._no_callback, None)
        if rc != 0:
            raise BackendError(f"llama.cpp failed to decode the image (code {rc})"
                               f"{native.native_reason()}")
        return int(new_past.value)

    def close(self) -> None:
        """Free the mtmd context (idempotent)."""
        with self._lock:
            if self._ctx is None:
                return
            fin = getattr(self, "_finalizer", None)
            if fin is not None:
                fin()
            else:
                self._mtmd.mtmd_free(self._ctx)
            self._ctx = None


def _check_frame(rgb: Any) -> np.ndarray:
    """A C-contiguous uint8 (H, W, 3) copy-free view of the frame, or BackendError."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", type(rgb).__name__)
        raise BackendError(f"an image must be an RGB array of shape (H, W, 3); got {shape}")
    if rgb.dtype != np.uint8:
        raise BackendError(f"an image must be uint8 RGB; got dtype {rgb.dtype}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise BackendError(f"an image must not be empty; got shape {rgb.shape}")
    return np.array(rgb, dtype=np.uint8, order="C", copy=True)
