"""Where one TopK training step's time goes on this machine, against the matmul roofline of its compute dtype.

Measures (1) the float32 and bf16 matmul rates of the encoder shape ([B, d] @ [d, F]) and the encoder-bound
limits that the compute dtype's rate implies: 4·d·F flops per token (the encoder forward and a dense weight
gradient) and
2·d·F (the forward alone: the trainer's encoder weight gradient is sparse, so this is the real
bound), (2) one `Trainer.train_step` split into phases by manual timers on a resident batch, the optimiser step
after the backward timed both ways on the same trainer (the CPU's fused two-pass step and the PyTorch path),
(2b) the step with n latents marked dead, so AuxK runs, through each CPU form of the sparse AuxK (per-entry
kernels, matmuls over the dead block, the automatic choice; that choice also with AuxK on every row instead of
the default `--aux-rows`), (2c) the seconds per step in each of the step's kernels, timed where the step calls
them, (3) sparsify's own step on the same rows, and (4)
reading and gathering batches from a store.
Writes a JSON record to benchmarks/results/. Usage:

    PYTHONPATH=src python benchmarks/train_step_profile.py --store runs/small/acts --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from machine import matmul_tflops
from monoscope.sae import build_sae
from monoscope.store.batches import Batch
from monoscope.store.reader import ActivationStore
from monoscope.train import MemorySink, TrainConfig, Trainer
from monoscope.train.run import sae_config_for


class Resident:
    """The same batch forever: isolates the step from data loading."""

    normaliser = 1.0

    def __init__(self, acts: torch.Tensor) -> None:
        self.batch = Batch(acts=acts, rows=torch.arange(acts.shape[0]))

    def __next__(self) -> Batch:
        return self.batch

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def timed(fn: Any, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _kernel_times(tr: Trainer, steps: int) -> dict[str, float]:
    """Seconds per step spent in each of the step's kernels, timed by wrapping the functions the step calls (the
    sparse kernels' backward halves run inside autograd, so a phase timer cannot separate them) over `steps`
    trainer steps; "rest": the step's time that none of them covers (input preparation, AuxK, autograd, counters)."""
    from monoscope import native
    from monoscope.sae import base, sparse
    from monoscope.sae import topk as topk_mod

    targets = {
        "encoder product (bias folded in)": (base.SAE, "_encode_nograd"),
        "row top-k": (topk_mod, "_row_topk"),
        "int8 screen (product, top-k, exact re-score)": (native, "screen_topk"),
        "int8 screen's weight packing": (native, "screen_pack"),
        "decode (forward)": (base.SAE, "_sparse_decode"),
        "loss and metrics (forward)": (base.SAE, "_output"),
        "value gradient (entry dots)": (sparse, "entry_dots"),
        "weight gradients (W_enc, W_dec)": (sparse, "_transposed_accumulate"),
    }
    if tr._fused is not None:
        targets["clipping norm pass"] = (tr._fused, "grad_norm")
        targets["Adam pass (removal, clipping, renorm, bf16 copies)"] = (tr._fused, "step")
    spent = dict.fromkeys(targets, 0.0)
    saved = {name: getattr(owner, attr) for name, (owner, attr) in targets.items()}

    def wrap(name: str, fn: Any) -> Any:
        def timed_call(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
        return timed_call

    for name, (owner, attr) in targets.items():
        setattr(owner, attr, wrap(name, saved[name]))
    try:
        tr.train_step()  # warm
        spent.update(dict.fromkeys(targets, 0.0))
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        total = time.perf_counter() - t0
    finally:
        for name, (owner, attr) in targets.items():
            if owner is tr._fused:
                delattr(owner, attr)  # the class's method again
            else:
                setattr(owner, attr, saved[name])
    out = {name: round(v / steps, 4) for name, v in spent.items()}
    out["rest"] = round((total - sum(spent.values())) / steps, 4)
    out["step"] = round(total / steps, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/small/acts")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--width-mult", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dead", default="0,1000,2500,4000,6000",
                    help="dead-latent counts at which a step is timed with AuxK through each CPU form")
    ap.add_argument("--out", default="benchmarks/results/train_step_profile.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    store = ActivationStore.open(args.store)
    it = store.batches(args.batch, seed=0)
    first = next(it)
    d = first.acts.shape[1]
    f = d * args.width_mult
    b = args.batch

    # (1) roofline: the encoder matmul ([B, d] @ W_enc.T) and its dense weight-gradient matmul ([F, B] @ [B, d]),
    # measured as every benchmark measures the peak (`machine.matmul_tflops`: the weight's layout, a preallocated
    # output)
    rates = {dt: (matmul_tflops(b, d, f, dt), matmul_tflops(f, b, d, dt)) for dt in (torch.float32, torch.bfloat16)}
    flops = 2 * b * d * f
    t_fwd, t_wg = (flops / (r * 1e12) for r in rates[torch.float32])
    t_fwd_bf16, t_wg_bf16 = (flops / (r * 1e12) for r in rates[torch.bfloat16])
    tflops, tflops_bf16 = rates[torch.float32][0], rates[torch.bfloat16][0]  # bf16: what the step runs at on AMX

    # (2) one step by phases on a resident batch (the trainer's own step, timed end to end, and its phases
    # reproduced with the same calls)
    cfg = TrainConfig(arch="topk", tokens=10**9, batch_size=b, width=f"{args.width_mult}x", k=args.k,
                      log_every=10**9, checkpoint_every=0, progress=False)
    sae = build_sae(sae_config_for(cfg, d, None, d_in=d, hook=store.manifest.hook, normaliser=store.normaliser),
                    seed=0)  # as train() builds it
    src = Resident(first.acts)
    src.normaliser = store.normaliser
    tr = Trainer(sae, cfg, src, sink=MemorySink())
    if sae.compute_dtype() == torch.bfloat16:  # the bounds at the rate of the dtype the step computes in
        t_fwd, t_wg = t_fwd_bf16, t_wg_bf16
    limit = b / (t_fwd + t_wg)  # the 4·d·F limit (dense encoder weight gradient)
    limit_fwd = b / t_fwd  # the trainer's weight gradient is sparse: the dense encoder forward alone bounds it
    tr.train_step()
    t_step = timed(tr.train_step, args.steps)
    phases: dict[str, float] = {}
    post: dict[str, list[float]] = {"fused": [], "pytorch": []}
    fused = tr._fused

    def add(name: str, t0: float) -> float:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + (now - t0)
        return now

    # the optimiser step after the backward both ways, alternately on the same trainer: the CPU's two-pass fused
    # step (`train/fused_step.py`) and the PyTorch path it replaces (parallel-grad removal, clipping norm, Adam,
    # decoder renormalisation); the phases below are the trainer's own (fused where it has it)
    n_rounds = 2 * args.steps if fused is not None else args.steps
    for i in range(n_rounds):
        use_fused = fused is not None and i % 2 == 0
        t0 = time.perf_counter()
        xs = tr.scaled(first.acts)
        bool(torch.isfinite(xs.sum()))
        t0 = add("scale + finiteness test of x", t0)
        dead = tr.dead.dead() if tr.use_auxk else None
        out = tr.sae(xs, sparsity_coef=0.0, dead_mask=dead)
        t0 = add("forward (encoder, top-k, decoder, AuxK)", t0)
        out.total.backward()
        t0 = add("backward", t0)
        t_post = t0
        if use_fused:
            gn = fused.grad_norm()  # type: ignore[union-attr]
            bool(torch.isfinite(out.total.detach()) & torch.isfinite(gn))
            fused.step(tr._clip_coef(gn))  # type: ignore[union-attr]
            tr.optimizer.zero_grad(set_to_none=True)
            post["fused"].append(time.perf_counter() - t_post)
        else:
            if tr.unit_norm_decoder:
                tr.sae.remove_parallel_grads_()
            gn = tr._clip_grads()
            bool(torch.isfinite(out.total.detach()) & torch.isfinite(gn))
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            if tr.unit_norm_decoder:
                tr.sae.normalize_decoder_()
            post["pytorch"].append(time.perf_counter() - t_post)
        if use_fused or fused is None:
            add("optimiser step (removal, clipping, Adam, renorm)", t_post)
        t0 = time.perf_counter()
        tr.dead.update(out.fired, b)
        add("dead counters", t0)
    phases = {k: v / n_rounds for k, v in phases.items()}
    phases["optimiser step (removal, clipping, Adam, renorm)"] *= n_rounds / args.steps
    post_s = {k: round(sorted(v)[len(v) // 2], 4) for k, v in post.items() if v}

    # (2b) the step with AuxK at work: n dead latents (the trainer's dead mask forced), through each CPU form of
    # the sparse AuxK: per-entry kernels, dense matmuls over the dead block, and the automatic choice
    from monoscope.sae import topk as topk_mod

    aux_steps: dict[str, dict[str, float]] = {}
    default_ratio = dict(topk_mod.BLOCK_AUXK_DEAD_PER_K_AUX)
    real_dead = tr.dead.dead
    for n_dead in [int(v) for v in args.dead.split(",") if v.strip()]:
        mask = torch.zeros(f, dtype=torch.bool)
        mask[torch.randperm(f, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
        tr.dead.dead = lambda m=mask: m  # type: ignore[method-assign]
        row: dict[str, float] = {}
        for path, ratio in (("entries", {}), ("block", {dt: 10**9 for dt in default_ratio}), ("auto", default_ratio)):
            topk_mod.BLOCK_AUXK_DEAD_PER_K_AUX = ratio
            row[path] = round(b / timed(tr.train_step, max(2, args.steps // 2)))
        capped = sae.cfg  # `auto` above: AuxK on the default `--aux-rows`; here on every row of the batch
        sae.cfg = replace(capped, aux_rows=0)
        row["auto, AuxK on every row"] = round(b / timed(tr.train_step, max(2, args.steps // 2)))
        sae.cfg = capped
        aux_steps[str(n_dead)] = row
    topk_mod.BLOCK_AUXK_DEAD_PER_K_AUX = default_ratio
    tr.dead.dead = real_dead  # type: ignore[method-assign]

    # (2c) the trainer's own steps (no dead latent forced) with the step's kernels timed where they are called, so a
    # change to one of them can be seen in place; "rest" is what the timed calls leave of the step
    kernels = _kernel_times(tr, args.steps)

    # (3) sparsify's SparseCoder step on the same resident rows (Adam here; its Trainer defaults to signum,
    # an elementwise update as cheap as Adam's: the step is dominated by the encoder), no dead mask
    sparsify_s = None
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        pass
    else:
        torch.manual_seed(0)
        peer = SparseCoder(d, SparseCoderConfig(num_latents=f, k=args.k), device="cpu")
        popt = torch.optim.Adam(peer.parameters(), lr=2e-4)
        xp = tr.scaled(first.acts)

        def peer_step() -> None:
            peer(xp, dead_mask=None).fvu.backward()
            popt.step()
            popt.zero_grad(set_to_none=True)
        sparsify_s = timed(peer_step, max(2, args.steps // 2))

    # (4) data: read + gather batches from the store
    t_data = timed(lambda: next(it), args.steps)

    rec = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "load_avg": os.getloadavg(), "torch": torch.__version__},
        "shape": {"batch": b, "d": d, "features": f, "k": args.k},
        "matmul_fp32_tflops": round(tflops, 3),
        "matmul_bf16_tflops": round(tflops_bf16, 3),
        "encoder_matmul_s": round(t_fwd, 4),
        "encoder_bound_4dF_tok_s": round(limit),
        "encoder_forward_bound_2dF_tok_s": round(limit_fwd),
        "step_vs_2dF_bound": round(b / t_step / limit_fwd, 3),
        "step_resident_s": round(t_step, 4), "step_resident_tok_s": round(b / t_step),
        "phases_s": {k: round(v, 4) for k, v in phases.items()},
        "optimiser_step_s_median": post_s,
        "sparsify_step_resident_s": None if sparsify_s is None else round(sparsify_s, 4),
        "sparsify_step_resident_tok_s": None if sparsify_s is None else round(b / sparsify_s),
        "step_ratio_vs_sparsify": None if sparsify_s is None else round(sparsify_s / t_step, 2),
        "max_ratio_if_at_2dF_bound": None if sparsify_s is None else round(sparsify_s * limit_fwd / b, 2),
        "store_batch_s": round(t_data, 4), "store_tok_s": round(b / t_data),
        "compute_dtype": str(sae.compute_dtype()).removeprefix("torch."),
        "step_tok_s_with_n_dead_by_auxk_path": aux_steps,
        "kernels_in_step_s": kernels,
        "serial_step_plus_data_tok_s": round(b / (t_step + t_data)),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
