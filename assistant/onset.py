"""What starts when a person starts speaking, before anyone knows what they will say.

At speech onset the camera is looked at (and a new scene encoded), and with
``llm.prefill_early`` that scene's image goes into the model's context while the person is
still talking. The job travels with its utterance: the question's turn uses it; speech that
comes to nothing (noise, a cut, a command) drops it and cuts its prefill away again.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from assistant.config import Config
from assistant.conversation import Conversation


class OnsetWork:
    def __init__(self, cfg: Config, conversation: Conversation):
        self.cfg = cfg
        self.conversation = conversation
        self.scene = conversation.scene
        # Image prefills by the scene job they wait for: (task, dropped).
        self._prefills: dict[asyncio.Task, tuple[asyncio.Task, asyncio.Event]] = {}
        self._cuts: set[asyncio.Task] = set()       # prefills being cut away

    def start(self) -> Optional[asyncio.Task]:
        """Speech started: the scene job for it (None without a camera), and its prefill."""
        job = self.scene.start(self.conversation.scene_reference())
        if job is not None and self.cfg.llm.prefill_early:
            dropped = asyncio.Event()
            task = asyncio.create_task(self.conversation.prefill(job, dropped), name="prefill")
            self._prefills[job] = (task, dropped)
        return job

    def used(self, job: Optional[asyncio.Task]) -> None:
        """The question's turn took the job (and its prefill, or cut it)."""
        self._prefills.pop(job, None)

    def drop(self, job: Optional[asyncio.Task]) -> None:
        """The speech came to nothing: drop its snapshot and cut its prefill away."""
        self.scene.discard(job)
        entry = self._prefills.pop(job, None) if job is not None else None
        if entry is None:
            return
        task, dropped = entry
        dropped.set()            # a prefill still on its way stops, or cuts itself
        if task.done() and not task.cancelled() and task.exception() is None and task.result():
            cut = asyncio.create_task(self.conversation.cancel_prefill())
            self._cuts.add(cut)
            cut.add_done_callback(self._cuts.discard)

    async def finish(self) -> None:
        """At the end: prefills under way finish (or cut themselves) before the model closes."""
        for _, dropped in self._prefills.values():
            dropped.set()
        await asyncio.gather(*(t for t, _ in self._prefills.values()), *self._cuts,
                             return_exceptions=True)
