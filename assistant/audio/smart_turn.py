"""End of turn by what was said: Pipecat's Smart Turn model on the utterance's audio.

The VAD alone ends an utterance after ``vad.end_silence_ms`` of silence, long enough for a
person thinking mid-question. With ``vad.end_of_turn: smart_turn`` a short silence
(``vad.smart_turn_silence_ms``) sends the speech so far (its last 8 s) to Smart Turn v3, an
audio classifier on whisper's features: "complete" ends the utterance there; "incomplete"
keeps listening, up to ``vad.max_pause_ms`` of silence (the endpointer's own limit then).

The model is the ONNX file that ships inside the ``pipecat-ai`` wheel (BSD-2), run with
onnxruntime (piper's runtime) on features from faster-whisper's extractor: pipecat itself is
never imported (its own dependencies, numba among them, stay off the board's memory). The
file is found through the installed distribution's file list, or at ``vad.smart_turn_model``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np

from assistant.audio.base import SAMPLE_RATE
from assistant.audio.vad import Endpointer, Utterance, VadEvent
from assistant.config import Config, VadConfig
from assistant.errors import ModelMissingError

log = logging.getLogger(__name__)

# The model reads the last 8 s of the turn (zero-padded in front when shorter).
WINDOW_S = 8
_DIST = "pipecat-ai"
_IN_WHEEL = re.compile(r"pipecat/audio/turn/smart_turn/data/smart-turn-v(\d+)\.(\d+)-cpu\.onnx$")
INSTALL_HINT = ("install it with `pip install 'rkvlm-assistant[smart-turn]'` (or `pip install "
                "--no-deps pipecat-ai`: only its model file is used), set vad.smart_turn_model "
                "to a smart-turn-v3 .onnx file, or set vad.end_of_turn: silence")


def bundled_model() -> Optional[Path]:
    """The newest Smart Turn v3 ONNX file of the installed pipecat-ai wheel, without
    importing pipecat (its package imports pull in most of its dependencies)."""
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    found = []
    for f in dist.files or ():
        m = _IN_WHEEL.search(str(f).replace("\\", "/"))
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), Path(dist.locate_file(f))))
    found = [x for x in found if x[1].is_file()]
    return max(found)[1] if found else None


def model_path(cfg: Config) -> Path:
    """The model file for ``cfg``; ModelMissingError naming the fix when there is none."""
    if cfg.vad.smart_turn_model:
        p = cfg.path(cfg.vad.smart_turn_model)
        if not p.is_file():
            raise ModelMissingError(f"vad.smart_turn_model: {p} is not a file: point it at a "
                              f"smart-turn-v3 .onnx file, or set it to null to use pipecat-ai's")
        return p
    p = bundled_model()
    if p is None:
        raise ModelMissingError(f"vad.end_of_turn: smart_turn needs the Smart Turn model, which "
                          f"ships in the {_DIST} wheel (not installed): {INSTALL_HINT}")
    return p


class SmartTurnModel:
    """The classifier: 16 kHz int16 PCM of a turn -> probability that it is complete.

    ``predict`` is blocking (call it in a worker thread); one session, one thread, as on
    the board's spare core."""

    def __init__(self, path: Path, threads: int = 1):
        self.path = Path(path)
        self.threads = threads
        self._session = None
        self._features = None

    def load(self) -> "SmartTurnModel":
        import onnxruntime as ort
        from faster_whisper.feature_extractor import FeatureExtractor

        so = ort.SessionOptions()
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        so.intra_op_num_threads = self.threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t0 = time.monotonic()
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=so,
                                                 providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a bad file
            raise ModelMissingError(f"the Smart Turn model {self.path} could not be loaded ({e}): "
                              f"{INSTALL_HINT}") from e
        self._input = self._session.get_inputs()[0].name
        # Whisper's log-mel features over an 8 s window: 80 mels x 800 frames.
        self._features = FeatureExtractor(feature_size=80, chunk_length=WINDOW_S)
        log.info("Smart Turn model %s loaded in %.0f ms", self.path.name,
                 (time.monotonic() - t0) * 1e3)
        return self

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def features(self, pcm: np.ndarray) -> np.ndarray:
        """(1, 80, 800) float32: the last 8 s, zero-padded in front, normalised to zero
        mean and unit variance before the spectrogram (as Smart Turn was trained)."""
        n = WINDOW_S * SAMPLE_RATE
        x = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        x = x[-n:]
        if len(x) < n:
            x = np.concatenate([np.zeros(n - len(x), np.float32), x])
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        mel = self._features(x, padding=0)
        return np.asarray(mel, dtype=np.float32)[None, :, :n // 160]

    def predict(self, pcm: np.ndarray) -> float:
        if self._session is None:
            self.load()
        out = self._session.run(None, {self._input: self.features(pcm)})
        return float(np.asarray(out[0]).reshape(-1)[0])


class TurnEnder:
    """Asks the model after each short silence of the speech in progress; call
    ``after_frame`` after every frame while in speech (from the event loop)."""

    THRESHOLD = 0.5        # the model's own: a sigmoid probability of "complete"

    def __init__(self, cfg: VadConfig, model: SmartTurnModel):
        self.cfg = cfg
        self.model = model
        # The pass over the speech so far, keyed by the stream time of its last voiced frame.
        self._ask: Optional[tuple[float, asyncio.Task, float]] = None
        self.last: Optional[dict] = None      # the verdict that ended the last utterance
        self._warned = False                  # a failing model is reported once

    def after_frame(self, ep: Endpointer) -> list[VadEvent]:
        if ep.silence_ms < self.cfg.smart_turn_silence_ms:
            return []
        ask = self._ask
        if ask is not None and ask[0] != ep.speech_end_s:
            if not ask[1].done():
                ask[1].cancel()        # cancels the await only; the thread finishes alone
            ask = self._ask = None     # they spoke on: a new pause, a new question
        if ask is None:
            task = asyncio.create_task(asyncio.to_thread(self.model.predict, ep.speech_so_far()))
            self._ask = (ep.speech_end_s, task, time.monotonic())
            return []
        task = ask[1]
        if not task.done():
            return []
        if task.cancelled():
            return []
        if task.exception() is not None:
            if not self._warned:
                self._warned = True
                log.warning("Smart Turn failed (%s); the silence limit ends this utterance",
                            task.exception())
            return []
        p = task.result()
        if p <= self.THRESHOLD:
            return []             # incomplete: the endpointer's max_pause_ms decides
        self.last = {"probability": round(p, 3), "ms": round((time.monotonic() - ask[2]) * 1e3)}
        log.debug("Smart Turn: complete (p=%.2f) after %d ms of silence", p, ep.silence_ms)
        self._ask = None
        return ep.cut_now()

    @property
    def pending(self) -> Optional[asyncio.Task]:
        """The model's pass still running, if any."""
        return self._ask[1] if self._ask is not None and not self._ask[1].done() else None


async def cut_recording(pcm: np.ndarray, cfg: VadConfig,
                        ender: Optional[TurnEnder] = None) -> list[Utterance]:
    """The utterances a recording comes out as, frame by frame through the endpointer (and
    the Smart Turn ender): as the voice loop cuts them, faster than real time, with the
    model's answer taken as instant (it hears the same audio; add its own time to a cut it
    made). For the endpointing bench and tests."""
    ep = Endpointer(cfg, cfg.max_pause_ms if ender is not None else None)
    out: list[Utterance] = []
    n = ep.frame_bytes // 2
    for i in range(0, len(pcm) - n + 1, n):
        events = ep.process(pcm[i:i + n].tobytes())
        if ender is not None and ep.in_speech:
            events += ender.after_frame(ep)
            if ender.pending is not None:
                await asyncio.wait({ender.pending})
                events += ender.after_frame(ep)      # the answer, at the same frame
        out += [e for e in events if isinstance(e, Utterance)]
    out += [e for e in ep.flush() if isinstance(e, Utterance)]
    return out


def make_turn_ender(cfg: Config, model: Optional[SmartTurnModel] = None) -> Optional[TurnEnder]:
    """The Smart Turn ender for ``cfg`` (None with ``vad.end_of_turn: silence``); the model
    is loaded later (``load``, in a worker thread) unless given loaded. A missing pipecat-ai
    falls back to the silence rule with one warning naming the fix; a wrong explicit
    ``vad.smart_turn_model`` is an error."""
    if cfg.vad.end_of_turn != "smart_turn":
        return None
    if model is None:
        try:
            model = SmartTurnModel(model_path(cfg))
        except ModelMissingError as e:
            if cfg.vad.smart_turn_model:
                raise
            log.warning("%s; ending utterances after vad.end_silence_ms of silence instead", e)
            return None
    return TurnEnder(cfg.vad, model)
