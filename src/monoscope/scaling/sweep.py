"""`sweep(store, budget, out)`: train a grid of small SAEs, fit scaling laws, pick width and steps.

    from monoscope.scaling import sweep
    res = sweep("runs/x/acts", "30m", "runs/x/sweep", widths=("1x", "2x", "4x"), tokens=("50k", "100k", "200k"))
    res.pick.width, res.pick.steps, res.pick.predicted, res.pick.interval, res.out / "sweep.json"

What it does, in order (every step reuses what a previous run of the same sweep left):
  1. Held-out split: the store's last `heldout_shards` shard(s) are never trained on. Training reads
     `OUT/train-store/`, a store whose manifest lists the other shards (files linked, not copied; its
     normaliser is computed from them alone).
  2. Cost model: a few timed optimiser steps per grid width (`cost.calibrate`), saved as `cost.json`.
  3. Grid: widths x token counts x seeds with the existing trainer (`monoscope.train.train`), one SAE
     folder per point under `OUT/runs/`; for topk, also widths x `ks` at the largest token count
     (Gao et al.'s L(n, k)). Each point ends with `point.json` (held-out FVU, MSE, L0, dead fraction,
     seconds), written atomically after its SAE; a point with one is skipped on rerun, a point killed
     mid-training resumes from its checkpoint. Checkpoints of finished points are removed.
  4. Fits (`fit.py`): L(n, T) on every (n, T) point except the largest run (largest width and token
     count, all seeds), whose loss it then predicts (the reported prediction error); L(n, T) again on
     every point for the pick; L(n, k) for topk.
  5. Pick: the width and whole steps minimising L(n, T) within the budget, with a 90% interval.
  6. `sweep.json` and `frontier.png`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import monoscope
from monoscope.errors import MonoscopeError
from monoscope.eval.metrics import ReconAccumulator
from monoscope.fileio import read_json, write_json_atomic
from monoscope.locking import locks_folders
from monoscope.sae.config import ARCHITECTURES, TOPK_STYLE, parse_width
from monoscope.scaling.budget import Budget, parse_budget
from monoscope.scaling.cost import CostModel, calibrate
from monoscope.scaling.fit import FitError, LawFit, Pick, fit_lnk, fit_lnt, pick_for_budget
from monoscope.store import ActivationStore
from monoscope.units import parse_count

FORMAT = "monoscope-sweep/1"
TRAIN_STORE = "train-store"
RUNS = "runs"
POINT = "point.json"


class SweepError(MonoscopeError):
    """A sweep setting or grid that cannot work; the message names it and the fix."""


@dataclass
class SweepConfig:
    """The grid and how each point is trained and measured."""

    widths: tuple[int | str, ...] = ("1x", "2x", "4x")
    """Feature counts or multiples of d_model; at least 3 distinct."""
    tokens: tuple[int | str, ...] = ("50k", "100k", "200k")
    """Training tokens per run; at least 3 distinct, each at least one batch."""
    seeds: tuple[int, ...] = (0, 1)
    """Every grid point is trained once per seed (the spread is the noise the fit sees)."""
    arch: str = "topk"
    k: int | None = 32
    """Active features per token (topk, batchtopk)."""
    ks: tuple[int, ...] | None = None
    """topk: k values for L(n, k), at the largest token count (default k/2, k, 2k); () skips L(n, k)."""
    batch_size: int = 1024
    lr: float | None = None
    """Learning rate for every run (default: the trainer's per-architecture rule, which scales with width)."""
    heldout_shards: int = 1
    """The store's last shards kept out of training; losses are measured on their rows."""
    heldout_rows: int = 20_000
    """At most this many held-out rows are evaluated (the last ones)."""
    bootstrap: int = 100
    """Residual-bootstrap refits behind every interval."""
    metric: str = "fvu"
    """The loss the laws fit: fvu (held-out fraction of variance unexplained) or mse (raw scale)."""
    calibration_steps: int = 4
    """Timed optimiser steps per width in the cost benchmark."""
    device: str = "auto"
    threads: int | None = None
    """CPU threads for torch (None: leave torch's setting). On a CPU shared with other jobs, 1 thread can be
    several times faster than 2: each op waits for a descheduled thread."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise SweepError(f"--arch {self.arch!r}: use one of {', '.join(ARCHITECTURES)}")
        if self.arch in TOPK_STYLE:
            if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
                raise SweepError(f"--k {self.k!r}: --arch {self.arch} needs a positive k such as 32")
        else:
            self.k, self.ks = None, ()
        try:
            self.tokens = tuple(parse_count(t, "--tokens") for t in self.tokens)
        except MonoscopeError as e:
            raise SweepError(str(e)) from None
        self.widths = tuple(self.widths)
        self.seeds = tuple(self.seeds)
        if len(set(self.widths)) < 3:
            raise SweepError(f"--widths {','.join(map(str, self.widths))}: give at least 3 distinct widths "
                             "(e.g. 1x,2x,4x) so the fit can separate width from tokens")
        if len(set(self.tokens)) < 3:
            raise SweepError(f"--tokens {','.join(map(str, self.tokens))}: give at least 3 distinct token counts "
                             "(e.g. 50k,100k,200k)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(
                not isinstance(s, int) or s < 0 for s in self.seeds):
            raise SweepError(f"--seeds {self.seeds!r}: give distinct integers >= 0, e.g. 0,1")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SweepError(f"--batch-size {self.batch_size!r}: use a positive number of rows such as 1024")
        small = [t for t in self.tokens if t < self.batch_size]
        if small:
            raise SweepError(f"--tokens {small[0]:,} is less than one batch of {self.batch_size}: raise it or lower "
                             "--batch-size")
        if self.ks is None:
            self.ks = (max(1, self.k // 2), self.k, 2 * self.k) if self.arch == "topk" and self.k else ()
        self.ks = tuple(self.ks)
        if self.ks and self.arch != "topk":
            raise SweepError(f"--ks applies to --arch topk (Gao et al.'s L(n, k)), not {self.arch}: drop it")
        if self.ks and (len(set(self.ks)) < 3 or any(k < 1 for k in self.ks)):
            raise SweepError(f"--ks {','.join(map(str, self.ks))}: give at least 3 distinct positive k (or none)")
        if self.heldout_shards < 1:
            raise SweepError(f"--heldout-shards {self.heldout_shards}: at least 1 shard must be held out")
        if self.heldout_rows < 1:
            raise SweepError(f"--heldout-rows {self.heldout_rows}: use a positive row count")
        if self.bootstrap < 1:
            raise SweepError(f"--bootstrap {self.bootstrap}: use a positive number of refits such as 200")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise SweepError(f"--threads {self.threads!r}: use a positive count such as 1")
        if self.metric not in ("fvu", "mse"):
            raise SweepError(f"--metric {self.metric!r}: use fvu or mse")

    def key(self) -> dict[str, Any]:
        """What decides the numbers (progress and bootstrap count do not retrain anything)."""
        return {"widths": [str(w) for w in self.widths], "tokens": list(self.tokens), "seeds": list(self.seeds),
                "arch": self.arch, "k": self.k, "ks": list(self.ks or ()), "batch_size": self.batch_size,
                "lr": self.lr, "heldout_shards": self.heldout_shards, "heldout_rows": self.heldout_rows}


@dataclass(frozen=True)
class GridPoint:
    width: int
    tokens: int
    k: int | None
    seed: int

    @property
    def name(self) -> str:
        return f"n{self.width}-t{self.tokens}" + (f"-k{self.k}" if self.k is not None else "") + f"-s{self.seed}"


@dataclass
class SweepResult:
    out: Path
    points: list[dict[str, Any]]
    lnt: LawFit
    lnt_holdout: LawFit
    holdout: dict[str, Any]
    lnk: LawFit | None
    cost: CostModel
    pick: Pick
    budget: Budget
    trained: int
    """Grid points trained in this call (0 on a rerun of a finished sweep)."""
    reused: int
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)


def lnk_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points of the L(n,k) fit: those at the largest token count, as trained. A point trains whole batches,
    so its `tokens` is the requested count rounded down to a multiple of the batch size (80k at batch 256 is
    79,872): compare trained counts with each other, never with the requested one."""
    t_max = max(r["tokens"] for r in records)
    return [r for r in records if r["tokens"] == t_max]


def grid_points(cfg: SweepConfig, d_model: int) -> tuple[list[GridPoint], list[GridPoint]]:
    """(points of the L(n, T) grid, extra points of the L(n, k) grid) in training order (cheap first)."""
    widths = sorted({parse_width(w, d_model) for w in cfg.widths})
    if len(widths) < 3:
        raise SweepError(f"--widths {','.join(map(str, cfg.widths))} give only {len(widths)} distinct feature "
                         f"counts at d_model {d_model}: give at least 3")
    if cfg.k is not None and cfg.k > widths[0]:
        raise SweepError(f"--k {cfg.k} is more than the narrowest width's {widths[0]} features: raise --widths")
    nt = [GridPoint(n, t, cfg.k, s) for s in cfg.seeds for n in widths for t in sorted(set(cfg.tokens))]
    t_max = max(cfg.tokens)
    nk = [GridPoint(n, t_max, k, s) for s in cfg.seeds for n in widths for k in sorted(cfg.ks or ())
          if k != cfg.k and k <= n]
    return nt, nk


# ----------------------------------------------------------------------------- the held-out split


def _train_view(store: ActivationStore, out: Path, heldout: int) -> tuple[ActivationStore, list[int]]:
    """The training store (every shard but the last `heldout`, linked) and the held-out shard indices."""
    shards = store.manifest.shards
    if len(shards) <= heldout:
        raise SweepError(f"store {store.folder} has {len(shards)} shard(s): holding out {heldout} leaves none to "
                         "train on; capture more tokens or lower --heldout-shards")
    view = out / TRAIN_STORE
    view.mkdir(parents=True, exist_ok=True)
    keep = shards[: len(shards) - heldout]
    for info in keep:
        link = view / info.file
        target = (store.folder / info.file).resolve()
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.exists() or link.is_symlink():
            link.unlink()
        try:
            os.symlink(target, link)
        except OSError:
            shutil.copyfile(target, link)  # file systems without symlinks
    m = replace(store.manifest, shards=list(keep))
    mpath = view / "manifest.json"
    if not mpath.is_file() or read_json(mpath, "training store manifest") != json.loads(json.dumps(m.to_json())):
        m.write(view)
    return ActivationStore.open(view), list(range(len(keep), len(shards)))


def _heldout_rows(store: ActivationStore, shard_ids: list[int], limit: int) -> torch.Tensor:
    """[rows, d] float32 raw: the kept rows of the held-out shards, the last `limit` of them."""
    rows = []
    for i in shard_ids:
        sh = store.read_shard(i)
        rows.append(sh.acts[sh.keep.bool()].float())
    x = torch.cat(rows)
    return x[-limit:]


@torch.inference_mode()
def heldout_metrics(sae: Any, x: torch.Tensor, device: torch.device) -> dict[str, float]:
    """FVU, MSE, L0, dead and dense fractions of `sae` on raw rows `x` (eval/metrics definitions)."""
    acc = ReconAccumulator(sae.cfg.d_sae, 1)
    pos = torch.zeros(0, dtype=torch.long)
    for xb in x.split(4096):
        xb = xb.to(device)
        f = sae.encode_raw(xb)
        acc.add(xb, sae.decode_raw(f), f != 0, pos.new_zeros(len(xb)))
    r = acc.result()
    return {"fvu": r.fvu, "mse": r.mse, "l0": r.l0_mean, "dead_frac": r.dead_frac, "dense_frac": r.dense_frac,
            "rows": r.rows}


# ----------------------------------------------------------------------------- the sweep


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"sweep: {msg}", file=sys.stderr, flush=True)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _point_key(p: GridPoint, cfg: SweepConfig, train_manifest: str, heldout: dict[str, Any]) -> str:
    return _digest({"point": [p.width, p.tokens, p.k, p.seed], "arch": cfg.arch, "batch": cfg.batch_size,
                    "lr": cfg.lr, "train_store": train_manifest, "heldout": heldout})


def _run_point(p: GridPoint, cfg: SweepConfig, view: ActivationStore, x_held: torch.Tensor, folder: Path,
               key: str) -> dict[str, Any]:
    from monoscope.devices import resolve_device
    from monoscope.train import train
    from monoscope.train.trainer import TrainingInterrupted

    steps = p.tokens // cfg.batch_size
    settings: dict[str, Any] = {"arch": cfg.arch, "tokens": p.tokens, "width": p.width, "batch_size": cfg.batch_size,
                                "seed": p.seed, "lr": cfg.lr, "device": cfg.device, "progress": False,
                                "checkpoint_every": max(1, steps // 4), "keep_checkpoints": 1,
                                "log_every": max(1, min(50, steps))}
    if p.k is not None:
        settings["k"] = p.k
    try:
        res = train(folder, store=view.folder, resume=True, command=f"monoscope sweep (point {p.name})", **settings)
    except TrainingInterrupted as e:  # train's own advice (--resume) is not how a sweep continues
        raise TrainingInterrupted(
            f"sweep stopped by signal {e.signum} during point {p.name} (step {e.step}; its checkpoint and the "
            "finished points are kept): run the same monoscope sweep command again to continue", e.step, e.signum
        ) from None
    dev = resolve_device(cfg.device)
    metrics = heldout_metrics(res.sae.to(dev).eval(), x_held, dev)
    rec = {"key": key, "name": p.name, "width": p.width, "tokens": res.tokens, "k": p.k, "seed": p.seed,
           "steps": res.steps, "train_seconds": res.seconds, "train_tokens_per_s": res.tokens_per_s,
           "session_tokens": res.session_tokens, "resumed_from": res.resumed_from,
           "train_fvu": res.metrics.get("fvu"), "heldout": metrics}
    write_json_atomic(folder / POINT, rec)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the finished SAE is enough to skip it again
    return rec


@locks_folders(lambda a: [a["out"]], "sweep")
def sweep(store: str | Path, budget: str | float, out: str | Path, *, config: SweepConfig | None = None,
          command: str | None = None, on_point: Callable[[dict[str, Any]], None] | None = None,
          **settings: Any) -> SweepResult:
    """Run (or finish) the sweep in `out` and pick width and steps for `budget` (module docstring).

    config: a SweepConfig, or its fields as keywords. A rerun trains only the points without a
    `point.json`; a different budget on a finished sweep refits and picks again without training."""
    if config is not None and settings:
        raise SweepError(f"pass either config= or settings as keywords, not both (got {sorted(settings)})")
    try:
        cfg = config if config is not None else SweepConfig(**settings)
    except TypeError as e:
        raise SweepError(f"sweep: {e}") from None
    bud = parse_budget(budget)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _sweep(store, bud, Path(out), cfg, command, on_point)
    finally:  # `threads` is this call's setting only, not the calling process's
        torch.set_num_threads(threads)


def _sweep(store: str | Path, bud: Budget, out: Path, cfg: SweepConfig, command: str | None,
           on_point: Callable[[dict[str, Any]], None] | None) -> SweepResult:
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file: give a folder for the sweep")
    src = ActivationStore.open(store)
    d = src.d_model
    nt, nk = grid_points(cfg, d)
    out.mkdir(parents=True, exist_ok=True)
    view, held_ids = _train_view(src, out, cfg.heldout_shards)
    x_held = _heldout_rows(src, held_ids, cfg.heldout_rows)
    held_desc = {"store": str(src.folder.resolve()), "shards": [src.manifest.shards[i].file for i in held_ids],
                 "rows": int(x_held.shape[0]), "manifest_sha256": _sha(src.folder / "manifest.json")}
    train_manifest = _sha(view.folder / "manifest.json")
    notes: list[str] = []

    # cost model (reused when the same benchmark was already run here)
    widths = sorted({p.width for p in nt})
    cost_path = out / "cost.json"
    cost_key = _digest({"arch": cfg.arch, "k": cfg.k, "widths": widths, "batch": cfg.batch_size,
                        "device": cfg.device, "steps": cfg.calibration_steps, "d": d,
                        "threads": torch.get_num_threads()})
    cost: CostModel | None = None
    if cost_path.is_file():
        saved = read_json(cost_path, "cost model")
        if saved.get("key") == cost_key:
            cost = CostModel.from_dict(saved["model"])
    if cost is None:
        _say(cfg.progress, f"timing {cfg.calibration_steps} steps at each of {len(widths)} widths for the cost model")
        rows = view.read_shard(0).rows()
        cost = calibrate(rows, arch=cfg.arch, k=cfg.k, widths=widths, batch_size=cfg.batch_size,
                         normaliser=view.normaliser, device=cfg.device, steps=cfg.calibration_steps)
        write_json_atomic(cost_path, {"key": cost_key, "model": cost.to_dict()})

    points = nt + nk
    total_cost = sum(cost.seconds(p.width, p.tokens) for p in points)
    _say(cfg.progress, f"{len(points)} grid points ({len(nt)} for L(n,T), {len(nk)} more for L(n,k)); "
                       f"~{total_cost:,.0f} s of training if none is done yet")
    records: list[dict[str, Any]] = []
    trained = reused = 0
    t_start = time.perf_counter()
    for i, p in enumerate(points, 1):
        folder = out / RUNS / p.name
        key = _point_key(p, cfg, train_manifest, held_desc)
        rec = None
        if (folder / POINT).is_file():
            try:
                prev = read_json(folder / POINT, "sweep point")
                rec = prev if prev.get("key") == key else None
            except MonoscopeError:
                rec = None
        if rec is not None:
            reused += 1
            what = "done before"
        else:
            t0 = time.perf_counter()
            rec = _run_point(p, cfg, view, x_held, folder, key)
            trained += 1
            what = f"trained in {time.perf_counter() - t0:.1f} s"
        records.append(rec)
        h = rec["heldout"]
        _say(cfg.progress, f"[{i}/{len(points)}] {p.name}: {what}; held-out FVU {h['fvu']:.4f}, "
                           f"dead {h['dead_frac']:.1%}")
        if on_point is not None:
            on_point(rec)
    if trained:
        _say(cfg.progress, f"trained {trained} point(s) in {time.perf_counter() - t_start:.0f} s")

    # fits
    metric = cfg.metric
    nt_names = {p.name for p in nt}
    nt_recs = [r for r in records if r["name"] in nt_names]
    n_arr = np.array([r["width"] for r in nt_recs], float)
    t_arr = np.array([r["tokens"] for r in nt_recs], float)
    y_arr = np.array([r["heldout"][metric] for r in nt_recs], float)
    largest = (n_arr == n_arr.max()) & (t_arr == t_arr.max())
    try:
        lnt_hold = fit_lnt(n_arr[~largest], t_arr[~largest], y_arr[~largest], bootstrap=cfg.bootstrap)
        lnt = fit_lnt(n_arr, t_arr, y_arr, bootstrap=cfg.bootstrap)
    except FitError as e:
        raise SweepError(f"{e} (sweep {out})") from None
    n_big, t_big = float(n_arr.max()), float(t_arr.max())
    measured = float(y_arr[largest].mean())
    predicted = float(lnt_hold.predict(n_big, t_big))
    holdout = {"width": int(n_big), "tokens": int(t_big), "seeds": int(largest.sum()), "measured": measured,
               "measured_by_seed": y_arr[largest].tolist(), "predicted": predicted,
               "interval_90": list(lnt_hold.interval(n_big, t_big)),
               "relative_error": (predicted - measured) / measured, "metric": metric}
    lnk = None
    if cfg.ks:
        kr = lnk_records(records)
        try:
            lnk = fit_lnk([r["width"] for r in kr], [r["k"] for r in kr], [r["heldout"][metric] for r in kr],
                          bootstrap=cfg.bootstrap)
        except FitError as e:
            notes.append(f"L(n,k) not fitted: {e}")

    # the pick
    per_tok = cost.flops_per_token if bud.kind == "flops" else cost.seconds_per_token
    n_min = max(cfg.k or 1, widths[0] // 4, 1)
    pick = pick_for_budget(lnt, per_tok, bud.value, batch_size=cfg.batch_size, n_min=n_min, n_max=widths[-1] * 256)
    grid_c = max(float(per_tok(r["width"])) * r["tokens"] for r in nt_recs)
    if bud.value > 100 * grid_c:
        notes.append(f"the budget is {bud.value / grid_c:,.0f}x the largest grid run: the pick extrapolates the law "
                     "far beyond the measured points")
    pick.notes = pick.notes + notes

    cost_check = [{"name": r["name"], "measured_s": r["train_seconds"],
                   "predicted_s": cost.seconds(r["width"], r["session_tokens"])}
                  for r in records if r.get("session_tokens") and r.get("train_seconds")]
    res = SweepResult(out, records, lnt, lnt_hold, holdout, lnk, cost, pick, bud, trained, reused, notes=notes)
    try:
        from monoscope.scaling.plots import frontier_plot

        res.plot = frontier_plot(res, out / "frontier.png")
    except ImportError as e:  # matplotlib is a project dependency; a broken install must not lose the fit
        notes.append(f"no plot: {e}")
    summary = _summary(res, cfg, d, held_desc, cost_check, command)
    write_json_atomic(out / "sweep.json", summary)
    return res


def _sha(path: Path) -> str:
    from monoscope.fileio import sha256_file

    return sha256_file(path)


def _summary(res: SweepResult, cfg: SweepConfig, d: int, held: dict[str, Any], cost_check: list[dict[str, Any]],
             command: str | None) -> dict[str, Any]:
    b = res.budget
    p = res.pick
    flops = res.cost.flops(p.width, p.tokens)
    secs = res.cost.seconds(p.width, p.tokens)
    frontier = _frontier(res, cfg)
    return {
        "format": FORMAT,
        "command": command or "monoscope.scaling.sweep(...)",
        "config": cfg.key() | {"bootstrap": cfg.bootstrap, "metric": cfg.metric},
        "d_model": d,
        "heldout": held,
        "budget": {"text": b.text, "kind": b.kind, "value": b.value,
                   "as_flops": b.value if b.kind == "flops" else b.value * res.cost.flops_per_s(p.width)},
        "cost_model": res.cost.to_dict() | {
            "flops_per_token": f"{'2·d·n + 8·d·k' if cfg.arch in TOPK_STYLE else '10·d·n'} "
                               "(monoscope.scaling.cost)",
            "check": cost_check},
        "points": res.points,
        "fit_L_n_T": res.lnt.to_dict(),
        "fit_L_n_T_without_largest": res.lnt_holdout.to_dict(),
        "holdout": res.holdout,
        "fit_L_n_k": None if res.lnk is None else res.lnk.to_dict() | {"tokens": max(cfg.tokens)},
        "pick": p.to_dict() | {"flops": flops, "seconds": secs, "budget_unit": b.kind,
                               "width_multiple_of_d_model": p.width / d},
        "frontier": frontier,
        "plot": None if res.plot is None else res.plot.name,
        "notes": res.notes,
        "versions": {"monoscope": monoscope.__version__, "torch": torch.__version__},
    }


def _frontier(res: SweepResult, cfg: SweepConfig) -> list[dict[str, float]]:
    """Compute-optimal (width, tokens, loss) by the fitted law for FLOP budgets around the grid's."""
    per_tok = res.cost.flops_per_token
    c = [float(per_tok(r["width"])) * r["tokens"] for r in res.points]
    out = []
    for budget in np.geomspace(min(c) / 2, max(c) * 1000, 25):
        try:
            pk = pick_for_budget(res.lnt, per_tok, float(budget), batch_size=cfg.batch_size,
                                 n_min=max(cfg.k or 1, 1), n_max=max(r["width"] for r in res.points) * 256,
                                 points=121)
        except MonoscopeError:
            continue
        out.append({"flops": float(budget), "width": pk.width, "tokens": pk.tokens, "predicted": pk.predicted})
    return out


def parse_list(text: str | Sequence[Any], flag: str) -> tuple[str, ...]:
    """'1x,2x,4x' -> ('1x', '2x', '4x'); an empty item is a one-line error."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s) for s in text]
    if not items or any(not s for s in items):
        raise SweepError(f"{flag} {text!r}: give comma-separated values such as 1x,2x,4x")
    return tuple(items)
