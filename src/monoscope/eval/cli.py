"""`monoscope eval SAE_DIR --acts STORE [--lm] [--tokens N] [--out DIR]` (registered by monoscope.cli)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from monoscope.eval.run import EvalResult, default_out, evaluate
from monoscope.fileio import check_output_dir


def add_eval_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="faithfulness of an SAE: FVU, L0, dead/dense, shrinkage; with --lm CE recovered and KL",
        description="Evaluate an SAE folder (monoscope, SAELens or sparsify) on the last rows of an activation "
        "store and, with --lm, on held-out text (the store's corpus after the store) with the reconstruction "
        "spliced into the model. Writes metrics.json and PNG plots.")
    p.add_argument("sae", help="SAE folder")
    p.add_argument("--acts", default=None,
                   help="activation store of the model and hook the SAE reads (required unless --saebench)")
    p.add_argument("--lm", action="store_true", help="also the LM loss with the reconstruction spliced in")
    p.add_argument("--tokens", default=None,
                   help="store rows, and held-out tokens with --lm (default 100k, or every row of a smaller store; "
                        "an explicit count above the store's rows is an error)")
    p.add_argument("--out", default=None, help="output folder (default: runs/x/eval beside runs/x/sae)")
    p.add_argument("--text", default=None, help="with --lm: evaluate on this corpus instead of the held-out text")
    p.add_argument("--batch-contexts", type=int, default=8, help="contexts per forward with --lm (default 8)")
    p.add_argument("--no-error-check", action="store_true",
                   help="skip the check that splicing x̂ + (x − x̂) reproduces the clean loss (saves 1/4 of --lm)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compute-dtype", default=None, choices=["auto", "fp32", "bf16"],
                   help="model forward precision with --lm (default: the one the store was captured with)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    g = p.add_argument_group("SAEBench metrics (--saebench; docs/saebench.md)")
    g.add_argument("--saebench", action="store_true",
                   help="SAEBench-compatible absorption (lower is better), sparse probing, targeted probe "
                        "perturbation and spurious correlation removal (higher is better) on offline data, into "
                        "OUT/saebench.json; needs the SAE's model, not --acts")
    g.add_argument("--model", default=None, help="with --saebench: the model (default: the one the SAE records)")
    g.add_argument("--absorption-words", type=int, default=None,
                   help="with --saebench: vocabulary words of the first-letter task (default 2000)")
    g.add_argument("--probe-per-class", type=int, default=None,
                   help="with --saebench: texts per class of each probing and TPP task (default 150)")
    g.add_argument("--saebench-metrics", default="absorption,probing,tpp,scr", metavar="LIST",
                   help="with --saebench: the metric families to compute, comma-separated (default "
                        "absorption,probing,tpp,scr), e.g. scr alone")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from monoscope.errors import MonoscopeError

    check_output_dir(args.out if args.out is not None else default_out(Path(args.sae)))  # before any loading
    if args.acts is None and not args.saebench:
        raise MonoscopeError("monoscope eval needs --acts STORE (the store of the SAE's model and hook), or "
                             "--saebench for the SAEBench metrics")
    if args.saebench:
        from monoscope.eval.saebench import print_saebench_summary, run_saebench

        path, metrics = run_saebench(args.sae, out=args.out, model=args.model, device=args.device,
                                     max_words=args.absorption_words, max_per_class=args.probe_per_class,
                                     families=[f.strip() for f in args.saebench_metrics.split(",") if f.strip()])
        print_saebench_summary(metrics, path)
        if args.acts is None:
            return 0
    res = evaluate(args.sae, acts=args.acts, lm=args.lm, tokens=args.tokens, out=args.out, text=args.text,
                   batch_contexts=args.batch_contexts, error_check=not args.no_error_check, device=args.device,
                   compute_dtype=args.compute_dtype, progress=not args.quiet)
    print_eval_summary(res)
    return 0


def print_eval_summary(res: EvalResult) -> None:
    """One screen: the numbers a reviewer asks for first, and where the plots are."""
    t = Table(title=f"evaluation {res.out}", title_justify="left")
    t.add_column("metric", style="bold")
    t.add_column("store rows", justify="right")
    if res.heldout is not None:
        t.add_column("held-out text", justify="right")
    rows = [("tokens", lambda m: f"{m.rows:,}"), ("FVU", lambda m: f"{m.fvu:.4f}"),
            ("explained variance", lambda m: f"{m.explained_variance:.2%}"), ("L0", lambda m: f"{m.l0_mean:.1f}"),
            ("dead (never active)", lambda m: f"{m.dead_frac:.2%}"), ("dense (> 10% of tokens)",
                                                                      lambda m: f"{m.dense_frac:.2%}"),
            ("shrinkage ‖x̂‖/‖x‖", lambda m: f"{m.shrinkage_norm_ratio:.3f}")]
    for name, fmt in rows:
        t.add_row(name, fmt(res.store), *([fmt(res.heldout)] if res.heldout is not None else []))
    Console().print(t)
    if res.lm is not None:
        lm = res.lm
        t2 = Table(title=f"LM loss on {lm.predictions:,} held-out predictions", title_justify="left",
                   show_header=False)
        t2.add_column(style="bold")
        t2.add_column(justify="right")
        t2.add_row("CE clean / spliced / zero-ablated",
                   f"{lm.ce_clean:.4f} / {lm.ce_spliced:.4f} / {lm.ce_zero:.4f} nats")
        t2.add_row("CE loss recovered", f"{lm.ce_recovered:.2%}")
        t2.add_row("KL(clean ‖ spliced)", f"{lm.kl_spliced:.4f} nats  (zero-ablated {lm.kl_zero:.3f})")
        if lm.ce_error is not None:
            t2.add_row("check: x̂ + error spliced", f"CE {lm.ce_error:.4f} (clean {lm.ce_clean:.4f}), "
                       f"KL {lm.kl_error:.2e}")
        if res.tokens_per_s:
            t2.add_row("speed", f"{res.tokens_per_s:,.0f} held-out tokens/s (all variants)")
        Console().print(t2)
    for note in res.notes:
        print(f"note: {note}")
    reused = "  (same SAE, store and options as before: reused)" if res.reused else ""
    print(f"results: {res.out / 'metrics.json'}{reused}")
    if res.plots:
        print("plots: " + "  ".join(str(p) for p in res.plots))
