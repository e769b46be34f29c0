"""Feature edits: what `steer` changes at the SAE's hook, parsed and checked before any forward.

An `Edit` names a feature, a mode and a strength:

- `clamp`  set the feature's code to `value` (the paper's intervention);
- `add`    add `value` to the code, i.e. `value` x the feature's decoder direction;
- `scale`  multiply the code by `value`;
- `ablate` clamp to 0 (`value` ignored).

`value` is raw code units (a float, negative allowed) or a multiple of the feature's maximum
activation in the features database, written `"10x"` (or `"-2.5x"`). Codes live in the SAE's scaled
space (what `sae.encode_raw` returns, what the database's max_act records), so `10x` means ten times
the strongest activation seen on the corpus. An optional `when=(feature, threshold)` applies the
edit only at rows where that other feature's clean code exceeds the threshold (conditional steering).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from monoscope.errors import MonoscopeError

Mode = Literal["clamp", "add", "scale", "ablate"]
MODES: tuple[Mode, ...] = ("clamp", "add", "scale", "ablate")
WHERE = ("all", "prompt", "generated")


class SteerError(MonoscopeError):
    """An edit, a strength or a steering target that cannot be used."""


@dataclass(frozen=True)
class Edit:
    """One feature edit (module docstring). `direction` replaces the feature by a free raw-space
    direction whose code is always 0 (the random-direction control): clamp and add then add
    value x direction; scale and ablate change nothing."""

    feature: int
    mode: Mode = "clamp"
    value: float | str = 0.0
    when: tuple[int, float] | None = None
    direction: Tensor | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"feature": self.feature, "mode": self.mode, "value": self.value}
        if self.when is not None:
            d["when"] = {"feature": self.when[0], "above": self.when[1]}
        if self.direction is not None:
            d["direction_norm"] = float(self.direction.float().norm())
        return d


def parse_strength(text: str | float, *, what: str = "strength") -> float | str:
    """`"10x"` stays a multiple (resolved against the database later); anything else must be a finite
    float. NaN and inf are refused here, so no forward ever sees them."""
    if isinstance(text, (int, float)):
        v = float(text)
        s = str(text)
    else:
        s = str(text).strip()
        num = s[:-1] if s.lower().endswith("x") else s
        try:
            v = float(num)
        except ValueError:
            raise SteerError(f"{what} {text!r} is not a number: pass e.g. 4.5, -2 or 10x "
                             "(a multiple of the feature's max activation)") from None
    if not math.isfinite(v):
        raise SteerError(f"{what} {text!r} is not finite: pass a finite number such as 10x or -3")
    if isinstance(text, str) and s.lower().endswith("x"):
        return f"{v:g}x"
    return v


def parse_features(text: str) -> list[int]:
    """`"12,40"` -> [12, 40]; a clear error for anything that is not a list of integers."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.lstrip("-").isdigit():
            raise SteerError(f"--feature {text!r}: {part!r} is not a feature id; pass ids like 12 or 12,40")
        out.append(int(part))
    if not out:
        raise SteerError("--feature is empty: pass ids like 12 or 12,40")
    return out


@dataclass(frozen=True)
class ResolvedEdit:
    """An edit with its strength in raw code units (what the hook applies)."""

    feature: int
    mode: Mode
    value: float
    when: tuple[int, float] | None
    direction: Tensor | None = field(default=None, compare=False, repr=False)
    spec: dict[str, Any] = field(default_factory=dict, compare=False)


def resolve_edits(edits: Sequence[Edit], d_sae: int, max_act: Callable[[int], float | None] | None = None
                  ) -> list[ResolvedEdit]:
    """Check every edit against an SAE of `d_sae` features and turn `"Nx"` into raw units with
    `max_act(feature)` (the features database's max activation)."""
    if not edits:
        raise SteerError("no edits given: pass at least one --feature with --clamp, --add, --scale or --ablate")
    out = []
    for e in edits:
        if e.mode not in MODES:
            raise SteerError(f"unknown edit mode {e.mode!r}: use one of {', '.join(MODES)}")
        if e.direction is None and not 0 <= e.feature < d_sae:
            raise SteerError(f"feature {e.feature} is out of range: this SAE has features 0..{d_sae - 1}")
        if e.when is not None:
            g, thr = e.when
            if not 0 <= int(g) < d_sae:
                raise SteerError(f"condition feature {g} is out of range: this SAE has features 0..{d_sae - 1}")
            if not math.isfinite(float(thr)):
                raise SteerError(f"condition threshold {thr!r} is not finite: pass a number such as 0 or 1.5")
        value = 0.0 if e.mode == "ablate" else parse_strength(e.value)
        if isinstance(value, str):  # a multiple of the max activation
            if e.mode == "scale":
                raise SteerError(f"--scale {value}: a scale is a plain factor (e.g. 3 or -1), not a multiple of "
                                 "the max activation")
            m = max_act(e.feature) if max_act is not None and e.direction is None else None
            if m is None or not math.isfinite(m):
                raise SteerError(f"strength {value} needs feature {e.feature}'s max activation from the features "
                                 "database: build it with monoscope features SAE_DIR, or pass a raw value")
            value = float(value[:-1]) * float(m)
        out.append(ResolvedEdit(e.feature, e.mode, float(value), (int(e.when[0]), float(e.when[1]))
                                if e.when is not None else None, e.direction, e.to_dict()))
    return out
