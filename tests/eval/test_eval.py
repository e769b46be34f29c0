"""What every evaluation number means, pinned on SAEs whose answer is known (identity, zero, half)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monoscope.capture import capture
from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.eval import ReconAccumulator, Splicer, evaluate
from monoscope.eval.splice import LMAccumulator
from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.io import save_sae
from monoscope.store import ActivationStore
from monoscope.store.manifest import RowPolicy
from tests.conftest import TRAIN_TEXT, make_llama

D = 64
HOOK = "resid_post.1"
SMALL = {"ctx_len": 16, "batch_contexts": 2, "contexts_per_shard": 4, "progress": False}


def identity_sae(normaliser: float = 1.0, scale: float = 1.0, hook: str | None = HOOK, model: str | None = None):  # type: ignore[no-untyped-def]
    """ReLU(x) − ReLU(−x) = x: W_enc = [I; −I], W_dec = scale·[I; −I]; exact in float32."""
    cfg = SAEConfig(arch="relu-l1", d_in=D, d_sae=2 * D, normaliser=normaliser, hook=hook, model=model,
                    compute_dtype="float32")
    sae = build_sae(cfg, seed=0)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(scale * torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_recon_metrics_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, D, generator=g) * 3 + 1
    x_hat = x * 0.5 + 0.1 * torch.randn(300, D, generator=g)
    active = torch.rand(300, 40, generator=g) < 0.1
    active[:, 0] = True  # dense feature
    active[:, 1] = False  # dead feature
    pos = torch.arange(300) % 16
    acc = ReconAccumulator(40, 16)
    for sl in (slice(0, 100), slice(100, 300)):  # batches sum to the whole
        acc.add(x[sl], x_hat[sl], active[sl], pos[sl])
    m = acc.result()
    sst = ((x - x.mean(0)) ** 2).sum()
    assert m.fvu == pytest.approx(float(((x - x_hat) ** 2).sum() / sst), rel=1e-6)
    assert m.explained_variance == pytest.approx(1 - m.fvu)
    assert m.l0_mean == pytest.approx(float(active.sum(1).float().mean()), rel=1e-6)
    assert sum(m.l0_hist) == 300 and m.l0_hist[int(active.sum(1).max())] > 0
    assert m.dead_frac == pytest.approx(float((active.sum(0) == 0).float().mean()))
    assert m.dense_frac == pytest.approx(float((active.float().mean(0) > 0.1).float().mean()))
    assert m.shrinkage_norm_ratio == pytest.approx(float((x_hat.norm(dim=1) / x.norm(dim=1)).mean()), rel=1e-5)
    at3 = pos == 3
    want3 = ((x[at3] - x_hat[at3]) ** 2).sum() / ((x[at3] - x.mean(0)) ** 2).sum()
    assert m.fvu_by_position[3] == pytest.approx(float(want3), rel=1e-6)
    assert m.rows_by_position[3] == int(at3.sum())


def _keep_all_but_bos(h: torch.Tensor, _ids: torch.Tensor) -> torch.Tensor:
    return RowPolicy(exclude_bos=True, outlier_factor=0).keep(h)


def _ids(lm, n: int = 4, t: int = 16) -> torch.Tensor:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(lm.tokenizer), (n, t), generator=g)
    ids[:, 0] = lm.tokenizer.bos_token_id
    return ids


def _lm_metrics(lm, sae, **kw):  # type: ignore[no-untyped-def]
    sp = Splicer(lm, lm.hook(HOOK), sae, _keep_all_but_bos, **kw)
    acc, rec = LMAccumulator(sp.variants), ReconAccumulator(sae.cfg.d_sae, 16)
    for ids in _ids(lm).split(2):
        b = sp.run(ids)
        acc.add(b)
        rec.add(b.x, b.x_hat, b.active, b.positions)
    return acc.result(), rec.result(), sp


def test_identity_sae_recovers_everything(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    # normaliser 7: the constant is applied and removed consistently, so identity stays identity
    lmm, rec, sp = _lm_metrics(tiny_lm, identity_sae(normaliser=7.0))
    assert sp.stacked is True  # one forward carried all variants on the Llama layout
    assert rec.fvu < 1e-10 and rec.shrinkage_norm_ratio == pytest.approx(1.0, abs=1e-6)
    assert lmm.ce_spliced == pytest.approx(lmm.ce_clean, abs=1e-5)
    assert lmm.ce_recovered == pytest.approx(1.0, abs=1e-4)
    assert abs(lmm.kl_spliced) < 1e-6
    assert lmm.ce_zero > lmm.ce_clean + 0.01 and lmm.kl_zero > 0.01
    assert lmm.predictions == 4 * 14 and lmm.kl_positions == 4 * 15  # the BOS position is not counted


def test_zero_sae_gives_the_zero_ablation_numbers(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    lmm, rec, _ = _lm_metrics(tiny_lm, identity_sae(scale=0.0))
    assert lmm.ce_spliced == pytest.approx(lmm.ce_zero, abs=1e-6)
    assert lmm.kl_spliced == pytest.approx(lmm.kl_zero, abs=1e-6)
    assert lmm.ce_recovered == pytest.approx(0.0, abs=1e-6)
    assert rec.shrinkage_norm_ratio == 0.0


def _ce_with_half_hook(lm) -> float:  # type: ignore[no-untyped-def]
    """Mean next-token CE over non-BOS inputs with resid_post.1 halved at positions >= 1, by a plain torch hook."""
    def halve(_mod, _inp, out):  # type: ignore[no-untyped-def]
        h = out[0] if isinstance(out, tuple) else out
        h = torch.cat([h[:, :1], h[:, 1:] * 0.5], dim=1)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    ids = _ids(lm)
    handle = lm.model.model.layers[1].register_forward_hook(halve)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids, use_cache=False).logits.float()
    finally:
        handle.remove()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none").view(ids.shape[0], -1)
    counted = ids[:, :-1] != lm.tokenizer.bos_token_id
    return float(nll[counted].mean())


def test_stacked_forward_out_of_memory_falls_back_and_says_so(tiny_lm, capsys) -> None:  # type: ignore[no-untyped-def]
    half = identity_sae(normaliser=3.0, scale=0.5)
    sp = Splicer(tiny_lm, tiny_lm.hook(HOOK), half, _keep_all_but_bos)
    plain = sp._logits

    def oom_when_stacked(ids: torch.Tensor) -> torch.Tensor:
        out = plain(ids)
        if out.shape[0] > ids.shape[0]:  # the stacked batch: as if the allocation failed
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return out

    sp._logits = oom_when_stacked  # type: ignore[method-assign]
    b = sp.run(_ids(tiny_lm)[:2])
    assert sp.stacked is False and sp.fallback == "out of memory with 4 variants x 2 contexts stacked"
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "lower --batch-contexts (now 2)" in err
    ref = Splicer(tiny_lm, tiny_lm.hook(HOOK), half, _keep_all_but_bos, stacked=False).run(_ids(tiny_lm)[:2])
    assert b.ce_sum == ref.ce_sum and b.kl_sum == ref.kl_sum  # the fallback computes the same numbers


def test_error_term_check_and_stacked_equals_separate(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    half = identity_sae(normaliser=3.0, scale=0.5)  # x̂ = x/2: between identity and zero
    a, ra, _ = _lm_metrics(tiny_lm, half, stacked=True)
    b, rb, _ = _lm_metrics(tiny_lm, half, stacked=False)
    assert a.ce_error == pytest.approx(a.ce_clean, abs=1e-5) and abs(a.kl_error or 0) < 1e-6
    # the spliced loss is the loss of a plain forward whose hook output is halved on every row but the BOS
    assert a.ce_spliced == pytest.approx(_ce_with_half_hook(tiny_lm), abs=1e-5)
    assert a.ce_spliced != pytest.approx(a.ce_clean, abs=1e-3)  # halving the residual changes the loss
    for f in ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero"):
        assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-4, abs=1e-6), f
    assert ra.fvu == pytest.approx(rb.fvu, rel=1e-6)
    # x̂ = x/2 on raw activations: shrinkage exactly 0.5 whatever the normaliser
    assert ra.shrinkage_norm_ratio == pytest.approx(0.5, abs=1e-6)


# ----------------------------------------------------------------------------- the whole stage


@pytest.fixture
def run_dir(tmp_path: Path, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    """A store captured from a saved tiny model (so evaluate() can reload it) + an identity SAE."""
    model = tmp_path / "model"
    make_llama(len(tokenizer), seed=5).save_pretrained(model)
    tokenizer.save_pretrained(model)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} number {i}"}) + "\n" for i, t in enumerate(TRAIN_TEXT * 3)))
    capture(tmp_path / "acts", model=str(model), corpus=str(corpus), hook=HOOK, tokens=320, compute_dtype="fp32",
            **SMALL)
    store = ActivationStore.open(tmp_path / "acts")
    save_sae(identity_sae(normaliser=store.normaliser, model=store.manifest.model["id"]), tmp_path / "sae")
    return tmp_path


def test_evaluate_writes_metrics_and_plots(run_dir: Path) -> None:
    res = evaluate(run_dir / "sae", acts=run_dir / "acts", lm=True, tokens=200, progress=False)
    assert res.out == run_dir / "eval"
    assert res.store.rows == 200 and res.store.fvu < 1e-8
    assert res.heldout is not None and res.heldout.fvu < 1e-8
    assert res.lm is not None and res.lm.ce_recovered == pytest.approx(1.0, abs=1e-4)
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert m["sae"]["weights_sha256"] and m["store"]["manifest_sha256"]
    assert m["lm"]["predictions"] == res.lm.predictions and m["lm_eval"]["tokens"] == 13 * 16
    for name in ("density.png", "l0.png", "fvu_by_position.png", "losses.png"):
        assert (run_dir / "eval" / name).read_bytes()[:4] == b"\x89PNG"
    # held-out contexts follow the store's: none of them is a context of the store
    store_ctx = {tuple(t.tolist()) for t, _ in ActivationStore.open(run_dir / "acts").iter_contexts()}
    from monoscope.eval.data import heldout_contexts
    from monoscope.model import load_model

    lm = load_model(str(run_dir / "model"), compute_dtype="fp32")
    held = torch.cat(list(heldout_contexts(ActivationStore.open(run_dir / "acts"), lm, 5, 2)))
    assert len(held) == 5 and not any(tuple(t.tolist()) in store_ctx for t in held.int())


def test_reuse_returns_an_identical_earlier_evaluation(run_dir: Path) -> None:
    first = evaluate(run_dir / "sae", acts=run_dir / "acts", lm=True, tokens=100, progress=False, reuse=True)
    again = evaluate(run_dir / "sae", acts=run_dir / "acts", lm=True, tokens=100, progress=False, reuse=True)
    assert not first.reused and again.reused
    assert again.store == first.store and again.heldout == first.heldout and again.lm == first.lm
    other = evaluate(run_dir / "sae", acts=run_dir / "acts", lm=True, tokens=120, progress=False, reuse=True)
    assert not other.reused and other.store.rows == 120  # another request: evaluated again


def test_eval_cli_and_bad_input(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(run_dir / "sae"), "--acts", str(run_dir / "acts"), "--tokens", "100", "--quiet",
                 "--out", str(run_dir / "e2")]) == 0
    out = capsys.readouterr().out
    assert "FVU" in out and str(run_dir / "e2" / "metrics.json") in out
    cases = [
        (["eval", str(run_dir / "nope"), "--acts", str(run_dir / "acts")], "does not exist"),
        (["eval", str(run_dir / "sae"), "--acts", str(run_dir / "acts"), "--tokens", "1M"], "--tokens 1,000,000"),
        (["eval", str(run_dir / "sae"), "--acts", str(run_dir / "nostore")], "does not exist"),
    ]
    other = identity_sae(hook="resid_post.0")
    save_sae(other, run_dir / "sae_other_hook")
    cases.append((["eval", str(run_dir / "sae_other_hook"), "--acts", str(run_dir / "acts")], "resid_post.0"))
    save_sae(identity_sae(model="some/other-model"), run_dir / "sae_other_model")
    cases.append((["eval", str(run_dir / "sae_other_model"), "--acts", str(run_dir / "acts")], "some/other-model"))
    for argv, needle in cases:
        assert main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err
    with pytest.raises(MonoscopeError, match="at least 1"):
        evaluate(run_dir / "sae", acts=run_dir / "acts", tokens=0)
