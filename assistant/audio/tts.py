"""Speech synthesis with piper (VITS voices in ONNX, on the CPU).

The pipeline hands over one sentence at a time (see sentences.py) and plays each result as
soon as it is ready, so the first sentence is heard while the LLM is still writing the rest.
``stream`` gives a sentence's audio a chunk at a time, the first one after a fraction of the
sentence's synthesis (see piper_stream.py). Audio comes back at the voice's own rate; the
pipeline resamples it to the speaker's.

Loudness: piper scales each sentence to full scale, so its level varies with the sentence
(peak-to-RMS 6 to 12 on the en_US voice). A streamed sentence's first chunk is played before
its peak is known, so a split voice gets one gain for all its sentences instead: the one that
brings a check sentence, measured at load, to ``TARGET_RMS``; the rare peak above ``KNEE``
is rounded off (``soft_limit``) rather than clipped.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np

from assistant.audio import piper_stream
from assistant.config import TtsConfig
from assistant.errors import AssistantError, ModelMissingError

log = logging.getLogger(__name__)

TARGET_RMS = 0.1
KNEE = 0.8
# What piper cannot take: its espeak bridge refuses a NUL (ValueError), and other control
# characters and lone surrogates fail or are read out as noise. Tab and newline stay.
_UNSPEAKABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# What a voice says at load to check its split and measure its level, by its language.
CHECK_TEXT = {"zh": "你好，今天有什么可以帮你的吗？", "": "Hello, how can I help you today?"}


class Synthesizer:
    """One piper voice; plain and blocking (the pipeline calls it in a thread)."""

    def __init__(self, voice_onnx: Union[str, Path], voice_json: Union[str, Path],
                 cfg: TtsConfig, key: str = "tts.voice"):
        self.voice_onnx = Path(voice_onnx)
        self.voice_json = Path(voice_json)
        self.cfg = cfg
        self.key = key  # the config key that chose this voice, for error messages
        self._voice = None  # piper.PiperVoice once loaded
        self._meta: Optional[dict] = None
        self._syn_config = None
        self._split: Optional[piper_stream.SplitVoice] = None
        self._gain = 1.0
        self.load_s = 0.0

    @property
    def name(self) -> str:
        return self.voice_onnx.name.removesuffix(".onnx")

    def _read_meta(self) -> dict:
        if self._meta is None:
            try:
                meta = json.loads(self.voice_json.read_text(encoding="utf-8"))
                int(meta["audio"]["sample_rate"])
            except FileNotFoundError:
                raise ModelMissingError(
                    f"{self.key}: the voice's config {self.voice_json} is missing; put the "
                    f".onnx.json that came with {self.voice_onnx.name} beside it") from None
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelMissingError(
                    f"{self.key}: {self.voice_json} is not a piper voice config ({e}); replace "
                    f"it with the .onnx.json that came with {self.voice_onnx.name}") from None
            self._meta = meta
        return self._meta

    @property
    def sample_rate(self) -> int:
        """The voice's native rate in Hz (known before load: it is read from the .onnx.json)."""
        return int(self._read_meta()["audio"]["sample_rate"])

    @property
    def language(self) -> str:
        """The voice's language code, e.g. en_US or zh_CN ('' when the config does not say)."""
        lang = self._read_meta().get("language") or {}
        return str(lang.get("code") or self._read_meta().get("espeak", {}).get("voice", ""))

    @property
    def loaded(self) -> bool:
        return self._voice is not None

    def load(self) -> None:
        """Load the voice (idempotent); ModelMissingError when it is absent or unreadable."""
        if self._voice is not None:
            return
        if not self.voice_onnx.is_file():
            raise ModelMissingError(
                f"{self.key}: piper voice file {self.voice_onnx} does not exist; put the voice "
                f"there or set {self.key} to another voice")
        meta = self._read_meta()
        from piper import PiperVoice, SynthesisConfig

        t0 = time.monotonic()
        try:
            voice = PiperVoice.load(self.voice_onnx, config_path=self.voice_json,
                                    download_dir=self.voice_onnx.parent)
        except Exception as e:  # onnxruntime reports a bad model as its own exception types
            raise ModelMissingError(
                f"{self.key}: cannot load the piper voice {self.voice_onnx} ({e}); the file is "
                f"incomplete or not a piper voice: download it again") from None
        speakers = voice.config.num_speakers
        speaker = self.cfg.speaker
        if speaker is not None and speakers > 1 and speaker >= speakers:
            raise AssistantError(f"tts.speaker is {speaker} but voice {self.name} has speakers "
                                 f"0 to {speakers - 1}; choose one of them")
        if speaker is not None and speakers <= 1:
            log.warning("tts.speaker=%s ignored: voice %s has a single speaker", speaker, self.name)
        # tts.length_scale is relative to the voice's own pace, which some voices set != 1.
        base_scale = float(meta.get("inference", {}).get("length_scale", 1.0))
        self._syn_config = SynthesisConfig(speaker_id=speaker,
                                           length_scale=base_scale * self.cfg.length_scale)
        self._voice = voice
        try:
            self._split_voice()
        except Exception as e:  # speaking whole sentences still works: never a failed load
            self._split = None
            log.warning("piper voice %s: spoken a sentence at a time (its split check failed: "
                        "%s: %s)", self.name, type(e).__name__, e)
        self.load_s = time.monotonic() - t0
        log.info("piper voice %s loaded in %.2f s (%d Hz)", self.name, self.load_s,
                 self.sample_rate)

    def _split_voice(self) -> None:
        """Cut the voice before its decoder to speak a chunk at a time (piper_stream)."""
        text = CHECK_TEXT["zh" if self.language.lower().startswith("zh") else ""]
        ids = next((p for p in self._voice.phonemize(text) if p), None)
        if ids is None:
            log.info("piper voice %s: spoken a sentence at a time (it says nothing of %r)",
                     self.name, text)
            return
        feeds = self._feeds(self._voice.phonemes_to_ids(ids))
        split, why = piper_stream.split(self.voice_onnx, self._voice.config.hop_length, feeds)
        if split is None:
            log.info("piper voice %s: spoken a sentence at a time: %s", self.name, why)
            return
        check = split.decode(split.latent(feeds), feeds)
        rms = float(np.sqrt(np.mean(np.square(check)))) if check.size else 0.0
        self._gain = TARGET_RMS / rms if rms > 1e-4 else 1.0
        self._split = split
        self._voice.session = None      # its two halves replace it (and its memory)
        log.info("piper voice %s: %s", self.name, why)

    def _feeds(self, phoneme_ids: list[int]) -> dict:
        """The voice's inputs for one sentence, as piper makes them."""
        cfg, syn = self._voice.config, self._syn_config
        scales = [cfg.noise_scale if syn.noise_scale is None else syn.noise_scale,
                  cfg.length_scale if syn.length_scale is None else syn.length_scale,
                  cfg.noise_w_scale if syn.noise_w_scale is None else syn.noise_w_scale]
        feeds = {"input": np.array([phoneme_ids], dtype=np.int64),
                 "input_lengths": np.array([len(phoneme_ids)], dtype=np.int64),
                 "scales": np.array(scales, dtype=np.float32)}
        if cfg.num_speakers > 1:
            speaker = cfg.default_speaker_id if syn.speaker_id is None else syn.speaker_id
            feeds["sid"] = np.array([speaker], dtype=np.int64)
        return feeds

    @property
    def streams(self) -> bool:
        """Whether ``stream`` gives a sentence in chunks (else in one piece)."""
        return self._split is not None

    def silence(self, ms: Optional[int] = None) -> np.ndarray:
        """``ms`` of silence (default ``tts.sentence_pause_ms``) at the voice's rate."""
        ms = self.cfg.sentence_pause_ms if ms is None else ms
        return np.zeros(self.sample_rate * ms // 1000, dtype=np.int16)

    def synthesize(self, text: str, pause_after: bool = False) -> np.ndarray:
        """Speak ``text`` (a sentence or a short text): int16 mono at ``sample_rate``.

        Piper speaks each sentence it finds separately; they are joined with
        ``tts.sentence_pause_ms`` of silence. The same pause follows the end only with
        ``pause_after`` (the pipeline's speaking stage puts its own gap between sentences).
        Text with nothing to say gives an empty array.
        """
        # Whole sentences: nobody listens before the end, so no chunking overhead.
        pieces = [c.pcm for c in self._speech(text, chunked=False)]
        if pieces and pause_after:
            pieces.append(self.silence())
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)

    def stream(self, text: str) -> Iterator["Chunk"]:
        """``text`` spoken a chunk at a time (int16 at ``sample_rate``), each chunk with the
        share of the text's speech it ends at. With a split voice the first chunk comes
        after a fraction of the synthesis; otherwise the text comes in one piece. Piper's
        sentences are joined by ``tts.sentence_pause_ms``."""
        return self._speech(text, chunked=True)

    def _speech(self, text: str, chunked: bool) -> Iterator["Chunk"]:
        if self._voice is None:
            raise AssistantError("Synthesizer used before load(); call load() first")
        text = speakable(text).strip()
        if not text:
            return
        t0 = time.monotonic()
        pause = self.silence()
        if self._split is None:
            joined: list[np.ndarray] = []
            for chunk in self._voice.synthesize(text, syn_config=self._syn_config):
                joined += [pause, chunk.audio_int16_array] if joined else [chunk.audio_int16_array]
            total = sum(len(a) for a in joined)
            pcm_chunks: Iterator[np.ndarray] = iter([np.concatenate(joined)] if joined else [])
        else:
            # The cheap half for every sentence first: the whole length is then known, so
            # each chunk can say how much of the text it ends at (barge-in keeps that much).
            feeds = [self._feeds(self._voice.phonemes_to_ids(p))
                     for p in self._voice.phonemize(text) if p]
            latents = [self._split.latent(f) for f in feeds]
            total = (sum(z.shape[-1] for z in latents) * self._split.hop
                     + len(pause) * max(0, len(latents) - 1))
            pcm_chunks = self._split_chunks(latents, feeds, pause, chunked)
        first, done = None, 0
        for pcm in pcm_chunks:
            first = time.monotonic() - t0 if first is None else first
            done += len(pcm)
            yield Chunk(pcm, done / total if total else 1.0)
        elapsed = time.monotonic() - t0
        seconds = done / self.sample_rate
        log.info("tts %s %.2f s of speech in %.2f s (rtf %.2f, first sound after %.2f s): %r",
                 self.name, seconds, elapsed, elapsed / seconds if seconds else 0.0,
                 first or 0.0, text[:60])

    def _split_chunks(self, latents: list, feeds: list, pause: np.ndarray,
                      chunked: bool) -> Iterator[np.ndarray]:
        for i, (z, f) in enumerate(zip(latents, feeds)):
            if i:
                yield pause
            for audio in self._split.chunks(z, f) if chunked else [self._split.decode(z, f)]:
                yield np.round(soft_limit(audio * self._gain) * 32767.0).astype(np.int16)


@dataclass(frozen=True)
class Chunk:
    """A piece of a text's speech: int16 PCM, and the share of the text's speech (0 to 1)
    that has been given once this piece is played."""

    pcm: np.ndarray
    end: float


def speakable(text: str) -> str:
    """``text`` without what piper cannot take (control characters, lone surrogates): each
    becomes a space, so the words around it stay apart."""
    return _UNSPEAKABLE.sub(" ", text)


def soft_limit(x: np.ndarray) -> np.ndarray:
    """Unchanged up to KNEE; above it, bent smoothly towards full scale, never past it."""
    over = np.abs(x) > KNEE
    if not over.any():
        return x
    y = x.copy()
    room = 1.0 - KNEE
    y[over] = np.sign(x[over]) * (KNEE + room * np.tanh((np.abs(x[over]) - KNEE) / room))
    return y


class VoiceSet:
    """The default voice and an optional Chinese one; picks by the answer's language."""

    def __init__(self, cfg: TtsConfig,
                 resolve_path: Optional[Callable[[str], Optional[Path]]] = None):
        """Resolve ``tts.voice`` and ``tts.voice_zh`` to files (ModelMissingError when one is
        missing); the voices are loaded by load()."""
        from assistant.audio.model_paths import resolve_voice

        default = Synthesizer(*resolve_voice(cfg, cfg.voice, resolve_path, key="tts.voice"),
                              cfg, key="tts.voice")
        zh = None
        if cfg.voice_zh and cfg.voice_zh != cfg.voice:
            zh = Synthesizer(*resolve_voice(cfg, cfg.voice_zh, resolve_path, key="tts.voice_zh"),
                             cfg, key="tts.voice_zh")
        self._init(default, zh)

    @classmethod
    def of(cls, default: Synthesizer, zh: Optional[Synthesizer] = None) -> "VoiceSet":
        """A set of already made synthesizers (tests, tools)."""
        vs = cls.__new__(cls)
        vs._init(default, zh)
        return vs

    def _init(self, default: Synthesizer, zh: Optional[Synthesizer]) -> None:
        self.default = default
        self.zh = zh
        self._warned_zh = False

    @property
    def sample_rate(self) -> int:
        """The default voice's rate (a Chinese voice may have its own: see for_language)."""
        return self.default.sample_rate

    def load(self) -> None:
        """Load every voice (blocking)."""
        self.default.load()
        if self.zh is not None:
            self.zh.load()

    def for_language(self, language: Optional[str]) -> Synthesizer:
        """The voice for ``language`` (en, zh, zh_CN, ...); the default for anything else."""
        if language and language.lower().startswith("zh"):
            if self.zh is not None:
                return self.zh
            if not self.default.language.lower().startswith("zh") and not self._warned_zh:
                log.warning("a Chinese answer is spoken with %s; set tts.voice_zh to a Chinese "
                            "piper voice (e.g. zh_CN-huayan-medium)", self.default.name)
                self._warned_zh = True
        return self.default


__all__ = ["Chunk", "Synthesizer", "VoiceSet", "soft_limit", "speakable"]
