"""Sample-format conversion, channel mixdown and sample-rate conversion, in numpy only.

The resampler is a polyphase windowed-sinc filter (Kaiser window). For a rate change of
``dst/src = up/down`` (reduced by their gcd), output sample ``n`` sits at input time
``n * down / up``; its value is a dot product of the input around that time with one of
``up`` precomputed filter phases. The cut-off is placed below the lower of the two Nyquist
frequencies, so downsampling does not alias. The filter is flat to about 80 % of the output
Nyquist frequency and attenuates aliases by about 80 dB; it costs a few milliseconds of one
core per second of audio, so it runs in real time on an ARM board.

``StreamResampler`` keeps the filter history between blocks, so a microphone stream
resampled block by block is identical to the whole signal resampled at once (no clicks at
block edges). ``resample`` is that stream fed once and flushed.

Memory stays bounded whatever the rates: a ratio that would need more than ``MAX_PHASES``
filter phases (an odd rate such as 44101 Hz, or a hostile 470001 Hz) is approximated by the
nearest one that does not (from 8 to 192 kHz the pitch moves by at most 0.05 %, less than a
cent); the filter banks are designed in small blocks and cached up to ``CACHE_BYTES`` in
all, and the gather for one step of outputs is kept to a few megabytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from fractions import Fraction
from math import ceil, gcd

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# Filter design: zero crossings of the sinc on each side, cut-off as a fraction of the
# lower Nyquist frequency, and the Kaiser window's beta (about 80 dB stop band).
_ZERO_CROSSINGS = 24
_ROLLOFF = 0.9
_KAISER_BETA = 8.0

_CHUNK = 4096  # outputs computed per step, to bound the temporary gather matrix
_GATHER = 1 << 20  # ... and taps gathered per step at most (4 MB of float32)
# Every common pair of rates needs at most 640 phases (11025 Hz -> 16 kHz).
MAX_PHASES = 1024
CACHE_BYTES = 32 << 20


def int16_to_float(x: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 in [-1, 1)."""
    return np.asarray(x, dtype=np.int16).astype(np.float32) / 32768.0


def float_to_int16(x: np.ndarray) -> np.ndarray:
    """float PCM in [-1, 1] -> int16, rounded and clipped (no wrap-around on overload)."""
    y = np.rint(np.asarray(x, dtype=np.float32) * 32768.0)
    return np.clip(y, -32768, 32767).astype(np.int16)


def to_mono(x: np.ndarray) -> np.ndarray:
    """Mix (frames, channels) audio down to (frames,) by averaging; mono passes through.

    int16 stays int16 (rounded mean), float stays float32.
    """
    x = np.asarray(x)
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise ValueError(f"audio must be (frames,) or (frames, channels), got shape {x.shape}")
    if x.shape[1] == 1:
        return x[:, 0]
    if x.dtype == np.int16:
        return np.rint(x.astype(np.float32).mean(axis=1)).astype(np.int16)
    return x.astype(np.float32).mean(axis=1)


def ratio(src_rate: int, dst_rate: int) -> tuple[int, int]:
    """(up, down) with up/down = dst/src, reduced; approximated when up would need more
    than MAX_PHASES filter phases."""
    g = gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    if up > MAX_PHASES:
        approx = Fraction(src_rate, dst_rate).limit_denominator(MAX_PHASES)
        up, down = approx.denominator, approx.numerator
    return up, down


class _BankCache:
    """Filter banks by (up, down), least recently used dropped past ``limit`` bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self._banks: OrderedDict[tuple[int, int], tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b, _ in self._banks.values())

    def get(self, up: int, down: int) -> tuple[np.ndarray, int]:
        with self._lock:
            hit = self._banks.get((up, down))
            if hit is not None:
                self._banks.move_to_end((up, down))
                return hit
        made = _design(up, down)
        with self._lock:
            self._banks[(up, down)] = made
            total = sum(b.nbytes for b, _ in self._banks.values())
            while total > self.limit and len(self._banks) > 1:
                _, (old, _) = self._banks.popitem(last=False)
                total -= old.nbytes
        return made

    def clear(self) -> None:
        with self._lock:
            self._banks.clear()


_BANKS = _BankCache(CACHE_BYTES)


def _filter_bank(up: int, down: int) -> tuple[np.ndarray, int]:
    return _BANKS.get(up, down)


def _design(up: int, down: int) -> tuple[np.ndarray, int]:
    """The (up, 2K) filter phases for an up/down rate change, and K (taps each side).

    Designed a block of phases at a time, so the float64 temporaries stay small."""
    fc = 0.5 * _ROLLOFF * min(1.0, up / down)  # cut-off, cycles per input sample
    half = _ZERO_CROSSINGS / (2.0 * fc)  # window half-width, in input samples
    k = int(ceil(half))
    bank = np.empty((up, 2 * k), dtype=np.float32)
    taps = (k - 1) - np.arange(2 * k, dtype=np.float64)[None, :]
    block = max(1, (1 << 16) // (2 * k))
    for first in range(0, up, block):
        phase = np.arange(first, min(first + block, up), dtype=np.float64)[:, None] / up
        tau = phase + taps
        u = np.clip(tau / half, -1.0, 1.0)
        window = np.i0(_KAISER_BETA * np.sqrt(1.0 - u * u)) / np.i0(_KAISER_BETA)
        window[np.abs(tau) > half] = 0.0
        h = 2.0 * fc * np.sinc(2.0 * fc * tau) * window
        # Each phase sums to exactly 1, so silence stays silence and DC gain never ripples.
        h /= h.sum(axis=1, keepdims=True)
        bank[first:first + len(h)] = h
    return bank, k


class StreamResampler:
    """Resamples a stream block by block with no discontinuity at block edges.

    ``process`` returns every output sample whose filter window is complete (latency: about
    ``K`` input samples, under 2 ms); ``flush`` pads the end with silence, returns the rest
    and resets the state. In total, ``ceil(n_in * dst / src)`` samples come out.
    """

    def __init__(self, src_rate: int, dst_rate: int):
        if src_rate <= 0 or dst_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {src_rate} -> {dst_rate}")
        self.src_rate = int(src_rate)
        self.dst_rate = int(dst_rate)
        self.up, self.down = ratio(self.src_rate, self.dst_rate)
        self._bank, self._k = (None, 0) if self.up == self.down else _filter_bank(self.up, self.down)
        self.reset()

    def reset(self) -> None:
        """Forget the history (the next block starts a new signal)."""
        k = self._k
        # The buffer covers input indices buf_start.. ; the K-1 zeros stand for x[k < 0].
        self._buf = np.zeros(max(k - 1, 0), dtype=np.float32)
        self._buf_start = -(k - 1) if k else 0
        self._n_in = 0
        self._n_out = 0

    def process(self, x: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
        """Feed one block (int16 or float, mono); returns the outputs now complete.

        The output dtype is ``dtype`` if given (int16 or float32, on the input's scale: int16
        output from float input means the float held int16-scaled values), else the input's.
        """
        x = np.asarray(x)
        if dtype is None:
            dtype = x.dtype if x.dtype == np.int16 else np.float32
        dtype = np.dtype(dtype)
        if x.ndim != 1:
            raise ValueError(f"resample expects mono (frames,) audio, got shape {x.shape}")
        if self.up == self.down:
            self._n_in += len(x)
            self._n_out += len(x)
            if dtype == np.int16 and x.dtype != np.int16:
                return np.clip(np.rint(x), -32768, 32767).astype(np.int16)
            return x.astype(dtype, copy=True)
        self._buf = np.concatenate([self._buf, x.astype(np.float32)])
        self._n_in += len(x)
        last_ready = self._n_in - 1 - self._k  # newest input index a complete window may end at
        n_end = ((last_ready + 1) * self.up + self.down - 1) // self.down if last_ready >= 0 else 0
        return self._emit(n_end, dtype)

    def flush(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Pad the end with silence, return the remaining outputs, and reset."""
        total = (self._n_in * self.up + self.down - 1) // self.down
        if self.up == self.down or total <= self._n_out:
            self.reset()
            return np.zeros(0, dtype=dtype)
        self._buf = np.concatenate([self._buf, np.zeros(2 * self._k + 1, dtype=np.float32)])
        out = self._emit(total, np.dtype(dtype))
        self.reset()
        return out

    def _emit(self, n_end: int, dtype: np.dtype) -> np.ndarray:
        """Compute outputs self._n_out .. n_end-1 from the buffer, then drop consumed input."""
        assert self._bank is not None
        k, up, down = self._k, self.up, self.down
        pieces = []
        if up == 1 and n_end > self._n_out:
            # Integer decimation (48 kHz -> 16 kHz): one phase, windows at a fixed stride,
            # so a strided view replaces the gather (several times faster).
            first = self._n_out * down - (k - 1) - self._buf_start
            windows = sliding_window_view(self._buf, 2 * k)[first::down][: n_end - self._n_out]
            pieces.append(np.einsum("ij,j->i", windows, self._bank[0]))
        elif up > 1:
            step = max(16, min(_CHUNK, _GATHER // (2 * k)))
            for start in range(self._n_out, n_end, step):
                n = np.arange(start, min(start + step, n_end), dtype=np.int64)
                first = (n * down) // up - (k - 1) - self._buf_start  # each window's first tap
                windows = self._buf[first[:, None] + np.arange(2 * k)[None, :]]
                pieces.append(np.einsum("ij,ij->i", windows, self._bank[(n * down) % up]))
        self._n_out = max(self._n_out, n_end)
        # Keep only the input the next output's window still needs.
        keep_from = (self._n_out * down) // up - (k - 1)
        drop = min(max(keep_from - self._buf_start, 0), len(self._buf))
        self._buf = self._buf[drop:]
        self._buf_start += drop
        y = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        if dtype == np.int16:
            return np.clip(np.rint(y), -32768, 32767).astype(np.int16)
        return y.astype(np.float32, copy=False)


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample mono int16 or float audio; returns the same dtype (float -> float32).

    The output has ``ceil(len(x) * dst_rate / src_rate)`` samples (of the approximated
    ratio, see ``ratio``) and is aligned with the input (no delay).
    """
    x = np.asarray(x)
    if src_rate == dst_rate:
        return x.copy() if x.dtype == np.int16 else x.astype(np.float32)
    r = StreamResampler(src_rate, dst_rate)
    head = r.process(x)
    tail = r.flush(head.dtype)
    return np.concatenate([head, tail])
