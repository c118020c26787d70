"""Audio devices through sounddevice (PortAudio): import it lazily, list, and resolve names.

``import sounddevice`` fails with OSError when the PortAudio library is missing. It is only
imported when a real device is asked for, so WAV-only use works on a machine without it,
and a machine that needs it gets one clear message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Literal, Optional, Union

from assistant.errors import DeviceError

log = logging.getLogger(__name__)

Kind = Literal["input", "output"]

_sd: ModuleType | None = None


def import_sounddevice() -> ModuleType:
    """The sounddevice module, or a DeviceError saying what to install."""
    global _sd
    if _sd is None:
        try:
            import sounddevice
        except OSError as e:  # the PortAudio shared library is not installed
            raise DeviceError(
                f"the PortAudio library is missing ({e}): install it with "
                "`sudo apt-get install libportaudio2`, or use WAV files instead of audio devices"
            ) from None
        except ImportError:
            raise DeviceError("the sounddevice Python package is missing: "
                              "install it with `pip install sounddevice`") from None
        _sd = sounddevice
    return _sd


@dataclass(frozen=True)
class AudioDevice:
    """One PortAudio device, in one direction, as the config can name it."""

    index: int
    name: str
    kind: Kind
    channels: int  # the most it can capture (input) or play (output)
    default_samplerate: int
    hostapi: str
    is_default: bool = False

    def __str__(self) -> str:
        mark = "  [default]" if self.is_default else ""
        return (f"{self.index:3d}  {self.name}  ({self.channels} ch, {self.default_samplerate} Hz, "
                f"{self.hostapi}){mark}")


def list_audio_devices() -> tuple[list[AudioDevice], list[AudioDevice]]:
    """``(inputs, outputs)``: every device that can capture, and every one that can play."""
    sd = import_sounddevice()
    try:
        raw = sd.query_devices()
        hostapis = sd.query_hostapis()
        default_in, default_out = sd.default.device
    except sd.PortAudioError as e:
        raise DeviceError(f"cannot list audio devices: {e}") from None
    inputs, outputs = [], []
    for d in raw:
        index = int(d["index"])
        for kind, found, default in (("input", inputs, default_in), ("output", outputs, default_out)):
            channels = int(d[f"max_{kind}_channels"])
            if channels > 0:
                found.append(AudioDevice(index=index, name=str(d["name"]), kind=kind,
                                         channels=channels,
                                         default_samplerate=int(d["default_samplerate"]),
                                         hostapi=str(hostapis[d["hostapi"]]["name"]),
                                         is_default=index == default))
    return inputs, outputs


def _describe(devices: list[AudioDevice], kind: Kind) -> str:
    if not devices:
        return f"there is no audio {kind} device"
    return "available: " + ", ".join(f"{d.index} {d.name!r}" for d in devices)


def resolve_device(spec: Union[str, int, None], kind: Kind) -> int | None:
    """Turn a config value into a PortAudio device index; None means the system default.

    ``spec`` is "default" (or None), an index (int or digits), or part of a device name
    (case-insensitive). An exact name wins over partial matches; no match, or several,
    is a DeviceError listing the devices of that kind.
    """
    setting = f"audio.{kind}.device"
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "default")):
        return None
    inputs, outputs = list_audio_devices()
    devices = inputs if kind == "input" else outputs
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        index = int(spec)
        for d in devices:
            if d.index == index:
                return index
        raise DeviceError(f"{setting}: there is no audio {kind} device with index {index} "
                          f"({_describe(devices, kind)}); see `rkvlm-assistant devices`")
    wanted = spec.strip().lower()
    exact = [d for d in devices if d.name.lower() == wanted]
    matches = exact or [d for d in devices if wanted in d.name.lower()]
    if len(matches) == 1:
        return matches[0].index
    if not matches:
        raise DeviceError(f"{setting}: no audio {kind} device matches {spec!r} "
                          f"({_describe(devices, kind)}); is it plugged in? "
                          "See `rkvlm-assistant devices`")
    names = ", ".join(f"{d.index} {d.name!r}" for d in matches)
    raise DeviceError(f"{setting}: {spec!r} matches several audio {kind} devices ({names}); "
                      "give more of the name or the index")


def device_info(index: int | None, kind: Kind) -> dict:
    """PortAudio's description of a device (the default one for None)."""
    sd = import_sounddevice()
    try:
        return dict(sd.query_devices(index, kind))
    except (sd.PortAudioError, ValueError) as e:
        what = "the default" if index is None else f"device {index}"
        raise DeviceError(f"audio.{kind}.device: {what} cannot be used for {kind} ({e}); is a "
                          "sound card present? See `rkvlm-assistant devices`") from None


def open_params(spec: Union[str, int, None], kind: Kind,
                rate: Optional[int]) -> tuple[int | None, dict, str, int]:
    """What a stream needs to open the configured device (blocking: run it in a thread):
    (index or None for the default, PortAudio's info, its name, the rate to use)."""
    index = resolve_device(spec, kind)
    info = device_info(index, kind)
    return index, info, str(info["name"]), int(rate or info["default_samplerate"])


def describe_device(spec: Union[str, int, None], kind: Kind) -> str:
    """What a config value resolves to, in one line (for `check`); DeviceError if nothing."""
    index = resolve_device(spec, kind)
    info = device_info(index, kind)
    where = "system default: " if index is None else ""
    return (f"{where}{int(info['index'])} {info['name']!r} ({int(info[f'max_{kind}_channels'])} ch, "
            f"{int(info['default_samplerate'])} Hz)")
