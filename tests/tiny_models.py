"""Tiny random-weight GGUF models that llama.cpp loads for real, written in milliseconds.

- ``write_text_model``: a llama-architecture model (n_embd 64, 2 layers) with a byte-level
  BPE tokenizer and a ChatML template. With ``scripted_reply`` its greedy answer to any
  ChatML prompt is exactly that sentence, so tests can assert answer text through llama.cpp.
- ``write_mmproj``: a llava-style ``mlp`` multimodal projector (32x32 images, 16 image tokens)
  whose output width matches the text model.

The same seed always gives a byte-identical file. See /work/shared/reference/tiny-models.md
for which keys and tensors llama.cpp needs (a malformed projector segfaults, so change the
projector with care and load it in a subprocess first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Words the BPE merges build, so tokenisation is not only single bytes.
_MERGED_WORDS = ("user", "assistant", "system", " the", " is", " you", " what", " see")

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_B2U = _bytes_to_unicode()


def _encode_bytes(text: str) -> str:
    """Text as the byte-level BPE vocabulary spells it (' ' -> 'Ġ', '\\n' -> 'Ċ', ...)."""
    return "".join(_B2U[b] for b in text.encode("utf-8"))


def reply_pieces(reply: str) -> list[str]:
    """Split a scripted reply into the vocabulary pieces it is generated as: one per word.

    Each word keeps its leading space (the first word too, if the reply starts with one).
    Pieces must be distinct, because the scripted model picks the next token from the
    current one alone.
    """
    if not reply.strip() or "\n" in reply:
        raise ValueError("scripted reply must be one non-empty line")
    lead = " " if reply.startswith(" ") else ""
    pieces: list[str] = []
    for i, word in enumerate(reply[len(lead):].split(" ")):
        if not word:
            raise ValueError("scripted reply must not contain double spaces")
        pieces.append((lead if i == 0 else " ") + word)
    if len(set(pieces)) != len(pieces):
        raise ValueError(f"scripted reply repeats a word: {reply!r}")
    if len(pieces) > N_EMBD - 2:
        raise ValueError("scripted reply too long for the tiny model")
    return pieces


def _vocab(extra_pieces: list[str], user_defined: tuple[str, ...] = ()
           ) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the byte-level BPE vocabulary."""
    import gguf

    tokens = [_B2U[b] for b in range(256)]
    types = [int(gguf.TokenType.NORMAL)] * 256
    merges: list[str] = []
    known = set(tokens)
    for word in _MERGED_WORDS:
        enc = _encode_bytes(word)
        left = enc[0]
        for ch in enc[1:]:
            merges.append(f"{left} {ch}")
            left += ch
            if left not in known:
                known.add(left)
                tokens.append(left)
                types.append(int(gguf.TokenType.NORMAL))
    for piece in extra_pieces:
        enc = _encode_bytes(piece)
        if enc not in known:
            # Generated, never produced by tokenising: no merge needed.
            known.add(enc)
            tokens.append(enc)
            types.append(int(gguf.TokenType.NORMAL))
    for special in SPECIAL_TOKENS:
        tokens.append(special)
        types.append(int(gguf.TokenType.CONTROL))
    for added in user_defined:
        tokens.append(added)
        types.append(int(gguf.TokenType.USER_DEFINED))
    return tokens, types, merges


def write_text_model(path: str | Path, seed: int = 0, n_ctx: int = 2048,
                     scripted_reply: str | None = None, n_embd: int = N_EMBD,
                     n_layer: int = N_LAYER, chat_template: str | None = CHATML_TEMPLATE,
                     reply_after: str = "\n", user_defined: tuple[str, ...] = ()) -> Path:
    """Write a tiny llama-architecture GGUF model with a ChatML template; returns its path.

    Without ``scripted_reply`` the weights are random and the greedy output is noise that
    depends on the whole context (images included); end-of-turn tokens can never win, so
    every answer runs to max_new_tokens. ``n_embd`` / ``n_layer`` make bigger models for
    benchmarks (a projector must then be written with the same ``text_n_embd``).
    ``chat_template`` replaces the ChatML template (None: the file has none);
    ``reply_after`` is the one-byte text the template's generation prompt ends with.
    ``user_defined`` adds tokens of that type (llama.cpp matches them in any text).
    With ``scripted_reply`` attention and FFN outputs
    are zero and ``output.weight`` maps each token to the next one of the reply: greedy
    decoding after ``<|im_start|>assistant\\n`` (after ``reply_after``) yields the reply,
    then ``<|im_end|>``.
    """
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    pieces = reply_pieces(scripted_reply) if scripted_reply is not None else []
    tokens, types, merges = _vocab(pieces, user_defined)
    index = {t: i for i, t in enumerate(tokens)}
    n_vocab = len(tokens)
    n_ff = 2 * n_embd
    eot = index["<|im_end|>"]

    embd = rng.normal(0.0, 1.0, (n_vocab, n_embd)).astype(np.float32)
    out = rng.normal(0.0, 1.0, (n_vocab, n_embd)).astype(np.float32)
    scale_attn = 1.0 / np.sqrt(n_embd)
    zero_outputs = scripted_reply is not None
    if scripted_reply is not None:
        # Chain "\n" -> piece 0 -> piece 1 -> ... -> <|im_end|>. Source tokens get orthonormal
        # embeddings so each one's logits point at exactly its successor.
        chain = [index[_encode_bytes(reply_after)]] + [index[_encode_bytes(p)] for p in pieces]
        targets = [index[_encode_bytes(p)] for p in pieces] + [eot]
        basis, _ = np.linalg.qr(rng.normal(size=(n_embd, n_embd)))
        out[:] = 0.0
        for k, (src, dst) in enumerate(zip(chain, targets)):
            embd[src] = basis[k]
            out[dst] += 4.0 * basis[k]
    else:
        # Control tokens never win, so random answers always have max_new_tokens tokens.
        for special in SPECIAL_TOKENS:
            out[index[special]] = 0.0

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-scripted" if scripted_reply is not None else "tiny-random")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // N_HEAD)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(index["<|endoftext|>"])
    w.add_eos_token_id(eot)
    w.add_eot_token_id(eot)
    w.add_pad_token_id(index["<|endoftext|>"])
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def mat(rows: int, cols: int, zero: bool = False) -> np.ndarray:
        if zero:
            return np.zeros((rows, cols), np.float32)
        return rng.normal(0.0, scale_attn, (rows, cols)).astype(np.float32)

    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", out)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(n_embd, n_embd, zero_outputs))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(n_embd, n_ff, zero_outputs))
    _finish(w)
    return path


# Projector geometry: 32x32 images in 8x8 patches -> 16 image tokens.
V_IMAGE = 32
V_PATCH = 8
V_EMBD = 32
V_FF = 48
V_LAYER = 2
V_HEAD = 4
V_HIDDEN = 64


def write_mmproj(path: str | Path, seed: int = 0, text_n_embd: int = N_EMBD) -> Path:
    """Write a tiny llava-style (``mlp``) multimodal projector GGUF; returns its path."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed + 1000)
    n_patches = (V_IMAGE // V_PATCH) ** 2

    def rnd(*shape: int, std: float = 0.2) -> np.ndarray:
        return rng.normal(0.0, std, shape).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_name("tiny-mmproj")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", V_IMAGE)
    w.add_uint32("clip.vision.patch_size", V_PATCH)
    w.add_uint32("clip.vision.embedding_length", V_EMBD)
    w.add_uint32("clip.vision.feed_forward_length", V_FF)
    w.add_uint32("clip.vision.block_count", V_LAYER)
    w.add_uint32("clip.vision.attention.head_count", V_HEAD)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.projection_dim", text_n_embd)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_bool("clip.use_gelu", True)

    w.add_tensor("v.class_embd", rnd(V_EMBD))
    w.add_tensor("v.patch_embd.weight", rnd(V_EMBD, 3, V_PATCH, V_PATCH, std=0.1))
    w.add_tensor("v.position_embd.weight", rnd(n_patches + 1, V_EMBD))
    w.add_tensor("v.pre_ln.weight", np.ones(V_EMBD, np.float32))
    w.add_tensor("v.pre_ln.bias", np.zeros(V_EMBD, np.float32))
    for i in range(V_LAYER):
        p = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(f"{p}.{name}.weight", rnd(V_EMBD, V_EMBD))
            w.add_tensor(f"{p}.{name}.bias", np.zeros(V_EMBD, np.float32))
        w.add_tensor(f"{p}.ln1.weight", np.ones(V_EMBD, np.float32))
        w.add_tensor(f"{p}.ln1.bias", np.zeros(V_EMBD, np.float32))
        w.add_tensor(f"{p}.ln2.weight", np.ones(V_EMBD, np.float32))
        w.add_tensor(f"{p}.ln2.bias", np.zeros(V_EMBD, np.float32))
        w.add_tensor(f"{p}.ffn_up.weight", rnd(V_FF, V_EMBD))
        w.add_tensor(f"{p}.ffn_up.bias", np.zeros(V_FF, np.float32))
        w.add_tensor(f"{p}.ffn_down.weight", rnd(V_EMBD, V_FF))
        w.add_tensor(f"{p}.ffn_down.bias", np.zeros(V_EMBD, np.float32))
    w.add_tensor("mm.0.weight", rnd(V_HIDDEN, V_EMBD))
    w.add_tensor("mm.0.bias", np.zeros(V_HIDDEN, np.float32))
    w.add_tensor("mm.2.weight", rnd(text_n_embd, V_HIDDEN, std=0.5))
    w.add_tensor("mm.2.bias", np.zeros(text_n_embd, np.float32))
    _finish(w)
    return path


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
