"""The conversation budget and the context-full policy."""

import json

import numpy as np
import pytest

from assistant.config import LlmConfig
from assistant.dialogue import Conversation
from assistant.errors import ContextFullError
from assistant.llm.base import ImageEmbedding
from scripted_llm import ScriptedLLM


def _image(n=196, dim=8):
    return ImageEmbedding(np.zeros((n, dim), np.float32), 392, 392)


def test_fits_counts_history_image_and_answer():
    llm = ScriptedLLM(context=300)
    conv = Conversation(LlmConfig(max_new_tokens=50), llm)
    assert conv.fits("what is this", None)
    assert conv.needed("what is this", _image(196)) == 3 + 16 + 50 + 196 + 4
    assert conv.fits("what is this", _image(196))        # 10 used + 269 <= 300
    assert not conv.fits("what is this", _image(250))
    llm.used = 240
    assert not conv.fits("what is this", None)


def test_policy_clear_forgets_and_goes_on():
    llm = ScriptedLLM(context=200)
    conv = Conversation(LlmConfig(max_new_tokens=50, on_context_full="clear"), llm)
    conv.record("q", "a", False)
    llm.used = 180
    assert conv.make_room("and now?", None) is True
    assert llm.clears == 1 and llm.used == llm.system_tokens and conv.exchanges == []
    assert conv.make_room("and now?", None) is False


def test_policy_error_refuses_with_advice():
    llm = ScriptedLLM(context=200)
    conv = Conversation(LlmConfig(max_new_tokens=50, on_context_full="error"), llm)
    llm.used = 180
    with pytest.raises(ContextFullError, match="say \"clear\""):
        conv.make_room("and now?", None)
    assert llm.clears == 0


def test_a_turn_larger_than_the_context_is_an_error_either_way():
    llm = ScriptedLLM(context=200)
    conv = Conversation(LlmConfig(max_new_tokens=100, on_context_full="clear"), llm)
    with pytest.raises(ContextFullError, match="llm.max_context_len"):
        conv.make_room("look", _image(196))


def test_without_keep_history_only_the_turn_counts():
    llm = ScriptedLLM(context=200)
    conv = Conversation(LlmConfig(max_new_tokens=50, keep_history=False), llm)
    llm.used = 190
    assert conv.fits("hello there", None)


def test_transcript_lines(tmp_path):
    path = tmp_path / "logs" / "t.jsonl"
    conv = Conversation(LlmConfig(), ScriptedLLM(), transcript=path)
    conv.record("你看到了什么？", "一个苹果。", True, turn=1)
    conv.record("and?", "a mug", False, turn=2)
    rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]
    assert [r["question"] for r in rows] == ["你看到了什么？", "and?"]
    assert rows[0]["image"] is True and rows[0]["turn"] == 1
    assert len(conv.exchanges) == 2


def test_unwritable_transcript_is_not_fatal(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    conv = Conversation(LlmConfig(), ScriptedLLM(), transcript=blocker / "t.jsonl")
    conv.record("q", "a", False)
    assert "logging.transcript" in caplog.text
