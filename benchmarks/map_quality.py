"""Does a feature map put similar features together? Neighbourhood purity of the decoder map (UMAP of decoder
rows, the features pass's `map_x/map_y`) against the co-activation map (`serve/coact.py`) of one database.

    python benchmarks/map_quality.py runs/small/features/features.db   # -> benchmarks/results/map_quality.json

Each feature's dominant token is the first of its label evidence's peak tokens (`label_tokens.peak_tokens`,
the token its top activations sit on most often), lower-cased and stripped. For each map and each feature placed
on both maps, purity@k = the share of its k nearest map neighbours (Euclidean, in the 2-D layout) with the same
dominant token; the chance level is the same share with the token labels shuffled over the points. Also written:
a PNG of both maps, the 12 commonest dominant tokens coloured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result
from monoscope.features.db import FeatureDB


def purity(xy: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Mean share of each point's k nearest neighbours (itself excluded) with its label."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1).fit(xy)
    _, idx = nn.kneighbors(xy)
    return float((labels[idx[:, 1:]] == labels[:, None]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db", help="a features database (features.db) with a decoder map and co-occurrence")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--png", default=None, help="where to write the side-by-side PNG (default: beside the result)")
    args = ap.parse_args()
    from monoscope.serve.coact import coactivation_layout

    with FeatureDB.open(args.db) as db:
        pts = db.map_points(placed_only=False)
        t0 = time.perf_counter()
        ids, cxy = coactivation_layout(db)
        layout_s = time.perf_counter() - t0
    tok: dict[int, str] = {}
    dec: dict[int, tuple[float, float]] = {}
    for i, x, y, _, _, lt in pts:
        peaks = lt.get("peak_tokens") if isinstance(lt, dict) else None
        if peaks and isinstance(peaks[0], list) and peaks[0] and str(peaks[0][0]).strip():
            tok[i] = str(peaks[0][0]).strip().lower()
        if x is not None and y is not None:
            dec[i] = (float(x), float(y))
    where = {int(i): r for r, i in enumerate(ids.tolist())}
    common = sorted(i for i in tok if i in dec and i in where)
    labels = np.array([tok[i] for i in common])
    d_xy = np.array([dec[i] for i in common], np.float64)
    c_xy = cxy[[where[i] for i in common]].astype(np.float64)
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(labels)
    res = {
        "database": str(Path(args.db).resolve()), "features": len(pts), "on_coactivation_map": len(ids),
        "compared": len(common), "k": args.k, "distinct_dominant_tokens": len(set(labels.tolist())),
        "coactivation_layout_seconds": round(layout_s, 1),
        "purity_decoder_map": round(purity(d_xy, labels, args.k), 4),
        "purity_coactivation_map": round(purity(c_xy, labels, args.k), 4),
        "purity_chance": round(purity(d_xy, shuffled, args.k), 4),
        "how": "share of each feature's k nearest 2-D map neighbours with the same dominant peak token",
    }
    path = write_result("map_quality", res)
    png = Path(args.png) if args.png else path.with_suffix(".png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = [t for t, _ in Counter(labels.tolist()).most_common(12)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 7))
    for ax, xy, name in ((axes[0], d_xy, "decoder UMAP"), (axes[1], c_xy, "co-activation UMAP")):
        ax.scatter(xy[:, 0], xy[:, 1], s=1, c="#cccccc")
        for j, t in enumerate(top):
            m = labels == t
            ax.scatter(xy[m, 0], xy[m, 1], s=3, color=plt.cm.tab20(j), label=repr(t))
        p = res["purity_decoder_map" if name.startswith("dec") else "purity_coactivation_map"]
        ax.set_title(f"{name}: purity@{args.k} {p:.3f}")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(markerscale=4, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    print(json.dumps(res, indent=1))
    print(f"-> {path}, {png}")


if __name__ == "__main__":
    main()
