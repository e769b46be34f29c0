"""`--budget`: compute in FLOPs (`3e15`, `3e15flops`, `2.5PFLOP`) or wall time (`90s`, `20m`, `1.5h`, `1h30m`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from monoscope.errors import MonoscopeError

_FLOP_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15, "e": 1e18}
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_NUM = r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)"
_FLOPS_RE = re.compile(rf"^{_NUM}\s*(?:([kmgtpe]?)flops?)?$", re.IGNORECASE)
_TIME_PART = re.compile(rf"{_NUM}\s*(sec|min|s|m|h|d)", re.IGNORECASE)


class BudgetError(MonoscopeError):
    """A --budget that is not a positive FLOP count or duration."""


@dataclass(frozen=True)
class Budget:
    kind: Literal["flops", "seconds"]
    value: float
    text: str

    def describe(self) -> str:
        if self.kind == "flops":
            return f"{self.value:.3g} FLOPs"
        return f"{self.value:,.0f} s"


_FIX = "give FLOPs (3e15, 2.5PFLOP) or a wall time (90s, 20m, 1.5h, 1h30m)"


def parse_budget(text: str | float | int) -> Budget:
    """A Budget from `--budget` text; a bare number is FLOPs. Zero, negative, nan/inf or junk: one-line error."""
    if isinstance(text, bool):
        raise BudgetError(f"--budget {text!r}: {_FIX}")
    if isinstance(text, (int, float)):
        text = repr(text)
    s = str(text).strip().replace("_", "")
    m = _FLOPS_RE.match(s)
    if m:
        value = float(m.group(1)) * _FLOP_PREFIX[(m.group(2) or "").lower()]
        kind: Literal["flops", "seconds"] = "flops"
    else:
        parts = _TIME_PART.findall(s)
        if not parts or _TIME_PART.sub("", s).strip():
            raise BudgetError(f"--budget {text!r} is neither FLOPs nor a duration: {_FIX}")
        value = sum(float(num) * _TIME_UNITS[unit.lower()] for num, unit in parts)
        kind = "seconds"
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"--budget {text!r} must be a positive amount: {_FIX}")
    return Budget(kind, value, str(text))
