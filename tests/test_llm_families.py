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
])
def test_image_tags(name, tags):
    f = get_family(name)
    assert (f.image_start, f.image_end, f.image_content) == tags


def test_every_config_family_is_in_the_table():
    from typing import get_args, get_type_hints

    from assistant.config import RkllmConfig
    names = get_args(get_type_hints(RkllmConfig)["family"])
    assert set(names) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
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
