"""The model-family table: tags, templates, encoder geometry and the embedding check."""

import pytest

from assistant.errors import BackendError
from assistant.llm.families import FAMILIES, get_family


@pytest.mark.parametrize("name, tags", [
    ("qwen2-vl", ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")),
    ("qwen2.5-vl", ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")),
    ("qwen3-vl", ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")),
    ("internvl3", ("<img>", "</img>", "<IMG_CONTEXT>")),
    ("minicpm-v", ("<image>", "</image>", "<unk>")),
    ("qwen3.5", ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")),
    ("internvl3.5", ("<img>", "</img>", "<IMG_CONTEXT>")),
    ("deepseekocr", ("", "", "<｜▁pad▁｜>")),
    ("smolvlm", ("<fake_token_around_image>", "<fake_token_around_image>", "<image>")),
])
def test_image_tags(name, tags):
    f = get_family(name)
    assert (f.image_start, f.image_end, f.image_content) == tags


def test_every_config_family_is_in_the_table():
    from typing import get_args, get_type_hints

    from assistant.config import RkllmConfig
    names = get_args(get_type_hints(RkllmConfig)["family"])
    assert set(names) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - {"smolvlm", "deepseekocr"}))
def test_chatml_template(name):
    f = get_family(name)
    assert f.system_prompt("Be brief.") == "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert f.prompt_prefix == "<|im_start|>user\n"
    assert f.prompt_postfix == "<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_keeps_braces():
    assert "{json}" in get_family("qwen2-vl").system_prompt("Answer as {json}.")


@pytest.mark.parametrize("name, size, tokens, dims", [
    ("qwen2-vl", 392, 196, (1536, 3584)),
    ("qwen2.5-vl", 392, 196, (2048, 3584)),
    ("qwen3-vl", 448, 196, (8192, 10240, 16384)),
    ("internvl3", 448, 256, (896, 1536, 3584)),
    ("minicpm-v", 448, 64, (3584,)),
    ("qwen3.5", 448, 196, ()),
    ("internvl3.5", 448, 256, ()),
    ("deepseekocr", 448, None, ()),
    ("smolvlm", 512, None, ()),
])
def test_geometry(name, size, tokens, dims):
    f = get_family(name)
    assert (f.input_size, f.n_image_tokens, f.embed_dims) == (size, tokens, dims)


def test_embed_dim_only_when_one_size():
    assert get_family("minicpm-v").embed_dim == 3584
    assert get_family("qwen2-vl").embed_dim is None


def test_lookup_ignores_case_and_spaces():
    assert get_family(" Qwen2.5-VL ").name == "qwen2.5-vl"


def test_unknown_family_names_the_setting_and_the_choices():
    with pytest.raises(BackendError) as e:
        get_family("llava")
    msg = str(e.value)
    assert "llava" in msg and "llm.rkllm.family" in msg and "qwen2-vl" in msg


def test_check_embedding_accepts_published_shapes():
    get_family("qwen2-vl").check_embedding(196, 1536, "x")
    get_family("qwen2.5-vl").check_embedding(196, 2048, "x")
    get_family("minicpm-v").check_embedding(64, 3584, "x")


def test_check_embedding_rejects_a_width_of_another_model():
    with pytest.raises(BackendError) as e:
        get_family("qwen2-vl").check_embedding(196, 2048, "the vision encoder v.rknn")
    msg = str(e.value)
    assert "v.rknn" in msg and "2048" in msg and "1536" in msg and "vision.family" in msg


def test_check_embedding_rejects_a_token_count_of_another_size():
    with pytest.raises(BackendError) as e:
        get_family("qwen2-vl").check_embedding(256, 1536, "enc")
    assert "256" in str(e.value) and "196" in str(e.value)


def test_smolvlm_uses_its_own_chat_format():
    f = get_family("smolvlm")
    assert f.system_prompt("Be brief.") == "<|im_start|>System: Be brief.<end_of_utterance>\n"
    assert f.prompt_prefix == "<|im_start|>User: "
    assert f.prompt_postfix == "<end_of_utterance>\nAssistant:"


def test_unchecked_facts_are_not_enforced():
    from assistant.llm.families import UNCHECKED

    assert set(UNCHECKED) == {"qwen3.5", "internvl3.5", "deepseekocr", "smolvlm"}
    for name in UNCHECKED:
        f = get_family(name)
        assert f.embed_dims == () and "embedding width" in UNCHECKED[name]
        if f.n_image_tokens is None:
            f.check_embedding(123, 4567, "x")          # nothing published to check against
    with pytest.raises(BackendError):
        get_family("qwen3.5").check_embedding(256, 1024, "x")   # 196 tokens at 448 is known


def test_every_new_family_is_accepted_by_the_config():
    from assistant.config import parse

    for name in ("qwen3.5", "internvl3.5", "smolvlm", "deepseekocr"):
        assert parse(f"llm:\n  rkllm:\n    family: {name}\n").llm.rkllm.family == name
