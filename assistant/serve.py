"""`rkvlm-assistant serve`: the HTTP front-end alone (no microphone, no speaker).

For a board without audio, or a PC: whisper, piper, the LLM and the camera/encoder are
loaded as for `run`; the OpenAI-compatible API and the web page are the only front-ends.
Under systemd it reports READY once the models are loaded and the socket listens, and a
SIGTERM ends it cleanly (exit 0). SIGHUP reloads the config as `run` does (assistant.reload).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import AsyncIterator

from assistant import components, preflight
from assistant.audio.base import AudioSource
from assistant.audio.null_sink import NullSink
from assistant.audio.wake import under_systemd
from assistant.config import Config
from assistant.pipeline import make_conversation
from assistant.reload import HupHandler, Reloader
from assistant.sdnotify import Notifier
from assistant.transcript import TranscriptWriter, transcript_path

log = logging.getLogger(__name__)


class NoSource(AudioSource):
    """No microphone: a source that never yields a frame."""

    name = "none"

    async def open(self) -> None:
        pass

    async def frames(self) -> AsyncIterator[bytes]:
        return
        yield  # pragma: no cover  (an async generator that ends at once)


async def assemble_headless(cfg: Config, loading=None):
    """The parts without a microphone or a speaker (the sink plays nothing); ``loading``:
    the start-up probes (components.assemble)."""
    return await components.assemble(cfg, NoSource(), lambda rate: NullSink(rate), loading=loading)


async def run_serve(cfg: Config) -> int:
    from assistant.http.server import make_gate, start_server
    from assistant.frontend import media_work
    from assistant.wyoming import start_wyoming

    # From the start: a SIGHUP while the models load is ignored, not the end of the process.
    hup = HupHandler(asyncio.get_running_loop()).install()
    notify = Notifier()
    notify("STATUS=loading models")
    try:
        # check's probes (the listen address, every missing or corrupt model: exit 78),
        # while the language model loads.
        parts = await assemble_headless(
            cfg, preflight.start(cfg, command="serve", service=under_systemd()))
    except BaseException as e:
        if isinstance(e, Exception):
            notify(f"STATUS=cannot start: {e}")
        hup.close()
        notify.close()
        raise
    transcript = (TranscriptWriter(transcript_path(cfg), cfg.transcript)
                  if cfg.transcript.enabled else None)
    server = wyoming = media = None
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    stopping = False
    deadline: list = []                  # armed by a stop (see stop)

    def stop(signame: str) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            log.info("%s: stopping", signame)
            notify("STOPPING=1")
            # As `run`: a speech job a client started (whisper on minutes of audio) is not
            # waited for past this; the exit would otherwise join its thread.
            from assistant.daemon import _STOP_DEADLINE_S, stop_deadline
            deadline.append(stop_deadline(_STOP_DEADLINE_S, transcript))
            main.cancel()

    def on_signal(signum, frame) -> None:
        loop.call_soon_threadsafe(stop, signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    # The same watchdog as `run`: pings from the loop, and a native call stuck past its
    # deadline (an HTTP turn's LLM, an encode) ends the process so systemd restarts it.
    from assistant.daemon import exit_stuck, supervise
    from assistant.health import HEALTH

    async def stuck(w) -> None:
        await exit_stuck(w, notify, transcript)

    HEALTH.configure(cfg.deadlines)
    watchdog = asyncio.create_task(supervise(notify, HEALTH, stuck))
    try:
        conversation = make_conversation(cfg, parts, transcript, gate=make_gate(cfg))
        # One line of speech and transcription work for HTTP and Home Assistant alike.
        media = media_work(cfg)
        server = await start_server(cfg, conversation, parts, required=True, media=media)
        hup.reloader = Reloader(cfg, None, conversation, server=server)
        wyoming = await start_wyoming(cfg, conversation, parts, media=media)  # Home Assistant
        notify("READY=1")
        notify(f"STATUS=serving on {server.url}")
        await asyncio.Event().wait()       # until a signal
        return 0
    except asyncio.CancelledError:
        if not stopping:
            raise
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        hup.close()
        watchdog.cancel()
        notify("STOPPING=1")
        if server is not None:
            await server.stop()
        if wyoming is not None:
            await wyoming.stop()
        if media is not None:
            media.close()
        if transcript is not None:
            await asyncio.to_thread(transcript.close)
        await components.close(parts)
        notify.close()
        if not HEALTH.running():             # else the deadline ends what exit would join
            for timer in deadline:
                timer.cancel()
