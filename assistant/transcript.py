"""The durable transcript: one JSON line per turn, written by a thread of its own.

Every turn (question, clear, exit, a failed or interrupted one) becomes one line. The writer
thread appends, flushes and fsyncs each line, so a ``kill -9`` loses at most the turn in
flight, and the event loop never waits for the disk. The file is rotated by size
(``transcript.jsonl`` -> ``.1`` -> ``.2`` ...). A disk that is full or read-only is one
warning (again only after it worked in between); the assistant keeps answering.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

from assistant.config import Config, TranscriptConfig
from assistant.writer_thread import WriterThread

log = logging.getLogger(__name__)

def default_path() -> Path:
    """$XDG_STATE_HOME/rkvlm-assistant/transcript.jsonl; the service's is in its
    StateDirectory, /var/lib/rkvlm-assistant (assistant.paths)."""
    from assistant import paths

    return paths.transcript_file()


def transcript_path(cfg: Config) -> Path:
    return cfg.path(cfg.transcript.path) or default_path()


class TranscriptWriter(WriterThread):
    """Appends rows from any thread or the loop; a worker thread does the writing."""

    def __init__(self, path: Path, cfg: TranscriptConfig = TranscriptConfig()):
        self.path = Path(path)
        self.max_bytes = cfg.max_bytes
        self.keep = cfg.keep
        self._failing = False
        super().__init__("transcript")

    def write(self, row: dict) -> None:
        """Queue one row (never blocks)."""
        self._q.put(row)

    def _handle(self, row: dict) -> None:
        self._append(row)

    def _append(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False, default=str) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rotate_if_needed(len(line.encode("utf-8")))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            if not self._failing:
                log.warning("cannot write the transcript %s: %s; the assistant goes on without "
                            "it (free the disk or fix transcript.path)", self.path, e)
            self._failing = True
            return
        if self._failing:
            log.info("the transcript %s is written again", self.path)
            self._failing = False

    def _rotate_if_needed(self, adding: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + adding <= self.max_bytes:
            return
        if self.keep == 0:
            self.path.unlink()
            return
        for i in range(self.keep, 0, -1):
            src = self.path if i == 1 else self.path.with_name(f"{self.path.name}.{i - 1}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i}"))


def read_rows(path: Path) -> Iterator[dict]:
    """Every row of the transcript, oldest first (rotated files included); bad lines skipped."""
    files = sorted(path.parent.glob(path.name + ".*"),
                   key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    files = [p for p in files if p.suffix[1:].isdigit()] + [path]
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue     # a line cut by a crash mid-write
            if isinstance(row, dict):
                yield row


def format_row(row: dict) -> str:
    """One turn, readable by a person."""
    import datetime

    t = row.get("time")
    when = (datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
            if isinstance(t, (int, float)) else "?")
    intent = row.get("intent") or "?"
    lines = [f"{when}  [{row.get('conversation', '?')} #{row.get('turn', '?')}] {intent}"
             f"{'  (' + row['source'] + ')' if row.get('source') not in (None, 'voice') else ''}"]
    if row.get("transcript"):
        lines.append(f"  person: {row['transcript']}")
    if row.get("answer"):
        lines.append(f"  assistant: {row['answer']}")
    notes = []
    if row.get("scene") not in (None, "none"):
        notes.append(f"scene {row['scene']}")
    if row.get("compaction"):
        c = row["compaction"]
        notes.append(f"{c.get('kind', 'compaction')}: {c.get('tokens_before')} -> "
                     f"{c.get('tokens_after')} tokens")
    if row.get("note"):
        notes.append(row["note"])
    if notes:
        lines.append("  note: " + "; ".join(notes))
    return "\n".join(lines)


def cli_history(cfg: Config, n: int, as_json: bool, conversation: Optional[str]) -> int:
    path = transcript_path(cfg)
    rows = [r for r in read_rows(path)
            if conversation is None or str(r.get("conversation")) == conversation]
    if not rows and not path.exists():
        print(f"no transcript yet at {path} (transcript.path; it is written once the assistant "
              f"has answered)")
        return 0
    for row in rows[-n:] if n > 0 else rows:
        print(json.dumps(row, ensure_ascii=False) if as_json else format_row(row))
    return 0
