"""Scaling-law fits recover known laws; the pick stays within its budget; budgets parse or fail in one line."""

from __future__ import annotations

import numpy as np
import pytest

from monoscope.errors import MonoscopeError
from monoscope.scaling import fit_lnk, fit_lnt, flops_per_token, parse_budget, pick_for_budget
from monoscope.scaling.fit import FitError

N = np.repeat([1152.0, 2304.0, 4608.0], 6)
T = np.tile(np.repeat([5e4, 1e5, 2e5], 2), 3)
K = np.tile(np.repeat([16.0, 32.0, 64.0], 2), 3)


def true_lnt(n: np.ndarray, t: np.ndarray) -> np.ndarray:
    return 0.05 + 30 * n ** -0.6 + 80 * t ** -0.5


def test_lnt_recovers_exact_law() -> None:
    f = fit_lnt(N, T, true_lnt(N, T), bootstrap=5)
    for name, want in {"E": 0.05, "A": 30.0, "alpha": 0.6, "B": 80.0, "beta": 0.5}.items():
        assert f.params[name] == pytest.approx(want, rel=1e-6), name
    assert f.rmse_log < 1e-9


def test_lnt_with_noise_golden() -> None:
    """1% multiplicative noise (seeded): the exponents land near the truth, inside their 90% intervals."""
    rng = np.random.default_rng(0)
    y = true_lnt(N, T) * np.exp(rng.normal(0, 0.01, len(N)))
    f = fit_lnt(N, T, y, bootstrap=40, seed=0)
    assert f.params["alpha"] == pytest.approx(GOLDEN_ALPHA, abs=1e-4)
    assert f.params["beta"] == pytest.approx(GOLDEN_BETA, abs=1e-4)
    iv = f.param_intervals()
    assert iv["alpha"][0] < 0.6 < iv["alpha"][1]
    assert iv["beta"][0] < 0.5 < iv["beta"][1]
    lo, hi = f.interval(4608, 4e5)
    assert lo < f.predict(4608, 4e5) < hi


GOLDEN_ALPHA = 0.56474
GOLDEN_BETA = 0.57990


def test_lnk_recovers_gao_law() -> None:
    p = {"a": 1.5, "b_k": -0.3, "b_n": -0.35, "g": 0.02, "z": -3.0, "e": 0.2}
    lk, ln = np.log(K), np.log(N)
    y = np.exp(p["a"] + p["b_k"] * lk + p["b_n"] * ln + p["g"] * lk * ln) + np.exp(p["z"] + p["e"] * lk)
    f = fit_lnk(N, K, y, bootstrap=5)
    for name, want in p.items():
        assert f.params[name] == pytest.approx(want, abs=1e-6), name


def test_fit_refuses_too_few_points() -> None:
    with pytest.raises(FitError, match=r"needs at least 3 distinct width and 3 distinct token count values \(got 2"):
        fit_lnt([1, 1, 1, 2, 2, 2], [1, 2, 3, 1, 2, 3], [0.5, 0.4, 0.3, 0.4, 0.3, 0.2])
    with pytest.raises(FitError, match=r"^fit: losses must be finite and > 0 to fit a power law "
                                       r"\(got \[0.0, 0.0, 0.0\]\): check the runs$"):
        fit_lnt(N, T, np.where(N[0] == N, 0.0, 0.3))


def test_pick_respects_budget_and_matches_brute_force() -> None:
    f = fit_lnt(N, T, true_lnt(N, T), bootstrap=10)
    d, k, batch = 576, 32, 1024

    def per_tok(n: np.ndarray) -> np.ndarray:
        return flops_per_token("topk", d, n, k)

    for budget in (1e12, 1e13, 1e14):
        pk = pick_for_budget(f, per_tok, budget, batch_size=batch, n_min=64, n_max=1 << 20)
        assert pk.cost <= budget
        assert pk.tokens == pk.steps * batch
        assert pk.interval[0] <= pk.predicted <= pk.interval[1]
        # brute force over integer widths on the same geometric grid: nothing affordable is better
        for n, t, loss in pk.curve:
            assert float(per_tok(np.array(n))) * t <= budget
            assert loss >= pk.predicted
    big = pick_for_budget(f, per_tok, 1e14, batch_size=batch, n_min=64, n_max=1 << 20)
    small = pick_for_budget(f, per_tok, 1e12, batch_size=batch, n_min=64, n_max=1 << 20)
    assert big.width > small.width and big.tokens > small.tokens  # both grow with compute


def test_pick_budget_too_small() -> None:
    f = fit_lnt(N, T, true_lnt(N, T), bootstrap=2)
    with pytest.raises(MonoscopeError, match=r"--budget 1e\+06 buys less than one batch of 1024 tokens at the "
                                             r"narrowest width 64"):
        pick_for_budget(f, lambda n: flops_per_token("topk", 576, n, 32), 1e6, batch_size=1024, n_min=64, n_max=4096)


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("3e15", "flops", 3e15), ("2.5PFLOP", "flops", 2.5e15), ("4e12flops", "flops", 4e12), ("90s", "seconds", 90),
    ("20m", "seconds", 1200), ("1.5h", "seconds", 5400), ("1h30m", "seconds", 5400), ("2min", "seconds", 120),
])
def test_budget_parses(text: str, kind: str, value: float) -> None:
    b = parse_budget(text)
    assert (b.kind, b.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize(("text", "msg"), [
    ("0", "--budget '0' must be a positive amount: give FLOPs (3e15, 2.5PFLOP) or a wall time (90s, 20m, 1.5h, 1h30m)"),
    ("0s", "--budget '0s' must be a positive amount"),
    ("-5m", "--budget '-5m' is neither FLOPs nor a duration"),
    ("lots", "--budget 'lots' is neither FLOPs nor a duration: give FLOPs (3e15, 2.5PFLOP) or a wall time"),
    ("inf", "--budget 'inf' is neither FLOPs nor a duration"),
    ("10m please", "--budget '10m please' is neither FLOPs nor a duration"),
])
def test_budget_errors(text: str, msg: str) -> None:
    with pytest.raises(MonoscopeError) as e:
        parse_budget(text)
    assert str(e.value).startswith(msg)
