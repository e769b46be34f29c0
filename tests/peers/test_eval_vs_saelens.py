"""monoscope's eval numbers equal SAELens's own evals on the same SAE, tokens and kept rows.

The SAE is exported to SAELens's folder format and evaluated by `sae_lens.evals.run_evals` (through
`benchmarks/saelens_eval.py`, on a TransformerLens model built from the same weights) and by monoscope's
`Splicer` + `ReconAccumulator` on the HF model, both in fp32, with SAELens's row rule on both sides
(rows whose input token is BOS, <|im_end|> or the separator are neither replaced nor counted) and its
zero-ablation convention (every row). Stated tolerance: 1e-4, absolute or relative whichever is larger, on
explained variance, CE and KL (measured agreement ~5e-7 on most numbers; KL of the zero ablation, ~7.4
nats, differed by 1.3e-4 = 2e-5 relative: TransformerLens and HF differ by ~1e-4 in logits at most).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from monoscope.corpus import open_corpus
from monoscope.corpus.contexts import batched_contexts
from monoscope.eval import ReconAccumulator, Splicer
from monoscope.eval.splice import LMAccumulator
from monoscope.interop import write_saelens
from monoscope.model import load_model
from monoscope.sae import SAEConfig, build_sae

pytestmark = [pytest.mark.peers, pytest.mark.integration]

HOOK, CTX, N_CTX, BATCH = "resid_post.15", 64, 4, 2
IGNORED = [0, 1, 2]  # <|endoftext|> separator, BOS <|im_start|>, <|im_end|> (SmolLM2)
TOL = 1e-4


def test_eval_matches_saelens_run_evals(tmp_path: Path) -> None:
    pytest.importorskip("sae_lens", reason="make test installs sae-lens")
    from benchmarks import saelens_eval

    lm = load_model("default", device="cpu", compute_dtype="fp32")
    tokens = next(batched_contexts(lm, open_corpus("default"), CTX, N_CTX))
    tokens[0, 20], tokens[1, 33] = 0, 2  # a separator (an attention sink) and an <|im_end|> inside contexts
    d = lm.d_model
    sae = build_sae(SAEConfig(arch="topk", d_in=d, d_sae=2 * d, k=48, hook=HOOK, model=lm.model_id,
                              compute_dtype="float32"), seed=0)
    with torch.no_grad():  # a real partial reconstruction, known in advance: the 48 largest |x_i| coordinates
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.eval()
    write_saelens(sae, tmp_path / "saelens")

    ref: dict[str, Any] = saelens_eval.saelens_eval(tmp_path / "saelens", tokens, HOOK, batch_size=BATCH,
                                                    exclude_special_tokens=IGNORED)

    ign = torch.tensor(IGNORED)
    sp = Splicer(lm, lm.hook(HOOK), sae, lambda _h, ids: ~torch.isin(ids, ign),
                 count=lambda ids: ~torch.isin(ids, ign), error_check=False, zero_all=True)
    lacc, racc = LMAccumulator(sp.variants), ReconAccumulator(sae.cfg.d_sae, CTX)
    for ids in tokens.split(BATCH):
        b = sp.run(ids)
        lacc.add(b)
        racc.add(b.x, b.x_hat, b.active, b.positions)
    ours, rec = lacc.result(), racc.result()

    assert rec.rows == ref["n_rows"] and ours.predictions == ref["n_ce"]
    pairs = {"explained_variance": rec.explained_variance, "l0": rec.l0_mean, "ce_clean": ours.ce_clean,
             "ce_spliced": ours.ce_spliced, "ce_zero": ours.ce_zero, "ce_loss_recovered": ours.ce_recovered,
             "kl_spliced": ours.kl_spliced, "kl_zero": ours.kl_zero}
    for name, value in pairs.items():
        assert value == pytest.approx(ref[name], abs=TOL, rel=TOL), (name, value, ref[name])
