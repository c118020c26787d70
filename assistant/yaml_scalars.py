"""YAML scalars that Python cannot hold as their type, loaded as a value the config refuses
by key instead of an exception out of the parser (a traceback, exit 1: systemd restarts it).

PyYAML's constructors call int(), float() and datetime() on the text: int() raises past
Python's int-string conversion limit (4300 digits), a float past a double's range reads as
infinity, ``!!int abc``, ``!!bool maybe`` and a date such as 2001-13-45 raise. Each loads as
``Unreadable`` (its text, shortened, and why), which no setting accepts.
"""

from __future__ import annotations

import math
from typing import Any

import yaml


class Unreadable:
    """What such a scalar loads as: its text (shortened) and why it is not a value."""

    def __init__(self, what: str):
        self.what = what

    def __str__(self) -> str:
        return self.what

    __repr__ = __str__


# Far past any setting's range (and short enough to print): longer integers are not read.
_MAX_INT_DIGITS = 30


def _scalar(loader: yaml.SafeLoader, node) -> str:
    text = str(loader.construct_scalar(node))
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


def _construct_int(loader: yaml.SafeLoader, node) -> Any:
    digits = str(loader.construct_scalar(node)).lstrip("+-").replace("_", "")
    if len(digits) > _MAX_INT_DIGITS:
        return Unreadable(f"an integer {len(digits)} digits long")
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except (ValueError, TypeError, IndexError) as e:
        return Unreadable(f"{_scalar(loader, node)}, not an integer ({e})")


def _construct_float(loader: yaml.SafeLoader, node) -> Any:
    try:
        value = yaml.SafeLoader.construct_yaml_float(loader, node)
    except (ValueError, TypeError, IndexError) as e:
        return Unreadable(f"{_scalar(loader, node)}, not a number ({e})")
    if math.isinf(value) and "inf" not in str(loader.construct_scalar(node)).lower():
        return Unreadable(f"{_scalar(loader, node)}, a number too large to hold")
    return value


def _construct_guarded(construct):
    def guarded(loader: yaml.SafeLoader, node) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:
            return Unreadable(f"{_scalar(loader, node)}, which YAML cannot read as "
                              f"{node.tag.rsplit(':', 1)[-1]} ({type(e).__name__})")
    return guarded


def guard_scalars(loader: type) -> None:
    """Install the guarded constructors on a SafeLoader subclass."""
    loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
    loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
    for tag in ("bool", "timestamp"):
        loader.add_constructor(f"tag:yaml.org,2002:{tag}", _construct_guarded(
            yaml.SafeLoader.yaml_constructors[f"tag:yaml.org,2002:{tag}"]))
