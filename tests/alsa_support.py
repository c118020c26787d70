"""A fake microphone and speaker for the real sounddevice path, through ALSA's `file` plugin.

``make_fake_alsa(tmp_path)`` writes ``.asoundrc`` into a temporary HOME that defines:

- ``fakemic``: a capture PCM that reads raw S16_LE samples from ``capture_file`` (at
  ``capture_rate`` with ``capture_channels``); ``plug`` converts to whatever the program asks;
- ``fakespeaker``: a playback PCM that writes raw S16_LE samples to ``playback_file``;
- ``default``: fakemic for capture, fakespeaker for playback.

PortAudio reads the ALSA configuration once, when it initialises, so the code under test
runs in a fresh Python process with HOME pointing there (``FakeAlsa.run_python``).

Two facts of the plugin to design tests around:

- its ``null`` slave does not keep time: capture delivers the whole file as fast as it is
  read, and playback "plays" instantly. After the end of the file, capture repeats its last
  buffer, so ``write_capture`` appends silence (the mic then goes quiet, at high speed);
  consume no more than the file holds.
- PortAudio starts playback with a buffer of silence: ``find_signal`` locates the played
  samples in what the speaker wrote.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def _quote(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _asoundrc(mic: str, speaker: str, capture_file: Path, playback_file: Path, capture_rate: int,
              capture_channels: int, playback_rate: int, playback_channels: int) -> str:
    # The file PCMs are defined inline, so PortAudio lists only the two named devices.
    return f"""\
pcm.{mic} {{
    type plug
    slave {{
        pcm {{
            type file
            slave.pcm "null"
            file "/dev/null"
            infile {_quote(capture_file)}
            format "raw"
        }}
        format S16_LE
        rate {capture_rate}
        channels {capture_channels}
    }}
}}
pcm.{speaker} {{
    type plug
    slave {{
        pcm {{
            type file
            slave.pcm "null"
            file {_quote(playback_file)}
            format "raw"
        }}
        format S16_LE
        rate {playback_rate}
        channels {playback_channels}
    }}
}}
pcm.!default {{
    type asym
    capture.pcm "{mic}"
    playback.pcm "{speaker}"
}}
"""


@dataclass
class FakeAlsa:
    """A temporary HOME with a fake microphone and speaker, and a way to run code there."""

    home: Path
    capture_file: Path
    playback_file: Path
    capture_rate: int
    capture_channels: int
    playback_rate: int
    playback_channels: int
    mic: str = "fakemic"
    speaker: str = "fakespeaker"

    def write_capture(self, pcm: np.ndarray, silence_s: float = 1.0) -> None:
        """What the microphone will deliver: int16 (frames,) or (frames, channels), then silence."""
        pcm = np.asarray(pcm, dtype=np.int16)
        if pcm.ndim == 1:
            pcm = pcm[:, None]
        if pcm.shape[1] != self.capture_channels:
            raise ValueError(f"capture is {self.capture_channels} channel(s), got {pcm.shape[1]}")
        tail = np.zeros((int(silence_s * self.capture_rate), self.capture_channels), np.int16)
        np.concatenate([pcm, tail]).astype("<i2").tofile(self.capture_file)

    def read_playback(self) -> np.ndarray:
        """Everything the speaker was given, int16 (frames, channels)."""
        if not self.playback_file.exists():
            return np.zeros((0, self.playback_channels), np.int16)
        data = np.fromfile(self.playback_file, dtype="<i2")
        return data[: len(data) - len(data) % self.playback_channels].reshape(-1, self.playback_channels)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["HOME"] = str(self.home)
        env.pop("XDG_CONFIG_HOME", None)  # alsa-lib also reads $XDG_CONFIG_HOME/alsa/asoundrc
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        return env

    def run_python(self, code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``code`` (with ``sys.argv[1:] == args``) in a fresh interpreter that sees the
        fake devices."""
        return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def run_json(self, code: str, *args: str, timeout: float = 120) -> object:
        """Run ``code``, which prints one JSON value on its last line; fail with its stderr."""
        proc = self.run_python(code, *args, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"subprocess failed (exit {proc.returncode}):\n{proc.stderr}")
        lines = proc.stdout.strip().splitlines()
        if not lines:
            raise AssertionError(f"subprocess printed nothing; stderr:\n{proc.stderr}")
        return json.loads(lines[-1])


def make_fake_alsa(tmp_path: Path, capture_rate: int = 48000, capture_channels: int = 1,
                   playback_rate: int = 22050, playback_channels: int = 1,
                   mic: str = "fakemic", speaker: str = "fakespeaker") -> FakeAlsa:
    """Write the asoundrc under ``tmp_path/home`` and return the fake devices' handle."""
    home = tmp_path / "home"
    home.mkdir(parents=True, exist_ok=True)
    fake = FakeAlsa(home=home, capture_file=tmp_path / "capture.raw",
                    playback_file=tmp_path / "playback.raw", capture_rate=capture_rate,
                    capture_channels=capture_channels, playback_rate=playback_rate,
                    playback_channels=playback_channels, mic=mic, speaker=speaker)
    fake.write_capture(np.zeros((0, capture_channels), np.int16))
    (home / ".asoundrc").write_text(_asoundrc(mic, speaker, fake.capture_file, fake.playback_file,
                                              capture_rate, capture_channels, playback_rate,
                                              playback_channels))
    return fake


def portaudio_available() -> bool:
    """Whether the PortAudio library is installed (the device tests skip without it)."""
    # Not `import sounddevice`: that would initialise PortAudio in the test process.
    return ctypes.util.find_library("portaudio") is not None


def find_signal(haystack: np.ndarray, needle: np.ndarray) -> int:
    """Where ``needle`` occurs in ``haystack`` (1-D), or -1."""
    haystack, needle = np.asarray(haystack), np.asarray(needle)
    if len(needle) == 0:
        return 0
    for start in np.flatnonzero(haystack[: len(haystack) - len(needle) + 1] == needle[0]):
        if np.array_equal(haystack[start:start + len(needle)], needle):
            return int(start)
    return -1


# ============================================================================ hot-plug

ALSA_CONF = Path("/usr/share/alsa/alsa.conf")


class HotplugAlsa(FakeAlsa):
    """FakeAlsa whose devices can be unplugged and plugged back while the process runs.

    alsa-lib re-reads its configuration when ``snd_pcm_open`` finds a *top-level* file
    (one of ``ALSA_CONFIG_PATH``) changed, by inode or mtime; ``~/.asoundrc`` is loaded
    through a hook and never re-read. So the devices live in ``devices.conf``, named in
    ``ALSA_CONFIG_PATH``, and ``unplug`` / ``plug`` replace that file (a new inode): the next
    open of the device fails ("Unknown PCM") or works again, as with a USB card that comes
    back under the same name. Streams already open keep running, as they would not on real
    hardware: a test makes the open stream fail itself.

    The subprocess gets the paths on its command line and calls ``unplug_device`` /
    ``plug_device`` (this module, importable there from ``tests/``).
    """

    @property
    def devices_conf(self) -> Path:
        return self.home / "devices.conf"

    def env(self) -> dict[str, str]:
        env = super().env()
        env["ALSA_CONFIG_PATH"] = f"{ALSA_CONF}:{self.devices_conf}"
        env["PYTHONPATH"] = os.pathsep.join((env["PYTHONPATH"], str(REPO_ROOT / "tests")))
        return env


def hotplug_supported() -> bool:
    return portaudio_available() and ALSA_CONF.is_file()


def make_hotplug_alsa(tmp_path: Path, **kw) -> HotplugAlsa:
    """``make_fake_alsa`` with the devices in a file that can be swapped (see HotplugAlsa)."""
    fake = make_fake_alsa(tmp_path, **kw)
    hot = HotplugAlsa(**{f: getattr(fake, f) for f in fake.__dataclass_fields__})
    rc = hot.home / ".asoundrc"
    hot.devices_conf.write_text(rc.read_text())
    rc.write_text("")  # defined once, in devices.conf
    return hot


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)  # a new inode: alsa-lib notices within the same second


def _unplugged_name(name: str) -> str:
    return "unplugged_" + name[::-1]  # no longer contains the name: a search does not find it


def unplug_device(devices_conf: str | os.PathLike, name: str) -> None:
    """Remove the PCM ``name`` from the configuration (the other devices stay)."""
    conf = Path(devices_conf)
    _replace(conf, conf.read_text().replace(f"pcm.{name} {{", f"pcm.{_unplugged_name(name)} {{"))


def plug_device(devices_conf: str | os.PathLike, name: str) -> None:
    """Bring the PCM ``name`` back."""
    conf = Path(devices_conf)
    _replace(conf, conf.read_text().replace(f"pcm.{_unplugged_name(name)} {{", f"pcm.{name} {{"))


# ============================================================================ real-time pace

# The fake microphone above hands over its whole file at once. For a microphone that keeps
# time (a person speaking), the capture ``infile`` is a named pipe that a writer thread fills
# at real-time pace (``make_paced_alsa``, ``PacedMic``). Measured with alsa-lib 1.2.8 and
# PortAudio 19.6 (a counting signal written at 16 kHz, read by a sounddevice InputStream of
# 480-frame blocks): the plugin's read blocks on the empty pipe, so capture runs at the
# writer's pace, and the samples arrive exactly once and in order, provided every write is
# a whole number of the plugin's reads (PortAudio reads periods of 960 frames here) and
# atomic (at most PIPE_BUF, 4096 bytes). A short read is NOT waited out: the plugin fills the
# rest of the period with stale samples (writes of 320 frames gave a period of 960 frames
# every 20 ms, three times real time, two thirds of it stale), hence the fixed chunk below.

PACED_CHUNK_FRAMES = 1920   # 120 ms at 16 kHz, 3840 bytes of S16 mono: two 960-frame periods


@dataclass
class PacedAlsa(FakeAlsa):
    """FakeAlsa whose microphone reads a named pipe (``capture_file`` is the FIFO)."""

    def paced_mic(self) -> "PacedMic":
        return PacedMic(self.capture_file, self.capture_rate)


def make_paced_alsa(tmp_path: Path, capture_rate: int = 16000, playback_rate: int = 22050,
                    playback_file: Path | None = Path("/dev/null"),
                    mic: str = "fakemic", speaker: str = "fakespeaker") -> PacedAlsa:
    """A mono microphone that reads ``tmp_path/mic.fifo`` (fill it with ``paced_mic()``) and a
    speaker that writes ``playback_file`` (/dev/null by default: a long run plays a lot)."""
    home = tmp_path / "home"
    home.mkdir(parents=True, exist_ok=True)
    fifo = tmp_path / "mic.fifo"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    playback = playback_file or tmp_path / "playback.raw"
    (home / ".asoundrc").write_text(_asoundrc(mic, speaker, fifo, playback, capture_rate, 1,
                                              playback_rate, 1))
    return PacedAlsa(home=home, capture_file=fifo, playback_file=playback,
                     capture_rate=capture_rate, capture_channels=1, playback_rate=playback_rate,
                     playback_channels=1, mic=mic, speaker=speaker)


class PacedMic:
    """Writes into the microphone's FIFO at real-time pace: silence, and speech when asked.

    The pipe is opened read-write, so opening it never blocks and it never breaks while
    PortAudio opens and closes the device (it probes every device when it starts). While
    nobody reads (the program is loading), writes block once the pipe is full (about 2 s of
    audio); the writer then carries on at real-time pace from where it is rather than
    catching up in a burst (``resyncs`` counts those)."""

    def __init__(self, fifo: Path, rate: int, chunk_frames: int = PACED_CHUNK_FRAMES):
        import queue
        import threading

        self.rate = rate
        self.chunk = chunk_frames
        self.fd = os.open(fifo, os.O_RDWR)
        self.frames_written = 0
        self.resyncs = 0
        self._q: "queue.Queue" = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-mic", daemon=True)
        self._thread.start()

    def say(self, pcm: np.ndarray):
        """Queue int16 mono speech at the mic's rate; returns a threading.Event set once its
        last sample has been written (real time: its duration after it started)."""
        import threading

        done = threading.Event()
        self._q.put((np.asarray(pcm, np.int16), done))
        return done

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.fd)

    def _run(self) -> None:
        import queue
        import select
        import time

        silence = np.zeros(self.chunk, "<i2").tobytes()
        pending = b""           # the speech being said, as bytes
        done = None
        t0 = time.monotonic()
        n = 0                   # frames written since t0
        while not self._stop.is_set():
            if not pending:
                if done is not None:
                    done.set()
                    done = None
                try:
                    pcm, done = self._q.get_nowait()
                    pad = (-len(pcm)) % self.chunk          # whole chunks only
                    pending = np.concatenate([pcm, np.zeros(pad, np.int16)]).astype("<i2").tobytes()
                except queue.Empty:
                    pass
            size = self.chunk * 2
            data, pending = (pending[:size], pending[size:]) if pending else (silence, b"")
            due = t0 + n / self.rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif now - due > 0.5:
                self.resyncs += 1           # the reader stalled: no catching up in a burst
                t0, n = now, 0
            while not self._stop.is_set():
                if select.select([], [self.fd], [], 0.25)[1]:
                    os.write(self.fd, data)
                    break
            n += self.chunk
            self.frames_written += self.chunk
        if done is not None:
            done.set()
