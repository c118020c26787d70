"""Self-hearing guard: is the speech the microphone just picked up the assistant's own voice?

With barge-in on, the microphone stays open while the assistant speaks, and the speaker's
sound comes back into it. The guard keeps the last seconds of what was played (16 kHz, with
the time each chunk started) and of what the microphone heard; when the VAD says speech
started, it looks for the played audio inside the heard audio at any delay up to
``max_delay_s`` (normalised cross-correlation, one FFT). A high match means the microphone
hears the speaker, not a person: the speech is dropped and the answer goes on. A person
talking over the answer makes the heard audio a mixture the played audio no longer explains,
and the match falls.

The microphone's audio is placed in time by its own sample clock, not by when its frames
reach the loop: a busy CPU delivers them late and in bursts (a capture buffer read late),
and a frame that arrives 0.6 s after it was captured holds the sound of 0.6 s ago.
"""

from __future__ import annotations

import collections
import time
from typing import Optional

import numpy as np

from assistant.audio.base import SAMPLE_RATE

_KEEP_S = 4.0
_SILENT_RMS = 1.0      # int16 units
# How far back the least late frame is looked for (see MicClock): longer than any stall a
# busy machine makes, short enough to follow a stream that lost samples (an overrun).
_CLOCK_S = 10.0


class MicClock:
    """When the microphone captured its audio, from its sample count: a frame cannot arrive
    before its last sample was captured, so the stream's start is at most (arrival - audio
    so far) for every frame, and the least late frame of the last ``_CLOCK_S`` tells it."""

    def __init__(self):
        self.samples = 0
        self._origins: collections.deque[tuple[int, float]] = collections.deque()  # rising

    def heard(self, n: int, arrived: float) -> float:
        """``n`` samples arrived at ``arrived``; the capture time of the last of them."""
        self.samples += n
        origin = arrived - self.samples / SAMPLE_RATE
        # A sliding minimum: an origin later than a newer, smaller one never counts again.
        while self._origins and self._origins[-1][1] >= origin:
            self._origins.pop()
        self._origins.append((self.samples, origin))
        while self.samples - self._origins[0][0] > _CLOCK_S * SAMPLE_RATE:
            self._origins.popleft()
        return self._origins[0][1] + self.samples / SAMPLE_RATE


class EchoGuard:
    def __init__(self, threshold: float = 0.7, window_s: float = 0.25, max_delay_s: float = 0.5):
        self.threshold = threshold
        self.window = int(window_s * SAMPLE_RATE)
        self.max_delay = int(max_delay_s * SAMPLE_RATE)
        self._played: collections.deque[tuple[float, np.ndarray]] = collections.deque()
        self._heard: collections.deque[np.ndarray] = collections.deque()
        self._heard_n = 0
        self._heard_end = 0.0
        self._clock = MicClock()

    def new_stream(self) -> None:
        """The microphone was opened again: its sample clock starts afresh (the gap while it
        was away is no audio), and what it heard before is gone."""
        self._clock = MicClock()
        self._heard.clear()
        self._heard_n = 0

    @property
    def captured_at(self) -> float:
        """The monotonic time the newest microphone frame's last sample was captured."""
        return self._heard_end

    def played(self, pcm16k: np.ndarray, started: Optional[float] = None) -> None:
        """A chunk of speech (16 kHz int16) starts playing now (or at ``started``)."""
        t = time.monotonic() if started is None else started
        self._played.append((t, np.asarray(pcm16k, np.float32)))
        while self._played and self._played[0][0] < t - _KEEP_S:
            self._played.popleft()

    def heard(self, frame: bytes, at: Optional[float] = None) -> None:
        """A microphone frame (16 kHz int16) arrived now (or at ``at``)."""
        pcm = np.frombuffer(frame, np.int16).astype(np.float32)
        self._heard.append(pcm)
        self._heard_n += len(pcm)
        self._heard_end = self._clock.heard(len(pcm), time.monotonic() if at is None else at)
        while self._heard_n - len(self._heard[0]) >= self.window:
            self._heard_n -= len(self._heard.popleft())

    def _reference(self, start: float, end: float) -> np.ndarray:
        """The played signal between two monotonic times (silence where nothing played)."""
        n = int((end - start) * SAMPLE_RATE)
        out = np.zeros(max(n, 0), np.float32)
        for t, pcm in self._played:
            a = int(round((t - start) * SAMPLE_RATE))
            lo, hi = max(a, 0), min(a + len(pcm), n)
            if lo < hi:
                out[lo:hi] = pcm[lo - a:hi - a]
        return out

    def match(self) -> float:
        """How well the recently played audio explains the recently heard audio, 0 to 1."""
        if not self._played or self._heard_n < self.window // 2:
            return 0.0
        mic = np.concatenate(list(self._heard))[-self.window:]
        end = self._heard_end
        start = end - len(mic) / SAMPLE_RATE
        ref = self._reference(start - self.max_delay / SAMPLE_RATE, end)
        n = len(mic)
        if len(ref) < n or not np.any(ref):
            return 0.0
        mic = mic - mic.mean()
        mic_norm = float(np.sqrt(np.dot(mic, mic)))
        if mic_norm == 0.0:
            return 0.0
        # Cross-correlation at every lag by FFT; the reference's energy per window by cumsum.
        size = 1 << int(np.ceil(np.log2(len(ref) + n)))
        corr = np.fft.irfft(np.fft.rfft(ref, size) * np.conj(np.fft.rfft(mic, size)), size)
        lags = len(ref) - n + 1
        corr = corr[:lags]
        energy = np.concatenate([[0.0], np.cumsum(ref.astype(np.float64) ** 2)])
        window_energy = energy[n:n + lags] - energy[:lags]
        # A lag where nothing was played (below one LSB RMS) explains nothing: dividing the
        # FFT's rounding noise by its near-zero energy would score a person as an echo.
        audible = window_energy > n * _SILENT_RMS ** 2
        if not audible.any():
            return 0.0
        scores = np.abs(corr[audible]) / (np.sqrt(window_energy[audible]) * mic_norm)
        return float(min(1.0, np.max(scores)))

    def is_echo(self) -> bool:
        return self.match() >= self.threshold
