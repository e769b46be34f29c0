"""How good are the local explainers? Detection (and fuzzing) balanced accuracy of their explanations.

    python benchmarks/explain_local.py --sae /tmp/run/sae --llm local:qwen2.5-coder-0.5b --name explain_qwen05
    python benchmarks/explain_local.py --sae /tmp/run/sae --llm local:smollm2 --method text --name explain_smollm2

Runs `explain_features` on the `--features` most interesting features (default 20) of the SAE's database
(work on a copy: explanations and scores are written into it), with the explaining model also as the scorer,
as `monoscope explain` does, `--chunk` features per call so the JSON is rewritten (atomically) after every
chunk: a run stopped early keeps what finished (`completed` says how many). `--examples N` is the scoring
sample per feature: N held-out activating and N non-activating excerpts for detection (N activating for
fuzzing, half of them mis-marked). `--method calibrated` (the scorers' default) and `--method logprob` ask one
excerpt per request and read P("1") from the answer's log-probabilities (calibrated: less the log-odds of the
same excerpt under a content-free explanation): the value is the balanced accuracy at the median threshold, and
the JSON adds per feature the AUROC, the accuracy at 0.5, the text answers' accuracy and, when calibrated, the
uncalibrated value and AUROC (so one calibrated run reports both); `--method text --batch B` is the old way
(B excerpts per request, a generated 0/1 array).
Writes benchmarks/results/NAME.json: the model and its file, prompt style and version, sample sizes, mean and
quartiles per scorer, every feature's explanation and scores, failures, wall time, the LLM usage, the machine
and its load average before and after (the machine is shared: absolute times vary; accuracies do not depend
on load). A rerun is answered from the database and the LLM cache (the JSON then says so in `usage`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, describe

EXTRA = ("auroc", "balanced_accuracy_at_0.5", "text_balanced_accuracy", "threshold", "method", "logprob_fallback",
         "calibration_fallback", "uncalibrated")

VALUE_MEANING = {
    "calibrated": "balanced accuracy at the median of the feature's log-odds of P('1') less those under a "
                  "content-free explanation (scorers.median_threshold_accuracy)",
    "logprob": "balanced accuracy at the median of the feature's P('1') scores (scorers.median_threshold_accuracy)",
    "text": "balanced accuracy of the generated 0/1 answers",
}


def _mean(xs: list[float | None]) -> float | None:
    got = [float(x) for x in xs if x is not None]
    return round(statistics.fmean(got), 4) if got else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", required=True)
    ap.add_argument("--llm", default="local:default")
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--scorers", default="detection")
    ap.add_argument("--examples", type=int, default=5)
    ap.add_argument("--method", default="calibrated", choices=["calibrated", "logprob", "text"])
    ap.add_argument("--batch", type=int, default=None, help="excerpts per scoring request (method text only)")
    ap.add_argument("--prompt", default=None, choices=["full", "compact"])
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--chunk", type=int, default=2, help="features per explain call (the JSON is rewritten after each)")
    ap.add_argument("--name", required=True)
    args = ap.parse_args()

    from monoscope.features.db import open_for_sae
    from monoscope.fileio import write_json_atomic
    from monoscope.interp.explain import LLM_CACHE_NAME, _select, explain_features, parse_scorers
    from monoscope.interp.llm import open_llm

    scorers = parse_scorers(args.scorers)
    size = {"batch_size": args.batch} if args.batch else {}
    opts = {s: {"n_examples": args.examples, "method": args.method, **size}
            for s in scorers if s in ("detection", "fuzzing")}
    with open_for_sae(args.sae) as db:
        fids = _select(db, args.features, db.path)
        cache = db.path.parent / LLM_CACHE_NAME
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    per: dict[str, Any] = {}
    stages: dict[str, float] = {}
    out = RESULTS / f"{args.name}.json"
    RESULTS.mkdir(exist_ok=True)
    batch = args.batch if args.method == "text" else 1
    with open_llm(args.llm, cache=cache, max_concurrency=args.concurrency, timeout_s=args.timeout) as llm:
        for i in range(0, len(fids), args.chunk):
            chunk = fids[i:i + args.chunk]
            res = explain_features(args.sae, llm, features=",".join(map(str, chunk)) + ",", scorers=scorers,
                                   progress=False, scorer_options=opts,
                                   style=args.prompt)  # None: explain_features' default for this model
            for k, v in res.seconds.items():
                stages[k] = stages.get(k, 0.0) + v
            for f in res.features:
                row: dict[str, Any] = {"explanation": res.explanations.get(f), "failure": res.explain_failures.get(f)}
                for n in scorers:
                    r = res.scores.get(n, {}).get(f)
                    row[n] = r.value if r is not None else None
                    if r is not None:
                        row[f"{n}_details"] = {k: r.details[k] for k in EXTRA if k in r.details}
                per[str(f)] = row
            summary = {}
            for n in scorers:
                vals = [per[f][n] for f in per]
                got = sorted(float(v) for v in vals if v is not None)
                s: dict[str, Any] = {"n": len(vals), "failures": len(vals) - len(got), "mean": _mean(got),
                                     "median": round(statistics.median(got), 4) if got else None}
                if n in ("detection", "fuzzing"):
                    for k in ("auroc", "balanced_accuracy_at_0.5", "text_balanced_accuracy"):
                        s[f"mean_{k}"] = _mean([per[f].get(f"{n}_details", {}).get(k) for f in per])
                    for k in ("value", "auroc"):
                        s[f"mean_uncalibrated_{k}"] = _mean([per[f].get(f"{n}_details", {}).get("uncalibrated", {})
                                                             .get(k) for f in per])
                    s["methods"] = sorted({str(per[f].get(f"{n}_details", {}).get("method")) for f in per})
                summary[n] = s
            doc = {
                "benchmark": "explain_local",
                "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
                "sae": str(Path(args.sae).resolve()), "llm": args.llm, "model": res.model,
                "prompt_version": res.prompt_version, "features": args.features, "feature_ids": fids,
                "completed": len(per),
                "scoring_sample": {"detection": f"{args.examples} activating + {args.examples} non-activating "
                                                f"excerpts per feature, {batch} per request, method {args.method}",
                                   "fuzzing": f"{args.examples} activating excerpts per feature, half mis-marked, "
                                              f"method {args.method}"},
                "value": VALUE_MEANING[args.method],
                "scorer_is_explainer": True, "concurrency": args.concurrency,
                "explained": sum(per[f]["explanation"] is not None for f in per),
                "explain_failures": sum(per[f]["failure"] is not None for f in per),
                "summary": summary, "per_feature": per,
                "wall_seconds": round(time.perf_counter() - t0, 1),
                "stage_seconds": {k: round(v, 1) for k, v in stages.items()},
                "usage": llm.usage.summary(),
                "machine": describe(), "load_average_before": load0,
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
            }
            write_json_atomic(out, doc)
            print(f"{len(per)}/{len(fids)} features, {doc['wall_seconds']:.0f} s: "
                  + "; ".join(f"{n} mean {s['mean']}" for n, s in summary.items()), flush=True)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
