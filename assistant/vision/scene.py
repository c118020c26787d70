"""Scene memory: the camera, the encoder, and whether what the camera sees is new.

The conversation holds at most one image in the model's context. ``Scene`` compares each
fresh snapshot with that image on a small grey thumbnail (a cheap, lighting-tolerant
measure): when they match, the question goes as text and nothing is encoded; when the scene
changed (or the context holds no image), the snapshot goes in with an embedding: the newest
one made of the same scene, for whichever conversation (the voice loop's, Home Assistant's,
an HTTP client's), else a new encode.

The snapshot is taken when speech starts (``start`` returns the job, which travels with the
utterance), so the slow encode overlaps the person talking; ``take`` at question time waits
for that job, or runs one now. A job started for speech that came to nothing is dropped with
``discard``. Jobs run one after another on the scene's own worker thread, in the order the
speech started: the camera and the encoder are single devices. A failing camera or encoder never
ends a turn: the question is answered without the image and the reason is reported; a
camera that failed is reopened before the next snapshot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from assistant.config import VisionConfig
from assistant.errors import AssistantError, DeviceError
from assistant.llm.base import ImageEmbedding
from assistant.vision.base import Camera, VisionEncoder

log = logging.getLogger(__name__)

# Reopening a lost camera: wait this long between tries, growing to the last value.
_REOPEN_BACKOFF_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)   # the first retry at once
THUMB_SIZE = (32, 24)   # width, height: enough to see that a scene changed, cheap to compare
_ids = itertools.count(1)


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """A small grey float32 image in [0, 1], for change detection."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, THUMB_SIZE, interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / 255.0


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two thumbnails, 0 (same) to 1."""
    return float(np.mean(np.abs(a - b)))


@dataclass
class Shot:
    """One snapshot: its thumbnail, and its embedding once encoded."""

    id: int
    thumb: np.ndarray
    frame: Optional[np.ndarray]
    taken: float                      # monotonic time of the snapshot
    embedding: Optional[ImageEmbedding] = None


@dataclass
class SceneResult:
    """What ``take`` found for a question."""

    shot: Optional[Shot]
    changed: bool                     # differs from the reference (or there was none)
    difference: Optional[float] = None
    snapshot_s: float = 0.0
    encode_s: float = 0.0
    error: str = ""
    reused: bool = False              # the embedding came from the idle watch
    remembered: bool = False          # the embedding is an earlier snapshot's of this scene

    @property
    def embedding(self) -> Optional[ImageEmbedding]:
        return self.shot.embedding if self.shot is not None else None


class Scene:
    def __init__(self, camera: Optional[Camera], encoder: Optional[VisionEncoder],
                 cfg: VisionConfig = VisionConfig(), camera_down: bool = False):
        self.camera = camera
        self.encoder = encoder
        self.cfg = cfg
        self.latest: Optional[Shot] = None      # the newest snapshot (for front-ends)
        self.ready: Optional[Shot] = None       # a settled new scene, encoded while idle
        self.encoded: Optional[Shot] = None     # the newest snapshot encoded, for any question
        self.idle_encodes = 0
        self._camera_broken = camera_down        # reopened before the next snapshot
        # The camera's state for STATUS ("ready" / "down" and why), and when to try again.
        self.state, self.problem = ("down", "it did not open at start") if camera_down else ("ready", "")
        self._retry_at = 0.0
        self._failures = 0
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="scene")

    @property
    def enabled(self) -> bool:
        return (self.camera is not None and self.encoder is not None
                and self.cfg.attach != "never")

    def is_same(self, shot: Shot, reference: Optional[Shot]) -> tuple[bool, Optional[float]]:
        if reference is None or self.cfg.attach == "every_turn":
            return False, None
        d = difference(shot.thumb, reference.thumb)
        return d <= self.cfg.change_threshold, d

    # ------------------------------------------------------------------ jobs

    def start(self, reference: Optional[Shot]) -> Optional[asyncio.Task]:
        """Speech started: snapshot now; encode unless the scene matches ``reference``.

        Returns the job for ``take`` (None when there is no camera to look through)."""
        if not self.enabled:
            return None
        return asyncio.get_running_loop().create_task(self._run(reference))

    @staticmethod
    def discard(job: Optional[asyncio.Task]) -> None:
        """Drop a job (the speech was a cough, was cut, or was not a question)."""
        if job is not None and not job.done():
            # The worker finishes it on its own; only its result is dropped.
            job.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def take(self, reference: Optional[Shot],
                   job: Optional[asyncio.Task] = None) -> Optional[SceneResult]:
        """The scene for this question: the job started at its speech onset, or a new one.

        The result carries an embedding exactly when the scene is new to the conversation.
        """
        if not self.enabled:
            return None
        res = await (job if job is not None else self._run(reference))
        if res.shot is None:
            return res
        # The reference may have changed since the job started (a clear, a compaction).
        same, res.difference = self.is_same(res.shot, reference)
        res.changed = not same
        if res.changed and res.shot.embedding is None and not res.error:
            await self.encode(res)
        return res

    async def encode(self, res: SceneResult) -> None:
        """Give a result's snapshot its embedding now (after a compaction took the image
        out): the one already made of this scene, or a new encode."""
        await asyncio.get_running_loop().run_in_executor(self._worker, self._embed, res)

    async def _run(self, reference: Optional[Shot]) -> SceneResult:
        return await asyncio.get_running_loop().run_in_executor(
            self._worker, self._snapshot_and_encode, reference)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _snapshot(self, res: SceneResult, quiet: bool = False) -> Optional[Shot]:
        """One snapshot into ``res`` (worker thread). A camera that failed is reopened first,
        no more often than the back-off allows; errors become res.error and the state."""
        if self._camera_broken and time.monotonic() < self._retry_at:
            res.error = f"camera {self.camera.name} unavailable: {self.problem}"  # not yet
            return None
        try:
            if self._camera_broken:
                self.camera.close()
                self.camera.open()
                self._camera_broken = False
                log.info("camera %s reopened", self.camera.name)
            t0 = time.monotonic()
            frame = self.camera.snapshot()
            res.snapshot_s = time.monotonic() - t0
            res.shot = self.latest = Shot(next(_ids), thumbnail(frame), frame, t0)
            self.state, self.problem, self._failures = "ready", "", 0
            return res.shot
        except Exception as e:  # a camera or native library failing must not end a turn
            res.error = str(e) if isinstance(e, AssistantError) else f"{type(e).__name__}: {e}"
            if isinstance(e, DeviceError) and not self._camera_broken:
                # The camera went away: reopen it before a later snapshot, with back-off.
                self._camera_broken = True
                self._failures += 1
                self._retry_at = time.monotonic() + _REOPEN_BACKOFF_S[
                    min(self._failures - 1, len(_REOPEN_BACKOFF_S) - 1)]
                self.state, self.problem = "down", str(e)
            elif isinstance(e, DeviceError):
                self._failures += 1
                self._retry_at = time.monotonic() + _REOPEN_BACKOFF_S[
                    min(self._failures - 1, len(_REOPEN_BACKOFF_S) - 1)]
            if quiet:
                log.debug("snapshot failed: %s", res.error)
            elif isinstance(e, AssistantError):
                log.warning("no image for this question: %s", e)
            else:
                log.exception("camera snapshot failed")
            return None

    def _snapshot_and_encode(self, reference: Optional[Shot]) -> SceneResult:
        res = SceneResult(shot=None, changed=True)
        shot = self._snapshot(res)
        if shot is None:
            return res
        same, res.difference = self.is_same(shot, reference)
        res.changed = not same
        if res.changed:
            self._embed(res)
        return res

    def _embed(self, res: SceneResult) -> None:
        """The snapshot's embedding (worker thread): the idle watch's or the newest one of
        the same scene, whichever conversation it was made for (a Home Assistant question
        about the scene the voice loop just saw costs no encode); else encoded now."""
        if self._reuse_ready(res):
            return
        known = self.encoded
        if known is not None and known.embedding is not None and self.is_same(res.shot, known)[0]:
            res.shot.embedding = known.embedding
            res.remembered = True
            return
        self._encode(res)

    def _reuse_ready(self, res: SceneResult) -> bool:
        """The scene encoded while idle is still what the camera sees: take its embedding."""
        ready = self.ready
        if (ready is None or ready.embedding is None
                or difference(res.shot.thumb, ready.thumb) > self.cfg.change_threshold):
            return False
        res.shot.embedding = ready.embedding
        res.reused = True
        return True

    # ------------------------------------------------------------------ idle watching

    async def watch(self, idle: Callable[[], bool],
                    reference: Callable[[], Optional[Shot]]) -> None:
        """Look at the camera while ``idle()``; encode a changed scene once it has settled.

        A change counts when a snapshot differs from the conversation's image (or the last
        one encoded while idle) and the next snapshot matches it: the scene stopped moving.
        Nothing starts while a person speaks or an answer runs; an encode already under way
        finishes first (the encoder cannot be interrupted), then the turn's job runs.
        """
        loop = asyncio.get_running_loop()
        pending: Optional[Shot] = None         # a changed scene waiting to settle
        while True:
            await asyncio.sleep(self.cfg.watch_interval_s)
            if not self.enabled or not idle():
                pending = None
                continue
            res = await loop.run_in_executor(self._worker, self._snapshot_and_encode_if,
                                             None, False)
            shot = res.shot
            if shot is None or not idle():
                pending = None
                continue
            known = [k for k in (self.ready, reference()) if k is not None]
            if any(difference(shot.thumb, k.thumb) <= self.cfg.change_threshold for k in known):
                pending = None                 # nothing new to see
                continue
            if pending is None or difference(shot.thumb, pending.thumb) > self.cfg.change_threshold:
                pending = shot                 # changed, maybe still moving: look again
                continue
            await self.encode(res)             # settled: encode it now, not at the question
            if shot.embedding is not None:
                self.ready = shot
            if shot.embedding is not None and not res.remembered:    # not from the memory
                self.idle_encodes += 1
                log.info("the scene changed and settled; encoded while idle in %.0f ms",
                         res.encode_s * 1000)
            pending = None

    def _snapshot_and_encode_if(self, reference: Optional[Shot], encode: bool) -> SceneResult:
        """A snapshot, encoded only when asked (the idle watch decides after comparing)."""
        if encode:
            return self._snapshot_and_encode(reference)
        res = SceneResult(shot=None, changed=True)
        self._snapshot(res, quiet=True)    # also how a lost camera is found back while idle
        return res

    def _encode(self, res: SceneResult) -> None:
        """Encode the result's frame (worker thread); errors become res.error."""
        shot = res.shot
        t0 = time.monotonic()
        try:
            # Encoders are safe to call while a turn generates (each guards its own state).
            # Watched: past deadlines.encode_s the question goes without the picture (a
            # StageOverrun here), and an encoder that never returns restarts the service.
            from assistant.health import HEALTH
            shot.embedding = HEALTH.call_blocking("encode", self.encoder.encode, shot.frame)
            self.encoded = shot
        except AssistantError as e:
            res.error = str(e)
            log.warning("no image for this question: %s", e)
        except Exception as e:
            res.error = f"{type(e).__name__}: {e}"
            log.exception("vision encoder failed")
        res.encode_s += time.monotonic() - t0
