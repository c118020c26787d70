"""Compaction off the critical path (llm.compact_at): the conversation compacts in the quiet
after an answer and evaluates the scene's image again as the next turn's opening, with the
real tiny llama.cpp model and projector (the llama.cpp encoder on a picture)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import numpy as np
import pytest

from assistant.config import parse
from assistant.conversation import Conversation, Priority, Request
from assistant.llm.llamacpp import LlamaCppBackend
from assistant.turn import Turn
from assistant.vision.file_camera import ImageCamera
from assistant.vision.scene import Scene
from tiny_models import write_mmproj, write_text_model

REPLY = "I see one red apple on a wooden table near the window."
NEXT = "What is on the right?"
MEDIA = "<__media__>\n"           # where llama.cpp's chat puts an image in a message
QUESTIONS = ["What do you see on the table?", "What color is the cup?", "What is on the left?",
             "Is there a window?", "How many apples are there?", "Describe the picture."]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("idle-models")
    return write_text_model(d / "tiny.gguf", scripted_reply=REPLY), write_mmproj(d / "mmproj.gguf")


def config(compact_at: float):
    return parse("persona: {system_prompt: 'Be brief.', language: en}\n"
                 f"llm: {{max_context_len: 512, max_new_tokens: 32, temperature: 0, "
                 f"compact_at: {compact_at}}}\n"
                 "vision: {encoder: llamacpp, watch: false}\n")


@pytest.fixture
def setup(tmp_path, model_files):
    """The real backend and projector, a camera on one still picture, the conversation."""
    import cv2
    picture = tmp_path / "scene.png"
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[16:48, 16:48] = (200, 40, 40)
    cv2.imwrite(str(picture), rgb)
    cfg = config(0.7)
    made = []

    def make(llm_class=LlamaCppBackend):
        llm = llm_class(cfg.llm, cfg.persona, *model_files)
        llm.load()
        encoder = llm.encoder()
        encoder.load()
        camera = ImageCamera(picture)
        camera.open()
        made.append(llm)
        return Conversation(cfg, llm, scene=Scene(camera, encoder, cfg.vision))

    yield make
    for llm in made:
        llm.close()


async def ask(conv: Conversation, question: str) -> Turn:
    turn = Turn()
    async for _ in conv.ask(Request(question), turn):
        pass
    return turn


async def fill(conv: Conversation) -> list[Turn]:
    """Questions until the next one would not fit (none compacted at question time yet);
    the context is then past compact_at."""
    b, turns = conv.backend, []
    for q in QUESTIONS * 4:
        turns.append(await ask(conv, q))
        assert turns[-1].answer == REPLY and turns[-1].compaction is None
        if b.tokens_used + b.turn_cost(NEXT) > b.context_size:
            assert conv.wants_compaction()
            return turns
    raise AssertionError("the context never filled")


def held(b: LlamaCppBackend) -> list[tuple[str, str]]:
    msgs = [m for m in b._messages if m["role"] != "system"]
    text = [m["content"] if isinstance(m["content"], str) else
            next(c["text"] for c in m["content"] if c.get("type") == "text") for m in msgs]
    return list(zip(text[0::2], text[1::2]))


def test_compacted_while_idle_the_next_question_finds_room(setup):
    conv = setup()
    b = conv.backend

    async def go():
        turns = await fill(conv)
        assert turns[0].scene == "new" and turns[1].scene == "same"
        question = NEXT                 # as things are, it would compact in its own turn
        quiet = asyncio.Event()
        conv.work_when_idle(quiet.is_set)          # the answer is still being spoken
        await asyncio.sleep(0.3)
        assert conv.compactions == 0               # nothing while it is not quiet
        # Quiet, but a turn holds the model: the job queues for it, and the person speaks
        # again before it gets it. Bug caught: the job not asking again once it has the
        # model, compacting over the person's new question.
        async with conv.gate.slot(Priority.VOICE):
            quiet.set()
            await asyncio.sleep(0.3)
            assert conv.gate.waiting == 1          # the job, waiting for the model
            quiet.clear()
        await asyncio.sleep(0.3)
        assert conv.compactions == 0 and conv.idle_compactions == 0
        assert not conv._idle_task.done()          # still waiting for quiet
        quiet.set()
        await conv._idle_task
        assert conv.idle_compactions == 1 and not conv.wants_compaction()
        kept = held(b)
        assert 0 < len(kept) < len(turns)
        assert kept == [e.pair for e in conv.exchanges[-len(kept):]]
        turn = await ask(conv, question)
        return turn, kept

    turn, kept = asyncio.run(go())
    assert turn.answer == REPLY
    assert turn.compaction is None                 # the room was made while idle
    # The same scene: its image, evaluated again while idle, opened this turn.
    assert turn.scene == "same" and turn.with_image
    assert turn.counts["image_evaluated_while_idle"] > 0 and turn.counts["prefilled_ahead"] > 0
    # The context: the kept exchanges, then this one, the image at its opening.
    assert held(b)[:-1] == kept
    assert held(b)[-1] == (MEDIA + NEXT, REPLY)


class SlowHistory(LlamaCppBackend):
    """The real backend, whose history feed-back holds until told (a scripted pause: the
    only way to make a question arrive in the middle of the idle compaction every time)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.entered = threading.Event()
        self.release = threading.Event()

    def load_history(self, exchanges):
        self.entered.set()
        assert self.release.wait(30)
        super().load_history(exchanges)


def test_a_question_during_the_idle_compaction_waits_for_it_and_is_answered(setup, caplog):
    conv = setup(SlowHistory)
    b = conv.backend

    async def go():
        await fill(conv)
        conv.work_when_idle(lambda: True)
        await asyncio.to_thread(b.entered.wait, 30)          # the compaction is under way
        question = asyncio.create_task(ask(conv, NEXT))
        await asyncio.sleep(0.2)
        assert not question.done()                            # it waits for the model
        b.release.set()
        turn = await question
        await conv.finish_idle_work()
        return turn

    with caplog.at_level("INFO", logger="assistant.conversation"):
        turn = asyncio.run(go())
    assert turn.answer == REPLY and turn.compaction is None
    assert turn.counts["waited_for_idle_compaction_ms"] >= 150
    assert "waited" in caplog.text and "compaction done while idle" in caplog.text
    # The image was left to the question (it was waiting): it carried it itself.
    assert "image_evaluated_while_idle" not in turn.counts
    assert turn.scene == "new" and turn.with_image
    assert held(b)[-1] == (MEDIA + NEXT, REPLY)
    assert conv.idle_compactions == 1


def test_nothing_is_compacted_below_the_mark_or_with_compact_at_zero(setup):
    conv = setup()

    async def go():
        await ask(conv, QUESTIONS[0])
        assert not conv.wants_compaction()           # one exchange: far below 0.7
        conv.cfg = replace(conv.cfg, llm=replace(conv.cfg.llm, compact_at=0.0))
        await fill_without_mark(conv)

    async def fill_without_mark(c):
        for q in QUESTIONS * 3:
            await ask(c, q)
            assert not c.wants_compaction()

    asyncio.run(go())
    assert conv.idle_compactions == 0
