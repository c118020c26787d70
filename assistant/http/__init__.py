"""The HTTP front-end: an OpenAI-compatible API and a web page, on the daemon's own loop.

- ``server.py``: the aiohttp application (auth, limits, CORS, errors), start and stop;
- ``openai_api.py``: /v1/chat/completions, /v1/models, /v1/audio/transcriptions,
  /v1/audio/speech;
- ``page/``: the web page (static files, no build step) and its live events (``/events``).
"""
