"""The assistant's event loop: one spoken question, as data, through every stage.

    mic frames -> VAD -> SpeechStarted -> vision job (snapshot + encode, overlapping speech)
                      -> Utterance -> ASR -> intent -> clear | exit | question
    question + image -> LLM pieces -> sentences -> TTS -> speaker

Two tasks joined by a queue: ``_listen`` turns audio into VAD events, ``_converse`` takes
utterances one at a time and answers them. Every blocking native call runs in a worker
thread; one lock keeps the LLM (and an encoder sharing its context) single-entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from assistant.audio.asr import Transcript
from assistant.audio.base import AudioSink, AudioSource
from assistant.audio.sentences import SentenceSplitter
from assistant.audio.vad import Endpointer, SpeechDiscarded, SpeechStarted, Utterance
from assistant.audio.voice_out import VoiceOut
from assistant.config import Config
from assistant.dialogue import Conversation
from assistant.errors import AssistantError, BackendError, ContextFullError, DeviceError
from assistant.intent import Intent, IntentClassifier
from assistant.llm.base import ImageEmbedding, LLMBackend, stream_turn
from assistant.turn import Turn
from assistant.vision.snapshot import VisionStage

log = logging.getLogger(__name__)

# Sentence cuts for speech (see assistant.audio.sentences): the first one early, then whole.
_FIRST_CUT_CHARS = 40
_RUN_ON_CHARS = 100

# Reopening a lost microphone: wait this long between tries, growing to the last value.
_REOPEN_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class Components:
    """Everything the loop drives, built and loaded by ``assistant.components``."""

    source: AudioSource
    sink: AudioSink
    asr: object                       # .transcribe(pcm) -> Transcript
    voices: object                    # .for_language(lang) -> synthesizer
    llm: Optional[LLMBackend]
    llm_problem: str = ""             # why there is no LLM (llm is None), for the log and notes
    camera: object = None
    encoder: object = None
    camera_down: str = ""             # why the camera did not open at start (retried later)
    llm_lock: threading.Lock = field(default_factory=threading.Lock)


class Pipeline:
    def __init__(self, cfg: Config, parts: Components, *,
                 on_turn: Optional[Callable[[Turn], None]] = None,
                 notify: Optional[Callable[[str], None]] = None):
        self.cfg = cfg
        self.parts = parts
        self.on_turn = on_turn
        self.notify = notify or (lambda status: None)
        self.intents = IntentClassifier(cfg.intent)
        self.endpointer = Endpointer(cfg.vad)
        self.voice = VoiceOut(parts.voices, parts.sink, cfg.tts.sentence_pause_ms)
        self.vision = VisionStage(parts.camera, parts.encoder, camera_down=bool(parts.camera_down))
        self.conversation = (Conversation(cfg.llm, parts.llm, cfg.path(cfg.logging.transcript))
                             if parts.llm is not None else None)
        self.turns: list[Turn] = []
        self._utterances: asyncio.Queue = asyncio.Queue()
        self._answering: Optional[asyncio.Task] = None
        self._barged_in = False
        self._exit_code: Optional[int] = None

    # ------------------------------------------------------------------ the loop

    async def run(self, greet: bool = True) -> int:
        """Serve until the source ends (a file) or an exit phrase says stop; returns the exit code."""
        if greet and self.cfg.persona.greeting:
            await self.voice.say([self.cfg.persona.greeting], self._reply_language(None))
        self.notify("STATUS=listening")
        listen = asyncio.create_task(self._listen(), name="listen")
        converse = asyncio.create_task(self._converse(), name="converse")
        try:
            done, _ = await asyncio.wait({listen, converse}, return_when=asyncio.FIRST_COMPLETED)
            if listen in done:
                listen.result()          # a fatal listener error surfaces here
                await converse           # the file ended: answer what is queued
            else:
                converse.result()
        finally:
            for t in (listen, converse):
                t.cancel()
            await asyncio.gather(listen, converse, return_exceptions=True)
        return self._exit_code or 0

    async def _listen(self) -> None:
        """Audio -> VAD events; the microphone is reopened if it goes away."""
        backoff = 0
        while True:
            try:
                await self.parts.source.open()
                if backoff:
                    log.info("microphone %s is back", self.parts.source.name)
                backoff = 0
                async for frame in self.parts.source.frames():
                    self._on_frame(frame)
                    # A queue that is never empty never suspends its reader: after a burst
                    # (a stalled device catching up) let the other tasks run between frames.
                    await asyncio.sleep(0)
                for ev in self.endpointer.flush():
                    self._on_vad(ev)
                await self._utterances.put(None)   # a file source ended: no more questions
                return
            except DeviceError as e:
                delay = _REOPEN_BACKOFF_S[min(backoff, len(_REOPEN_BACKOFF_S) - 1)]
                log.error("%s; retrying in %.0f s", e, delay)
                self.notify(f"STATUS=microphone unavailable: {e}")
                backoff += 1
                self.endpointer.reset()
                await self.parts.source.close()
                await asyncio.sleep(delay)

    def _on_frame(self, frame: bytes) -> None:
        if self.voice.speaking and not self.cfg.audio.barge_in:
            # Gated: the assistant would hear itself. Start clean when it stops talking.
            if self.endpointer.in_speech:
                self.endpointer.reset()
            return
        for ev in self.endpointer.process(frame):
            self._on_vad(ev)

    def _on_vad(self, ev) -> None:
        if isinstance(ev, SpeechStarted):
            if self.voice.speaking and self.cfg.audio.barge_in:
                self._barge_in()
            if self.cfg.vision.on_speech_start:
                self.vision.start()
        elif isinstance(ev, SpeechDiscarded):
            self.vision.discard()
        elif isinstance(ev, Utterance):
            self._utterances.put_nowait((ev, time.monotonic()))

    def _barge_in(self) -> None:
        log.info("barge-in: the person spoke over the answer")
        self.voice.interrupt()
        if self._answering is not None and not self._answering.done():
            self._barged_in = True
            self._answering.cancel()

    async def _converse(self) -> None:
        while True:
            item = await self._utterances.get()
            if item is None:
                return
            utt, cut_at = item
            turn = Turn(speech_end=cut_at)
            self._answering = asyncio.create_task(self._turn(utt, turn))
            try:
                await self._answering
            except asyncio.CancelledError:
                if not self._barged_in:
                    raise               # shutdown, not a barge-in
                self._barged_in = False
                turn.note = "interrupted by the person speaking"
            except AssistantError as e:
                # One failed turn must not end a daemon that runs for weeks.
                log.error("turn %d failed: %s", turn.id, e)
                turn.note = str(e)
            except Exception as e:
                log.exception("turn %d failed", turn.id)
                turn.note = f"internal error: {type(e).__name__}: {e}"
            self._finish(turn)
            if self._exit_code is not None:
                return

    # ------------------------------------------------------------------ one turn

    async def _turn(self, utt: Utterance, turn: Turn) -> None:
        heard = await self._transcribe(utt, turn)
        if heard is None:
            self.vision.discard()
            return
        intent = self.intents.classify(heard.text)
        turn.intent = intent.value
        lang = self._reply_language(heard)
        if intent is Intent.QUESTION:
            await self._answer(heard.text, lang, turn)
            return
        self.vision.discard()
        if intent is Intent.CLEAR:
            await self._forget()
            await self.voice.say([self.cfg.persona.cleared], lang, turn)
        elif intent is Intent.EXIT:
            await self._forget()
            await self.voice.say([self.cfg.persona.goodbye], lang, turn)
            if self.cfg.intent.exit_action == "stop":
                self._exit_code = 0

    async def _transcribe(self, utt: Utterance, turn: Turn) -> Optional[Transcript]:
        t0 = time.monotonic()
        heard: Transcript = await asyncio.to_thread(self.parts.asr.transcribe, utt.pcm)
        turn.took("asr", time.monotonic() - t0)
        turn.transcript, turn.language = heard.text, heard.language
        if not heard.accepted:
            turn.intent = Intent.NOTHING.value
            turn.note = heard.reason
            return None
        return heard

    async def _answer(self, question: str, lang: str, turn: Turn) -> None:
        image = await self._image(turn)
        if self.parts.llm is None:
            turn.note = self.parts.llm_problem
            await self.voice.say([self._sorry("no-model")], "en", turn)
            return
        sentences: asyncio.Queue = asyncio.Queue()
        speaking = asyncio.create_task(self.voice.say(sentences, lang, turn))
        try:
            turn.answer = await self._generate(question, image, sentences, turn)
            self.conversation.record(question, turn.answer, image is not None,
                                     turn=turn.id, timings_ms=turn.summary())
        except ContextFullError as e:
            turn.note = str(e)
            sentences.put_nowait(self._sorry("context"))
        except BackendError as e:
            log.error("the language model failed: %s", e)
            turn.note = str(e)
            sentences.put_nowait(self._sorry("backend"))
        finally:
            sentences.put_nowait(None)
            try:
                await speaking
            except asyncio.CancelledError:
                speaking.cancel()
                raise

    async def _image(self, turn: Turn) -> Optional[ImageEmbedding]:
        t0 = time.monotonic()
        res = await self.vision.take()
        if res is None:
            return None
        turn.took("vision_wait", time.monotonic() - t0)
        turn.took("snapshot", res.snapshot_s)
        turn.took("encode", res.encode_s)
        if res.error:
            turn.note = f"answered without the image: {res.error}"
        turn.with_image = res.embedding is not None
        if res.embedding is not None:
            turn.counts["image_tokens"] = res.embedding.n_tokens
        return res.embedding

    async def _generate(self, question: str, image: Optional[ImageEmbedding],
                        sentences: asyncio.Queue, turn: Turn) -> str:
        """One LLM turn, streamed sentence by sentence into the speaking stage."""
        llm, conv = self.parts.llm, self.conversation
        if await self._locked(conv.make_room, question, image):
            turn.note = "the conversation filled the context and was cleared"
        # Until the first sound, a long opening sentence is cut at its first comma past
        # _FIRST_CUT_CHARS: the person hears something sooner; later sentences stay whole.
        splitter = SentenceSplitter(max_chars=_FIRST_CUT_CHARS)
        pieces: list[str] = []
        stats: list = []
        t0 = time.monotonic()
        for attempt in (1, 2):
            try:
                stream = stream_turn(llm, question, image, self.cfg.llm.keep_history, stats,
                                     lock=self.parts.llm_lock)
                async with contextlib.aclosing(stream):
                    async for piece in stream:
                        turn.mark("llm_first_piece")
                        pieces.append(piece)
                        for s in splitter.feed(piece):
                            turn.mark("first_sentence")
                            splitter.max_chars = _RUN_ON_CHARS
                            sentences.put_nowait(s)
                break
            except ContextFullError:
                # The budget estimate was short: the policy decides, once.
                if attempt == 2 or pieces or self.cfg.llm.on_context_full != "clear":
                    raise
                await self._locked(conv.clear)
                turn.note = "the conversation filled the context and was cleared"
        for s in splitter.flush():
            turn.mark("first_sentence")
            sentences.put_nowait(s)
        turn.took("llm", time.monotonic() - t0)   # the whole answer
        if stats:
            st = stats[0]
            turn.counts.update(prompt_tokens=st.prompt_tokens, generated_tokens=st.generated_tokens,
                               context_used=llm.tokens_used)
        return "".join(pieces).strip()

    async def _locked(self, fn, *args):
        """Run a native call in a worker thread under the LLM lock.

        The lock is taken inside the thread, so a cancelled caller can never leave it held.
        """
        def call():
            with self.parts.llm_lock:
                return fn(*args)
        return await asyncio.to_thread(call)

    async def _forget(self) -> None:
        if self.conversation is not None:
            await self._locked(self.conversation.clear)

    # ------------------------------------------------------------------ helpers

    def _reply_language(self, heard: Optional[Transcript]) -> str:
        if self.cfg.persona.language != "auto":
            return self.cfg.persona.language
        if heard is not None and heard.language in ("en", "zh"):
            return heard.language
        return "zh" if self.cfg.asr.language == "zh" else "en"

    def _sorry(self, why: str) -> str:
        if why == "no-model":
            return ("My language model is not installed yet, so I cannot answer. "
                    "The command that installs it is in the log.")
        if why == "context":
            return "Sorry, our conversation is too long for me. Say clear to start over."
        return "Sorry, something went wrong while I was thinking. Please ask again."

    def _finish(self, turn: Turn) -> None:
        turn.mark("done")
        self.turns.append(turn)
        turn.log_line()
        self.notify(f"STATUS=turn {turn.id}: {turn.intent or 'nothing'}")
        if self.on_turn is not None:
            self.on_turn(turn)
