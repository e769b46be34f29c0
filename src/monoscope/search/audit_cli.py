"""`monoscope audit SAE_DIR [--packs all|NAME,..] --out DIR` (registered by monoscope.cli): the concept audit of
`monoscope.search.audit`, written as report.json and a self-contained report.html."""

from __future__ import annotations

import argparse
from typing import Any

from monoscope.errors import MonoscopeError


def add_audit_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "audit", help="concept audit: candidate features per concept pack, with evidence, as an HTML/JSON report",
        description="For each concept pack (the shipped safety and benign packs, or your .jsonl): the candidate "
        "features found by contrast (AUROC on the pack), text search on its positives, label/explanation search, "
        "decoder neighbours and attribution (which features help the model predict the positives), ranked by "
        "AUROC, each with density, top contexts, label and explanation with "
        "scores, multilingual consistency where parallel text exists, and the measured steering effect of the "
        "top candidates. Writes OUT/report.html (opens offline) and OUT/report.json; rerun to resume.")
    p.add_argument("sae", metavar="SAE_DIR", help="SAE folder (its feature database must exist)")
    p.add_argument("--packs", default="all", help="all (default), or pack names / .jsonl files, comma-separated")
    p.add_argument("--out", required=True, help="output folder (report.json, report.html, packs/, steer/)")
    p.add_argument("--top", type=int, default=10, help="candidates per pack in the report (default 10)")
    p.add_argument("--steer-top", type=int, default=1,
                   help="candidates per pack whose steering effect is measured (default 1; 0 skips: CPU-expensive)")
    p.add_argument("--steer-prompts", type=int, default=4, help="neutral prompts per steering run (default 4, min 4)")
    p.add_argument("--steer-factors", default="0,4,10", help="clamp strengths x max activation (default 0,4,10)")
    p.add_argument("--steer-tokens", type=int, default=8, help="tokens generated per steered prompt (default 8)")
    p.add_argument("--attribution-texts", type=int, default=8,
                   help="positives (and as many negatives) per pack for the attribution route (default 8; each is "
                   "one forward and backward pass; 0 skips the route)")
    p.add_argument("--label-mode", default="both", choices=["both", "keyword", "semantic"],
                   help="label/explanation route: keyword (FTS5), semantic (MiniLM) or both (default)")
    p.add_argument("--db", default=None, help="feature database (default: the one monoscope features wrote)")
    p.add_argument("--model", default=None, help="model (default: the one the database records)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from monoscope.search.audit import audit, findings_lines
    from monoscope.steer.effect import parse_factors

    try:
        factors = parse_factors(args.steer_factors)
    except MonoscopeError as e:
        raise MonoscopeError(str(e).replace("--factors", "--steer-factors", 1).replace("-10,-5,0,2,5,10", "0,4,10")
                             ) from None
    res = audit(args.sae, packs=args.packs, out=args.out, db=args.db, model=args.model, device=args.device,
                compute_dtype=args.compute_dtype, top=args.top, steer_top=args.steer_top,
                steer_prompts=args.steer_prompts, steer_factors=factors, steer_tokens=args.steer_tokens,
                attribution_texts=args.attribution_texts, label_mode=args.label_mode, progress=not args.quiet)
    for line in findings_lines(res):
        print(line)
    if args.steer_top == 0:
        print("steering: skipped (--steer-top 0)")
    print(f"report: {res.out}/report.html  data: {res.out}/report.json  ({res.seconds:.0f} s)")
    return 0
