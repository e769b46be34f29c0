"""What the SAEBench metric families share: the residual rows of texts through the model (kept for several SAEs
on one model and hook by `saebench_many`), texts encoded to pooled residuals and SAE codes, and the small probe and
score helpers (scikit-learn's logistic probe, F1, SAEBench's EPS)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

EPS = 1e-6  # SAEBench's EPS for "a latent fired"


def _sk_probe(x: np.ndarray, y: np.ndarray, **kw: Any) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(**kw).fit(x, y)


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float(np.sum(y & pred))
    fp = float(np.sum(~y & pred))
    fn = float(np.sum(y & ~pred))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


_KEEP = [False]
_RESID_MEMO: dict[tuple[Any, ...], list[Tensor]] = {}
"""Residual rows per text, keyed by (model, hook, texts, positions, ctx_len): several SAEs on one model and hook
(`saebench_many`) run the model once."""


def _resid_rows(lm: Any, hp: Any, texts: Sequence[str], *, ctx_len: int, batch: int,
                positions: Sequence[int] | None) -> list[Tensor]:
    """Per text: the residual row at `positions[i]` (negative: from the end), or its rows after BOS."""
    import hashlib

    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key = (id(lm.model), str(hp), digest, tuple(positions) if positions is not None else None, ctx_len)
    if key in _RESID_MEMO:
        return _RESID_MEMO[key]
    tok = lm.tokenizer
    bos = lm.special_ids()[0]
    ids = [([bos] + tok(t, add_special_tokens=False)["input_ids"])[:ctx_len] for t in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    rows: list[Tensor | None] = [None] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # length-sorted batches, less padding
    for s in range(0, len(order), batch):
        sel = order[s:s + batch]
        T = max(len(ids[i]) for i in sel)
        x = torch.full((len(sel), T), pad, dtype=torch.long)
        for r, i in enumerate(sel):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
        acts = lm.acts(hp, x).cpu()  # [B, T, d]; right padding leaves a causal model's earlier rows unchanged
        for r, i in enumerate(sel):
            n = len(ids[i])
            if positions is not None:
                p = positions[i] if positions[i] >= 0 else n + positions[i]
                rows[i] = acts[r, p:p + 1].clone()
            else:
                rows[i] = acts[r, 1:n].clone() if n > 1 else acts[r, :1].clone()
    out = [r for r in rows if r is not None]
    if not _KEEP[0]:
        _RESID_MEMO.clear()  # one entry outside `saebench_many`: bounded memory
    _RESID_MEMO[key] = out
    return out


def _encode_tokens(lm: Any, sae: Any, hp: Any, texts: Sequence[str], *, ctx_len: int, batch: int,
                   positions: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise (BOS + text, cut to ctx_len), run to the hook, and return per text either the activation at
    `positions[i]` or the mean over its tokens after BOS: (residual [N, d] float32, SAE codes [N, F] float32)."""
    dev = next(sae.parameters()).device
    res, codes = [], []
    with torch.inference_mode():
        for rows in _resid_rows(lm, hp, texts, ctx_len=ctx_len, batch=batch, positions=positions):
            res.append(rows.mean(0).numpy())
            codes.append(sae.encode_raw(rows.to(dev)).float().mean(0).cpu().numpy())
    return np.stack(res).astype(np.float32), np.stack(codes).astype(np.float32)
