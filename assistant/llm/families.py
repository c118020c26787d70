"""Model families: the facts about each vision-language model the code must not hard-code.

One table, one place. A family gives the image tags the LLM was trained with, its chat
template (ChatML for all of these), the square input size its vision encoder was exported
for, how many image tokens that size yields, and the embedding widths of its published
sizes. The RKNN encoder checks what the ``.rknn`` model really outputs against this at load
time, so a Qwen2.5-VL encoder paired with a Qwen2-VL LLM is a clear error rather than a
segfault inside the runtime (the rknn-llm issue tracker is full of the latter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from assistant.errors import BackendError

_CHATML_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
_CHATML_PREFIX = "<|im_start|>user\n"
_CHATML_POSTFIX = "<|im_end|>\n<|im_start|>assistant\n"

# The placeholder the RKLLM runtime replaces with image_start + n x image_content + image_end.
IMAGE_PLACEHOLDER = "<image>"

# Spellings a runtime's tokenizer reads as special tokens in any of these families: ChatML's
# <|...|> and DeepSeek's <｜...｜>. Each family adds its own tags and markup (Family.markup).
_SPECIAL_LOOKING = r"<\|[^<>|\s]{1,64}\|>|<｜[^<>｜]{1,64}｜>"
_TAG = re.compile(r"<[^<>\s]{1,64}>")
# Put after a marker's first character: the text still reads the same, no tokenizer
# matches the marker any more.
_BREAK = "\u200b"


@dataclass(frozen=True)
class Family:
    """One model family: image tags, chat template and vision-encoder geometry."""

    name: str                       # the config value (llm.rkllm.family, vision.family)
    title: str                      # for messages
    image_start: str
    image_end: str
    image_content: str
    system_template: str            # "{system}" is replaced by the persona's prompt
    prompt_prefix: str
    prompt_postfix: str
    input_size: int                 # square encoder input, pixels per side
    n_image_tokens: int | None      # tokens per image at input_size; None: not fixed
    embed_dims: tuple[int, ...]     # embedding widths of the published sizes; () = unchecked
    sizes: str                      # which published models embed_dims covers, for messages

    @cached_property
    def _markup(self) -> re.Pattern:
        literal = {self.image_start, self.image_end, self.image_content, IMAGE_PLACEHOLDER}
        for text in (self.system_template, self.prompt_prefix, self.prompt_postfix):
            literal.update(_TAG.findall(text))
        alts = sorted((re.escape(t) for t in literal if len(t) > 1), key=len, reverse=True)
        return re.compile("|".join([_SPECIAL_LOOKING] + alts))

    def escape(self, text: str) -> str:
        """Message text with every role marker, tag or special-token spelling broken, so the
        runtime (which tokenises the prompt string itself, special tokens included) reads it
        as text and a message cannot open a turn of another role."""
        return self._markup.sub(lambda m: m.group()[0] + _BREAK + m.group()[1:], text)

    @property
    def embed_dim(self) -> int | None:
        """The one expected embedding width, or None when it depends on the model size."""
        return self.embed_dims[0] if len(self.embed_dims) == 1 else None

    def system_prompt(self, text: str) -> str:
        """The system part of the chat template with the persona's prompt in it."""
        # replace, not format: a persona prompt may contain braces.
        return self.system_template.replace("{system}", text)

    def check_embedding(self, n_tokens: int, dim: int, source: str) -> None:
        """Raise BackendError when (n_tokens, dim) cannot belong to this family.

        ``source`` names where the shape came from (the encoder file, say) for the message.
        """
        if self.n_image_tokens is not None and n_tokens != self.n_image_tokens:
            raise BackendError(
                f"{source} gives {n_tokens} image tokens, but {self.title} models take "
                f"{self.n_image_tokens} at {self.input_size}x{self.input_size}: the vision "
                f"encoder belongs to another model family or was exported at another size. "
                f"Use the encoder converted with the LLM, or set vision.family / "
                f"llm.rkllm.family to the family it was made for.")
        if self.embed_dims and dim not in self.embed_dims:
            widths = ", ".join(str(d) for d in self.embed_dims)
            raise BackendError(
                f"{source} gives embeddings of width {dim}, but {self.title} LLMs take "
                f"{widths} ({self.sizes}): the encoder and the LLM come from different "
                f"models. Use the .rknn encoder converted from the same model as the .rkllm, "
                f"or set vision.family / llm.rkllm.family to the right family.")


def _chatml(name: str, title: str, tags: tuple[str, str, str], input_size: int,
            n_image_tokens: int | None, embed_dims: tuple[int, ...], sizes: str) -> Family:
    start, end, content = tags
    return Family(name=name, title=title, image_start=start, image_end=end,
                  image_content=content, system_template=_CHATML_SYSTEM,
                  prompt_prefix=_CHATML_PREFIX, prompt_postfix=_CHATML_POSTFIX,
                  input_size=input_size, n_image_tokens=n_image_tokens,
                  embed_dims=embed_dims, sizes=sizes)


_QWEN_TAGS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")

# SmolVLM's own chat format (its model card): "<|im_start|>User: ...<end_of_utterance>\nAssistant:".
_SMOL_SYSTEM = "<|im_start|>System: {system}<end_of_utterance>\n"
_SMOL_PREFIX = "<|im_start|>User: "
_SMOL_POSTFIX = "<end_of_utterance>\nAssistant:"

# Token counts follow from the input size: Qwen2/2.5-VL merge 28x28 pixels into a token
# (392 -> 14 x 14 = 196), Qwen3-VL 32x32 (448 -> 196), InternVL3 pixel-shuffles 14-pixel
# patches by 2 (448 -> 256), MiniCPM-V's resampler always gives 64 queries.
# Qwen3-VL's encoder has four outputs (the main embedding and three DeepStack layers) that
# are concatenated per token, so its width is 4 x the LLM's hidden size.
#
# The four families rknn-llm 1.3.0 added, and where each fact comes from (airockchip/rknn-llm,
# tag release-v1.3.0, commit 878f936; "unchecked" = not stated there, so not enforced):
# - qwen3.5: tags from README.md ("for Qwen3.5: ./demo ... "<|vision_start|>" "<|vision_end|>"
#   "<|image_pad|>""); 448 x 448 from benchmark.md ("Img-encoder(448*448)"); 196 tokens from
#   export/export_vision.py (qwen3_5_vl_vision: patch 16, merge 2 -> (448/16)^2 / 4); one output
#   (pooler_output, no DeepStack), so the width is the LLM's hidden size: unchecked. ChatML
#   like every Qwen.
# - internvl3.5: tags from README.md's InternVL3 line (``<img>``, ``</img>``, ``<IMG_CONTEXT>``,
#   from modeling_internvl_chat.py), CHANGELOG 1.2.3 "Added support for InternVL3.5"; the
#   export script is the internvl3-1b one (extract_feature at 448 x 448, the default size);
#   256 tokens as InternVL3 (same pixel shuffle); widths: unchecked.
# - deepseekocr: tags from deploy/src/main.cpp ("//DeepSeekOCR img_start = "", img_end = "",
#   img_content = "<｜▁pad▁｜>"") and README.md; 448 x 448 from the README's export commands;
#   token count and width: unchecked (the export adds a newline column and a separator, so
#   the count depends on the projector's grid). The demo keeps the model's own chat template,
#   which is not in the source: a raw prompt is used here (unchecked).
# - smolvlm: 512 x 512 from benchmark.md ("SmolVLM-256M Img-encoder(512*512)"); rknn-llm
#   gives neither tags nor a token count: the tags and the chat format are SmolVLM's own
#   (its processor and model card), unchecked on RKLLM; token count and width unchecked.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    _chatml("qwen2-vl", "Qwen2-VL", _QWEN_TAGS, 392, 196, (1536, 3584),
            "1536 for Qwen2-VL-2B, 3584 for 7B"),
    _chatml("qwen2.5-vl", "Qwen2.5-VL", _QWEN_TAGS, 392, 196, (2048, 3584),
            "2048 for Qwen2.5-VL-3B, 3584 for 7B"),
    _chatml("qwen3-vl", "Qwen3-VL", _QWEN_TAGS, 448, 196, (8192, 10240, 16384),
            "4 x 2048 for Qwen3-VL-2B, 4 x 2560 for 4B, 4 x 4096 for 8B"),
    _chatml("internvl3", "InternVL3", ("<img>", "</img>", "<IMG_CONTEXT>"), 448, 256,
            (896, 1536, 3584), "896 for InternVL3-1B, 1536 for 2B, 3584 for 8B"),
    _chatml("minicpm-v", "MiniCPM-V", ("<image>", "</image>", "<unk>"), 448, 64,
            (3584,), "3584 for MiniCPM-V-2.6"),
    _chatml("qwen3.5", "Qwen3.5", _QWEN_TAGS, 448, 196, (), "unchecked"),
    _chatml("internvl3.5", "InternVL3.5", ("<img>", "</img>", "<IMG_CONTEXT>"), 448, 256,
            (), "unchecked"),
    Family(name="deepseekocr", title="DeepSeekOCR", image_start="", image_end="",
           image_content="<｜▁pad▁｜>", system_template="{system}\n", prompt_prefix="",
           prompt_postfix="\n", input_size=448, n_image_tokens=None, embed_dims=(),
           sizes="unchecked"),
    Family(name="smolvlm", title="SmolVLM", image_start="<fake_token_around_image>",
           image_end="<fake_token_around_image>", image_content="<image>",
           system_template=_SMOL_SYSTEM, prompt_prefix=_SMOL_PREFIX,
           prompt_postfix=_SMOL_POSTFIX, input_size=512, n_image_tokens=None, embed_dims=(),
           sizes="unchecked"),
)}

# Facts of a family that no public source confirmed: shown by `doctor` and in messages.
UNCHECKED: dict[str, tuple[str, ...]] = {
    "qwen3.5": ("embedding width",),
    "internvl3.5": ("embedding width",),
    "deepseekocr": ("image tokens", "embedding width", "chat template"),
    "smolvlm": ("image tags", "chat template", "image tokens", "embedding width"),
}


def get_family(name: str) -> Family:
    """The family called ``name``; BackendError naming the known ones otherwise."""
    try:
        return FAMILIES[name.strip().lower()]
    except (KeyError, AttributeError):
        known = ", ".join(FAMILIES)
        raise BackendError(
            f"unknown model family {name!r}: set llm.rkllm.family (or vision.family) to one "
            f"of {known}") from None
