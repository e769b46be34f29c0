"""Each architecture's forward pass against the formulas written out by hand, on tiny sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from monoscope.errors import MonoscopeError
from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.topk import _batch_topk

D, N_FEAT, B = 12, 48, 10


def make(arch: str, **kw: object):
    cfg = SAEConfig(arch=arch, d_in=D, d_sae=N_FEAT, compute_dtype="float32", **kw)  # type: ignore[arg-type]
    sae = build_sae(cfg, seed=0)
    with torch.no_grad():  # non-trivial biases so that every term of the formulas matters
        sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        sae.b_dec.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    return sae


def batch(seed: int = 0, n: int = B) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_every_architecture_has_the_same_interface(density: float) -> None:
    x = batch()
    for arch, kw in [("relu-l1", {}), ("topk", {"k": 4}), ("batchtopk", {"k": 4}), ("jumprelu", {}),
                     ("matryoshka", {"k": 4, "prefixes": [6, 20, N_FEAT]}), ("gated", {})]:
        sae = make(arch, sparse_max_density=density, **kw)
        out = sae(x, 0.01, torch.zeros(N_FEAT, dtype=torch.bool))
        assert out.x_hat.shape == (B, D) and out.x_hat.dtype == torch.float32
        assert out.fired.shape == (N_FEAT,) and out.fired.dtype == torch.bool
        assert torch.allclose(out.total, out.mse + out.sparsity + out.aux)
        assert sae.encode(x).shape == (B, N_FEAT)
        dense = out.dense_acts()
        assert dense.shape == (B, N_FEAT)
        assert torch.allclose(dense, sae.encode(x), atol=1e-5), arch
        assert torch.allclose(sae.decode(dense), out.x_hat, atol=1e-5), arch
        assert out.l0.item() == pytest.approx((dense > 0).sum().item() / B)
        assert torch.equal(out.fired, (dense > 0).any(0))
        out.total.backward()
        assert all(p.grad is not None for p in sae.parameters() if p.requires_grad), arch


@pytest.mark.parametrize("density", [0.0, 1.0])  # 0: dense path, 1: sparse path
def test_relu_l1_matches_formula(density: float) -> None:
    sae = make("relu-l1", sparse_max_density=density)
    with torch.no_grad():  # decoder norms differ per row, so the norm weighting is visible
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, N_FEAT)[:, None])
    x, lam = batch(), 0.37
    out = sae(x, lam)
    f = torch.relu(x @ sae.W_enc.T + sae.b_enc)
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = ((x - x_hat) ** 2).sum(1).mean()
    l1 = sum(f[b, i] * sae.W_dec[i].norm() for b in range(B) for i in range(N_FEAT)) / B
    assert torch.allclose(out.x_hat, x_hat, atol=1e-5)
    assert out.mse.item() == pytest.approx(mse.item(), rel=1e-5)
    assert out.sparsity.item() == pytest.approx(lam * l1.item(), rel=1e-5)
    assert out.aux.item() == 0.0
    var = ((x - x.mean(0)) ** 2).sum()
    assert out.fvu.item() == pytest.approx((((x - x_hat) ** 2).sum() / var).item(), rel=1e-5)
    # the L1 gradient reaches the decoder norms (the paper's penalty is not decoder-blind)
    sae.zero_grad()
    sae(x, lam).sparsity.backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0


def test_topk_keeps_exactly_k_largest() -> None:
    k = 5
    sae = make("topk", k=k)
    x = batch()
    out = sae(x)
    assert out.acts.shape == (B, k) and out.indices is not None and out.indices.shape == (B, k)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc  # b_dec subtracted for topk
    ref_v, _ = pre.topk(k, dim=1)
    got_v, _ = out.acts.sort(dim=1, descending=True)
    assert torch.allclose(got_v, torch.relu(ref_v), atol=1e-5)
    for b in range(B):
        assert len(set(out.indices[b].tolist())) == k
        assert torch.allclose(pre[b, out.indices[b]].relu(), out.acts[b], atol=1e-5)
    x_hat = out.dense_acts() @ sae.W_dec + sae.b_dec
    assert torch.allclose(out.x_hat, x_hat, atol=1e-5)
    assert out.sparsity.item() == 0.0


def test_batchtopk_keeps_k_times_batch_in_training_and_threshold_in_eval() -> None:
    k = 3
    sae = make("batchtopk", k=k, threshold_ema=0.25)
    with torch.no_grad():
        sae.b_enc.add_(3.0)  # all pre-activations positive: the ReLU drops nothing
    x = batch()
    sae.train()
    assert math.isnan(sae.threshold.item())
    out = sae(x)
    dense = out.dense_acts()
    assert (dense > 0).sum().item() == k * B
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    kth = pre.flatten().topk(k * B).values.min()
    assert torch.equal(dense > 0, pre >= kth)  # exactly the k·B largest over the batch
    rows_count = (dense > 0).sum(1)
    assert rows_count.sum() == k * B and rows_count.max() > rows_count.min()  # not per-row top-k
    # the first batch sets θ to the smallest kept value; later batches move it by the EMA weight
    theta1 = sae.threshold.item()
    assert theta1 == pytest.approx(kth.item(), rel=1e-6)
    x2 = batch(seed=5)
    out2 = sae(x2)
    m2 = out2.acts[out2.acts > 0].min().item()
    assert sae.threshold.item() == pytest.approx(0.75 * theta1 + 0.25 * m2, rel=1e-6)
    # eval: per-token decision by θ, independent of the rest of the batch
    sae.eval()
    theta = sae.threshold.item()
    f = sae.encode(x)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    assert torch.allclose(f, pre * (pre > theta), atol=1e-5)
    assert torch.allclose(sae.encode(x[:1]), f[:1], atol=1e-5)
    out_eval = sae(x)
    assert torch.allclose(out_eval.dense_acts(), f, atol=1e-5)
    assert sae.threshold.item() == theta  # eval never moves θ


def test_batchtopk_calibrated_threshold_gives_k_per_row_in_eval() -> None:
    """The running mean lags; `calibrate_threshold_` sets θ from data so the eval L0 is ~k."""
    k = 4
    sae = make("batchtopk", k=k, threshold=0.01)  # a badly lagging θ: far too many features fire
    xs = [batch(seed=s, n=64) for s in range(4)]
    sae.eval()
    assert sae(torch.cat(xs)).l0.item() > 2 * k
    theta = sae.calibrate_threshold_(xs)
    assert theta == sae.threshold.item() and theta > 0.01
    assert sae.threshold.dtype == torch.float32
    l0 = sae(torch.cat(xs)).l0.item()
    assert abs(l0 - k) <= 0.1 * k, l0
    # exact on the data it saw: θ splits the (k·N)-th and (k·N+1)-th largest pre-activations
    pre = torch.cat([(x - sae.b_dec) @ sae.W_enc.T + sae.b_enc for x in xs]).detach()
    assert (pre > theta).sum().item() == k * 4 * 64
    assert sae.calibrate_threshold_([]) == theta  # no data: unchanged


def test_jumprelu_threshold_init_from_data_gives_a_moderate_l0() -> None:
    """θ = 0.001 with unit-norm encoder rows lets most features fire at step 0 on inputs with
    E‖x‖² = d; `init_threshold_` sets per-feature thresholds from a first batch instead."""
    d, n_feat = 64, 2048
    cfg = SAEConfig(arch="jumprelu", d_in=d, d_sae=n_feat, compute_dtype="float32")
    sae = build_sae(cfg, seed=0).eval()
    x = torch.randn(512, d, generator=torch.Generator().manual_seed(0))
    x *= (d / x.pow(2).sum(1).mean()).sqrt()  # E‖x‖² = d
    x_eval = torch.randn(512, d, generator=torch.Generator().manual_seed(1)) * x.pow(2).mean().sqrt()
    assert sae(x_eval).l0.item() > 500  # the problem: ~n_feat / 2 active
    theta = sae.init_threshold_(x)
    assert sae.log_threshold.dtype == torch.float32 and theta.shape == (n_feat,)
    assert (theta >= cfg.jumprelu_init_threshold).all()
    l0 = sae(x_eval).l0.item()
    assert 30 < l0 < 200, l0  # default target: 100
    assert sae.init_threshold_(x, target_l0=20) is not None and sae(x_eval).l0.item() < 40


def test_batchtopk_eval_without_threshold_is_an_error() -> None:
    sae = make("batchtopk", k=3).eval()
    with pytest.raises(MonoscopeError, match="no inference threshold"):
        sae.encode(batch())
    sae = make("batchtopk", k=3, threshold=0.5).eval()  # a threshold from the config is used
    assert sae.threshold.item() == 0.5
    sae.encode(batch())


def test_batch_topk_selection_is_exact_when_one_row_dominates() -> None:
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(16, 200, generator=g)
    pre[7] += 10.0  # row 7 holds far more than 4·k of the batch's top entries: forces the retry
    n_keep = 16 * 4
    rows, cols, vals = _batch_topk(pre, n_keep)
    ref = torch.zeros_like(pre, dtype=torch.bool).flatten()
    ref[pre.flatten().topk(n_keep).indices] = True
    got = torch.zeros_like(pre, dtype=torch.bool)
    got[rows, cols] = True
    assert torch.equal(got.flatten(), ref)
    assert torch.equal(vals, pre[rows, cols])
    assert torch.all(rows[1:] * 200 + cols[1:] > rows[:-1] * 200 + cols[:-1])  # row-major order


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_jumprelu_forward_and_l0(density: float) -> None:
    sae = make("jumprelu", jumprelu_init_threshold=0.5, sparse_max_density=density)
    x, lam = batch(), 0.2
    out = sae(x, lam)
    pre = torch.relu(x @ sae.W_enc.T + sae.b_enc)
    f = pre * (pre > 0.5)
    assert (out.indices is None) == (density == 0.0)
    assert torch.allclose(out.dense_acts(), f, atol=1e-6)
    assert torch.allclose(out.x_hat, f @ sae.W_dec + sae.b_dec, atol=1e-5)
    l0 = (pre > 0.5).sum(1).float().mean()
    assert out.l0.item() == pytest.approx(l0.item())
    assert out.sparsity.item() == pytest.approx(lam * l0.item())


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_jumprelu_threshold_gets_ste_gradient(density: float) -> None:
    eps = 0.1
    sae = make("jumprelu", jumprelu_bandwidth=eps, jumprelu_init_threshold=0.5, sparse_max_density=density)
    x = batch(n=64)
    lam = 0.3
    out = sae(x, lam)
    out.total.backward()
    theta = sae.threshold
    pre = torch.relu(x @ sae.W_enc.T + sae.b_enc).detach()
    window = ((pre - theta).abs() < eps / 2).float()  # rectangle kernel K((pre − θ)/ε)
    assert window.sum() > 0
    # ∂L/∂f (the reconstruction part): 2 (x̂ − x) W_decᵀ / B
    g_f = (2 * (out.x_hat - x) @ sae.W_dec.T / x.shape[0]).detach()
    grad_theta = -(theta / eps) * (window * g_f).sum(0) - (lam / x.shape[0]) * window.sum(0) / eps
    expected = grad_theta * theta  # chain rule through θ = exp(log θ)
    assert sae.log_threshold.grad is not None
    assert torch.allclose(sae.log_threshold.grad, expected, atol=1e-5, rtol=1e-4)
    assert sae.log_threshold.grad.abs().sum() > 0
    # the L0 term alone pushes every threshold with something in its window upwards
    sae.zero_grad()
    sae(x, 1.0).sparsity.backward()
    g = sae.log_threshold.grad
    assert torch.all(g[window.sum(0) > 0] < 0) and torch.all(g[window.sum(0) == 0] == 0)


def test_jumprelu_threshold_stays_float32() -> None:
    cfg = SAEConfig(arch="jumprelu", d_in=D, d_sae=N_FEAT, dtype="bfloat16", jumprelu_init_threshold=0.0123)
    sae = build_sae(cfg, seed=0)
    assert sae.W_enc.dtype == torch.bfloat16
    assert sae.log_threshold.dtype == torch.float32
    assert sae.threshold[0].item() == pytest.approx(0.0123, rel=1e-6)
    sae32 = build_sae(SAEConfig(arch="jumprelu", d_in=D, d_sae=N_FEAT), seed=0)
    with torch.no_grad():
        sae32.log_threshold.copy_(torch.linspace(-3.0001, 0.0001, N_FEAT))
    before = sae32.log_threshold.detach().clone()
    sae32.to(torch.bfloat16)
    assert sae32.W_dec.dtype == torch.bfloat16
    assert sae32.log_threshold.dtype == torch.float32
    assert torch.equal(sae32.log_threshold.detach(), before)  # no bf16 round trip either
    out = sae32(batch(), 0.1)
    out.total.backward()
    assert sae32.log_threshold.grad is not None and sae32.log_threshold.grad.dtype == torch.float32


def test_auxk_matches_formula_and_only_feeds_dead_latents() -> None:
    k, k_aux = 3, 4
    sae = make("topk", k=k, k_aux=k_aux, aux_coef=0.5)
    x = batch()
    dead = torch.zeros(N_FEAT, dtype=torch.bool)
    dead[::4] = True  # 12 dead latents >= k_aux
    out = sae(x, dead_mask=dead)
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    x_hat = out.x_hat
    e = (x - x_hat).detach()
    masked = pre.masked_fill(~dead, -math.inf)
    v, i = masked.topk(k_aux, dim=1)
    f_aux = torch.zeros_like(pre).scatter(1, i, torch.relu(v))
    e_hat = f_aux @ sae.W_dec
    expected = 0.5 * min(12 / k_aux, 1.0) * ((e_hat - e) ** 2).sum(1).mean()
    assert out.aux.item() == pytest.approx(expected.item(), rel=1e-5)
    # without a dead mask, or with nobody dead, there is no aux term
    assert sae(x).aux.item() == 0.0
    assert sae(x, dead_mask=torch.zeros(N_FEAT, dtype=torch.bool)).aux.item() == 0.0
    # the aux gradient reaches only dead latents' encoder rows
    sae.zero_grad()
    out.aux.backward()
    assert sae.W_enc.grad is not None
    assert sae.W_enc.grad[~dead].abs().sum() == 0 and sae.W_enc.grad[dead].abs().sum() > 0
    # fewer dead latents than k_aux: the term is scaled by n_dead / k_aux
    few = torch.zeros(N_FEAT, dtype=torch.bool)
    few[[1, 2]] = True
    out_few = sae(x, dead_mask=few)
    masked = pre.masked_fill(~few, -math.inf)
    v, i = masked.topk(2, dim=1)
    e_hat = torch.zeros_like(pre).scatter(1, i, torch.relu(v)) @ sae.W_dec
    expected_few = 0.5 * (2 / k_aux) * ((e_hat - (x - out_few.x_hat).detach()) ** 2).sum(1).mean()
    assert out_few.aux.item() == pytest.approx(expected_few.item(), rel=1e-5)


def test_dead_mask_is_checked() -> None:
    sae = make("topk", k=3)
    with pytest.raises(ValueError, match="dead_mask"):
        sae(batch(), dead_mask=torch.zeros(N_FEAT))


def test_wrong_input_width_is_an_error() -> None:
    sae = make("relu-l1")
    with pytest.raises(ValueError, match=r"expects activations \[B, 12\]"):
        sae(torch.zeros(4, D + 1))


def test_initialisation() -> None:
    for arch, kw, norm in [("relu-l1", {}, 0.1), ("topk", {"k": 2}, 0.25), ("batchtopk", {"k": 2}, 0.25),
                           ("jumprelu", {}, 1.0)]:
        cfg = SAEConfig(arch=arch, d_in=D, d_sae=N_FEAT, **kw)  # type: ignore[arg-type]
        a, b = build_sae(cfg, seed=7), build_sae(cfg, seed=7)
        assert torch.equal(a.W_enc, a.W_dec)  # encoder = decoder transpose (same [F, d] rows)
        assert torch.allclose(a.W_dec.norm(dim=1), torch.full((N_FEAT,), norm), rtol=1e-5)
        assert torch.equal(a.W_dec, b.W_dec)  # seeded
        assert not torch.equal(a.W_dec, build_sae(cfg, seed=8).W_dec)
        assert a.b_enc.abs().sum() == 0 and a.b_dec.abs().sum() == 0


def test_init_b_dec_geometric_median_and_mean() -> None:
    sae = make("topk", k=2)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(400, D, generator=g) * 0.1 + 3.0
    sample[:20] += 1000.0  # outliers drag the mean, not the median
    med = sae.init_b_dec_(sample)
    assert torch.allclose(sae.b_dec, med)
    assert (med - 3.0).abs().max() < 0.1
    mean = sae.init_b_dec_(sample, method="mean")
    assert torch.allclose(mean, sample.mean(0))
    with pytest.raises(ValueError, match="geometric_median"):
        sae.init_b_dec_(sample, method="median")
    with pytest.raises(ValueError, match=r"\[N, 12\]"):
        sae.init_b_dec_(sample[:, :3])


def test_decoder_constraints() -> None:
    sae = make("topk", k=3)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N_FEAT, 1) * 3 + 0.1)
    sae(batch()).total.backward()
    assert sae.W_dec.grad is not None
    sae.remove_parallel_grads_()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert parallel.abs().max() < 1e-4
    assert sae.W_dec.grad.abs().sum() > 0
    sae.normalize_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(N_FEAT), atol=1e-6)


def test_raw_space_helpers_invert_the_scaling() -> None:
    """An SAE that reconstructs perfectly (f = [x⁺, x⁻], x̂ = x⁺ − x⁻) must give back the raw input
    from reconstruct_raw for any normaliser; forgetting to unscale would return c·x_raw."""
    c = 0.125
    cfg = SAEConfig(arch="relu-l1", d_in=D, d_sae=2 * D, normaliser=c, compute_dtype="float32")
    sae = build_sae(cfg, seed=0)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    x_raw = batch() * 40
    assert torch.allclose(sae.reconstruct_raw(x_raw), x_raw, atol=1e-4)
    assert torch.allclose(sae.encode_raw(x_raw), sae.encode(c * x_raw))
    assert torch.allclose(sae.encode_raw(x_raw).sum(1), c * x_raw.abs().sum(1), rtol=1e-5)
    f = sae.encode_raw(x_raw)
    assert torch.allclose(sae.decode_raw(f), x_raw, atol=1e-4)
    assert torch.allclose(sae.unscale(sae.scale(x_raw)), x_raw)
    # forward works in the scaled space: its x_hat matches c·x_raw, not x_raw
    out = sae(sae.scale(x_raw))
    assert torch.allclose(out.x_hat, c * x_raw, atol=1e-5)
    # topk too (different code path): k = d_sae keeps everything
    cfg_t = SAEConfig(arch="topk", d_in=D, d_sae=2 * D, k=2 * D, normaliser=c, compute_dtype="float32")
    sae_t = build_sae(cfg_t, seed=0)
    with torch.no_grad():
        sae_t.W_enc.copy_(torch.cat([eye, -eye]))
        sae_t.W_dec.copy_(torch.cat([eye, -eye]))
    assert torch.allclose(sae_t.reconstruct_raw(x_raw), x_raw, atol=1e-4)


def test_input_dtype_bf16_is_accepted() -> None:
    sae = make("topk", k=3)
    x = batch()
    out32, out16 = sae(x), sae(x.to(torch.bfloat16))
    assert out16.x_hat.dtype == torch.float32
    assert torch.allclose(out32.x_hat, out16.x_hat, atol=0.1)


def test_relu_encoder_matches_linear() -> None:
    sae = make("relu-l1")
    x = batch()
    assert torch.allclose(sae.encode(x), F.relu(F.linear(x, sae.W_enc, sae.b_enc)), atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_topk_with_few_positive_preactivations(arch: str, compute_dtype: str) -> None:
    """Fewer positive pre-activations than k: every positive one is kept, the rest are 0."""
    k = 6
    cfg = SAEConfig(arch=arch, d_in=D, d_sae=N_FEAT, k=k, compute_dtype=compute_dtype,  # type: ignore[arg-type]
                    init_decoder_norm=1.0)  # unit rows: the bias below leaves a few positive pre-activations
    sae = build_sae(cfg, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-4.0)
    x = batch()
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    n_pos = (pre > 0).sum(1)
    assert n_pos.max() < k and n_pos.sum() > 0
    out = sae(x)
    dense = out.dense_acts()
    assert torch.equal(dense > 0, pre > 0)
    tol = 0.05 if compute_dtype == "bfloat16" else 1e-5
    assert torch.allclose(dense, torch.relu(pre), atol=tol, rtol=tol)
