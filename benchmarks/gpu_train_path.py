"""On a CUDA GPU: `train()` from a store with the GPU data path (finiteness checks read once per log
interval, batches prefetched to the GPU on a thread) against the eager loop it replaced, in the same
process on the same store; plus the path's behaviour on the device (a NaN batch skipped or stopped)
and a one-rank NCCL run of `torchrun ... monoscope train`.

    python benchmarks/gpu_train_path.py --random-model-from CONFIG_AND_TOKENIZER_DIR --corpus CORPUS.jsonl \\
        --out results.json

The store comes from `monoscope.capture` on the device (random weights with the real model's shapes
when the weights cannot travel: costs are real, quality numbers are not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import monoscope.train.run as run_mod
from cuda_paths import random_model
from machine import describe
from monoscope.train.trainer import Trainer


class _NoPrefetch:
    """Stands in for DevicePrefetch: hands the source back unwrapped (the loop before prefetching)."""

    def __new__(cls, source: Any, device: Any) -> Any:  # type: ignore[misc]
        return source


DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _train(store: Path, out: Path, mode: str, **kw: Any) -> dict[str, Any]:
    """mode "new": the GPU path; "old": eager checks, no prefetch (as before)."""
    from monoscope.train import train

    saved_prefetch, saved_init = run_mod.DevicePrefetch, Trainer.__init__
    if mode == "old":
        run_mod.DevicePrefetch = _NoPrefetch  # type: ignore[misc,assignment]

        def init(self: Trainer, *a: Any, **k: Any) -> None:
            saved_init(self, *a, **k)
            self.defer_checks = False

        Trainer.__init__ = init  # type: ignore[method-assign]
    try:
        _sync()
        r = train(out, store=store, device=DEVICE, progress=False, command="benchmarks/gpu_train_path.py", **kw)
    finally:
        run_mod.DevicePrefetch, Trainer.__init__ = saved_prefetch, saved_init  # type: ignore[misc,method-assign]
    return {"tokens_per_s": round(r.tokens_per_s), "seconds": round(r.seconds, 2), "fvu": r.metrics.get("fvu"),
            "l0": r.metrics.get("l0"), "dead_frac": r.metrics.get("dead_frac")}


def speed(store: Path, work: Path, tokens: str) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    configs = [("topk", "16x", "float32"), ("topk", "16x", "bfloat16"), ("batchtopk", "16x", "bfloat16"),
               ("relu-l1", "16x", "bfloat16"), ("jumprelu", "16x", "bfloat16"), ("topk", "64x", "bfloat16")]
    if DEVICE != "cuda":
        configs = [("topk", "2x", "float32")]
    for arch, width, dtype in configs:
        k = 32 if arch in ("topk", "batchtopk") else None
        key = f"{arch}/{width}/{dtype}"
        row: dict[str, Any] = {}
        for rep, mode in enumerate(("old", "new", "old", "new")):  # A B A B
            try:
                r = _train(store, work / f"{key.replace('/', '-')}-{mode}-{rep}", mode, arch=arch, k=k, width=width,
                           tokens=tokens, dtype=dtype)
            except Exception:
                r = {"error": traceback.format_exc(limit=8)}
            row.setdefault(mode, []).append(r)
        rates = {m: [r.get("tokens_per_s") for r in row[m]] for m in ("old", "new")}
        if all(v for vs in rates.values() for v in vs):
            row["speedup"] = round(sum(rates["new"]) / sum(rates["old"]), 2)
        rows[key] = row
        print(f"  {key}: {json.dumps({m: rates[m] for m in rates})} speedup {row.get('speedup')}", flush=True)
    return rows


def nonfinite_on_device() -> dict[str, Any]:
    """The deferred path on CUDA: a NaN batch is skipped like the eager loop skips it, or stops the run."""
    from monoscope.sae import SAEConfig, build_sae
    from monoscope.store.batches import Batch
    from monoscope.train import NonFiniteError, TrainConfig

    class Src:
        def __init__(self) -> None:
            self.i = 0
            g = torch.Generator().manual_seed(0)
            self.data = torch.randn(40, 1024, 64, generator=g)
            self.data[7, 11, 3] = float("nan")

        def __next__(self) -> Batch:
            if self.i >= len(self.data):
                raise StopIteration
            self.i += 1
            return Batch(self.data[self.i - 1], torch.arange(1024) + 1024 * (self.i - 1))

        def state_dict(self) -> dict[str, Any]:
            return {"i": self.i}

        def load_state_dict(self, s: dict[str, Any]) -> None:
            self.i = s["i"]

    out: dict[str, Any] = {}
    for arch in ("topk", "batchtopk", "relu-l1", "jumprelu"):
        k = 8 if arch in ("topk", "batchtopk") else None
        finals = {}
        for defer in (False, True):
            cfg = TrainConfig(arch=arch, tokens=40 * 1024, batch_size=1024, width="4x", k=k, log_every=10,
                              checkpoint_every=0, progress=False, skip_nonfinite=True, device=DEVICE)
            sae = build_sae(SAEConfig(arch=arch, d_in=64, d_sae=256, k=k), seed=0, device=DEVICE)
            t = Trainer(sae, cfg, Src())
            t.defer_checks = defer
            t.init_b_dec(torch.randn(256, 64, generator=torch.Generator().manual_seed(1)))
            t.run()
            finals[defer] = (t.skipped, {n: p.detach().clone() for n, p in sae.state_dict().items()})
        new, old = finals[True][1], finals[False][1]
        diff = max(float((new[n].float() - old[n].float()).abs().max()) for n in new)
        out[arch] = {"skipped_eager": finals[False][0], "skipped_deferred": finals[True][0],
                     "max_abs_weight_diff": diff}
    cfg = TrainConfig(arch="topk", tokens=40 * 1024, batch_size=1024, width="4x", k=8, log_every=10,
                      checkpoint_every=0, progress=False, device=DEVICE)
    t = Trainer(build_sae(SAEConfig(arch="topk", d_in=64, d_sae=256, k=8), seed=0, device=DEVICE), cfg, Src())
    try:
        t.run()
        out["stop"] = "no error raised"
    except NonFiniteError as e:
        out["stop"] = str(e)
    return out


def nccl_one_rank(store: Path, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m",
           "monoscope.train.cli", str(store), "--arch", "topk", "--k", "32", "--tokens", "1M", "--device",
           DEVICE, "--dist-timeout", "120", "--out", str(work / "nccl"), "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=150)
    log = (p.stdout + p.stderr).splitlines()
    errors = [line for line in log if "Error" in line or "error:" in line]
    return {"command": " ".join(cmd[1:]), "returncode": p.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "first_error_lines": errors[:8], "output_tail": "\n".join(log[-25:])}


def batch_sizes(store: Path, work: Path, tokens: str) -> dict[str, Any]:
    """TopK 16x bf16 on the GPU path at several batch sizes: how much of a step is per-step overhead."""
    out: dict[str, Any] = {}
    for bs in (4096, 16384):
        out[str(bs)] = _train(store, work / f"bs-{bs}", "new", arch="topk", k=32, width="16x", tokens=tokens,
                              dtype="bfloat16", batch_size=bs)
        print(f"  batch {bs}: {out[str(bs)]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-model-from", type=Path, required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", default="2M", help="tokens per training run")
    ap.add_argument("--store-tokens", default="1M")
    ap.add_argument("--steps", default="nonfinite,speed,nccl,batch", help="which steps to run after the capture")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (the comparison is for GPUs)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    from monoscope.capture import capture

    work = Path(tempfile.mkdtemp(prefix="monoscope-gpu-"))
    report: dict[str, Any] = {"benchmark": "gpu_train_path", "command": " ".join(sys.argv), "machine": describe(),
                              "protocol": "same process, same store; per configuration the old loop and the new "
                                          "path alternate A B A B; tokens/s as train() reports it"}
    if DEVICE == "cuda":
        report["machine"]["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)

    def step(name: str, fn: Any) -> None:
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:
            report[name] = {"error": traceback.format_exc(limit=10)}
        print(f"[{name}] {time.perf_counter() - t0:.1f}s {json.dumps(report[name], default=str)[:3000]}", flush=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(args.out)

    model = random_model(args.random_model_from, work / "model")
    store = work / "acts"
    step("capture", lambda: {"seconds": round(_timed(lambda: capture(store, model=str(model), corpus=args.corpus,
                                                                       tokens=args.store_tokens, device=DEVICE,
                                                                       progress=False)), 1)})
    steps = {"nonfinite": nonfinite_on_device, "speed": lambda: speed(store, work, args.tokens),
             "nccl": lambda: nccl_one_rank(store, work), "batch": lambda: batch_sizes(store, work, args.tokens)}
    for name in args.steps.split(","):
        step(name, steps[name])
    if DEVICE == "cuda":
        report["max_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    step("done", lambda: True)


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
