"""Run every CUDA path of monoscope on a GPU and record what each stage costs there.

Steps, each recorded even when an earlier one fails (the JSON holds the traceback):
  1. matmul peaks of the SAE's shapes on the device (fp32, tf32, bf16): the roofline the stages are read against;
  2. parity: each architecture's forward on the CPU and on the device from the same seed and batch (fp32 and the
     device's compute dtype), so a CUDA-only bug shows as a number;
  3. `monoscope run` through the pipeline API on the device (capture, train x2, eval with the spliced LM loss,
     features), each stage's wall time and throughput;
  4. SAE training throughput on the captured store at several widths and dtypes.

    python benchmarks/cuda_paths.py --model DIR --corpus FILE --out results.json [--device cuda]

`--random-model-from DIR` builds a model with random weights from a folder holding only config.json and the
tokenizer (for machines the real weights cannot reach): every cost is the real model's, no quality number is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, matmul_tflops

ARCHS = ("relu-l1", "topk", "batchtopk", "jumprelu")


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _step(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception:  # record and go on: one broken path must not hide the others
        report[name] = {"error": traceback.format_exc(limit=12)}
    report.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    print(f"[{name}] {time.perf_counter() - t0:.1f}s: {json.dumps(report[name], default=str)[:1500]}", flush=True)
    _write(report)


def _write(report: dict[str, Any]) -> None:
    out = Path(report["out"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out)


def random_model(src: Path, dst: Path, seed: int = 0) -> Path:
    """A model folder with the config and tokenizer of `src` and seeded random weights (bf16 on disk)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.name != "config.json":
            shutil.copy(f, dst / f.name)
    return dst


def peaks(device: str) -> dict[str, Any]:
    shapes = {"encoder_16x": (4096, 576, 9216), "decoder_16x": (4096, 9216, 576), "encoder_256x": (4096, 576, 147456)}
    out: dict[str, Any] = {}
    for name, (m, k, n) in shapes.items():
        for label, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                                   ("bf16", torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            out[f"{name}_{label}_tflops"] = round(matmul_tflops(m, k, n, dtype, device=device, seconds=0.5), 1)
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def parity(device: str) -> dict[str, Any]:
    """Each architecture's forward on CPU vs the device, same seed and batch; fp32 and bf16 compute."""
    from monoscope.sae.config import SAEConfig
    from monoscope.sae.registry import build_sae

    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 576, generator=gen)
    for arch in ARCHS:
        for cd in ("float32", "bfloat16"):
            kw: dict[str, Any] = {"k": 32} if arch in ("topk", "batchtopk") else {}
            cfg = SAEConfig(arch=arch, d_in=576, d_sae=9216, compute_dtype=cd, **kw)
            cpu = build_sae(SAEConfig(arch=arch, d_in=576, d_sae=9216, compute_dtype="float32", **kw), seed=0)
            dev = build_sae(cfg, seed=0, device=device)
            with torch.no_grad():
                a = cpu(x, sparsity_coef=1.0)
                b = dev(x.to(device), sparsity_coef=1.0)
            row: dict[str, Any] = {
                "x_hat_max_abs_diff": float((a.x_hat - b.x_hat.cpu()).abs().max()),
                "fvu_cpu": round(float(a.fvu), 6), "fvu_device": round(float(b.fvu), 6),
                "l0_cpu": round(float(a.l0), 3), "l0_device": round(float(b.l0), 3),
            }
            if arch == "topk" and a.indices is not None and b.indices is not None:
                ia, ib = a.indices.sort(dim=1).values, b.indices.cpu().sort(dim=1).values
                row["topk_rows_identical"] = float((ia == ib).all(dim=1).float().mean())
            out[f"{arch}/{cd}"] = row
    return out


def pipeline(model: str, corpus: str, device: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from monoscope.pipeline import RunConfig, run

    cfg = RunConfig(out=work / "run", model=model, corpus=corpus, device=device, explain_features=0,
                    tokens=args.tokens, train_tokens=args.train_tokens, eval_tokens=args.eval_tokens,
                    features_tokens=args.features_tokens, progress=False)
    res = run(cfg, command="benchmarks/cuda_paths.py", echo=False)
    stages = {s.name: round(s.seconds, 1) for s in res.stages}
    cap, ev, fr = res.capture, res.eval, res.features
    train = {s.name: {"tokens_per_s": round(s.result.tokens_per_s), "fvu": s.result.metrics.get("fvu"),
                      "l0": s.result.metrics.get("l0"), "dead_frac": s.result.metrics.get("dead_frac")}
             for s in res.stages if s.name.startswith("train")}
    rate = round(cap.new_tokens / cap.seconds) if cap.seconds else None
    keep = ("fvu", "l0_mean", "dead_frac", "ce_", "kl")
    return {
        "stage_seconds": stages, "total_seconds": round(sum(stages.values()), 1),
        "capture_tokens": cap.new_tokens, "capture_tokens_per_s": rate, "train": train,
        "eval_tokens_per_s": ev.tokens_per_s,
        "eval_metrics": {k: v for k, v in _flat(ev.metrics).items() if any(w in k for w in keep)},
        "features_seconds": round(fr.seconds, 1), "features_tokens": fr.new_tokens,
        "note": "random weights with SmolLM2-135M's shapes: costs are the real model's, quality numbers are not",
    }


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, int | float):
            out[f"{prefix}{k}"] = v
    return out


def train_speed(store: Path, device: str, work: Path, tokens: str) -> dict[str, Any]:
    from monoscope.train import train

    out: dict[str, Any] = {}
    for arch, width, dtype in (("topk", "16x", "float32"), ("topk", "16x", "bfloat16"), ("topk", "64x", "bfloat16"),
                               ("topk", "256x", "bfloat16"), ("relu-l1", "16x", "bfloat16"),
                               ("batchtopk", "16x", "bfloat16"), ("jumprelu", "16x", "bfloat16")):
        key = f"{arch}/{width}/{dtype}"
        try:
            k = 32 if arch in ("topk", "batchtopk") else None
            r = train(work / f"train-{arch}-{width}-{dtype}", store=store, arch=arch, k=k, width=width,
                      tokens=tokens, device=device, dtype=dtype, progress=False, command="benchmarks/cuda_paths.py")
            out[key] = {"tokens_per_s": round(r.tokens_per_s), "seconds": round(r.seconds, 1),
                        "fvu": r.metrics.get("fvu"), "l0": r.metrics.get("l0"), "dead_frac": r.metrics.get("dead_frac")}
        except Exception:
            out[key] = {"error": traceback.format_exc(limit=8)}
        print(f"  train {key}: {out[key]}", flush=True)
    return out


def profile_train(model: str, corpus: str, device: str, work: Path, tokens: str) -> dict[str, Any]:
    """Where a training step's time goes on the device: data alone, the step alone on a resident batch, and
    the profiler's top operators of `train()` as a whole."""
    from torch.profiler import ProfilerActivity, profile

    from monoscope.capture import capture
    from monoscope.sae.config import SAEConfig
    from monoscope.sae.registry import build_sae
    from monoscope.train import train
    from monoscope.train.data import store_data

    store = work / "run" / "acts"
    if not store.exists():
        store = work / "prof-acts"
        capture(store, model=model, corpus=corpus, tokens="300k", device=device, progress=False)
    out: dict[str, Any] = {}
    data = store_data(store, 4096, 0)
    batches = iter(data.batches)
    for _ in range(3):
        next(batches)
    t0, n = time.perf_counter(), 50 if torch.device(device).type == "cuda" else 3
    for _ in range(n):
        b = next(batches).acts.to(device, non_blocking=True).float()
    _sync(device)
    out["data_only_tokens_per_s"] = round(n * 4096 / (time.perf_counter() - t0))
    x = b * (576 ** 0.5 / b.norm(dim=1).mean())
    for cd in ("float32", "bfloat16") if torch.device(device).type == "cuda" else ("float32",):
        sae = build_sae(SAEConfig(arch="topk", d_in=576, d_sae=9216, k=32, compute_dtype=cd), seed=0, device=device)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
        for i in range(n + 10):
            if i == 10:
                _sync(device)
                t0 = time.perf_counter()
            o = sae(x)
            o.total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        out[f"step_only_{cd}_tokens_per_s"] = round(n * 4096 / (time.perf_counter() - t0))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        r = train(work / "prof-train", store=store, arch="topk", k=32, width="16x", tokens=tokens, device=device,
                  progress=False, command="benchmarks/cuda_paths.py")
    out["train_under_profiler_tokens_per_s"] = round(r.tokens_per_s)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    out["top_ops_by_self_cpu"] = table.splitlines()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60)
    out["top_ops_by_self_cuda"] = table.splitlines()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder, Hugging Face id or .gguf (default: --random-model-from)")
    ap.add_argument("--random-model-from", type=Path, help="folder with config.json + tokenizer: random weights")
    ap.add_argument("--corpus", default="default")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cuda_paths.json")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--tokens", default="1M")
    ap.add_argument("--train-tokens", default="2M")
    ap.add_argument("--eval-tokens", default="50k")
    ap.add_argument("--features-tokens", default="500k")
    ap.add_argument("--speed-tokens", default="4M")
    ap.add_argument("--profile-tokens", default="400k")
    ap.add_argument("--skip", default="",
                    help="steps to skip, comma-separated: peaks,parity,pipeline,train_speed,profile")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="monoscope-cuda-"))
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, Any] = {"benchmark": "cuda_paths", "out": str(args.out), "machine": describe(),
                              "command": " ".join(sys.argv), "device": args.device}
    if torch.cuda.is_available():
        report["machine"]["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    model = args.model
    if model is None:
        if args.random_model_from is None:
            ap.error("give --model or --random-model-from")
        model = str(random_model(args.random_model_from, work / "model"))
        report["model"] = f"random weights, shapes of {args.random_model_from.name}"
    else:
        report["model"] = model
    _write(report)
    if "peaks" not in skip and args.device != "cpu":
        _step(report, "peaks", lambda: peaks(args.device))
    if "parity" not in skip:
        _step(report, "parity", lambda: parity(args.device))
    if "pipeline" not in skip:
        _step(report, "pipeline", lambda: pipeline(model, args.corpus, args.device, work, args))
    if "train_speed" not in skip and (work / "run" / "acts").exists():
        _step(report, "train_speed", lambda: train_speed(work / "run" / "acts", args.device, work, args.speed_tokens))
    if "profile" not in skip:
        _step(report, "profile", lambda: profile_train(model, args.corpus, args.device, work, args.profile_tokens))
    if torch.cuda.is_available():
        report["max_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    _write(report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
