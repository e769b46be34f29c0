"""How good are the local explainers? Detection (and fuzzing) balanced accuracy of their explanations.

    python benchmarks/explain_local.py --sae /tmp/run/sae --llm local:qwen2.5-coder-0.5b --name explain_qwen05
    python benchmarks/explain_local.py --sae /tmp/run/sae --llm local:smollm2 --name explain_smollm2

Runs `explain_features` on the `--features` most interesting features (default 20) of the SAE's database
(work on a copy: explanations and scores are written into it), with the explaining model also as the scorer,
as `monoscope explain` does. `--examples N` is the scoring sample per feature: N held-out activating and N
non-activating excerpts for detection (N activating for fuzzing, half of them mis-marked), `--batch` per request.
Writes benchmarks/results/NAME.json: the model and its file, prompt style and version, sample sizes, mean and
quartiles per scorer, every feature's explanation and scores, failures, wall time, the LLM usage, the machine
and its load average before and after (the machine is shared: absolute times vary; accuracies do not depend
on load). A rerun is answered from the database and the LLM cache (the JSON then says so in `usage`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, describe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", required=True)
    ap.add_argument("--llm", default="local:default")
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--scorers", default="detection")
    ap.add_argument("--examples", type=int, default=5)
    ap.add_argument("--batch", type=int, default=5, help="excerpts per scoring request")
    ap.add_argument("--prompt", default=None, choices=["full", "compact"])
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--name", required=True)
    args = ap.parse_args()

    from monoscope.interp.explain import explain_features, parse_scorers

    scorers = parse_scorers(args.scorers)
    opts = {s: {"n_examples": args.examples, "batch_size": args.batch} for s in scorers
            if s in ("detection", "fuzzing")}
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    res = explain_features(args.sae, args.llm, features=args.features, scorers=scorers, progress=False,
                           max_concurrency=args.concurrency, timeout_s=args.timeout, scorer_options=opts,
                           style=args.prompt)
    wall = time.perf_counter() - t0
    per = {}
    for f in res.features:
        per[str(f)] = {"explanation": res.explanations.get(f), "failure": res.explain_failures.get(f),
                       **{n: (res.scores[n][f].value if f in res.scores.get(n, {}) else None) for n in scorers}}
    doc = {
        "benchmark": "explain_local",
        "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
        "sae": str(Path(args.sae).resolve()), "llm": args.llm, "model": res.model,
        "prompt_version": res.prompt_version, "features": args.features,
        "scoring_sample": {"detection": f"{args.examples} activating + {args.examples} non-activating excerpts "
                                        f"per feature, {args.batch} per request",
                           "fuzzing": f"{args.examples} activating excerpts per feature, half mis-marked"},
        "scorer_is_explainer": True, "concurrency": args.concurrency,
        "explained": len(res.explanations), "explain_failures": len(res.explain_failures),
        "summary": res.summary(), "per_feature": per,
        "wall_seconds": round(wall, 1), "stage_seconds": {k: round(v, 1) for k, v in res.seconds.items()},
        "usage": res.usage.summary() if hasattr(res.usage, "summary") else str(res.usage),
        "machine": describe(), "load_average_before": load0,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    for name, s in doc["summary"].items():
        print(f"{name}: mean {s['mean']} over {s['n'] - s['failures']} of {s['n']} features")
    print(f"explained {doc['explained']} of {args.features}; {wall:.0f} s; -> {out}")


if __name__ == "__main__":
    main()
