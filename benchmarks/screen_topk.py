"""The int8 encoder screen against the whole bf16 product: which features each chooses, and how fast.

On a trained TopK SAE and one batch of its store's rows: the fraction of chosen features (and of whole rows) that
the screen (`monoscope.native.screen_topk`) shares with the bf16 product and with float32, for several candidate
counts m, and the time of each way of choosing (bf16 product + row top-k; packing the int8 weights; the screen).

    python benchmarks/screen_topk.py --sae runs/demo/sae --store runs/demo/acts
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from machine import RESULTS, describe, matmul_tflops
from monoscope import native
from monoscope.sae import load_sae
from monoscope.sae.base import with_ones
from monoscope.sae.topk import SCREEN_CANDIDATES_PER_K, _order_view, _row_topk
from monoscope.store.reader import ActivationStore


def best_of(fn: Any, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def shared(a: torch.Tensor, b: torch.Tensor, n_feat: int) -> dict[str, float]:
    """The fraction of a's chosen features that b chose too, and of the rows where both chose the same."""
    rows = torch.arange(a.shape[0]).unsqueeze(1)
    ma = torch.zeros(a.shape[0], n_feat, dtype=torch.bool)
    ma[rows, a] = True
    mb = torch.zeros_like(ma)
    mb[rows, b] = True
    return {"features": float((ma & mb).sum() / a.numel()), "rows": float((ma == mb).all(1).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sae", required=True, help="a trained topk SAE folder")
    ap.add_argument("--store", required=True, help="an activation store of the SAE's hook")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "screen_topk.json"))
    args = ap.parse_args()
    sae = load_sae(args.sae)
    if sae.arch != "topk":
        raise SystemExit(f"--sae {args.sae} is a {sae.arch} SAE: the screen serves topk (train one with --arch topk)")
    store = ActivationStore.open(args.store)
    x = next(store.batches(args.batch, seed=1)).acts.float() * sae.cfg.normaliser
    d, n_feat, k = sae.cfg.d_in, sae.cfg.d_sae, int(sae.cfg.k)  # type: ignore[arg-type]
    cd = torch.bfloat16
    with torch.no_grad():
        x_c = (x - sae.b_dec) if sae.cfg.b_dec_to_input else x
        x_aug = with_ones(x_c, cd)
        w_aug = sae.encoder_in(cd, x.device)
        exact32 = (x_c @ sae.W_enc.T + sae.b_enc).topk(k, dim=1).indices
        out = torch.empty(x.shape[0], n_feat, dtype=cd)

        def whole() -> torch.Tensor:
            torch.mm(x_aug, w_aug.t(), out=out)
            return _row_topk(_order_view(out), k)[1]

        bf16 = whole()
        agreement: dict[str, Any] = {"bf16 product vs float32": shared(bf16, exact32, n_feat)}
        packed = native.screen_pack(w_aug, d, with_bias=True)
        if packed is None:
            raise SystemExit("the C kernels are off or could not be built here: the screen needs them")
        ms = sorted({k, k + k // 4, k + k // 2, SCREEN_CANDIDATES_PER_K * k})
        for m in ms:
            got = native.screen_topk(x_aug, w_aug, packed, d, k, m)
            assert got is not None
            agreement[f"screen m={m} vs bf16 product"] = shared(got[1], bf16, n_feat)
            agreement[f"screen m={m} vs float32"] = shared(got[1], exact32, n_feat)
        m = SCREEN_CANDIDATES_PER_K * k
        got = native.screen_topk(x_aug, w_aug, packed, d, k, m)
        assert got is not None
        same = got[1] == bf16  # [B, k] entries where both chose the same feature at the same place
        bf16_vals = _order_view(out).gather(1, bf16)
        agreement[f"screen m={m}: values equal to the bf16 product's where the features agree"] = float(
            (got[0] == bf16_vals)[same].float().mean())
        t_whole = best_of(whole, args.reps)
        t_pack = best_of(lambda: native.screen_pack(w_aug, d, with_bias=True), args.reps)
        t_screen = best_of(lambda: native.screen_topk(x_aug, w_aug, packed, d, k, m), args.reps)
    flops = 2 * x.shape[0] * (d + 1) * n_feat
    res = {
        "benchmark": "screen_topk", "machine": describe(), "screen_fast (AVX512-VNNI)": native.screen_fast(),
        "command": "python benchmarks/screen_topk.py " + " ".join(f"--{k_} {v}" for k_, v in vars(args).items()),
        "shape": {"rows": x.shape[0], "d_in": d, "d_sae": n_feat, "k": k, "candidates_m": m},
        "agreement": agreement,
        "ms": {"bf16 product + row top-k": 1e3 * t_whole, "pack int8 weights": 1e3 * t_pack,
               "screen (int8 product, top-m, exact re-score, top-k)": 1e3 * t_screen},
        "speedup_screen_plus_pack": t_whole / (t_screen + t_pack),
        "bf16_matmul_peak_tflops": matmul_tflops(x.shape[0], d, n_feat, cd),
        "whole_product_tflops": flops / t_whole / 1e12,
        "screen_equivalent_tflops": flops / t_screen / 1e12,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k_: res[k_] for k_ in ("agreement", "ms", "speedup_screen_plus_pack")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
