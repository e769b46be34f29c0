"""Learning-rate and sparsity-coefficient schedules: pure functions of the step.

Being functions of the step (not objects with state) is what makes resume exact without saving
them: a resumed run at step s computes the same λ and learning rate as an uninterrupted one.

    lr(s) = lr · min(1, (s + 1) / (warm · S), (S − s) / (decay_frac · S))   linear warm-up, decay to 0
    λ(s)  = λ · min(1, (s + 1) / (warmup_frac · S))         linear warm-up over the first 5%
"""

from __future__ import annotations

from typing import NamedTuple


class Schedule(NamedTuple):
    """Values for one step."""

    lr: float
    sparsity_coef: float


def lr_at(step: int, total_steps: int, lr: float, decay_frac: float, warmup_frac: float = 0.0) -> float:
    """Learning rate for `step` (0-based) of `total_steps`: linear warm-up, constant, linear to 0."""
    lr = warmup_at(step, total_steps, lr, warmup_frac)
    decay_steps = decay_frac * total_steps
    if decay_steps <= 0:
        return lr
    return lr * max(0.0, min(1.0, (total_steps - step) / decay_steps))


def warmup_at(step: int, total_steps: int, value: float, warmup_frac: float) -> float:
    """`value` ramped linearly from value/warm-up-steps at step 0 to `value` at the end of the warm-up."""
    warm = warmup_frac * total_steps
    if warm <= 0:
        return value
    return value * min(1.0, (step + 1) / warm)


def schedule_at(step: int, total_steps: int, lr: float, decay_frac: float, sparsity_coef: float,
                warmup_frac: float, lr_warmup_frac: float = 0.0) -> Schedule:
    return Schedule(lr_at(step, total_steps, lr, decay_frac, lr_warmup_frac),
                    warmup_at(step, total_steps, sparsity_coef, warmup_frac))
