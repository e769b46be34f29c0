"""`monoscope sweep STORE --budget FLOPS|TIME --out DIR` (registered by monoscope.cli)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from monoscope.errors import MonoscopeError
from monoscope.fileio import check_output_dir
from monoscope.scaling.sweep import SweepConfig, SweepError, SweepResult, parse_list, sweep


def add_sweep_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sweep", help="train a grid of small SAEs, fit scaling laws, pick width and steps for a budget",
        description="Train widths x token counts x seeds on an activation store (its last shard held out), fit "
        "L(n,T) = E + A n^-alpha + B T^-beta (and Gao et al.'s L(n,k) for topk), report how well the fit predicts "
        "the largest run without it, and pick width and steps for --budget with a 90%% interval. Writes "
        "sweep.json and frontier.png. A rerun trains only what is missing.")
    p.add_argument("store", help="activation store folder")
    p.add_argument("--budget", required=True,
                   help="compute for the final run: FLOPs (3e15, 2.5PFLOP) or wall time on this machine (20m, 1.5h)")
    p.add_argument("--out", required=True, help="sweep folder (created; an unfinished sweep there resumes)")
    p.add_argument("--widths", default="1x,2x,4x", help="feature counts or multiples of d_model (default 1x,2x,4x)")
    p.add_argument("--tokens", default="50k,100k,200k", help="training tokens per run (default 50k,100k,200k)")
    p.add_argument("--seeds", default="0,1", help="seeds per grid point (default 0,1)")
    p.add_argument("--arch", default="topk", choices=["relu-l1", "topk", "batchtopk", "jumprelu"])
    p.add_argument("--k", type=int, default=32, help="active features per token (topk, batchtopk; default 32)")
    p.add_argument("--ks", default=None,
                   help="topk: k values for L(n,k) at the largest token count (default k/2,k,2k; 'none' skips it)")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per optimiser step (default 1024)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the trainer's rule per width)")
    p.add_argument("--heldout-shards", type=int, default=1, help="last store shards never trained on (default 1)")
    p.add_argument("--heldout-rows", type=int, default=20_000, help="held-out rows evaluated (default 20000)")
    p.add_argument("--metric", default="fvu", choices=["fvu", "mse"], help="loss the laws fit (default fvu)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits per interval (default 100)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's); 1 is often fastest on a CPU shared with other jobs")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_sweep)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in parse_list(text, flag))
    except ValueError:
        raise SweepError(f"{flag} {text!r}: give comma-separated integers such as 0,1") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    check_output_dir(args.out)
    ks: tuple[int, ...] | None
    if args.ks is None:
        ks = None
    elif args.ks.strip().lower() == "none":
        ks = ()
    else:
        ks = _ints(args.ks, "--ks")
    cfg = SweepConfig(widths=parse_list(args.widths, "--widths"), tokens=parse_list(args.tokens, "--tokens"),
                      seeds=_ints(args.seeds, "--seeds"), arch=args.arch, k=args.k, ks=ks,
                      batch_size=args.batch_size, lr=args.lr, heldout_shards=args.heldout_shards,
                      heldout_rows=args.heldout_rows, bootstrap=args.bootstrap, metric=args.metric,
                      device=args.device, threads=args.threads, progress=not args.quiet)
    res = sweep(args.store, args.budget, args.out, config=cfg, command=shlex.join(["monoscope", *sys.argv[1:]]))
    print_summary(res)
    return 0


def print_summary(res: SweepResult) -> None:
    lnt, h, p = res.lnt, res.holdout, res.pick
    iv = lnt.param_intervals()
    print(f"grid: {len(res.points)} runs ({res.trained} trained now, {res.reused} reused)")
    print(f"L(n,T) = {lnt.params['E']:.4g} + {lnt.params['A']:.4g} n^-{lnt.params['alpha']:.3f} "
          f"+ {lnt.params['B']:.4g} T^-{lnt.params['beta']:.3f}   (alpha 90% [{iv['alpha'][0]:.3f}, "
          f"{iv['alpha'][1]:.3f}], beta [{iv['beta'][0]:.3f}, {iv['beta'][1]:.3f}], rms log error "
          f"{lnt.rmse_log:.3f})")
    print(f"largest run (n={h['width']:,}, T={h['tokens']:,}) predicted without it: {h['predicted']:.4f} vs "
          f"measured {h['measured']:.4f} ({h['relative_error']:+.1%}; 90% [{h['interval_90'][0]:.4f}, "
          f"{h['interval_90'][1]:.4f}])")
    if res.lnk is not None:
        q = res.lnk.params
        print(f"L(n,k) = exp({q['a']:.3g} + {q['b_k']:.3g} log k + {q['b_n']:.3g} log n + {q['g']:.3g} log k log n)"
              f" + exp({q['z']:.3g} + {q['e']:.3g} log k)   (rms log error {res.lnk.rmse_log:.3f})")
    unit = "FLOPs" if res.budget.kind == "flops" else "s"
    print(f"pick for {res.budget.text}: width {p.width:,} (90% [{p.width_interval[0]:,}, {p.width_interval[1]:,}]), "
          f"{p.steps:,} steps x {res.cost.batch_size} = {p.tokens:,} tokens; predicted {h['metric']} "
          f"{p.predicted:.4f} (90% [{p.interval[0]:.4f}, {p.interval[1]:.4f}]); cost {p.cost:.3g} {unit}")
    for n in res.notes + [n for n in p.notes if n not in res.notes]:
        print(f"note: {n}")
    print(f"written: {res.out / 'sweep.json'}" + (f", {res.plot}" if res.plot else ""))
    print(f"next: monoscope train STORE --arch {res.cost.arch}" + (f" --k {res.cost.k}" if res.cost.k else "")
          + f" --width {p.width} --tokens {p.tokens} --batch-size {res.cost.batch_size} --out SAE_DIR")


__all__ = ["MonoscopeError", "add_sweep_parser", "cmd_sweep"]
