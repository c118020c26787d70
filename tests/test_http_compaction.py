"""An HTTP client that sends its whole conversation back each time, on a small context, with
the real tiny llama.cpp model: its history is compacted as the voice conversation's is, and
the compaction holds for its next requests.

Issue 24 item 9 asked whether HTTP had Home Assistant's problem: it did. After the first
compaction the conversation took the client's whole history for what the context held, so
the next request's compaction miscounted and failed ("does not fit": 400 for ever).
"""

from __future__ import annotations

import pytest

from frontend_rig import REPLY, Rig

pytest.importorskip("wyoming")


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path, llm="max_context_len: 512, max_new_tokens: 128", camera=False)
    yield r
    r.close()


def test_a_client_sending_its_growing_history_is_answered_every_time(rig):
    """Catches: the request after a compaction refused (the issue); the compaction
    forgotten, so the whole history is fed back at every request."""
    messages: list[dict] = []
    for i in range(10):
        messages.append({"role": "user", "content": f"What is item number {i} on the table there?"})
        status, body = rig.chat(messages)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == REPLY
        messages.append({"role": "assistant", "content": REPLY})
    rows = rig.rows(10)
    compactions = [r["compaction"] for r in rows if r["compaction"]]
    assert len(compactions) >= 3
    assert all(c["tokens_after"] < c["tokens_before"] for c in compactions)
    assert len(rig.loads) == 1 + len(compactions)
    held = rig.held()
    assert 2 <= len(held) < 10 and held[-1] == ("What is item number 9 on the table there?", REPLY)


def test_a_history_past_the_context_is_the_clients_to_shorten(rig):
    """HTTP keeps nothing: a history that cannot be fed back is refused with OpenAI's
    context_length_exceeded (its client holds it and can send fewer), not cut silently.
    Catches: the compaction Home Assistant's histories get applied to HTTP's."""
    pairs = [(f"What is item number {i} on the table there?", REPLY) for i in range(10)]
    messages = [m for q, a in pairs for m in ({"role": "user", "content": q},
                                              {"role": "assistant", "content": a})]
    status, body = rig.chat(messages + [{"role": "user", "content": "And now?"}])
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = rig.chat(messages[-4:] + [{"role": "user", "content": "And now?"}])
    assert status == 200 and body["choices"][0]["message"]["content"] == REPLY
