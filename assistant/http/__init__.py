"""The HTTP front-end: an OpenAI-compatible API and a web page, on the daemon's own loop.

- ``server.py``: the aiohttp application (auth, limits, CORS, errors), start and stop;
- ``connections.py``: the deadline for a new connection's first request;
- ``errors.py``: OpenAI's error object, and the statuses the assistant's errors map to;
- ``validate.py``: reading a request's body and fields (types, depth, NUL, surrogates);
- ``openai_api.py``: the route table, /v1/models and /camera.jpg;
- ``chat.py``: /v1/chat/completions (``images.py``: its pictures);
- ``audio.py``: /v1/audio/transcriptions, /v1/audio/speech;
- ``events.py`` and ``page/``: the web page (static files, no build step) and its live
  events (``/events``).

What another front-end would share with this one (queueing behind the voice, a stateless
history per client, transcript rows, hang-ups, speech workers) is ``assistant.frontend``.
"""
