"""The transcript writer and `history` under bad input and a full disk.

Rows go through the real writer thread and files; the full disk is real too: a child
process whose file size limit (RLIMIT_FSIZE) ends a write part-way, as a full disk does.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from assistant import cli
from assistant.transcript import MAX_TEXT_CHARS, TranscriptWriter, read_rows


def strict_rows(path: Path) -> list[dict]:
    """Every line as strict JSON (no NaN / Infinity); fails on a torn or invalid line."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return [json.loads(line, parse_constant=refuse)
            for line in path.read_text(encoding="utf-8").splitlines()]


def written(path: Path, *rows: dict) -> TranscriptWriter:
    w = TranscriptWriter(path)
    for row in rows:
        w.write(row)
    assert w.flush(10)
    return w


def test_a_lone_surrogate_in_any_field_is_written_escaped_and_later_rows_too(tmp_path, caplog):
    path = tmp_path / "t.jsonl"
    bad = "\ud800"
    with caplog.at_level(logging.WARNING):
        w = written(path,
                    {"turn": 1, "transcript": f"hello {bad}", "answer": "fine"},
                    {"turn": 2, "transcript": "q", "answer": f"a{bad}b", "note": bad,
                     "counts": {f"key{bad}": 1}},
                    {"turn": 3, "transcript": "after", "answer": "still written"})
    w.close()
    rows = strict_rows(path)
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert rows[0]["transcript"] == "hello \\ud800"          # the text, escaped
    assert rows[1]["answer"] == "a\\ud800b" and rows[1]["note"] == "\\ud800"
    assert rows[1]["counts"] == {"key\\ud800": 1}
    assert rows[2]["answer"] == "still written"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_nan_and_infinity_are_written_as_strict_json(tmp_path):
    path = tmp_path / "t.jsonl"
    written(path, {"turn": 1, "timings_ms": {"asr_ms": float("nan"), "llm_ms": float("inf")}},
            {"turn": 2, "answer": "next"}).close()
    rows = strict_rows(path)
    assert rows[0]["timings_ms"] == {"asr_ms": "nan", "llm_ms": "inf"}
    assert rows[1]["answer"] == "next"


def test_a_huge_question_is_stored_as_a_bounded_prefix(tmp_path):
    path = tmp_path / "t.jsonl"
    question = "why " * 4_000_000                      # 16 million characters
    written(path, {"turn": 1, "transcript": question, "answer": "ok"}).close()
    assert path.stat().st_size < 2 * MAX_TEXT_CHARS
    row, = strict_rows(path)
    assert row["transcript"].startswith(question[:MAX_TEXT_CHARS])
    assert row["transcript"].endswith(f"[... cut: {len(question)} characters in all]")
    assert row["answer"] == "ok"


def test_one_fsync_per_row(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    synced: list[str] = []
    real = os.fsync

    def counting(fd):
        synced.append(threading.current_thread().name)
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    w = written(path, *({"turn": i, "answer": "a"} for i in range(7)))
    assert len(synced) == 7 and set(synced) == {"transcript"}
    w.write({"turn": 7, "answer": "b"})
    assert w.flush(10)
    assert len(synced) == 8
    w.close()
    assert len(strict_rows(path)) == 8


class Unprintable:
    """A value the row's JSON encoding cannot take (its str() fails)."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __str__(self):
        raise self.exc


def test_a_row_that_cannot_be_encoded_is_dropped_with_one_warning(tmp_path, caplog):
    """One warning for a run of failing rows, naming the first; again after a success.

    Bugs caught: the warning given for a later row of the run instead of the first (the
    flag tested the wrong way: the old texts "no text" / "no text either" both matched);
    the warn-once flag never reset after a success (writer_thread.py: the second run of
    failures was silent); a failing row that stops the rows after it."""
    path = tmp_path / "t.jsonl"
    with caplog.at_level(logging.WARNING):
        w = written(path, {"turn": 1, "answer": Unprintable(RuntimeError("row one"))},
                    {"turn": 2, "answer": Unprintable(RuntimeError("row two"))},
                    {"turn": 3, "answer": "written"},
                    {"turn": 4, "answer": Unprintable(RuntimeError("row four"))},
                    {"turn": 5, "answer": "written too"})
    w.close()
    assert [r["turn"] for r in strict_rows(path)] == [3, 5]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "(RuntimeError: row one)" in warnings[0], warnings
    assert "(RuntimeError: row four)" in warnings[1], warnings
    assert w.failures == 3


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_writer_thread_that_died_is_started_again_with_one_warning(tmp_path, caplog):
    path = tmp_path / "t.jsonl"
    w = TranscriptWriter(path)
    first = w._thread
    # SystemExit is not an error a writer catches: it ends the thread, as a bug would.
    w.write({"turn": 1, "answer": Unprintable(SystemExit())})
    first.join(10)
    assert not first.is_alive()
    with caplog.at_level(logging.WARNING):
        w.write({"turn": 2, "answer": "after the restart"})
        assert w.flush(10)
    w.close()
    assert [r["answer"] for r in strict_rows(path)] == ["after the restart"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["the transcript writer thread had stopped; started again"]


# A child process with a small file size limit: the write that crosses it is cut short
# (a full disk), the ones after it fail; then the limit is lifted (space freed).
FULL_DISK = textwrap.dedent("""
    import json, logging, resource, signal, sys
    from pathlib import Path
    from assistant.transcript import TranscriptWriter

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # EFBIG instead of a signal
    path = Path(sys.argv[1])
    w = TranscriptWriter(path)
    row = lambda i: {"turn": i, "answer": "x" * 150}
    w.write(row(1)); assert w.flush(10)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100, hard))
    w.write(row(2)); w.write(row(3)); assert w.flush(10)
    print("SIZE-WHILE-FULL", path.stat().st_size, flush=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    w.write(row(4)); w.write(row(5)); assert w.flush(10)
    w.close()
""")


def test_a_full_disk_leaves_no_torn_line_and_says_written_again_only_when_it_is(tmp_path):
    path = tmp_path / "t.jsonl"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")] if p)
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = strict_rows(path)                       # every line whole: the torn one was cut
    assert [r["turn"] for r in rows] == [1, 4, 5]
    log = proc.stderr
    warnings = [l for l in log.splitlines() if "cannot write the transcript" in l]
    assert len(warnings) == 1 and ("too large" in warnings[0] or "No space" in warnings[0]), log
    again = [i for i, l in enumerate(log.splitlines()) if "is written again" in l]
    assert len(again) == 1, log
    # While full, the first row's line was all the file held: row 2 did not stay half written.
    first_size = len(path.read_text().splitlines()[0]) + 1
    assert f"SIZE-WHILE-FULL {first_size}" in proc.stdout, proc.stdout


def test_a_torn_line_that_cannot_be_cut_is_left_alone_on_its_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"turn": 1, "answer": "whole"}\n{"turn": 2, "ans')     # a crash mid-line
    w = TranscriptWriter(path)
    w._torn = True                   # what a failed cut leaves the writer knowing
    w.write({"turn": 3, "answer": "next"})
    assert w.flush(10)
    w.close()
    lines = path.read_text().splitlines()
    assert lines[1] == '{"turn": 2, "ans' and json.loads(lines[2])["turn"] == 3
    skipped: list = []
    assert [r["turn"] for r in read_rows(path, skipped)] == [1, 3]
    assert skipped == ['{"turn": 2, "ans']


def test_history_shows_what_it_can_and_counts_what_it_skips(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("transcript: {path: t.jsonl}\n")
    good = {"turn": 1, "time": 1_700_000_000, "conversation": "c1", "intent": "question",
            "transcript": "What is on the table?", "answer": "An apple."}
    lines = [json.dumps(good),
             '{"turn": 2, "time": 1e300, "intent": "question", "answer": "far future"}',
             '{"turn": 3, "time": NaN, "intent": "question", "answer": "no time"}',
             '{"turn": 4, "time": "yesterday", "intent": 7, "source": 5, "note": 9}',
             '{"turn": 5, "compaction": "not a dict", "intent": "question"}',
             '{"turn": 6, "transcript": "\\ud800 lone", "intent": "question"}',
             '[1, 2, 3]',
             '{"turn": 7, "answer": "torn',
             json.dumps({**good, "turn": 8, "answer": "The last one."})]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    config = str(tmp_path / "config.yaml")
    assert cli.main(["--config", config, "history", "-n", "0"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "An apple." in out and "The last one." in out
    assert "far future" in out and "no time" in out      # shown, with an unknown time
    assert "\\ud800 lone" in out
    assert "not a dict" not in out
    assert "history: 3 rows of" in err and "skipped" in err, err
    assert cli.main(["--config", config, "history", "--json", "-n", "0"]) == 0
    out, err = capsys.readouterr()
    shown = [json.loads(l, parse_constant=pytest.fail) for l in out.splitlines()]
    assert [r["turn"] for r in shown] == [1, 2, 3, 4, 5, 6, 8]
    assert shown[2]["time"] == "nan"
    assert "history: 2 rows of" in err, err
