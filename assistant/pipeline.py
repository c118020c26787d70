"""The voice front-end: one spoken question, as data, through every stage.

    mic frames -> VAD -> SpeechStarted -> onset work: scene snapshot (+ encode and prefill
                                         when the scene is new)
                      -> a pause -> ASR of the speech so far (used if the pause ends it)
                      -> Utterance -> ASR -> intent -> clear | exit | question
    question -> conversation (budget, scene memory, the LLM) -> pieces -> sentences
             -> TTS -> speaker

Two tasks joined by a queue: ``_listen`` turns audio into VAD events, ``_converse`` takes
utterances one at a time and answers them through the conversation, the component every
front-end shares. Every blocking native call runs in a worker thread.

With ``wake.mode`` word or phrase, speech becomes a question only when addressed
(assistant.addressing): the wake word model hears each frame before the VAD does, and an
utterance nobody addressed is dropped before whisper (word) or after it (phrase).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from assistant.addressing import BY_PHRASE, BY_WORD, WOKEN, Addressing
from assistant.audio.asr import Transcript
from assistant.audio.base import SAMPLE_RATE, AudioSink, AudioSource
from assistant.audio.earcon import chime
from assistant.audio.echo import EchoGuard
from assistant.audio.pause_asr import PauseTranscriber
from assistant.audio.sentences import SentenceSplitter
from assistant.audio.smart_turn import make_turn_ender
from assistant.audio.vad import Endpointer, SpeechDiscarded, SpeechStarted, Utterance
from assistant.audio.voice_out import VoiceOut
from assistant.audio.wake import WakeListener, in_force, resolve_mode
from assistant.config import Config
from assistant.conversation import Conversation, Request, TurnGate
from assistant.errors import AssistantError, ContextFullError, DeviceError
from assistant.health import HEALTH, StageOverrun
from assistant.intent import Intent, IntentClassifier
from assistant.llm.base import LLMBackend
from assistant.onset import OnsetWork
from assistant.turn import Turn
from assistant.vision.scene import Scene

log = logging.getLogger(__name__)

# Sentence cuts for speech (see assistant.audio.sentences): the first one early
# (tts.first_clause_chars), then whole unless a run-on passes this length.
_RUN_ON_CHARS = 100

# Reopening a lost microphone: wait this long between tries, growing to the last value.
_REOPEN_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)

# Turns kept in memory for `ask` and the tests; the transcript keeps all of them.
_TURNS_KEPT = 200

# Queued by the listener when a wake had no question after it within wake.listen_s.
_SORRY = object()


class _NoTurn(Exception):
    """The utterance makes no turn (not addressed, or a wake phrase said alone)."""


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
    smart_turn: object = None         # a loaded SmartTurnModel to share; None: loaded at run


def make_conversation(cfg: Config, parts: Components, transcript=None,
                      gate: Optional[TurnGate] = None) -> Conversation:
    """The conversation over the loaded parts (its scene owns the camera and encoder);
    ``gate`` sets the turn queue's limits (the HTTP front-end's)."""
    scene = Scene(parts.camera, parts.encoder, cfg.vision, camera_down=bool(parts.camera_down))
    return Conversation(cfg, parts.llm, scene=scene, transcript=transcript, lock=parts.llm_lock,
                        gate=gate)


class Pipeline:
    def __init__(self, cfg: Config, parts: Components, *,
                 conversation: Optional[Conversation] = None,
                 on_turn: Optional[Callable[[Turn], None]] = None,
                 notify: Optional[Callable[[str], None]] = None,
                 recorder=None, service: bool = False):
        self.cfg = cfg
        self.parts = parts
        self.on_turn = on_turn
        self.recorder = recorder      # assistant.debug_recording.DebugRecorder, or None
        self.notify = notify or (lambda status: None)
        self.intents = IntentClassifier(cfg.intent)
        # vad.end_of_turn: smart_turn: the model ends a complete question after a short
        # silence; the endpointer's own limit is then the longer max_pause_ms.
        self.turn_end = make_turn_ender(cfg, parts.smart_turn)
        self.endpointer = Endpointer(cfg.vad, cfg.vad.max_pause_ms if self.turn_end else None)
        # With barge-in the microphone is open while the assistant speaks: its own voice
        # coming back from the speaker must not count as a person talking over it.
        self.echo = (EchoGuard(cfg.audio.echo_match)
                     if cfg.audio.barge_in and cfg.audio.echo_match > 0 else None)
        self.voice = VoiceOut(parts.voices, parts.sink, cfg.tts.sentence_pause_ms, echo=self.echo)
        self.conversation = conversation or make_conversation(cfg, parts)
        self.scene = self.conversation.scene
        self.turns: collections.deque[Turn] = collections.deque(maxlen=_TURNS_KEPT)
        self._utterances: asyncio.Queue = asyncio.Queue()
        self._snapshot: Optional[asyncio.Task] = None   # the scene job of the speech now
        self.onset = OnsetWork(cfg, self.conversation)
        self.pause_asr = PauseTranscriber(cfg.vad, lambda pcm: self.parts.asr.transcribe(pcm))
        self._in_turn = False
        self._barged_in = False
        self._exit_code: Optional[int] = None
        # Listening only when addressed; ``service``: the installed daemon (wake.mode auto).
        mode = resolve_mode(cfg.wake, service=service)
        log.info("the assistant %s", in_force(cfg.wake, service=service))
        self.wake = WakeListener(cfg.wake) if mode == "word" else None
        self.addressing = Addressing(cfg.wake, mode, self.wake.phrase if self.wake else None)
        self._addressed = ""          # why the speech in progress is addressed; "": it is not
        self.skipped: collections.deque[dict] = collections.deque(maxlen=_TURNS_KEPT)
        self._earcon: Optional[asyncio.Task] = None
        self._state = ""
        self._progress_at = time.monotonic()
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ the loop

    async def run(self, greet: bool = True) -> int:
        """Serve until the source ends (a file) or an exit phrase says stop; returns the exit code."""
        language = self._reply_language(None)
        greeting = self.addressing.greeting(self.cfg.persona.lines(language), language)
        if self.wake is not None:
            await self.wake.load()
        if greet and greeting:
            log.info("greeting: %s", greeting)
            await self.voice.say([greeting], language)
        if self.turn_end is not None and not self.turn_end.model.loaded:
            await asyncio.to_thread(self.turn_end.model.load)
        self._update_state()
        listen = asyncio.create_task(self._listen(), name="listen")
        converse = asyncio.create_task(self._converse(), name="converse")
        watch = (asyncio.create_task(self.scene.watch(self.idle, self.conversation.scene_reference),
                                     name="scene-watch")
                 if self.cfg.vision.watch and self.scene.enabled else None)
        self._tasks = [t for t in (listen, converse, watch) if t is not None]
        try:
            done, _ = await asyncio.wait({listen, converse}, return_when=asyncio.FIRST_COMPLETED)
            if listen in done:
                listen.result()          # a fatal listener error surfaces here
                await converse           # the file ended: answer what is queued
            else:
                converse.result()
        finally:
            tasks = [t for t in (listen, converse, watch) if t is not None]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.conversation.finish_idle_work()
            await self.onset.finish()
            if self.wake is not None:
                self.wake.close()
        return self._exit_code or 0

    def cancel(self) -> None:
        """Cancel the loop's tasks that are still running, again: a stop does not wait for
        a turn that does not end (a runtime that ignores the abort)."""
        for task in self._tasks:
            if not task.done():
                task.cancel()

    def idle(self) -> bool:
        """Nobody speaks and nothing is being answered or queued: the scene may be watched
        (and a person waiting for the answer would speak again)."""
        return not (self._in_turn or self.voice.busy or self.voice.speaking
                    or self.endpointer.in_speech or not self._utterances.empty())

    def quiet(self) -> bool:
        """Nobody speaks and no question is on its way to the model (an answer may be
        spoken): the model's idle work may run."""
        return not (self.endpointer.in_speech or not self._utterances.empty()
                    or (self._in_turn and not self.voice.busy))

    async def _listen(self) -> None:
        """Audio -> VAD events; the microphone is reopened if it goes away."""
        backoff = 0
        while True:
            try:
                await self.parts.source.open()
                if backoff:
                    log.info("microphone %s is back", self.parts.source.name)
                    self._state = ""
                    self._update_state()
                backoff = 0
                async for frame in self.parts.source.frames():
                    await self._hear_wake(frame)
                    self._on_frame(frame)
                    self._update_state()
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
                self._drop_speech()
                if self.echo is not None:
                    self.echo.new_stream()
                await self.parts.source.close()
                await asyncio.sleep(delay)

    def _drop_speech(self) -> None:
        """Forget speech in progress, and the snapshot taken for it (never answer a later
        question with it)."""
        if self.endpointer.in_speech:
            self.endpointer.reset()
            self.addressing.speech_discarded()      # a wake this speech took waits on
        self.onset.drop(self._snapshot)
        self._snapshot = None

    async def _hear_wake(self, frame: bytes) -> None:
        """Before the VAD's turn-making: the wake word model hears the frame (in its thread)."""
        if self.addressing.heard(len(frame) / 2 / SAMPLE_RATE):
            self._utterances.put_nowait(_SORRY)       # woken, and no question came
        # Its own voice must not wake it; talking over an answer needs no wake anyway.
        if self.wake is not None and not self.voice.speaking and await self.wake.heard(frame):
            self._woken(BY_WORD)

    def _woken(self, kind: str) -> None:
        self.addressing.woken(kind)
        if kind == BY_WORD and self.endpointer.in_speech:
            self._drop_speech()          # the wake word is no question; the question follows
        if self.cfg.wake.earcon and not self.voice.busy:
            self._earcon = asyncio.create_task(self._chime())

    async def _chime(self) -> None:
        try:
            await self.parts.sink.play(chime(self.parts.sink.sample_rate))
        except Exception as e:       # a speaker gone must not end the conversation
            log.warning("cannot play the wake chime: %s", e)

    def _on_frame(self, frame: bytes) -> None:
        if self.echo is not None:
            self.echo.heard(frame)
        if self.voice.speaking and not self.cfg.audio.barge_in:
            # Gated: the assistant would hear itself. Start clean when it stops talking.
            if self.endpointer.in_speech:
                self._drop_speech()
            return
        for ev in self.endpointer.process(frame):
            self._on_vad(ev)
        # Whisper in the pause and Smart Turn only for speech that may become a question
        # (a television nobody addressed costs them nothing).
        heeded = self._addressed or self.addressing.mode == "phrase"
        if self.pause_asr.enabled and self.endpointer.in_speech and heeded:
            for ev in self.pause_asr.after_frame(self.endpointer, busy=self._in_turn):
                self._on_vad(ev)
        if self.turn_end is not None and self.endpointer.in_speech and heeded:
            for ev in self.turn_end.after_frame(self.endpointer):
                self._on_vad(ev)

    def _heard_while_speaking(self) -> bool:
        """Was the answer playing when the frame now handled was captured? On a busy CPU
        frames arrive late: one may hold the answer's last words after it has ended."""
        if self.echo is None:
            return self.voice.speaking
        return self.voice.speaking_at(self.echo.captured_at)

    def _on_vad(self, ev) -> None:
        if isinstance(ev, SpeechStarted):
            self._addressed = self.addressing.speech_started()
            if not self._addressed and self.addressing.mode == "word":
                return           # not for the assistant: no barge-in, no snapshot
            if self._heard_while_speaking() and self.cfg.audio.barge_in:
                if self.echo is not None and self.echo.is_echo():
                    # Its own voice: drop this "speech" and keep talking. The VAD starts
                    # afresh, so a person joining in is checked again within a few frames.
                    log.debug("the microphone hears the assistant's own voice; not a barge-in")
                    self.endpointer.reset()
                    return
                self._barge_in()
            if self.cfg.vision.on_speech_start:
                self.onset.drop(self._snapshot)
                self._snapshot = self.onset.start()
        elif isinstance(ev, SpeechDiscarded):
            self.addressing.speech_discarded()
            self.onset.drop(self._snapshot)
            self._snapshot = None
        elif isinstance(ev, Utterance):
            if not self._addressed and self.addressing.mode == "word":
                self._skip(ev, self.addressing.not_addressed_note())   # whisper never runs
                return
            if self._addressed:
                self.addressing.taken()
            # The snapshot travels with its utterance: never another question's picture. A
            # pass made in the pause over exactly this speech saves the turn its own.
            heard = self.pause_asr.take(ev)
            self._utterances.put_nowait((ev, time.monotonic(), self._snapshot, heard,
                                         self._addressed))
            self._snapshot = None

    def _barge_in(self) -> None:
        """The person talks over the answer: stop speaking and generating. The turn ends by
        itself and keeps what was heard."""
        log.info("barge-in: the person spoke over the answer")
        self._barged_in = True
        self.voice.interrupt()
        self.conversation.abort()

    async def _converse(self) -> None:
        while True:
            item = await self._utterances.get()
            if item is None:
                return
            if item is _SORRY:
                await self._sorry(self._reply_language(None))
                self.skipped.append({"at_s": round(self.addressing.now, 2), "note":
                                     "woken, but no question started within wake.listen_s"})
                continue
            utt, cut_at, snapshot, heard, addressed = item
            turn = Turn(speech_end=cut_at, last_word=cut_at - utt.silence_ms / 1000.0)
            turn.addressed = addressed if self.addressing.needed else ""
            if self._earcon is not None:
                await self._earcon           # the chime ends before the answer starts
            self._barged_in = False
            self._in_turn = True
            self.progress()
            try:
                await self._turn(utt, turn, snapshot, heard)
            except _NoTurn as e:
                self.onset.drop(snapshot)
                self._skip(utt, str(e), turn.transcript)
                continue
            except asyncio.CancelledError:
                # The service is stopping mid-turn: the turn is recorded as far as it got.
                self._stopping_turn(turn)
                raise
            except Exception as e:
                # One failed turn must not end a daemon that runs for weeks: the turn gets a
                # row saying what failed, the person one apology, and the loop goes on.
                self.onset.drop(snapshot)
                turn.note = _failure(e, f"turn {turn.id} failed")
                turn.intent = turn.intent or "unknown"
                if not turn.answer:
                    turn.answer = await self._apologise(turn)
            finally:
                self._in_turn = False
                self.onset.used(snapshot)
                if turn.addressed:
                    self.addressing.answered()     # the follow-up window opens
            task = asyncio.current_task()
            # (Task.cancelling is Python 3.11+; boards with 3.10 skip this late check)
            if task is not None and getattr(task, "cancelling", lambda: 0)():
                # A stop that arrived while a failure was being handled: never swallowed.
                self._stopping_turn(turn)
                raise asyncio.CancelledError
            self._finish(turn)
            if self._exit_code is not None:
                return

    def _stopping_turn(self, turn: Turn) -> None:
        turn.interrupted = True
        turn.note = turn.note or "interrupted: the service is stopping"
        self._finish(turn)

    async def _apologise(self, turn: Turn) -> str:
        """The persona's apology, once; what was heard of it."""
        lang = self._reply_language(None)
        return (await self.voice.say([self.cfg.persona.lines(lang).error], lang, turn)).text

    def progress(self) -> None:
        """A sign of life from the voice loop (see ``stalled``)."""
        self._progress_at = time.monotonic()

    def stalled(self, limit_s: float, now: Optional[float] = None) -> Optional[str]:
        """Why the voice loop is stuck, or None: a turn or an answer being spoken with no
        sign of progress (a transcript, a piece of the answer, a sentence synthesised or
        played) for ``limit_s``. Every native call has its own deadline; this catches what
        no deadline covers (a future never settled, a device write that never returns)."""
        if not (self._in_turn or self.voice.busy):
            return None
        now = time.monotonic() if now is None else now
        quiet = now - max(self._progress_at, self.voice.progress_at)
        if quiet <= limit_s:
            return None
        what = "an answer being spoken" if not self._in_turn else "the turn in progress"
        return f"{what} has shown no progress for {quiet:.0f} s (limit {limit_s:g} s)"

    # ------------------------------------------------------------------ one turn

    async def _turn(self, utt: Utterance, turn: Turn, snapshot: Optional[asyncio.Task],
                    partial: Optional[asyncio.Task] = None) -> None:
        if self.recorder is not None:
            # Before ASR, so a turn whose ASR fails is kept too. The picture: this speech's
            # snapshot job (written once taken), else the newest snapshot.
            self.recorder.save(turn, utt.pcm, snapshot or self.scene.latest)
        heard = await self._transcribe(utt, turn, partial)
        if self.addressing.needed:
            heard = await self._address(heard, turn)
        intent = self.intents.classify(heard.text) if heard is not None else Intent.NOTHING
        if intent is not Intent.QUESTION:
            self.onset.drop(snapshot)
        if heard is None:
            return
        turn.intent = intent.value
        lang = self._reply_language(heard)
        if intent is Intent.QUESTION:
            await self._answer(heard.text, lang, turn, snapshot)
            return
        lines = self.cfg.persona.lines(lang)
        await self.conversation.clear(turn)
        reply = lines.cleared if intent is Intent.CLEAR else lines.goodbye
        turn.answer = (await self.voice.say([reply], lang, turn)).text
        if intent is Intent.EXIT and self.cfg.intent.exit_action == "stop":
            self._exit_code = 0

    async def _address(self, heard: Optional[Transcript], turn: Turn) -> Optional[Transcript]:
        """The transcript's part in addressing: a wake phrase (or what whisper kept of the
        wake word) is taken off the question; in phrase mode it is what addresses speech
        that nothing else did. A wake with nothing understood after it gets "Sorry?"."""
        rest = self.addressing.matcher.strip(heard.text) if heard is not None else None
        if not turn.addressed:
            if rest is None:
                raise _NoTurn(self.addressing.not_addressed_note())
            if not rest:
                self._woken(BY_PHRASE)          # the name alone: the question comes next
                raise _NoTurn("a wake phrase alone: listening for the question")
            turn.addressed = BY_PHRASE
            self.addressing.taken()
        if heard is None:
            if turn.addressed in WOKEN and not turn.answer:     # nothing said about it yet
                lang = self._reply_language(None)
                turn.answer = await self._sorry(lang, turn)
            return None
        if rest:
            heard = replace(heard, text=rest)
        return heard

    async def _sorry(self, lang: str, turn: Optional[Turn] = None) -> str:
        """Woken, nothing understood: ask again; the follow-up window lets the person just
        say it again."""
        said = (await self.voice.say([self.cfg.persona.lines(lang).sorry], lang, turn)).text
        if turn is None:
            self.addressing.answered()
        return said

    async def _transcribe(self, utt: Utterance, turn: Turn,
                          partial: Optional[asyncio.Task] = None) -> Optional[Transcript]:
        heard = None
        if partial is not None:
            # Started in the pause that turned out to end the utterance: the same speech.
            t0 = time.monotonic()
            try:
                heard = await asyncio.wait_for(asyncio.shield(partial), self.cfg.deadlines.asr_s)
                turn.took("asr", time.monotonic() - t0)     # what was left to wait for
                turn.counts["asr_in_pause_ms"] = round(heard.elapsed_s * 1000)
            except Exception as e:    # failed or overran: the watched pass below decides
                log.debug("the pass made in the pause did not finish (%r); transcribing "
                          "again", e)
        if heard is None:
            t0 = time.monotonic()
            try:
                heard = await HEALTH.call("asr", self.parts.asr.transcribe, utt.pcm,
                                          limit_s=self.cfg.deadlines.asr_s)
            except Exception as e:
                # Whisper raised or ran past its deadline: the turn's row says so (its intent
                # is unknown: nothing was heard), and the person hears one apology.
                turn.took("asr", time.monotonic() - t0)
                turn.intent = "unknown"
                turn.note = _failure(e, f"turn {turn.id}: speech recognition failed",
                                     prefix="speech recognition failed: ")
                turn.answer = await self._apologise(turn)
                return None
            turn.took("asr", time.monotonic() - t0)
        self.progress()
        turn.transcript, turn.language = heard.text, heard.language
        if not heard.accepted:
            turn.intent = Intent.NOTHING.value
            turn.note = heard.reason
            # Only to speech that was addressed: mumbling nobody meant for the assistant
            # (phrase mode decides after whisper) gets no reply.
            if heard.unclear and (turn.addressed or not self.addressing.needed):
                await self._not_heard(heard, turn)
            return None
        return heard

    async def _not_heard(self, heard: Transcript, turn: Turn) -> None:
        """Speech whisper could not make out: say so (persona.*.not_heard), or the person
        waits for an answer that never comes. Noise and silence get nothing."""
        lang = self._reply_language(heard)
        line = self.cfg.persona.lines(lang).not_heard
        if line:
            turn.answer = (await self.voice.say([line], lang, turn)).text

    async def _answer(self, question: str, lang: str, turn: Turn,
                      snapshot: Optional[asyncio.Task] = None) -> None:
        lines = self.cfg.persona.lines(lang)
        if self.conversation.backend is None:
            self.onset.drop(snapshot)
            turn.note = self.parts.llm_problem
            await self.voice.say([lines.no_model], lang, turn)
            return
        sentences: asyncio.Queue = asyncio.Queue()
        overran = apologised = False
        speaking = asyncio.create_task(self.voice.say(sentences, lang, turn))
        # Until the first sound, a long opening sentence is cut at its first comma past
        # tts.first_clause_chars: the person hears something sooner; later sentences stay whole.
        splitter = SentenceSplitter(max_chars=self.cfg.tts.first_clause_chars or _RUN_ON_CHARS)

        def speak(s: str) -> None:
            turn.mark("first_sentence")
            splitter.max_chars = _RUN_ON_CHARS
            sentences.put_nowait(s)

        def sorry(note: str, line: str) -> None:
            nonlocal apologised
            turn.note = note
            sentences.put_nowait(line)
            apologised = True

        try:
            try:
                req = Request(question, language=lang, snapshot=snapshot)
                async for piece in self.conversation.ask(req, turn):
                    self.progress()
                    if turn.reset and "reset_said" not in turn.marks:
                        turn.mark("reset_said")
                        sentences.put_nowait(lines.reset)
                    for s in splitter.feed(piece):
                        speak(s)
                for s in splitter.flush():
                    speak(s)
                # The model is free: a context past llm.compact_at is compacted while the
                # answer is spoken and the person listens (off the next question's path).
                self.conversation.work_when_idle(self.quiet)
            except ContextFullError as e:
                sorry(str(e), lines.full if "say \"clear\"" in str(e) else lines.too_long)
            except Exception as e:      # the model, or anything on its way: this turn only
                sorry(_failure(e, "the language model failed"), lines.error)
                overran = isinstance(e, StageOverrun)
        finally:
            sentences.put_nowait(None)
            try:
                spoken = await speaking
            except asyncio.CancelledError:
                speaking.cancel()
                raise
        if overran:
            turn.answer = spoken.text        # the apology, not the unspoken part
        if spoken.interrupted or self._barged_in:
            turn.interrupted = True
            turn.note = turn.note or "interrupted by the person speaking"
            self.conversation.keep_spoken(turn, spoken.text)
            turn.answer = spoken.text
        elif spoken.speaker_failed:
            # Not an interruption: nobody cut it. The answer stays whole in the transcript
            # and the history; the note says how much of it was heard.
            turn.note = _joined(turn.note, f"{spoken.error}; {spoken.seconds:.1f} s of the "
                                           "answer was played")
        elif spoken.error:
            turn.note = _joined(turn.note, spoken.error)
            if not apologised:
                await self._apologise(turn)

    # ------------------------------------------------------------------ helpers

    def _reply_language(self, heard: Optional[Transcript]) -> str:
        if self.cfg.persona.language != "auto":
            return self.cfg.persona.language
        if heard is not None and heard.language in ("en", "zh"):
            return heard.language
        return "zh" if self.cfg.asr.language == "zh" else "en"

    @property
    def state(self) -> str:
        """speaking, thinking, listening or waiting for wake word: for STATUS and the page."""
        if self.voice.speaking:
            return "speaking"
        if self._in_turn:
            return "thinking"
        return self.addressing.state

    def _update_state(self) -> None:
        state = self.state
        if state != self._state:
            self._state = state
            self.notify(f"STATUS={state}")

    def _skip(self, utt: Utterance, note: str, transcript: str = "") -> None:
        """An utterance that makes no turn: logged, and kept for `ask` with the reason."""
        log.info("speech at %.1f s (%.1f s) makes no turn: %s%s", utt.start_s, utt.duration_s,
                 note, f" (heard {transcript!r})" if transcript else "")
        self.skipped.append({"at_s": round(utt.start_s, 2), "duration_s": round(utt.duration_s, 2),
                             "transcript": transcript, "note": note})

    def _finish(self, turn: Turn) -> None:
        self.progress()
        turn.mark("done")
        turn.conversation = turn.conversation or self.conversation.id
        self.turns.append(turn)
        turn.log_line()
        self.conversation.record(turn)
        self.notify(f"STATUS=turn {turn.id}: {turn.intent or 'nothing'}")
        if self.on_turn is not None:
            self.on_turn(turn)


def _failure(e: BaseException, what: str, prefix: str = "") -> str:
    """Log a turn's failure once and return the note for its row: the error's own message
    for one of ours, its type and a traceback in the log for anything else."""
    if isinstance(e, AssistantError):
        log.error("%s: %s", what, e)
        return f"{prefix}{e}" if prefix and not isinstance(e, StageOverrun) else str(e)
    log.error("%s", what, exc_info=e)
    return f"{prefix}internal error: {type(e).__name__}: {e}"


def _joined(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more
