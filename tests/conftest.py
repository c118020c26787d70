"""Shared fixtures. Tests import helper modules from this folder directly."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# Session fixtures shared by every test module (one whisper load, one phrase cache).
from speech_fixtures import spoken, whisper_base, whisper_tiny  # noqa: E402,F401
