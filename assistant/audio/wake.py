"""The wake word: a microWakeWord model from the pymicro-wakeword wheel, run on microphone
frames.

The wheel ships the models (okay_nabu, hey_jarvis, alexa, hey_mycroft: about 50-80 kB of
TFLite each), their probability cut-offs and the TFLite C library, so nothing is
downloaded. Features are made every 10 ms; the model runs on every third feature slice
(its stride) and fires when the mean of its last outputs passes the cut-off.

``WakeWord.heard(frame)`` is one blocking native call per frame: the pipeline runs it in a
single worker thread of its own (the model keeps state between frames, so one thread, in
frame order).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from assistant.config import WakeConfig
from assistant.errors import ModelMissingError

log = logging.getLogger(__name__)

# After a detection the model's window still holds the word: without a pause it would fire
# again on the next slices of the same utterance.
_REFRACTORY_S = 1.0

_INSTALL_HINT = "install it with `pip install pymicro-wakeword==2.5.0` (or set wake.mode: none or phrase)"


def available() -> bool:
    """pymicro-wakeword can be imported (its wheel carries the models and the runtime)."""
    try:
        import pymicro_wakeword  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class WakeModel:
    """A model of the wheel: what it listens for and its files."""

    name: str
    phrase: str          # "Okay Nabu"
    cutoff: float        # the wheel's probability cut-off
    window: int          # outputs averaged
    config: Path


def builtin(name: str) -> WakeModel:
    """The wheel's model ``name`` (okay_nabu, ...), read from its JSON."""
    try:
        import pymicro_wakeword
    except Exception as e:
        raise ModelMissingError(f"wake.mode word needs the pymicro-wakeword package ({e}); "
                                f"{_INSTALL_HINT}") from None
    path = Path(pymicro_wakeword.__file__).parent / "models" / f"{name}.json"
    if not path.is_file():
        raise ModelMissingError(f"wake.word: the pymicro-wakeword wheel has no model {name!r} "
                                f"({path} not found)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    micro = meta["micro"]
    return WakeModel(name=name, phrase=meta["wake_word"], cutoff=float(micro["probability_cutoff"]),
                     window=int(micro["sliding_window_size"]), config=path)


def _tflite_library() -> Path:
    import pymicro_wakeword

    lib = next(iter((Path(pymicro_wakeword.__file__).parent / "lib").glob("*tensorflowlite_c.*")),
               None)
    if lib is None:
        raise ModelMissingError("the pymicro-wakeword wheel holds no tensorflowlite_c library for "
                                "this platform (wheels exist for x86_64 and aarch64 Linux)")
    return lib


class WakeWord:
    """One wake word model on a 16 kHz int16 stream: ``heard(frame) -> bool``."""

    def __init__(self, cfg: WakeConfig):
        self.model = builtin(cfg.word)
        self.cutoff = cfg.cutoff if cfg.cutoff is not None else self.model.cutoff
        self._mww = None
        self._features = None
        self._quiet_until = 0       # samples: no second detection before this
        self._samples = 0

    @property
    def phrase(self) -> str:
        return self.model.phrase

    def load(self) -> None:
        """Load the model (a native call: run it off the event loop)."""
        from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures

        meta = json.loads(self.model.config.read_text(encoding="utf-8"))
        self._mww = MicroWakeWord(
            self.model.name, wake_word=self.model.phrase,
            tflite_model=self.model.config.parent / meta["model"],
            probability_cutoff=self.cutoff, sliding_window_size=self.model.window,
            trained_languages=meta.get("trained_languages", []),
            libtensorflowlite_c_path=_tflite_library())
        self._features = MicroWakeWordFeatures()
        log.info("wake word %r (%s, cut-off %.2f)", self.model.phrase, self.model.name, self.cutoff)

    def heard(self, frame: bytes) -> bool:
        """Feed one frame (any length of 16 kHz mono int16); True when the wake word ends in it."""
        if self._mww is None:
            self.load()
        self._samples += len(frame) // 2
        fired = False
        for features in self._features.process_streaming(frame):
            prob = self._mww.process_streaming_prob(features)
            if prob is not None and prob > self.cutoff and self._samples >= self._quiet_until:
                fired = True
                self._quiet_until = self._samples + int(_REFRACTORY_S * 16000)
                log.debug("wake word %r: probability %.3f", self.model.phrase, prob)
        return fired

    def close(self) -> None:
        if self._mww is not None:
            self._mww.close()
            self._mww = None


def under_systemd() -> bool:
    """Started by systemd as a notify service (the installed unit): both variables are set
    by systemd itself; a shell that merely inherited one of them is not the service."""
    return bool(os.environ.get("INVOCATION_ID")) and bool(os.environ.get("NOTIFY_SOCKET"))


def resolve_mode(cfg: WakeConfig, *, service: bool) -> str:
    """wake.mode with auto decided: word for the installed service with the wheel present,
    none otherwise (``ask``, the demo, a daemon run by hand)."""
    if cfg.mode != "auto":
        return cfg.mode
    return "word" if service and available() else "none"


def phrase_of(word: str) -> str:
    """What a person says for wake.word (okay_nabu -> "Okay Nabu"), also without the wheel."""
    try:
        return builtin(word).phrase
    except ModelMissingError:
        return word.replace("_", " ").title()


def in_force(cfg: WakeConfig, *, service: bool) -> str:
    """What the daemon answers with this wake section (auto decided), as words that follow
    "the service ...", for `install` and the start-up log: a board that waits for its name
    says so."""
    mode = resolve_mode(cfg, service=service)
    chosen = f"wake.mode {cfg.mode}" + (f", here {mode}" if cfg.mode == "auto" else "")
    if mode == "word":
        return (f"answers only after the wake word \"{phrase_of(cfg.word)}\" ({chosen}; "
                f"wake.mode: none answers everything it hears)")
    if mode == "phrase":
        return (f"answers only speech that starts with a wake phrase ({', '.join(cfg.phrases)}) "
                f"({chosen}; wake.mode: none answers everything it hears)")
    return f"answers everything it hears ({chosen}; wake.mode: word needs the wake word first)"


class WakeListener:
    """A WakeWord driven from the event loop: each frame goes to one worker thread of its own
    (the model keeps state between frames, so one thread, in frame order), and the loop
    waits for that frame's answer before the VAD sees the frame, so a wake comes before the
    speech that follows it."""

    def __init__(self, cfg: WakeConfig):
        self.word = WakeWord(cfg)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wake")

    @property
    def phrase(self) -> str:
        return self.word.phrase

    async def load(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self.word.load)

    async def heard(self, frame: bytes) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.word.heard, frame)

    def close(self) -> None:
        self._thread.submit(self.word.close)
        self._thread.shutdown(wait=False)
