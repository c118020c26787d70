"""Piper speaking from its first words: the voice's graph cut in front of its audio decoder.

A piper voice (VITS) turns phonemes into a latent sequence (text encoder, durations, flow)
and then decodes the latent into audio (a HiFi-GAN generator: most of the time; measured
about 60 % of a clause on the en_US voice). The latent has one frame per ``hop_length``
samples and the decoder is convolutional, so decoding it in chunks, each with a few frames
of context on both sides, gives the same audio: the first chunk is heard while the rest is
decoded, and the first sound of a sentence no longer waits for all of it.

The voice's ONNX graph is cut at the decoder's input (the tensor into ``dec.conv_pre``) with
onnx's extractor (piper's own ``alignment`` extra uses onnx to patch voices the same way)
into two onnxruntime sessions. ``split`` checks the cut on a sentence: the chunks must add
up to the whole decode. A voice whose graph cannot be cut that way is spoken whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

log = logging.getLogger(__name__)

# Latent frames per chunk: a short first one (at 22050 Hz and a hop of 256, 24 frames are
# 0.28 s of speech) for an early first sound, then longer ones to keep the context overhead
# small. Each chunk is decoded with CONTEXT frames on both sides and those samples dropped:
# with 12 the chunks differ from the whole decode by less than 0.002 of full scale.
FIRST_FRAMES = 24
MAX_FRAMES = 96
CONTEXT = 12
# The split is refused when the chunks of the check sentence differ more than this.
MAX_CHUNK_ERROR = 0.01
_DECODER_WEIGHT = "dec.conv_pre.weight"


def decoder_input(model) -> Optional[str]:
    """The name of the tensor the decoder starts from, or None when there is none."""
    for node in model.graph.node:
        if node.op_type == "Conv" and (node.name == "/dec/conv_pre/Conv" or (
                len(node.input) > 1 and node.input[1] == _DECODER_WEIGHT)):
            return node.input[0]
    return None


@dataclass
class SplitVoice:
    """The two halves of one voice: phoneme ids -> latent, latent -> audio (float)."""

    latent_session: object        # onnxruntime.InferenceSession
    decoder_session: object
    latent_name: str
    hop: int
    extra_inputs: tuple[str, ...] = ()   # graph inputs the decoder also reads (sid)

    def latent(self, feeds: dict) -> np.ndarray:
        return self.latent_session.run([self.latent_name], feeds)[0]

    def _decode(self, z: np.ndarray, feeds: dict) -> np.ndarray:
        inputs = {self.latent_name: np.ascontiguousarray(z)}
        inputs.update({k: feeds[k] for k in self.extra_inputs if k in feeds})
        return self.decoder_session.run(None, inputs)[0].reshape(-1)

    def decode(self, z: np.ndarray, feeds: dict) -> np.ndarray:
        """The whole latent at once."""
        return self._decode(z, feeds)

    def chunks(self, z: np.ndarray, feeds: dict) -> Iterator[np.ndarray]:
        """The latent decoded a chunk at a time, each chunk's audio as soon as it is made."""
        total = z.shape[-1]
        start, size = 0, FIRST_FRAMES
        while start < total:
            end = min(total, start + size)
            lo, hi = max(0, start - CONTEXT), min(total, end + CONTEXT)
            audio = self._decode(z[..., lo:hi], feeds)
            skip = (start - lo) * self.hop
            yield audio[skip:skip + (end - start) * self.hop]
            start, size = end, min(MAX_FRAMES, size * 2)


def split(model_path: Union[str, Path], hop: int, check_feeds: dict,
          providers=("CPUExecutionProvider",)) -> tuple[Optional[SplitVoice], str]:
    """The voice cut in two, checked on ``check_feeds`` (a sentence's inputs); or None and
    the reason it cannot be."""
    try:
        import onnx
        import onnxruntime
        from onnx.utils import Extractor
    except ImportError as e:
        return None, f"the onnx package is missing ({e}); pip install 'piper-tts[alignment]'"
    try:
        model = onnx.load(str(model_path))
        latent = decoder_input(model)
        if latent is None:
            return None, "its graph has no dec.conv_pre (not a VITS export piper knows)"
        inputs = [i.name for i in model.graph.input]
        outputs = [o.name for o in model.graph.output]
        extractor = Extractor(model)
        first = extractor.extract_model(inputs, [latent])
        extra = tuple(i for i in inputs if i == "sid")    # multi-speaker: the decoder's g
        second = extractor.extract_model([latent, *extra], outputs[:1])
        del model, extractor

        def session(m):
            return onnxruntime.InferenceSession(m.SerializeToString(),
                                                sess_options=onnxruntime.SessionOptions(),
                                                providers=list(providers))

        voice = SplitVoice(session(first), session(second), latent, hop, extra)
        z = voice.latent(check_feeds)
        whole = voice.decode(z, check_feeds)
        pieces = np.concatenate(list(voice.chunks(z, check_feeds)))
    except Exception as e:  # onnx and onnxruntime raise many types for a graph they refuse
        return None, f"its graph cannot be cut before the decoder ({type(e).__name__}: {e})"
    if pieces.shape != whole.shape or whole.size != z.shape[-1] * hop:
        return None, (f"its chunks give {pieces.size} samples for {whole.size}, and "
                      f"{z.shape[-1]} frames of {hop} are {z.shape[-1] * hop}")
    error = float(np.max(np.abs(pieces - whole))) if whole.size else 0.0
    if error > MAX_CHUNK_ERROR:
        return None, f"its chunks differ from the whole by {error:.3f}"
    return voice, f"speaks from its first {FIRST_FRAMES} frames (chunk error {error:.4f})"


__all__ = ["SplitVoice", "split", "decoder_input", "FIRST_FRAMES", "MAX_FRAMES", "CONTEXT"]
