"""VAD endpointer: cuts a stream of 16 kHz frames into utterances with webrtcvad.

Speech starts when enough voiced audio (``start_ms``) is seen within a short window; the
``pre_roll_ms`` before that is kept so the first syllable survives. The utterance ends after
``end_silence_ms`` of silence (``max_pause_ms`` when Smart Turn decides sooner, see
assistant.audio.smart_turn) or at ``max_utterance_s``. Utterances with less than
``min_speech_ms`` of voiced audio (clicks, coughs, a door) are discarded, and the pipeline is
told so it can drop the early camera work it started.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from assistant.audio.base import SAMPLE_RATE
from assistant.config import VadConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeechStarted:
    at_s: float  # stream time of the first voiced frame


@dataclass(frozen=True)
class SpeechDiscarded:
    at_s: float
    voiced_ms: int
    reason: str


@dataclass(frozen=True)
class Utterance:
    pcm: np.ndarray      # int16 mono 16 kHz, pre-roll included
    start_s: float       # stream time where pcm begins
    end_s: float         # stream time where speech ended (trailing silence excluded)
    voiced_ms: int
    truncated: bool      # cut at max_utterance_s
    silence_ms: int = 0  # silence after the last voiced frame, before the cut

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / SAMPLE_RATE


VadEvent = SpeechStarted | SpeechDiscarded | Utterance

# Trailing silence kept at the end of an utterance: whisper does better with a short tail.
_TAIL_MS = 200


class Endpointer:
    """Feed frames of exactly ``frame_ms``; get SpeechStarted / Utterance / SpeechDiscarded."""

    def __init__(self, cfg: VadConfig, end_silence_ms: Optional[int] = None):
        import webrtcvad  # the webrtcvad-wheels distribution

        self.cfg = cfg
        self._vad = webrtcvad.Vad(cfg.aggressiveness)
        self.frame_ms = cfg.frame_ms
        self.frame_bytes = SAMPLE_RATE * cfg.frame_ms // 1000 * 2
        ms = cfg.frame_ms
        self._start_frames = max(1, -(-cfg.start_ms // ms))
        # Speech starts when start_frames of the last (start_frames + 2) frames are voiced:
        # tolerant of one unvoiced frame inside a syllable, deaf to isolated clicks.
        self._window = collections.deque(maxlen=self._start_frames + 2)
        self._pre_roll = collections.deque(maxlen=max(1, cfg.pre_roll_ms // ms))
        # The silence that ends an utterance by itself (Smart Turn's max_pause_ms, if given).
        self.end_silence_ms = end_silence_ms or cfg.end_silence_ms
        self._end_frames = max(1, self.end_silence_ms // ms)
        self._max_frames = int(cfg.max_utterance_s * 1000 // ms)
        self._min_voiced_frames = cfg.min_speech_ms // ms
        self._tail_frames = _TAIL_MS // ms
        self.reset()

    def reset(self) -> None:
        """Forget any speech in progress (e.g. after the mic was gated while speaking)."""
        self._window.clear()
        self._pre_roll.clear()
        self._frames: list[bytes] = []
        self._triggered = False
        self._silence_run = 0
        self._voiced = 0
        self._start_s = 0.0
        self._n = getattr(self, "_n", 0)

    @property
    def in_speech(self) -> bool:
        return self._triggered

    def _t(self, frames: int) -> float:
        return frames * self.frame_ms / 1000.0

    def process(self, frame: bytes) -> list[VadEvent]:
        if len(frame) != self.frame_bytes:
            raise ValueError(f"VAD frame must be {self.frame_bytes} bytes, got {len(frame)}")
        voiced = self._vad.is_speech(frame, SAMPLE_RATE)
        self._n += 1
        if not self._triggered:
            self._pre_roll.append(frame)
            self._window.append(voiced)
            if sum(self._window) >= self._start_frames:
                self._triggered = True
                self._frames = list(self._pre_roll)
                self._pre_roll.clear()
                self._voiced = sum(self._window)
                self._silence_run = 0
                self._start_s = self._t(self._n - len(self._frames))
                first_voiced = self._n - len(self._window) + list(self._window).index(True)
                return [SpeechStarted(at_s=self._t(first_voiced))]
            return []

        self._frames.append(frame)
        if voiced:
            self._voiced += 1
            self._silence_run = 0
        else:
            self._silence_run += 1
        if self._silence_run >= self._end_frames:
            return [self._finish(truncated=False)]
        if len(self._frames) >= self._max_frames:
            return [self._finish(truncated=True)]
        return []

    # What quick endpointing needs to know about the speech in progress.

    @property
    def silence_ms(self) -> int:
        """Silence since the last voiced frame of the speech in progress (0 outside speech)."""
        return self._silence_run * self.frame_ms if self._triggered else 0

    @property
    def voiced_frames(self) -> int:
        return self._voiced if self._triggered else 0

    @property
    def speech_end_s(self) -> float:
        """Stream time of the last voiced frame so far: an Utterance cut later without more
        speech has exactly this ``end_s``."""
        return self._t(self._n - self._silence_run)

    def speech_so_far(self) -> np.ndarray:
        """The speech in progress as PCM (pre-roll included), for a partial transcription."""
        return np.frombuffer(b"".join(self._frames), dtype=np.int16).copy()

    def cut_now(self) -> list[VadEvent]:
        """End the speech in progress here (quick endpointing decided it is complete)."""
        return [self._finish(truncated=False)] if self._triggered else []

    def flush(self) -> list[VadEvent]:
        """End of stream: an utterance in progress ends here."""
        if self._triggered:
            return [self._finish(truncated=False)]
        return []

    def _finish(self, truncated: bool) -> VadEvent:
        frames = self._frames
        trailing = self._silence_run
        keep = len(frames) - max(0, trailing - self._tail_frames)
        end_s = self._t(self._n - trailing)
        voiced_ms = self._voiced * self.frame_ms
        start_s = self._start_s
        self._triggered = False
        self._frames = []
        self._window.clear()
        self._silence_run = 0
        self._voiced = 0
        if self._voiced_ok(voiced_ms):
            pcm = np.frombuffer(b"".join(frames[:keep]), dtype=np.int16).copy()
            log.debug("utterance %.2f-%.2f s, %d ms voiced%s", start_s, end_s, voiced_ms,
                      " (cut at max_utterance_s)" if truncated else "")
            return Utterance(pcm=pcm, start_s=start_s, end_s=end_s, voiced_ms=voiced_ms,
                             truncated=truncated, silence_ms=trailing * self.frame_ms)
        log.debug("discarded %d ms of voiced audio at %.2f s (below min_speech_ms)", voiced_ms, start_s)
        return SpeechDiscarded(at_s=start_s, voiced_ms=voiced_ms, reason="shorter than vad.min_speech_ms")

    def _voiced_ok(self, voiced_ms: int) -> bool:
        return voiced_ms >= self.cfg.min_speech_ms
