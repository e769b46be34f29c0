"""The SAELens reference harness (benchmarks/saelens_eval.py) is trustworthy: its TransformerLens model
is the default model (same residual stream and logits as HF, fp32), and SAELens's numbers equal a
plain-torch recomputation on the HF model that follows the harness's stated `definitions` (1e-4).

Uses the real default model (SmolLM2-135M-Instruct) on 3 contexts x 64 tokens and SAEs built in the
test ([I; -I] encoders/decoders, so their reconstruction is known), exported with monoscope's
`write_saelens`. Measured (CPU fp32, 8 x 128 tokens): TL-vs-HF residual rows <= 2.3e-6 relative (3.8e-7
overall), logits and log-probs <= 1.2e-4 absolute; the recomputation matched SAELens to <= 5e-7 on a trained
SAE, so 1e-4 leaves room for other BLAS orders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from monoscope.corpus import open_corpus
from monoscope.corpus.contexts import batched_contexts
from monoscope.interop import load_any, write_saelens
from monoscope.model import LoadedModel, load_model
from monoscope.sae import SAEConfig, build_sae

pytestmark = [pytest.mark.peers, pytest.mark.integration]

LAYER, CTX, N_CTX, BATCH = 15, 64, 3, 2  # batch 2 of 3 contexts: a short last batch tests the pooling
BOS, IM_END, SEP = 1, 2, 0


@pytest.fixture(scope="module")
def harness() -> Any:
    pytest.importorskip("sae_lens", reason="make test installs sae-lens")
    from benchmarks import saelens_eval

    return saelens_eval


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load_model("default", device="cpu", compute_dtype="fp32")


@pytest.fixture(scope="module")
def tl(harness: Any, smol: LoadedModel) -> Any:
    return harness.hooked_transformer_from_hf(smol.model, smol.tokenizer, n_ctx=CTX)


@pytest.fixture(scope="module")
def ids(smol: LoadedModel) -> torch.Tensor:
    """Real contexts (BOS at 0), plus an <|im_end|> (a SAELens-ignored id) and a separator mid-context."""
    t = next(batched_contexts(smol, open_corpus("default"), CTX, N_CTX)).clone()
    t[1, 20], t[2, 30] = IM_END, SEP
    assert (t[:, 0] == BOS).all()
    return t


def _signed_identity_sae(folder: Path, k: int, d: int = 576, b_dec_scale: float = 0.0) -> Path:
    """TopK SAE with W_enc = W_dec = [I; -I]: keeps the k largest |x_i - b_dec_i|; k = d is exact."""
    sae = build_sae(SAEConfig(arch="topk", d_in=d, d_sae=2 * d, k=k, compute_dtype="float32",
                              hook=f"resid_post.{LAYER}", b_dec_to_input=True), seed=0)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.linspace(-1.0, 1.0, d) * b_dec_scale)
    return write_saelens(sae.eval(), folder)


@torch.no_grad()
def _hf_logits(lm: LoadedModel, ids: torch.Tensor, replace: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> torch.Tensor:
    """HF logits with the output of block LAYER replaced by replace(h) (None: clean)."""
    def hook(_m: Any, _i: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (replace(out[0]), *out[1:])  # type: ignore[misc]
        return replace(out)  # type: ignore[misc]

    handle = lm.model.model.layers[LAYER].register_forward_hook(hook) if replace else None
    try:
        return lm.model(ids).logits.float()
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def _recompute(lm: LoadedModel, ids: torch.Tensor, sae_dir: Path, ignored: list[int]) -> dict[str, float]:
    """The harness's `definitions`, in plain torch on the HF model, with monoscope's own reading of the SAE."""
    sae = load_any(sae_dir)
    sae.cfg.compute_dtype = "float32"
    x = lm.model(ids, output_hidden_states=True).hidden_states[LAYER + 1].float()
    kept = ~torch.isin(ids, torch.tensor(ignored))
    x_hat = sae.reconstruct_raw(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    xs, xh = x[kept].double(), x_hat[kept].double()
    ev = 1 - (xs - xh).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
    l0 = (sae.encode_raw(x[kept]) != 0).sum(-1).float().mean()

    logits = {
        "clean": _hf_logits(lm, ids),
        "spliced": _hf_logits(lm, ids, lambda h: torch.where(kept[..., None], x_hat.to(h.dtype), h)),
        "zero": _hf_logits(lm, ids, torch.zeros_like),
    }
    logp = {k: v.log_softmax(-1) for k, v in logits.items()}
    out = {"explained_variance": ev.item(), "l0": l0.item()}
    for name, lp in logp.items():
        nll = -lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        out[f"ce_{name}"] = nll[kept[:, :-1]].mean().item()
    for name in ("spliced", "zero"):
        kl = (logp["clean"].exp() * (logp["clean"] - logp[name])).sum(-1)
        out[f"kl_{name}"] = kl[kept].mean().item()
    out["ce_loss_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / (out["ce_zero"] - out["ce_clean"])
    return out


def test_transformer_lens_model_is_the_hf_model(harness: Any, tl: Any, smol: LoadedModel, ids: torch.Tensor) -> None:
    gap = harness.tl_hf_agreement(tl, smol.model, ids, LAYER)
    assert gap["resid_max_row_rel"] < 1e-5, gap  # fp32 summation order only
    assert gap["logits_max_abs"] < 1e-3 and gap["logprobs_max_abs"] < 1e-3, gap
    assert tl.cfg.n_layers == 30 and tl.cfg.d_model == 576


def test_exact_sae_costs_nothing(harness: Any, tl: Any, ids: torch.Tensor, tmp_path: Path) -> None:
    res = harness.saelens_eval(_signed_identity_sae(tmp_path / "exact", k=576, b_dec_scale=0.5), ids,
                               f"resid_post.{LAYER}", BATCH, model=tl)
    assert res["ignored_token_ids"] == [BOS, IM_END]
    assert res["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert res["ce_spliced"] == pytest.approx(res["ce_clean"], abs=1e-5)
    assert res["kl_spliced"] < 1e-5
    assert res["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)


def test_saelens_numbers_follow_the_stated_definitions(harness: Any, tl: Any, smol: LoadedModel, ids: torch.Tensor,
                                                      tmp_path: Path) -> None:
    k = 48
    sae_dir = _signed_identity_sae(tmp_path / "lossy", k=k, b_dec_scale=0.3)
    res = harness.saelens_eval(sae_dir, ids, f"resid_post.{LAYER}", BATCH, model=tl, per_batch=True)

    # sensible: a lossy splice sits between the clean and the zero-ablated model
    assert 0 < res["explained_variance"] <= 1 and res["fvu"] == pytest.approx(1 - res["explained_variance"])
    assert res["ce_clean"] < res["ce_spliced"] < res["ce_zero"]
    assert 0 <= res["kl_spliced"] < res["kl_zero"] and 0 < res["ce_loss_recovered"] < 1
    assert 0 < res["l0"] <= k
    kept = ~torch.isin(ids, torch.tensor([BOS, IM_END]))
    assert res["n_rows"] == int(kept.sum()) and res["n_ce"] == int(kept[:, :-1].sum())

    # exact: plain torch on HF, following `definitions`, gives SAELens's numbers
    mine = _recompute(smol, ids, sae_dir, res["ignored_token_ids"])
    for key, value in mine.items():
        assert res[key] == pytest.approx(value, abs=1e-4), (key, res[key], value)

    # pooled, not a mean of batch means: the token-weighted mean of the per-batch numbers is the pooled one
    per = res["per_batch"]
    assert len(per) == 2 and [p["n_ce"] for p in per] == [int(kept[:2, :-1].sum()), int(kept[2:, :-1].sum())]
    for key, n in (("ce_clean", "n_ce"), ("ce_spliced", "n_ce"), ("kl_spliced", "n_rows"), ("l0", "n_rows")):
        pooled = sum(p[key] * p[n] for p in per) / sum(p[n] for p in per)
        assert res[key] == pytest.approx(pooled, abs=1e-5), key
    assert abs(per[0]["ce_spliced"] - per[1]["ce_spliced"]) > 1e-3  # the batches differ, so the check bites


def test_definitions_name_every_number(harness: Any) -> None:
    d = harness.definitions([BOS, IM_END], "blocks.15.hook_resid_post")
    for key in ("positions", "explained_variance", "ce", "kl", "splice", "ce_loss_recovered", "l0"):
        assert d[key]
    assert "[1, 2]" in d["positions"]
