"""`_row_topk` against aten's top-k, through the C kernel and through its PyTorch fallback: the same values per
row, indices that point at them in increasing column order, for shapes where the kernel groups columns, where it
scans whole rows, and with many ties; and what happens when the kernel cannot be built."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from monoscope import native
from monoscope.sae.topk import _order_view, _row_topk
from tests.native_marks import needs_cc, needs_native


@pytest.fixture(params=[pytest.param("native", marks=needs_cc), "fallback"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    native._lib.cache_clear()
    if request.param == "fallback":
        monkeypatch.setenv(native.NATIVE_ENV, "0")
    yield request.param
    native._lib.cache_clear()


@pytest.mark.parametrize(("rows", "n", "k"), [(64, 9216, 32), (16, 2304, 288), (8, 6144, 288), (32, 4096, 64),
                                              (5, 100, 7), (3, 66, 4), (130, 128, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_topk_equals_aten(path: str, rows: int, n: int, k: int, dtype: torch.dtype) -> None:
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n + k)).to(dtype)
    x[:, ::7] = x[:, :1]  # ties: a repeated value in every row
    key = _order_view(x)
    assert (native.row_topk(key, k) is not None) == (path == "native")
    for t in (x, key):
        v, i = _row_topk(t, k)
        ref = t.topk(k, dim=1, sorted=False).values
        assert v.shape == i.shape == (rows, k)
        assert torch.equal(v.sort(1).values, ref.sort(1).values)
        assert torch.equal(t.gather(1, i), v)
        assert all(len(set(r.tolist())) == k for r in i)  # k distinct positions per row
        assert bool((i[:, 1:] > i[:, :-1]).all())  # increasing column order, on both paths


@needs_cc
def test_native_takes_the_lowest_columns_among_ties_and_agrees_with_the_fallback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    native._lib.cache_clear()
    x = torch.zeros(4, 9216, dtype=torch.int16)
    x[:, 5000] = 7
    v, i = native.row_topk(x, 3)  # type: ignore[misc]
    assert i.tolist() == [[0, 1, 5000]] * 4 and v.tolist() == [[0, 0, 7]] * 4
    x32 = torch.randn(256, 9216, generator=torch.Generator().manual_seed(1))
    keys = [_order_view(x32), _order_view(x32.bfloat16())]
    got = [_row_topk(y, 32) for y in keys]
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    native._lib.cache_clear()
    ref = [_row_topk(y, 32) for y in keys]
    native._lib.cache_clear()
    # float32: no ties, the same entries in the same order; bf16 (8-bit mantissa): the same values per row
    assert torch.equal(got[0][0], ref[0][0]) and torch.equal(got[0][1], ref[0][1])
    assert torch.equal(got[1][0].sort(1).values, ref[1][0].sort(1).values)
    assert not torch.equal(got[1][1], ref[1][1])  # ties at the k-th value: the kernel takes the lowest columns


def test_a_compiler_that_fails_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MONOSCOPE_CACHE", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CC", "false")
    native._lib.cache_clear()
    x = torch.randn(8, 512).to(torch.int32)
    with pytest.warns(RuntimeWarning, match=r"^monoscope's C kernels are off, so CPU training runs slower \(.*\); "
                                            r"install a C compiler \(e.g. gcc\) or set MONOSCOPE_NATIVE=0 to silence "
                                            r"this$"):
        assert native.row_topk(x, 4) is None
    v, i = _row_topk(x, 4)  # the fallback, without a second warning
    assert torch.equal(v, x.gather(1, i)) and torch.equal(v.sort(1).values, x.topk(4, 1).values.sort(1).values)
    native._lib.cache_clear()
    assert not list(tmp_path.rglob("*.so"))


@needs_cc
def test_the_library_is_built_once_into_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MONOSCOPE_CACHE", str(tmp_path))
    lib = native._build(native._HERE / "row_topk.c")
    assert lib.parent.parent == tmp_path / "native" and lib.name == "row_topk.so"
    stamp = lib.stat().st_mtime_ns
    assert native._build(native._HERE / "row_topk.c") == lib and lib.stat().st_mtime_ns == stamp
    assert [p.name for p in lib.parent.iterdir()] == ["row_topk.so"]  # no temporary file left


@needs_cc
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here, so the kernel makes no thread "
                                                      "pool and a forked child has none to inherit")
def test_a_forked_child_gets_its_own_threads() -> None:
    keys = torch.randint(-100, 100, (512, 4096), dtype=torch.int16)
    ref = native.row_topk(keys, 8)
    assert ref is not None
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool threads do not exist here
        got = native.row_topk(keys, 8)
        os._exit(0 if got is not None and torch.equal(got[1], ref[1]) else 1)
    import signal
    import time

    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:  # without its own pool the child waits forever on threads it lacks
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in the native row top-k")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0


@needs_native
@pytest.mark.parametrize(("rows", "n", "k"), [(70, 4200, 288), (9, 50, 7), (33, 300, 288), (5, 10, 3)])
def test_relu_topk_rows_kernel_is_the_pytorch_form(rows: int, n: int, k: int) -> None:
    """The block AuxK's codes through the C kernel equal the PyTorch form's values: rows with more and with no
    more than k positive entries, ties at the k-th value (lowest columns kept), negative zeros."""
    from monoscope.sae.topk import _relu_topk_rows

    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)).bfloat16()
    x[0, : k + 4] = 16.0  # ties straddling the k-th value, above every other entry
    x[1, :] = -x[1, :].abs()  # no positive entry
    x[2, :3] = -0.0
    got = x.clone()
    assert native.relu_topk_rows(got, k)
    want = _relu_topk_rows(x.clone(), k)
    assert torch.equal(got, want)  # as values: the kernel writes +0 where PyTorch's ReLU keeps a -0
    assert not bool((got.view(torch.int16) < 0).any())
    assert int((got[0] > 0).sum()) == k and torch.equal(got[0, :k], torch.full((k,), 16.0, dtype=torch.bfloat16))
    assert not native.relu_topk_rows(x.float(), k)  # float32: the caller's PyTorch form
