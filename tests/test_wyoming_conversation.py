"""Home Assistant's conversations (Wyoming ``handle``) on a small context, with the real tiny
llama.cpp model: one id answered question after question (its history compacted as the
voice conversation's is), "Clear." and 清除 forgetting it, and the store of ids.

Issue 24 item 9: with a 512-token context one id was refused after a few exchanges, and
"Clear." was sent to the model as a question, so the id stayed stuck until it expired.
"""

from __future__ import annotations

import pytest

from assistant.config import WyomingConfig
from frontend_rig import REPLY, Rig

pytest.importorskip("wyoming")
from assistant.wyoming.conversations import ConversationStore  # noqa: E402

SMALL = "max_context_len: 512, max_new_tokens: 32"
HINT = "\nAnswer in English."           # what the model gets after an English question


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path, llm=SMALL, camera=False)
    yield r
    r.close()


def questions(n: int, start: int = 0) -> list[str]:
    return [f"What is item number {i} on the table there?" for i in range(start, start + n)]


def test_one_id_is_answered_again_and_again_its_history_compacted(rig):
    """Catches: the id refused once its history fills the context (the issue); the
    conversation forgetting its compaction, so the next request's history is fed back
    whole every turn (a load per turn instead of one per compaction) or its cost is
    miscounted; a compaction that does not shrink the context."""
    asked = questions(12)
    for q in asked:
        assert rig.ask(q, "long") == ("handled", REPLY, "long")
    rows = rig.rows(12)
    assert [r["intent"] for r in rows] == ["question"] * 12
    compactions = [r["compaction"] for r in rows if r["compaction"]]
    assert len(compactions) >= 3
    for c in compactions:
        assert c["kind"] == "compact" and c["exchanges_dropped"] >= 1
        assert c["tokens_after"] < c["tokens_before"]
    # What the model holds: the newest exchanges only, in order, ending with the last.
    held = rig.held()
    assert 2 <= len(held) < len(asked)
    assert [q for q, _ in held] == asked[len(asked) - len(held):-1] + [asked[-1] + HINT]
    assert all(a == REPLY for _, a in held)
    # The id's history was evaluated again only when compacted (the first turn loads the
    # empty one): the store's 10-exchange window sliding over compacted-away exchanges
    # does not make it feed everything back.
    assert len(rig.loads) == 1 + len(compactions)
    # The prompt the context holds stays below the context: every turn starts from less
    # than the compaction left room for.
    assert max(r["counts"]["context_before"] for r in rows) < 512


def test_an_id_whose_history_no_longer_fits_after_a_voice_turn_is_compacted(rig):
    """The voice conversation took the model in between, so the id's whole stored history
    (10 exchanges, far past the context) must go back in. Catches: refusing it
    ("our conversation is too long", for ever) instead of feeding back its newest."""
    for q in questions(10):
        assert rig.ask(q, "ha")[0] == "handled"
    assert rig.voice("And what is on the wall?").answer == REPLY
    assert rig.ask("And the window?", "ha") == ("handled", REPLY, "ha")
    row = rig.rows(12)[-1]
    assert row["conversation"] == "wyoming:ha" and row["compaction"]["exchanges_dropped"] >= 7
    stored = [q for q, _ in rig.store.get("ha").history()]
    fed = [q for q, _ in rig.loads[-1]]
    assert fed and fed == stored[len(stored) - 1 - len(fed):-1]    # the newest, before the last


def test_clear_forgets_the_id_and_the_next_question_starts_afresh(rig):
    """Catches: "Clear." sent to the model as a question (the id keeps its history and
    the model's answer comes back); the clear not reaching the store; the next question
    still built on the old exchanges."""
    for q in questions(6):
        rig.ask(q, "long")
    assert rig.ask("Clear.", "long") == ("handled", rig.cfg.persona.en.cleared, "long")
    assert rig.store.get("long").history() == []
    row = rig.rows(7)[-1]
    assert (row["intent"], row["source"], row["conversation"], row["answer"]) == (
        "clear", "wyoming", "wyoming:long", rig.cfg.persona.en.cleared)
    assert rig.ask("What now?", "long") == ("handled", REPLY, "long")
    assert rig.loads[-1] == [] and rig.held() == [("What now?" + HINT, REPLY)]
    first, last = rig.rows(8)[0], rig.rows(8)[-1]
    assert last["counts"]["context_before"] == first["counts"]["context_before"]   # empty


def test_the_chinese_clear_phrase_clears_and_is_answered_in_chinese(rig):
    """清除 with no language said: the intent rules' Chinese phrase. Catches: the phrase not
    classified (answered by the model), the English line for a Chinese command."""
    rig.ask("What is on the table?", "zh")
    assert rig.ask("清除。", "zh", language=None) == (
        "handled", rig.cfg.persona.zh.cleared, "zh")
    assert rig.store.get("zh").history() == []


def test_an_exit_phrase_ends_the_id_with_goodbye(rig):
    """Home Assistant's conversation ends (the daemon goes on). Catches: "Goodbye." sent
    to the model, or the id keeping its exchanges after it."""
    rig.ask("What is on the table?", "bye")
    assert rig.ask("Goodbye.", "bye") == ("handled", rig.cfg.persona.en.goodbye, "bye")
    assert rig.store.get("bye").history() == [] and rig.rows(2)[-1]["intent"] == "exit"


def test_requests_without_an_id_each_get_their_own_conversation(rig):
    """Catches (wyoming/conversations.py:60): every request without a conversation id
    sharing one history."""
    _, _, first = rig.ask("What is on the table?", None)
    _, _, second = rig.ask("And on the wall?", None)
    assert first != second and first.startswith("wyoming-") and second.startswith("wyoming-")
    assert rig.loads[-1] == []                  # the second was not given the first's exchange
    assert [q for q, _ in rig.store.get(second).history()] == ["And on the wall?"]


# ---------------------------------------------------------------------------- the store

def test_a_missing_id_is_a_new_conversation_each_time():
    """Catches (wyoming/conversations.py:60): one shared id for all requests without one."""
    store = ConversationStore(WyomingConfig(conversations=4))
    a, b = store.get(None), store.get(None)
    a.add("q", "a")
    assert a is not b and a.id != b.id and b.history() == [] and len(store) == 2


def test_the_store_keeps_exactly_the_configured_number_of_ids():
    """Catches (wyoming/conversations.py:79): keeping one conversation fewer than
    ``wyoming.conversations`` (or one more)."""
    now = [0.0]
    store = ConversationStore(WyomingConfig(conversations=3), clock=lambda: now[0])
    for cid in ("a", "b", "c"):
        store.get(cid).add(f"{cid}?", "yes")
        now[0] += 1
    assert len(store) == 3 and all(c in store for c in "abc")
    store.get("d")                               # the least recently used goes
    assert len(store) == 3 and "a" not in store and all(c in store for c in "bcd")
    assert store.get("b").history() == [("b?", "yes")]
