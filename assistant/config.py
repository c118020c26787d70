"""config.yaml -> typed, frozen settings objects.

Every section is a frozen dataclass; every field has a default and a one-line doc in its
metadata, so the loader can say exactly what a key expects when the file is wrong. Loading
rejects unknown keys, wrong types, out-of-range and non-finite values, and files too large
or too deeply nested to be a config, with one line naming the file and the key path
(``ConfigError``); the CLI turns that into exit code 78 (EX_CONFIG). Keys of earlier
releases load as today's with a warning each (``assistant.config_compat``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from assistant.config_compat import upgrade
from assistant.yaml_scalars import Unreadable, guard_scalars

EX_CONFIG = 78  # sysexits.h: configuration error

# A config is a few kilobytes and nests four levels (llm.rkllm.model); far past these it is
# the wrong file or an attack, and parsing it would cost seconds or the stack.
MAX_CONFIG_BYTES = 1_000_000
MAX_NESTING = 32
# A local file is read in microseconds; this long is a mount that stopped answering.
READ_TIMEOUT_S = 5.0


class ConfigError(Exception):
    """A configuration problem, already phrased for a person: file, key path, expected, found."""

    def __init__(self, message: str, key: str = "", source: str = ""):
        self.key = key
        self.source = source
        super().__init__(message)


def _f(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
       file: bool = False, secret: bool = False) -> Any:
    """A field with its documentation; lo/hi bound numbers, file marks a model-file path,
    secret a value only the service may read (`install` warns when others can)."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "file": file, "secret": secret}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: _copy_default(d), metadata=meta)
    return field(default=default, metadata=meta)


def _copy_default(d: Any) -> Any:
    if isinstance(d, list):
        return tuple(d)
    if dataclasses.is_dataclass(d):
        return dataclasses.replace(d)
    return d


# --------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class PersonaLines:
    """What the assistant says by itself, in one language."""

    greeting: str = _f("Hello, I'm listening.", "Spoken once when the daemon is ready, when it answers everything it hears (wake.mode none); empty for none, in every mode.")
    wake_greeting: str = _f("Hello. Say {wake} to talk to me.", "Spoken once when the daemon is ready instead of greeting, when it answers only when addressed (wake.mode word or phrase): {wake} is the wake word, or the first wake phrase of this language. Empty (or greeting empty): none.")
    goodbye: str = _f("Goodbye!", "Spoken when the person says an exit phrase.")
    cleared: str = _f("Okay, I've forgotten our conversation.", "Spoken after a clear phrase.")
    reset: str = _f("Our conversation got too long, so I started a new one.",
                    "Said before the answer when llm.on_context_full: reset forgets the conversation.")
    error: str = _f("Sorry, something went wrong while I was thinking. Please ask again.",
                    "Spoken when the language model fails during a turn.")
    too_long: str = _f("Sorry, that question is too long for me.",
                       "Spoken when a question cannot fit the context even on its own.")
    full: str = _f("Sorry, our conversation is too long for me. Say clear to start over.",
                   "Spoken when the context is full and llm.on_context_full is error.")
    no_model: str = _f("My language model is not installed yet, so I cannot answer. The command that installs it is in the log.",
                       "Spoken when a question comes and the language model is missing.")
    reply_hint: str = _f("Answer in English.", "Sent to the model after each question in this language, so it answers in it; empty for none.")
    not_heard: str = _f("Sorry, I didn't catch that.", "Spoken when speech was heard but whisper could not make out the words (low confidence); empty for none. Noise too short to be speech (vad.min_speech_ms) gets nothing.")
    sorry: str = _f("Sorry?", "Spoken when the assistant was woken (wake word or phrase) but understood nothing after it.")


_ZH_LINES = PersonaLines(
    greeting="你好，我在听。", wake_greeting="你好。说“{wake}”来和我说话。", goodbye="再见！", cleared="好的，我已经忘记了我们的对话。",
    reset="我们的对话太长了，我开始了一段新的对话。",
    error="抱歉，我思考的时候出了问题，请再问一次。", too_long="抱歉，这个问题对我来说太长了。",
    full="抱歉，我们的对话太长了。说“清除”重新开始。",
    no_model="我的语言模型还没有安装，所以无法回答。安装命令在日志里。",
    reply_hint="请用中文回答。", not_heard="抱歉，我没听清楚。", sorry="抱歉？")


@dataclass(frozen=True)
class PersonaConfig:
    name: str = _f("Rocky", "The assistant's name, used in the system prompt and the logs.")
    system_prompt: str = _f(
        "You are {name}, a helpful voice assistant running offline on a small board with a "
        "camera. Answer in one to three short sentences suitable for speaking aloud. When an "
        "image is given it is what your camera sees right now.",
        "System prompt for the LLM; {name} is replaced by persona.name.")
    language: Literal["en", "zh", "auto"] = _f(
        "en", "Conversation language: en, zh, or auto (answer in the language the person spoke). zh and auto need a multilingual whisper (asr.model without .en) and a Chinese voice (tts.voice_zh); `rkvlm-assistant check` says which is missing.")
    en: PersonaLines = _f(PersonaLines(), "What the assistant says by itself in English.")
    zh: PersonaLines = _f(_ZH_LINES, "What the assistant says by itself in Chinese.")

    @property
    def prompt(self) -> str:
        return self.system_prompt.replace("{name}", self.name)

    def lines(self, language: Optional[str]) -> PersonaLines:
        """The lines for a reply language (zh, or English for anything else)."""
        return self.zh if (language or "").lower().startswith("zh") else self.en


@dataclass(frozen=True)
class AudioInputConfig:
    device: Union[str, int] = _f("default", "Microphone: 'default', a device index, or part of its name (see `rkvlm-assistant devices`).")
    sample_rate: Optional[int] = _f(None, "Capture rate in Hz; null uses the device's default. Resampled to 16 kHz.", lo=8000, hi=192000)
    channels: int = _f(1, "Channels to capture; they are mixed down to mono.", lo=1, hi=32)


@dataclass(frozen=True)
class AudioOutputConfig:
    device: Union[str, int] = _f("default", "Speaker: 'default', a device index, or part of its name.")
    sample_rate: Optional[int] = _f(None, "Playback rate in Hz; null uses the device's default. Speech is resampled to it.", lo=8000, hi=192000)
    volume: float = _f(1.0, "Linear gain applied to speech before playback.", lo=0.0, hi=4.0)


@dataclass(frozen=True)
class AudioConfig:
    input: AudioInputConfig = _f(AudioInputConfig(), "Microphone settings.")
    output: AudioOutputConfig = _f(AudioOutputConfig(), "Speaker settings.")
    barge_in: bool = _f(False, "false: the microphone is ignored while the assistant speaks. true: speech during an answer cuts it short.")
    echo_match: float = _f(0.7, "With barge_in: speech that the assistant's own audio of the last moments explains this well (normalised cross-correlation, 0 to 1) is its voice coming back from the speaker, not a person, and cuts nothing; 0 turns this guard off.", lo=0.0, hi=1.0)


@dataclass(frozen=True)
class VadConfig:
    aggressiveness: int = _f(2, "webrtcvad aggressiveness, 0 (keeps most) to 3 (filters most).", lo=0, hi=3)
    frame_ms: Literal[10, 20, 30] = _f(30, "VAD frame length in ms: 10, 20 or 30.")
    pre_roll_ms: int = _f(300, "Audio kept from before speech was detected, so the first syllable is not cut.", lo=0, hi=2000)
    start_ms: int = _f(90, "Voiced audio needed to decide that speech started.", lo=10, hi=1000)
    end_silence_ms: int = _f(700, "Silence that ends an utterance.", lo=100, hi=5000)
    transcribe_in_pause: bool = _f(True, "When the person pauses, whisper starts on the words so far (while no answer runs); if the pause turns out to end the utterance, that transcript is the turn's, so speech recognition overlaps the end-of-speech wait.")
    quick_end_ms: int = _f(0, "Quick endpointing: when the transcript made in a pause reads as a finished sentence, end the utterance after this much silence instead of end_silence_ms. 0: off (measured: it cut 6 of 8 questions with a pause inside; see README).", lo=0, hi=5000)
    end_of_turn: Literal["silence", "smart_turn"] = _f("silence", "What ends an utterance: silence (end_silence_ms of it), or smart_turn (after smart_turn_silence_ms of silence Pipecat's Smart Turn model hears whether the question is complete: complete ends it there, incomplete keeps listening up to max_pause_ms). Smart Turn's model ships in the pipecat-ai wheel (the smart-turn extra); without it, silence with a warning.")
    smart_turn_silence_ms: int = _f(200, "With end_of_turn: smart_turn, the silence after which the speech so far goes to the model.", lo=30, hi=5000)
    max_pause_ms: int = _f(1500, "With end_of_turn: smart_turn, the silence that ends an utterance the model heard as incomplete.", lo=100, hi=10000)
    smart_turn_model: Optional[str] = _f(None, "A Smart Turn v3 .onnx file; null: the one in the installed pipecat-ai wheel.", file=True)
    min_speech_ms: int = _f(300, "Utterances with less voiced audio than this (clicks, coughs) are dropped.", lo=0, hi=5000)
    max_utterance_s: float = _f(15.0, "An utterance is cut here even if the person keeps talking.", lo=1.0, hi=120.0)


@dataclass(frozen=True)
class AsrConfig:
    model: str = _f("tiny.en", "faster-whisper model: a size name (tiny.en, base, small, ...) or a local CTranslate2 model directory.")
    language: Literal["auto", "en", "zh"] = _f("auto", "Spoken language: en, zh or auto (detect en/zh per utterance: a multilingual model and one extra encoder pass; a .en model is always en).")
    download_root: Optional[str] = _f(None, "Where named models are downloaded or assembled; null: $XDG_CACHE_HOME/rkvlm-assistant (packaged models) and the Hugging Face cache (downloads).")
    cpu_threads: int = _f(0, "CPU threads for whisper; 0 lets CTranslate2 choose.", lo=0, hi=64)
    beam_size: int = _f(1, "Beam size; 1 is greedy and fastest.", lo=1, hi=10)
    window_s: float = _f(10.0, "Encoder window in seconds: the utterance plus 2 s, at least this (whisper pads every utterance to 30 s). 10 reads a short question about 4 times faster; on 135 spoken questions the word error rate rose from 4.5 % to 5.4 % (tiny.en) and 3.9 % to 5.4 % (base), mostly in noise (bench/asr_window.py). A decode that repeats itself is read again at 30. 30: whisper's own window, its full accuracy.", lo=4.0, hi=30.0)
    no_speech_threshold: float = _f(0.6, "A segment whose no-speech probability is above this is not speech.", lo=0.0, hi=1.0)
    logprob_threshold: float = _f(-1.0, "A segment whose average log-probability is below this is not trusted.", lo=-10.0, hi=0.0)


@dataclass(frozen=True)
class IntentConfig:
    clear_phrases: tuple[str, ...] = _f(
        ["clear", "clear history", "clear the history", "start over", "new conversation",
         "forget everything", "清除", "清空历史", "清除历史", "重新开始"],
        "Whole utterances that forget the conversation (history and KV cache).")
    exit_phrases: tuple[str, ...] = _f(
        ["exit", "quit", "goodbye", "bye", "bye bye", "good night", "stop listening",
         "that's it", "that's all", "退出", "再见", "拜拜", "结束"],
        "Whole utterances that end the conversation (whisper often hears a lone \"exit\" as \"that's it\").")
    exit_action: Literal["idle", "stop"] = _f(
        "idle", "After an exit phrase: idle keeps the daemon listening, stop ends the process (exit code 0).")


@dataclass(frozen=True)
class CameraConfig:
    source: Union[str, int, None] = _f(0, "Camera: a V4L2 index (0) or path (/dev/video0), an image or video file, or null for none.")
    width: int = _f(640, "Capture width in pixels (V4L2 cameras).", lo=16, hi=7680)
    height: int = _f(480, "Capture height in pixels (V4L2 cameras).", lo=16, hi=4320)
    fps: int = _f(30, "Capture rate (V4L2 cameras); video files play at their own rate.", lo=1, hi=240)
    warmup_frames: int = _f(5, "Frames dropped after opening a USB camera (they are dark while it adjusts exposure).", lo=0, hi=120)


@dataclass(frozen=True)
class RknnEncoderConfig:
    model: Optional[str] = _f(None, "The vision encoder .rknn file.", file=True)
    core_mask: Literal["auto", "0", "1", "2", "0_1", "0_1_2"] = _f("auto", "NPU cores: auto, 0, 1, 2, 0_1 or 0_1_2 (RK3576 has cores 0 and 1).")
    pad_color: float = _f(127.5, "Grey level used to pad the image to a square before resizing.", lo=0.0, hi=255.0)


@dataclass(frozen=True)
class VisionConfig:
    encoder: Literal["none", "llamacpp", "rknn"] = _f(
        "llamacpp", "Image encoder: llamacpp (the GGUF model's mmproj, CPU), rknn (NPU), or none (text only).")
    family: Optional[str] = _f(None, "Model family for image tags and sizes (qwen2-vl, qwen2.5-vl, qwen3-vl, qwen3.5, internvl3, internvl3.5, minicpm-v, smolvlm, deepseekocr); null: from llm.rkllm.family.")
    rknn: RknnEncoderConfig = _f(RknnEncoderConfig(), "NPU encoder settings (vision.encoder: rknn).")
    on_speech_start: bool = _f(True, "Take the snapshot and encode it as soon as speech starts, overlapping the person talking.")
    attach: Literal["when_changed", "every_turn", "never"] = _f(
        "when_changed", "When a question carries the camera's image: when_changed (only when the scene differs from the image the conversation already holds, or it holds none), every_turn, or never.")
    change_threshold: float = _f(
        0.06, "How different a snapshot must be from the image in the conversation to count as a new scene: mean absolute difference of small grey thumbnails, 0 (identical) to 1.", lo=0.0, hi=1.0)
    watch: bool = _f(True, "While nobody speaks and nothing is answered, look at the camera every watch_interval_s; when the scene has changed and settled, encode it in the background, so a question about it finds the image ready.")
    watch_interval_s: float = _f(3.0, "Seconds between idle snapshots (vision.watch).", lo=0.2, hi=3600.0)


@dataclass(frozen=True)
class LlamaCppConfig:
    model: str = _f("smolvlm2-256m", "A catalogue name (see `rkvlm-assistant models list`) or the path of a GGUF language model.")
    mmproj: Optional[str] = _f(None, "Path of the multimodal projector GGUF; null: the catalogue's, or none for a text-only model.", file=True)
    models_dir: Optional[str] = _f(None, "Where catalogue models are kept; null: $XDG_DATA_HOME/rkvlm-assistant/models.")
    n_threads: int = _f(0, "CPU threads; 0 uses all cores.", lo=0, hi=256)
    n_batch: int = _f(512, "Prompt tokens evaluated per batch.", lo=1, hi=8192)
    seed: int = _f(0, "Sampling seed, for repeatable answers.", lo=0, hi=2**31 - 1)


@dataclass(frozen=True)
class RkllmConfig:
    library: str = _f("librkllmrt.so", "librkllmrt.so: a path, or a name the dynamic loader finds.")
    runtime_version: Literal["auto", "1.2.1", "1.2.2", "1.2.3", "1.3.0"] = _f(
        "auto", "RKLLM runtime ABI: 1.2.1, 1.2.2, 1.2.3 or 1.3.0; auto reads it from the library and refuses if it cannot tell.")
    model: Optional[str] = _f(None, "The .rkllm model file.", file=True)
    family: Literal["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl3", "minicpm-v",
                    "qwen3.5", "internvl3.5", "smolvlm", "deepseekocr"] = _f(
        "qwen2-vl", "Model family: chat template, image tags, expected image size and embedding size (qwen2-vl, qwen2.5-vl, qwen3-vl, qwen3.5, internvl3, internvl3.5, minicpm-v, smolvlm, deepseekocr).")
    n_keep: int = _f(-1, "Tokens kept when the runtime shifts a full context; -1: the runtime's default.", lo=-1, hi=131072)
    cpu_mask: Optional[str] = _f(None, "CPU cores for the runtime, e.g. '4-7' or '4,5,6,7' (the big cores); null: runtime default.")
    embed_flash: bool = _f(True, "Keep the embedding table in flash instead of memory (saves RAM).")
    lora: Optional[str] = _f(None, "Optional LoRA adapter file.", file=True)
    lora_scale: float = _f(1.0, "LoRA adapter scale.", lo=0.0, hi=10.0)
    prompt_cache: Optional[str] = _f(None, "Prompt cache file: loaded if present, written with the system prompt's cache on the first run.")
    prefill_early: bool = _f(True, "With llm.prefill_early: when the context holds no history yet (the first question, after a clear or a compaction), a prefill-only run of the next turn's opening with the new scene's image during speech, so the runtime's automatic prefix reuse skips it in the real turn. Whether it reused is read from the runtime's perf.prefill_tokens; if it did not, this switches itself off with one log line.")


@dataclass(frozen=True)
class LlmConfig:
    backend: Literal["llamacpp", "rkllm"] = _f("llamacpp", "llamacpp (CPU, any Linux) or rkllm (the NPU of an RK3576 / RK3588).")
    max_context_len: int = _f(4096, "Context size in tokens: system prompt, history, image tokens and the answer.", lo=128, hi=131072)
    max_new_tokens: int = _f(256, "Longest answer in tokens.", lo=1, hi=8192)
    temperature: float = _f(0.7, "Sampling temperature; 0 is greedy.", lo=0.0, hi=5.0)
    top_k: int = _f(20, "Top-k sampling.", lo=0, hi=1000)
    top_p: float = _f(0.9, "Top-p sampling.", lo=0.0, hi=1.0)
    repeat_penalty: float = _f(1.1, "Repetition penalty.", lo=0.5, hi=3.0)
    keep_history: bool = _f(True, "Keep earlier turns in the KV cache so follow-up questions work.")
    on_context_full: Literal["compact", "reset", "error"] = _f(
        "compact", "When the next turn does not fit: compact keeps the most recent exchanges (as text, within compact_share of the context) and answers; reset forgets the conversation, says so and answers; error refuses the turn.")
    compact_share: float = _f(0.5, "With on_context_full: compact, the share of the context the kept exchanges may fill.", lo=0.0, hi=0.9)
    compact_at: float = _f(0.85, "After an answer, when the context is fuller than this share, the conversation is compacted (and the scene's image fed back) while the person is silent, so the next question finds room; 0: only when a question does not fit.", lo=0.0, hi=1.0)
    prefill_early: bool = _f(True, "When the scene is new, put its image into the model's context while the person is still talking, so the question's turn evaluates only the question (llama.cpp: into the KV cache; RKLLM: see llm.rkllm.prefill_early).")
    llamacpp: LlamaCppConfig = _f(LlamaCppConfig(), "Portable backend settings (llm.backend: llamacpp).")
    rkllm: RkllmConfig = _f(RkllmConfig(), "NPU backend settings (llm.backend: rkllm).")


@dataclass(frozen=True)
class TtsConfig:
    voice: str = _f("en_US-joe-medium", "Piper voice: a .onnx path (its .onnx.json beside it) or a voice name found in voices_dir or an installed voice package.")
    voice_zh: Optional[str] = _f(None, "Piper voice for Chinese answers (e.g. zh_CN-huayan-medium); null: use voice.")
    voices_dir: Optional[str] = _f(None, "Directory searched for voice names; null: $XDG_DATA_HOME/rkvlm-assistant/voices.")
    length_scale: float = _f(1.0, "Speaking pace: above 1 is slower.", lo=0.3, hi=3.0)
    speaker: Optional[int] = _f(None, "Speaker id for multi-speaker voices.", lo=0, hi=10000)
    sentence_pause_ms: int = _f(150, "Silence between sentences.", lo=0, hi=3000)
    first_clause_chars: int = _f(24, "Until the first sound, a sentence is spoken from its first comma once it is this long, so the answer starts sooner; later sentences are spoken whole. 0: the first sentence whole too.", lo=0, hi=500)


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _f("INFO", "Log level.")
    debug_recording: Optional[str] = _f(None, "Keep each utterance's audio (a 16 kHz mono WAV, what whisper heard) and the snapshot its turn used (a JPEG) in this directory, named by time and turn id (20261201-201530-turn12.wav); null: off. `run --debug-recording DIR` overrides it. Read at start.")
    debug_recording_max_files: int = _f(200, "Files kept in logging.debug_recording; past it the oldest turns' files are deleted.", lo=2, hi=10_000_000)
    debug_recording_max_mb: float = _f(200.0, "Megabytes kept in logging.debug_recording; past it the oldest turns' files are deleted.", lo=1.0, hi=10_000_000.0)


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = _f(True, "Serve the OpenAI-compatible API and the web page while `run` runs (`serve` runs it alone).")
    listen: str = _f("127.0.0.1:8088", "HOST:PORT to listen on. Any address but loopback needs http.api_key.")
    api_key: Optional[str] = _f(None, "Bearer key every request must carry (the page asks for it once); null: none (loopback only).", secret=True)
    max_body_mb: float = _f(20.0, "Largest request body in megabytes (images and audio included).", lo=0.1, hi=1000.0)
    max_image_pixels: int = _f(16_000_000, "Largest decoded image in pixels (width x height); larger ones are refused before decoding.", lo=1024, hi=400_000_000)
    max_queue: int = _f(8, "Requests that may wait for the model at once; more get 503 with Retry-After.", lo=0, hi=1000)
    max_wait_s: float = _f(120.0, "Longest wait for the model before a request gets 503.", lo=1.0, hi=3600.0)
    cors_origins: tuple[str, ...] = _f([], "Origins allowed to call the API from a browser (CORS); empty: none.")
    max_question_chars: int = _f(20_000, "Longest question (the last user message's text) in characters; longer ones get 400.", lo=1, hi=10_000_000)
    max_history: int = _f(200, "Most exchanges (user and assistant message pairs) before the question in one chat request; more get 400.", lo=0, hi=100_000)
    max_chars: int = _f(100_000, "Most characters of all the messages of one chat request together; more get 400 before anything is tokenised.", lo=1, hi=100_000_000)
    audio_workers: int = _f(1, "Speech synthesis and transcription requests (HTTP and Wyoming together) worked on at once, on threads of their own (the model's turns and the voice loop keep theirs).", lo=1, hi=64)
    audio_queue: int = _f(4, "Speech and transcription requests (HTTP and Wyoming together) that may wait for a worker; more, or a wait past http.max_wait_s, get 503 with Retry-After (Wyoming: an error event, code busy).", lo=0, hi=1000)
    audio_deadline_s: float = _f(300.0, "Longest speech synthesis or transcription of one request (a Wyoming stream's sentence); past it the request gets 503 or a Wyoming error event (a worker that never returns restarts the service, as deadlines do).", lo=1.0, hi=86400.0)
    header_timeout_s: float = _f(10.0, "Longest a new connection may take to send its first request's headers; a slower one is closed.", lo=0.1, hi=3600.0)
    body_timeout_s: float = _f(60.0, "Longest a client may take to send a request's body, or to take a chunk of the answer; past it the request ends (408, or the stream is closed).", lo=0.1, hi=3600.0)
    idle_timeout_s: float = _f(60.0, "An idle connection between two requests (keep-alive) is closed after this long; so is one that sends the next request's headers that slowly.", lo=0.1, hi=3600.0)


@dataclass(frozen=True)
class WyomingConfig:
    enabled: bool = _f(False, "Serve speech-to-text, text-to-speech and the conversation (camera-aware) to Home Assistant over the Wyoming protocol while `run` or `serve` runs.")
    uri: str = _f("tcp://127.0.0.1:10700", "tcp://HOST:PORT to listen on; tcp://0.0.0.0:10700 for Home Assistant on another machine (needs allow_lan).")
    allow_lan: bool = _f(False, "Wyoming has no authentication: anyone who reaches the port can use the assistant, its camera included. Any address but loopback is refused unless this is true (as the HTTP API needs http.api_key).")
    zeroconf: Literal["auto", "on", "off"] = _f("auto", "Announce the service as _wyoming._tcp on the local network so Home Assistant finds it: auto (on when listening on a LAN address, off on loopback), on or off.")
    zeroconf_name: Optional[str] = _f(None, "The announced service name; null: rkvlm-assistant-<host name>.")
    conversations: int = _f(32, "Home Assistant conversation ids whose exchanges are kept (each answer builds on its id's earlier ones); past it the least recently used is forgotten.", lo=1, hi=10000)
    conversation_max_age_s: float = _f(600.0, "A conversation id not heard from for this long is forgotten (Home Assistant starts a new one after 5 minutes).", lo=10.0, hi=604800.0)
    conversation_max_exchanges: int = _f(10, "Exchanges kept per conversation id (the newest); the context's own budget may keep fewer.", lo=1, hi=1000)
    max_audio_s: float = _f(300.0, "Longest audio one transcription may send; more is refused with an error event.", lo=1.0, hi=3600.0)
    idle_timeout_s: float = _f(30.0, "A connection that sends nothing for this long while nothing is being done for it (or that does not read what it is sent for this long) is closed, so silent clients cannot hold every connection; Home Assistant opens one per request. Applied on SIGHUP.", lo=1.0, hi=86400.0)


@dataclass(frozen=True)
class TranscriptConfig:
    enabled: bool = _f(True, "Write every turn (question, clear, exit, failed or interrupted) as one JSON line; `rkvlm-assistant history` reads it.")
    path: Optional[str] = _f(None, "The transcript file; null: $XDG_STATE_HOME/rkvlm-assistant/transcript.jsonl (~/.local/state/..., the unit's StateDirectory on a board).")
    max_bytes: int = _f(10_000_000, "Rotate the file when it grows past this size.", lo=10_000, hi=10_000_000_000)
    keep: int = _f(5, "Rotated files kept (transcript.jsonl.1 is the newest).", lo=0, hi=1000)


@dataclass(frozen=True)
class DeadlinesConfig:
    asr_s: float = _f(30.0, "Longest speech recognition of one utterance; past it the turn is dropped with an apology.", lo=0.5, hi=86400.0)
    llm_first_piece_s: float = _f(60.0, "Longest wait for the first piece of an answer (the prompt and image evaluated); past it the turn is aborted and apologised for.", lo=0.5, hi=86400.0)
    llm_s: float = _f(300.0, "Longest language-model turn from start to last piece; past it the turn is aborted and apologised for.", lo=0.5, hi=86400.0)
    encode_s: float = _f(60.0, "Longest image encode; past it the question is answered without the picture.", lo=0.5, hi=86400.0)
    tts_s: float = _f(30.0, "Longest speech synthesis of one sentence; past it the sentence is skipped.", lo=0.5, hi=86400.0)
    abort_grace_s: float = _f(10.0, "After a deadline, how long the native call may take to return; if it does not, the daemon stops pinging the watchdog and exits 70 so systemd restarts it.", lo=0.5, hi=3600.0)


@dataclass(frozen=True)
class WakeConfig:
    mode: Literal["auto", "none", "word", "phrase"] = _f(
        "auto", "When speech becomes a question: none (everything heard), word (only after the wake word wake.word, heard by a small model on the microphone; other speech is dropped before speech recognition), phrase (only an utterance that starts with one of wake.phrases), or auto: word when the daemon runs as a systemd service (INVOCATION_ID and NOTIFY_SOCKET set) and pymicro-wakeword is installed, else none; `ask` and the demo take auto as none. After a wake, the wake.follow_up_s window and talking over an answer need no wake. A config file with no wake: section (one of a release before the wake word) reads as none, with a warning.")
    word: Literal["okay_nabu", "hey_jarvis", "alexa", "hey_mycroft"] = _f(
        "okay_nabu", "The wake word (wake.mode word): okay_nabu, hey_jarvis, alexa or hey_mycroft, models inside the pymicro-wakeword wheel (nothing is downloaded).")
    cutoff: Optional[float] = _f(
        None, "Probability the wake word model must pass (the mean of its last 5 outputs); null: the model's own cut-off (okay_nabu 0.85, hey_jarvis 0.97, alexa 0.9, hey_mycroft 0.95). Higher: fewer false wakes, more missed ones.", lo=0.01, hi=0.999)
    phrases: tuple[str, ...] = _f(
        ["rocky", "hey rocky", "okay rocky", "洛奇"], "Names that address the assistant at the start of an utterance (wake.mode phrase: \"Rocky, what do you see?\"), matched without case or punctuation and taken off before the question goes to the model; the name alone wakes it for the next utterance.")
    listen_s: float = _f(5.0, "After a wake, how long the question may take to start; if nothing comes (or nothing is understood) the assistant says persona.*.sorry.", lo=0.5, hi=60.0)
    follow_up_s: float = _f(8.0, "After the answer's last sound, how long a further question needs no wake.", lo=0.0, hi=600.0)
    earcon: bool = _f(True, "Play a short two-note chime when woken, so the person knows it listens.")


@dataclass(frozen=True)
class Config:
    persona: PersonaConfig = _f(PersonaConfig(), "Who the assistant is.")
    audio: AudioConfig = _f(AudioConfig(), "Microphone and speaker.")
    vad: VadConfig = _f(VadConfig(), "Voice activity detection: where an utterance starts and ends.")
    asr: AsrConfig = _f(AsrConfig(), "Speech recognition (faster-whisper).")
    intent: IntentConfig = _f(IntentConfig(), "Phrases that clear or end the conversation.")
    camera: CameraConfig = _f(CameraConfig(), "The camera whose snapshot goes with each question.")
    vision: VisionConfig = _f(VisionConfig(), "The image encoder.")
    llm: LlmConfig = _f(LlmConfig(), "The language model.")
    tts: TtsConfig = _f(TtsConfig(), "Speech synthesis (piper).")
    logging: LoggingConfig = _f(LoggingConfig(), "Logging.")
    transcript: TranscriptConfig = _f(TranscriptConfig(), "The durable transcript of every turn.")
    http: HttpConfig = _f(HttpConfig(), "The HTTP API (OpenAI-compatible) and the web page.")
    wyoming: WyomingConfig = _f(WyomingConfig(), "The Wyoming server for Home Assistant: speech-to-text, text-to-speech and the conversation.")
    deadlines: DeadlinesConfig = _f(DeadlinesConfig(), "How long each stage may take before the turn is given up (a stuck native call restarts the service).")
    wake: WakeConfig = _f(WakeConfig(), "Listening only when addressed: wake word, wake phrase, follow-up window.")
    # Where the file came from: relative paths in it are relative to its folder.
    source: str = field(default="<defaults>", metadata={"doc": "", "internal": True})
    # Keys of an earlier release the file still uses, one line each (config_compat): logged
    # once at start, listed by `check`. Not part of the settings' equality.
    warnings: tuple[str, ...] = field(default=(), compare=False,
                                      metadata={"doc": "", "internal": True})

    def path(self, value: str | None) -> Path | None:
        """Resolve a path from the config: ~ expanded, relative to the config file's folder."""
        if value is None:
            return None
        p = Path(os.path.expanduser(str(value)))
        if not p.is_absolute() and self.source not in ("<defaults>", "<string>"):
            p = Path(self.source).resolve().parent / p
        return p


# --------------------------------------------------------------------------- loading

def _describe(tp: Any, meta: dict) -> str:
    """What a field expects, in words."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [_describe(a, meta) for a in args if a is not type(None)]
        s = " or ".join(parts)
        return s + (" or null" if type(None) in args else "")
    if origin is tuple:
        return "a list of " + _describe(args[0], {}).removeprefix("a ").removeprefix("an ") + "s"
    rng = ""
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        rng = f" from {lo:g} to {hi:g}"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + rng
    if tp is float:
        return "a number" + (rng or " (finite)")
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _found(value: Any) -> str:
    if isinstance(value, Unreadable):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[repr(value)]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _convert(value: Any, tp: Any, meta: dict, key: str, source: str, base: Any = None) -> Any:
    raw = value

    def bad() -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {_describe(tp, meta)}, found {_found(raw)}",
                           key=key, source=source)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        for a in args:
            # YAML reads `frame_ms: 30` as int and `core_mask: 0` as int: accept the text form too.
            if value == a and type(value) is type(a) or (isinstance(a, str) and not isinstance(value, bool)
                                                          and isinstance(value, int) and str(value) == a):
                return a
        raise bad()
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        # Try int before str so "device: 2" stays an index.
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _convert(value, a, meta, key, source)
            except ConfigError:
                continue
        raise bad()
    if origin is tuple:
        if not isinstance(value, list):
            raise bad()
        return tuple(_convert(v, args[0], {}, f"{key}[{i}]", source) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key, source, base)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        try:
            value = float(value)
        except OverflowError:            # an integer past a double's range
            raise bad() from None
        if not math.isfinite(value):     # .nan passes every comparison with a bound
            raise bad()
    elif tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    lo, hi = meta.get("lo"), meta.get("hi")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad()
    return value


def _build(cls: type, data: dict, prefix: str, source: str, base: Any = None) -> Any:
    """``cls`` from a mapping; keys it does not set keep ``base``'s values (a section's own
    default: persona.zh's lines are Chinese), else the class defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for k in data:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else str(k)
            known = ", ".join(fields)
            raise ConfigError(f"{source}: {where}: unknown key (expected one of: {known})",
                              key=where, source=source)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            where = f"{prefix}.{name}" if prefix else name
            default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                       else None)
            kwargs[name] = _convert(data[name], hints[name], dict(f.metadata), where, source,
                                    default if dataclasses.is_dataclass(default) else None)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


class _TooDeep(Exception):
    def __init__(self, mark):
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `0_1` as the integer 1 and `1:30` as 90: a core mask or a time would
    change meaning silently. Integers here are plain decimal (or 0x hex) only.

    Nesting is bounded while composing: PyYAML recurses once per level (10,000 `[` is a
    RecursionError) and its scanner slows quadratically with the depth, so the parse stops
    at the first level past MAX_NESTING, before the scanner has read further."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


guard_scalars(_Loader)

_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))


def _too_large(source: str, size: int) -> ConfigError:
    told = f"{size / 1e6:.1f} MB" if size > MAX_CONFIG_BYTES else "larger"
    return ConfigError(f"{source}: a config file is at most {MAX_CONFIG_BYTES / 1e6:g} MB "
                       f"(config.yaml with every key is about 20 kB); this one is {told}, it "
                       f"is not the config", source=source)


def parse(text: str, source: str = "<string>") -> Config:
    """Parse YAML text into a Config; raises ConfigError with the key path on any problem."""
    if len(text) > MAX_CONFIG_BYTES:
        raise _too_large(source, len(text.encode("utf-8", "surrogatepass")))
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}:{where}: not valid YAML: {problem}", source=source) from None
    except (_TooDeep, RecursionError) as e:
        # RecursionError: the nesting bound should come first; a traceback never should.
        mark = getattr(e, "mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}:{where}: nested more than {MAX_NESTING} levels deep; a "
                          f"config nests four (llm.rkllm.model)", source=source) from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
        # A value no constructor above guards: one line and exit 78, never a traceback.
        raise ConfigError(f"{source}: a value that cannot be read ({type(e).__name__}: "
                          f"{str(e)[:200]})", source=source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top, found {_found(data)}",
                          source=source)
    data, warnings, written_as = upgrade(data, source)
    try:
        cfg = _build(Config, data, "", source)
    except ConfigError as e:
        old = written_as.get(e.key)
        if old is None:
            raise
        # The value came from an earlier release's key: name the one the file has.
        raise ConfigError(str(e).replace(f"{source}: {e.key}: ", f"{source}: {old} (read as "
                                         f"{e.key}): ", 1), key=old, source=source) from None
    return dataclasses.replace(cfg, source=source, warnings=tuple(warnings))


def load(path: str | os.PathLike) -> Config:
    """Load and validate a config file: a regular file (or a link to one) of at most
    MAX_CONFIG_BYTES, read within READ_TIMEOUT_S (assistant.safe_read: a FIFO or a device in
    its place would block or never end)."""
    from assistant import safe_read

    p = Path(path)
    try:
        raw = safe_read.read_regular(p, MAX_CONFIG_BYTES, READ_TIMEOUT_S)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found (pass --config PATH, or copy config.yaml there)",
                          source=str(p)) from None
    except safe_read.FileTooLarge as e:
        raise _too_large(str(p), e.size) from None
    except safe_read.NotRegularFile as e:
        raise ConfigError(f"{p}: {e}; the config must be a regular file (or a link to one): "
                          f"put the config file there", source=str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the config file: {e}", source=str(p)) from None
    return parse(text, str(p))


def iter_fields(obj: Any, prefix: str = ""):
    """Yield (key path, field, value) for every leaf setting, depth first."""
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, key)
        else:
            yield key, f, value


def file_settings(cfg: Config) -> list[tuple[str, Path]]:
    """(key path, resolved path) of every model-file setting that is set, for the check."""
    out = []
    for key, f, value in iter_fields(cfg):
        if f.metadata.get("file") and value is not None:
            out.append((key, cfg.path(value)))
    return out


def missing_file_error(cfg: Config, key: str, path: Path, what: str = "file") -> ConfigError:
    return ConfigError(f"{cfg.source}: {key}: {what} not found: {path}", key=key, source=cfg.source)


def active_file_keys(cfg: Config) -> set[str]:
    """The file settings the configured backends will actually open."""
    keys = set()
    if cfg.llm.backend == "rkllm":
        keys |= {"llm.rkllm.model", "llm.rkllm.lora"}
    if cfg.llm.backend == "llamacpp" and cfg.vision.encoder == "llamacpp":
        keys.add("llm.llamacpp.mmproj")
    if cfg.vision.encoder == "rknn":
        keys.add("vision.rknn.model")
    return keys


def check_files(cfg: Config, keys: set[str] | None = None) -> list[ConfigError]:
    """Every configured model file that does not exist, as errors (all of them, not the first)."""
    keys = active_file_keys(cfg) if keys is None else keys
    errors = []
    for key, p in file_settings(cfg):
        if key not in keys:
            continue
        if not p.is_file():
            errors.append(missing_file_error(cfg, key, p))
    return errors
