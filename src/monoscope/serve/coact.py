"""A feature map from co-activation rather than decoder geometry (`monoscope serve --coactivation-map`).

The features pass's map is a UMAP of decoder rows; for the default 16x SAE it is a uniform disc, because
decoder directions of a wide SAE are close to equidistant in 576 dimensions. Features that fire on the same
tokens do form groups, so this map lays out the co-occurrence graph the pass already stores
(`features.cooccur`: each feature's 10 features with the highest P(j fires | i fires)) with UMAP, the
graph handed over as its k-nearest-neighbour input (distance 1 - P(j|i), the feature itself first). On
runs/small (9,216 features) it shows dense groups (code, numbers, prose) where the decoder map shows none.
Features that never co-fire with anything are left off. The layout is cached under the monoscope cache
(`serve-map/`), keyed by the database file's size and modification time, so a restart is instant.

Measured on runs/small (`benchmarks/map_quality.py`, `benchmarks/results/map_quality.json`): the share of a
feature's 10 nearest map neighbours with the same dominant peak token is 0.150 on this map, 0.029 on the
decoder map, 0.003 by chance; so `monoscope serve` lays it out by default for SAEs up to AUTO_MAX_FEATURES
(in the background; the run page shows it once ready) and `--coactivation-map` forces it for any size.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np

from monoscope.features.db import FeatureDB


def coactivation_layout(db: FeatureDB, *, seed: int = 0, min_dist: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(ids [m], xy [m, 2]) of the features with co-occurrence data, laid out by UMAP on their co-occurrence
    graph; the same for the same database and seed."""
    rows = db.cooccurrence()
    if len(rows) < 4:
        ids = np.array([i for i, _ in rows], dtype=np.int64)
        return ids, np.stack([np.arange(len(ids), dtype=np.float32), np.zeros(len(ids), np.float32)], 1)
    k = 1 + max(min(len(c), 10) for _, c in rows)
    ids = np.array([i for i, _ in rows], dtype=np.int64)
    pos = {int(f): r for r, f in enumerate(ids.tolist())}
    idx = np.repeat(np.arange(len(ids), dtype=np.int32)[:, None], k, 1)  # padding: the feature itself
    dist = np.ones((len(ids), k), dtype=np.float32)
    dist[:, 0] = 0.0
    for r, (_, co) in enumerate(rows):
        c = 1
        for j, p in co:
            if c >= k:
                break
            q = pos.get(int(j))
            if q is not None and q != r:
                idx[r, c], dist[r, c] = q, max(0.0, 1.0 - float(p))
                c += 1
    order = np.argsort(dist, axis=1, kind="stable")
    idx, dist = np.take_along_axis(idx, order, 1), np.take_along_axis(dist, order, 1)
    import umap

    reducer = umap.UMAP(n_neighbors=k, min_dist=min_dist, random_state=seed, n_jobs=1, init="spectral",
                        precomputed_knn=(idx, dist, None))
    with warnings.catch_warnings():  # no search index (we never transform) / n_jobs set by random_state
        warnings.simplefilter("ignore")
        xy = reducer.fit_transform(np.zeros((len(ids), 2), np.float32))  # the graph alone drives the layout
    return ids, np.asarray(xy, dtype=np.float32)


AUTO_MAX_FEATURES = 32_768
"""`monoscope serve` lays out the co-activation map by itself (in the background, after start-up) for SAEs up
to this many features: ~3 min for 9,216 on a loaded 2-core CPU, roughly linear in the features."""


def _cache_path(db_path: Path, seed: int) -> Path:
    from monoscope.cache import cache_dir

    st = db_path.stat()
    key = hashlib.sha256(f"{db_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{seed}|v1".encode()).hexdigest()[:24]
    return cache_dir() / "serve-map" / f"{key}.npz"


def cached_only(db_path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached layout of the database at `db_path` when there is one for the file as it is, else None."""
    path = _cache_path(db_path, seed)
    if path.is_file():
        try:
            with np.load(path) as z:
                return z["ids"], z["xy"]
        except (OSError, ValueError, KeyError):
            return None
    return None


def cached_layout(db_path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`coactivation_layout` of the database at `db_path`, from the cache when the file is unchanged."""
    from monoscope.fileio import write_bytes_atomic

    hit = cached_only(db_path, seed)
    if hit is not None:
        return hit
    path = _cache_path(db_path, seed)
    with FeatureDB.open(db_path) as db:
        ids, xy = coactivation_layout(db, seed=seed)
    buf = io.BytesIO()
    np.savez(buf, ids=ids, xy=xy)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, buf.getvalue())
    except OSError:  # a read-only cache only costs the layout next time
        pass
    return ids, xy
