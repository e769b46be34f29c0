"""Per-feature running statistics over a stream of SAE codes, vectorised over whole batches.

Every update is a handful of tensor ops on [batch, features] or [features, kept] arrays (no Python loop
over features), and the state is bounded by features × examples kept, not by the corpus:

- counts: fires, Σ activation, max activation, a log-spaced activation histogram (HIST_EDGES);
- top contexts: the K contexts with the largest per-context maximum, per feature ([F, K] values + ids);
- a uniform reservoir of R active contexts per feature (priority sampling: each (feature, context)
  pair gets a pseudo-random key from a hash of its ids, the R smallest keys are kept), from which the
  quantile examples are drawn: R samples sorted by activation, split into `bins` deciles;
- co-occurrence counts [F, F] of features active on the same token (only when F ≤ COOC_MAX_FEATURES).
The state is a dict of tensors (`state_dict`), saved with each checkpoint; keys depend only on ids, so
a resumed pass ends identical to an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor

HIST_EDGES = torch.logspace(-3, 3, 49)
"""Activation histogram bin edges (48 log-spaced bins from 1e-3 to 1e3, in the SAE's feature units);
values below the first edge go to bin 0, above the last to the last bin."""
COOC_MAX_FEATURES = 16_384
"""Above this many features the dense [F, F] co-occurrence table (4·F² bytes) is not kept."""


def _hash_keys(ctx: Tensor, feat: Tensor, salt: int = 0x9E3779B9) -> Tensor:
    """A deterministic pseudo-random float in [0, 1) per (context, feature) pair (splitmix-style mixing
    in int64), so reservoir sampling does not depend on batch boundaries or resumes."""
    x = ctx.to(torch.int64) * 1_000_003 + feat.to(torch.int64) * 7_919 + salt
    x = (x ^ (x >> 31)) * 0x5DEECE66D
    x = (x ^ (x >> 29)) * 0x2545F491
    x = x ^ (x >> 32)
    return (x & 0xFFFFFF).to(torch.float32) / float(1 << 24)


class FeatureStats:
    def __init__(self, d_sae: int, top_k: int = 20, reservoir: int = 50, cooc: bool | None = None) -> None:
        F = d_sae
        self.d_sae, self.top_k, self.reservoir = F, top_k, reservoir
        self.tokens = 0
        self.fires = torch.zeros(F, dtype=torch.int64)
        self.sum_act = torch.zeros(F, dtype=torch.float64)
        self.max_act = torch.zeros(F, dtype=torch.float32)
        self.hist = torch.zeros(F, len(HIST_EDGES) - 1, dtype=torch.int64)
        self.top_val = torch.zeros(F, top_k, dtype=torch.float32)
        self.top_ctx = torch.full((F, top_k), -1, dtype=torch.int64)
        self.res_key = torch.full((F, reservoir), float("inf"), dtype=torch.float32)
        self.res_val = torch.zeros(F, reservoir, dtype=torch.float32)
        self.res_ctx = torch.full((F, reservoir), -1, dtype=torch.int64)
        use_cooc = F <= COOC_MAX_FEATURES if cooc is None else cooc
        self.cooc = torch.zeros(F * F, dtype=torch.int32) if use_cooc else None

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, idx: Tensor, val: Tensor, ctx_ids: Tensor, ctx_len: int) -> None:
        """Sparse codes of a batch of whole contexts: idx, val [B·T, L] (feature ids and activations of
        the L largest features per token, 0 where fewer are active); ctx_ids [B] global context index."""
        B = ctx_ids.numel()
        F = self.d_sae
        on = val > 0  # [N, L]
        self.tokens += idx.shape[0]
        fi, fv = idx[on], val[on]  # flat active entries
        self.fires += torch.bincount(fi, minlength=F)
        self.sum_act.index_add_(0, fi, fv.double())
        self.max_act = torch.maximum(self.max_act, torch.zeros(F).scatter_reduce_(0, fi, fv, "amax"))
        b = torch.bucketize(fv, HIST_EDGES[1:-1])
        self.hist.view(-1).index_add_(0, fi * self.hist.shape[1] + b, torch.ones_like(fi))
        # per-context maximum of every feature: [B, F] (the dense shape is bounded by the batch)
        row_ctx = torch.arange(idx.shape[0]) // ctx_len  # [N] context within batch
        rc = row_ctx[:, None].expand_as(idx)[on]
        cmax = torch.zeros(B * F).scatter_reduce_(0, rc * F + fi, fv, "amax").view(B, F)
        ctx_t = cmax.T.contiguous()  # [F, B]
        cand_ctx = ctx_ids[None, :].expand(F, B)
        v = torch.cat([self.top_val, ctx_t], 1)
        c = torch.cat([self.top_ctx, cand_ctx], 1)
        self.top_val, pos = v.topk(self.top_k, dim=1)  # ties: lowest position first (earlier contexts)
        self.top_ctx = c.gather(1, pos)
        # reservoir: keys for active (feature, context) pairs, inf where the feature is silent
        keys = torch.where(ctx_t > 0, _hash_keys(cand_ctx, torch.arange(F)[:, None].expand(F, B)),
                           torch.tensor(float("inf")))
        k = torch.cat([self.res_key, keys], 1)
        rv = torch.cat([self.res_val, ctx_t], 1)
        rcx = torch.cat([self.res_ctx, cand_ctx], 1)
        self.res_key, pos = k.topk(self.reservoir, dim=1, largest=False)
        self.res_val, self.res_ctx = rv.gather(1, pos), rcx.gather(1, pos)
        empty = torch.isinf(self.res_key)  # fewer active contexts than slots so far
        self.res_ctx[empty], self.res_val[empty] = -1, 0.0
        if self.cooc is not None:  # pairs of features active on the same token
            ii = torch.where(on, idx, F)  # inactive -> sentinel F
            pairs = ii[:, :, None] * (F + 1) + ii[:, None, :]  # [N, L, L] in the (F+1)^2 grid
            pairs = pairs[(ii[:, :, None] < F) & (ii[:, None, :] < F)]
            a, bb = pairs // (F + 1), pairs % (F + 1)
            self.cooc.index_add_(0, a * F + bb, torch.ones_like(a, dtype=torch.int32))

    # ------------------------------------------------------------------ results
    def density(self) -> Tensor:
        return self.fires.double() / max(self.tokens, 1)

    def mean_act(self) -> Tensor:
        """Mean activation over the tokens where the feature is active."""
        return self.sum_act / self.fires.clamp_min(1).double()

    def quantile_examples(self, bins: int) -> tuple[Tensor, Tensor, Tensor]:
        """(values, contexts, bins) [F, R]: the reservoir sorted by activation (weakest first), bin b
        holding the b-th of `bins` equal slices of the sampled ranks (context -1 = empty slot)."""
        val = torch.where(self.res_ctx >= 0, self.res_val, torch.tensor(float("inf")))
        order = val.argsort(dim=1)
        v, c = self.res_val.gather(1, order), self.res_ctx.gather(1, order)
        n = (self.res_ctx >= 0).sum(1, keepdim=True)  # [F, 1] samples held
        rank = torch.arange(self.reservoir)[None, :].expand_as(v)
        b = (rank * bins) // n.clamp_min(1)
        return v, torch.where(rank < n, c, -1), b.clamp_max(bins - 1)

    def cooccurrence(self, top: int = 10) -> tuple[Tensor, Tensor] | None:
        """(ids, P(j active | i active)) [F, top] of the most co-occurring other features, or None."""
        if self.cooc is None:
            return None
        F = self.d_sae
        out_i, out_p = [], []
        for s in range(0, F, 1024):
            m = self.cooc[s * F: min(F, s + 1024) * F].view(-1, F).float()
            rows = torch.arange(s, s + m.shape[0])
            m[torch.arange(m.shape[0]), rows] = -1  # not itself
            p, i = m.topk(min(top, F - 1), dim=1)
            out_i.append(i)
            out_p.append(p / self.fires[rows].clamp_min(1)[:, None].float())
        return torch.cat(out_i), torch.cat(out_p)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        s = {k: v for k, v in vars(self).items() if isinstance(v, Tensor)}
        s["tokens"] = torch.tensor(self.tokens)
        return s

    def load_state_dict(self, s: dict[str, Tensor]) -> None:
        for k, v in s.items():
            if k == "tokens":
                self.tokens = int(v)
            else:
                setattr(self, k, v)
