"""The camera and vision-encoder interfaces.

A camera hands out the scene at the moment of the call as an RGB uint8 (H, W, 3) array. An
encoder turns such a frame into an ``ImageEmbedding`` of (n_tokens, dim) float32 read from the
model itself. Both are blocking and run in worker threads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from assistant.llm.base import ImageEmbedding


class Camera(ABC):
    name: str = "?"

    @abstractmethod
    def open(self) -> None:
        """Open the device or file; raises DeviceError with what to check."""

    @abstractmethod
    def snapshot(self) -> np.ndarray:
        """The current scene, RGB uint8 (H, W, 3); never a stale buffered frame."""

    def close(self) -> None:
        """Release the device (idempotent)."""


class VisionEncoder(ABC):
    name: str = "?"

    @abstractmethod
    def load(self) -> None:
        """Load the encoder model (blocking)."""

    @abstractmethod
    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        """Encode one RGB uint8 (H, W, 3) frame."""

    def close(self) -> None:
        """Release the model (idempotent)."""
