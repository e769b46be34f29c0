"""`monoscope explain SAE_DIR --llm SPEC [--features N|ids] [--scorers ...]` (registered by monoscope.cli).

    monoscope explain runs/x/sae --llm openai:gpt-4o-mini                         # 20 most interesting features
    monoscope explain runs/x/sae --llm openai:Qwen/Qwen2.5-7B-Instruct --endpoint http://gpu:8000 --features 200
    monoscope explain runs/x/sae --llm local:default --features 3,17,42 --scorers detection,embedding
    monoscope explain runs/x/sae --llm local:default --features 5 --scorers intruder,intervention --steer-strength 4x
    monoscope explain runs/x/sae --llm openai:my-model --endpoint http://host:8000 --classify-method text  # no logprobs

Writes explanations and scores into the feature database (see monoscope.interp.explain) and ends with the
distribution of every score: mean, quartiles and failures.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from monoscope.errors import MonoscopeError
from monoscope.features.show import existing_db_path
from monoscope.fileio import check_output_dir
from monoscope.interp.explain import (
    DEFAULT_FEATURES,
    ExplainResult,
    check_explained,
    explain_features,
    parse_features,
    parse_scorers,
)
from monoscope.interp.llm import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, STALL_AFTER_TIMEOUTS
from monoscope.interp.prompts import EXPLAIN_STYLES
from monoscope.interp.scorers import (
    ALL_SCORERS,
    CLASSIFY_METHODS,
    DEFAULT_CLASSIFY_METHOD,
    INTERVENTION_STRENGTH,
    SCORER_NAMES,
)

SHOW_EXPLANATIONS = 10  # explanations printed in the summary (all are in the database)


def add_explain_parser(subparsers: Any) -> None:
    """Register `monoscope explain` (to be called by monoscope.cli.build_parser)."""
    p = subparsers.add_parser(
        "explain", help="LLM explanations of features, scored by how well they predict the feature",
        description="Ask an LLM to explain each feature from its top and quantile-sampled contexts (active tokens "
        "marked), then score each explanation on held-out contexts: detection and fuzzing (balanced accuracy), "
        "simulation (correlation of predicted and true activations), embedding (AUROC of MiniLM similarity) and "
        "specificity (0-3 rubric of Scaling Monosemanticity); on request, intruder (pick the excerpt that does not "
        "belong; accuracy) and intervention (steer the feature on neutral prompts; does the explanation tell the "
        "steered continuation from the default? accuracy; runs the SAE's model). Results go into the feature "
        "database; a rerun reuses everything whose evidence is unchanged.")
    p.add_argument("sae", metavar="SAE_DIR", help="SAE folder the feature database was built for")
    p.add_argument("--llm", default="local:default", metavar="SPEC",
                   help="openai:MODEL (api.openai.com with OPENAI_API_KEY, or any OpenAI-compatible server with "
                        "--endpoint), or llama.cpp in this process: local:default (the default: the strongest "
                        "installed local model, see `monoscope models list`), local:NAME or local:PATH.gguf")
    p.add_argument("--endpoint", default=None, metavar="URL", help="OpenAI-compatible server for openai:MODEL, "
                   "e.g. http://localhost:8000/v1 (vLLM, llama.cpp)")
    p.add_argument("--features", default=str(DEFAULT_FEATURES), metavar="N|IDS",
                   help=f"a count (the N most interesting features; default {DEFAULT_FEATURES}) or ids like "
                        "3,17,42 (one id: 42,)")
    p.add_argument("--scorers", default=",".join(SCORER_NAMES),
                   help=f"comma-separated, from {','.join(ALL_SCORERS)} (default: {','.join(SCORER_NAMES)}; all = "
                        "every one; none = explanations only)")
    p.add_argument("--classify-method", default=DEFAULT_CLASSIFY_METHOD, choices=CLASSIFY_METHODS,
                   help="detection and fuzzing: 'logprob' reads P('1') from the answer's log-probabilities, one "
                        "excerpt per request (needs an endpoint that returns logprobs, which local models and OpenAI "
                        "do); 'calibrated' (default) also asks each excerpt under a content-free explanation and "
                        "scores the difference of the log-odds; 'text' parses generated 0/1 answers, several "
                        "excerpts per request")
    p.add_argument("--steer-strength", default=INTERVENTION_STRENGTH, metavar="VALUE",
                   help=f"intervention scorer: clamp value, raw or Nx = N x the feature's max activation (default "
                        f"{INTERVENTION_STRENGTH})")
    p.add_argument("--model", default=None, help="intervention scorer: the model the SAE reads (default: the one its "
                   "training store records)")
    p.add_argument("--device", default="auto", help="intervention scorer: device for the model (default auto)")
    p.add_argument("--prompt", default=None, choices=EXPLAIN_STYLES,
                   help="explainer prompt: full (20 windows with activation levels, ~1,400 tokens) or compact (10 "
                        "windows cut around the peak plus the marked tokens by frequency, ~400 tokens); default: "
                        "compact for local: models, full otherwise")
    p.add_argument("--db", default=None, help="feature database (default: the one monoscope features wrote for "
                   "SAE_DIR)")
    p.add_argument("--concurrency", type=int, default=4, help="LLM requests in flight at once (default 4)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of a local: model (default: the cores not busy now, at least half of them)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"seconds one attempt may wait for an answer (default {DEFAULT_TIMEOUT_S:g}; local models: "
                        f"this times --concurrency); after {STALL_AFTER_TIMEOUTS} timed-out attempts in a row the run "
                        "stops")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help=f"retries of a request after a timeout, dropped connection, 429 or 5xx, with backoff "
                        f"(default {DEFAULT_RETRIES}); each is reported on stderr")
    p.add_argument("--no-cache", action="store_true",
                   help="do not cache LLM answers (default: llm_cache.sqlite beside the database)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    scorers = parse_scorers(args.scorers)  # argument errors first, then the files
    if args.threads is not None and args.threads < 1:
        raise MonoscopeError(f"--threads {args.threads}: use 1 or more CPU threads (or leave it out: the cores not "
                             "busy now)")
    parse_features(args.features)
    classify = {n: {"method": args.classify_method} for n in ("detection", "fuzzing") if n in scorers}
    if "intervention" in scorers:
        from monoscope.steer.edits import parse_strength

        parse_strength(args.steer_strength, what="--steer-strength")
    # the database is written in place: its folder must be writable before an LLM starts or a request is paid
    check_output_dir(existing_db_path(args.sae, args.db).parent, "feature database folder")
    res = explain_features(args.sae, args.llm, endpoint=args.endpoint, features=args.features, scorers=args.scorers,
                           db_path=args.db, progress=not args.quiet, max_concurrency=args.concurrency,
                           cache=not args.no_cache, timeout_s=args.timeout, retries=args.retries, model=args.model,
                           device=args.device, steer_strength=args.steer_strength,
                           style=args.prompt, scorer_options=classify, n_threads=args.threads)
    print_explain_summary(res, sae_dir=args.sae, db_arg=args.db)
    check_explained(res)  # every request failed: exit non-zero with the reason
    return 0


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "—" if v is None else format(v, fmt)


def print_explain_summary(res: ExplainResult, *, sae_dir: str | None = None, db_arg: str | None = None,
                          console: Console | None = None) -> None:
    console = console or Console()
    n_new = len(res.explanations) - res.explanations_reused
    console.print(f"explained {len(res.explanations)} of {len(res.features)} features with {res.model} "
                  f"(prompts {res.prompt_version}): {n_new} new, {res.explanations_reused} unchanged evidence "
                  f"reused, {len(res.explain_failures)} failed", markup=False, soft_wrap=True)
    for f, err in list(res.explain_failures.items())[:5]:
        console.print(f"  failed #{f}: {err}", style="yellow", markup=False, soft_wrap=True)
    if any(res.scores.values()):
        t = Table(title="scores (per feature)", title_justify="left")
        for col in ("scorer", "scored", "failed", "reused", "mean", "q25", "median", "q75"):
            t.add_column(col, justify="left" if col == "scorer" else "right")
        for name, s in res.summary().items():
            t.add_row(name, str(s["n"]), str(s["failures"]), str(res.scores_reused.get(name, 0)), _num(s["mean"]),
                      _num(s["q25"]), _num(s["median"]), _num(s["q75"]))
        console.print(t)
        console.print("detection, fuzzing: balanced accuracy (0.5 = chance); simulation: Pearson r; embedding: "
                      "AUROC (0.5 = chance); specificity: mean 0-3 rating; intruder: accuracy (chance 1/(k+1), 0.2); "
                      "intervention: accuracy (0.5 = chance)", style="dim")
    for f in list(res.explanations)[:SHOW_EXPLANATIONS]:
        vals = "  ".join(f"{n} {_num(per[f].value, '.2f')}" for n, per in res.scores.items() if f in per)
        console.print(f"  #{f}  {res.explanations[f]}" + (f"   [{vals}]" if vals else ""), markup=False, soft_wrap=True)
    if len(res.explanations) > SHOW_EXPLANATIONS:
        console.print(f"  … {len(res.explanations) - SHOW_EXPLANATIONS} more in the database", style="dim")
    usage = res.usage.summary() if hasattr(res.usage, "summary") else res.usage
    if usage:
        console.print(f"LLM: {usage}", markup=False, soft_wrap=True)
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items())
    console.print(f"time: {timing}", style="dim")
    console.print(f"database: {res.db_path}", markup=False, soft_wrap=True)
    if sae_dir is not None and res.explanations:
        db = f" --db {db_arg}" if db_arg else ""
        first = next(iter(res.explanations))
        console.print(f"next: monoscope show {sae_dir} {first}{db}", markup=False, soft_wrap=True)
