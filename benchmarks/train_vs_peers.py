"""TopK SAE training speed and quality: monoscope against sparsify and SAELens, measured in one run.

    python benchmarks/train_vs_peers.py              # -> benchmarks/results/train_vs_peers.json (~30 min)
    python benchmarks/train_vs_peers.py --tokens 300k --skip-saelens-relu --skip-scale   # a quick look
    python benchmarks/train_vs_peers.py --tune-only --tune-l1 8,12,20   # SAELens ReLU-L1 sweep, recorded;
                                                     # the next full run picks its coefficient from it
    python benchmarks/train_vs_peers.py --transcoder --tokens 200k --capture-tokens 260k --heldout-rows 16000
        # TopK transcoder mlp_in.15 -> mlp_out.15: monoscope against sparsify's transcoder (transcode=True), on a
        # paired store (runs/bench/acts-tc) -> benchmarks/results/train_vs_peers_transcoder.json
    python benchmarks/train_vs_peers.py --crosscoder --lmsaes-python /tmp/venv-lmsaes/bin/python \
        --capture-tokens 64k --tokens 48k --batch 1024 --heldout-rows 8192 --protocol sequential \
        --lmsaes-grid-init --lmsaes-lr 2e-3
        # acausal TopK crosscoder over resid_post.10,15,20: monoscope against llamascopium's (OpenMOSS lm_saes)
        # Crosscoder + Trainer, run by that separate venv's python (llamascopium needs transformer-lens<4 and is
        # no dependency of monoscope: python3 -m venv /tmp/venv-lmsaes; pip install torch==2.13.0 (CPU wheel);
        # pip install llamascopium "transformer-lens<4"), on a store of those hooks side by side (runs/bench/acts-cc,
        # captured if missing, as `monoscope capture --hook resid_post.10,resid_post.15,resid_post.20` does)
        # -> benchmarks/results/train_vs_peers_crosscoder.json

Data: the default model's `resid_post.15` captured once into `runs/bench/acts` (1.2M tokens; a rerun
of the capture is a no-op). The last shards (>= --heldout-rows rows) are held out; the training
shards are exposed to `monoscope.train.train()` as a store of their own (`runs/bench/tvp/train_store`:
links to the shards and a manifest listing only them, so its normaliser comes from training rows
only: `train()` has no held-out option), and written once as one shuffled stream of `steps x 4096`
rows that the other trainers read batch by batch, all in the same order.

Trainers, each in its own child process (so each reports its own peak RSS, as VmHWM):
  monoscope train()  `train(store=train_store, arch=topk, k=32, width=16x, batch 4096, dtype auto)`:
                     the user's path, store reads and the end-of-run checkpoint included; run alone;
  monoscope Trainer  the same loop (`monoscope.train.Trainer.run`) on the shared stream: bf16 (auto),
                     fp32, and bf16 with each `--mono-lr` learning rate (none by default; a diagnostic);
  sparsify           its SparseCoder + its Trainer.fit step and default optimizer (see peers.py);
  SAELens TopK       TopKTrainingSAE through its SAETrainer.fit, expected_average_only_in, Adam 3e-4;
  SAELens ReLU-L1    StandardTrainingSAE, its tutorial settings, L1 coefficient from the recorded sweep.
--crosscoder: monoscope's acausal TopK crosscoder (Trainer, auto dtype) against llamascopium's `Crosscoder`
(peers.py: its Initializer + Trainer.fit; `--lmsaes-grid-init` adds a row with its decoder-norm grid search), the
peer's child started with `--lmsaes-python`; held-out FVU over the three hooks side by side (raw scale) and per hook.
The Trainer runs and the peers are interleaved: they run as separate processes taking turns of
`--turn-s` seconds of training time (one runs while the others wait), so on this shared 2-core
machine they all meet the same background load; the load is recorded.
All see `--tokens` training tokens (one pass, rounded up to whole batches of 4096).

Measured: tokens/s of the training loop (held-out evaluations and turn waits excluded; reading
the batches included), and the 90th percentile of per-turn speeds (the quieter turns); held-out
FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² on RAW activations (every SAE's reconstruction brought back to raw
scale) after the same tokens, and after the same wall time (every other trainer is evaluated at the
first step after its training clock passes the time monoscope's bf16 Trainer needed for the whole
pass); L0 and never-active features on the held-out rows; features not active over the last 20%
of training; peak RSS; the fraction of this machine's matmul peak (the encoder's shape, 4096x576 @
576x9216, measured at the start and end, the better one kept) at 4·d·F FLOPs per token: the
encoder's forward and weight gradient, the work that stays dense when the decoder touches only
the k active columns (the issue's convention; a dense SAE does ~8·d·F). 4·d·F at the bf16 peak is
the issue's "~45,000 tokens/s" limit (it assumed ~1 TFLOP/s; a quiet run here measures more), and
each trainer's fraction of the measured limit and of 45,000 is reported. Unless --skip-scale, a
262,144-feature TopK SAE also trains for --scale-steps steps through `train()`: memory and speed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, matmul_tflops, write_result
from peers import (
    BatchFile,
    Clock,
    Gate,
    HeldOut,
    Marks,
    Recorder,
    at_time,
    load_now,
    log,
    train_saelens,
    train_sparsify,
)

ROOT = Path(__file__).resolve().parent.parent
HOOK = "resid_post.15"
TRANSCODER_HOOKS = "mlp_in.15,mlp_out.15"
"""--transcoder: the paired store's hooks (what the MLP of block 15 reads, what it adds)."""
CROSSCODER_HOOKS = "resid_post.10,resid_post.15,resid_post.20"
"""--crosscoder: the store's hooks (three layers of the residual stream, read and written by one dictionary)."""
NAME = "train_vs_peers"


# ============================================================================= data


def parse_count(s: str) -> int:
    from monoscope.units import parse_count as pc

    return int(pc(s))


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Capture (if needed), split off the held-out shards, write the training store view, the
    shared stream and the held-out rows. Everything is reused when already there and unchanged."""
    from monoscope.capture import capture
    from monoscope.fileio import sha256_file
    from monoscope.store import ActivationStore

    acts = Path(args.store)
    hook = args.hook
    if not (acts / "manifest.json").is_file():
        log(f"capturing {args.capture_tokens} tokens of {hook} into {acts} (resumable) ...")
        t0 = time.perf_counter()
        capture(str(acts), model="default", corpus="default", hook=hook, tokens=args.capture_tokens)
        log(f"capture done in {time.perf_counter() - t0:.0f}s")
    store = ActivationStore.open(acts, expect_hook=hook)
    m = store.manifest
    d = m.d_model
    n_hold, rows = 0, 0
    while rows < args.heldout_rows:
        n_hold += 1
        rows += m.shards[-n_hold].rows
    n_train = len(m.shards) - n_hold
    train_rows = sum(s.rows for s in m.shards[:n_train])
    steps = math.ceil(args.tokens / args.batch)
    if steps * args.batch > train_rows:
        raise SystemExit(f"--tokens {args.tokens:,} needs {steps * args.batch:,} training rows but the training "
                         f"shards hold {train_rows:,}: capture more (--capture-tokens) or lower --tokens")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    key = {"manifest_sha256": sha256_file(acts / "manifest.json"), "n_train_shards": n_train,
           "n_heldout_shards": n_hold, "steps": steps, "batch": args.batch, "seed": args.seed}
    meta_path = work / "prepared.json"
    stream_path, held_path, view = work / "stream.bin", work / "heldout.safetensors", work / "train_store"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key and stream_path.is_file() \
            and held_path.is_file() and (view / "manifest.json").is_file():
        log(f"reusing the prepared data in {work}")
        return json.loads(meta_path.read_text())
    from safetensors.torch import save_file

    log(f"preparing: {n_train} training shards ({train_rows:,} rows), {n_hold} held-out shards ({rows:,} rows)")
    # the training store: links to the training shards + a manifest listing only them
    if view.exists():
        shutil.rmtree(view)
    view.mkdir()
    for s in m.shards[:n_train]:
        (view / s.file).symlink_to((acts / s.file).resolve())
    replace(m, shards=list(m.shards[:n_train])).write(view)
    # held-out rows, raw, bf16
    held = torch.cat([store.read_shard(i).rows() for i in range(n_train, len(m.shards))])
    save_file({"rows": held.contiguous()}, str(held_path))
    # the shared stream: one global shuffle of the training rows, the first steps*batch of them
    all_rows = torch.cat([store.read_shard(i).rows() for i in range(n_train)])
    perm = torch.randperm(all_rows.shape[0], generator=torch.Generator().manual_seed(args.seed))
    take = perm[: steps * args.batch]
    tmp = stream_path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        for s in range(0, take.numel(), 65536):
            fh.write(all_rows[take[s: s + 65536]].contiguous().view(torch.int16).numpy().tobytes())
    tmp.replace(stream_path)
    del all_rows
    info = {"key": key, "d_model": d, "train_rows": train_rows, "heldout_rows": int(held.shape[0]),
            "steps": steps, "tokens": steps * args.batch, "store_tokens": m.n_tokens, "store_rows": m.n_rows,
            "ctx_len": m.ctx_len, "dtype": m.dtype, "model": m.model.get("id"), "hook": m.hook,
            "normaliser_train": ActivationStore.open(view).normaliser, "row_width": m.row_width,
            "hook_normalisers_train": ActivationStore.open(view).manifest.hook_normalisers,
            "paths": {"store": str(acts), "train_store": str(view), "stream": str(stream_path),
                      "heldout": str(held_path)}}
    meta_path.write_text(json.dumps(info, indent=2))
    return info


# ============================================================================= children


def _open(spec: dict[str, Any]) -> tuple[BatchFile, HeldOut]:
    from safetensors.torch import load_file

    p = spec["data"]["paths"]
    width = spec["data"].get("row_width", spec["data"]["d_model"])
    data = BatchFile(p["stream"], width, spec["batch"], spec["steps"])
    if spec.get("crosscoder"):  # rows [x_1, ..., x_L]: FVU over all hooks, and each hook's own
        return data, HeldOut(load_file(p["heldout"])["rows"], blocks=width // spec["data"]["d_model"])
    held = HeldOut(load_file(p["heldout"])["rows"])
    if width != spec["data"]["d_model"]:  # transcoder rows [input, target]: FVU of the target alone
        y = held.rows[:, spec["data"]["d_model"]:].double()
        held.denom = float((y - y.mean(0)).pow(2).sum())
    return data, held


def _marks(spec: dict[str, Any]) -> Marks:
    return Marks(steps=set(spec.get("eval_steps", [])), seconds=sorted(spec.get("eval_seconds", [])))


def _mono_recon(sae: Any, trainer: Any = None) -> Any:
    """Held-out evaluation of a monoscope SAE; with a `trainer`, on its evaluation weights (--optimizer signum-sf:
    the averaged ones, restored to the training ones afterwards, as sparsify's schedule-free eval mode)."""

    def factory() -> Any:
        was = sae.training
        averaged = trainer.averaged_weights() if trainer is not None else contextlib.nullcontext()
        averaged.__enter__()
        sae.eval()

        def recon(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = sae(sae.scale(x))
            x_hat = sae.unscale(out.x_hat)
            if sae.cfg.arch == "transcoder":  # rows [input, target]: the input given back, so only the target errs
                x_hat = torch.cat([x[:, : sae.cfg.d_in].float(), x_hat], 1)
            return x_hat, out.l0 * x.shape[0], out.fired

        def restore() -> None:
            averaged.__exit__(None, None, None)
            sae.train(was)

        return recon, restore

    return factory


def child_monoscope_trainer(spec: dict[str, Any], ctl: Any = None) -> dict[str, Any]:
    """monoscope's training loop (Trainer.run, as train() drives it) on the shared stream."""
    from monoscope.sae import build_sae
    from monoscope.store.batches import Batch
    from monoscope.train import TrainConfig, Trainer
    from monoscope.train.run import sae_config_for

    data, held = _open(spec)
    arch = spec.get("arch", "topk")
    cfg = TrainConfig(arch=arch, tokens=spec["steps"] * spec["batch"], width=spec["width"],
                      k=spec["k"] if arch != "gated" else None,
                      sparsity_coef=spec.get("l1") if arch == "gated" else None,
                      batch_size=spec["batch"], dtype=spec["dtype"], seed=spec["seed"], progress=False,
                      checkpoint_every=0, lr=spec.get("lr"),
                      **{"revive": spec.get("revive", "auto"), **spec.get("train_overrides", {})})

    class Source:  # a BatchSource over the shared stream
        def __init__(self) -> None:
            self.i = 0

        def __next__(self) -> Batch:
            if self.i >= data.steps:
                raise StopIteration
            b = data.read(self.i)
            self.i += 1
            return Batch(b, torch.arange((self.i - 1) * data.batch, self.i * data.batch))

        def state_dict(self) -> dict[str, Any]:
            return {"i": self.i}

        def load_state_dict(self, s: dict[str, Any]) -> None:
            self.i = int(s["i"])

    if arch in ("transcoder", "crosscoder"):  # the fields train() gives it on the paired store (training rows' scales)
        from monoscope.sae.multihook import multi_hook_fields

        d_model = spec["data"]["d_model"]
        shape = multi_hook_fields(arch, spec["data"]["hook"].split(","), spec["data"]["hook_normalisers_train"],
                                  d_model, "the paired store")
    else:
        d_model = data.d
        shape = {"d_in": d_model, "hook": HOOK, "normaliser": float(spec["data"]["normaliser_train"])}
    sae_cfg = sae_config_for(cfg, d_model, "default", **shape)  # the SAEConfig train() would build
    sae = build_sae(sae_cfg, seed=cfg.seed)
    source = Source()
    trainer = Trainer(sae, cfg, source)
    gate = Gate(spec["name"], held, sae_cfg.d_sae, data.batch, data.steps, _marks(spec), ctl)
    recon = _mono_recon(sae, trainer)
    gate.start()
    trainer.init_b_dec(data.read(0))  # as train() does, from the first batch (on the clock)
    trainer.run(on_step=lambda n: gate.after_step(trainer.step, recon))
    trainer.use_averaged_weights()  # signum-sf: the averaged weights, as train() saves them (no-op with Adam)
    # batchtopk-style: the inference threshold from the batches after the run, as train() sets it (no-op otherwise);
    # the shared stream ends with the run, so these are its first batches again, as a store's next pass would be
    # (off the clock: train() times the run without it)
    source.i = 0
    gate.clock.pause()
    trainer.calibrate_threshold()
    gate.clock.resume()
    train_s, final = gate.finish(trainer.step, recon)
    return {"train_s": train_s, "curve": gate.rec.curve, "final": final, "turn_log": gate.turn_log,
            "dead_train_frac": float((trainer.dead.since >= spec["dead_window"]).float().mean()),
            "dead_frac_own_window": trainer.dead.dead_fraction(), "own_dead_window": trainer.dead.window,
            "last_log": trainer.last_metrics,
            "settings": {"api": "monoscope.train.Trainer(...).run() on the shared stream",
                         "train_config": cfg.to_dict(), "compute_dtype": str(sae.compute_dtype()).split(".")[-1],
                         "lr": cfg.learning_rate(data.d)}}


def child_monoscope_train(spec: dict[str, Any], ctl: Any = None) -> dict[str, Any]:
    """`monoscope.train.train()` on the training store: what a user runs."""
    from safetensors.torch import load_file

    from monoscope.train import train

    out = Path(spec["out"])
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    res = train(out, store=spec["data"]["paths"]["train_store"], arch="topk", k=spec["k"], width=spec["width"],
                tokens=spec["steps"] * spec["batch"], batch_size=spec["batch"], dtype=spec["dtype"],
                seed=spec["seed"], progress=False, checkpoint_every=0, log_every=spec.get("log_every", 50))
    call_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "train_s": res.seconds, "call_s": call_s, "steps": res.steps, "tokens": res.tokens,
        "dead_train_frac": res.metrics.get("dead_frac"),
        "own_dead_window": res.config.dead_window_tokens(res.sae.cfg.d_sae),
        "last_log": res.metrics, "notes": res.notes,
        "settings": {"api": "monoscope.train.train(store=train_store, ...)", "train_config": res.config.to_dict(),
                     "compute_dtype": str(res.sae.compute_dtype()).split(".")[-1],
                     "lr": res.config.learning_rate(res.sae.cfg.d_in), "timed": "the training loop of train() "
                     "(TrainResult.seconds): store reads, shuffle, steps, end-of-run checkpoint"},
    }
    log_path = out / "train_log.jsonl"
    if log_path.is_file():
        recs = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
        tps = [r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
        result["log_tokens_per_s"] = tps
        if len(tps) > 1:
            result["steady_tokens_per_s"] = sorted(tps[1:])[len(tps[1:]) // 2]  # median, first interval dropped
    if spec.get("evaluate", True):
        held = HeldOut(load_file(spec["data"]["paths"]["heldout"])["rows"])
        rec = Recorder(spec["name"], held, res.sae.cfg.d_sae, spec["batch"], Marks(), Clock())
        result["final"] = rec.record(res.steps, res.seconds, "final", _mono_recon(res.sae))
        result["curve"] = rec.curve
    if spec.get("delete_out"):
        shutil.rmtree(out, ignore_errors=True)
    return result


def child_sparsify(spec: dict[str, Any], ctl: Any = None) -> dict[str, Any]:
    data, held = _open(spec)
    return train_sparsify(data, held, spec["width"], spec["k"], spec["seed"], _marks(spec), spec["dead_window"],
                          ctl=ctl, transcode=bool(spec.get("transcode")))


def child_saelens(spec: dict[str, Any], ctl: Any = None) -> dict[str, Any]:
    data, held = _open(spec)
    return train_saelens(spec["saelens_kind"], data, held, spec["width"], spec["k"], spec["seed"], _marks(spec),
                         spec["dead_window"], l1=spec.get("l1"), ctl=ctl)


def child_lmsaes(spec: dict[str, Any], ctl: Any = None) -> dict[str, Any]:
    """llamascopium's crosscoder; this child runs under the python of --lmsaes-python (its own venv)."""
    from peers import train_lmsaes_crosscoder

    data, held = _open(spec)
    work = Path(spec["work"]) / f"out-{spec['name']}"
    return train_lmsaes_crosscoder(data, held, spec["data"]["hook"].split(","), spec["width"], spec["k"],
                                   spec["seed"], _marks(spec), spec["dead_window"], amp_dtype=spec["amp_dtype"],
                                   grid_init=bool(spec.get("grid_init")), lr=spec.get("lr"), work=str(work),
                                   name=spec["name"], ctl=ctl)


CHILDREN = {"monoscope_trainer": child_monoscope_trainer, "monoscope_train": child_monoscope_train,
            "sparsify": child_sparsify, "saelens": child_saelens, "lmsaes": child_lmsaes}


CHILD_ENV = {"TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _paths(spec: dict[str, Any], work: Path) -> tuple[Path, Path]:
    return work / f"spec-{spec['name']}.json", work / f"result-{spec['name']}.json"


def _result(spec: dict[str, Any], work: Path, returncode: int | None) -> dict[str, Any]:
    out_path = _paths(spec, work)[1]
    if returncode != 0 or not out_path.is_file():
        log(f"!!! {spec['name']} failed (exit {returncode})")
        return {"error": f"exit {returncode}"}
    return dict(json.loads(out_path.read_text()))


def child_command(spec: dict[str, Any], spec_path: Path, out_path: Path) -> list[str]:
    """The child's command line: this script under the spec's own python (a peer installed in a venv of its own,
    e.g. llamascopium) or under this one."""
    return [spec.get("python") or sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path),
            "--child-out", str(out_path)]


def run_child(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one trainer alone in a fresh process; its result, its own peak RSS, the load around it."""
    spec_path, out_path = _paths(spec, work)
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    load_before = load_now()
    log(f"--- {spec['name']} alone (load {load_before}) ---")
    t0 = time.perf_counter()
    proc = subprocess.run(child_command(spec, spec_path, out_path), env=dict(os.environ, **CHILD_ENV), cwd=ROOT)
    res = _result(spec, work, proc.returncode)
    res.update(load_before=load_before, load_after=load_now(), process_wall_s=time.perf_counter() - t0)
    return res


def run_group(specs: list[dict[str, Any]], work: Path, turn_s: float,
              mono: str | None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Run trainers interleaved: each in its own process, taking turns of `turn_s` seconds of its own
    training clock (one runs while the others wait), so all of them meet the same background load.
    When `mono` finishes, the others are told to evaluate at 1x, 2x and 3x its training time."""
    procs: dict[str, tuple[subprocess.Popen[bytes], Any, Any]] = {}
    for spec in specs:
        to_child, from_parent = os.pipe()  # (read end, write end) pairs
        from_child, to_parent = os.pipe()
        spec_path, out_path = _paths(spec, work)
        spec_path.write_text(json.dumps({**spec, "ctl": [to_child, to_parent]}))
        out_path.unlink(missing_ok=True)
        proc = subprocess.Popen(child_command(spec, spec_path, out_path), env=dict(os.environ, **CHILD_ENV),
                                cwd=ROOT, pass_fds=(to_child, to_parent))
        os.close(to_child)
        os.close(to_parent)
        procs[spec["name"]] = (proc, os.fdopen(from_parent, "w"), os.fdopen(from_child, "r"))
    names = [s["name"] for s in specs]
    log(f"--- interleaved: {', '.join(names)} (turns of {turn_s:g}s of training time; load {load_now()}) ---")
    active, end, marks, t_mono = list(names), 0.0, None, None
    for name in list(active):  # every trainer set up (imports, data, model) before the first turn
        if not procs[name][2].readline():
            active.remove(name)
    log(f"--- all set up (load {load_now()}) ---")
    marked: set[str] = set()
    loads: list[float] = []
    t0 = time.perf_counter()
    while active:
        end += turn_s
        loads.append(os.getloadavg()[0])
        for name in list(active):
            proc, w, r = procs[name]
            cmd: dict[str, Any] = {"until": end if len(active) > 1 else 1e18}
            if marks is not None and name not in marked:
                cmd["marks"] = marks
                marked.add(name)
            try:
                w.write(json.dumps(cmd) + "\n")
                w.flush()
                line = r.readline()
            except BrokenPipeError:
                line = ""
            if not line:
                active.remove(name)
                continue
            msg = json.loads(line)
            if msg.get("done"):
                active.remove(name)
                log(f"--- {name} done: {msg.get('train_s', 0):.1f}s of training ---")
                if name == mono:
                    t_mono = float(msg["train_s"])
                    marks = [t_mono, 2 * t_mono, 3 * t_mono]
    results = {}
    for spec in specs:
        proc, w, r = procs[spec["name"]]
        w.close()
        r.close()
        results[spec["name"]] = _result(spec, work, proc.wait())
    info = {"turn_s": turn_s, "t_mono": t_mono, "wall_s": time.perf_counter() - t0,
            "load1_per_round": {"n": len(loads), "mean": sum(loads) / max(len(loads), 1),
                                "min": min(loads, default=0.0), "max": max(loads, default=0.0)}}
    return results, info


def vm_hwm_gb() -> float:
    """Peak resident memory of this process image (VmHWM; ru_maxrss would include the parent's peak,
    which Linux carries across fork and exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    ctl = None
    if spec.get("ctl"):
        ctl = (os.fdopen(spec["ctl"][0], "r"), os.fdopen(spec["ctl"][1], "w"))
    rss0 = vm_hwm_gb()
    res = CHILDREN[spec["kind"]](spec, ctl)
    res["peak_rss_gb"] = vm_hwm_gb()
    res["rss_after_imports_gb"] = rss0
    res["torch_threads"] = torch.get_num_threads()
    Path(out_path).write_text(json.dumps(res, default=str))
    if ctl is not None:
        ctl[1].write(json.dumps({"done": True, "train_s": res.get("train_s")}) + "\n")
        ctl[1].flush()


# ============================================================================= the run


PROTOCOLS = {
    "interleaved": "separate processes taking turns of {turn_s:g}s of training time (one runs, the others wait), so "
                   "all meet the same background load",
    "sequential": "each trainer alone in its own process, one after the other (a quiet machine)",
}


def run_trainers(group: list[dict[str, Any]], work: Path, args: argparse.Namespace,
                 mono: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The group's runs under --protocol: interleaved turns (`run_group`) or one process after the other."""
    if args.protocol == "interleaved":
        return run_group(group, work, args.turn_s, mono=mono)
    rounds = [{spec["name"]: run_child(spec, work) for spec in group} for _ in range(max(1, args.repeats))]
    runs = rounds[0]
    if len(rounds) > 1:  # A B A B: each trainer's training time is the mean over the rounds (the harmonic mean
        # of its tokens/s); its FVU, L0 and curve are the first round's (the same seed and rows every round)
        for name, r in runs.items():
            times = [rd[name]["train_s"] for rd in rounds if "train_s" in rd[name]]
            if "train_s" in r and len(times) == len(rounds):
                r["train_s_rounds"] = times
                r["fvu_rounds"] = [(rd[name].get("final") or {}).get("fvu") for rd in rounds]
                r["train_s"] = sum(times) / len(times)
    befores = [float((r.get("load_before") or [0.0])[0]) for rd in rounds for r in rd.values()]  # 1-min load
    return runs, {"protocol": "sequential", "rounds": len(rounds), "t_mono": runs[mono].get("train_s"),
                  "order": [spec["name"] for spec in group],
                  "load1_per_round": {"n": len(befores), "mean": sum(befores) / max(len(befores), 1),
                                      "min": min(befores, default=0.0), "max": max(befores, default=0.0)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/bench/acts", help="activation store (captured here if missing)")
    ap.add_argument("--capture-tokens", default="1.2M")
    ap.add_argument("--work", default="runs/bench/tvp", help="scratch folder (stream, held-out, SAE outputs)")
    ap.add_argument("--tokens", default="1M", help="training tokens per trainer (one pass; whole batches)")
    ap.add_argument("--heldout-rows", type=int, default=45_000, help="hold out the last shards holding >= this")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--width-mult", type=int, default=16, help="features = this x d_model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--saelens-l1", type=float, default=None,
                    help="SAELens ReLU-L1 coefficient (default: the tuned value, or the sweep's best with --tune-l1)")
    ap.add_argument("--tune-l1", default=None, help="comma-separated L1 coefficients for a sweep (full-length runs)")
    ap.add_argument("--tune-only", action="store_true",
                    help="run only the --tune-l1 sweep and record it (a later full run keeps the record)")
    ap.add_argument("--mono-lr", default="",
                    help="extra monoscope bf16 runs in the group with these learning rates (comma-separated)")
    ap.add_argument("--aux-rows", default="",
                    help="extra monoscope bf16 runs in the group with AuxK on at most these many rows of a batch "
                         "(comma-separated; 0: every row); with --transcoder, extra transcoder runs")
    ap.add_argument("--aux-rows-arch", default="topk",
                    help="the architectures of the --aux-rows runs (comma-separated: topk, batchtopk, matryoshka); "
                         "each gets one run per --aux-rows value")
    ap.add_argument("--skip-fp32", action="store_true", help="skip monoscope's float32 run")
    ap.add_argument("--skip-mono-train", action="store_true", help="skip the train()-from-store run")
    ap.add_argument("--skip-sparsify", action="store_true")
    ap.add_argument("--skip-saelens", action="store_true", help="skip both SAELens runs")
    ap.add_argument("--skip-saelens-relu", action="store_true")
    ap.add_argument("--skip-scale", action="store_true", help="skip the 262,144-feature memory check")
    ap.add_argument("--scale-features", type=int, default=262_144)
    ap.add_argument("--scale-steps", type=int, default=8)
    ap.add_argument("--archs", default="",
                    help="also train these architectures (matryoshka, gated; comma-separated) with monoscope's "
                         "Trainer (bf16/auto) and SAELens's trainer of the same architecture, in the same group")
    ap.add_argument("--gated-l1", type=float, default=5.0,
                    help="gated: the L1 coefficient, the same for monoscope and SAELens (both E||x||^2 = d_in)")
    ap.add_argument("--transcoder", action="store_true",
                    help=f"instead: a TopK transcoder ({TRANSCODER_HOOKS}) with monoscope's Trainer against "
                         "sparsify's transcoder, on a paired store (defaults: --store runs/bench/acts-tc, --work "
                         "runs/bench/tvp-tc, --name train_vs_peers_transcoder)")
    ap.add_argument("--transcoder-no-auxk", action="store_true",
                    help="with --transcoder: also a monoscope row trained with --revive none (AuxK off, sparsify's "
                         "default)")
    ap.add_argument("--transcoder-signum", action="store_true",
                    help="with --transcoder: also a monoscope row trained with --optimizer signum-sf (sparsify's "
                         "optimiser; AuxK off, as its default)")
    ap.add_argument("--transcoder-sae-init", action="store_true",
                    help="with --transcoder: also a monoscope row trained with --transcoder-init sae (the TopK SAE "
                         "start: random unit-norm decoder rows kept at unit norm; the default before it was measured "
                         "against sparsify's start)")
    ap.add_argument("--crosscoder", action="store_true",
                    help=f"instead: an acausal TopK crosscoder ({CROSSCODER_HOOKS}) with monoscope's Trainer against "
                         "llamascopium's Crosscoder (needs --lmsaes-python), on a store of those hooks side by side "
                         "(defaults: --store runs/bench/acts-cc, --work runs/bench/tvp-cc, --name "
                         "train_vs_peers_crosscoder)")
    ap.add_argument("--lmsaes-python", default=os.environ.get("MONOSCOPE_LMSAES_PYTHON"),
                    help="with --crosscoder: the python of a venv holding llamascopium (OpenMOSS lm_saes), which runs "
                         "the peer's child process (default: $MONOSCOPE_LMSAES_PYTHON)")
    ap.add_argument("--lmsaes-grid-init", action="store_true",
                    help="with --crosscoder: also a llamascopium row with its decoder-norm grid search at "
                         "initialisation (grid_search_init_norm=True; off in its defaults)")
    ap.add_argument("--lmsaes-lr", default="",
                    help="with --crosscoder: also llamascopium rows (grid-search init) with these Adam learning rates "
                         "(comma-separated; its default is 4e-4)")
    ap.add_argument("--turn-s", type=float, default=5.0,
                    help="interleaving: seconds of training each trainer runs per turn")
    ap.add_argument("--protocol", choices=["interleaved", "sequential"], default="interleaved",
                    help="interleaved: trainers take turns (fair under background load); sequential: each "
                         "trainer alone in its own process, one after the other (a quiet machine)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="sequential protocol: run the whole group this many times, in the same order (A B A B); "
                         "tokens/s from the mean training time, every round's time recorded")
    ap.add_argument("--name", default=NAME, help="result file name under benchmarks/results/")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.child_out)
        return
    os.chdir(ROOT)
    args.hook = HOOK
    _aux_rows_archs(args.aux_rows_arch)  # a bad value fails here, not after the data is prepared
    if args.crosscoder:
        if args.transcoder:
            raise SystemExit("--crosscoder and --transcoder are separate runs: pass one of them")
        if not args.lmsaes_python or not Path(args.lmsaes_python).is_file():
            raise SystemExit(f"--crosscoder needs --lmsaes-python: the python of a venv holding llamascopium (got "
                             f"{args.lmsaes_python!r}); make one with `python3 -m venv /tmp/venv-lmsaes` and pip "
                             "install torch==2.13.0, llamascopium and 'transformer-lens<4' into it")
        args.hook = CROSSCODER_HOOKS
        for name, default, cc in (("store", "runs/bench/acts", "runs/bench/acts-cc"),
                                  ("work", "runs/bench/tvp", "runs/bench/tvp-cc"),
                                  ("name", NAME, f"{NAME}_crosscoder")):
            if getattr(args, name) == default:
                setattr(args, name, cc)
    if args.transcoder:
        args.hook = TRANSCODER_HOOKS
        for name, default, tc in (("store", "runs/bench/acts", "runs/bench/acts-tc"),
                                  ("work", "runs/bench/tvp", "runs/bench/tvp-tc"),
                                  ("name", NAME, f"{NAME}_transcoder")):
            if getattr(args, name) == default:
                setattr(args, name, tc)
    args.tokens = parse_count(args.tokens)
    t_start = time.perf_counter()
    load_start = load_now()
    info = prepare(args)
    work = Path(args.work)
    d = info["d_model"]
    n_feat = args.width_mult * d
    steps, batch = info["steps"], args.batch
    dead_window = max(batch, steps * batch // 5)  # "dead": not active during the last 20% of training
    base = {"data": info, "steps": steps, "batch": batch, "k": args.k, "width": n_feat, "seed": args.seed,
            "dead_window": dead_window}
    quarter = sorted({max(1, steps // 4), max(1, steps // 2), max(1, 3 * steps // 4)})

    peaks = {"bf16": matmul_tflops(batch, d, n_feat, torch.bfloat16),
             "fp32": matmul_tflops(batch, d, n_feat, torch.float32)}
    log(f"matmul peak {batch}x{d} @ {d}x{n_feat}: bf16 {peaks['bf16']:.2f} TFLOP/s, fp32 {peaks['fp32']:.2f} TFLOP/s")

    runs: dict[str, dict[str, Any]] = {}
    if args.transcoder:
        transcoder_main(args, base, info, peaks, quarter, load_start, t_start)
        return
    if args.crosscoder:
        crosscoder_main(args, base, info, peaks, quarter, load_start, t_start)
        return
    if args.tune_only:
        if not args.tune_l1:
            raise SystemExit("--tune-only needs --tune-l1 (e.g. --tune-l1 5,20,60)")
        tuning = tune_l1(args, base, work)
        path = write_result(args.name, {"command": "python benchmarks/train_vs_peers.py " + " ".join(sys.argv[1:]),
                                        "note": "L1 sweep only; the full benchmark keeps this record",
                                        "saelens_relu_l1": {"used": None, "tuning": tuning},
                                        "load": {"start": load_start, "end": load_now()}})
        print(json.dumps(tuning, indent=2))
        print(f"wrote {path}")
        return
    tuning = previous_tuning(args.name)
    if args.tune_l1 and not args.skip_saelens:
        tuning = tune_l1(args, base, work)
    l1 = args.saelens_l1 if args.saelens_l1 is not None else pick_l1((tuning or {}).get("trials") or [], args.k)

    group = [{**base, "name": "monoscope_bf16", "kind": "monoscope_trainer", "dtype": "auto", "eval_steps": quarter}]
    if not args.skip_mono_train:  # the user's path: alone, or in the sequential rounds (A B A B)
        spec = {**base, "name": "monoscope_train_bf16", "kind": "monoscope_train", "dtype": "auto",
                "out": str(work / "sae-train-auto")}
        if args.protocol == "sequential":
            group.insert(0, spec)
        else:
            runs["monoscope_train_bf16"] = run_child(spec, work)
    if not args.skip_fp32:
        group.append({**base, "name": "monoscope_fp32", "kind": "monoscope_trainer", "dtype": "float32",
                      "eval_steps": quarter})
    for lr in [float(v) for v in args.mono_lr.split(",") if v.strip()]:
        group.append({**base, "name": f"monoscope_bf16_lr{lr:g}", "kind": "monoscope_trainer", "dtype": "auto",
                      "lr": lr, "eval_steps": quarter})
    for arch in _aux_rows_archs(args.aux_rows_arch):
        for rows in _aux_rows_values(args.aux_rows):
            group.append({**base, "name": f"monoscope_{'bf16' if arch == 'topk' else arch}_auxrows{rows}",
                          "kind": "monoscope_trainer", "dtype": "auto", "arch": arch,
                          "train_overrides": {"aux_rows": rows}, "eval_steps": quarter})
    if not args.skip_sparsify:
        group.append({**base, "name": "sparsify", "kind": "sparsify", "eval_steps": quarter})
    if not args.skip_saelens:
        group.append({**base, "name": "saelens_topk", "kind": "saelens", "saelens_kind": "topk",
                      "eval_steps": quarter})
        if not args.skip_saelens_relu:
            group.append({**base, "name": "saelens_relu_l1", "kind": "saelens", "saelens_kind": "relu", "l1": l1,
                          "eval_steps": quarter})
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    for a in archs:
        if a not in ARCH_ROWS:
            raise SystemExit(f"--archs {a!r}: use {', '.join(ARCH_ROWS)}")
        group.append({**base, "name": f"monoscope_{a}", "kind": "monoscope_trainer", "dtype": "auto", "arch": a,
                      "l1": args.gated_l1, "eval_steps": quarter})
        group.append({**base, "name": f"saelens_{a}", "kind": "saelens", "saelens_kind": a, "l1": args.gated_l1,
                      "eval_steps": quarter})
    group_runs, group_info = run_trainers(group, work, args, mono="monoscope_bf16")
    runs.update(group_runs)
    t_mono = group_info["t_mono"] or runs["monoscope_bf16"].get("train_s") or 0.0

    scale = None
    if not args.skip_scale:
        scale_steps = args.scale_steps
        r = run_child({**base, "name": "scale", "kind": "monoscope_train", "dtype": "auto",
                       "width": args.scale_features, "steps": scale_steps, "evaluate": False,
                       "log_every": 1, "out": str(work / "sae-scale"), "delete_out": True}, work)
        scale = {"features": args.scale_features, "d_model": d, "steps": scale_steps, "tokens": scale_steps * batch,
                 **{k_: r.get(k_) for k_ in ("train_s", "call_s", "peak_rss_gb", "rss_after_imports_gb",
                                             "steady_tokens_per_s", "log_tokens_per_s", "last_log", "error",
                                             "load_before", "load_after", "settings")}}
        if r.get("train_s"):
            scale["tokens_per_s"] = scale_steps * batch / r["train_s"]
        scale["machine_memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)

    peaks_end = {"bf16": matmul_tflops(batch, d, n_feat, torch.bfloat16),
                 "fp32": matmul_tflops(batch, d, n_feat, torch.float32)}
    summary = summarise(runs, peaks, peaks_end, d, n_feat, steps * batch, t_mono)
    table = markdown_table(summary, t_mono, scale)
    payload = {
        "command": "python benchmarks/train_vs_peers.py " + " ".join(sys.argv[1:]),
        "config": {"model": info["model"], "hook": HOOK, "d_model": d, "features": n_feat, "k": args.k,
                   "batch": batch, "training_tokens": steps * batch, "steps": steps, "seed": args.seed,
                   "heldout_rows": info["heldout_rows"], "train_rows_available": info["train_rows"],
                   "dead_window_tokens": dead_window, "store_tokens": info["store_tokens"]},
        "protocol": {
            "same_tokens": "every trainer sees the same number of training rows once (shared shuffled stream; "
                           "train() reads the same training shards in its own shuffled order)",
            "interleaved": f"monoscope Trainer (bf16, fp32), sparsify and SAELens ran as separate processes taking "
                           f"turns of {args.turn_s:g}s of training time each (one runs, the others wait), so they "
                           "share the background load; monoscope train() and the scale check ran alone",
            "same_wall_time": f"each peer evaluated at the first step boundary after its training clock passed "
                              f"{t_mono:.1f}s, the time monoscope's Trainer (bf16) needed for the whole pass",
            "tokens_per_s": "training tokens / training-loop seconds; held-out evaluations excluded, batch reads "
                            "included (train(): store reads + shuffle + end-of-run checkpoint included)",
            "fvu": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the raw held-out rows, x_hat in raw scale",
            "dead_heldout": "features never non-zero on the held-out rows",
            "dead_train": f"features not active during the last {dead_window:,} training tokens (20% of the run)",
            "flops_per_token": f"4*d*F = {4 * d * n_feat:,} (encoder forward + encoder weight gradient; decoder "
                               "on k columns neglected; SAELens actually does ~8*d*F dense)",
        },
        "matmul_peak_tflops": {"shape": f"{batch}x{d} @ {d}x{n_feat}", "start": peaks, "end": peaks_end},
        "limit_tokens_per_s_at_bf16_peak": peaks["bf16"] * 1e12 / (4 * d * n_feat),
        "load": {"start": load_start, "end": load_now(), "interleaved_group": group_info["load1_per_round"]},
        "interleaving": group_info,
        "summary": summary,
        "runs": runs,
        "saelens_relu_l1": {"used": l1, "tuning": tuning},
        "scale_check": scale,
        "table_markdown": table,
        "total_wall_s": time.perf_counter() - t_start,
        "target": "monoscope >= 3x the tokens/s of the fastest peer, with equal or lower held-out FVU after "
                  "the same tokens",
    }
    path = write_result(args.name, payload)
    print(table)
    print(json.dumps(summary.get("verdict", {}), indent=2))
    print(f"wrote {path}")


def transcoder_main(args: argparse.Namespace, base: dict[str, Any], info: dict[str, Any], peaks: dict[str, float],
                    quarter: list[int], load_start: list[float], t_start: float) -> None:
    """--transcoder: monoscope's TopK transcoder (Trainer, compute dtype auto) and sparsify's transcoder on the same
    shuffled stream of paired rows, interleaved; held-out FVU of the target (mlp_out) alone."""
    work = Path(args.work)
    d = info["d_model"]
    group = [{**base, "name": "monoscope_transcoder", "kind": "monoscope_trainer", "dtype": "auto",
              "arch": "transcoder", "eval_steps": quarter},
             {**base, "name": "sparsify_transcoder", "kind": "sparsify", "transcode": True, "eval_steps": quarter}]
    if args.transcoder_no_auxk:  # the AuxK policy as a choice: `--revive none` (sparsify's default, auxk off)
        group.insert(1, {**base, "name": "monoscope_transcoder_revive_none", "kind": "monoscope_trainer",
                         "dtype": "auto", "arch": "transcoder", "revive": "none", "eval_steps": quarter})
    if args.transcoder_signum:
        group.insert(-1, {**base, "name": "monoscope_transcoder_signum_sf", "kind": "monoscope_trainer",
                          "dtype": "auto", "arch": "transcoder", "train_overrides": {"optimizer": "signum-sf"},
                          "eval_steps": quarter})
    if args.transcoder_sae_init:  # the TopK SAE start (the default before --transcoder-init sparsify won)
        group.insert(-1, {**base, "name": "monoscope_transcoder_sae_init", "kind": "monoscope_trainer",
                          "dtype": "auto", "arch": "transcoder", "train_overrides": {"transcoder_init": "sae"},
                          "eval_steps": quarter})
    for rows in _aux_rows_values(args.aux_rows):  # the transcoder's AuxK row cap
        group.insert(-1, {**base, "name": f"monoscope_transcoder_auxrows{rows}", "kind": "monoscope_trainer",
                          "dtype": "auto", "arch": "transcoder", "train_overrides": {"aux_rows": rows},
                          "eval_steps": quarter})
    runs, group_info = run_trainers(group, work, args, mono="monoscope_transcoder")
    t_mono = group_info["t_mono"] or runs["monoscope_transcoder"].get("train_s") or 0.0
    peaks_end = _peaks_now(args.batch, d, base["width"])
    summary = summarise(runs, peaks, peaks_end, d, base["width"], info["tokens"], t_mono)
    p = summary["rows"].get("sparsify_transcoder", {})
    for name in [n for n in summary["rows"] if n.startswith("monoscope_transcoder_")]:  # the other monoscope rows
        m = summary["rows"].get(name, {})
        if "tokens_per_s" in m and "tokens_per_s" in p:
            sp = m["tokens_per_s"] / p["tokens_per_s"]
            m["speedup_vs_fastest_peer"] = sp
            summary["verdict"][name] = {**_verdict(m, p, "sparsify_transcoder"), "meets_3x": sp >= 3.0}
    protocol = {
        "same_tokens": "both trainers read the same shuffled stream of paired rows [mlp_in, mlp_out] once",
        args.protocol: PROTOCOLS[args.protocol].format(turn_s=args.turn_s),
        "fvu": "sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over the raw held-out mlp_out rows, y_hat from the "
               "mlp_in rows",
        "monoscope": "TopK transcoder, --transcoder-init sparsify (its default: nn.Linear-style encoder, centred "
                     "b_enc, zero-init W_dec, decoder rows free), AuxK (sparse: the k_aux chosen dead latents per "
                     "row carry gradient), Adam, its default lr; scales c_in, c_out from the training rows; "
                     "monoscope_transcoder_revive_none (--transcoder-no-auxk): the same with --revive none; "
                     "monoscope_transcoder_signum_sf (--transcoder-signum): with --optimizer signum-sf; "
                     "monoscope_transcoder_sae_init (--transcoder-sae-init): --transcoder-init sae (random "
                     "unit-norm decoder rows, encoder = their transpose, rows kept at unit norm)",
        "sparsify": "its transcoder recipe (transcode=True): zero-init W_dec, no decoder normalisation, signum "
                    "+ schedule-free, auxk off (its defaults)",
    }
    _write_group(args, base, info, peaks, peaks_end, load_start, t_start, runs, group_info, summary, t_mono,
                 protocol)


def crosscoder_specs(args: argparse.Namespace, base: dict[str, Any], quarter: list[int]) -> list[dict[str, Any]]:
    """--crosscoder's children: monoscope's crosscoder (Trainer, compute dtype auto) and llamascopium's, the peer under
    --lmsaes-python with autocast in the dtype monoscope's auto picks here (bf16 only where bf16 is fast)."""
    from monoscope.devices import bf16_is_fast

    amp = "bfloat16" if bf16_is_fast("cpu") else "float32"
    base = {**base, "crosscoder": True, "eval_steps": quarter}
    peer = {**base, "kind": "lmsaes", "python": args.lmsaes_python, "amp_dtype": amp, "work": str(args.work)}
    group = [{**base, "name": "monoscope_crosscoder", "kind": "monoscope_trainer", "dtype": "auto",
              "arch": "crosscoder"},
             {**peer, "name": "lmsaes_crosscoder"}]
    if args.lmsaes_grid_init:
        group.append({**peer, "name": "lmsaes_crosscoder_grid_init", "grid_init": True})
    for lr in [float(v) for v in args.lmsaes_lr.split(",") if v.strip()]:
        group.append({**peer, "name": f"lmsaes_crosscoder_grid_init_lr{lr:g}", "grid_init": True, "lr": lr})
    return group


def crosscoder_main(args: argparse.Namespace, base: dict[str, Any], info: dict[str, Any], peaks: dict[str, float],
                    quarter: list[int], load_start: list[float], t_start: float) -> None:
    """--crosscoder: monoscope's acausal TopK crosscoder and llamascopium's on the same shuffled stream of rows
    [x_1, ..., x_L]; held-out FVU over all hooks (raw scale) and per hook."""
    work = Path(args.work)
    d = info["d_model"]
    group = crosscoder_specs(args, base, quarter)
    runs, group_info = run_trainers(group, work, args, mono="monoscope_crosscoder")
    t_mono = group_info["t_mono"] or runs["monoscope_crosscoder"].get("train_s") or 0.0
    peaks_end = _peaks_now(args.batch, d, base["width"])
    summary = summarise(runs, peaks, peaks_end, d, base["width"], info["tokens"], t_mono)
    m, g = summary["rows"].get("monoscope_crosscoder", {}), summary["rows"].get("lmsaes_crosscoder_grid_init", {})
    if "tokens_per_s" in m and "tokens_per_s" in g:
        summary["verdict"]["monoscope_crosscoder_vs_grid_init"] = _verdict(m, g, "lmsaes_crosscoder_grid_init")
    protocol = {
        "same_tokens": "every trainer reads the same shuffled stream of rows [x_1, ..., x_L] once",
        args.protocol: PROTOCOLS[args.protocol].format(turn_s=args.turn_s),
        "fvu": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the raw held-out rows of all hooks side by side "
               "(fvu_per_hook: the same per hook)",
        "l0": "latents active per token (monoscope: exactly k, shared by every hook; llamascopium: TopK per head, "
              "so a token's latents are the union of the heads' k each; its (latent, head) count per hook is in "
              "runs.lmsaes_crosscoder.final.l0_latent_layer_pairs_per_hook)",
        "monoscope": "acausal TopK crosscoder: one TopK over the summed per-layer encodings, decoder rows unit "
                     "norm over all layers together, AuxK, Adam, its default lr; per-layer scales c_l from the "
                     "training rows",
        "llamascopium": "its Crosscoder (act_fn=topk, TopK per head on the shared pre-activation times that "
                        "head's decoder norm; decoder unconstrained), its Initializer and Trainer defaults "
                        "(Adam lr 4e-4, W_enc = W_dec^T, dataset-wise norms, no AuxK) except the deviations "
                        "listed in runs.lmsaes_crosscoder.settings.deviations",
    }
    _write_group(args, base, info, peaks, peaks_end, load_start, t_start, runs, group_info, summary, t_mono,
                 protocol)


def _verdict(m: dict[str, Any], p: dict[str, Any], peer: str) -> dict[str, Any]:
    """A monoscope row against a peer's row of the same group: speed ratio, FVU and L0 side by side."""
    return {"peer": peer, "speedup_vs_peer": m["tokens_per_s"] / p["tokens_per_s"], "fvu": m["fvu_same_tokens"],
            "peer_fvu": p["fvu_same_tokens"], "fvu_le_peer": m["fvu_same_tokens"] <= p["fvu_same_tokens"],
            "l0": m["l0"], "peer_l0": p["l0"]}


def _peaks_now(batch: int, d: int, width: int) -> dict[str, float]:
    """The encoder matmul's measured TFLOP/s in both dtypes, now (the machine's peak drifts over a run)."""
    return {"bf16": matmul_tflops(batch, d, width, torch.bfloat16),
            "fp32": matmul_tflops(batch, d, width, torch.float32)}


def _write_group(args: argparse.Namespace, base: dict[str, Any], info: dict[str, Any], peaks: dict[str, float],
                 peaks_end: dict[str, float], load_start: list[float], t_start: float, runs: dict[str, Any],
                 group_info: dict[str, Any], summary: dict[str, Any], t_mono: float, protocol: dict[str, str]) -> None:
    """The result JSON of a --transcoder or --crosscoder group (its own protocol text), its table printed."""
    d = info["d_model"]
    table = markdown_table(summary, t_mono, None)
    payload = {
        "command": "python benchmarks/train_vs_peers.py " + " ".join(sys.argv[1:]),
        "config": {"model": info["model"], "hooks": args.hook, "d_model": d, "features": base["width"], "k": args.k,
                   "batch": args.batch, "training_tokens": info["tokens"], "steps": info["steps"], "seed": args.seed,
                   "heldout_rows": info["heldout_rows"], "train_rows_available": info["train_rows"],
                   "store_tokens": info["store_tokens"]},
        "protocol": protocol,
        "matmul_peak_tflops": {"shape": f"{args.batch}x{d} @ {d}x{base['width']}", "start": peaks, "end": peaks_end},
        "load": {"start": load_start, "end": load_now(), "group": group_info["load1_per_round"]},
        "interleaving": group_info,
        "summary": summary,
        "runs": runs,
        "table_markdown": table,
        "total_wall_s": time.perf_counter() - t_start,
        "target": "monoscope >= 3x the tokens/s of the peer, with equal or lower held-out FVU after the same tokens",
    }
    path = write_result(args.name, payload)
    print(table)
    print(json.dumps(summary.get("verdict", {}), indent=2))
    print(f"wrote {path}")


def tune_l1(args: argparse.Namespace, base: dict[str, Any], work: Path) -> dict[str, Any]:
    """Full-length SAELens ReLU-L1 runs, one per coefficient: L0 and FVU of each."""
    tokens = base["steps"] * base["batch"]
    l1s = [float(v) for v in args.tune_l1.split(",")]
    specs = [{**base, "name": f"saelens_relu_l1_{v:g}", "kind": "saelens", "saelens_kind": "relu", "l1": v}
             for v in l1s]
    results, info = run_group(specs, work, args.turn_s, mono=None)
    trials = []
    for v, spec in zip(l1s, specs, strict=True):
        r = results[spec["name"]]
        if "final" in r:
            trials.append({"l1": v, "l0": r["final"]["l0"], "fvu": r["final"]["fvu"],
                           "dead_heldout_frac": r["final"]["dead_heldout_frac"], "tokens_per_s": tokens / r["train_s"]})
    return {"target_l0": args.k, "tokens_per_trial": tokens, "trials": trials, "interleaving": info,
            "command": "python benchmarks/train_vs_peers.py " + " ".join(sys.argv[1:])}


def pick_l1(trials: list[dict[str, Any]], k: int) -> float:
    """The smallest swept coefficient whose L0 is within 25% of the L0 closest to k (with Adam's steps
    bounded by the learning rate, large coefficients all end at about the same L0)."""
    if not trials:
        return DEFAULT_SAELENS_L1
    gap = [abs(math.log(max(t["l0"], 1e-3) / k)) for t in trials]
    best = trials[gap.index(min(gap))]["l0"]
    ok = [t["l1"] for t in trials if abs(math.log(max(t["l0"], 1e-3) / best)) <= math.log(1.25)]
    return min(ok)


DEFAULT_SAELENS_L1 = 5.0
"""SAELens ReLU-L1 coefficient used when no sweep is given or recorded (its tutorial's value)."""


def previous_tuning(name: str) -> dict[str, Any] | None:
    """The L1 sweep recorded by an earlier run (sweeps are slow: a run without --tune-l1 keeps it)."""
    path = RESULTS / f"{name}.json"
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    tuning = (prev.get("saelens_relu_l1") or {}).get("tuning")
    if tuning is not None:
        tuning.setdefault("command", prev.get("command"))
    return tuning


LABELS = {
    "monoscope_train_bf16": "monoscope `train()` bf16 (from store)",
    "monoscope_bf16": "monoscope Trainer bf16",
    "monoscope_fp32": "monoscope Trainer fp32",
    "sparsify": "sparsify (signum, fp32)",
    "saelens_topk": "SAELens TopK (fp32)",
    "saelens_relu_l1": "SAELens ReLU-L1 (fp32)",
    "monoscope_matryoshka": "monoscope Trainer Matryoshka bf16",
    "saelens_matryoshka": "SAELens Matryoshka BatchTopK (fp32)",
    "monoscope_gated": "monoscope Trainer gated bf16",
    "saelens_gated": "SAELens gated (fp32)",
    "monoscope_transcoder": "monoscope Trainer TopK transcoder (auto dtype)",
    "monoscope_transcoder_revive_none": "monoscope Trainer TopK transcoder, --revive none (auto dtype)",
    "monoscope_transcoder_signum_sf": "monoscope Trainer TopK transcoder, --optimizer signum-sf (auto dtype)",
    "monoscope_transcoder_sae_init": "monoscope Trainer TopK transcoder, --transcoder-init sae (auto dtype)",
    "sparsify_transcoder": "sparsify transcoder (signum, fp32)",
    "monoscope_crosscoder": "monoscope Trainer acausal TopK crosscoder (auto dtype)",
    "lmsaes_crosscoder": "llamascopium Crosscoder, TopK (its defaults)",
    "lmsaes_crosscoder_grid_init": "llamascopium Crosscoder, TopK, grid_search_init_norm",
}
PEERS = ("sparsify", "saelens_topk", "saelens_relu_l1")
ARCH_ROWS = ("matryoshka", "gated", "transcoder", "crosscoder")
PEER_OF = {"transcoder": "sparsify_transcoder", "crosscoder": "lmsaes_crosscoder"}
"""The peer row of an architecture when it is not SAELens's trainer of it."""
"""Architectures with a row pair (monoscope, SAELens) compared with each other (--archs)."""


def summarise(runs: dict[str, dict[str, Any]], peaks: dict[str, float], peaks_end: dict[str, float], d: int,
              n_feat: int, tokens: int, t_mono: float) -> dict[str, Any]:
    flops = 4 * d * n_feat
    # the machine's peak: the better of the two measurements (the load varies; a peak is a peak)
    peaks = {k: max(peaks[k], peaks_end[k]) for k in peaks}
    limit = peaks["bf16"] * 1e12 / flops
    rows: dict[str, Any] = {}
    for name, r in runs.items():
        if "train_s" not in r or "final" not in r:
            rows[name] = {"error": r.get("error", "no result")}
            continue
        tps = tokens / r["train_s"]
        own = "fp32" if name.endswith("fp32") or not name.startswith("monoscope") else "bf16"
        ran = (r.get("settings") or {}).get("compute_dtype")  # what `auto` chose (fp32 where bf16 is emulated)
        own = {"float32": "fp32", "bfloat16": "bf16"}.get(ran, own) if isinstance(ran, str) else own
        row = {
            "tokens_per_s": tps,
            "train_s": r["train_s"],
            "fvu_same_tokens": r["final"]["fvu"],
            "l0": r["final"]["l0"],
            "dead_heldout_frac": r["final"]["dead_heldout_frac"],
            "dead_train_frac": r.get("dead_train_frac"),
            "peak_rss_gb": r.get("peak_rss_gb"),
            "compute_dtype": own,
            "tflops": tps * flops / 1e12,
            "fraction_of_own_dtype_peak": tps * flops / 1e12 / peaks[own],
            "fraction_of_bf16_peak": tps * flops / 1e12 / peaks["bf16"],
            "fraction_of_limit": tps / limit,
            "fraction_of_issue_45k": tps / 45_000,
            "load_before": r.get("load_before"), "load_after": r.get("load_after"),
        }
        if "fvu_per_hook" in r["final"]:
            row["fvu_per_hook"] = r["final"]["fvu_per_hook"]
        if r.get("train_s_rounds"):  # --repeats: each round's tokens/s and final FVU
            row["tokens_per_s_rounds"] = [tokens / t for t in r["train_s_rounds"]]
            row["fvu_rounds"] = r.get("fvu_rounds")
        turns = turn_speeds(r.get("turn_log"), tokens // max(r["final"]["step"], 1))
        if turns:
            row["turn_tokens_per_s"] = turns
        if r["train_s"] <= t_mono + 1e-6:
            row["fvu_at_monoscope_time"] = r["final"]["fvu"]
        elif r.get("curve"):
            at = at_time(r["curve"], t_mono)
            row["fvu_at_monoscope_time"] = at["fvu"]
            row["at_monoscope_time"] = {"train_s": at["train_s"], "tokens": at["tokens"], "l0": at["l0"]}
        rows[name] = row
    peers = {n: rows[n] for n in PEERS if n in rows and "tokens_per_s" in rows[n]}
    verdict: dict[str, Any] = {}
    if peers:
        fastest = max(peers, key=lambda n: peers[n]["tokens_per_s"])
        verdict["fastest_peer"] = fastest
        verdict["fastest_peer_tokens_per_s"] = peers[fastest]["tokens_per_s"]
        verdict["fastest_peer_fvu"] = peers[fastest]["fvu_same_tokens"]
        for name in [n for n in rows if n.startswith("monoscope") and n.split("_", 1)[1] not in ARCH_ROWS]:
            if "tokens_per_s" in rows[name]:
                sp = rows[name]["tokens_per_s"] / peers[fastest]["tokens_per_s"]
                rows[name]["speedup_vs_fastest_peer"] = sp
                best_peer_fvu = min(p["fvu_same_tokens"] for p in peers.values())
                fvu = rows[name]["fvu_same_tokens"]
                verdict[name] = {"speedup_vs_fastest_peer": sp, "meets_3x": sp >= 3.0, "fvu": fvu,
                                 "fvu_le_fastest_peer": fvu <= peers[fastest]["fvu_same_tokens"],
                                 "fvu_le_every_peer": rows[name]["fvu_same_tokens"] <= best_peer_fvu,
                                 "fraction_of_limit": rows[name]["fraction_of_limit"]}
    for a in ARCH_ROWS:  # each newer architecture against SAELens's trainer of the same architecture
        peer = PEER_OF.get(a, f"saelens_{a}")
        m, p = rows.get(f"monoscope_{a}", {}), rows.get(peer, {})
        if "tokens_per_s" in m and "tokens_per_s" in p:
            sp = m["tokens_per_s"] / p["tokens_per_s"]
            m["speedup_vs_fastest_peer"] = sp
            verdict[f"monoscope_{a}"] = {"peer": peer, "speedup_vs_peer": sp, "meets_3x": sp >= 3.0,
                                         "fvu": m["fvu_same_tokens"], "peer_fvu": p["fvu_same_tokens"],
                                         "fvu_le_peer": m["fvu_same_tokens"] <= p["fvu_same_tokens"],
                                         "l0": m["l0"], "peer_l0": p["l0"]}
    return {"rows": rows, "verdict": verdict, "limit_tokens_per_s": limit, "flops_per_token": flops,
            "peaks_used_tflops": peaks,
            "monoscope_full_pass_s": t_mono, "peak_drift": {k: peaks_end[k] / peaks[k] for k in peaks}}


def turn_speeds(turn_log: list[list[float]] | None, batch: int) -> dict[str, float] | None:
    """Tokens/s of each turn of an interleaved run (turns of at least one step): its median and 90th
    percentile. The turns met different background load; the fast ones show a quieter machine."""
    if not turn_log or len(turn_log) < 3:
        return None
    rates = sorted((s1 - s0) * batch / (t1 - t0) for (t0, s0), (t1, s1) in itertools.pairwise(turn_log)
                   if s1 > s0 and t1 > t0)
    if not rates:
        return None
    return {"n": len(rates), "median": rates[len(rates) // 2], "p90": rates[min(len(rates) - 1, int(0.9 * len(rates)))]}


def _aux_rows_values(value: str) -> list[int]:
    """--aux-rows: the row caps of the extra runs."""
    return [int(v) for v in value.split(",") if v.strip()]


def _aux_rows_archs(value: str) -> list[str]:
    """--aux-rows-arch: the architectures whose AuxK row cap the sweeps measure (`train.config.AUX_ROWS_ARCHS`)."""
    from monoscope.train.config import AUX_ROWS_ARCHS

    archs = [a.strip() for a in value.split(",") if a.strip()]
    bad = [a for a in archs if a not in AUX_ROWS_ARCHS]
    if bad or not archs:
        raise SystemExit(f"--aux-rows-arch {value!r}: use one or more of {', '.join(AUX_ROWS_ARCHS)}, "
                         "comma-separated")
    return archs


def _extra_row_label(name: str) -> str:
    """The table label of a row added by an option (`--lmsaes-lr`, `--aux-rows`, `--mono-lr`), from its name."""
    if name.startswith("lmsaes"):
        return f"llamascopium Crosscoder, TopK, grid init, lr {name.rsplit('lr', 1)[-1]}"
    if "auxrows" in name:
        arch = name.removeprefix("monoscope_").split("_auxrows")[0]
        what = "bf16" if arch == "bf16" else f"{arch} (auto dtype)"
        return f"monoscope Trainer {what}, AuxK rows {name.rsplit('auxrows', 1)[-1]}"
    return f"monoscope Trainer bf16, lr {name.rsplit('lr', 1)[-1]}"


def markdown_table(summary: dict[str, Any], t_mono: float, scale: dict[str, Any] | None) -> str:
    def f(v: Any, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    lines = [
        f"| trainer | tokens/s | tokens/s, fast turns (p90) | × fastest peer | held-out FVU (same tokens) "
        f"| FVU at {t_mono:.0f} s | L0 | dead % held-out / last 20% | peak RSS GB | % of matmul peak (own dtype) "
        f"| % of limit ({summary['limit_tokens_per_s']:,.0f} tok/s) | % of 45,000 tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = [n for n in LABELS if n in summary["rows"]]
    n_mono = sum(n.startswith("monoscope") for n in order)
    order[n_mono:n_mono] = [n for n in summary["rows"] if n not in LABELS]  # extra monoscope runs (--mono-lr)
    for name in order:
        r = summary["rows"][name]
        label = LABELS.get(name) or _extra_row_label(name)
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} | | | | | | | | | | |")
            continue
        dead_train = r.get("dead_train_frac")
        lines.append(
            f"| {label} | {r['tokens_per_s']:,.0f} | {f(r.get('turn_tokens_per_s', {}).get('p90'), ',.0f')} "
            f"| {f(r.get('speedup_vs_fastest_peer'), '.2f')} "
            f"| {r['fvu_same_tokens']:.4f} | {f(r.get('fvu_at_monoscope_time'), '.4f')} | {r['l0']:.1f} "
            f"| {100 * r['dead_heldout_frac']:.1f} / {f(None if dead_train is None else 100 * dead_train, '.1f')} "
            f"| {f(r.get('peak_rss_gb'), '.2f')} | {100 * r['fraction_of_own_dtype_peak']:.0f}% "
            f"| {100 * r['fraction_of_limit']:.0f}% | {100 * r['fraction_of_issue_45k']:.0f}% |")
    out = "\n".join(lines)
    if scale and scale.get("train_s"):
        out += (f"\n\nScale check: {scale['features']:,} features × d_model {scale['d_model']}, "
                f"{scale['steps']} steps of 4096 tokens: {scale.get('tokens_per_s', 0):,.0f} tokens/s (steady "
                f"{f(scale.get('steady_tokens_per_s'), ',.0f')}), peak RSS {scale['peak_rss_gb']:.1f} GB of "
                f"{scale['machine_memory_gb']} GB.")
    return out


if __name__ == "__main__":
    main()
