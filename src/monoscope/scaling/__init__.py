"""Scaling laws: sweep small SAEs, fit L(n, T) (and TopK's L(n, k)), pick width and steps for a budget.

    from monoscope.scaling import sweep
    res = sweep("runs/x/acts", "20m", "runs/x/sweep")       # or a FLOP budget: "3e15"
    res.pick.width, res.pick.steps, res.pick.predicted, res.pick.interval

Modules: `budget` (FLOPs or wall time), `cost` (FLOPs per token, seconds per token measured here),
`fit` (the laws, bootstrap intervals, the pick), `sweep` (the grid, held-out split, resume),
`plots` (frontier.png), `memory` (memory and time model of large runs, docs/scale.md), `cli`.
"""

from monoscope.scaling.budget import Budget, BudgetError, parse_budget
from monoscope.scaling.cost import CostModel, calibrate, flops_per_token
from monoscope.scaling.fit import FitError, LawFit, Pick, fit_lnk, fit_lnt, pick_for_budget
from monoscope.scaling.sweep import GridPoint, SweepConfig, SweepError, SweepResult, grid_points, sweep

__all__ = [
    "Budget",
    "BudgetError",
    "CostModel",
    "FitError",
    "GridPoint",
    "LawFit",
    "Pick",
    "SweepConfig",
    "SweepError",
    "SweepResult",
    "calibrate",
    "fit_lnk",
    "fit_lnt",
    "flops_per_token",
    "grid_points",
    "parse_budget",
    "pick_for_budget",
    "sweep",
]
