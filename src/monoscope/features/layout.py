"""The feature map: a 2-D layout of every feature (UMAP of decoder directions, cosine metric), stored
as features.map_x/map_y and drawn with density as colour, as in Scaling Monosemanticity's maps.

    xy = feature_map(sae.W_dec, seed=0)          # [F, 2], deterministic for a seed
    with db.transaction(): store_map(db, xy)
    plot_feature_map(xy, db.column("density"), run / "features" / "map.png", title="16x ")

The k nearest neighbours are computed here, exactly, by chunked matmuls on the decoder rows, and
handed to UMAP as `precomputed_knn`: this skips pynndescent, whose numba JIT costs ~30 s per process
on 2 cores and which is approximate anyway. UMAP's layout then runs single-threaded (the price of
being deterministic for a seed). Above `max_fit` features (the default 40,000 covers 64x d_model=576)
UMAP fits a seeded random subsample of `max_fit` features and every other feature is placed at the
similarity-weighted mean of its nearest sampled features, because the full fit grows too slow on a
CPU. Measured on 2 cores (576-d rows): 9,216 features 11 s (20 s for a process's first call: umap's
import and numba JIT), 36,864 in 49 s; 262,144 would take ~17 min in full (exact kNN ~13, layout ~4),
~4 min through the subsample (fit 40,000 ~55 s, placing the rest ~3 min of matmuls).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB
from monoscope.fileio import write_bytes_atomic

DEFAULT_MAX_FIT = 40_000
_BLOCK_ELEMS = 1 << 24  # cosines per [rows, F] block: 64 MiB


def feature_map(
    W_dec: Tensor,
    *,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    max_fit: int = DEFAULT_MAX_FIT,
) -> np.ndarray:
    """[F, 2] float32 UMAP layout of the decoder rows W_dec [F, d] (cosine metric, so row norms do not
    matter), the same for the same seed and input on one machine. Features with near-identical
    directions land next to each other. F > max_fit: fit on a subsample, place the rest (module doc)."""
    if W_dec.dim() != 2 or W_dec.shape[0] == 0:
        raise MonoscopeError(f"the feature map needs decoder rows [F >= 1, d], got {tuple(W_dec.shape)}")
    if n_neighbors < 2 or max_fit < 2:
        raise MonoscopeError(f"n_neighbors={n_neighbors}, max_fit={max_fit}: both must be >= 2 (UMAP's defaults "
                             "are n_neighbors=15, max_fit=40000)")
    w = W_dec.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = w.shape[0]
    if n <= max_fit:
        return _umap(w, seed, n_neighbors, min_dist)
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randperm(n, generator=gen)[:max_fit].sort().values.to(w.device)
    xy_sample = _umap(w[sample], seed, n_neighbors, min_dist)
    rest = torch.ones(n, dtype=torch.bool, device=w.device)
    rest[sample] = False
    rest_idx = rest.nonzero().squeeze(1)
    xy = np.empty((n, 2), dtype=np.float32)
    xy[sample.cpu().numpy()] = xy_sample
    xy[rest_idx.cpu().numpy()] = _place(w[rest_idx], w[sample], torch.from_numpy(xy_sample).to(w.device),
                                        n_neighbors)
    return xy


def _knn(queries: Tensor, keys: Tensor, k: int, exclude_self: bool) -> tuple[Tensor, Tensor]:
    """(indices [Q, k], cosines [Q, k]) of the k most similar unit rows of `keys`, best first; with
    exclude_self (queries is keys), row i's own entry is forced first, as UMAP's own kNN returns it."""
    step = max(1, _BLOCK_ELEMS // keys.shape[0])
    idx, cos = [], []
    for s in range(0, queries.shape[0], step):
        sim = queries[s:s + step] @ keys.T  # [chunk, F]
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + s] = 2.0
        v, i = sim.topk(k, dim=1)
        idx.append(i)
        cos.append(v.clamp(-1.0, 1.0))
    return torch.cat(idx), torch.cat(cos)


def _umap(w: Tensor, seed: int, n_neighbors: int, min_dist: float) -> np.ndarray:
    n = w.shape[0]
    if n < 4:  # too few points for a neighbour graph: a line, in input order
        return np.stack([np.arange(n, dtype=np.float32), np.zeros(n, dtype=np.float32)], axis=1)
    try:
        import umap
    except ImportError as e:
        raise MonoscopeError(f"the feature map needs umap-learn ({e}): pip install umap-learn") from None
    k = min(n_neighbors, n - 1)
    idx, cos = _knn(w, w, k, exclude_self=True)
    dist = (1.0 - cos).clamp_min(0.0)
    dist[:, 0] = 0.0
    reducer = umap.UMAP(n_neighbors=k, min_dist=min_dist, metric="cosine", random_state=seed, n_jobs=1,
                        init="spectral" if n > k + 2 else "random",
                        precomputed_knn=(idx.cpu().numpy().astype(np.int32),
                                         dist.cpu().numpy().astype(np.float32), None))
    with warnings.catch_warnings():  # no search index (we never transform) / n_jobs set by random_state
        warnings.simplefilter("ignore")
        xy = reducer.fit_transform(w.cpu().numpy())
    return np.asarray(xy, dtype=np.float32)


def _place(queries: Tensor, keys: Tensor, key_xy: Tensor, k: int) -> np.ndarray:
    """Positions of features left out of the fit: mean of their k nearest fitted features' positions,
    weighted by 1 / (cosine distance + 1e-3), so a near-duplicate of a fitted feature sits on it."""
    idx, cos = _knn(queries, keys, min(k, keys.shape[0]), exclude_self=False)
    wts = 1.0 / ((1.0 - cos).clamp_min(0.0) + 1e-3)  # [Q, k]
    xy = (wts[:, :, None] * key_xy[idx]).sum(1) / wts.sum(1, keepdim=True)
    return xy.cpu().numpy().astype(np.float32)


def store_map(db: FeatureDB, xy: np.ndarray) -> None:
    """Write xy [F, 2] to features.map_x/map_y (in its own transaction unless the caller holds one).
    The feature rows must exist (the feature pass writes them): an UPDATE of missing rows would
    silently store nothing."""
    xy = np.asarray(xy, dtype=np.float64)
    have = db.n_features()
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != have:
        raise MonoscopeError(f"{db.path} has {have} feature rows but the map is {xy.shape}: run the feature pass "
                             "first, and map the decoder of the SAE this database was built for")
    ctx = contextlib.nullcontext() if db.in_transaction else db.transaction()
    with ctx:
        db.update_features("map_x", enumerate(xy[:, 0].tolist()))
        db.update_features("map_y", enumerate(xy[:, 1].tolist()))


def plot_feature_map(xy: np.ndarray, density: np.ndarray, path: str | Path, title: str = "") -> Path:
    """PNG of the map: each feature a dot coloured by log10 density (fraction of tokens it fires on);
    dead features (density 0) and unmeasured ones (NaN) grey, drawn underneath. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = np.asarray(xy, dtype=np.float64)
    density = np.asarray(density, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or density.shape != (xy.shape[0],):
        raise MonoscopeError(f"plot_feature_map needs xy [F, 2] and density [F]; got {xy.shape} and {density.shape}: "
                             "pass the density column of the same SAE's database")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    live = density > 0  # False for 0 and NaN
    n = xy.shape[0]
    size = float(np.clip(3e4 / max(n, 1), 0.3, 12.0))
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    if (~live).any():
        ax.scatter(xy[~live, 0], xy[~live, 1], s=size, c="#c8c8c8", linewidths=0, rasterized=True,
                   label=f"dead or unmeasured ({int((~live).sum()):,})")
    if live.any():
        order = np.argsort(density[live])  # densest on top
        pts, logd = xy[live][order], np.log10(density[live][order])
        sc = ax.scatter(pts[:, 0], pts[:, 1], s=size, c=logd, cmap="viridis", linewidths=0, rasterized=True)
        fig.colorbar(sc, ax=ax, shrink=0.8, label="log10 density (fraction of tokens active)")
    if (~live).any():
        ax.legend(loc="lower right", frameon=False, markerscale=max(1.0, 6 / size))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}feature map (UMAP of decoder directions), {n:,} features")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path
