"""Counts the user types (`--tokens 2M`, `--train-tokens 50k`): one parser below every stage."""

from __future__ import annotations

import math

from monoscope.errors import MonoscopeError

_SUFFIX = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}


def parse_count(text: str | int) -> int:
    """`1M`, `50k`, `2.5M`, `1e6` or a plain integer; `nan`, `inf` and the like are one-line errors."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    mult = _SUFFIX.get(s[-1:], 1)
    try:
        value = float(s[:-1] if mult != 1 else s)
    except ValueError:
        raise MonoscopeError(f"cannot read {text!r} as a count: use a number like 500000, 500k or 2M") from None
    if not math.isfinite(value):
        raise MonoscopeError(f"{text!r} is not a finite count: use a number like 500000, 500k or 2M")
    return int(value * mult)
