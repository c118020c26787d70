"""The durable transcript: one JSON line per turn, written by a thread of its own.

Every turn (question, clear, exit, a failed or interrupted one) becomes one line. The writer
thread appends, flushes and fsyncs each line, so a ``kill -9`` loses at most the turn in
flight, and the event loop never waits for the disk. The file is rotated by size
(``transcript.jsonl`` -> ``.1`` -> ``.2`` ...). A disk that is full or read-only is one
warning (again only after it worked in between); the assistant keeps answering. A write cut
short by a full disk is cut off the file again (or, if even that fails, the next row starts
on a line of its own), so one torn line never takes the next row with it.

Any row can be written: a text longer than ``MAX_TEXT_CHARS`` keeps that much and a note of
its length, and what JSON or UTF-8 cannot carry (a lone surrogate, NaN) is written escaped.
``history`` shows the rows it can (control characters escaped: a question's ESC never
reaches the terminal) and counts the ones it skips. An id a client chose is stored with its
control characters escaped.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

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
        self._torn = False      # a failed write may have left a line without its end
        super().__init__("transcript")

    def write(self, row: dict) -> None:
        """Queue one row (never blocks). Its texts are cut to ``MAX_TEXT_CHARS`` here, so a
        huge question never waits in the queue whole."""
        self._queue(bounded(row))

    def _handle(self, row: dict) -> None:
        self._append(row)

    def _append(self, row: dict) -> None:
        data = encode_row(row)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rotate_if_needed(len(data))
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                if self._torn and not _ends_a_line(fd):
                    data = b"\n" + data     # the torn line stays alone; readers skip it
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    _write_all(fd, data)
                except OSError:
                    # A full disk may take part of the line: cut it, or failing that,
                    # make the next row start on a line of its own.
                    self._torn = not _cut(fd, start)
                    raise
                self._torn = False
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


# A row keeps at most this many characters of any text (a 15 MB question would otherwise be
# written whole); the rest is replaced by a note of the original length.
MAX_TEXT_CHARS = 4000


# Row keys that hold an id a client chose (Home Assistant's conversation_id): kept as text
# one can type and print, control characters escaped (a NUL or an ESC is no id).
ID_KEYS = ("conversation",)


def bounded(row: dict) -> dict:
    """The row with every text cut to ``MAX_TEXT_CHARS`` (nested ones too), and the control
    characters of its ids escaped (``visible``)."""
    out = {k: _bounded(v) for k, v in row.items()}
    for key in ID_KEYS:
        if isinstance(out.get(key), str):
            out[key] = visible(out[key])
    return out


def _bounded(v: Any) -> Any:
    if isinstance(v, str) and len(v) > MAX_TEXT_CHARS:
        return f"{v[:MAX_TEXT_CHARS]} [... cut: {len(v)} characters in all]"
    if isinstance(v, dict):
        return {k: _bounded(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_bounded(x) for x in v]
    return v


def encode_row(row: dict) -> bytes:
    """One JSON line, UTF-8. What JSON or UTF-8 cannot carry is written escaped rather
    than lost: a lone surrogate as the text ``\\ud800``, NaN and infinities as strings."""
    try:
        line = json.dumps(row, ensure_ascii=False, allow_nan=False, default=str)
        return (line + "\n").encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        line = json.dumps(_escaped(row), ensure_ascii=False, allow_nan=False, default=str)
        return (line + "\n").encode("utf-8")


def _escaped(v: Any) -> Any:
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {_escaped(str(k)): _escaped(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_escaped(x) for x in v]
    return v


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` or OSError: a short write (a full disk) is tried on, and a write
    that takes nothing is an error."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no space left: the write took nothing")
        view = view[n:]


def _cut(fd: int, size: int) -> bool:
    """Cut the file back to ``size`` (the torn line goes); False when it cannot be."""
    try:
        os.ftruncate(fd, size)
        return True
    except OSError:
        return False


def _ends_a_line(fd: int) -> bool:
    """The file is empty or ends with a newline."""
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def read_rows(path: Path, skipped: Optional[list] = None) -> Iterator[dict]:
    """Every row of the transcript, oldest first (rotated files included). A line that is
    not a JSON object (cut by a crash or a full disk) is skipped, and appended to
    ``skipped`` when given."""
    files = sorted(path.parent.glob(path.name + ".*"),
                   key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    files = [p for p in files if p.suffix[1:].isdigit()] + [path]
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                row = None   # a line cut by a crash mid-write
            if isinstance(row, dict):
                yield row
            elif skipped is not None:
                skipped.append(line)


def format_row(row: dict) -> str:
    """One turn, readable by a person. Odd values are shown as they are; a row that cannot
    be shown at all raises (``cli_history`` skips and counts it)."""
    import datetime

    t = row.get("time")
    try:
        when = datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        when = "?"      # not a number, or no date (1e300, NaN)
    intent = row.get("intent") or "?"
    source = row.get("source")
    lines = [f"{when}  [{row.get('conversation', '?')} #{row.get('turn', '?')}] {intent}"
             f"{f'  ({source})' if source not in (None, 'voice') else ''}"]
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
        notes.append(str(row["note"]))
    if notes:
        lines.append("  note: " + "; ".join(notes))
    return "\n".join(lines)


# What a terminal would act on rather than show: C0 and C1 controls (ESC starts a sequence
# that sets the title or clears the screen, BEL rings), DEL, the line and paragraph
# separators, the bidirectional overrides (they reorder what is shown), lone surrogates.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029"
                      "\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    n = ord(c)
    return _SHORT.get(c) or (f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}")


def visible(text: str) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\n``,
    ``\\u202e``)."""
    return _CONTROL.sub(lambda m: _escape(m[0]), text)


def _visible_values(v: Any) -> Any:
    if isinstance(v, str):
        return visible(v)
    if isinstance(v, dict):
        return {visible(str(k)): _visible_values(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_visible_values(x) for x in v]
    return v


def _json_line(row: dict) -> str:
    """The row as one JSON line a terminal shows as it is: JSON escapes C0 controls itself;
    the rest (DEL, C1, separators, overrides) become ``\\u`` escapes, the same JSON."""
    line = encode_row(row).decode("utf-8").rstrip("\n")
    return _CONTROL.sub(lambda m: f"\\u{ord(m[0]):04x}", line)


def cli_history(cfg: Config, n: int, as_json: bool, conversation: Optional[str]) -> int:
    path = transcript_path(cfg)
    bad: list = []
    # An id is matched as written, or as history shows it (a control character escaped).
    rows = [r for r in read_rows(path, bad)
            if conversation is None or conversation in (str(r.get("conversation")),
                                                        visible(str(r.get("conversation"))))]
    if not rows and not bad and not path.exists():
        print(f"no transcript yet at {visible(str(path))} (transcript.path; it is written once "
              f"the assistant has answered)")
        return 0
    skipped = len(bad)
    for row in rows[-n:] if n > 0 else rows:
        try:
            text = _json_line(row) if as_json else format_row(_visible_values(row))
        except Exception:     # a row of odd types: counted, never a traceback
            skipped += 1
            continue
        print(text)
    if skipped:
        print(f"history: {skipped} row{'s' if skipped != 1 else ''} of {visible(str(path))} "
              f"skipped: not readable (a line cut by a crash or a full disk, or values of the "
              f"wrong kind)",
              file=sys.stderr)
    return 0
