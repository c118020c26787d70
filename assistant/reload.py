"""SIGHUP for `run` and `serve`: re-read the config file and apply what needs no restart.

What a running process picks up (RELOADABLE): the persona and its lines, the system prompt
(the conversation is forgotten with it), the intent phrases, the deadlines, the log level,
the HTTP queue limits and image size, and the Wyoming idle timeout. Every other changed key
keeps its running value and is named in one log line as waiting for a restart: models,
devices, the socket and the files are built once at start. A config that does not load is
refused with one error line and the running one kept; so is a FIFO or a device put in its
place (never waited on), and the next SIGHUP reads the path again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from typing import Any, Optional

from assistant import config as config_mod
from assistant import safe_read
from assistant.config import Config, ConfigError, iter_fields
from assistant.conversation import Conversation, Priority
from assistant.health import HEALTH, Health
from assistant.intent import IntentClassifier

log = logging.getLogger(__name__)

# Keys (or whole sections) a running process applies on SIGHUP. The HTTP server reads these
# per request; its address, key, CORS origins and body limit are fixed when it starts.
RELOADABLE = ("persona", "intent", "deadlines", "logging.level",
              "http.max_queue", "http.max_wait_s", "http.max_image_pixels",
              "wyoming.idle_timeout_s")


def changed_keys(running: Config, new: Config) -> list[str]:
    """Every setting whose value differs, as key paths (llm.max_new_tokens)."""
    before = {key: value for key, _, value in iter_fields(running)}
    return [key for key, _, value in iter_fields(new) if before.get(key, value) != value]


def _reloadable(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RELOADABLE)


def _with(obj: Any, key: str, value: Any) -> Any:
    """A copy of a frozen config with one nested key replaced."""
    name, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(obj, **{name: value})
    return dataclasses.replace(obj, **{name: _with(getattr(obj, name), rest, value)})


def _value(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def plan_reload(running: Config, new: Config) -> tuple[Config, list[str]]:
    """The config to apply on SIGHUP, and the sections with changes that wait for a restart
    (those keys keep their running values)."""
    applied, waiting = running, []
    for key in changed_keys(running, new):
        if _reloadable(key):
            applied = _with(applied, key, _value(new, key))
        else:
            waiting.append(key)
    sections = list(dict.fromkeys(key.split(".")[0] for key in waiting))
    return dataclasses.replace(applied, warnings=new.warnings), sections


def apply_logging(level: str) -> None:
    logging.getLogger().setLevel(getattr(logging, level))
    logging.getLogger("faster_whisper").setLevel(max(logging.WARNING, getattr(logging, level)))


class Reloader:
    """Re-read the config file, validate it, apply what needs no restart to the running
    parts: the voice pipeline (`run`), the conversation, the HTTP server's context."""

    def __init__(self, cfg: Config, pipeline: Optional[Any], conversation: Conversation,
                 health: Health = HEALTH, server: Optional[Any] = None):
        self.cfg = cfg
        self.pipeline = pipeline            # assistant.pipeline.Pipeline, or None (serve)
        self.conversation = conversation
        self.health = health
        self.server = server                # assistant.http.server.HttpServer, or None
        self._lock = asyncio.Lock()

    async def reload(self) -> bool:
        """True when a new config was applied."""
        async with self._lock:
            running = self.cfg
            if running.source in ("<defaults>", "<string>"):
                log.warning("SIGHUP: running on built-in defaults; there is no config file "
                            "to reload")
                return False
            try:
                # A daemon thread, not asyncio.to_thread: the default executor's threads
                # are waited for at exit, and SIGTERM must not wait on a file (load itself
                # refuses a FIFO and gives up on a read after READ_TIMEOUT_S).
                loaded = await safe_read.to_daemon_thread(config_mod.load, running.source)
            except ConfigError as e:
                log.error("SIGHUP: %s; keeping the running configuration", e)
                return False
            except Exception as e:      # never a traceback, never the running config lost
                log.error("SIGHUP: %s: cannot read it (%s: %s); keeping the running "
                          "configuration", running.source, type(e).__name__, e)
                return False
            for warning in loaded.warnings:
                log.warning("%s", warning)
            new, restart = plan_reload(running, loaded)
            if restart:
                keys = [k for k in changed_keys(running, loaded) if not _reloadable(k)]
                log.warning("SIGHUP: %s changed (%s); %s a restart (systemctl restart "
                            "rkvlm-assistant), the running values stay until then",
                            ", ".join(restart), ", ".join(keys),
                            "that needs" if len(keys) == 1 else "those need")
            self._apply(new)
            if new.persona.prompt != running.persona.prompt:
                await self._new_system_prompt(new)
            log.info("SIGHUP: configuration reloaded from %s (%s)", running.source,
                     ", ".join(RELOADABLE))
            return True

    def _apply(self, new: Config) -> None:
        self.cfg = new
        if self.pipeline is not None:
            self.pipeline.cfg = new
            self.pipeline.intents = IntentClassifier(new.intent)
        conv = self.conversation
        conv.cfg = new
        if conv.gate is not None:
            conv.gate.max_waiting = new.http.max_queue
            conv.gate.max_wait_s = new.http.max_wait_s
        if self.server is not None:
            from assistant.http.server import CTX
            self.server.app[CTX].cfg = new
        self.health.configure(new.deadlines)
        apply_logging(new.logging.level)

    async def _new_system_prompt(self, new: Config) -> None:
        conv = self.conversation
        backend = conv.backend
        if backend is None:
            return
        # Between turns: the new prompt empties the model's context, so the conversation
        # is forgotten with it (as a clear phrase would).
        async with conv.gate.slot(Priority.VOICE):
            def swap() -> None:
                with conv.lock:
                    backend.set_persona(new.persona)
            try:
                await asyncio.to_thread(swap)
            except Exception as e:
                log.error("SIGHUP: the new system prompt could not be applied: %s", e)
                return
            forgotten = len(conv.exchanges)
            conv._forget(new_id=True)
        log.info("SIGHUP: new system prompt in use; the conversation was forgotten (%d "
                 "exchanges), new conversation %s", forgotten, conv.id)


class HupHandler:
    """SIGHUP -> a reload on the loop, one at a time. Installed as soon as the process
    starts: a SIGHUP while the models load (systemctl reload at the wrong moment) is logged
    and ignored instead of ending the process (its default action); once ``reloader`` is
    set, it reloads.

    A plain signal handler, not loop.add_signal_handler: asyncio learns of a signal through
    its wake-up pipe, and a byte lost on a full pipe (a flood of device callbacks) would
    lose the signal. A Python handler always runs, in the main thread, between bytecodes."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.reloader: Optional[Reloader] = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def install(self) -> "HupHandler":
        signal.signal(signal.SIGHUP, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        if self._closed:
            return
        try:
            self.loop.call_soon_threadsafe(self._start)
        except RuntimeError:            # the loop has closed: the process is ending anyway
            pass

    def _start(self) -> None:
        if self._closed:
            return
        if self.reloader is None:
            log.warning("SIGHUP while starting: the configuration was read at start; send "
                        "SIGHUP again once the service is ready")
            return
        log.info("SIGHUP: reloading the configuration")
        task = self.loop.create_task(self.reloader.reload(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        e = task.exception()            # retrieved: never "Task exception was never retrieved"
        if e is not None:
            log.error("SIGHUP: the reload failed (%s: %s); the running configuration is "
                      "kept where it was not yet applied", type(e).__name__, e)

    def close(self) -> None:
        """Stop reloading (the process is stopping) and cancel a reload under way. The
        handler stays, ignoring: a late SIGHUP must not end a process that is cleaning up."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
