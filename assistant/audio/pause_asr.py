"""Speech recognition in the pause, and quick endpointing.

When the person pauses (``PAUSE_MS`` of silence inside an utterance), whisper starts on the
speech so far in a worker thread: if the pause turns out to end the utterance, that
transcript is the turn's, so recognition overlaps the VAD's end-of-speech wait
(``vad.transcribe_in_pause``). If they speak on, the pass is simply not used. With
``vad.quick_end_ms``, a pass whose text reads as a finished sentence ends the utterance after
that much silence instead of ``vad.end_silence_ms``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

from assistant.audio.quick_end import complete
from assistant.audio.vad import Endpointer, Utterance, VadEvent
from assistant.config import VadConfig

log = logging.getLogger(__name__)

# A pause this long starts a pass over the speech so far.
PAUSE_MS = 120


class PauseTranscriber:
    def __init__(self, cfg: VadConfig, transcribe: Callable):
        self.cfg = cfg
        self.transcribe = transcribe            # pcm -> Transcript (blocking)
        # The pass over the speech so far, with the stream time of the last voiced frame it
        # covers; and the one pass allowed at a time.
        self._partial: Optional[tuple[float, asyncio.Task]] = None
        self._pass: Optional[asyncio.Task] = None

    @property
    def enabled(self) -> bool:
        return self.cfg.transcribe_in_pause or bool(self.cfg.quick_end_ms)

    def after_frame(self, ep: Endpointer, busy: bool) -> list[VadEvent]:
        """Call after each frame while in speech; returns the events of a quick end."""
        silence = ep.silence_ms
        if silence < PAUSE_MS:
            return []
        partial = self._partial
        if partial is not None and partial[0] != ep.speech_end_s:
            partial = self._partial = None        # they spoke on: that pass is stale
        if partial is None:
            # Never while a turn runs (its own work comes first), and one pass at a time.
            if not busy and (self._pass is None or self._pass.done()):
                self._pass = asyncio.create_task(
                    asyncio.to_thread(self.transcribe, ep.speech_so_far()))
                self._partial = (ep.speech_end_s, self._pass)
            return []
        task = partial[1]
        if (self.cfg.quick_end_ms and silence >= self.cfg.quick_end_ms and task.done()
                and not task.cancelled() and task.exception() is None
                and complete(task.result().text)):
            log.debug("quick end after %d ms of silence: %r", silence, task.result().text)
            return ep.cut_now()
        return []

    def take(self, utt: Utterance) -> Optional[asyncio.Task]:
        """The pass made over exactly this utterance's speech, if any (done or running)."""
        partial, self._partial = self._partial, None
        return partial[1] if partial is not None and partial[0] == utt.end_s else None
