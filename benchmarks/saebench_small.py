"""SAEBench-compatible absorption, sparse probing, TPP and SCR for several SAEs of one model and hook, in one process.

    python benchmarks/saebench_small.py topk=runs/small/sae batchtopk=/tmp/sae-batchtopk \\
        matryoshka=/tmp/sae-matryoshka --absorption-words 1000 --probe-per-class 60
    -> benchmarks/results/saebench_small.json and a markdown table on stdout (the README's)

The model runs once per text for all SAEs (`monoscope.eval.saebench.saebench_many`); each SAE's numbers are
those `monoscope eval SAE --saebench` gives with the same options.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result
from monoscope.eval import saebench as sb
from monoscope.interop import load_any
from monoscope.sae.io import weights_sha256
from monoscope.steer.intervene import check_pair
from monoscope.steer.target import open_target


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| SAE | arch | absorption fraction ↓ | full absorption ↓ | letters | probe k=1 ↑ | k=2 ↑ | k=5 ↑ "
            "| all latents ↑ | residual probe ↑ | TPP n=20 ↑ | SCR n=20 ↑ |", "|" + " --- |" * 12]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for name, m in results.items():
        a, p = m["absorption"], m["sparse_probing"]["mean"]
        rows.append(f"| {name} | {m['sae']['arch']} | {f(a['mean_absorption_fraction_score'])} | "
                    f"{f(a['mean_full_absorption_score'])} | {a['letters_evaluated']} | "
                    f"{f(p['sae_top_1_test_accuracy'])} | {f(p['sae_top_2_test_accuracy'])} | "
                    f"{f(p['sae_top_5_test_accuracy'])} | {f(p['sae_test_accuracy'])} | {f(p['llm_test_accuracy'])} | "
                    f"{f(m['tpp']['mean'].get('tpp_threshold_20_total_metric'))} | "
                    f"{f(m.get('scr', {}).get('mean', {}).get('scr_metric_threshold_20'))} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("saes", nargs="+", help="NAME=SAE_DIR, the first one's model is used for all")
    ap.add_argument("--absorption-words", type=int, default=1000)
    ap.add_argument("--probe-per-class", type=int, default=60)
    ap.add_argument("--name", default="saebench_small")
    args = ap.parse_args()
    pairs = [s.split("=", 1) for s in args.saes]
    t0 = time.perf_counter()
    target = open_target(pairs[0][1], device="cpu", compute_dtype="fp32")
    saes = {pairs[0][0]: target.sae}
    for name, d in pairs[1:]:
        sae = load_any(d).eval()
        check_pair(target.lm, sae)
        saes[name] = sae
    a_cfg = sb.AbsorptionConfig(max_words=args.absorption_words)
    p_cfg = sb.ProbingConfig(max_per_class=args.probe_per_class)
    t_cfg = sb.TPPConfig(max_per_class=args.probe_per_class)
    with torch.inference_mode(False):
        results = sb.saebench_many(target.lm, saes, target.hook, absorption_cfg=a_cfg, probing_cfg=p_cfg,
                                   tpp_cfg=t_cfg)
    for name, d in pairs:
        s = saes[name]
        results[name]["sae"] = {"path": d, "weights_sha256": weights_sha256(d), "arch": s.cfg.arch,
                                "d_sae": s.cfg.d_sae, "k": s.cfg.k, "hook": str(target.hook),
                                "model": target.lm.model_id}
    path = write_result(args.name, {"command": " ".join(sys.argv), "seconds": time.perf_counter() - t0,
                                    "table": table(results), "results": results})
    print(table(results))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
