"""One transcoder training step (forward + backward) with AuxK dense (the reference), AuxK sparse (the default
path) and AuxK off (`--revive none`, sparsify's default), on the shape of the transcoder benchmark
(SmolLM2-135M mlp_in.15 -> mlp_out.15: d 576, 9,216 features, k 32, batch 512) with 83% of the latents dead, as
after its 94 steps. The three variants run in alternating rounds, so they meet the same background load on a
shared machine; ratios between them are the result. Synthetic rows: the step's cost does not depend on the
values. Usage:

    PYTHONPATH=src python benchmarks/transcoder_auxk_step.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from machine import write_result
from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.topk import _TopKStyle

VARIANTS = ("auxk_dense", "auxk_sparse", "auxk_off")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--dead", type=float, default=0.83)
    args = ap.parse_args()
    d, n_feat, batch = 576, 9216, 512
    cfg = SAEConfig(arch="transcoder", d_in=d, d_sae=n_feat, k=32, compute_dtype="float32", hook="mlp_in.15",
                    target_hook="mlp_out.15", target_normaliser=1.0, b_dec_to_input=False)
    sae = build_sae(cfg, seed=0).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 2 * d, generator=gen)
    dead = torch.zeros(n_feat, dtype=torch.bool)
    dead[torch.randperm(n_feat, generator=gen)[: int(args.dead * n_feat)]] = True
    sparse_auxk = _TopKStyle._auxk

    def dense_auxk(self, x_c, err, dead_mask, cd, sel=None):  # type: ignore[no-untyped-def]
        return sparse_auxk(self, x_c, err, dead_mask, cd, None)  # no selection given: the dense reference

    def step(variant: str) -> None:
        _TopKStyle._auxk = dense_auxk if variant == "auxk_dense" else sparse_auxk  # type: ignore[method-assign]
        sae.zero_grad(set_to_none=True)
        out = sae(x, dead_mask=None if variant == "auxk_off" else dead)
        out.total.backward()

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    loads = [os.getloadavg()[0]]
    for v in VARIANTS:
        step(v)  # warm-up
    for r in range(args.rounds):
        for v in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
            t = time.perf_counter()
            for _ in range(args.steps):
                step(v)
            times[v].append((time.perf_counter() - t) / args.steps)
        loads.append(os.getloadavg()[0])
    _TopKStyle._auxk = sparse_auxk  # type: ignore[method-assign]
    med = {v: statistics.median(ts) for v, ts in times.items()}
    ratios = [{v: times[v][i] / times["auxk_dense"][i] for v in VARIANTS} for i in range(args.rounds)]
    payload = {
        "command": "PYTHONPATH=src python benchmarks/transcoder_auxk_step.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "shape": {"d": d, "features": n_feat, "k": 32, "k_aux": cfg.k_aux, "batch": batch, "dead_frac": args.dead},
        "load1_per_round": loads,
        "step_s_per_round": times,
        "median_step_s": med,
        "median_tokens_per_s": {v: batch / s for v, s in med.items()},
        "median_ratio_to_dense_per_round": {v: statistics.median(r[v] for r in ratios) for v in VARIANTS},
    }
    path = write_result("transcoder_auxk_step", payload)
    print({k: payload[k] for k in ("median_tokens_per_s", "median_ratio_to_dense_per_round", "load1_per_round")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
