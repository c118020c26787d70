"""`history` never hands a terminal a control character, and the transcript never stores one
in an id.

A question, an answer or a conversation id (Home Assistant sends any string) can hold ESC
(a sequence that sets the window title or clears the screen), BEL, NUL, C1 controls, a
right-to-left override. Rows go through the real writer thread to a file, and `history`
runs as the real command in its own process; its output is read as bytes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from assistant.transcript import TranscriptWriter, visible

ROOT = Path(__file__).resolve().parents[1]

CONVERSATION = "ha\x00id\x1b]0;owned\x07"
QUESTION = "What is this?\x1b[2J\x1b]0;title\x07 \x9b31m\u202egnp.exe\n  assistant: fake"
ANSWER = "An apple.\x07\x7f"

# Bytes a terminal acts on: C0 but the line ends history prints, DEL, C1 (as UTF-8),
# U+202E (as UTF-8).
RAW_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80\xae")


def _history(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RKVLM_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "assistant", "--config",
                           str(tmp_path / "config.yaml"), "history", *args],
                          cwd=tmp_path, env=env, capture_output=True, timeout=60)


def _write(tmp_path: Path) -> Path:
    (tmp_path / "config.yaml").write_text("transcript: {path: t.jsonl}\n")
    path = tmp_path / "t.jsonl"
    w = TranscriptWriter(path)
    w.write({"time": 1_700_000_000, "conversation": CONVERSATION, "turn": 1,
             "intent": "question", "transcript": QUESTION, "answer": ANSWER,
             "note": "a note\x1b[5m"})
    w.write({"time": 1_700_000_001, "conversation": "plain", "turn": 1, "intent": "question",
             "transcript": "Hello?", "answer": "Hi."})
    assert w.flush(10)
    w.close()
    return path


def test_the_transcript_stores_ids_with_control_characters_escaped(tmp_path):
    # Bug caught: a NUL (and ESC, BEL) in Home Assistant's conversation_id written into the
    # row's id as it came: a NUL in a file other tools read as text, an id nobody can type.
    path = _write(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["conversation"] == "ha\\x00id\\x1b]0;owned\\x07"
    assert rows[0]["conversation"] == visible(CONVERSATION)
    assert rows[1]["conversation"] == "plain"
    # Texts are kept as they were said (JSON escapes them in the file): history shows them.
    assert rows[0]["transcript"] == QUESTION


def test_history_shows_control_characters_escaped(tmp_path):
    # Bug caught: history printed ESC and BEL raw: a question could set the terminal's
    # title, clear the screen, or fake a line of its own ("\n  assistant: ...").
    _write(tmp_path)
    r = _history(tmp_path, "-n", "0")
    assert r.returncode == 0, r.stderr
    assert not RAW_CONTROL.search(r.stdout), r.stdout
    out = r.stdout.decode("utf-8")
    assert ("  person: What is this?\\x1b[2J\\x1b]0;title\\x07 \\x9b31m\\u202egnp.exe\\n"
            "  assistant: fake") in out.splitlines(), out
    assert "  assistant: An apple.\\x07\\x7f" in out.splitlines(), out
    assert "[ha\\x00id\\x1b]0;owned\\x07 #1]" in out and "a note\\x1b[5m" in out, out
    assert len([l for l in out.splitlines() if l.startswith("  assistant:")]) == 2, out


def test_history_json_is_valid_json_with_no_raw_control_character(tmp_path):
    # Bug caught: --json wrote DEL, C1 controls and U+202E raw (JSON does not escape them),
    # or escaped them in a way that is no longer valid JSON or no longer the same text.
    _write(tmp_path)
    r = _history(tmp_path, "--json", "-n", "0")
    assert r.returncode == 0, r.stderr
    assert not RAW_CONTROL.search(r.stdout), r.stdout
    rows = [json.loads(line) for line in r.stdout.decode("utf-8").splitlines()]
    assert [row["transcript"] for row in rows] == [QUESTION, "Hello?"]
    assert rows[0]["answer"] == ANSWER


def test_history_finds_a_conversation_by_the_id_it_shows(tmp_path):
    # Bug caught: an id shown escaped that --conversation could not find again: a row of an
    # earlier release holds the raw NUL; the person types what history showed.
    path = _write(tmp_path)
    with open(path, "a") as f:
        f.write(json.dumps({"time": 1_700_000_002, "conversation": "old\x00id", "turn": 1,
                            "intent": "question", "transcript": "Before?"}) + "\n")
    for shown, question in (("ha\\x00id\\x1b]0;owned\\x07", QUESTION),
                            ("old\\x00id", "Before?")):
        r = _history(tmp_path, "--json", "--conversation", shown)
        rows = [json.loads(line) for line in r.stdout.decode("utf-8").splitlines()]
        assert [row["transcript"] for row in rows] == [question], r.stderr
