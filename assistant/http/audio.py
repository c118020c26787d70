"""The speech endpoints, mapped onto whisper and piper through the shared media workers.

- ``POST /v1/audio/transcriptions``: multipart ``file`` (WAV, or any format PyAV decodes),
  ``language``, ``response_format`` json / text / verbose_json -> whisper.
- ``POST /v1/audio/speech``: ``input``, ``voice`` (a configured piper voice; OpenAI's names
  such as ``alloy`` mean the default voice, or the Chinese one for Chinese text),
  ``response_format: wav`` -> piper.

Both run on the process's ``frontend.MediaWork`` (their own threads, a bounded line, a
deadline), shared with the Wyoming server's speech work: a flood of them gets 503 with
Retry-After and never takes the threads chat turns need.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import tempfile
import threading
import time
import wave
from typing import Optional

import numpy as np
from aiohttp import BodyPartReader, web

from assistant.frontend import voice_names
from assistant.http.errors import ApiError, bad, error_for
from assistant.http.server import CTX, Context
from assistant.http.validate import (MAX_FORM_FIELD, form_name, form_text, json_body,
                                     opt_number, opt_str)

log = logging.getLogger(__name__)

# OpenAI's own voice names: they mean "the default voice" here.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova",
                           "sage", "shimmer", "verse", "marin", "cedar"})
SPEECH_FORMATS = ("wav",)
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")
MAX_SPEECH_CHARS = 4096
MAX_AUDIO_S = 600.0          # longest audio a transcription request may decode to
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
# Control characters piper has no sound for (NUL is refused before this).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


async def _media(ctx: Context, stage: str, fn, *args, stop: Optional[threading.Event] = None):
    try:
        return await ctx.media.run(stage, fn, *args, stop=stop,
                                   max_wait_s=ctx.cfg.http.max_wait_s)
    except ApiError:
        raise
    except Exception as e:
        raise error_for(e) from None


# ---------------------------------------------------------------------------- transcription

def decode_audio(data: bytes, max_s: float = MAX_AUDIO_S) -> np.ndarray:
    """Uploaded audio -> int16 mono 16 kHz. WAV through the project's reader and resampler;
    other formats through PyAV (what faster-whisper uses), decoded with a length limit.
    Blocking: run in a worker thread."""
    from assistant.audio.base import SAMPLE_RATE
    from assistant.audio.resample import resample
    from assistant.audio.wav_source import read_wav
    from assistant.errors import InputError

    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        with tempfile.NamedTemporaryFile(suffix=".wav") as f:
            f.write(data)
            f.flush()
            try:
                pcm, rate = read_wav(f.name)
            except InputError as e:
                msg = str(e).replace(f.name, "the uploaded file")
                raise bad(msg, "file", "invalid_audio") from None
        if len(pcm) > max_s * rate:
            raise _too_long(len(pcm) / rate, max_s)
        return resample(pcm, rate, SAMPLE_RATE)
    try:
        import av
    except ImportError:
        raise bad("only WAV audio can be decoded here (PyAV is not installed)", "file",
                  "invalid_audio_format") from None
    out: list[np.ndarray] = []
    n = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise bad("the uploaded file holds no audio", "file", "invalid_audio")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(audio=0):
                frame.pts = None
                for rf in resampler.resample(frame):
                    a = rf.to_ndarray().reshape(-1).astype(np.int16)
                    n += len(a)
                    if n > max_s * SAMPLE_RATE:
                        raise _too_long(n / SAMPLE_RATE, max_s)
                    out.append(a)
            for rf in resampler.resample(None):
                out.append(rf.to_ndarray().reshape(-1).astype(np.int16))
    except ApiError:
        raise
    except Exception as e:   # PyAV's errors: an unknown or corrupt format
        raise bad(f"the uploaded audio could not be decoded ({type(e).__name__}: {e}); "
                  f"send WAV, MP3, OGG, FLAC, M4A or WebM", "file", "invalid_audio") from None
    return np.concatenate(out) if out else np.zeros(0, np.int16)


def _too_long(seconds: float, max_s: float) -> ApiError:
    return bad(f"the audio is longer than {max_s:.0f} s (at least {seconds:.0f} s); send a "
               f"shorter recording", "file", "audio_too_long")


async def _read_part(part, cap: int, too_big) -> bytes:
    """A part's bytes, refused (``too_big()``) as soon as they pass ``cap``: a chunked
    upload announces no length to refuse it by."""
    buf = bytearray()
    while True:
        chunk = await part.read_chunk(1 << 16)
        if not chunk:
            return bytes(buf)
        buf.extend(chunk)
        if len(buf) > cap:
            raise too_big()


async def _multipart(request: web.Request, limit: int) -> tuple[dict, Optional[bytes]]:
    """(text fields, the 'file' part's bytes) of a multipart/form-data request."""
    if not request.content_type.startswith("multipart/"):
        raise bad(f"send multipart/form-data with a 'file' part (found content type "
                  f"{request.content_type!r})", "file", "invalid_content_type")

    def too_large() -> ApiError:
        return ApiError(413, f"the upload is larger than {limit} bytes (http.max_body_mb)",
                        code="request_too_large")
    try:
        reader = await request.multipart()
        fields: dict = {}
        data: Optional[bytes] = None
        total = 0
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise bad("a form part may not hold parts of its own (nested multipart)",
                          "file", "invalid_multipart")
            name = form_name(part.name)
            if name == "file":
                data = await _read_part(part, limit - total, too_large)
                total += len(data)
            elif name:
                value = part.decode(await _read_part(
                    part, MAX_FORM_FIELD, lambda: bad(f"the form field '{name}' is longer than "
                                                      f"{MAX_FORM_FIELD} bytes", name)))
                total += len(value)
                fields[name] = form_text(name, value)
            if total > limit:
                raise too_large()
        return fields, data
    except ApiError:
        raise
    except (ValueError, AssertionError, RuntimeError, LookupError) as e:
        raise bad(f"malformed multipart/form-data body: {e}", "file",
                  "invalid_multipart") from None


async def _upload(request: web.Request, ctx: Context) -> tuple[dict, Optional[bytes]]:
    timeout = ctx.cfg.http.body_timeout_s
    try:
        return await asyncio.wait_for(
            _multipart(request, int(ctx.cfg.http.max_body_mb * 1024 * 1024)), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the upload did not arrive within {timeout:g} s "
                       f"(http.body_timeout_s)", code="request_timeout") from None


async def transcriptions(request: web.Request) -> web.Response:
    ctx: Context = request.app[CTX]
    asr = getattr(ctx.parts, "asr", None)
    if asr is None:
        raise ApiError(503, "no speech recognition model is loaded", type="server_error",
                       code="asr_not_available")
    fields, data = await _upload(request, ctx)
    if not data:
        raise bad("a non-empty 'file' part is required (the audio to transcribe)", "file",
                  "missing_required_parameter")
    fmt = fields.get("response_format") or "json"
    if fmt not in TRANSCRIPTION_FORMATS:
        raise bad(f"response_format {fmt!r} is not supported; use one of: "
                  f"{', '.join(TRANSCRIPTION_FORMATS)}", "response_format")
    language = (fields.get("language") or "").strip().lower() or None
    if language is not None:
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        if language not in _LANGUAGE_CODES:
            raise bad(f"language {language!r} is not an ISO-639-1 code whisper knows "
                      f"(e.g. en, zh)", "language")
        if language != "en" and not await asyncio.to_thread(lambda: asr.multilingual):
            raise bad(f"the whisper model is English-only; it cannot transcribe "
                      f"language {language!r} (set asr.model to a multilingual model)",
                      "language")

    def work():
        pcm = decode_audio(data)
        if len(pcm) == 0:
            raise bad("the uploaded audio is empty", "file", "invalid_audio")
        t0 = time.monotonic()
        return pcm, asr.transcribe(pcm, language), time.monotonic() - t0

    pcm, heard, took = await _media(ctx, "asr", work)
    text = heard.text if heard.accepted else ""
    log.info("http transcription: %.1f s of audio in %.2f s: %r (%s)", len(pcm) / 16000,
             took, heard.text, heard.reason)
    if fmt == "text":
        return web.Response(text=text + "\n", content_type="text/plain")
    if fmt == "verbose_json":
        return web.json_response({"task": "transcribe", "language": heard.language,
                                  "duration": round(heard.audio_s, 3), "text": text,
                                  "accepted": heard.accepted, "reason": heard.reason,
                                  "segments": []})
    return web.json_response({"text": text})


# ---------------------------------------------------------------------------- speech

def wav_bytes(pcm: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, dtype="<i2").tobytes())
    return buf.getvalue()


def speak(synth, text: str, stop: threading.Event) -> bytes:
    """The WAV of ``text``, a sentence at a time, so a job nobody waits for any more
    (deadline, client gone) ends at the next sentence. Blocking: a media worker."""
    from assistant.audio.sentences import SentenceSplitter

    splitter = SentenceSplitter(max_chars=400)
    sentences = splitter.feed(text) + splitter.flush()
    pieces = []
    for i, sentence in enumerate(sentences):
        if stop.is_set():
            break
        pieces.append(synth.synthesize(sentence, pause_after=i < len(sentences) - 1))
    pcm = np.concatenate(pieces) if pieces else np.zeros(0, np.int16)
    return wav_bytes(pcm, synth.sample_rate)


async def speech(request: web.Request) -> web.Response:
    ctx: Context = request.app[CTX]
    body = await json_body(request, ctx.cfg.http.body_timeout_s)
    voices = getattr(ctx.parts, "voices", None)
    if voices is None:
        raise ApiError(503, "no piper voice is loaded", type="server_error",
                       code="tts_not_available")
    opt_str(body, "model")                    # any (tts-1, ...): there is one speech engine
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise bad("'input' must be a non-empty string (the text to speak)", "input",
                  "invalid_type" if text is not None else "missing_required_parameter")
    if len(text) > MAX_SPEECH_CHARS:
        raise bad(f"'input' is {len(text)} characters; the limit is {MAX_SPEECH_CHARS}",
                  "input")
    text = _CONTROL.sub(" ", text)
    if not text.strip():
        raise bad("'input' holds only control characters: nothing to speak", "input")
    fmt = opt_str(body, "response_format") or "wav"
    if fmt not in SPEECH_FORMATS:
        raise bad(f"response_format {fmt!r} is not supported; use one of: "
                  f"{', '.join(SPEECH_FORMATS)}", "response_format")
    speed = opt_number(body, "speed", 0.25, 4.0)
    if speed is not None and abs(speed - 1.0) > 1e-6:
        raise bad("'speed' other than 1.0 is not supported (the pace is tts.length_scale)",
                  "speed")
    name = opt_str(body, "voice")
    names = voice_names(ctx.cfg, voices)
    if name is None or name.lower() in OPENAI_VOICES:
        synth = voices.for_language("zh" if _CJK.search(text) else "en")
    elif name in names:
        synth = names[name]
    else:
        raise bad(f"unknown voice {name!r}; use one of: "
                  f"{', '.join(sorted(names))} (or an OpenAI name such as alloy for the "
                  f"default voice)", "voice")
    stop = threading.Event()
    data = await _media(ctx, "tts", speak, synth, text, stop, stop=stop)
    return web.Response(body=data, content_type="audio/wav", headers={"X-Voice": synth.name})
