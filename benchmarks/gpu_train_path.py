"""On a CUDA GPU: `train()` from a store with the GPU data path (finiteness checks read once per log
interval, batches prefetched to the GPU on a thread) against the eager loop it replaced, in the same
process on the same store; plus the path's behaviour on the device (a NaN batch skipped or stopped),
a one-rank NCCL run of `torchrun ... monoscope train`, and (`--steps vs_sparsify`) monoscope's `train()`
against sparsify's TopK SAE and TopK transcoder recipes (peers.SparsifyStep, its own kernels) on the same
store, each run its own process, one after the other, A B A B.

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


def _child(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """One training run in its own process (this script with --child), its result read back."""
    name = Path(spec["out"]).name
    spec_path, out_path = work / f"spec-{name}.json", work / f"result-{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not spec.get("graph", True):
        env["MONOSCOPE_CUDA_GRAPH"] = "0"
    p = subprocess.run([sys.executable, __file__, "--child", str(spec_path), "--child-out", str(out_path)],
                       capture_output=True, text=True, env=env, timeout=400)
    if p.returncode != 0 or not out_path.is_file():
        return {"error": (p.stdout + p.stderr)[-3000:]}
    return json.loads(out_path.read_text())


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """monoscope: `train()` from the store (what `monoscope train STORE --device cuda` runs). sparsify: its
    SparseCoder and step on the same store's rows, read into GPU memory before the clock starts (its Trainer
    reads them from the model's hook instead: this is its best case), batches of 4,096 rows, no warm-up for
    either. tokens/s counts the training loop only; wall_s adds set-up (model, store, optimiser)."""
    global DEVICE
    DEVICE = spec["device"]
    t_start = time.perf_counter()
    from monoscope.train.graph_step import GraphedStep

    made: list[GraphedStep] = []  # every trainer's captured step (GraphedStep counts its replays and failure)
    saved_init = GraphedStep.__init__

    def init(self: GraphedStep, *a: Any) -> None:
        saved_init(self, *a)
        made.append(self)

    GraphedStep.__init__ = init  # type: ignore[method-assign]
    res = _run_child(spec, t_start)
    res["graph_replays"] = sum(g.replays for g in made)
    failed = [g.failed for g in made if g.failed]
    if failed:
        res["graph_failed"] = failed[0]
    return res


def _run_child(spec: dict[str, Any], t_start: float) -> dict[str, Any]:
    from monoscope.units import parse_count

    tokens, arch, batch = parse_count(spec["tokens"]), spec["arch"], int(spec.get("batch", 4096))
    if spec["who"] == "monoscope":
        from monoscope.train import train

        r = train(spec["out"], store=spec["store"], device=DEVICE, progress=False, arch=arch, k=32, width="16x",
                  tokens=tokens, batch_size=batch, revive=spec.get("revive", "auto"),
                  command="benchmarks/gpu_train_path.py vs_sparsify")
        return {"tokens_per_s": round(r.tokens_per_s), "seconds": round(r.seconds, 3),
                "wall_s": round(time.perf_counter() - t_start, 2), "fvu_last_log": r.metrics.get("fvu"),
                "l0": r.metrics.get("l0"), "dead_frac": r.metrics.get("dead_frac"),
                "compute_dtype": str(r.sae.compute_dtype()).split(".")[-1]}
    if spec["who"] == "monoscope_resident":
        return _resident_monoscope(spec, tokens, batch, t_start)
    note = None
    try:
        import datasets  # noqa: F401  (sparsify's trainer module imports it; its step does not use it)
    except Exception as e:  # a GPU image whose pyarrow is older than datasets asks
        import types

        stub = types.ModuleType("datasets")
        stub.Dataset = stub.DatasetDict = type("Unused", (), {})  # type: ignore[attr-defined]
        sys.modules["datasets"] = stub
        note = f"datasets not importable ({e!r}); a stub stood in for it (sparsify's step never touches it)"
    from sparsify.utils import decoder_impl

    from peers import SparsifyStep

    steps = tokens // batch
    from monoscope.store.reader import ActivationStore

    rows = _resident_rows(ActivationStore.open(spec["store"]), tokens, batch)
    transcode = arch == "transcoder"
    d_in = rows.shape[-1] // 2 if transcode else rows.shape[-1]
    step = SparsifyStep(d_in, 16 * d_in, 32, 0, DEVICE, transcode)
    _sync()
    t0 = time.perf_counter()
    for x in rows:
        step(x)
    _sync()
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": round(steps * batch / seconds), "seconds": round(seconds, 3),
            "wall_s": round(time.perf_counter() - t_start, 2), "fvu_last_batch": step.last_fvu,
            "dead_frac_since_10M_or_run": float((step.since >= min(10_000_000, steps * batch // 5)).float().mean()),
            "decoder": decoder_impl.__name__,
            "rows_dtype_in_store": str(rows.dtype), "note": note}


def _resident_rows(store: Any, tokens: int, batch: int) -> Any:
    """The store's first tokens//batch shuffled batches, stacked in GPU memory [steps, B, width] (not timed)."""
    it = iter(store.batches(batch, seed=0))
    return torch.stack([next(it).acts.reshape(batch, -1) for _ in range(tokens // batch)]).to(DEVICE)


def _resident_monoscope(spec: dict[str, Any], tokens: int, batch: int, t_start: float) -> dict[str, Any]:
    """monoscope's Trainer (train()'s loop and step) on rows already in GPU memory, as sparsify's rows are:
    the step and loop without the store's data path."""
    from monoscope.sae import SAEConfig, build_sae
    from monoscope.store.batches import Batch
    from monoscope.store.reader import ActivationStore
    from monoscope.train import TrainConfig, Trainer

    store = ActivationStore.open(spec["store"])  # opened once: its rows and its normaliser
    rows = _resident_rows(store, tokens, batch)
    cfg = TrainConfig(arch=spec["arch"], tokens=tokens, width="16x", k=32, batch_size=batch, device=DEVICE,
                      progress=False, checkpoint_every=0, revive=spec.get("revive", "auto"))
    sae = build_sae(SAEConfig(arch=spec["arch"], d_in=rows.shape[-1], d_sae=cfg.d_sae(rows.shape[-1]), k=32,
                              normaliser=float(store.normaliser), dtype="float32", compute_dtype=cfg.dtype),
                    seed=0, device=DEVICE)

    class Resident:  # a BatchSource over the resident rows
        i = 0

        def __next__(self) -> Any:
            if self.i >= len(rows):
                raise StopIteration
            self.i += 1
            return Batch(rows[self.i - 1], torch.arange(batch))

        def state_dict(self) -> dict[str, Any]:
            return {"i": self.i}

        def load_state_dict(self, s: dict[str, Any]) -> None:
            self.i = s["i"]

    trainer = Trainer(sae, cfg, Resident())
    trainer.init_b_dec(rows[0])
    _sync()
    t0 = time.perf_counter()
    trainer.run()
    _sync()
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": round(trainer.tokens / seconds), "seconds": round(seconds, 3),
            "wall_s": round(time.perf_counter() - t_start, 2), "fvu_last_log": trainer.last_metrics.get("fvu"),
            "compute_dtype": str(sae.compute_dtype()).split(".")[-1], "defer_checks": trainer.defer_checks}


def vs_sparsify(store: Path, tc_store: Path | None, work: Path, tokens: str, configs: str) -> dict[str, Any]:
    """monoscope's TopK SAE (and transcoder, given a paired store) against sparsify's, 16x, k=32, A B A B.
    configs: comma-separated ARCH[:BATCH][:noaux][:resident][:nograph] (noaux: monoscope with --revive none, as
    sparsify's auxk_alpha=0; resident: monoscope's Trainer on rows already in GPU memory, as sparsify's are, instead
    of train() reading the store; nograph: MONOSCOPE_CUDA_GRAPH=0, the step not captured as a CUDA graph)."""
    out: dict[str, Any] = {}
    for conf in configs.split(","):
        arch, *rest = conf.split(":")
        batch = int(rest[0]) if rest and rest[0].isdigit() else 4096
        revive = "none" if "noaux" in rest else "auto"
        mono = "monoscope_resident" if "resident" in rest else "monoscope"
        graph = "nograph" not in rest
        st = tc_store if arch == "transcoder" else store
        if st is None:
            continue
        row: dict[str, Any] = {"batch": batch, "monoscope_revive": revive, "monoscope_cuda_graph": graph}
        for rep, who in enumerate((mono, "sparsify") * 2):
            spec = {"who": who, "arch": arch, "store": str(st), "tokens": tokens, "device": DEVICE, "batch": batch,
                    "revive": revive, "graph": graph, "out": str(work / f"vs-{conf.replace(':', '-')}-{who}-{rep}")}
            row.setdefault(who, []).append(_child(spec, work))
        rates = {w: [r.get("tokens_per_s") for r in row[w]] for w in (mono, "sparsify")}
        if all(v for vs in rates.values() for v in vs):
            row["ratio_monoscope_over_sparsify"] = round(sum(rates[mono]) / sum(rates["sparsify"]), 2)
        out[conf] = row
        print(f"  {conf}: {json.dumps(rates)} ratio {row.get('ratio_monoscope_over_sparsify')}", flush=True)
    return out


def batch_sizes(store: Path, work: Path, tokens: str) -> dict[str, Any]:
    """TopK 16x bf16 on the GPU path at several batch sizes: how much of a step is per-step overhead."""
    out: dict[str, Any] = {}
    for bs in (4096, 16384):
        out[str(bs)] = _train(store, work / f"bs-{bs}", "new", arch="topk", k=32, width="16x", tokens=tokens,
                              dtype="bfloat16", batch_size=bs)
        print(f"  batch {bs}: {out[str(bs)]}", flush=True)
    return out


def main() -> None:
    if "--child" in sys.argv:  # one run of vs_sparsify, in its own process
        spec = json.loads(Path(sys.argv[sys.argv.index("--child") + 1]).read_text())
        res = run_child(spec)
        Path(sys.argv[sys.argv.index("--child-out") + 1]).write_text(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-model-from", type=Path, required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", default="2M", help="tokens per training run")
    ap.add_argument("--store-tokens", default="1M")
    ap.add_argument("--steps", default="nonfinite,speed,nccl,batch",
                    help="which steps to run after the capture (also: vs_sparsify)")
    ap.add_argument("--tc-store-tokens", default="1M",
                    help="vs_sparsify: tokens of the paired mlp_in.15,mlp_out.15 store of the transcoder rows "
                         "(0: none; training cycles over it)")
    ap.add_argument("--vs-configs", default="topk,transcoder",
                    help="vs_sparsify rows: ARCH[:BATCH][:noaux][:resident], comma-separated (noaux: monoscope "
                         "--revive none; resident: its Trainer on rows in GPU memory)")
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
    tc_store = (work / "acts-tc" if "vs_sparsify" in args.steps and "transcoder" in args.vs_configs
                and args.tc_store_tokens != "0" else None)
    if tc_store is not None:
        step("capture_tc", lambda: {"seconds": round(_timed(lambda: capture(
            tc_store, model=str(model), corpus=args.corpus, hook="mlp_in.15,mlp_out.15", tokens=args.tc_store_tokens,
            device=DEVICE, progress=False)), 1)})
    steps = {"nonfinite": nonfinite_on_device, "speed": lambda: speed(store, work, args.tokens),
             "vs_sparsify": lambda: vs_sparsify(store, tc_store, work, args.tokens, args.vs_configs),
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
