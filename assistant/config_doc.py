"""Render the default configuration as commented YAML, from the same field docs the loader
uses for its error messages, so config.yaml and the code cannot drift apart."""

from __future__ import annotations

import dataclasses
import textwrap

import yaml

from assistant.config import Config

_HEADER = """\
# rkvlm-assistant configuration.
# Every key is optional: a missing key takes the default shown here. Relative paths are
# relative to this file's folder. Check a change with: rkvlm-assistant check --config FILE
"""


def _scalar(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, allow_unicode=True, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _render(obj, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        doc = f.metadata.get("doc", "")
        for line in textwrap.wrap(doc, width=96 - len(pad)):
            out.append(f"{pad}# {line}")
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.append(f"{pad}{f.name}:")
            _render(value, indent + 1, out)
        elif isinstance(value, tuple) and value:
            out.append(f"{pad}{f.name}:")
            for item in value:
                out.append(f"{pad}  - {_scalar(item)}")
        else:
            out.append(f"{pad}{f.name}: {_scalar(value)}")
        if indent == 0:
            out.append("")


def default_yaml() -> str:
    out = [_HEADER]
    _render(Config(), 0, out)
    return "\n".join(out).rstrip() + "\n"
