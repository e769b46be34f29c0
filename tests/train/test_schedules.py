from __future__ import annotations

import itertools

from monoscope.train.schedules import lr_at, warmup_at


def test_lr_is_constant_then_decays_linearly_to_zero() -> None:
    total, lr = 1000, 1e-3
    values = [lr_at(s, total, lr, 0.2) for s in range(total + 1)]
    assert all(v == lr for v in values[:801])
    assert values[900] == lr * 0.5 and values[1000] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert lr_at(999, total, lr, 0.0) == lr  # no decay


def test_sparsity_warms_up_linearly_over_the_first_steps() -> None:
    total = 1000
    values = [warmup_at(s, total, 5.0, 0.05) for s in range(total)]
    assert values[0] == 5.0 / 50 and values[24] == 2.5 and values[49] == 5.0
    assert all(v == 5.0 for v in values[49:])
    assert all(a < b for a, b in itertools.pairwise(values[:50]))
    assert warmup_at(0, total, 5.0, 0.0) == 5.0


def test_lr_warms_up_then_holds_then_decays() -> None:
    total, lr = 1000, 1e-3
    values = [lr_at(s, total, lr, 0.2, 0.1) for s in range(total + 1)]
    assert values[0] == lr / 100 and values[49] == lr / 2 and values[99] == lr
    assert all(v == lr for v in values[99:801]) and values[1000] == 0.0
    assert all(a < b for a, b in itertools.pairwise(values[:100]))
