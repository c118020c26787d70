"""assistant.frontend.answer, the turn every front-end but the voice runs: one row per turn
(named as the front-end asks), an interrupted row when the consumer stops, none when the
turn was refused. Driven directly, as a front-end such as Wyoming calls it."""

from __future__ import annotations

import asyncio
import contextlib
import json

from assistant.config import Config
from assistant.conversation import Busy, Conversation, Priority, Request, TurnGate
from assistant.frontend import HUNG_UP, answer
from assistant.transcript import TranscriptWriter
from assistant.turn import Turn
from scripted_llm import ScriptedLLM


def rows(writer: TranscriptWriter) -> list[dict]:
    writer.flush()
    return [json.loads(l) for l in writer.path.read_text().splitlines()]


def request(question: str, history=()) -> Request:
    return Request(question, source="wyoming", priority=Priority.TEXT, history=list(history))


def test_answer_records_each_turn_once_however_it_ends(tmp_path):
    writer = TranscriptWriter(tmp_path / "t.jsonl")
    llm = ScriptedLLM(["One two three four.", "Five six seven eight."])
    conv = Conversation(Config(), llm, transcript=writer, gate=TurnGate(max_waiting=0))

    async def whole():
        return "".join([p async for p in answer(conv, request("First?"), Turn(source="wyoming"),
                                                "wyoming:kitchen")])

    async def cut():
        async with contextlib.aclosing(answer(conv, request("Second?"), Turn(source="wyoming"),
                                              "wyoming:kitchen")) as pieces:
            async for _ in pieces:
                break                             # the client went away

    async def refused():
        async with conv.gate.slot(Priority.VOICE):   # the model is busy, no line allowed
            try:
                async for _ in answer(conv, request("Third?"), Turn(source="wyoming")):
                    pass
            except Busy:
                return True
        return False

    try:
        assert asyncio.run(whole()) == "One two three four."
        asyncio.run(cut())
        assert asyncio.run(refused())
        got = rows(writer)
        assert [(r["transcript"], r["interrupted"], r["note"], r["conversation"]) for r in got] == [
            ("First?", False, "", "wyoming:kitchen"),
            ("Second?", True, HUNG_UP, "wyoming:kitchen")]
        assert got[1]["answer"] == "Five"
        # The cut turn is not trusted: the next request with the same (empty) history has it
        # fed back rather than run on top of the cut answer.
        before = len(llm.histories)
        asyncio.run(whole())
        assert llm.histories[before:] == [[]]
    finally:
        writer.close()
