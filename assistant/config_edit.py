"""Set keys in a YAML config file and leave every other byte of it alone.

A person's config carries comments, long lines, ``null``, their own list indentation and
quoting; a YAML dump, however careful, rewrites some of it. So a key is set where it stands:
its value is replaced on its own line (the quote style and a trailing comment's column are
kept), a missing key is added after the last line of its section, a missing section at the
end of the file. The result must mean exactly the old file with the keys set; when it does
not (a block scalar, a flow mapping ``{...}``, an anchor), the file goes through a ruamel.yaml
round trip instead, set up to change as little as it can.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

# The key (plain or quoted) and its colon, from the key's column.
_KEY = re.compile(r"""(?:"(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^:#\s][^:#]*?)\s*:""")


class _Unsupported(Exception):
    """This file's shape around the key is not one the line editor handles."""


def target(path: str | os.PathLike) -> Path:
    """The file an edit of ``path`` replaces: a link followed to its end (the file it names
    is replaced, with that file's owner and mode; the link stays a link pointing at it)."""
    return Path(os.path.realpath(path))


def edit(text: str, keys: dict[str, Any]) -> str:
    """``text`` with the dotted ``keys`` set. YAML errors propagate (ruamel's)."""
    want = _with_keys(plain(text), keys)
    try:
        out = text
        for dotted, value in keys.items():
            out = _set(out, dotted.split("."), value)
        if plain(out) == want:
            return out
    except _Unsupported:
        pass
    return _round_trip(text, keys)


# --------------------------------------------------------------------------- meaning

def plain(text: str) -> dict:
    """What the text means (a safe load; an empty file is an empty mapping)."""
    from ruamel.yaml import YAML

    data = YAML(typ="safe", pure=True).load(text) if text.strip() else None
    return data if data is not None else {}


def _with_keys(data: Any, keys: dict[str, Any]) -> dict:
    import copy

    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    for dotted, value in keys.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def scalar(value: Any, quote: Optional[str] = None) -> str:
    """A YAML scalar for value; strings keep a given quote style, else plain when that
    reads back as the same string."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if quote == "'":
        return "'" + text.replace("'", "''") + "'"
    if quote != '"' and "\n" not in text and text == text.strip() and text:
        try:
            if plain(f"k: {text}\n") == {"k": text}:
                return text
        except Exception:  # not valid plain: quote it
            pass
    return json.dumps(text, ensure_ascii=False)


# --------------------------------------------------------------------------- the line editor

def _set(text: str, parts: list[str], value: Any) -> str:
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    data = YAML().load(text) if text.strip() else None
    if data is None:
        data = CommentedMap()
    if not isinstance(data, CommentedMap) or data.fa.flow_style():
        raise _Unsupported
    lines = text.splitlines(keepends=True)
    node, parent = data, (-1, -1)            # (line, column) of the section's key
    for i, part in enumerate(parts):
        if part not in node:
            return _insert(text, lines, node, parent, parts[i:], value)
        child = node[part]
        if i == len(parts) - 1:
            if isinstance(child, (dict, list)):
                raise _Unsupported
            return _replace(lines, *node.lc.key(part), value)
        if not isinstance(child, CommentedMap) or child.fa.flow_style():
            raise _Unsupported
        parent = node.lc.key(part)
        node = child
    raise _Unsupported  # pragma: no cover (the loop returns)


def _replace(lines: list[str], line_no: int, col: int, value: Any) -> str:
    line = lines[line_no]
    m = _KEY.match(line, col)
    if not m:
        raise _Unsupported
    start = m.end()
    body = line[start:].rstrip("\r\n")
    eol = line[len(line[:start]) + len(body):]
    lead = body[: len(body) - len(body.lstrip(" \t"))]
    rest = body[len(lead):]
    if rest[:1] in ("|", ">", "&", "*", "!", "{", "["):
        raise _Unsupported
    quote = rest[:1] if rest[:1] in ("'", '"') else None
    if quote:
        end = _closing(rest, quote)
    else:
        hit = re.search(r"\s#", rest)
        end = hit.start() if hit else len(rest.rstrip())
        if rest.startswith("#"):
            end = 0                          # `key:  # comment`: an empty (null) value
    old, comment = rest[:end], rest[end:]
    new = scalar(value, quote)
    if comment.strip():
        # Keep the comment where it was when the new value leaves room for it.
        gap = comment[: len(comment) - len(comment.lstrip())]
        comment = " " * max(1, len(old) + len(gap) - len(new)) + comment.lstrip()
    lines[line_no] = line[:start] + (lead or " ") + new + comment + eol
    return "".join(lines)


def _closing(text: str, quote: str) -> int:
    i = 1
    while i < len(text):
        if quote == '"' and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if quote == "'" and text[i + 1: i + 2] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    raise _Unsupported                         # a quoted scalar running on to the next line


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _insert(text: str, lines: list[str], node, parent: tuple[int, int], parts: list[str],
            value: Any) -> str:
    """Add parts (the first missing key and below) at the end of the section at parent."""
    nl = "\r\n" if "\r\n" in text else "\n"
    step = _step(lines)
    if len(node):
        col = node.lc.key(next(iter(node)))[1]
    else:
        col = parent[1] + step if parent[0] >= 0 else 0
    last = parent[0]
    for j in range(parent[0] + 1, len(lines)):
        stripped = lines[j].strip()
        if not stripped or stripped.startswith("#"):
            continue
        if _indent_of(lines[j]) <= parent[1] and not (
                _indent_of(lines[j]) == parent[1] and stripped.startswith("- ")):
            break
        last = j
    new = []
    for depth, part in enumerate(parts):
        pad = " " * (col + depth * step)
        if depth == len(parts) - 1:
            new.append(f"{pad}{scalar(part)}: {scalar(value)}{nl}")
        else:
            new.append(f"{pad}{scalar(part)}:{nl}")
    if last >= 0 and not lines[last].endswith(("\n", "\r")):
        lines[last] += nl
    lines[last + 1:last + 1] = new
    return "".join(lines)


def _step(lines: list[str]) -> int:
    """The file's indentation step: the smallest indentation of a key line, else 2."""
    found = [_indent_of(l) for l in lines
             if l.strip() and not l.strip().startswith(("#", "- ")) and _indent_of(l) > 0]
    return min(found) if found else 2


# --------------------------------------------------------------------------- the fallback

def _dash_offset(lines: list[str]) -> int:
    """How far the file's list dashes sit right of their key (0: under its first letter)."""
    for above, line in zip(lines, lines[1:]):
        if line.lstrip().startswith("- ") and above.rstrip().endswith(":"):
            return max(0, _indent_of(line) - _indent_of(above))
    return 2

def _round_trip(text: str, keys: dict[str, Any]) -> str:
    """A ruamel.yaml round trip: no line wrapping, the file's own indentation, quotes kept,
    ``null`` written as such."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 1 << 30
    lines = text.splitlines()
    dash = _dash_offset(lines)
    yaml.indent(mapping=_step(lines), sequence=dash + 2, offset=dash)
    yaml.representer.add_representer(
        type(None), lambda r, d: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = yaml.load(text) if text.strip() else None
    if data is None:
        data = CommentedMap()
    if not isinstance(data, dict):
        raise ValueError("expected a mapping of sections at the top")
    for dotted, value in keys.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = CommentedMap()
            node = node[part]
        node[parts[-1]] = value
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()
