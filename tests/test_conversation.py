"""The conversation component with the real tiny llama.cpp model: what the context holds
after a barge-in, after another front-end's turn, in another language; the turn queue; the
transcript and `history`."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from assistant.audio.asr import Transcript
from assistant.audio.null_sink import NullSink
from assistant.audio.wav_sink import WavSink
from assistant.audio.wav_source import WavSource
from assistant.config import Config, parse
from assistant.conversation import Busy, Conversation, Priority, Request, TurnGate
from assistant.llm.llamacpp import LlamaCppBackend
from assistant.pipeline import Components, Pipeline, make_conversation
from assistant.transcript import TranscriptWriter, read_rows
from assistant.turn import Turn
from doubles import SilentVoices as Voices
from speech_fixtures import write_wav
from tiny_models import write_mmproj, write_text_model

RATE = 16000
# Words may not repeat in a scripted reply (the tiny model picks each from the one before).
LONG = ("Let me describe everything I can see in great detail, starting with a wooden "
        "table, one red apple, two blue mugs and some small plates near the window. Behind "
        "them stands an old lamp beside several books.")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv-models")
    return {"long": write_text_model(d / "long.gguf", scripted_reply=LONG),
            "short": write_text_model(d / "short.gguf", scripted_reply="I see a red apple."),
            "zh": write_text_model(d / "zh.gguf", scripted_reply="我看到 一个 红苹果。"),
            "mmproj": write_mmproj(d / "mmproj.gguf")}


def backend(cfg: Config, model: Path) -> LlamaCppBackend:
    b = LlamaCppBackend(cfg.llm, cfg.persona, model)
    b.load()
    return b


CFG = parse("persona: {system_prompt: 'Be brief.', language: en}\n"
            "llm: {max_context_len: 1024, max_new_tokens: 64, temperature: 0}\n"
            "camera: {source: null}\nvision: {encoder: none}\n")


def history_in_the_model(b: LlamaCppBackend) -> list[tuple[str, str]]:
    """(user, assistant) pairs the llama.cpp backend's context holds, as text."""
    msgs = [m for m in b._messages if m["role"] != "system"]
    text = [m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
            for m in msgs]
    return list(zip(text[0::2], text[1::2]))


def test_barge_in_keeps_only_what_was_spoken(tmp_path, spoken, whisper_tiny, models):
    """Real time is the point here: the person talks over the answer while it plays."""
    from assistant.audio.tts import VoiceSet
    from assistant.config import TtsConfig
    voices = VoiceSet(TtsConfig())
    voices.load()
    q = spoken.pcm("What do you see on the table?")
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), q, np.zeros(int(3.5 * RATE), np.int16),
                          spoken.pcm("What color is the cup?"), np.zeros(int(2.5 * RATE), np.int16)])
    cfg = replace(CFG, audio=replace(CFG.audio, barge_in=True))
    b = backend(cfg, models["long"])
    parts = Components(source=WavSource(write_wav(tmp_path / "q.wav", pcm, RATE), realtime=True),
                       sink=WavSink(tmp_path / "a.wav", voices.sample_rate, realtime=True),
                       asr=whisper_tiny, voices=voices, llm=b)
    pipe = Pipeline(cfg, parts)
    try:
        asyncio.run(pipe.run(greet=False))
    finally:
        asyncio.run(parts.sink.close())
        b.close()
    first, second = pipe.turns
    assert first.interrupted and first.answer and len(first.answer) < len(LONG)
    assert LONG.startswith(first.answer)
    # The model's context holds the spoken part as the first answer, then the second turn.
    held = history_in_the_model(b)
    assert held[0][1] == first.answer
    assert len(held) == 2 and held[1][1] == LONG       # the second answer was heard whole
    assert pipe.conversation.exchanges[0].answer == first.answer


class ChineseEar:
    """Whisper's result for a Chinese speaker (no Chinese voice exists to make the audio)."""

    def __init__(self, texts):
        self.texts = list(texts)

    def transcribe(self, pcm):
        text, lang = self.texts.pop(0)
        return Transcript(text=text, language=lang, accepted=True, reason="", no_speech_prob=0.0,
                          avg_logprob=-0.1, audio_s=len(pcm) / RATE, elapsed_s=0.0)


def test_the_persons_language_goes_to_the_model_and_the_voice(tmp_path, spoken, models):
    # Three utterances (their words come from the ear below): a Chinese question, an English
    # question, and a Chinese clear.
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16)] + [
        np.concatenate([spoken.pcm("What do you see on the table?"), np.zeros(RATE, np.int16)])
        for _ in range(3)])
    cfg = replace(CFG, persona=replace(CFG.persona, language="auto"))
    b = backend(cfg, models["zh"])
    ear = ChineseEar([("你看到了什么？", "zh"), ("What do you see?", "en"), ("清除", "zh")])
    voices = Voices()
    parts = Components(source=WavSource(write_wav(tmp_path / "q.wav", pcm, RATE)),
                       sink=NullSink(RATE), asr=ear, voices=voices, llm=b)
    pipe = Pipeline(cfg, parts)
    try:
        asyncio.run(pipe.run(greet=False))
    finally:
        b.close()
    zh_q, en_q, clear = pipe.turns
    assert [t.intent for t in pipe.turns] == ["question", "question", "clear"]
    assert zh_q.language == "zh" and zh_q.answer == "我看到 一个 红苹果。"
    assert history_in_the_model(b) == []      # the Chinese clear emptied the context
    # The Chinese answer and the Chinese "cleared" line went to the Chinese voice; the
    # English voice spoke nothing Chinese and the Chinese voice nothing English.
    assert ("zh", "我看到 一个 红苹果。") in voices.said
    assert ("zh", cfg.persona.zh.cleared) in voices.said
    assert clear.answer == cfg.persona.zh.cleared
    for lang, text in voices.said:
        has_cjk = any("\u4e00" <= ch <= "\u9fff" for ch in text)
        assert (lang == "zh") == has_cjk, (lang, text)


def test_the_reply_hint_is_in_the_prompt(models):
    b = backend(CFG, models["short"])
    conv = Conversation(CFG, b)

    async def go():
        t1, t2 = Turn(), Turn()
        [p async for p in conv.ask(Request("你看到了什么？", language="zh"), t1)]
        [p async for p in conv.ask(Request("What now?", language="en"), t2)]
    try:
        asyncio.run(go())
        users = [m["content"] for m in b._messages if m["role"] == "user"]
    finally:
        b.close()
    assert users[0].endswith("请用中文回答。") and users[1].endswith("Answer in English.")
    # The exchanges keep what the person said, without the hint.
    assert [e.question for e in conv.exchanges] == ["你看到了什么？", "What now?"]


def test_a_stateless_request_leaves_the_voice_conversation_intact(models, caplog):
    b = backend(CFG, models["short"])
    conv = Conversation(CFG, b)
    caplog.set_level(logging.INFO, logger="assistant.conversation")

    async def ask(req):
        turn = Turn(source=req.source)
        return "".join([p async for p in conv.ask(req, turn)]), turn

    async def go():
        await ask(Request("What is on the table?", language="en"))
        http_history = [("Hi there", "Hello, how can I help?")]
        a, t = await ask(Request("And the cup?", source="http", priority=Priority.TEXT,
                                 history=http_history))
        held_http = history_in_the_model(b)
        # The next request extends the one the model holds: no feeding back.
        evaluated = b.evaluated_tokens
        await ask(Request("Thanks", source="http", priority=Priority.TEXT,
                          history=http_history + [("And the cup?", a)]))
        extend_cost = b.evaluated_tokens - evaluated
        await ask(Request("Is there a book?", language="en"))
        return held_http, extend_cost

    try:
        held_http, extend_cost = asyncio.run(go())
        held_voice = history_in_the_model(b)
    finally:
        b.close()
    assert held_http[0] == ("Hi there", "Hello, how can I help?")
    assert extend_cost < 40          # only the new question and its answer were evaluated
    # The voice conversation came back: its two questions, nothing of the HTTP one.
    assert [q for q, _ in held_voice] == ["What is on the table?",
                                          "Is there a book?\nAnswer in English."]
    assert "voice conversation fed back" in caplog.text


def test_voice_turns_go_first_and_a_full_queue_is_refused():
    async def go():
        gate = TurnGate(max_waiting=2, max_wait_s=5)
        order = []

        async def user(name, prio, hold=0.05):
            async with gate.slot(prio):
                order.append(name)
                await asyncio.sleep(hold)

        first = asyncio.create_task(user("http-1", Priority.TEXT, 0.2))
        await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(user("http-2", Priority.TEXT)),
                   asyncio.create_task(user("http-3", Priority.TEXT))]
        await asyncio.sleep(0.01)
        with pytest.raises(Busy) as refused:
            await user("http-4", Priority.TEXT)
        voice = asyncio.create_task(user("voice", Priority.VOICE))   # never refused
        await asyncio.gather(first, voice, *waiting)
        # A short wait limit refuses with a Retry-After.
        slow = TurnGate(max_waiting=4, max_wait_s=0.05)
        hog = asyncio.create_task(_hold(slow, 0.3))
        await asyncio.sleep(0.01)
        with pytest.raises(Busy) as timed_out:
            async with slow.slot(Priority.TEXT):
                pass
        await hog
        async with slow.slot(Priority.TEXT):      # the slot is free again
            pass
        return order, refused.value, timed_out.value

    order, refused, timed_out = asyncio.run(go())
    assert order == ["http-1", "voice", "http-2", "http-3"]
    assert refused.retry_after > 0 and timed_out.retry_after > 0


async def _hold(gate, seconds):
    async with gate.slot(Priority.TEXT):
        await asyncio.sleep(seconds)


# ---------------------------------------------------------------------------- transcript

def test_transcript_rotates_and_reads_back(tmp_path):
    from assistant.config import TranscriptConfig
    w = TranscriptWriter(tmp_path / "t.jsonl", TranscriptConfig(max_bytes=10_000, keep=2))
    for i in range(200):
        w.write({"turn": i, "intent": "question", "transcript": f"question {i}", "pad": "x" * 100})
    w.flush()
    w.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]
    assert all(p.stat().st_size <= 10_000 for p in tmp_path.iterdir())
    rows = list(read_rows(tmp_path / "t.jsonl"))
    turns = [r["turn"] for r in rows]
    assert turns == sorted(turns) and turns[-1] == 199     # oldest first, the newest kept


def test_an_unwritable_transcript_is_one_warning_and_the_conversation_goes_on(
        tmp_path, spoken, whisper_tiny, models, caplog):
    (tmp_path / "blocked").write_text("a file where the transcript's folder should be")
    writer = TranscriptWriter(tmp_path / "blocked" / "t.jsonl")
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), spoken.pcm("What do you see on the table?"),
                          np.zeros(RATE, np.int16), spoken.pcm("What color is the cup?"),
                          np.zeros(RATE, np.int16)])
    b = backend(CFG, models["short"])
    parts = Components(source=WavSource(write_wav(tmp_path / "q.wav", pcm, RATE)),
                       sink=NullSink(RATE), asr=whisper_tiny, voices=Voices(), llm=b)
    caplog.set_level(logging.WARNING, logger="assistant.transcript")
    pipe = Pipeline(CFG, parts, conversation=make_conversation(CFG, parts, writer))
    try:
        asyncio.run(pipe.run(greet=False))
        writer.flush()
    finally:
        writer.close()
        b.close()
    assert [t.answer for t in pipe.turns] == ["I see a red apple."] * 2
    warnings = [r for r in caplog.records if "cannot write the transcript" in r.getMessage()]
    assert len(warnings) == 1


def test_history_prints_the_recent_turns(tmp_path, capsys):
    from assistant import cli
    w = TranscriptWriter(tmp_path / "t.jsonl")
    for i, (q, a, conv) in enumerate([("What is this?", "A cup.", "c1"),
                                      ("clear", "Okay, I've forgotten our conversation.", "c1"),
                                      ("And now?", "A book.", "c2")], 1):
        w.write({"time": 1_700_000_000 + i, "turn": i, "conversation": conv, "transcript": q,
                 "answer": a, "intent": "clear" if q == "clear" else "question",
                 "scene": "new" if i == 1 else "none",
                 "compaction": {"kind": "compact", "tokens_before": 500, "tokens_after": 200}
                 if i == 3 else None, "note": ""})
    w.close()
    (tmp_path / "config.yaml").write_text("transcript: {path: t.jsonl}\n")
    assert cli.main(["--config", str(tmp_path / "config.yaml"), "history", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "What is this?" not in out                      # only the last two
    assert "person: And now?" in out and "assistant: A book." in out
    assert "compact: 500 -> 200 tokens" in out
    assert cli.main(["--config", str(tmp_path / "config.yaml"), "history", "--json",
                     "--conversation", "c1"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["turn"] for r in rows] == [1, 2]


def _prefill_pipeline(tmp_path, pcm, whisper, models):
    from assistant.demo import draw_scene
    from assistant.vision.file_camera import ImageCamera
    draw_scene(tmp_path / "scene.jpg")
    cfg = replace(CFG, camera=replace(CFG.camera, source=str(tmp_path / "scene.jpg")),
                  vision=replace(CFG.vision, encoder="llamacpp", watch=False))
    b = LlamaCppBackend(cfg.llm, cfg.persona, models["short"], models["mmproj"])
    b.load()
    camera = ImageCamera(tmp_path / "scene.jpg")
    camera.open()
    parts = Components(source=WavSource(write_wav(tmp_path / "q.wav", pcm, RATE), realtime=True),
                       sink=NullSink(RATE), asr=whisper, voices=Voices(), llm=b,
                       camera=camera, encoder=b.encoder())
    return Pipeline(cfg, parts), b


def test_a_new_scene_is_prefilled_while_the_person_talks(tmp_path, spoken, whisper_tiny, models):
    """Real time: the image goes in during the question; the turn evaluates only the rest."""
    pcm = np.concatenate([np.zeros(RATE // 2, np.int16), spoken.pcm("What do you see on the table?"),
                          np.zeros(RATE, np.int16)])
    pipe, b = _prefill_pipeline(tmp_path, pcm, whisper_tiny, models)
    try:
        asyncio.run(pipe.run(greet=False))
    finally:
        b.close()
    (turn,) = pipe.turns
    assert turn.scene == "new" and turn.answer == "I see a red apple."
    assert turn.counts["prefilled_ahead"] >= turn.counts["image_tokens"]
    assert b._spec is None


def test_the_prefill_of_noise_is_cut_away(tmp_path, whisper_tiny, models):
    rng = np.random.default_rng(3)
    pcm = np.concatenate([np.zeros(RATE, np.int16),
                          (rng.standard_normal(RATE * 2) * 4000).astype(np.int16),
                          np.zeros(RATE, np.int16)])
    pipe, b = _prefill_pipeline(tmp_path, pcm, whisper_tiny, models)
    system_cells = None
    try:
        system_cells = b._sys_mark.n_cells
        asyncio.run(pipe.run(greet=False))
    finally:
        b.close()
    assert all(t.intent == "nothing" for t in pipe.turns) and pipe.turns
    # Whatever the noise's snapshot put in the context is gone again.
    assert b._spec is None and b._n_cells == system_cells


# ---------------------------------------------------------------------------- audits

def _two_scene_video(path: Path) -> tuple[Path, list[np.ndarray]]:
    """Two frames at 1 fps: a dark scene, then a bright one with a red block; returns the
    frames as the camera decodes them (RGB)."""
    import cv2
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 1.0, (64, 48))
    a = np.full((48, 64, 3), 30, np.uint8)
    b = np.full((48, 64, 3), 200, np.uint8)
    b[10:38, 20:40] = (0, 0, 255)
    for frame in (a, b):
        out.write(frame)
    out.release()
    cap = cv2.VideoCapture(str(path))
    frames = []
    for _ in range(2):
        ok, bgr = cap.read()
        assert ok
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return path, frames


def test_a_new_scene_sends_the_new_image(tmp_path, models):
    """The image the model receives for a question about a changed scene is that scene's,
    not the one the conversation held."""
    from assistant.vision.file_camera import VideoCamera
    from assistant.vision.scene import Scene
    video, frames = _two_scene_video(tmp_path / "two.avi")
    cfg = replace(CFG, vision=replace(CFG.vision, encoder="llamacpp", watch=False))
    b = LlamaCppBackend(cfg.llm, cfg.persona, models["short"], models["mmproj"])
    b.load()
    now = [0.0]
    camera = VideoCamera(video, clock=lambda: now[0])
    camera.open()
    scene = Scene(camera, b.encoder(), cfg.vision)
    conv = Conversation(cfg, b, scene=scene)

    async def ask(q):
        turn = Turn()
        [p async for p in conv.ask(Request(q), turn)]
        return turn

    try:
        expected = [b.encode_image(f).data for f in frames]
        assert not np.allclose(expected[0], expected[1])
        first = asyncio.run(ask("What do you see?"))
        got_first = b._images[-1].embeddings.copy()
        same = asyncio.run(ask("And the colours?"))     # the same frame: no image again
        now[0] = 1.0                                    # the scene changes
        second = asyncio.run(ask("And now?"))
        got_second = b._images[-1].embeddings.copy()
        n_images = len(b._images)
    finally:
        scene.close()
        camera.close()
        b.close()
    assert (first.scene, same.scene, second.scene) == ("new", "same", "new")
    assert n_images == 2
    np.testing.assert_allclose(got_first, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_second, expected[1], rtol=1e-5, atol=1e-6)


def test_each_compaction_keeps_exactly_the_newest_exchanges_that_fit(models):
    """On the real tiny model: after every compaction the context holds the newest
    exchanges, in order, as many as fit within compact_share and beside the turn, and
    one more would not have fitted."""
    cfg = replace(CFG, llm=replace(CFG.llm, max_context_len=384, max_new_tokens=32))
    b = backend(cfg, models["short"])
    conv = Conversation(cfg, b)
    ctx, share = b.context_size, cfg.llm.compact_share
    system = b.tokens_used
    questions = [f"Question number {i} about the {w}?" for i, w in
                 zip(range(40), ["table", "cup", "window", "lamp", "book"] * 8)]
    compactions = 0

    async def ask(q):
        turn = Turn()
        [p async for p in conv.ask(Request(q), turn)]
        return turn

    try:
        for q in questions:
            before = [e.pair for e in conv.exchanges]
            turn = asyncio.run(ask(q))
            if turn.compaction is None:
                continue
            compactions += 1
            k = turn.compaction["exchanges_kept"]
            held = history_in_the_model(b)
            assert held[-1] == (q, "I see a red apple.")
            kept = held[:-1]
            assert kept == (before[len(before) - k:] if k else []), (q, k)
            need = turn.counts["turn_need"]
            cost = b.history_cost(kept)
            assert cost <= share * ctx and system + cost + need <= ctx
            assert turn.compaction["tokens_after"] == system + cost
            if k < len(before):             # one more (the next older) would not fit
                more = b.history_cost(before[len(before) - k - 1:])
                assert more > share * ctx or system + more + need > ctx, (q, k, more)
    finally:
        b.close()
    assert compactions >= 3


def test_a_huge_http_history_is_refused_at_once_and_the_voice_goes_on(models):
    """Issue 17: a 7 MB history of 100k pairs held the model for over 11 minutes. Now it is
    refused without being tokenised, and the next question is answered as usual."""
    from assistant.errors import ContextFullError
    b = backend(CFG, models["short"])
    conv = Conversation(CFG, b)
    huge = [(f"Question {i} about the scene here?", f"Answer {i} is this one.")
            for i in range(100_000)]

    async def ask(req):
        return "".join([p async for p in conv.ask(req, Turn(source=req.source))])

    try:
        b.history_cost([("warm", "up")])            # the one-off look at the template
        before = b._rt.tokenize_calls
        with pytest.raises(ContextFullError, match="100000 exchanges"):
            asyncio.run(ask(Request("And now?", source="http", priority=Priority.TEXT,
                                    history=huge)))
        assert b._rt.tokenize_calls == before
        assert asyncio.run(ask(Request("What is on the table?"))) == "I see a red apple."
    finally:
        b.close()
