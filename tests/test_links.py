"""Every repository path and README anchor that the docs and the code name exists.

The docs (README.md, every other tracked .md, config.yaml): relative markdown links and their
anchors, and the paths they mention (`docs/page.png`, `README.md#board-notes`). The code: the
string literals under assistant/ (error messages, docstrings), where a message sends a person
to read something. A document the repository does not hold (DESIGN) counts as missing.

Anchors are GitHub's: a heading lower-cased, its punctuation dropped, spaces made hyphens, a
repeated heading numbered (-1, -2); headings inside fenced code are not headings.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if (ROOT / line).exists()]


FILES = tracked()
TOP_DIRS = sorted({f.split("/")[0] for f in FILES if "/" in f and not f.startswith(".")})
TOP_FILES = sorted(f for f in FILES if "/" not in f and not f.startswith("."))

# A path under one of the repository's folders (not part of a longer or absolute path).
_PATH = re.compile(r"(?<![\w./~$@-])((?:%s)/[\w./{},*-]*[\w}*])(#[\w-]+)?"
                   % "|".join(map(re.escape, TOP_DIRS)))
# A top-level file (README.md#anchor), or the design document that is not in the repository.
_NAMED = re.compile(r"(?<![\w./~$@-])(%s|DESIGN(?:\.md)?)(#[\w-]+)?(?![\w-])"
                    % "|".join(map(re.escape, TOP_FILES)))
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _outside_fences(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        lines.append("" if fenced else line)
    return lines


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a markdown text: its headings' slugs and explicit <a id/name>."""
    seen: dict[str, int] = {}
    out = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    for line in _outside_fences(text):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _expand(path: str) -> list[str]:
    """docs/{a,b}.png -> docs/a.png, docs/b.png (a brace names each file)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",")
            for q in _expand(path[:m.start()] + alt + path[m.end():])]


def _exists(path: Path) -> bool:
    rel = str(path)
    if "*" in rel:
        return any(path.parent.glob(path.name))
    return path.exists()


def _check_target(path: Path, anchor: str | None, where: str, shown: str) -> list[str]:
    if not _exists(path):
        return [f"{where}: {shown}: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
                f"does not exist"]
    if anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
        return [f"{where}: {shown}: no heading #{anchor} in {path.relative_to(ROOT)}"]
    return []


def mentions(text: str, where: str) -> list[str]:
    """Problems with the repository paths mentioned in text (relative to the repository)."""
    problems = []
    for rx in (_PATH, _NAMED):
        for m in rx.finditer(text):
            name, anchor = m.group(1), (m.group(2) or "")[1:] or None
            if name.startswith("DESIGN"):
                problems.append(f"{where}: {m.group(0)}: the design document is not in the "
                                f"repository; point to README.md#... instead")
                continue
            for one in _expand(name):
                problems += _check_target(ROOT / one, anchor, where, m.group(0))
    return problems


def doc_problems(path: Path, text: str) -> list[str]:
    """Broken links and mentions of one document (markdown, or config.yaml's comments)."""
    where = str(path.relative_to(ROOT))
    lines = _outside_fences(text) if path.suffix == ".md" else text.splitlines()
    body = "\n".join(lines)
    if path.suffix != ".md":
        return mentions(body, where)
    problems = mentions(_LINK.sub(" ", body), where)      # a link is checked as a link
    own = anchors(text)
    for m in _LINK.finditer(body):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):      # http:, mailto:
            continue
        file, _, anchor = target.partition("#")
        if not file:
            if anchor not in own:
                problems.append(f"{where}: ({target}): no heading #{anchor} here")
            continue
        problems += _check_target((path.parent / file.split("?")[0]).resolve(), anchor or None,
                                  where, f"({target})")
    return problems


def code_problems(path: Path, source: str) -> list[str]:
    """Mentions in the string literals of one Python file (messages, docstrings)."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            problems += mentions(node.value, f"{path.relative_to(ROOT)}:{node.lineno}")
    return problems


DOCS = [ROOT / f for f in FILES if (f.endswith(".md") and not f.startswith("tests/"))
        or f == "config.yaml"]
CODE = [ROOT / f for f in FILES if f.startswith("assistant/") and f.endswith(".py")]


# ------------------------------------------------------------------------- the checker itself

def test_the_checker_finds_each_kind_of_broken_reference():
    """Each broken kind is found, and the working spelling next to it is not: a checker that
    found nothing (or everything) would pass the repository test without meaning it."""
    readme = ROOT / "README.md"
    ok = ("## Board notes\nSee [Board notes](#board-notes), [the page](docs/page.png), "
          "README.md#board-notes, `bench/wake.py`, config.yaml and "
          "/etc/rkvlm-assistant/config.yaml.\n")
    assert doc_problems(readme, ok) == []
    for bad, found in [
        ("see docs/board.md for the runtime", "docs/board.md does not exist"),
        ("see README.md#no-such-section", "no heading #no-such-section in README.md"),
        ("[below](#nowhere)", "no heading #nowhere here"),
        ("![shot](docs/missing.png)", "docs/missing.png does not exist"),
        ("[notes](bench/wyoming_bench.md#no-such)", "no heading #no-such in bench/wyoming_bench.md"),
        ("before the VAD (DESIGN 2d)", "design document is not in the repository"),
    ]:
        problems = doc_problems(readme, ok + bad + "\n")
        assert len(problems) == 1 and found in problems[0], (bad, problems)
    # Inside fenced code a heading is no anchor, and a path is an example, not a reference.
    fenced = "```sh\n# not-a-heading\ncat docs/board.md\n```\n[x](#not-a-heading)\n"
    assert doc_problems(readme, fenced) == [f"README.md: (#not-a-heading): no heading "
                                            f"#not-a-heading here"]


def test_anchors_are_githubs():
    text = "# rkvlm-assistant\n## Listening only when addressed\n### Stable timings: pinning\n" \
           "## Tests\n## Tests\n## `wake.mode` and [links](x)\n"
    assert anchors(text) == {"rkvlm-assistant", "listening-only-when-addressed",
                             "stable-timings-pinning", "tests", "tests-1", "wakemode-and-links"}


def test_the_checker_reads_string_literals_of_the_code():
    path = ROOT / "assistant" / "example.py"
    src = ('"""Docstring (see DESIGN.md, 2c)."""\n'
           'def f(e):\n'
           '    raise ValueError(f"{e}: install it (see docs/board.md)")\n'
           'OK = "see README.md#board-notes"\n')
    problems = code_problems(path, src)
    assert len(problems) == 2, problems
    assert problems[0].startswith("assistant/example.py:1: DESIGN.md")
    assert problems[1].startswith("assistant/example.py:3: docs/board.md: docs/board.md does not")


# ------------------------------------------------------------------------- the repository

@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_path_in_the_docs_exists(path):
    assert doc_problems(path, path.read_text(encoding="utf-8")) == []


def test_every_path_and_anchor_the_code_names_exists():
    assert CODE, "no code found"
    problems = [p for path in CODE for p in code_problems(path, path.read_text(encoding="utf-8"))]
    assert problems == []
