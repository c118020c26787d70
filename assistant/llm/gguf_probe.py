"""Is a GGUF file one llama.cpp will load? Checked without loading its weights.

``check_model`` runs llama.cpp's own loader with ``vocab_only``: it reads the header, the
metadata and the tensor index, checks that every tensor's data lies within the file (a
truncated download fails here), that the architecture is one this llama.cpp knows (a
projector or another kind of file fails here) and loads the vocabulary; no weight is read.
``check_projector`` reads a multimodal projector's index with llama.cpp's ``gguf`` package
(every tensor within the file, architecture ``clip``), or only its magic without it.
"""

from __future__ import annotations

from pathlib import Path

from assistant.errors import ModelMissingError


def check_model(path: Path, key: str = "llm.llamacpp.model") -> str:
    """A one-line description of the model; ModelMissingError naming ``key`` and the fix when
    llama.cpp cannot load it, BackendError when llama-cpp-python itself is missing."""
    from assistant.llm import llamacpp_native as native

    L, _ = native.bindings()
    _magic(path, key, "a GGUF language model")
    params = L.llama_model_default_params()
    params.vocab_only = True
    params.n_gpu_layers = 0
    native.forget_native_errors()
    model = L.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelMissingError(
            f"{key}: llama.cpp cannot load {path}{native.native_reason()}; the file is "
            f"incomplete or not a language model: download it again (`rkvlm-assistant models "
            f"pull NAME`) or point {key} at a GGUF language model")
    try:
        return f"{path} ({int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)))} tokens)"
    finally:
        L.llama_model_free(model)


def check_projector(path: Path, key: str = "llm.llamacpp.mmproj") -> str:
    """The projector's description; ModelMissingError naming ``key`` when it is not one."""
    _magic(path, key, "a GGUF multimodal projector")
    try:
        import gguf
    except ImportError:
        return f"{path} (header only: install the gguf package to check its tensors)"
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as e:      # gguf raises ValueError / IndexError for a cut or bad file
        raise ModelMissingError(
            f"{key}: {path} is incomplete or corrupt ({type(e).__name__}: {e}); download the "
            f"projector again or point {key} at the mmproj file of the model") from None
    if arch != "clip":
        raise ModelMissingError(
            f"{key}: {path} is not a multimodal projector (its architecture is {arch!r}, a "
            f"projector's is 'clip'); point {key} at the model's mmproj file")
    return f"{path} ({len(reader.tensors)} tensors)"


def _magic(path: Path, key: str, what: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelMissingError(f"{key}: cannot read {path}: {e.strerror}") from None
    if head != b"GGUF":
        raise ModelMissingError(
            f"{key}: {path} is not {what} (a GGUF file starts with b'GGUF', this one with "
            f"{head!r}); download it again or point {key} at the right file")


__all__ = ["check_model", "check_projector"]
