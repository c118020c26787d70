"""Shared fixtures. Tests import helper modules from this folder directly."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# Session fixtures shared by every test module (one whisper load, one phrase cache).
from speech_fixtures import spoken, whisper_base, whisper_tiny  # noqa: E402,F401


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_root_logging():
    """Tests that run the CLI in-process reconfigure the root logger onto a captured stream
    that pytest closes afterwards; put the handlers back so later tests can still log."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
