"""Per-feature running statistics over a stream of SAE codes, vectorised over whole batches.

Every update reads ALL active codes of a batch (sparse: row, feature, activation), so an SAE that runs
at an L0 in the hundreds (relu-l1) is counted as exactly as a TopK one. Every update is a handful of
tensor ops on [batch, features] or [features, kept] arrays (no Python loop over features), and the
state is bounded by features × examples kept, not by the corpus:

- counts: rows seen (the density denominator: the rows the row policy keeps, as `monoscope eval`
  counts them), fires, Σ activation, max activation, a log-spaced activation histogram (HIST_EDGES);
- top contexts: the K contexts with the largest per-context maximum, per feature ([F, K] values, ids and
  the position of the maximum in the context);
- a uniform reservoir of R active contexts per feature (priority sampling: each (feature, context)
  pair gets a pseudo-random key from a hash of its ids, the R smallest keys are kept), from which the
  quantile examples are drawn: R samples sorted by activation, split into `bins` deciles;
- co-occurrence: `PairCounts`, counts of feature pairs active on the same row in a sparse table of at
  most `budget` pairs, at any width (see its docstring for the approximation and its error bound).
The state is a dict of tensors (`state_dict`), saved with each checkpoint; keys depend only on ids, so
a resumed pass ends identical to an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

HIST_EDGES = torch.logspace(-3, 3, 49)
"""Activation histogram bin edges (48 log-spaced bins from 1e-3 to 1e3, in the SAE's feature units);
values below the first edge go to bin 0, above the last to the last bin."""
COOC_BUDGET = 1 << 24
"""Feature pairs the co-occurrence table holds at most (~200 MB with its merge buffers), whatever the width."""


def _hash_keys(ctx: Tensor, feat: Tensor, salt: int = 0x9E3779B9) -> Tensor:
    """A deterministic pseudo-random float in [0, 1) per (context, feature) pair (splitmix-style mixing
    in int64), so reservoir sampling does not depend on batch boundaries or resumes."""
    x = ctx.to(torch.int64) * 1_000_003 + feat.to(torch.int64) * 7_919 + salt
    x = (x ^ (x >> 31)) * 0x5DEECE66D
    x = (x ^ (x >> 29)) * 0x2545F491
    x = x ^ (x >> 32)
    return (x & 0xFFFFFF).to(torch.float32) / float(1 << 24)


class PairCounts:
    """How often features i and j (i ≠ j) are active on the same row, for any number of features, in
    bounded memory: a sparse table (CSR, row i = feature i, the diagonal holding fires) of at most
    max(budget, keep × F) pairs.

    Pairs are counted exactly (the sparse product AᵀA of the activity matrix of a few buffered batches,
    in row chunks of at most budget / 2 pair products) and added to the table. When the table exceeds `budget`
    pairs every feature keeps only its `keep` = max(2 × report + 1, budget / (2F)) largest counts; the
    largest count a feature drops is added to its error bound `err[i]`, so for every pair: stored count ≤
    true count ≤ stored count + err[i] (a dropped pair that comes back restarts from zero). Until the first
    pruning every count is exact (`exact`); afterwards a reported P(j | i) is low by at most err[i] / fires[i].
    """

    def __init__(self, d_sae: int, budget: int = COOC_BUDGET, report: int = 10) -> None:
        self.d_sae, self.budget = d_sae, int(budget)
        self.keep = max(2 * report + 1, self.budget // (2 * max(d_sae, 1)))
        self.table = sp.csr_matrix((d_sae, d_sae), dtype=np.int64)
        self.err = np.zeros(d_sae, dtype=np.int64)
        self.pruned = 0  # prunings so far
        self.buf_rows: list[np.ndarray] = []
        self.buf_feats: list[np.ndarray] = []
        self.buf_n = self.buf_products = 0

    @property
    def exact(self) -> bool:
        return self.pruned == 0

    def add(self, rows: np.ndarray, feats: np.ndarray, n_rows: int) -> None:
        """Active entries (row within the batch, ascending; feature) of a batch of `n_rows` rows. Batches
        are buffered until they hold budget / 2 pair products, then counted together (one table update
        per several batches: the update costs a pass over the whole table)."""
        if len(rows) == 0:
            return
        self.buf_rows.append(rows.astype(np.int64) + self.buf_n)
        self.buf_feats.append(feats.astype(np.int32))
        self.buf_n += n_rows
        self.buf_products += int((np.bincount(rows) ** 2).sum())
        if self.buf_products >= self.budget // 2:
            self.flush()

    def flush(self) -> None:
        """Count the buffered batches into the table."""
        if not self.buf_rows:
            return
        rows, feats, n_rows = np.concatenate(self.buf_rows), np.concatenate(self.buf_feats), self.buf_n
        self.buf_rows, self.buf_feats, self.buf_n, self.buf_products = [], [], 0, 0
        F = self.d_sae
        l0 = np.bincount(rows, minlength=n_rows).astype(np.int64)
        cum = np.cumsum(l0 * l0)  # pair products up to each row
        indptr = np.concatenate([[0], np.cumsum(l0)])
        step = max(1, self.budget // 2)
        r0 = 0
        while r0 < n_rows:
            base = int(cum[r0 - 1]) if r0 else 0
            r1 = min(n_rows, max(r0 + 1, int(np.searchsorted(cum, base + step, side="right"))))
            e0, e1 = int(indptr[r0]), int(indptr[r1])
            if e1 > e0:
                a = sp.csr_matrix((np.ones(e1 - e0, dtype=np.int64), feats[e0:e1].astype(np.int32),
                                   indptr[r0: r1 + 1] - e0), shape=(r1 - r0, F))
                self.table = self.table + a.T.tocsr() @ a
                if self.table.nnz > self.budget:
                    self._prune(self.keep)
            r0 = r1

    def _sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(row, col, count, rank within row) of the table, each row by count descending, then id."""
        t = self.table
        t.sort_indices()  # ids ascending within each row: the stable sort below breaks ties by id
        row = np.repeat(np.arange(self.d_sae, dtype=np.int64), np.diff(t.indptr))
        cap = (1 << 32) - 1
        order = np.argsort((row << 32) | (cap - np.minimum(t.data, cap)), kind="stable")  # one int64 key
        row, col, cnt = row[order], t.indices[order], t.data[order]
        rank = np.arange(len(row)) - t.indptr[row]
        return row, col, cnt, rank

    def _prune(self, keep: int) -> None:
        row, col, cnt, rank = self._sorted()  # the diagonal (fires) leads its row and always stays
        first_dropped = rank == keep
        np.add.at(self.err, row[first_dropped], cnt[first_dropped])
        k = rank < keep
        self.table = sp.csr_matrix((cnt[k], (row[k], col[k])), shape=(self.d_sae, self.d_sae))
        self.pruned += 1

    def top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, counts) [F, n] of each feature's most co-occurring other features (id -1, count 0 = none)."""
        self.flush()
        row, col, cnt, _ = self._sorted()
        off = row != col
        row, col, cnt = row[off], col[off], cnt[off]
        rank = np.arange(len(row)) - np.searchsorted(row, row)  # rows stay grouped, in order
        ids = np.full((self.d_sae, n), -1, dtype=np.int64)
        out = np.zeros((self.d_sae, n), dtype=np.int64)
        k = rank < n
        ids[row[k], rank[k]] = col[k]
        out[row[k], rank[k]] = cnt[k]
        return ids, out

    def state_dict(self) -> dict[str, Tensor]:
        t = self.table
        return {"cooc_indptr": torch.from_numpy(t.indptr.astype(np.int64)),
                "cooc_indices": torch.from_numpy(t.indices.astype(np.int32)),
                "cooc_data": torch.from_numpy(t.data.astype(np.int64)),
                "cooc_err": torch.from_numpy(self.err.copy()), "cooc_pruned": torch.tensor(self.pruned),
                "cooc_buf_rows": torch.from_numpy(np.concatenate([np.zeros(0, np.int64), *self.buf_rows])),
                "cooc_buf_feats": torch.from_numpy(np.concatenate([np.zeros(0, np.int32), *self.buf_feats])),
                "cooc_buf_n": torch.tensor(self.buf_n), "cooc_buf_products": torch.tensor(self.buf_products)}

    def load_state_dict(self, s: dict[str, Tensor]) -> None:
        F = self.d_sae
        self.table = sp.csr_matrix((s["cooc_data"].numpy(), s["cooc_indices"].numpy(), s["cooc_indptr"].numpy()),
                                   shape=(F, F))
        self.err = s["cooc_err"].numpy().copy()
        self.pruned = int(s["cooc_pruned"])
        br = s["cooc_buf_rows"].numpy()
        self.buf_rows, self.buf_feats = ([br], [s["cooc_buf_feats"].numpy()]) if len(br) else ([], [])
        self.buf_n, self.buf_products = int(s["cooc_buf_n"]), int(s["cooc_buf_products"])


class FeatureStats:
    def __init__(self, d_sae: int, top_k: int = 20, reservoir: int = 50, cooc_budget: int = COOC_BUDGET) -> None:
        F = d_sae
        self.d_sae, self.top_k, self.reservoir = F, top_k, reservoir
        self.tokens = 0
        """Rows counted: the rows the row policy keeps (the density denominator)."""
        self.entries = 0
        """Active codes seen so far (the length of the pass's sparse code files)."""
        self.fires = torch.zeros(F, dtype=torch.int64)
        self.sum_act = torch.zeros(F, dtype=torch.float64)
        self.max_act = torch.zeros(F, dtype=torch.float32)
        self.hist = torch.zeros(F, len(HIST_EDGES) - 1, dtype=torch.int64)
        self.top_val = torch.zeros(F, top_k, dtype=torch.float32)
        self.top_ctx = torch.full((F, top_k), -1, dtype=torch.int64)
        self.top_pos = torch.zeros(F, top_k, dtype=torch.int32)
        self.res_key = torch.full((F, reservoir), float("inf"), dtype=torch.float32)
        self.res_val = torch.zeros(F, reservoir, dtype=torch.float32)
        self.res_ctx = torch.full((F, reservoir), -1, dtype=torch.int64)
        self.res_pos = torch.zeros(F, reservoir, dtype=torch.int32)
        self.cooc = PairCounts(F, cooc_budget)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, rows: Tensor, feats: Tensor, vals: Tensor, ctx_ids: Tensor, ctx_len: int, n_rows: int) -> None:
        """All active codes of a batch of whole contexts, as sparse entries sorted by row: rows [nnz] (row
        within the batch: context b holds rows b·ctx_len ... (b+1)·ctx_len − 1), feats [nnz] feature ids,
        vals [nnz] activations > 0; ctx_ids [B] global context index; n_rows: the rows of the batch the
        row policy keeps (entries come from those rows only)."""
        B = ctx_ids.numel()
        F = self.d_sae
        self.tokens += int(n_rows)
        self.entries += int(rows.numel())
        fi, fv, rows = feats.long(), vals.float(), rows.long()
        self.fires += torch.bincount(fi, minlength=F)
        self.sum_act.index_add_(0, fi, fv.double())
        self.max_act = torch.maximum(self.max_act, torch.zeros(F).scatter_reduce_(0, fi, fv, "amax"))
        b = torch.bucketize(fv, HIST_EDGES[1:-1])
        self.hist.view(-1).index_add_(0, fi * self.hist.shape[1] + b, torch.ones_like(fi))
        # per-context maximum of every feature and its first position: [B, F] (dense, bounded by the batch)
        key = (rows // ctx_len) * F + fi
        cmax = torch.zeros(B * F).scatter_reduce_(0, key, fv, "amax")
        at_max = fv == cmax[key]
        cpos = torch.full((B * F,), ctx_len, dtype=torch.int32).scatter_reduce_(
            0, key[at_max], (rows[at_max] % ctx_len).int(), "amin")
        ctx_t = cmax.view(B, F).T.contiguous()  # [F, B]
        pos_t = cpos.view(B, F).T.contiguous()
        cand_ctx = ctx_ids[None, :].expand(F, B)
        v = torch.cat([self.top_val, ctx_t], 1)
        c = torch.cat([self.top_ctx, cand_ctx], 1)
        p = torch.cat([self.top_pos, pos_t], 1)
        self.top_val, pos = v.topk(self.top_k, dim=1)  # ties: lowest position first (earlier contexts)
        self.top_ctx, self.top_pos = c.gather(1, pos), p.gather(1, pos)
        # reservoir: keys for active (feature, context) pairs, inf where the feature is silent
        keys = torch.where(ctx_t > 0, _hash_keys(cand_ctx, torch.arange(F)[:, None].expand(F, B)),
                           torch.tensor(float("inf")))
        k = torch.cat([self.res_key, keys], 1)
        rv = torch.cat([self.res_val, ctx_t], 1)
        rcx = torch.cat([self.res_ctx, cand_ctx], 1)
        rp = torch.cat([self.res_pos, pos_t], 1)
        self.res_key, pos = k.topk(self.reservoir, dim=1, largest=False)
        self.res_val, self.res_ctx, self.res_pos = rv.gather(1, pos), rcx.gather(1, pos), rp.gather(1, pos)
        empty = torch.isinf(self.res_key)  # fewer active contexts than slots so far
        self.res_ctx[empty], self.res_val[empty], self.res_pos[empty] = -1, 0.0, 0
        self.cooc.add(rows.numpy(), fi.numpy(), B * ctx_len)

    # ------------------------------------------------------------------ results
    def density(self) -> Tensor:
        return self.fires.double() / max(self.tokens, 1)

    def mean_act(self) -> Tensor:
        """Mean activation over the tokens where the feature is active."""
        return self.sum_act / self.fires.clamp_min(1).double()

    def quantile_examples(self, bins: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(values, contexts, bins, positions) [F, R]: the reservoir sorted by activation (weakest first),
        bin b holding the b-th of `bins` equal slices of the sampled ranks (context -1 = empty slot)."""
        val = torch.where(self.res_ctx >= 0, self.res_val, torch.tensor(float("inf")))
        order = val.argsort(dim=1, stable=True)
        v, c, p = self.res_val.gather(1, order), self.res_ctx.gather(1, order), self.res_pos.gather(1, order)
        n = (self.res_ctx >= 0).sum(1, keepdim=True)  # [F, 1] samples held
        rank = torch.arange(self.reservoir)[None, :].expand_as(v)
        b = (rank * bins) // n.clamp_min(1)
        return v, torch.where(rank < n, c, -1), b.clamp_max(bins - 1), p

    def cooccurrence(self, top: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(ids, P(j active | i active)) [F, top] of the most co-occurring other features (id -1 = none);
        see PairCounts for the bound on the error once the table had to be pruned."""
        ids, cnt = self.cooc.top(top)
        return ids, cnt / np.maximum(self.fires.numpy(), 1)[:, None]

    def cooccurrence_error(self) -> float:
        """The largest possible under-count of a reported P(j | i), over all features (0 = exact)."""
        if self.cooc.exact:
            return 0.0
        return float((self.cooc.err / np.maximum(self.fires.numpy(), 1)).max(initial=0.0))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        s = {k: v for k, v in vars(self).items() if isinstance(v, Tensor)}
        s["tokens"] = torch.tensor(self.tokens)
        s["entries"] = torch.tensor(self.entries)
        return s | self.cooc.state_dict()

    def load_state_dict(self, s: dict[str, Tensor]) -> None:
        self.cooc.load_state_dict({k: v for k, v in s.items() if k.startswith("cooc_")})
        for k, v in s.items():
            if k in ("tokens", "entries"):
                setattr(self, k, int(v))
            elif not k.startswith("cooc_"):
                setattr(self, k, v)
