"""Each C kernel gives the same result whether its rows run on the OpenMP threads (one call) or on the thread pool
(a call per part: the path of a build without OpenMP and of a forked child), with two threads and one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from monoscope import native
from monoscope.sae.sparse import SparsePattern
from tests.native_marks import needs_native

pytestmark = needs_native


def _kernels() -> dict[str, Callable[[], list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randint(-2000, 2000, (300, 1024), generator=gen, dtype=torch.int16)
    g = torch.randn(300, 40, generator=gen)
    w = torch.randn(300, 40, generator=gen)
    pre = torch.randn(300, 500, generator=gen).bfloat16()
    gb, wb = torch.randn(300, 40, generator=gen).bfloat16(), torch.randn(700, 40, generator=gen).bfloat16()
    pattern = SparsePattern(torch.randint(0, 700, (300, 9), generator=gen), 700)

    def topk() -> list[torch.Tensor]:
        got = native.row_topk(keys, 17)
        assert got is not None
        return list(got)

    def sumsq() -> list[torch.Tensor]:
        total, coef = native.grad_sumsq(g, w)
        assert coef is not None
        return [torch.tensor(total), coef]

    def adam() -> list[torch.Tensor]:
        p, m, v = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
        out = torch.empty(300, 41, dtype=torch.bfloat16)
        native.adam_rows(p, g, m, v, None, 0.5, w1=0.1, b2=0.999, c2=0.001, bc2s=0.0316, eps=1e-8, neg_step=-0.01,
                         renorm=True, bf16_out=out)
        return [p, m, v, out[:, :40]]

    def dots() -> list[torch.Tensor]:
        got = native.entry_dots(gb, wb, pattern.flat, pattern.offsets)
        assert got is not None
        return [got]

    def feature_rows() -> list[torch.Tensor]:
        order, rows, offsets = pattern.transpose()
        got = native.feature_rows(gb, torch.randn(pattern.nnz, generator=torch.Generator().manual_seed(1)).bfloat16(),
                                  order, rows, offsets)
        assert got is not None
        return [got]

    def relu_topk() -> list[torch.Tensor]:
        x = pre.clone()
        assert native.relu_topk_rows(x, 64)
        return [x]

    return {"row_topk": topk, "grad_sumsq": sumsq, "adam_rows": adam, "entry_dots": dots, "relu_topk": relu_topk,
            "feature_rows": feature_rows}


@pytest.mark.parametrize("name", ["row_topk", "grad_sumsq", "adam_rows", "entry_dots", "relu_topk", "feature_rows"])
@pytest.mark.parametrize("threads", [1, 2])
def test_openmp_and_pool_paths_agree(monkeypatch: pytest.MonkeyPatch, name: str, threads: int) -> None:
    monkeypatch.setattr(native, "_MIN_ROWS_PER_THREAD", 8)  # several parts even for these few rows
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        omp = _kernels()[name]()
        monkeypatch.setattr(native, "_forked", True)  # the pool path, as in a forked child
        pool = _kernels()[name]()
    finally:
        torch.set_num_threads(old)
    assert len(omp) == len(pool)
    for a, b in zip(omp, pool, strict=True):
        assert torch.equal(a, b), name
