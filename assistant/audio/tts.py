"""Speech synthesis with piper (VITS voices in ONNX, on the CPU).

The pipeline hands over one sentence at a time (see sentences.py) and plays each result as
soon as it is ready, so the first sentence is heard while the LLM is still writing the rest.
Audio comes back at the voice's own rate; the pipeline resamples it to the speaker's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from assistant.config import TtsConfig
from assistant.errors import AssistantError, ModelMissingError

log = logging.getLogger(__name__)


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
        self.load_s = time.monotonic() - t0
        log.info("piper voice %s loaded in %.2f s (%d Hz)", self.name, self.load_s,
                 self.sample_rate)

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
        if self._voice is None:
            raise AssistantError("Synthesizer used before load(); call load() first")
        text = text.strip()
        if not text:
            return np.zeros(0, dtype=np.int16)
        t0 = time.monotonic()
        pause = self.silence()
        pieces: list[np.ndarray] = []
        for chunk in self._voice.synthesize(text, syn_config=self._syn_config):
            if pieces:
                pieces.append(pause)
            pieces.append(chunk.audio_int16_array)
        if not pieces:
            return np.zeros(0, dtype=np.int16)
        if pause_after:
            pieces.append(pause)
        audio = np.concatenate(pieces)
        elapsed = time.monotonic() - t0
        seconds = len(audio) / self.sample_rate
        log.info("tts %s %.2f s of speech in %.2f s (rtf %.2f): %r", self.name, seconds,
                 elapsed, elapsed / seconds if seconds else 0.0, text[:60])
        return audio


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


__all__ = ["Synthesizer", "VoiceSet"]
