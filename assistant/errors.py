"""Errors that reach a person: each says what went wrong and what to do about it."""

from __future__ import annotations


class AssistantError(Exception):
    """A failure with a message fit to show as is (no traceback needed)."""

    exit_code = 1


class InputError(AssistantError):
    """An input file (a WAV, an image, a video) is missing, corrupt or of the wrong kind."""

    exit_code = 65  # EX_DATAERR


class ModelMissingError(AssistantError):
    """A model file is not there; the message names it and how to get it."""

    exit_code = 78


class DeviceError(AssistantError):
    """A microphone, speaker or camera cannot be opened or stopped working."""

    exit_code = 69  # EX_UNAVAILABLE


class BackendError(AssistantError):
    """A native runtime (RKLLM, RKNN, llama.cpp) reported an error."""

    exit_code = 70  # EX_SOFTWARE


class ContextFullError(BackendError):
    """The next turn does not fit in the LLM's context."""
