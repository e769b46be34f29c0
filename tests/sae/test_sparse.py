"""Sparse kernels equal their dense definitions in value and gradient; bf16 compute stays close."""

from __future__ import annotations

import copy

import pytest
import torch

from monoscope.sae import SAEConfig, build_sae, gather_linear, sparse_decode
from monoscope.sae.sparse import SparsePattern
from tests.native_marks import needs_native


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sparse_decode_equals_dense_value_and_gradient() -> None:
    n_rows, k, n_feat, d = 9, 4, 30, 7
    g = _gen(0)
    w = torch.randn(n_feat, d, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:k] for _ in range(n_rows)])
    idx[0] = torch.tensor([3, 3, 5, 6])  # a repeated index must accumulate
    vals = torch.randn(n_rows, k, generator=g, requires_grad=True)
    upstream = torch.randn(n_rows, d, generator=g)

    out = sparse_decode(vals, idx, w)
    (out * upstream).sum().backward()
    assert vals.grad is not None and w.grad is not None
    gv, gw = vals.grad.clone(), w.grad.clone()
    vals.grad = w.grad = None

    dense = torch.zeros(n_rows, n_feat).index_put(
        (torch.arange(n_rows)[:, None].expand(-1, k), idx), vals, accumulate=True
    )
    ref = dense @ w
    (ref * upstream).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(gv, vals.grad, atol=1e-5)
    assert torch.allclose(gw, w.grad, atol=1e-5)


def test_sparse_decode_with_offsets_and_empty_rows() -> None:
    n_feat, d = 20, 5
    g = _gen(1)
    w = torch.randn(n_feat, d, generator=g, requires_grad=True)
    rows = torch.tensor([0, 0, 0, 2, 3, 3])  # row 1 and row 4 are empty
    cols = torch.tensor([1, 4, 9, 4, 0, 19])
    offsets = torch.tensor([0, 3, 3, 4, 6])
    vals = torch.randn(6, generator=g, requires_grad=True)
    out = sparse_decode(vals, cols, w, offsets)
    upstream = torch.randn(5, d, generator=g)
    (out * upstream).sum().backward()
    assert vals.grad is not None and w.grad is not None
    gv, gw = vals.grad.clone(), w.grad.clone()
    vals.grad = w.grad = None
    ref = torch.zeros(5, n_feat).index_put((rows, cols), vals) @ w
    (ref * upstream).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert out[1].abs().sum() == 0 and out[4].abs().sum() == 0
    assert torch.allclose(gv, vals.grad, atol=1e-5)
    assert torch.allclose(gw, w.grad, atol=1e-5)


def test_gather_linear_gradient_equals_dense_linear() -> None:
    n_rows, k, n_feat, d = 6, 3, 25, 8
    g = _gen(2)
    x = torch.randn(n_rows, d, generator=g, requires_grad=True)
    w = torch.randn(n_feat, d, generator=g, requires_grad=True)
    b = torch.randn(n_feat, generator=g, requires_grad=True)
    upstream = torch.randn(n_rows, k, generator=g)

    pre = x @ w.T + b  # [B, F], with autograd: the reference
    idx = pre.detach().topk(k, dim=1).indices
    ref = pre.gather(1, idx)
    (ref * upstream).sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None
    refs = [t.grad.clone() for t in (x, w, b)]  # type: ignore[union-attr]
    x.grad = w.grad = b.grad = None

    got = gather_linear(ref.detach(), x, w, b, SparsePattern(idx, n_feat))
    (got * upstream).sum().backward()
    for t, r in zip((x, w, b), refs, strict=True):
        assert t.grad is not None
        assert torch.allclose(t.grad, r, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu-l1", "jumprelu"])
def test_sparse_and_dense_paths_agree_on_a_whole_sae(arch: str) -> None:
    kw = {"k": 5, "k_aux": 6} if arch in ("topk", "batchtopk") else {}
    if arch == "jumprelu":  # wide window so that inactive entries inside it carry θ gradient
        kw = {"jumprelu_init_threshold": 0.8, "jumprelu_bandwidth": 0.4}
    cfg = SAEConfig(arch=arch, d_in=16, d_sae=96, compute_dtype="float32", sparse_max_density=1.0, **kw)  # type: ignore[arg-type]
    x = torch.randn(32, 16, generator=_gen(3)) * 2 + 0.5
    dead = torch.zeros(96, dtype=torch.bool)
    dead[10:40] = True
    results = []
    for sparse in (True, False):
        c = copy.deepcopy(cfg)
        c.sparse_kernels = sparse
        sae = build_sae(c, seed=4)
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.3, generator=_gen(5))
            sae.b_enc.normal_(-0.5, 0.3, generator=_gen(6))
        out = sae(x, 0.1, dead_mask=dead)
        assert (out.indices is not None) == sparse or arch in ("topk", "batchtopk")
        out.total.backward()
        results.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))  # type: ignore[union-attr]
    (o1, g1), (o2, g2) = results
    if arch in ("topk", "batchtopk"):
        assert o1.aux.item() > 0
    for name in ("x_hat", "mse", "sparsity", "aux", "total", "l0"):
        assert torch.allclose(getattr(o1, name), getattr(o2, name), atol=1e-5, rtol=1e-5), name
    assert torch.allclose(o1.dense_acts(), o2.dense_acts(), atol=1e-6)
    assert torch.equal(o1.fired, o2.fired)
    for name in g1:
        assert g1[name].abs().sum() > 0, name
        assert torch.allclose(g1[name], g2[name], atol=1e-5, rtol=1e-4), name


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize(
    ("arch", "kw"),
    [
        ("topk", {"k": 8}),
        ("batchtopk", {"k": 8}),
        ("relu-l1", {"sparse_max_density": 0.0}),
        ("relu-l1", {"sparse_max_density": 1.0}),
        ("jumprelu", {"sparse_max_density": 0.0}),
        ("jumprelu", {"sparse_max_density": 1.0}),
    ],
)
def test_bf16_compute_gradients_match_fp32_reference(arch: str, kw: dict) -> None:
    """bf16 matmuls with float32 master weights: loss and every gradient stay close to float32."""
    d, n_feat = 64, 512
    x = torch.randn(256, d, generator=_gen(6)) * 1.3
    dead = torch.zeros(n_feat, dtype=torch.bool)
    dead[::5] = True
    outs = []
    for cd in ("float32", "bfloat16"):
        extra = {"jumprelu_init_threshold": 0.3, "jumprelu_bandwidth": 0.05} if arch == "jumprelu" else {}
        cfg = SAEConfig(arch=arch, d_in=d, d_sae=n_feat, compute_dtype=cd, **kw, **extra)  # type: ignore[arg-type]
        sae = build_sae(cfg, seed=7)
        assert sae.W_enc.dtype == torch.float32  # master copy
        out = sae(x, 0.05, dead)
        out.total.backward()
        outs.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))  # type: ignore[union-attr]
        assert all(p.grad.dtype == torch.float32 for p in sae.parameters())  # type: ignore[union-attr]
    (o32, g32), (o16, g16) = outs
    assert o16.total.item() == pytest.approx(o32.total.item(), rel=0.02)
    assert o16.mse.item() == pytest.approx(o32.mse.item(), rel=0.02)
    for name in g32:
        assert _cosine(g16[name], g32[name]) > 0.98, name
        assert g16[name].norm().item() == pytest.approx(g32[name].norm().item(), rel=0.05), name


def test_positive_mask_bf16_bit_trick_matches_comparison() -> None:
    from monoscope.sae.relu import positive_mask

    vals = torch.tensor([-1.0, -0.0, 0.0, 1e-30, 2.0, float("inf"), -float("inf"), -1e-30, 3e38])
    for dtype in (torch.bfloat16, torch.float32):
        v = vals.to(dtype)
        assert torch.equal(positive_mask(v), v > 0), dtype


def test_gather_linear_shift_gradient() -> None:
    n_rows, k, n_feat, d = 6, 3, 25, 8
    g = _gen(8)
    x = torch.randn(n_rows, d, generator=g)
    shift = torch.randn(d, generator=g, requires_grad=True)
    w = torch.randn(n_feat, d, generator=g, requires_grad=True)
    b = torch.randn(n_feat, generator=g, requires_grad=True)
    upstream = torch.randn(n_rows, k, generator=g)
    pre = (x - shift) @ w.T + b
    idx = pre.detach().topk(k, dim=1).indices
    (pre.gather(1, idx) * upstream).sum().backward()
    refs = [t.grad.clone() for t in (shift, w, b)]  # type: ignore[union-attr]
    shift.grad = w.grad = b.grad = None
    got = gather_linear(pre.gather(1, idx).detach(), (x - shift).detach(), w, b, SparsePattern(idx, n_feat), shift)
    (got * upstream).sum().backward()
    for t, r in zip((shift, w, b), refs, strict=True):
        assert t.grad is not None
        assert torch.allclose(t.grad, r, atol=1e-5)


@pytest.mark.parametrize(("arch", "kw"), [("topk", {"k": 5}), ("relu-l1", {}), ("jumprelu", {})])
def test_sparse_path_gradients_for_input_and_subtracted_b_dec(arch: str, kw: dict) -> None:
    """Gradient w.r.t. the input (attribution) and b_dec subtracted from it: sparse == dense."""
    grads = []
    for sparse in (True, False):
        cfg = SAEConfig(
            arch=arch,  # type: ignore[arg-type]
            d_in=16,
            d_sae=96,
            compute_dtype="float32",
            b_dec_to_input=True,
            sparse_kernels=sparse,
            sparse_max_density=1.0,
            **kw,
        )
        sae = build_sae(cfg, seed=4)
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.3, generator=_gen(5))
        for needs_x in (False, True):
            x = (torch.randn(32, 16, generator=_gen(3)) * 2).requires_grad_(needs_x)
            sae.zero_grad()
            sae(x, 0.1).total.backward()
            grads.append((sae.b_dec.grad.clone(), sae.W_enc.grad.clone(), x.grad))  # type: ignore[union-attr]
    for (b1, w1, x1), (b2, w2, x2) in zip(grads[:2], grads[2:], strict=True):
        assert torch.allclose(b1, b2, atol=1e-5) and torch.allclose(w1, w2, atol=1e-5)
        assert (x1 is None) == (x2 is None)
        if x1 is not None:
            assert torch.allclose(x1, x2, atol=1e-5)


def test_entry_dots_paths_agree() -> None:
    """The gathered path (CUDA bf16 has no fused kernel), aten's fused kernel and the C kernel for bf16 give the same
    gradient of the values."""
    from monoscope.sae.sparse import SparsePattern, entry_dots

    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (6, 4), generator=gen)
    pattern = SparsePattern(idx, 50)
    g, w = torch.randn(6, 8, generator=gen), torch.randn(50, 8, generator=gen)
    fused, gathered = entry_dots(g, w, pattern, path="aten"), entry_dots(g, w, pattern, path="gather")
    expect = (g.repeat_interleave(4, 0) * w[idx.reshape(-1)]).sum(-1)
    torch.testing.assert_close(fused, expect)
    torch.testing.assert_close(gathered, expect)
    off = torch.tensor([0, 3, 3, 7])  # ragged rows, one empty
    ragged = SparsePattern(torch.randint(0, 50, (9,), generator=gen), 50, off)
    g4 = torch.randn(4, 8, generator=gen)
    torch.testing.assert_close(entry_dots(g4, w, ragged, path="gather"), entry_dots(g4, w, ragged, path="aten"))
    with pytest.raises(ValueError, match="entry_dots path must be 'native', 'aten' or 'gather', got 'dense'"):
        entry_dots(g, w, pattern, path="dense")


@needs_native
@pytest.mark.parametrize("d", [8, 16, 37, 576])
def test_entry_dots_native_bf16_sums_in_float32(d: int) -> None:
    """The C kernel for bf16 is the float32 dot product of the bf16 rows (every d: whole vector lanes, a tail, both),
    over fixed-k and ragged rows; aten's bf16 kernel agrees to bf16 rounding."""
    from monoscope.sae.sparse import SparsePattern, entry_dots

    gen = torch.Generator().manual_seed(d)
    g, w = torch.randn(5, d, generator=gen).bfloat16(), torch.randn(300, d, generator=gen).bfloat16()
    for pattern in (SparsePattern(torch.randint(0, 300, (5, 7), generator=gen), 300),
                    SparsePattern(torch.randint(0, 300, (9,), generator=gen), 300, torch.tensor([0, 4, 4, 4, 8]))):
        got = entry_dots(g, w, pattern, path="native")
        assert got.dtype == torch.float32
        expect = (g.float().index_select(0, pattern.rows) * w.float().index_select(0, pattern.flat)).sum(-1)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, entry_dots(g, w, pattern, path="aten").float(), rtol=2e-2, atol=2e-2)


@needs_native
@pytest.mark.parametrize("d", [8, 37, 192, 576, 700])
def test_feature_rows_native_sums_in_float32_in_entry_order(d: int) -> None:
    """The weight gradient's C kernel (`_transposed_accumulate` for bf16 inputs and a float32 weight) is, bit for bit,
    each feature's float32 sum of v · src[row] in entry order (every d: whole register passes of 192 floats, a tail,
    only a tail), with zero rows for features no entry has and one feature in every row; aten's bag, rounded to bf16
    before it is widened, agrees to bf16 rounding."""
    from monoscope.sae.sparse import _transposed_accumulate

    gen = torch.Generator().manual_seed(d)
    src, n_feat = torch.randn(40, d, generator=gen).bfloat16(), 300
    idx = torch.randint(1, n_feat - 50, (40, 6), generator=gen)
    idx[:, 0] = 0  # feature 0 in every row; features past n_feat - 50 in none
    pattern = SparsePattern(idx, n_feat)
    v = torch.randn(pattern.nnz, generator=gen).bfloat16()
    got = _transposed_accumulate(pattern, v, src, torch.float32)
    expect = torch.zeros(n_feat, d)
    for n in range(pattern.nnz):  # entry order: a feature's entries by row, as the transposed pattern holds them
        r, f = int(pattern.rows[n]), int(pattern.flat[n])
        expect[f] = expect[f] + v[n].float() * src[r].float()
    assert got.dtype == torch.float32 and torch.equal(got, expect)
    assert not bool(got[n_feat - 50:].any())
    bag = torch.nn.functional.embedding_bag(pattern.transpose()[1], src, pattern.transpose()[2], mode="sum",
                                            per_sample_weights=v.index_select(0, pattern.transpose()[0]))
    torch.testing.assert_close(got, bag.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_sq_err_is_autograds_squared_error(dtype: torch.dtype) -> None:
    """The fused per-row squared error gives autograd's value and gradient, the gradient in pred's dtype; a target
    that needs a gradient gets one through plain autograd."""
    from monoscope.sae.sparse import row_sq_err

    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 10, generator=gen).to(dtype).requires_grad_()
    target = torch.randn(6, 10, generator=gen)
    w = torch.randn(6, generator=gen)
    (row_sq_err(pred, target) * w).sum().backward()
    ref = pred.detach().clone().requires_grad_()
    want = (ref.float() - target).pow(2).sum(-1)
    (want * w).sum().backward()
    assert pred.grad is not None and ref.grad is not None and pred.grad.dtype == dtype
    torch.testing.assert_close(row_sq_err(pred.detach(), target), want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pred.grad, ref.grad)
    t2 = target.clone().requires_grad_()
    row_sq_err(pred.detach(), t2).sum().backward()
    assert t2.grad is not None
    torch.testing.assert_close(t2.grad, 2 * (t2.detach() - pred.detach().float()))
