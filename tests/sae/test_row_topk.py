"""`_row_topk` (top-k through group maxima) against aten's top-k: the same values per row, and indices that point
at them, for shapes where it recurses, where it falls back, and with many ties."""

from __future__ import annotations

import pytest
import torch

from monoscope.sae.topk import _order_view, _row_topk


@pytest.mark.parametrize(("rows", "n", "k"), [(64, 9216, 32), (16, 2304, 288), (8, 6144, 288), (32, 4096, 64),
                                              (5, 100, 7), (3, 66, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_topk_equals_aten(rows: int, n: int, k: int, dtype: torch.dtype) -> None:
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n + k)).to(dtype)
    x[:, ::7] = x[:, :1]  # ties: a repeated value in every row
    for t in (x, _order_view(x)):
        v, i = _row_topk(t, k)
        ref = t.topk(k, dim=1, sorted=False).values
        assert v.shape == i.shape == (rows, k)
        assert torch.equal(v.sort(1).values, ref.sort(1).values)
        assert torch.equal(t.gather(1, i), v)
        assert all(len(set(r.tolist())) == k for r in i)  # k distinct positions per row
