"""Sample conversion, mixdown and resampling (assistant/audio/resample.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from assistant.audio.resample import (StreamResampler, float_to_int16, int16_to_float, resample,
                                      to_mono)

RATE_PAIRS = [(48000, 16000), (44100, 16000), (22050, 16000), (8000, 16000), (32000, 16000),
              (16000, 22050), (16000, 48000), (22050, 48000), (22050, 44100), (11025, 16000)]


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def rms_db(x: np.ndarray, amp: float) -> float:
    """Level of x relative to a sine of amplitude amp, in dB."""
    return 20 * math.log10(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) / (amp / math.sqrt(2)))


def test_int16_float_round_trip_is_exact():
    x = np.array([-32768, -1, 0, 1, 12345, 32767], dtype=np.int16)
    f = int16_to_float(x)
    assert f.dtype == np.float32 and f.min() >= -1.0 and f.max() < 1.0
    assert np.array_equal(float_to_int16(f), x)


def test_float_to_int16_clips_instead_of_wrapping():
    y = float_to_int16(np.array([1.5, 1.0, -1.0, -3.0, 0.5], dtype=np.float32))
    assert y.tolist() == [32767, 32767, -32768, -32768, 16384]


def test_to_mono_averages_channels_and_keeps_dtype():
    st = np.array([[100, 201], [-5, -6], [32767, 32767]], dtype=np.int16)
    m = to_mono(st)
    assert m.dtype == np.int16 and m.tolist() == [150, -6, 32767]  # rounded half to even
    f = to_mono(np.array([[0.5, -0.5], [1.0, 0.0]], dtype=np.float32))
    assert f.dtype == np.float32 and f.tolist() == [0.0, 0.5]
    mono = np.arange(5, dtype=np.int16)
    assert to_mono(mono) is mono
    assert to_mono(mono[:, None]).tolist() == mono.tolist()
    with pytest.raises(ValueError):
        to_mono(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("src,dst", RATE_PAIRS)
def test_length_and_accuracy_of_a_tone(src, dst):
    x = sine(1000, src, 0.5)
    y = resample(x, src, dst)
    assert y.dtype == np.float32
    assert len(y) == math.ceil(len(x) * dst / src)
    expected = sine(1000, dst, len(y) / dst)[: len(y)]
    edge = dst // 100  # the first and last 10 ms see the silence beyond the signal
    assert np.abs(y - expected)[edge:-edge].max() < 1e-3


@pytest.mark.parametrize("src,dst,freq", [(48000, 16000, 10000), (48000, 16000, 20000),
                                          (44100, 16000, 12000), (22050, 16000, 9000)])
def test_downsampling_does_not_alias(src, dst, freq):
    y = resample(sine(freq, src, 1.0), src, dst)
    assert rms_db(y[500:-500], 0.5) < -60


@pytest.mark.parametrize("src,dst", [(48000, 16000), (44100, 16000), (16000, 48000)])
def test_speech_band_is_flat(src, dst):
    for freq in (100, 1000, 3000, 6000):
        y = resample(sine(freq, src, 1.0), src, dst)
        assert abs(rms_db(y[500:-500], 0.5)) < 0.1, freq


def test_silence_stays_silent_and_dc_stays_put():
    assert not resample(np.zeros(4410, np.int16), 44100, 16000).any()
    y = resample(np.full(44100, 1000, np.int16), 44100, 16000)
    assert np.all(y[200:-200] == 1000)


def test_int16_in_int16_out_and_overshoot_is_clipped():
    # A full-scale square wave rings past full scale; it must clip, not wrap to negative.
    x = np.where((np.arange(4800) // 100) % 2 == 0, 32767, -32768).astype(np.int16)
    y = resample(x, 48000, 16000)
    assert y.dtype == np.int16
    assert y.max() == 32767 and y.min() == -32768
    highs = y[(np.arange(len(y)) * 3 // 100) % 2 == 0][20:]
    assert (highs[highs > 30000] > 0).all()


def test_same_rate_is_a_copy():
    x = np.arange(10, dtype=np.int16)
    y = resample(x, 16000, 16000)
    assert np.array_equal(x, y) and y is not x


@pytest.mark.parametrize("src,dst", RATE_PAIRS)
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_streaming_matches_one_shot(src, dst, dtype):
    rng = np.random.default_rng(src + dst)
    x = rng.standard_normal(src // 2) * (8000 if dtype is np.int16 else 0.2)
    x = x.astype(dtype)
    whole = resample(x, src, dst)
    r = StreamResampler(src, dst)
    parts, i = [], 0
    while i < len(x):  # blocks of every size, 1 sample up to ~90 ms
        n = int(rng.integers(1, src // 11))
        parts.append(r.process(x[i:i + n]))
        i += n
    parts.append(r.flush(dtype))
    streamed = np.concatenate(parts)
    assert streamed.dtype == whole.dtype
    assert len(streamed) == len(whole)
    tol = 1 if dtype is np.int16 else 1e-5  # float summation order may differ by one ulp
    assert np.abs(streamed.astype(np.float64) - whole.astype(np.float64)).max() <= tol


def test_stream_latency_is_small_and_flush_resets():
    r = StreamResampler(48000, 16000)
    out = r.process(np.ones(4800, np.float32))
    assert 1500 <= len(out) <= 1600  # under 2 ms of input held back
    tail = r.flush()
    assert len(out) + len(tail) == 1600
    again = r.process(np.ones(4800, np.float32))
    assert len(again) == len(out)  # the state starts over after a flush


def test_float_input_with_int16_output():
    r = StreamResampler(16000, 16000)
    assert r.process(np.array([1.4, -2.6, 40000.0]), dtype=np.int16).tolist() == [1, -3, 32767]
    r = StreamResampler(48000, 16000)
    y = r.process(np.full(4800, 99.6, np.float32), dtype=np.int16)
    assert y.dtype == np.int16 and y[100] == 100


def test_bad_arguments():
    with pytest.raises(ValueError):
        StreamResampler(0, 16000)
    with pytest.raises(ValueError):
        resample(np.zeros((10, 2), np.float32), 48000, 16000)


@pytest.mark.parametrize("src", [44101, 191999, 470001])
def test_odd_rates_are_approximated_and_stay_accurate(src):
    from assistant.audio.resample import MAX_PHASES, ratio

    up, down = ratio(src, 16000)
    assert up <= MAX_PHASES
    assert abs(up / down * src / 16000 - 1) < 5e-4                  # the pitch: under 0.05 %
    x = sine(1000.0, src, 0.5)
    y = resample(x, src, 16000)
    assert abs(len(y) - len(x) * 16000 / src) <= 2
    # Still a 1 kHz tone at full level.
    spectrum = np.abs(np.fft.rfft(y[1000:-1000] * np.hanning(len(y) - 2000)))
    peak = np.argmax(spectrum) * 16000 / (len(y) - 2000)
    assert abs(peak - 1000.0) < 10 and abs(rms_db(y[1000:-1000], 0.5)) < 0.2


def test_a_hostile_rate_costs_little_memory_and_the_cache_is_bounded():
    import tracemalloc

    from assistant.audio import resample as rs

    rs._BANKS.clear()
    x = sine(440.0, 470001, 0.2)
    tracemalloc.start()
    try:
        resample(x, 470001, 16000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20, f"{peak / 2**20:.0f} MB"         # it was 2 GB
    # Many distinct odd rates: the banks kept stay within CACHE_BYTES.
    for src in range(44101, 44101 + 40 * 997, 997):
        resample(x[:2000], src, 16000)
    assert 0 < rs._BANKS.nbytes <= rs.CACHE_BYTES
    rs._BANKS.clear()
