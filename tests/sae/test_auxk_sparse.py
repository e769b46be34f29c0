"""AuxK on the sparse path (the forward's no-grad pre-activations, gradient through the k_aux chosen entries only)
against the dense reference (sparse_kernels=False): same loss, same gradient on every parameter, for each
architecture that runs AuxK, with b_dec subtracted from the input (topk) and not (transcoder), on both CPU forms
of the sparse path: the per-entry kernels and the matmuls over the dead block (`block_linear_decode`)."""

from __future__ import annotations

import pytest
import torch

from monoscope.sae import SAEConfig
from tests.sae.sae_pairs import sae_pair

D, N_FEAT, B = 12, 48, 10
CPU_PATHS = {"entries": {}, "block": {torch.float32: 10**6, torch.bfloat16: 10**6}}


@pytest.fixture(params=sorted(CPU_PATHS))
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force one CPU form of the sparse AuxK (the choice depends on n_dead / k_aux and the compute dtype)."""
    from monoscope.sae import topk as topk_mod

    monkeypatch.setattr(topk_mod, "BLOCK_AUXK_DEAD_PER_K_AUX", CPU_PATHS[request.param])
    return str(request.param)


def _pair(arch: str, **kw: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(sparse kernels, dense reference) of one architecture, in float32 unless `kw` says otherwise."""
    return sae_pair(arch, "sparse_kernels", (True, False), 0.3, 0.5,
                    **{"d_in": D, "d_sae": N_FEAT, "k": 3, "k_aux": 5, "aux_coef": 0.5, "compute_dtype": "float32",
                       **kw})


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "transcoder"])
@pytest.mark.parametrize("n_dead", [3, 20])  # fewer dead than k_aux (scaled term), and more
def test_sparse_auxk_equals_dense(arch: str, n_dead: int, cpu_path: str) -> None:
    sparse, dense = _pair(arch)
    width = 2 * D if arch == "transcoder" else D
    x = torch.randn(B, width, generator=torch.Generator().manual_seed(0)) * 1.5
    dead = torch.zeros(N_FEAT, dtype=torch.bool)
    dead[torch.randperm(N_FEAT, generator=torch.Generator().manual_seed(3))[:n_dead]] = True
    outs = []
    for sae in (sparse, dense):
        sae.train()
        out = sae(x, dead_mask=dead)
        out.aux.backward()
        outs.append(out)
    assert outs[0].aux.item() > 0
    assert outs[0].aux.item() == pytest.approx(outs[1].aux.item(), rel=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        gs, gd = getattr(sparse, name).grad, getattr(dense, name).grad
        if arch == "transcoder" and name == "b_dec":  # b_dec is not subtracted from its input: no aux gradient
            assert gs is None and gd is None
            continue
        assert torch.allclose(gs, gd, rtol=1e-4, atol=1e-5), name
    if arch == "matryoshka":  # its aux also holds the prefix losses, which train live latents
        return
    # only dead latents' encoder rows receive the aux gradient
    sparse.zero_grad()
    sparse(x, dead_mask=dead).aux.backward()
    assert sparse.W_enc.grad[~dead].abs().sum() == 0 and sparse.W_enc.grad[dead].abs().sum() > 0


def test_block_auxk_top_k_on_the_rows_that_need_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block form keeps every positive dead pre-activation of a row holding at most k_aux of them and takes the
    top k_aux only on the rows holding more: with both kinds of row in one batch, loss and gradients are still the
    dense reference's."""
    from monoscope.sae import topk as topk_mod

    monkeypatch.setattr(topk_mod, "BLOCK_AUXK_DEAD_PER_K_AUX", CPU_PATHS["block"])
    sparse, dense = _pair("topk")
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(0)) * 1.5
    dead = torch.zeros(N_FEAT, dtype=torch.bool)
    dead[torch.randperm(N_FEAT, generator=torch.Generator().manual_seed(3))[:10]] = True
    with torch.no_grad():
        pre = (x - sparse.b_dec) @ sparse.W_enc[dead].T + sparse.b_enc[dead]
    positives = (pre > 0).sum(1)
    assert (positives > 5).any() and (positives <= 5).any(), positives  # k_aux = 5: both kinds of row
    losses = []
    for sae in (sparse, dense):
        sae.train()
        out = sae(x, dead_mask=dead)
        out.aux.backward()
        losses.append(out.aux.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(sparse, name).grad, getattr(dense, name).grad, rtol=1e-4, atol=1e-5), name


def test_sparse_auxk_golden_value(cpu_path: str) -> None:
    """A fixed tiny transcoder: the AuxK term to 6 digits (changes if selection, scaling or units change)."""
    sparse, _ = _pair("transcoder")
    x = torch.randn(B, 2 * D, generator=torch.Generator().manual_seed(0)) * 1.5
    dead = torch.zeros(N_FEAT, dtype=torch.bool)
    dead[::3] = True  # 16 dead >= k_aux
    assert sparse(x, dead_mask=dead).aux.item() == pytest.approx(GOLDEN_AUX, rel=1e-5)


GOLDEN_AUX = 79.15858459472656  # measured with the dense reference too (test above)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "transcoder"])
@pytest.mark.parametrize("n_dead", [0, 3, 20])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_sync_free_auxk_equals_the_dead_list(monkeypatch: pytest.MonkeyPatch, arch: str, n_dead: int,
                                             compute_dtype: str, cpu_path: str) -> None:
    """The GPU's AuxK (a top-k over the masked pre-activations and dense products, no host sync), forced on the CPU,
    gives the dead-list AuxK's loss and gradients: with no dead latent, fewer than k_aux, and more."""
    from monoscope.sae import topk as topk_mod

    width = 2 * D if arch == "transcoder" else D
    x = torch.randn(B, width, generator=torch.Generator().manual_seed(0)) * 1.5
    dead = torch.zeros(N_FEAT, dtype=torch.bool)
    dead[torch.randperm(N_FEAT, generator=torch.Generator().manual_seed(3))[:n_dead]] = True
    auxes, grads = [], []
    for devices in (set(), {"cpu"}):
        monkeypatch.setattr(topk_mod, "SYNC_FREE_AUXK_DEVICES", devices)
        sae, _ = _pair(arch, compute_dtype=compute_dtype)
        sae.train()
        out = sae(x, dead_mask=dead)
        (out.aux + out.mse).backward()
        auxes.append(out.aux.item())
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
    assert (auxes[0] > 0) == (n_dead > 0) or arch == "matryoshka"
    assert auxes[1] == pytest.approx(auxes[0], rel=1e-5, abs=1e-7)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        if compute_dtype == "bfloat16":  # the sync-free AuxK's bf16 matmuls against bf16 per-entry sums: the
            # two round in a different order, so they agree to bf16's precision (8 bits), not bit for bit
            scale = float(grads[0][name].abs().max())
            assert torch.allclose(grads[1][name], grads[0][name], rtol=4e-3, atol=1e-3 * scale), name
            continue
        assert torch.allclose(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "transcoder"])
def test_joint_backward_row_gradients_are_bit_identical(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `joint_backward` (set by the Trainer) the block AuxK hands W_enc's and W_dec's gradients over as sparse
    rows: the loss mse + aux backpropagated as one gives the same dense `.grad` bit for bit (each entry is the same
    sum of two terms) as the dense zero-filled form."""
    from monoscope.sae import topk as topk_mod

    monkeypatch.setattr(topk_mod, "BLOCK_AUXK_DEAD_PER_K_AUX", CPU_PATHS["block"])
    sae, _ = _pair(arch)
    width = 2 * D if arch == "transcoder" else D
    x = torch.randn(B, width, generator=torch.Generator().manual_seed(0)) * 1.5
    dead = torch.zeros(N_FEAT, dtype=torch.bool)
    dead[torch.randperm(N_FEAT, generator=torch.Generator().manual_seed(3))[:20]] = True
    grads = []
    for joint in (False, True):
        sae.zero_grad(set_to_none=True)
        sae.joint_backward = joint
        out = sae.train()(x, dead_mask=dead)
        (out.mse + out.aux).backward()
        grads.append({n: p.grad for n, p in sae.named_parameters()})
    for name in ("W_enc", "W_dec"):
        assert grads[1][name].layout == torch.strided
        assert grads[1][name][dead].abs().sum() > 0
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_backward_with_transposed_copies_matches(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Wide blocks' backward (transposed copies of the inputs, the bias gradient from a row of ones) gives the
    narrow form's gradients: every input's, to the compute dtype's rounding."""
    from monoscope.sae import sparse

    gen = torch.Generator().manual_seed(0)
    n_rows, d, n_feat = 40, 12, 30
    cols = torch.tensor([1, 4, 5, 9, 17, 22, 29])
    grads = []
    for min_block in (10**9, 1):
        monkeypatch.setattr(sparse, "TRANSPOSED_GRAD_MIN_BLOCK", min_block)
        gen.manual_seed(0)
        x = torch.randn(n_rows, d, generator=gen)
        w_enc = torch.randn(n_feat, d, generator=gen).requires_grad_()
        b_enc = torch.randn(n_feat, generator=gen).requires_grad_()
        w_dec = torch.randn(n_feat, d, generator=gen).requires_grad_()
        shift = torch.randn(d, generator=gen).requires_grad_()
        we = w_enc.detach().index_select(0, cols)
        codes = torch.relu(x.to(dtype) @ we.to(dtype).t() + b_enc.detach()[cols].to(dtype))
        out = sparse.block_linear_decode(codes, cols, x.to(dtype), w_enc, we, b_enc, w_dec, shift)
        (out.float() * torch.randn(n_rows, d, generator=gen)).sum().backward()
        grads.append([t.grad.clone() for t in (w_enc, b_enc, w_dec, shift)])  # type: ignore[union-attr]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for narrow, wide in zip(*grads, strict=True):
        assert torch.allclose(wide, narrow, rtol=tol, atol=tol * float(narrow.abs().max())), (narrow, wide)
    assert bool((grads[1][1] != 0).any())


def test_padded_width_rounds_up_to_few_shapes() -> None:
    from monoscope.sae.sparse import padded_width

    assert [padded_width(n) for n in (1, 63, 64, 65, 600, 1024, 1025, 1280, 1281, 6000)] == \
        [64, 64, 64, 128, 640, 1024, 1280, 1280, 1536, 6144]


@pytest.mark.parametrize("min_block", [10**9, 1])  # the narrow and the wide (transposed-copies) backward
def test_padded_block_gives_the_unpadded_results(monkeypatch: pytest.MonkeyPatch, min_block: int) -> None:
    """A block handed with zero columns of codes and zero rows of we_block past its features (`padded_width`) gives
    the unpadded block's output and every gradient: the padding never reaches a result."""
    from monoscope.sae import sparse

    monkeypatch.setattr(sparse, "TRANSPOSED_GRAD_MIN_BLOCK", min_block)
    gen = torch.Generator().manual_seed(0)
    n_rows, d, n_feat = 40, 12, 30
    cols = torch.tensor([1, 4, 5, 9, 17, 22, 29])
    x = torch.randn(n_rows, d, generator=gen)
    params = [torch.randn(n_feat, d, generator=gen), torch.randn(n_feat, generator=gen),
              torch.randn(n_feat, d, generator=gen), torch.randn(d, generator=gen)]
    upstream = torch.randn(n_rows, d, generator=gen)
    results = []
    for n_pad in (len(cols), 16):
        w_enc, b_enc, w_dec, shift = (p.clone().requires_grad_() for p in params)
        we = sparse.pad_rows(w_enc.detach().index_select(0, cols), n_pad)
        codes = torch.relu(x @ we.t() + sparse.pad_rows(b_enc.detach()[cols], n_pad))
        assert codes.shape == (n_rows, n_pad)
        out = sparse.block_linear_decode(codes, cols, x, w_enc, we, b_enc, w_dec, shift)
        (out * upstream).sum().backward()
        results.append([out.detach(), *(t.grad for t in (w_enc, b_enc, w_dec, shift))])
    # not bit-exact everywhere: a wider product may take another kernel with another summation order (on a Zen 4
    # CPU one of 480 outputs moved by 2e-6 relative); padding that leaked into a result would move it by O(1)
    for unpadded, padded in zip(*results, strict=True):
        torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "transcoder"])  # their rows are encoded alone (not batchtopk's batch)
@pytest.mark.parametrize("form", ["sparse", "dense", "sync-free"])
def test_aux_rows_is_auxk_on_every_sth_row(arch: str, form: str, cpu_path: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`aux_rows=4` on 10 rows is AuxK on rows 0, 3, 6, 9 (every ⌈10/4⌉-th): the same term and the same gradients
    as AuxK over a batch of those 4 rows alone, on every form of AuxK."""
    from monoscope.sae import topk as topk_mod

    monkeypatch.setattr(topk_mod, "SYNC_FREE_AUXK_DEVICES", {"cpu"} if form == "sync-free" else set())
    width = 2 * D if arch == "transcoder" else D
    x = torch.randn(B, width, generator=torch.Generator().manual_seed(0)) * 1.5
    dead = torch.zeros(N_FEAT, dtype=torch.bool)
    dead[::3] = True
    results = []
    for rows, batch in ((4, x), (0, x[::3])):
        sparse, dense = _pair(arch, aux_rows=rows)
        sae = dense if form == "dense" else sparse
        sae.train()
        out = sae(batch, dead_mask=dead)
        out.aux.backward()
        results.append((out.aux.item(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}))
    (aux_sub, grads_sub), (aux_ref, grads_ref) = results
    assert aux_sub > 0 and aux_sub == pytest.approx(aux_ref, rel=1e-5)
    assert grads_sub.keys() == grads_ref.keys()
    for name in grads_ref:
        assert torch.allclose(grads_sub[name], grads_ref[name], rtol=1e-4, atol=1e-6), name


def test_aux_rows_bad_value_is_named() -> None:
    from monoscope.sae.config import SAEConfigError

    msg = r"SAEConfig.aux_rows=-1 is out of range \(0: every row\): use an integer >= 0"
    with pytest.raises(SAEConfigError, match=msg):
        SAEConfig(arch="topk", d_in=D, d_sae=N_FEAT, k=3, aux_rows=-1)
