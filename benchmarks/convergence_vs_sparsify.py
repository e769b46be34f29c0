"""Early convergence: held-out FVU of monoscope's TopK trainer against sparsify at 25%, 50% and 100% of a run.

    python benchmarks/convergence_vs_sparsify.py --store runs/small/acts --work /tmp/cs-small --corpus-name default \\
        --tokens 160k --variants default,lr2x,lr3x,...      # appends to benchmarks/results/convergence_vs_sparsify.json

Each trainer is a separate process, run one after the other (train_vs_peers' sequential protocol), on the
same shuffled stream of training rows (`train_vs_peers.prepare`: the last shards of the store, >=
--heldout-rows rows, are held out). sparsify runs its own step (SignSGD + schedule-free, its defaults:
see benchmarks/peers.py). The monoscope variants change one lever at a time (VARIANTS); the FVU is
Σ‖x − x̂‖² / Σ‖x − x̄‖² on the held-out rows, raw scale. Results are appended per corpus, with the machine
and the load around each run, so defaults are chosen from several corpora.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_vs_peers as tvp
from machine import RESULTS, describe, write_result

NAME = "convergence_vs_sparsify"

VARIANTS: dict[str, dict[str, Any]] = {
    # name: {"train": TrainConfig overrides, "sae": SAEConfig overrides, "lr_mult": x the default rate}
    "default": {},
    "lr2x": {"lr_mult": 2.0},
    "lr3x": {"lr_mult": 3.0},
    "lr4x": {"lr_mult": 4.0},
    "lr3x_warm5": {"lr_mult": 3.0, "train": {"lr_warmup_frac": 0.05}},
    "lr3x_nodecay": {"lr_mult": 3.0, "train": {"lr_decay_frac": 0.0}},
    "noaux": {"train": {"aux_coef": 0.0}},
    "noclip": {"train": {"grad_clip": 0.0}},
    "enc1": {"sae": {"init_decoder_norm": 1.0}},  # the TopK/BatchTopK default before 0.25 (named, so it stays)
    "enc0.5": {"sae": {"init_decoder_norm": 0.5}},
    "enc0.25": {"sae": {"init_decoder_norm": 0.25}},
    "mean_bdec": {"train": {"init_b_dec": "mean"}},
    # --optimizer signum-sf: sparsify's optimiser in monoscope's trainer; lr_mult scales its own default rate.
    # The signum_sf variants with norm 1 are the runs recorded before signum-sf's encoder init default became 0.577
    # (the child then ignored TrainConfig's init_decoder_norm); signum_sf_enc0.58 is `--optimizer signum-sf`'s
    # default, signum_sf_enc0.58_noaux adds `--revive none` (sparsify's auxk_alpha=0).
    "signum_sf": {"train": {"optimizer": "signum-sf"}, "sae": {"init_decoder_norm": 1.0}},
    "signum_sf_noaux": {"train": {"optimizer": "signum-sf", "revive": "none"}, "sae": {"init_decoder_norm": 1.0}},
    "signum_sf_lr2x": {"lr_mult": 2.0, "train": {"optimizer": "signum-sf"}, "sae": {"init_decoder_norm": 1.0}},
    "signum_sf_lr0.5x": {"lr_mult": 0.5, "train": {"optimizer": "signum-sf"}, "sae": {"init_decoder_norm": 1.0}},
    "signum_sf_enc0.58": {"train": {"optimizer": "signum-sf"}, "sae": {"init_decoder_norm": 0.577}},
    "signum_sf_enc0.58_noaux": {"train": {"optimizer": "signum-sf", "revive": "none"},
                                "sae": {"init_decoder_norm": 0.577}},
}


def _summary(res: dict[str, Any], steps: int, spec: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """One run's record: held-out FVU by fraction of the run, the final metrics, its settings and load."""
    curve = {f"{round(100 * r['step'] / steps)}%": round(r["fvu"], 4) for r in res.get("curve", [])}
    return {"fvu": curve, "final": {k: res.get("final", {}).get(k) for k in ("fvu", "l0", "dead_heldout_frac")},
            "settings": {k: spec.get(k) for k in ("lr", "train_overrides", "sae_overrides")},
            "train_s": res.get("train_s"), "load_before": res.get("load_before"), "load_after": res.get("load_after"),
            "wall_s": round(wall_s, 1), "error": res.get("error")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="activation store (read only)")
    ap.add_argument("--work", required=True, help="scratch folder (stream, held-out rows, results)")
    ap.add_argument("--corpus-name", required=True, help="label of the corpus in the results")
    ap.add_argument("--tokens", default="160k", help="training tokens per run (one pass over distinct rows)")
    ap.add_argument("--heldout-rows", type=int, default=8192)
    ap.add_argument("--variants", default="default", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--arch", default="topk", choices=("topk", "batchtopk", "matryoshka"),
                    help="monoscope's architecture (sparsify's row is always its TopK: it has no other)")
    ap.add_argument("--skip-sparsify", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: record the finished runs' results found in --work (runs started by several "
                         "invocations, or cut short)")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in names:
        if v not in VARIANTS:
            raise SystemExit(f"--variants {v!r}: use {', '.join(VARIANTS)}")
    prep = argparse.Namespace(store=args.store, hook=tvp.HOOK, heldout_rows=args.heldout_rows,
                              tokens=tvp.parse_count(args.tokens), batch=4096, seed=args.seed, work=args.work,
                              capture_tokens="0")
    info = tvp.prepare(prep)
    work = Path(args.work)
    d, steps, batch = info["d_model"], info["steps"], 4096
    n_feat = 16 * d
    base = {"data": info, "steps": steps, "batch": batch, "k": 32, "width": n_feat, "seed": args.seed,
            "dead_window": max(batch, steps * batch // 5),
            "eval_steps": sorted({max(1, steps // 4), max(1, steps // 2)})}
    from monoscope.train.config import default_lr, default_signum_lr

    lr0 = default_lr(args.arch, n_feat)
    runs: dict[str, Any] = {}
    order = ([] if args.skip_sparsify else ["sparsify"]) + names
    if args.collect:
        order = []
        for f in sorted(work.glob("result-*.json")):
            name = f.stem.removeprefix("result-").removeprefix("mono_")
            res = json.loads(f.read_text())
            runs[name] = _summary(res, steps, json.loads((work / f"spec-{f.stem.removeprefix('result-')}.json")
                                                         .read_text()), 0.0)
            runs[name]["load_at_collect"] = tvp.load_now()
    for name in order:
        if name == "sparsify":
            spec = {**base, "name": "sparsify", "kind": "sparsify"}
        else:
            v = VARIANTS[name]
            signum = v.get("train", {}).get("optimizer") == "signum-sf"
            spec = {**base, "name": f"mono_{name}", "kind": "monoscope_trainer", "dtype": "auto", "arch": args.arch,
                    "lr": (default_signum_lr(n_feat) if signum else lr0) * v.get("lr_mult", 1.0),
                    "train_overrides": v.get("train", {}),
                    "sae_overrides": v.get("sae", {})}
        t0 = time.perf_counter()
        res = tvp.run_child(spec, work)
        runs[name] = _summary(res, steps, spec, time.perf_counter() - t0)
        tvp.log(f"== {name}: {runs[name]['fvu']}")
    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    sweeps = old.get("sweeps", [])
    sweeps.append({"corpus": args.corpus_name, "arch": args.arch, "store": args.store,
                   "store_tokens": info["store_tokens"],
                   "train_rows": info["train_rows"], "heldout_rows": info["heldout_rows"], "steps": steps,
                   "tokens": steps * batch, "batch": batch, "features": n_feat, "k": 32, "default_lr": lr0,
                   "command": "python benchmarks/convergence_vs_sparsify.py " + " ".join(sys.argv[1:]),
                   "machine": describe(), "runs": runs})
    write_result(NAME, {"note": "held-out FVU at 25/50/100% of each run; one process after the other; see "
                        "benchmarks/convergence_vs_sparsify.py", "sweeps": sweeps})
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
