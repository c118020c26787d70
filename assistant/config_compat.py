"""Keys and values of earlier releases' config.yaml, read as today's.

A config written for an earlier release keeps loading after an upgrade (a key is never taken
away): each renamed key or value is moved to its new place before validation, with one
warning line naming both, so the person can update the file at leisure. The loader keeps
the warnings on the Config (``Config.warnings``); the commands log them once at start and
`rkvlm-assistant check` lists them.

Renames, from git history (tests/config_releases/ holds a config of each earlier shape):

- persona.greeting, persona.goodbye, persona.cleared (until the per-language lines,
  persona.en.* / persona.zh.*): to the lines of the language the text is written in (Chinese
  characters: persona.zh, anything else: persona.en); an empty line (off) to both.
- logging.transcript (until the transcript section): a path -> transcript.path; null, which
  meant "no transcript" -> transcript.enabled: false (the transcript is on by default now,
  but a conversation is not written to disk where the person had not asked for it).
- llm.on_context_full: clear (until compaction) -> reset: forget the conversation and answer.

Behaviour kept (a section added later whose default would change what the device does):

- wake (until the wake word): a file without a wake: section answered every utterance;
  today's default (wake.mode auto) makes the installed service answer only after the wake
  word. Such a file reads as wake.mode none; the service logs one warning naming the key that
  turns the wake word on. The shipped config.yaml chooses auto in so many words.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")

# A mover: the old key's value -> [(new key path, value)], and the words that say how it was
# read.
Mover = Callable[[Any], tuple[list[tuple[str, Any]], str]]


@dataclass(frozen=True)
class Renamed:
    old: str           # dotted key path, as the earlier release spelled it
    move: Mover


def _persona_line(name: str) -> Renamed:
    def move(value: Any) -> tuple[list[tuple[str, Any]], str]:
        if value == "":
            return ([(f"persona.en.{name}", ""), (f"persona.zh.{name}", "")],
                    f"persona.en.{name} and persona.zh.{name} (an empty line is off in both "
                    f"languages)")
        lang = "zh" if isinstance(value, str) and _CJK.search(value) else "en"
        other = "en" if lang == "zh" else "zh"
        words = ("Chinese lines: the text is Chinese" if lang == "zh" else
                 "English lines: the text has no Chinese characters")
        return ([(f"persona.{lang}.{name}", value)],
                f"persona.{lang}.{name} ({words}; persona.{other}.{name} keeps its default)")
    return Renamed(f"persona.{name}", move)


def _transcript(value: Any) -> tuple[list[tuple[str, Any]], str]:
    if value is None:
        return ([("transcript.enabled", False)],
                "transcript.enabled: false (null wrote no transcript; set transcript.enabled: "
                "true for `rkvlm-assistant history`)")
    return [("transcript.path", value)], "transcript.path"


RENAMED: tuple[Renamed, ...] = (
    _persona_line("greeting"),
    _persona_line("goodbye"),
    _persona_line("cleared"),
    Renamed("logging.transcript", _transcript),
)

# Values an earlier release accepted for a key that still exists: (key, old value) -> new.
OLD_VALUES: dict[tuple[str, Any], tuple[Any, str]] = {
    ("llm.on_context_full", "clear"): (
        "reset", "reset (forget the conversation, say so, and answer)"),
}


def _service() -> bool:
    """The installed service (assistant.audio.wake.under_systemd, without its imports)."""
    return bool(os.environ.get("INVOCATION_ID")) and bool(os.environ.get("NOTIFY_SOCKET"))


# Sections whose absence means a file written before them: (section, what such a file
# meant, when keeping it differs from today's default, the warning's words). Only the
# section's absence counts: a wake: section without mode: is today's file, with today's
# default. The warning is given where the default would have changed what the device does
# (wake.mode auto is none for `ask`, the demo and a daemon run by hand).
KEPT_BEHAVIOUR: tuple[tuple[str, dict, Callable[[], bool], str], ...] = (
    ("wake", {"mode": "none"}, _service,
     "no wake: section (a config of a release before the wake word): the service answers "
     "every utterance, as before (read as wake.mode: none); set wake.mode: auto (or word) to "
     "answer only after the wake word \"Okay Nabu\" (wake.word), or write wake.mode: none to "
     "keep this and silence the warning"),
)


def _get(data: dict, path: str) -> tuple[bool, Any]:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _section(data: dict, parents: list[str], create: bool) -> dict | None:
    """The mapping at ``parents``, each one on the way replaced by a copy first, so the
    caller's data is never edited (copies only along the path: a file's aliases may share
    one mapping many times over). None when a section is missing or not a mapping."""
    node = data
    for part in parents:
        child = node.get(part)
        if child is None and create:
            child = {}
        if not isinstance(child, dict):
            return None
        node[part] = child = dict(child)
        node = child
    return node


def upgrade(data: dict, source: str) -> tuple[dict, list[str], dict[str, str]]:
    """An earlier release's keys and values moved to today's, in a copy of ``data``.

    Returns the upgraded data, one warning line per rename, and {new key: old key} so an
    error in a moved value can name the key the file really has."""
    data = dict(data)
    warnings: list[str] = []
    written_as: dict[str, str] = {}
    for r in RENAMED:
        present, value = _get(data, r.old)
        if not present:
            continue
        *parents, last = r.old.split(".")
        del _section(data, parents, create=False)[last]
        moves, how = r.move(value)
        taken = []
        for new, v in moves:
            *parents, last = new.split(".")
            section = _section(data, parents, create=True)
            # The new spelling wins over the old one; a section that is not a mapping is
            # left for validation to name.
            if section is not None and last not in section:
                section[last] = v
                taken.append(new)
                written_as[new] = r.old
        if len(taken) == len(moves):
            warnings.append(f"{source}: {r.old} is a key of an earlier release: read as {how}; "
                            f"rename it in the file")
        else:
            kept = ", ".join(new for new, _ in moves if new not in taken)
            warnings.append(f"{source}: {r.old} is a key of an earlier release, and the file "
                            f"also sets {kept}: {r.old} is ignored there; remove it")
    for (key, old), (new, how) in OLD_VALUES.items():
        present, value = _get(data, key)
        if present and isinstance(value, str) and value == old:
            *parents, last = key.split(".")
            _section(data, parents, create=False)[last] = new
            warnings.append(f"{source}: {key}: {old} is a value of an earlier release: read as "
                            f"{how}; write {new} in the file")
    for section, meant, differs, how in KEPT_BEHAVIOUR:
        if section not in data:
            data[section] = dict(meant)
            if differs():
                warnings.append(f"{source}: {how}")
    return data, warnings, written_as
