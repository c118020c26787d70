"""`rkvlm-assistant run`: the pipeline on the configured microphone, speaker and camera,
under systemd (sd_notify READY / STATUS / WATCHDOG / STOPPING) or by hand."""

from __future__ import annotations

import asyncio
import logging
import signal

from assistant import components
from assistant.config import Config, check_files
from assistant.pipeline import Pipeline, make_conversation
from assistant.sdnotify import Notifier
from assistant.transcript import TranscriptWriter, transcript_path

log = logging.getLogger(__name__)


async def run_daemon(cfg: Config) -> int:
    missing = check_files(cfg)
    if missing:
        # Every missing file at once; ConfigError -> exit 78, systemd does not restart.
        for e in missing[1:]:
            log.error("%s", e)
        raise missing[0]
    if cfg.http.enabled:
        from assistant.http.server import check_listen, make_gate, start_server
        check_listen(cfg)      # a non-loopback address without http.api_key: exit 78
    notify = Notifier()
    notify("STATUS=loading models")
    parts = await components.assemble(cfg, components.microphone(cfg),
                                      lambda rate: components.speaker(cfg))
    transcript = (TranscriptWriter(transcript_path(cfg), cfg.transcript)
                  if cfg.transcript.enabled else None)
    if transcript is not None:
        log.info("transcript: %s", transcript.path)
    conversation = make_conversation(cfg, parts, transcript,
                                     gate=make_gate(cfg) if cfg.http.enabled else None)
    pipeline = Pipeline(cfg, parts, conversation=conversation, notify=notify)
    # The HTTP API and page on this loop; if it cannot listen, the voice loop goes on.
    http = (await start_server(cfg, conversation, parts, voice=pipeline.voice, has_mic=True,
                               required=False) if cfg.http.enabled else None)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    stopping = False

    def stop(signame: str) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            log.info("%s: stopping", signame)
            notify("STOPPING=1")
            main.cancel()

    # Plain signal handlers, not loop.add_signal_handler: asyncio learns of a signal through
    # its wake-up pipe, and a byte lost on a full pipe (a flood of device callbacks) would
    # lose the SIGTERM. A Python handler always runs, in this thread, between bytecodes.
    def on_signal(signum, frame) -> None:
        loop.call_soon_threadsafe(stop, signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    watchdog = asyncio.create_task(notify.watchdog())
    notify("READY=1")
    log.info("listening (llm %s, vision %s, asr %s)", cfg.llm.backend, cfg.vision.encoder, cfg.asr.model)
    try:
        code = await pipeline.run(greet=True)
        log.info("stopped by an exit phrase (intent.exit_action: stop)")
        return code
    except asyncio.CancelledError:
        if not stopping:
            raise
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        watchdog.cancel()
        notify("STOPPING=1")
        if http is not None:
            await http.stop()
        if transcript is not None:
            await asyncio.to_thread(transcript.close)   # every queued turn reaches the disk
        conversation.scene.close()
        await components.close(parts)
        notify.close()
