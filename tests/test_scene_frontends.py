"""The scene memory for Home Assistant (Wyoming) and HTTP questions, with the real tiny
llama.cpp model and its projector, a file camera and the encoder's calls counted.

Issue 21 item 5: every Wyoming question encoded the camera's picture again and evaluated it
again, even the second question of one conversation about an unchanged scene. Now a
question about the scene its conversation was shown goes as text (no encode, no image in
the prompt: ``scene=same``), and a scene already encoded for any turn is not encoded again.
"""

from __future__ import annotations

import pytest

from frontend_rig import REPLY, Rig, other_scene

pytest.importorskip("wyoming")


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path, llm="max_context_len: 2048")
    yield r
    r.close()


def change_the_scene(rig) -> None:
    """Another picture in front of the camera (the file camera reads it when reopened)."""
    other_scene(rig.dir / "scene.jpg")
    rig.camera.close()


def images_in_context(rig) -> int:
    return len(rig.llm._images)


def check_same_then_new(rig, ask) -> None:
    """Three questions of one conversation: the scene, the same scene, another scene."""
    assert ask(0) == REPLY
    first = rig.rows(1)[-1]
    assert (first["scene"], first["image"], first["counts"]["image_tokens"]) == ("new", True, 16)
    assert rig.encoder.calls == 1 and images_in_context(rig) == 1
    loads = len(rig.loads)

    assert ask(1) == REPLY
    same = rig.rows(2)[-1]
    # No encode, no image evaluated: the context still holds the first question's picture.
    assert (same["scene"], same["image"]) == ("same", False)
    assert "image_tokens" not in same["counts"] and same["counts"]["image_tokens_saved"] == 16
    assert rig.encoder.calls == 1 and images_in_context(rig) == 1
    assert len(rig.loads) == loads                  # its history was not fed back either

    change_the_scene(rig)
    assert ask(2) == REPLY
    new = rig.rows(3)[-1]
    assert (new["scene"], new["image"]) == ("new", True) and new["counts"]["scene_difference"] > 0.1
    assert rig.encoder.calls == 2 and images_in_context(rig) == 2


def test_home_assistant_asks_twice_about_one_scene_and_once_about_another(rig):
    """Catches: every Wyoming question encoding and evaluating the picture again (the
    issue); a changed scene never encoded again (the old picture answered)."""
    questions = ["What do you see?", "And the colours?", "And now?"]
    check_same_then_new(rig, lambda i: rig.ask(questions[i], "kitchen")[1])


def test_an_http_conversation_asks_twice_about_one_scene_and_once_about_another(rig):
    """The camera model (no picture of its own): the client sends its history back each
    time. Catches the same two bugs for HTTP."""
    messages: list[dict] = []

    def ask(i: int) -> str:
        messages.append({"role": "user", "content": ["What do you see?", "And the colours?",
                                                     "And now?"][i]})
        status, body = rig.chat(messages, model="rkvlm-camera")
        assert status == 200, body
        answer = body["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": answer})
        return answer
    check_same_then_new(rig, ask)


def test_a_scene_encoded_for_one_conversation_is_not_encoded_for_another(rig):
    """Home Assistant asked about the scene; then an HTTP client and the person in the room
    ask about it in conversations of their own. Their contexts do not hold the picture, so
    it is evaluated for each, but never encoded again. Catches: scene memory per front-end
    (an encode per conversation: 3.5 s each on an RK3576)."""
    assert rig.ask("What do you see?", "ha")[1] == REPLY
    assert rig.encoder.calls == 1
    status, body = rig.chat([{"role": "user", "content": "What is there?"}], "rkvlm-camera")
    assert status == 200
    voice = rig.voice("What is on the table?", use_camera=True)
    assert voice.answer == REPLY
    http = rig.rows(2)[-1]
    for row in (http, voice.as_json()):
        assert (row["scene"], row["image"]) == ("new", True)
        assert row["counts"]["embedding_remembered"] == 1
        assert "encode_ms" not in row["timings_ms"] and "snapshot_ms" in row["timings_ms"]
    assert rig.encoder.calls == 1
    # A different scene is encoded, once.
    change_the_scene(rig)
    assert rig.ask("And now?", "ha")[1] == REPLY
    assert rig.encoder.calls == 2 and "embedding_remembered" not in rig.rows(4)[-1]["counts"]
