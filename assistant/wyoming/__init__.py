"""The Wyoming front-end: Home Assistant's speech-to-text, text-to-speech and conversation
agent, served from the assistant's own models and conversation (see server.py)."""

from assistant.wyoming.address import check_uri
from assistant.wyoming.server import WyomingServer, start_wyoming

__all__ = ["WyomingServer", "check_uri", "start_wyoming"]
