"""Scaling-law fits with bootstrap intervals, and the pick of width and steps for a budget.

Two laws, both fitted by least squares on log loss (relative errors: a 0.3 and a 0.03 FVU count
alike), several starts, `scipy.optimize.least_squares`:

    L(n, T) = E + A n^-alpha + B T^-beta          n features, T training tokens (Scaling Monosemanticity's
                                                 sweep, Hoffmann et al.'s form)
    L(n, k) = exp(a + b_k log k + b_n log n + g log k log n) + exp(z + e log k)
                                                 TopK at a fixed token count (Gao et al. 2024, eq. 2)

Intervals come from a residual bootstrap: refit on fitted values times resampled multiplicative
residuals, `bootstrap` times; an interval is the 5th-95th percentile of those refits (90%).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from monoscope.errors import MonoscopeError

LNT_PARAMS = ("E", "A", "alpha", "B", "beta")
LNK_PARAMS = ("a", "b_k", "b_n", "g", "z", "e")
INTERVAL = (5.0, 95.0)
"""Percentiles of the bootstrap refits that bound every interval (a 90% interval)."""


class FitError(MonoscopeError):
    """The points cannot determine the law (too few, non-positive losses, or no fit converged)."""


@dataclass
class LawFit:
    """A fitted law: best parameters, bootstrap samples of them, and how well it fits."""

    form: str
    """'L(n,T)' or 'L(n,k)'."""
    params: dict[str, float]
    samples: np.ndarray
    """[bootstrap, params] refits on resampled residuals (rows in `names` order)."""
    names: tuple[str, ...]
    rmse_log: float
    """Root mean square of log(measured) - log(predicted) over the fitted points."""
    n_points: int
    notes: list[str] = field(default_factory=list)

    def predict(self, x1: np.ndarray | float, x2: np.ndarray | float) -> np.ndarray:
        """The law at (n, T) or (n, k) with the best parameters."""
        vec = np.array([self.params[k] for k in self.names])
        return _MODELS[self.form](vec, np.asarray(x1, float), np.asarray(x2, float))

    def predict_samples(self, x1: np.ndarray | float, x2: np.ndarray | float) -> np.ndarray:
        """[bootstrap, ...] the law under every bootstrap refit."""
        f = _MODELS[self.form]
        return np.stack([f(s, np.asarray(x1, float), np.asarray(x2, float)) for s in self.samples])

    def interval(self, x1: float, x2: float) -> tuple[float, float]:
        """90% bootstrap interval of the prediction at one point."""
        p = self.predict_samples(x1, x2)
        lo, hi = np.percentile(p, INTERVAL)
        return float(lo), float(hi)

    def param_intervals(self) -> dict[str, tuple[float, float]]:
        lo, hi = np.percentile(self.samples, INTERVAL, axis=0)
        return {k: (float(a), float(b)) for k, a, b in zip(self.names, lo, hi, strict=True)}

    def to_dict(self) -> dict[str, Any]:
        return {"form": self.form, "params": self.params,
                "intervals_90": {k: list(v) for k, v in self.param_intervals().items()},
                "bootstrap": len(self.samples), "rmse_log": self.rmse_log, "points": self.n_points,
                "notes": self.notes}


# ----------------------------------------------------------------------------- the laws


def _lnt(p: np.ndarray, n: np.ndarray, t: np.ndarray) -> np.ndarray:
    e, a, alpha, b, beta = p
    return e + a * n ** -alpha + b * t ** -beta


def _lnk(p: np.ndarray, n: np.ndarray, k: np.ndarray) -> np.ndarray:
    a, bk, bn, g, z, e = p
    lk, ln = np.log(k), np.log(n)
    return np.exp(a + bk * lk + bn * ln + g * lk * ln) + np.exp(z + e * lk)


_MODELS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {"L(n,T)": _lnt, "L(n,k)": _lnk}


# ----------------------------------------------------------------------------- fitting


def _check_points(x1: np.ndarray, x2: np.ndarray, loss: np.ndarray, n_params: int, names: tuple[str, str]) -> None:
    if not (len(x1) == len(x2) == len(loss)):
        raise FitError(f"fit: {len(x1)} {names[0]} values, {len(x2)} {names[1]} values and {len(loss)} losses")
    if not np.all(np.isfinite(loss)) or np.any(loss <= 0):
        bad = [float(v) for v in loss if not (math.isfinite(v) and v > 0)][:3]
        raise FitError(f"fit: losses must be finite and > 0 to fit a power law (got {bad}): check the runs")
    if np.any(x1 <= 0) or np.any(x2 <= 0):
        raise FitError(f"fit: {names[0]} and {names[1]} must be > 0")
    distinct = len(set(zip(x1.tolist(), x2.tolist(), strict=True)))
    if distinct < n_params:
        raise FitError(f"fit: {distinct} distinct ({names[0]}, {names[1]}) points cannot determine {n_params} "
                       f"parameters: use at least 3 values of each")
    if len(set(x1.tolist())) < 3 or len(set(x2.tolist())) < 3:
        raise FitError(f"fit: needs at least 3 distinct {names[0]} and 3 distinct {names[1]} values "
                       f"(got {len(set(x1.tolist()))} and {len(set(x2.tolist()))})")


def _solve(resid: Callable[[np.ndarray, np.ndarray], np.ndarray], starts: list[np.ndarray], y: np.ndarray,
           lo: np.ndarray, hi: np.ndarray, max_nfev: int = 400) -> np.ndarray | None:
    best, best_cost = None, math.inf
    for s in starts:
        try:
            r = least_squares(resid, np.clip(s, lo + 1e-9, hi - 1e-9), args=(y,), bounds=(lo, hi), method="trf",
                              x_scale="jac", max_nfev=max_nfev, xtol=1e-10, ftol=1e-10, gtol=1e-10)
        except (ValueError, FloatingPointError):
            continue
        if np.isfinite(r.cost) and r.cost < best_cost:
            best, best_cost = r.x, r.cost
    return best


def _bootstrap(resid_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], best: np.ndarray, log_y: np.ndarray,
               lo: np.ndarray, hi: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Residual bootstrap on log loss: refit log f + resampled residuals, from the best fit."""
    fitted = log_y + resid_fn(best, log_y)  # resid = log f - log y  ->  log f
    res = log_y - fitted
    res = res - res.mean()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        y_b = fitted + rng.choice(res, size=len(res), replace=True)
        sol = _solve(resid_fn, [best], y_b, lo, hi, max_nfev=60)
        if sol is not None:
            out.append(sol)
    return np.array(out) if out else best[None, :]


def _profile_start(nn: np.ndarray, tt: np.ndarray, y: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Start for L(n,T): on a grid of (alpha, beta) the law is linear in (E, A, B); solve each by non-negative
    least squares on relative error and keep the best (a variable-projection search: no local minima in E, A, B)."""
    from scipy.optimize import nnls

    w = 1.0 / y
    best, best_r = None, math.inf
    exps = np.geomspace(0.02, 3.0, 36)
    for al in exps:
        na = nn ** -al
        for be in exps:
            m = np.stack([np.ones_like(y), na, tt ** -be], axis=1) * w[:, None]
            coef, r = nnls(m, np.ones_like(y))
            if r < best_r:
                best, best_r = (coef, al, be), r
    assert best is not None
    (e, a, b), al, be = best
    floor = float(np.exp(lo[0])) * 10
    return np.array([np.log(max(e, floor)), np.log(max(a, floor)), al, np.log(max(b, floor)), be])


def fit_lnt(n: Any, tokens: Any, loss: Any, *, bootstrap: int = 200, seed: int = 0) -> LawFit:
    """Fit L(n, T) = E + A n^-alpha + B T^-beta to measured losses (module docstring)."""
    n, t, y = (np.asarray(v, dtype=float) for v in (n, tokens, loss))
    _check_points(n, t, y, 5, ("width", "token count"))
    n0, t0 = float(np.exp(np.log(n).mean())), float(np.exp(np.log(t).mean()))
    nn, tt = n / n0, t / t0
    log_y = np.log(y)

    # θ = (log E, log A', alpha, log B', beta) with A' = A n0^-alpha, B' = B t0^-beta (well conditioned)
    def model(th: np.ndarray) -> np.ndarray:
        return np.exp(th[0]) + np.exp(th[1]) * nn ** -th[2] + np.exp(th[3]) * tt ** -th[4]

    def resid(th: np.ndarray, ly: np.ndarray) -> np.ndarray:
        return np.log(model(th)) - ly

    floor = float(np.log(y.min())) - 14  # E, A', B' >= 1e-6 of the smallest loss: 0 in all but name
    lo = np.array([floor, floor, 1e-3, floor, 1e-3])
    hi = np.array([float(np.log(y.max())) + 1, 10.0, 4.0, 10.0, 4.0])
    starts = [_profile_start(nn, tt, y, lo)]
    best = _solve(resid, starts, log_y, lo, hi)
    if best is None:
        raise FitError("fit: no start of L(n,T) converged on these losses")
    boot = _bootstrap(resid, best, log_y, lo, hi, bootstrap, seed)

    def to_params(th: np.ndarray) -> np.ndarray:
        return np.array([np.exp(th[0]), np.exp(th[1]) * n0 ** th[2], th[2], np.exp(th[3]) * t0 ** th[4], th[4]])

    params = to_params(best)
    rmse = float(np.sqrt(np.mean(resid(best, log_y) ** 2)))
    notes = []
    for name, i in (("alpha", 2), ("beta", 4)):
        if best[i] <= lo[i] * 1.01 or best[i] >= hi[i] * 0.99:
            notes.append(f"{name} is at the edge of its range [{lo[i]}, {hi[i]}]: the grid does not pin it down")
    return LawFit("L(n,T)", dict(zip(LNT_PARAMS, map(float, params), strict=True)),
                  np.array([to_params(s) for s in boot]), LNT_PARAMS, rmse, len(y), notes)


def fit_lnk(n: Any, k: Any, loss: Any, *, bootstrap: int = 200, seed: int = 0) -> LawFit:
    """Fit Gao et al.'s L(n, k) (module docstring) to TopK losses at one token count."""
    n, kk, y = (np.asarray(v, dtype=float) for v in (n, k, loss))
    _check_points(n, kk, y, 6, ("width", "k"))
    ln, lk, log_y = np.log(n), np.log(kk), np.log(y)
    mn, mk = float(ln.mean()), float(lk.mean())
    cn, ck = ln - mn, lk - mk  # centred logs: the same law, better conditioned

    # θ = (a', b_k', b_n', g, z', e') in centred logs; converted back to Gao's parameterisation below
    def model(th: np.ndarray) -> np.ndarray:
        return np.exp(th[0] + th[1] * ck + th[2] * cn + th[3] * ck * cn) + np.exp(th[4] + th[5] * ck)

    def resid(th: np.ndarray, ly: np.ndarray) -> np.ndarray:
        return np.log(model(th)) - ly

    lo = np.array([-30.0, -5.0, -5.0, -5.0, -30.0, -5.0])
    hi = np.array([5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    # starts: the first term alone by linear least squares on log(y - floor), for two floors exp(z')
    design = np.stack([np.ones_like(cn), ck, cn, ck * cn], axis=1)
    starts = []
    for frac in (0.1, 0.6):
        floor = frac * float(y.min())
        coef = np.linalg.lstsq(design, np.log(y - floor), rcond=None)[0]
        starts.append(np.clip(np.array([*coef, np.log(floor), 0.0]), lo + 1e-6, hi - 1e-6))
    best = _solve(resid, starts, log_y, lo, hi)
    if best is None:
        raise FitError("fit: no start of L(n,k) converged on these losses")
    boot = _bootstrap(resid, best, log_y, lo, hi, bootstrap, seed)

    def to_params(th: np.ndarray) -> np.ndarray:
        a, bk, bn, g, z, e = th
        # a + bk (lk-mk) + bn (ln-mn) + g (lk-mk)(ln-mn), expanded in lk, ln
        return np.array([a - bk * mk - bn * mn + g * mk * mn, bk - g * mn, bn - g * mk, g, z - e * mk, e])

    return LawFit("L(n,k)", dict(zip(LNK_PARAMS, map(float, to_params(best)), strict=True)),
                  np.array([to_params(s) for s in boot]), LNK_PARAMS,
                  float(np.sqrt(np.mean(resid(best, log_y) ** 2))), len(y))


# ----------------------------------------------------------------------------- the pick


@dataclass
class Pick:
    """Width and steps that minimise the fitted L(n, T) at a budget, with a 90% interval."""

    width: int
    tokens: int
    steps: int
    predicted: float
    interval: tuple[float, float]
    width_interval: tuple[int, int]
    """5th-95th percentile of the best width under the bootstrap refits."""
    cost: float
    """The pick's cost in the budget's unit (FLOPs or seconds): never above the budget."""
    curve: list[tuple[int, int, float]] = field(default_factory=list)
    """(width, tokens, predicted loss) along the budget: the iso-budget curve the pick minimises."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width, "tokens": self.tokens, "steps": self.steps, "predicted": self.predicted,
                "interval_90": list(self.interval), "width_interval_90": list(self.width_interval),
                "cost": self.cost, "notes": self.notes}


def pick_for_budget(law: LawFit, cost_per_token: Callable[[np.ndarray], np.ndarray], budget: float, *,
                    batch_size: int, n_min: int, n_max: int, points: int = 241) -> Pick:
    """Minimise L(n, T) subject to T·cost_per_token(n) <= budget, T a whole number of batches.

    n is searched on a geometric grid over [n_min, n_max] (integers); T is the most whole batches the
    budget buys at that width. Raises when not even one batch of the narrowest width fits."""
    ns = np.unique(np.round(np.geomspace(n_min, n_max, points)).astype(np.int64))
    per_tok = cost_per_token(ns.astype(float))
    steps = np.floor(budget / (per_tok * batch_size) + 1e-9).astype(np.int64)
    ok = steps >= 1
    if not ok.any():
        cheapest = float(per_tok.min() * batch_size)
        raise MonoscopeError(f"--budget {budget:.4g} buys less than one batch of {batch_size} tokens at the narrowest "
                             f"width {int(ns[0])} (which costs {cheapest:.4g}): raise --budget")
    ns, steps, per_tok = ns[ok], steps[ok], per_tok[ok]
    tokens = steps * batch_size
    pred = law.predict(ns, tokens)
    i = int(np.argmin(pred))
    samples = law.predict_samples(ns, tokens)  # [boot, len(ns)]
    lo, hi = np.percentile(samples[:, i], INTERVAL)
    best_ns = ns[np.argmin(samples, axis=1)]
    wlo, whi = np.percentile(best_ns, INTERVAL)
    notes = []
    if i == 0 or i == len(ns) - 1:
        notes.append(f"the best width is at the edge of the searched range [{int(ns[0])}, {int(ns[-1])}]: "
                     "the law has no interior optimum at this budget (extrapolating)")
    return Pick(int(ns[i]), int(tokens[i]), int(steps[i]), float(pred[i]), (float(lo), float(hi)),
                (round(wlo), round(whi)), float(tokens[i] * per_tok[i]),
                [(int(a), int(b), float(c)) for a, b, c in zip(ns, tokens, pred, strict=True)], notes)
