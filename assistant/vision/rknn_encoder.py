"""The vision encoder on the Rockchip NPU, through RKNNLite (rknn-toolkit-lite2).

``load`` opens the ``.rknn`` model on the configured NPU cores and encodes one blank image to
learn what the model outputs: the embedding shape is read from the model, never assumed,
and checked against the model family (tokens per image, embedding width), so an encoder
that does not belong to the LLM fails here with a message instead of inside the runtime.
Models with several outputs (Qwen3-VL's DeepStack layers) are concatenated per token, as
the RKLLM runtime expects.
"""

from __future__ import annotations

import logging
import platform
from importlib import metadata
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from assistant.config import RknnEncoderConfig
from assistant.errors import BackendError, ModelMissingError
from assistant.llm.base import ImageEmbedding
from assistant.llm.families import Family, get_family
from assistant.vision.base import VisionEncoder
from assistant.vision.preprocess import pad_value, prepare

log = logging.getLogger(__name__)

PathResolver = Callable[[Optional[str]], Optional[Path]]

# vision.rknn.core_mask -> the RKNNLite class attribute holding the mask.
_CORE_MASKS = {
    "auto": "NPU_CORE_AUTO",
    "0": "NPU_CORE_0",
    "1": "NPU_CORE_1",
    "2": "NPU_CORE_2",
    "0_1": "NPU_CORE_0_1",
    "0_1_2": "NPU_CORE_0_1_2",
}


def _plain_path(value: Optional[str]) -> Optional[Path]:
    return Path(value).expanduser() if value else None


def import_rknnlite() -> Any:
    """The RKNNLite class; BackendError saying where it runs and what to use instead."""
    try:
        from rknnlite.api import RKNNLite
    except ImportError as e:
        raise BackendError(
            f"vision.encoder: rknn needs rknn-toolkit-lite2 (the rknnlite package), which runs "
            f"only on aarch64 Rockchip boards (RK3576 / RK3588); it cannot be imported on this "
            f"{platform.machine()} machine ({e}). On a board, install it (see "
            f"README.md#installing-the-runtimes); anywhere else use the portable backends: "
            f"vision.encoder: llamacpp and llm.backend: llamacpp.") from None
    return RKNNLite


def probe_rknnlite() -> str:
    """For `check`: whether RKNNLite can be imported here, and its version."""
    import_rknnlite()
    try:
        return f"rknn-toolkit-lite2 {metadata.version('rknn-toolkit-lite2')}"
    except metadata.PackageNotFoundError:
        return "rknnlite importable"


def combine_outputs(outputs: list, source: str) -> np.ndarray:
    """The model's outputs as one float32 (n_tokens, dim) array.

    Leading batch axes are dropped; several outputs (same token count) are joined per
    token along the embedding axis.
    """
    arrays = []
    for k, out in enumerate(outputs):
        a = np.asarray(out, dtype=np.float32)
        if a.ndim < 2:
            raise BackendError(f"{source}: output {k} has shape {a.shape}; a vision encoder "
                               f"outputs (image tokens, embedding size)")
        arrays.append(a.reshape(-1, a.shape[-1]))
    if not arrays:
        raise BackendError(f"{source}: the model has no outputs")
    if len({a.shape[0] for a in arrays}) != 1:
        shapes = ", ".join(str(a.shape) for a in arrays)
        raise BackendError(f"{source}: outputs disagree on the number of image tokens ({shapes})")
    joined = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)
    return np.ascontiguousarray(joined, dtype=np.float32)


class RknnEncoder(VisionEncoder):
    """A ``.rknn`` vision encoder (vision + projector) run by RKNNLite on the NPU."""

    name = "rknn"

    def __init__(self, cfg: RknnEncoderConfig, family: str,
                 resolve_path: PathResolver = _plain_path):
        self._cfg = cfg
        self.family: Family = get_family(family)
        self._resolve = resolve_path
        self._rknn: Any = None
        self._lock = threading.Lock()  # RKNNLite is used from one thread at a time
        self.n_tokens: Optional[int] = None
        self.dim: Optional[int] = None
        if cfg.core_mask not in _CORE_MASKS:
            raise BackendError(f"vision.rknn.core_mask: {cfg.core_mask!r} is not one of "
                               f"{', '.join(_CORE_MASKS)}")

    @classmethod
    def from_config(cls, cfg: Any) -> "RknnEncoder":
        """From the whole Config: vision.rknn, the family (vision.family or llm.rkllm.family)."""
        family = cfg.vision.family or cfg.llm.rkllm.family
        return cls(cfg.vision.rknn, family, cfg.path)

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) the encoder takes: the family's input size."""
        return self.family.input_size, self.family.input_size

    def _model_path(self) -> Path:
        path = self._resolve(self._cfg.model)
        if path is None:
            raise ModelMissingError(
                "vision.rknn.model is not set: point it at the vision encoder .rknn converted "
                "with rknn-toolkit2 for this board (see README.md#where-the-model-files-go)")
        if not path.is_file():
            raise ModelMissingError(
                f"vision.rknn.model: {path} not found: copy the .rknn vision encoder there or "
                f"fix the path (see README.md#where-the-model-files-go)")
        return path

    def load(self) -> None:
        """Open the model on the NPU and learn its output shape (blocking; idempotent)."""
        with self._lock:
            if self._rknn is not None:
                return
            rknnlite = import_rknnlite()
            path = self._model_path()
            mask_name = _CORE_MASKS[self._cfg.core_mask]
            t0 = time.monotonic()
            rknn = rknnlite(verbose=False)
            try:
                if rknn.load_rknn(str(path)) != 0:
                    raise BackendError(
                        f"RKNNLite could not load {path} (the log above says why): is it an "
                        f".rknn file converted for this chip by a compatible rknn-toolkit2?")
                if rknn.init_runtime(core_mask=getattr(rknnlite, mask_name)) != 0:
                    raise BackendError(
                        f"RKNNLite could not start {path.name} on NPU cores "
                        f"{self._cfg.core_mask} (vision.rknn.core_mask): check the NPU driver "
                        f"(dmesg | grep -i rknpu), that the cores exist on this chip (RK3576 "
                        f"has 0 and 1), and that librknnrt.so matches rknn-toolkit-lite2")
                # Encode a blank (pad-coloured) image: the output shape is the model's own.
                w, h = self.input_size
                blank = np.full((h, w, 3), pad_value(self._cfg.pad_color), dtype=np.uint8)
                emb = self._run(rknn, prepare(blank, w, h, self._cfg.pad_color), path.name)
                self.family.check_embedding(emb.shape[0], emb.shape[1],
                                            source=f"the vision encoder {path.name}")
            except BaseException:
                rknn.release()
                raise
            self._rknn = rknn
            self.n_tokens, self.dim = int(emb.shape[0]), int(emb.shape[1])
            log.info("rknn encoder %s loaded on cores %s in %.2f s: %dx%d -> %d tokens x %d",
                     path.name, self._cfg.core_mask, time.monotonic() - t0, w, h,
                     self.n_tokens, self.dim)

    def _run(self, rknn: Any, batch: np.ndarray, source: str) -> np.ndarray:
        w, h = self.input_size
        try:
            outputs = rknn.inference(inputs=[batch])
        except Exception as e:  # RKNNLite raises plain exceptions from its runtime
            raise BackendError(f"RKNN inference of {source} failed: {e}") from None
        if outputs is None:
            raise BackendError(
                f"RKNN inference of {source} returned nothing (the log above says why); "
                f"{self.family.title} encoders take a {w}x{h} RGB image: was this one exported "
                f"for another family or size? (vision.family / llm.rkllm.family)")
        return combine_outputs(list(outputs), source)

    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        """Encode one RGB uint8 (H, W, 3) frame into (n_tokens, dim) float32."""
        with self._lock:
            if self._rknn is None:
                raise BackendError("the rknn vision encoder is not loaded (call load() first)")
            w, h = self.input_size
            try:
                batch = prepare(rgb, w, h, self._cfg.pad_color)
            except ValueError as e:
                raise BackendError(f"cannot encode the camera frame: {e}") from None
            t0 = time.monotonic()
            emb = self._run(self._rknn, batch, "the vision encoder")
            if emb.shape != (self.n_tokens, self.dim):
                raise BackendError(
                    f"the vision encoder returned {emb.shape} after {self.n_tokens, self.dim} "
                    f"at load time; restart the assistant")
            log.debug("rknn encode: %d tokens x %d in %.0f ms", emb.shape[0], emb.shape[1],
                      (time.monotonic() - t0) * 1000)
            return ImageEmbedding(data=emb, width=w, height=h)

    def close(self) -> None:
        """Release the model and its NPU memory (idempotent)."""
        with self._lock:
            if self._rknn is not None:
                try:
                    self._rknn.release()
                finally:
                    self._rknn = None
