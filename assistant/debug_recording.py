"""Debug recording: what the assistant heard and saw, turn by turn, kept on disk.

With ``logging.debug_recording: DIR`` (or ``rkvlm-assistant run --debug-recording DIR``)
each utterance's audio, exactly the PCM whisper was given (16 kHz mono WAV), and the
snapshot its turn used (JPEG) are written under DIR, named by the turn's local time and id::

    20261201-201530-turn12.wav
    20261201-201530-turn12.jpg

so a wrong answer can be replayed (``rkvlm-assistant ask --audio ... --image ...``). The
directory is bounded by ``logging.debug_recording_max_files`` and
``logging.debug_recording_max_mb``: past either, the oldest turns' files are deleted first
(recordings of earlier runs in the same directory count too).

A worker thread of its own does the encoding and the writing: the event loop only queues.
A full or read-only disk, or a path that is not a directory, is one warning (again only
after it worked in between); the assistant goes on without the recording.
"""

from __future__ import annotations

import logging
import os
import re
import time
import wave
from pathlib import Path
from typing import Any, Optional

import numpy as np

from assistant.config import Config
from assistant.writer_thread import WriterThread

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{8}-\d{6})-turn(\d+)\.(wav|jpg)$")
SAMPLE_RATE = 16000
# Recordings that never reach the disk are dropped past this many waiting (a stuck disk must
# not fill the memory).
_MAX_QUEUED = 64


def recorder_for(cfg: Config) -> Optional["DebugRecorder"]:
    """The recorder the config asks for (logging.debug_recording), or None."""
    if not cfg.logging.debug_recording:
        return None
    directory = cfg.path(cfg.logging.debug_recording)
    rec = DebugRecorder(directory, cfg.logging.debug_recording_max_files,
                        cfg.logging.debug_recording_max_mb)
    log.info("debug recording: each utterance (WAV) and snapshot (JPEG) in %s (at most %d files, "
             "%g MB)", directory, rec.max_files, cfg.logging.debug_recording_max_mb)
    return rec


def _frame_of(snap: Any) -> Optional[np.ndarray]:
    """An RGB frame from what a turn has: an array, a Shot, a SceneResult, or None."""
    if snap is None or isinstance(snap, np.ndarray):
        return snap
    shot = getattr(snap, "shot", snap)            # SceneResult -> Shot
    frame = getattr(shot, "frame", None)
    return frame if isinstance(frame, np.ndarray) else None


class DebugRecorder(WriterThread):
    """``save`` from the loop (never blocks); a worker thread writes and prunes."""

    def __init__(self, directory: Path, max_files: int = 200, max_mb: float = 200.0):
        self.directory = Path(directory)
        self.max_files = max_files
        self.max_bytes = int(max_mb * 2**20)
        self.saved = 0                 # turns written
        self.dropped = 0               # turns not written (queue full, disk trouble)
        self._failing = False
        super().__init__("debug-recording")

    def save(self, turn: Any, pcm: np.ndarray, snapshot: Any = None) -> None:
        """Queue one utterance and its picture. ``turn`` has ``.id`` (and ``.wall_time``);
        ``snapshot`` is the RGB frame, a Shot or a SceneResult, the scene job (an asyncio
        task or future whose SceneResult is taken once it is done), or None (no picture)."""
        stamp = time.strftime("%Y%m%d-%H%M%S",
                              time.localtime(getattr(turn, "wall_time", None) or time.time()))
        name = f"{stamp}-turn{getattr(turn, 'id', turn)}"
        pcm = np.asarray(pcm, dtype=np.int16).copy()
        if hasattr(snapshot, "add_done_callback"):
            # The scene job may still be encoding: the picture is queued once it is done.
            self._put((name, pcm, None))
            snapshot.add_done_callback(lambda job: self._put((name, None, _job_frame(job))))
        else:
            self._put((name, pcm, _frame_of(snapshot)))

    # ------------------------------------------------------------------ the thread

    def _put(self, item: tuple) -> None:
        if self._q.qsize() >= _MAX_QUEUED:
            self.dropped += 1
            return
        self._queue(item)

    def _handle(self, item: tuple) -> None:
        self._write(*item)

    def _dropped(self, item: tuple) -> None:
        self.dropped += 1

    def _write(self, name: str, pcm: Optional[np.ndarray], frame: Optional[np.ndarray]) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if pcm is not None:
                _atomic(self.directory / f"{name}.wav", lambda f: _write_wav(f, pcm))
            if frame is not None:
                data = _jpeg(frame)
                _atomic(self.directory / f"{name}.jpg", lambda f: f.write(data))
            self._prune()
        except (OSError, ValueError) as e:
            self.dropped += 1
            if not self._failing:
                log.warning("cannot write the debug recording in %s: %s; the assistant goes on "
                            "without it (free the disk or fix logging.debug_recording)",
                            self.directory, e)
            self._failing = True
            return
        if pcm is not None:
            self.saved += 1
        if self._failing:
            log.info("the debug recording in %s is written again", self.directory)
            self._failing = False

    def _prune(self) -> None:
        """Delete the oldest turns' files while the directory is past either bound."""
        turns: dict[tuple[str, int], list[tuple[Path, int]]] = {}
        for entry in os.scandir(self.directory):
            m = _NAME.match(entry.name)
            if m and entry.is_file(follow_symlinks=False):
                turns.setdefault((m.group(1), int(m.group(2))), []).append(
                    (Path(entry.path), entry.stat(follow_symlinks=False).st_size))
        files = sum(len(v) for v in turns.values())
        size = sum(s for v in turns.values() for _, s in v)
        for key in sorted(turns):
            if files <= self.max_files and size <= self.max_bytes:
                break
            for path, s in turns[key]:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                files -= 1
                size -= s


def _job_frame(job: Any) -> Optional[np.ndarray]:
    if job.cancelled() or job.exception() is not None:
        return None
    return _frame_of(job.result())


def _write_wav(f, pcm: np.ndarray) -> None:
    with wave.open(f, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.astype("<i2").tobytes())


def _jpeg(rgb: np.ndarray) -> bytes:
    import cv2

    frame = np.ascontiguousarray(rgb)
    if frame.ndim == 3 and frame.shape[2] == 3:
        frame = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise ValueError("the snapshot could not be encoded as JPEG")
    return buf.tobytes()


def _atomic(path: Path, write) -> None:
    """Write through a temporary name and rename: a full disk leaves no half file behind."""
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
