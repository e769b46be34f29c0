"""Counts the user types (`--tokens 2M`, `--train-tokens 50k`): one parser below every stage."""

from __future__ import annotations

import math

from monoscope.errors import MonoscopeError

_SUFFIX = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}


def parse_count(text: str | int, flag: str | None = None) -> int:
    """`1M`, `50k`, `2.5M`, `1e6` or a plain integer; `nan`, `inf` and the like are one-line errors that
    name `flag` (the CLI option the value came from) when given."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    mult = _SUFFIX.get(s[-1:], 1)
    name = f"{flag} {text}" if flag else repr(text)
    try:
        value = float(s[:-1] if mult != 1 else s)
    except ValueError:
        raise MonoscopeError(f"cannot read {name} as a count: use a number like 500000, 500k or 2M") from None
    if not math.isfinite(value):
        raise MonoscopeError(f"{name} is not a finite count: use a number like 500000, 500k or 2M")
    return int(value * mult)
