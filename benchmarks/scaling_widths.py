"""Dead fraction and feature splitting at 3 widths, from a `monoscope sweep` on the small run's store.

Scaling Monosemanticity compares its 1M, 4M and 34M SAEs by the share of dead features (2%, 35%, 65%)
and by how features of a small SAE split into families in the larger ones. This script does the same
at the widths of a sweep (the largest token count, seed 0), on the rows the sweep held out:

    PYTHONPATH=src python -m monoscope.cli sweep runs/small/acts --budget 20m --out /tmp/monoscope-sweep/real \\
        --widths 1x,2x,4x --tokens 20k,40k,80k --seeds 0,1 --k 32 --ks none --batch-size 256 --threads 1
    PYTHONPATH=src python benchmarks/scaling_widths.py /tmp/monoscope-sweep/real runs/small/acts

It reads the finished sweep (sweep.json + the SAE folders; nothing is retrained) and writes
benchmarks/results/scaling_small.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from monoscope.features.families import match_features
from monoscope.fileio import write_json_atomic
from monoscope.sae import load_sae
from monoscope.scaling.sweep import _heldout_rows, heldout_metrics
from monoscope.store import ActivationStore


def main(sweep_dir: str, store_dir: str, out: str = "benchmarks/results/scaling_small.json") -> None:
    sw = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    store = ActivationStore.open(store_dir)
    held = [i for i, s in enumerate(store.manifest.shards) if s.file in sw["heldout"]["shards"]]
    x = _heldout_rows(store, held, sw["config"]["heldout_rows"])
    t_max = max(p["tokens"] for p in sw["points"])
    pts = sorted((p for p in sw["points"] if p["tokens"] == t_max and p["seed"] == 0 and p["k"] == sw["config"]["k"]),
                 key=lambda p: p["width"])
    saes = [load_sae(Path(sweep_dir) / "runs" / p["name"]).eval() for p in pts]
    widths = []
    for p, sae in zip(pts, saes, strict=True):
        m = heldout_metrics(sae, x, torch.device("cpu"))
        widths.append({"width": p["width"], "tokens": p["tokens"], "heldout_fvu": m["fvu"],
                       "dead_frac": m["dead_frac"], "dense_frac": m["dense_frac"], "l0": m["l0"]})
    splits = []
    for a, b in ((0, 1), (1, 2), (0, 2)):
        ms = match_features(saes[a], saes[b], x)
        parents: dict[int, int] = {}
        for mt in ms:
            parents[mt.parent] = parents.get(mt.parent, 0) + 1
        corr = [mt.corr for mt in ms if mt.corr is not None]
        sizes = sorted(parents.values())
        splits.append({
            "parent_width": pts[a]["width"], "child_width": pts[b]["width"],
            "children_matched": len(ms), "children_matched_frac": len(ms) / saes[b].cfg.d_sae,
            "parents_with_children": len(parents), "parents_with_children_frac": len(parents) / saes[a].cfg.d_sae,
            "parents_split_2_or_more": sum(1 for v in sizes if v >= 2),
            "mean_children_per_parent": sum(sizes) / max(len(sizes), 1), "max_children": max(sizes, default=0),
            "median_activation_corr": float(torch.tensor(corr).median()) if corr else None,
            "min_cosine": 0.5})
    res = {"what": "dead fraction and feature splitting at 3 widths (Scaling Monosemanticity's 1M/4M/34M "
                   "comparison, at small scale)",
           "command": "PYTHONPATH=src python benchmarks/scaling_widths.py " + " ".join(sys.argv[1:3]),
           "sweep_command": sw["command"], "store": str(Path(store_dir).resolve()),
           "heldout_rows": int(x.shape[0]), "dead_definition": "never active on the held-out rows",
           "widths": widths, "splits": splits,
           "sweep": {k: sw[k] for k in ("fit_L_n_T", "holdout", "pick", "budget", "config")} |
                    {"cost_model": {k: v for k, v in sw["cost_model"].items() if k != "check"},
                     "points": [{k: p[k] for k in ("name", "width", "tokens", "seed", "train_seconds")}
                                | {"heldout": p["heldout"]} for p in sw["points"]]},
           "machine": "AMD EPYC, 2 cores shared with other jobs (load average ~10), torch CPU, 1 thread"}
    write_json_atomic(out, res)
    print(json.dumps({"widths": widths, "splits": splits}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
