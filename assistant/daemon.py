"""`rkvlm-assistant run`: the pipeline on the configured microphone, speaker and camera,
under systemd (sd_notify READY / STATUS / WATCHDOG / STOPPING) or by hand.

Signals: SIGTERM and SIGINT abort the running turn, flush the transcript, release the
models and devices and exit 0. SIGHUP reloads the config as `serve` does (assistant.reload):
what can change without a restart is applied, the rest is named in the log and waits.

The watchdog loop (``supervise``) pings systemd, puts the speaker's state in STATUS, and
consults ``assistant.health``: a native call stuck past its deadline and the grace after it
stops the pings and ends the process with exit code 70, so systemd restarts it. So does a
voice loop that is gone (a task of it died or was cancelled) or shows no progress in a turn
past ``Health.stall_limit`` (``Pipeline.stalled``): one bad turn never does that, every
stage catches its own failures.

A stop takes 4 s at most, whatever a stage is doing: a turn whose runtime ignores the abort
is not waited for past 1 s (its row says it was interrupted), and past 4 s the process
leaves at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from typing import Awaitable, Callable, Optional

from assistant import components, preflight
from assistant.audio.wake import under_systemd
from assistant.config import Config
from assistant.debug_recording import recorder_for
from assistant.health import EX_SOFTWARE, HEALTH, STAGES, Health, Watch
from assistant.pipeline import Pipeline, make_conversation
from assistant.reload import HupHandler, Reloader, plan_reload  # noqa: F401 (tests import them here)
from assistant.sdnotify import Notifier
from assistant.transcript import TranscriptWriter, transcript_path

log = logging.getLogger(__name__)

# How often the watchdog loop looks at the running calls and the speaker.
_TICK_S = 0.5
# A shutdown never waits longer than this on a device or a model that does not let go.
_CLOSE_TIMEOUT_S = 3.0
# SIGTERM / SIGINT end the process within this, whatever a stage is doing (systemd and a
# person at the keyboard wait 5 s at most).
_STOP_DEADLINE_S = 4.0
# How long a stop waits for the running turn to end after aborting it.
_TURN_STOP_S = 1.0


# --------------------------------------------------------------------------- STATUS

class DeviceStatus:
    """STATUS= for a device that recovers by itself (the speaker, the camera): "<what>
    unavailable: <why>" while it is down, back to ``idle()`` ("listening", or "waiting for
    wake word") once it works again (its ``state`` / ``problem``)."""

    def __init__(self, sink: object, notify: Callable[[str], None], what: str = "speaker",
                 idle: Callable[[], str] = lambda: "listening"):
        self.sink = sink
        self.idle = idle            # what STATUS says once it works (or: waiting for wake word)
        self.what = what
        self.notify = notify
        self.reported = ""          # the problem last put in STATUS; "" while it is fine

    def poll(self) -> None:
        state = getattr(self.sink, "state", None)
        if state == "down":
            problem = getattr(self.sink, "problem", "") or "it stopped working"
            if problem != self.reported:
                self.reported = problem
                self.notify(f"STATUS={self.what} unavailable: {problem}")
        elif state == "ready" and self.reported:
            self.reported = ""
            self.notify(f"STATUS={self.idle()}")


# --------------------------------------------------------------------------- the watchdog

async def supervise(notify: Notifier, health: Health,
                    on_stuck: Callable[[Watch], Awaitable[None]],
                    speaker: Optional["DeviceStatus"] = None, tick: float = _TICK_S,
                    devices: tuple = (),
                    voice: Optional[Callable[[], Optional[str]]] = None,
                    on_stalled: Optional[Callable[[str], Awaitable[None]]] = None) -> None:
    """Ping the watchdog from the loop (a blocked loop stops the pings), and stop pinging
    for good once a native call is stuck (``on_stuck``) or the voice loop has stalled
    (``voice()`` says why; ``on_stalled``): those then end the process."""
    interval = notify.watchdog_interval() if notify.enabled else None
    next_ping = 0.0
    while True:
        now = time.monotonic()
        stuck = health.stuck(now)
        if stuck is not None:
            await on_stuck(stuck)
            return
        stalled = voice() if voice is not None else None
        if stalled is not None and on_stalled is not None:
            await on_stalled(stalled)
            return
        if interval is not None and now >= next_ping:
            notify("WATCHDOG=1")
            next_ping = now + interval
        for device in (speaker, *devices):
            if device is not None:
                device.poll()
        await asyncio.sleep(tick if interval is None else min(tick, interval))


async def exit_stuck(w: Watch, notify: Callable[[str], None], transcript=None) -> None:
    """A native call is stuck past its deadline and grace: say which, flush the transcript
    and exit 70. The pings have stopped (supervise returns after this); systemd would kill
    the service at WatchdogSec, but exiting now is sooner and says why."""
    what = STAGES.get(w.stage, (w.stage,))[0]
    log.critical("%s stage stuck: %s has not returned after %.0f s (deadline %g s, "
                 "deadlines.%s, plus %g s grace); exiting so systemd restarts the service",
                 w.stage, what, w.elapsed(), w.limit_s, w.key, HEALTH.grace_s)
    notify(f"STATUS=stuck in {w.stage} for {w.elapsed():.0f} s; restarting")
    await _exit_for_restart(transcript)


async def exit_stalled(why: str, notify: Callable[[str], None], transcript=None) -> None:
    """The voice loop stalled where no native deadline applies (``Pipeline.stalled``): the
    same way out as a stuck native call, exit 70 for systemd to restart the service."""
    log.critical("the voice loop is stuck: %s; exiting so systemd restarts the service", why)
    notify("STATUS=the voice loop is stuck; restarting")
    await _exit_for_restart(transcript)


async def _exit_for_restart(transcript) -> None:
    if transcript is not None:
        try:
            await asyncio.wait_for(asyncio.to_thread(transcript.close), _CLOSE_TIMEOUT_S)
        except Exception as e:
            log.error("the transcript could not be flushed: %s", e)
    _hard_exit(EX_SOFTWARE)


def voice_loop_gone(notify: Callable[[str], None], why: str,
                    error: Optional[BaseException] = None) -> int:
    """The voice loop ended without a stop being asked for: say so; the exit code (70)."""
    log.critical("%s; exiting so systemd restarts the service", why, exc_info=error)
    notify("STATUS=the voice loop stopped; restarting")
    return EX_SOFTWARE


def stop_deadline(seconds: float, transcript=None) -> threading.Timer:
    """A stop must end the process within ``seconds`` whatever a stage is doing (a thread
    wedged in a device or a runtime, an await that never ends): past it, the transcript
    gets a last short flush and the process exits 0 (the stop asked for is done)."""
    def force() -> None:
        left = ", ".join(f"{w.stage} ({w.elapsed():.0f} s)" for w in HEALTH.running())
        log.error("the service did not stop within %g s%s; exiting now", seconds,
                  f" ({left} still inside native code)" if left else "")
        if transcript is not None:
            transcript.flush(0.5)
        _hard_exit(0)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()
    return timer


def _flush_logs() -> None:
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:
            pass
    sys.stderr.flush()


def _hard_exit(code: int) -> None:
    """Leave now: a thread stuck in native code would block a normal interpreter exit."""
    _flush_logs()
    os._exit(code)


# --------------------------------------------------------------------------- the daemon

async def run_daemon(cfg: Config) -> int:
    if cfg.http.enabled:
        from assistant.http.server import make_gate, start_server
    from assistant.frontend import media_work
    from assistant.wyoming import start_wyoming
    HEALTH.configure(cfg.deadlines)
    # From the start: a SIGHUP while the models load is ignored, not the end of the process.
    hup = HupHandler(asyncio.get_running_loop()).install()
    notify = Notifier()
    notify("STATUS=loading models")
    try:
        # check's probes, while the language model loads: every missing or corrupt part at
        # once, exit 78 (systemd does not restart it); whisper, the voices and Smart Turn
        # are kept as the probes loaded them.
        starting = preflight.start(cfg, command="run", service=under_systemd())
        parts = await components.assemble(cfg, components.microphone(cfg),
                                          lambda rate: components.speaker(cfg), loading=starting)
    except BaseException as e:
        if isinstance(e, Exception):
            notify(f"STATUS=cannot start: {e}")
        hup.close()
        notify.close()
        raise
    transcript = (TranscriptWriter(transcript_path(cfg), cfg.transcript)
                  if cfg.transcript.enabled else None)
    if transcript is not None:
        log.info("transcript: %s", transcript.path)
    conversation = make_conversation(cfg, parts, transcript,
                                     gate=make_gate(cfg) if cfg.http.enabled else None)
    recorder = recorder_for(cfg)       # logging.debug_recording / run --debug-recording
    pipeline = Pipeline(cfg, parts, conversation=conversation, notify=notify, recorder=recorder,
                        service=under_systemd())

    def idle() -> str:
        """What the voice loop does between turns: listening, or waiting for wake word."""
        return pipeline.addressing.state

    # The HTTP API and page on this loop; if it cannot listen, the voice loop goes on. Its
    # speech and transcription workers are Home Assistant's too: one line for both.
    media = media_work(cfg)
    http = (await start_server(cfg, conversation, parts, voice=pipeline.voice, has_mic=True,
                               required=False, media=media) if cfg.http.enabled else None)
    if http is not None:
        http.hub.idle_state = idle
    wyoming = await start_wyoming(cfg, conversation, parts, required=False,   # Home Assistant
                                  media=media)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    stopping = False
    hup.reloader = Reloader(cfg, pipeline, conversation, server=http)
    deadline: list[threading.Timer] = []     # armed by a stop, cancelled once it is done

    def stop(signame: str) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            log.info("%s: stopping", signame)
            notify("STOPPING=1")
            deadline.append(stop_deadline(_STOP_DEADLINE_S, transcript))
            conversation.abort()        # the running turn ends within a token
            main.cancel()
            # A turn whose runtime ignores the abort is not waited for past this: its row is
            # written (interrupted) and the shutdown goes on.
            loop.call_later(_TURN_STOP_S, pipeline.cancel)

    # Plain signal handlers, not loop.add_signal_handler: asyncio learns of a signal through
    # its wake-up pipe, and a byte lost on a full pipe (a flood of device callbacks) would
    # lose the SIGTERM. A Python handler always runs, in this thread, between bytecodes.
    def on_signal(signum, frame) -> None:
        loop.call_soon_threadsafe(stop, signal.Signals(signum).name)

    async def stuck(w: Watch) -> None:
        await exit_stuck(w, notify, transcript)

    async def stalled(why: str) -> None:
        await exit_stalled(why, notify, transcript)

    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    camera = (DeviceStatus(conversation.scene, notify, "camera", idle)
              if conversation.scene.camera is not None else None)
    watchdog = asyncio.create_task(supervise(
        notify, HEALTH, stuck, DeviceStatus(parts.sink, notify, idle=idle), devices=(camera,),
        voice=lambda: None if stopping else pipeline.stalled(HEALTH.stall_limit()),
        on_stalled=stalled))
    notify("READY=1")
    log.info("listening (llm %s, vision %s, asr %s)", cfg.llm.backend, cfg.vision.encoder, cfg.asr.model)
    code = 0
    try:
        code = await pipeline.run(greet=True)
        log.info("stopped by an exit phrase (intent.exit_action: stop)")
        return code
    except asyncio.CancelledError:
        if stopping:
            return 0
        # Nobody asked to stop: a task of the voice loop was cancelled.
        code = voice_loop_gone(notify, "the voice loop was cancelled")
        return code
    except Exception as e:
        # A task of the voice loop died of an error no turn catches (the listener's): the
        # pings stop with it, and systemd restarts the service.
        code = voice_loop_gone(notify, f"the voice loop failed ({type(e).__name__}: {e})", e)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        hup.close()
        watchdog.cancel()
        notify("STOPPING=1")
        if http is not None:
            await http.stop()
        if wyoming is not None:
            await wyoming.stop()
        media.close()
        if transcript is not None:
            await asyncio.to_thread(transcript.close)   # every queued turn reaches the disk
        if recorder is not None:
            await asyncio.to_thread(recorder.close, 2.0)
        conversation.scene.close()
        closed = True
        try:
            await asyncio.wait_for(components.close(parts), _CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            closed = False
            log.error("the models and devices did not close within %g s", _CLOSE_TIMEOUT_S)
        notify.close()
        left = HEALTH.running()
        if left:
            # A native call that never returned would keep the process alive at exit.
            log.error("exiting with %s still inside native code",
                      ", ".join(f"{w.stage} ({w.elapsed():.0f} s)" for w in left))
        if left or not closed:
            # So would a thread still closing a device or a model: the interpreter's exit
            # waits for every worker thread.
            _hard_exit(code)
        for timer in deadline:
            timer.cancel()
