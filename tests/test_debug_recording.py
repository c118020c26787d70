"""Debug recording (logging.debug_recording, `run --debug-recording DIR`): each utterance's
WAV and its turn's snapshot kept on disk, bounded, written off the event loop.

The pipeline tests run real whisper, piper and webrtcvad over a WAV source, a picture
camera and a scripted LLM; whisper then hears the recorded WAVs back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
import time
import wave
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from assistant.audio.tts import VoiceSet
from assistant.audio.wav_sink import WavSink
from assistant.audio.wav_source import WavSource
from assistant.config import Config, LoggingConfig, TtsConfig, parse
from assistant.debug_recording import DebugRecorder, recorder_for
from assistant.llm.base import ImageEmbedding
from assistant.pipeline import Components, Pipeline
from assistant.turn import Turn
from assistant.vision.base import VisionEncoder
from assistant.vision.file_camera import ImageCamera
from scripted_llm import ScriptedLLM
from speech_fixtures import read_wav, write_wav

RATE = 16000
REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^\d{8}-\d{6}-turn(\d+)\.(wav|jpg)$")


@pytest.fixture(scope="module")
def voices():
    vs = VoiceSet(TtsConfig())
    vs.load()
    return vs


class Encoder(VisionEncoder):
    name = "fixed"

    def load(self):
        pass

    def encode(self, rgb):
        return ImageEmbedding(np.full((16, 8), 0.5, np.float32), 32, 32)


@pytest.fixture
def picture(tmp_path):
    """A picture the JPEG can be checked against: left half red, right half blue."""
    bgr = np.zeros((96, 128, 3), np.uint8)
    bgr[:, :64] = (0, 0, 255)
    bgr[:, 64:] = (255, 0, 0)
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), bgr)
    return path


def questions_wav(tmp_path, spoken, phrases):
    parts_pcm = [np.zeros(int(0.5 * RATE), np.int16)]
    for p in phrases:
        parts_pcm += [spoken.pcm(p), np.zeros(int(1.5 * RATE), np.int16)]
    wav = write_wav(tmp_path / "conversation.wav", np.concatenate(parts_pcm), RATE)
    return wav


def drive(tmp_path, wav, asr, voices, picture, recorder, answers):
    cfg = Config()
    cfg = replace(cfg, persona=replace(cfg.persona, language="en"))
    llm = ScriptedLLM(answers)
    parts = Components(source=WavSource(wav, frame_ms=cfg.vad.frame_ms),
                       sink=WavSink(tmp_path / "answer.wav", voices.sample_rate),
                       asr=asr, voices=voices, llm=llm, camera=ImageCamera(picture),
                       encoder=Encoder())
    pipe = Pipeline(cfg, parts, recorder=recorder)
    async def go():
        try:
            return await pipe.run(greet=False)
        finally:
            await parts.sink.close()
            pipe.scene.close()

    code = asyncio.run(go())
    return code, pipe, llm


def recorded(directory: Path) -> dict[str, list[Path]]:
    files = sorted(p for p in directory.iterdir() if NAME.match(p.name))
    return {"wav": [p for p in files if p.suffix == ".wav"],
            "jpg": [p for p in files if p.suffix == ".jpg"]}


def test_each_utterance_and_its_snapshot_are_recorded(tmp_path, spoken, whisper_tiny, voices,
                                                      picture):
    questions = ["What do you see on the table?", "What color is the cup?"]
    wav = questions_wav(tmp_path, spoken, questions)
    rec = DebugRecorder(tmp_path / "rec")
    code, pipe, llm = drive(tmp_path, wav, whisper_tiny, voices, picture, rec,
                            ["I see a red apple.", "The cup is blue."])
    assert rec.flush(10)
    rec.close()
    assert code == 0
    assert [t.answer for t in pipe.turns] == ["I see a red apple.", "The cup is blue."]
    files = recorded(tmp_path / "rec")
    assert len(files["wav"]) == 2 and len(files["jpg"]) == 2
    # Named by time and turn id: the pipeline's turns, in order.
    ids = [t.id for t in pipe.turns]
    assert [int(NAME.match(p.name).group(1)) for p in files["wav"]] == ids
    assert [p.with_suffix(".jpg") for p in files["wav"]] == files["jpg"]
    # The WAVs are what whisper got: 16 kHz mono, and whisper hears the questions again.
    for path, question in zip(files["wav"], questions):
        with wave.open(str(path)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        pcm, _ = read_wav(path)
        heard = whisper_tiny.transcribe(pcm).text.lower()
        assert question.lower().rstrip("?").split()[-1] in heard, heard
    # The JPEGs are the camera's picture in the right colours (RGB frames, BGR on disk).
    for path in files["jpg"]:
        bgr = cv2.imread(str(path))
        assert bgr.shape == (96, 128, 3)
        assert bgr[48, 20, 2] > 200 and bgr[48, 20, 0] < 60       # red on the left
        assert bgr[48, 100, 0] > 200 and bgr[48, 100, 2] < 60     # blue on the right
    assert rec.saved == 2 and rec.dropped == 0
    assert not list((tmp_path / "rec").glob("*.part"))


def test_the_oldest_turns_are_deleted_past_the_bounds(tmp_path):
    d = tmp_path / "rec"
    d.mkdir()
    # Recordings of an earlier run count too; unrelated files are left alone.
    old = d / "20200101-000000-turn7.wav"
    old.write_bytes(b"x" * 1000)
    (d / "notes.txt").write_text("mine")
    frame = np.zeros((32, 32, 3), np.uint8)
    pcm = np.zeros(RATE, np.int16)             # one second: 32,044 bytes as a WAV
    rec = DebugRecorder(d, max_files=6, max_mb=1.0)
    turns = [Turn() for _ in range(5)]
    for t in turns:
        rec.save(t, pcm, frame)
    assert rec.flush(10)
    # 1 + 10 files: the old one and the two oldest turns went (3 turns = 6 files kept).
    names = sorted(p.name for p in d.iterdir())
    assert not old.exists() and "notes.txt" in names
    kept = sorted(int(NAME.match(n).group(1)) for n in names if NAME.match(n))
    assert kept == sorted([t.id for t in turns[2:]] * 2)
    # By bytes: 1 MB holds 32 one-second WAVs; 40 turns keep the newest 32 (no picture).
    rec.max_files = 10_000
    many = [Turn() for _ in range(40)]
    for t in many:
        rec.save(t, pcm, None)
    assert rec.flush(10)
    rec.close()
    wavs = [p for p in d.iterdir() if NAME.match(p.name)]
    assert sum(p.stat().st_size for p in wavs) <= 2**20
    kept = {int(NAME.match(p.name).group(1)) for p in wavs}
    assert {t.id for t in many[-30:]} <= kept and many[0].id not in kept
    assert all(t.id not in kept for t in turns)


def test_a_recording_that_raises_an_unexpected_error_does_not_end_the_writer(tmp_path, caplog):
    d = tmp_path / "rec"
    pcm = np.zeros(RATE // 4, np.int16)
    rec = DebugRecorder(d)
    bad = [Turn(), Turn()]
    good = Turn()
    with caplog.at_level(logging.WARNING):
        for t in bad:
            # Seven channels: OpenCV refuses it with cv2.error, not an OSError or ValueError.
            rec.save(t, pcm, np.zeros((8, 8, 7), np.uint8))
        rec.save(good, pcm, np.zeros((8, 8, 3), np.uint8))
        assert rec.flush(10)
    rec.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "debug-recording writer could not write" in warnings[0]
    assert rec.dropped == 2 and rec.saved == 1
    names = {p.name for p in d.iterdir()}
    assert {n.split("-turn")[1] for n in names if f"-turn{good.id}." in n} == {
        f"{good.id}.wav", f"{good.id}.jpg"}
    assert not any(n.endswith(".part") for n in names)


def test_the_picture_of_a_scene_job_is_written_once_taken(tmp_path):
    """The snapshot job may still be running when the utterance is saved."""
    rec = DebugRecorder(tmp_path / "rec")
    frame = np.full((16, 16, 3), 200, np.uint8)

    class Result:        # a SceneResult's shape: .shot.frame
        shot = type("Shot", (), {"frame": frame})()

    async def go():
        job = asyncio.get_running_loop().create_future()
        turn = Turn()
        rec.save(turn, np.zeros(800, np.int16), job)
        await asyncio.sleep(0.05)
        job.set_result(Result())
        await asyncio.sleep(0)
        return turn

    turn = asyncio.run(go())
    assert rec.flush(10)
    rec.close()
    names = sorted(p.name for p in (tmp_path / "rec").iterdir())
    assert [n.split("-turn")[1] for n in names] == [f"{turn.id}.jpg", f"{turn.id}.wav"]


def test_an_unwritable_directory_is_one_warning_and_answers_go_on(tmp_path, spoken, whisper_tiny,
                                                                  voices, picture, caplog):
    blocker = tmp_path / "rec"
    blocker.write_text("a file where the directory should be")
    questions = ["What do you see on the table?", "What color is the cup?"]
    wav = questions_wav(tmp_path, spoken, questions)
    rec = DebugRecorder(blocker)
    with caplog.at_level(logging.WARNING):
        code, pipe, llm = drive(tmp_path, wav, whisper_tiny, voices, picture, rec,
                                ["I see a red apple.", "The cup is blue."])
        assert rec.flush(10)
        rec.close()
    assert code == 0
    assert [t.answer for t in pipe.turns] == ["I see a red apple.", "The cup is blue."]
    warnings = [r for r in caplog.records if r.name == "assistant.debug_recording"
                and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "cannot write the debug recording" in warnings[0].getMessage()
    assert rec.saved == 0 and rec.dropped >= 2
    assert blocker.read_text() == "a file where the directory should be"


def test_a_full_disk_is_one_warning_then_recording_resumes(tmp_path, caplog, monkeypatch):
    import assistant.debug_recording as dr

    real = dr._write_wav
    full = {"on": True}

    def write_wav_or_fail(f, pcm):
        if full["on"]:
            raise OSError(28, "No space left on device")
        real(f, pcm)

    monkeypatch.setattr(dr, "_write_wav", write_wav_or_fail)
    rec = DebugRecorder(tmp_path / "rec")
    with caplog.at_level(logging.INFO, logger="assistant.debug_recording"):
        for _ in range(3):
            rec.save(Turn(), np.zeros(800, np.int16), None)
        assert rec.flush(10)
        full["on"] = False
        rec.save(Turn(), np.zeros(800, np.int16), None)
        assert rec.flush(10)
        rec.close()
    msgs = [r.getMessage() for r in caplog.records if r.name == "assistant.debug_recording"]
    assert sum("No space left" in m for m in msgs) == 1
    assert any("written again" in m for m in msgs)
    # No half-written file is left by the failures; the later turn is there.
    files = sorted(p.name for p in (tmp_path / "rec").iterdir())
    assert len(files) == 1 and files[0].endswith(".wav")


def test_save_never_waits_for_the_disk(tmp_path, monkeypatch):
    import assistant.debug_recording as dr

    gate = threading.Event()
    real = dr._write_wav

    def slow(f, pcm):
        gate.wait(10)
        real(f, pcm)

    monkeypatch.setattr(dr, "_write_wav", slow)
    rec = DebugRecorder(tmp_path / "rec")
    t0 = time.monotonic()
    for _ in range(5):
        rec.save(Turn(), np.zeros(RATE, np.int16), np.zeros((8, 8, 3), np.uint8))
    assert time.monotonic() - t0 < 0.5
    gate.set()
    assert rec.flush(10)
    rec.close()
    assert rec.saved == 5


def test_the_config_keys_and_the_cli_flag(tmp_path, monkeypatch):
    assert LoggingConfig().debug_recording is None
    assert LoggingConfig().debug_recording_max_files == 200
    assert LoggingConfig().debug_recording_max_mb == 200.0
    assert recorder_for(Config()) is None
    (tmp_path / "config.yaml").write_text(
        "logging: {debug_recording: recordings, debug_recording_max_files: 10, "
        "debug_recording_max_mb: 5}\n")
    from assistant.config import load
    cfg = load(tmp_path / "config.yaml")
    rec = recorder_for(cfg)
    try:
        # Relative to the config file's folder, like every path in it.
        assert rec.directory == tmp_path / "recordings"
        assert rec.max_files == 10 and rec.max_bytes == 5 * 2**20
    finally:
        rec.close()

    # `run --debug-recording DIR` overrides the key (relative to where it is run).
    from assistant import cli, daemon
    seen = {}

    async def fake_run_daemon(cfg):
        seen["dir"] = cfg.logging.debug_recording
        return 0

    monkeypatch.setattr(daemon, "run_daemon", fake_run_daemon)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--config", "config.yaml", "run", "--debug-recording", "elsewhere"]) == 0
    assert seen["dir"] == str(tmp_path / "elsewhere")
    assert cli.main(["--config", "config.yaml", "run"]) == 0
    assert seen["dir"] == "recordings"
    with pytest.raises(Exception, match="debug_recording_max_files"):
        parse("logging: {debug_recording_max_files: 1}\n", "x.yaml")

    out = subprocess.run([sys.executable, "-m", "assistant", "run", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert out.returncode == 0 and "--debug-recording DIR" in out.stdout


@pytest.mark.skipif(not __import__("alsa_support").portaudio_available(), reason="needs libportaudio2")
def test_the_daemon_records_with_the_cli_flag(tmp_path, spoken):
    """`rkvlm-assistant run --debug-recording DIR` on a real (fake ALSA) microphone."""
    from alsa_support import make_fake_alsa
    from assistant.audio.resample import resample
    from assistant.demo import draw_scene
    from tiny_models import write_mmproj, write_text_model

    mic = 48000
    fake = make_fake_alsa(tmp_path, capture_rate=mic, playback_rate=22050)
    speech = [np.zeros(int(0.4 * mic), np.int16)]
    for p in ("What do you see on the table?", "Exit."):
        speech += [resample(spoken.pcm(p), RATE, mic), np.zeros(int(1.2 * mic), np.int16)]
    fake.write_capture(np.concatenate(speech))
    write_text_model(tmp_path / "tiny.gguf", scripted_reply="I see a red apple.")
    write_mmproj(tmp_path / "tiny-mmproj.gguf")
    draw_scene(tmp_path / "scene.jpg")
    (tmp_path / "config.yaml").write_text(f"""
audio:
  input: {{device: fakemic, sample_rate: {mic}}}
  output: {{device: fakespeaker, sample_rate: 22050}}
persona: {{language: en, en: {{greeting: ""}}}}
intent: {{exit_action: stop}}
camera: {{source: scene.jpg}}
transcript: {{path: turns.jsonl}}
http: {{enabled: false}}
llm: {{llamacpp: {{model: tiny.gguf, mmproj: tiny-mmproj.gguf}}}}
""")
    proc = subprocess.run([sys.executable, "-m", "assistant", "--config", "config.yaml", "run",
                           "--debug-recording", "rec"], cwd=tmp_path, env=fake.env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = recorded(tmp_path / "rec")
    # The question and the exit phrase: each utterance, each with the camera's picture.
    assert len(files["wav"]) == 2 and len(files["jpg"]) == 2, proc.stderr[-3000:]
    assert "debug recording: each utterance" in proc.stderr
    bgr = cv2.imread(str(files["jpg"][0]))
    scene = cv2.imread(str(tmp_path / "scene.jpg"))
    assert bgr.shape == scene.shape
    assert np.abs(bgr.astype(int) - scene.astype(int)).mean() < 8
