"""The vision stage: camera snapshot -> encoder -> ImageEmbedding, started early.

The pipeline calls ``start()`` when speech starts, so the snapshot and the (slow) encode
overlap the person talking; ``take()`` at question time waits for that job or runs one now.
A failing camera or encoder never ends the turn: the question is answered without the image
and the reason is reported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Optional

from assistant.errors import AssistantError, DeviceError
from assistant.llm.base import ImageEmbedding
from assistant.vision.base import Camera, VisionEncoder

log = logging.getLogger(__name__)


@dataclass
class VisionResult:
    embedding: Optional[ImageEmbedding]
    snapshot_s: float = 0.0
    encode_s: float = 0.0
    started: float = 0.0    # monotonic time the job started
    finished: float = 0.0
    error: str = ""


class VisionStage:
    def __init__(self, camera: Optional[Camera], encoder: Optional[VisionEncoder],
                 camera_down: bool = False):
        self.camera = camera
        self.encoder = encoder
        self._job: Optional[asyncio.Task] = None
        self._camera_broken = camera_down   # reopened before the next snapshot

    @property
    def enabled(self) -> bool:
        return self.camera is not None and self.encoder is not None

    def start(self) -> None:
        """Begin a snapshot + encode now, unless one is already under way."""
        if self.enabled and self._job is None:
            self._job = asyncio.get_running_loop().create_task(self._run())

    def discard(self) -> None:
        """Forget the pending job (the speech was a cough, or not a question)."""
        job, self._job = self._job, None
        if job is not None and not job.done():
            # The thread finishes on its own; only its result is dropped.
            job.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def take(self) -> Optional[VisionResult]:
        """The image for this question: the job started at speech onset, or a new one."""
        if not self.enabled:
            return None
        if self._job is None:
            self.start()
        job, self._job = self._job, None
        return await job

    def _snapshot_and_encode(self) -> VisionResult:
        res = VisionResult(embedding=None, started=time.monotonic())
        try:
            if self._camera_broken:
                self.camera.close()
                self.camera.open()
                self._camera_broken = False
                log.info("camera %s reopened", self.camera.name)
            t0 = time.monotonic()
            frame = self.camera.snapshot()
            t1 = time.monotonic()
            # Encoders are safe to call while a turn generates (each guards its own state).
            res.embedding = self.encoder.encode(frame)
            t2 = time.monotonic()
            res.snapshot_s, res.encode_s = t1 - t0, t2 - t1
        except AssistantError as e:
            res.error = str(e)
            # A device error means the camera went away: reopen it before the next snapshot.
            self._camera_broken = self._camera_broken or isinstance(e, DeviceError)
            log.warning("no image for this question: %s", e)
        except Exception as e:  # a native library failing must not end the turn
            res.error = f"{type(e).__name__}: {e}"
            log.exception("vision stage failed")
        res.finished = time.monotonic()
        return res

    async def _run(self) -> VisionResult:
        return await asyncio.to_thread(self._snapshot_and_encode)
