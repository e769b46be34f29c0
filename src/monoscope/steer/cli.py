"""`monoscope steer`, `monoscope steer-eval` and `monoscope attribute` (registered by monoscope.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from monoscope.steer.edits import Edit, SteerError, parse_features, parse_strength


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", help="SAE folder (monoscope, SAELens or sparsify)")
    p.add_argument("--model", default=None, help="model (default: the one the SAE's training store records)")
    p.add_argument("--db", default=None, help="features database (default: the one beside the SAE, if built)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16"])


def add_steer_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "steer", help="generate with SAE features clamped, added, scaled or ablated, side by side with the default",
        description="Edit features at the SAE's hook during generation (KV cache on, every token steered) and "
        "print the default and the steered continuation from the same seed, with per-token log-prob differences. "
        "Strengths are raw code units or multiples of the feature's max activation (10x, from the features "
        "database); --clamp keeps the SAE error term from the clean reconstruction (the paper's intervention).")
    _common(p)
    p.add_argument("--feature", required=True, help="feature id(s), comma-separated: 12 or 12,40")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--clamp", help="set the code to this value (e.g. 10x, 25, -3x)")
    mode.add_argument("--add", help="add this value to the code (value x the decoder direction)")
    mode.add_argument("--scale", help="multiply the code by this factor")
    mode.add_argument("--ablate", action="store_true", help="set the code to 0")
    p.add_argument("--when", default=None, metavar="FEATURE:THRESHOLD",
                   help="apply the edit only where this other feature's code exceeds the threshold")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--where", default="all", choices=["all", "prompt", "generated"], help="positions to edit")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_steer)


def edits_from_args(args: argparse.Namespace) -> list[Edit]:
    feats = parse_features(args.feature)
    if args.ablate:
        mode, value = "ablate", 0.0
    else:
        mode = "clamp" if args.clamp is not None else "add" if args.add is not None else "scale"
        value = parse_strength(getattr(args, mode), what=f"--{mode}")
    when = None
    if getattr(args, "when", None):
        f, _, thr = str(args.when).partition(":")
        if not f.strip().isdigit():
            raise SteerError(f"--when {args.when!r}: pass FEATURE:THRESHOLD, e.g. 40:0.5")
        th = parse_strength(thr or "0", what="--when threshold")
        if isinstance(th, str):
            raise SteerError(f"--when {args.when!r}: the threshold is a raw activation, e.g. 40:0.5")
        when = (int(f), th)
    return [Edit(f, mode, value, when=when) for f in feats]  # type: ignore[arg-type]


def _check_numbers(args: argparse.Namespace) -> None:
    import math

    if args.max_new_tokens < 1:
        raise SteerError(f"--max-new-tokens {args.max_new_tokens}: pass at least 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise SteerError(f"--temperature {args.temperature}: pass 0 (greedy) or a positive finite number")


def cmd_steer(args: argparse.Namespace) -> int:
    from monoscope.steer.edits import resolve_edits
    from monoscope.steer.generate import side_by_side
    from monoscope.steer.target import open_target

    _check_numbers(args)
    edits = edits_from_args(args)
    t = open_target(args.sae, model=args.model, device=args.device, compute_dtype=args.compute_dtype, db=args.db)
    resolve_edits(edits, t.sae.cfg.d_sae, t.max_act)
    res = side_by_side(t, edits, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed, where=args.where)
    if args.json:
        print(json.dumps(res, ensure_ascii=False))
    else:
        print_side_by_side(res, t)
    return 0


def print_side_by_side(res: dict[str, Any], t: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(file=sys.stdout)
    def one(e: dict[str, Any]) -> str:
        v = e["value"]
        s = f"{e['mode']} #{e['feature']}"
        if e["mode"] != "ablate":
            s += f" = {v}" + (f" ({e['raw_value']:.4g})" if isinstance(v, str) else "") if isinstance(v, str) \
                else f" = {v:g}"
        if e.get("when"):
            s += f" where #{e['when']['feature']} > {e['when']['above']:g}"
        label = t.label(e["feature"])
        return s + (f" [{label}]" if label else "")

    desc = ", ".join(one(e) for e in res["edits"])
    tab = Table(title=_esc(f"{desc}; where={res['where']}, seed {res['seed']}"), show_lines=True)
    tab.add_column("default")
    tab.add_column("steered")
    tab.add_row(res["prompt"] + "[bold]" + _esc(res["default"]) + "[/]", res["prompt"] + "[bold]"
                + _esc(res["steered"]) + "[/]")
    con.print(tab)
    tok = Table(title="steered continuation: log p per token (default model vs steered model)")
    for c in ("token", "log p default", "log p steered", "Δ"):
        tok.add_column(c, justify="left" if c == "token" else "right")
    for r in res["tokens"]["steered"]:
        colour = "green" if r["delta"] > 0.5 else "red" if r["delta"] < -0.5 else ""
        d = f"{r['delta']:+.2f}"
        tok.add_row(repr(r["token"]), f"{r['logp_default']:.2f}", f"{r['logp_steered']:.2f}",
                    f"[{colour}]{d}[/]" if colour else d)
    con.print(tok)
    tot = {k: sum(r["logp_steered"] - r["logp_default"] for r in v) for k, v in res["tokens"].items()}
    con.print(f"sum of Δ log p: steered text {tot['steered']:+.2f}, default text {tot['default']:+.2f}")


def _esc(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def add_attribute_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "attribute", help="which features (at which positions) drive a next-token metric: gradient x activation",
        description="Attribute the log-prob of a target token (or a logit difference) at the prompt's last "
        "position to every SAE feature at every position, with the SAE error term as its own node "
        "(gradient x activation, or integrated gradients with --ig-steps); the top features are checked by "
        "exact ablation and the correlation between attributed and real effects is reported.")
    _common(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--target", default=None, help='one token whose log-prob is the metric, e.g. " Paris"')
    p.add_argument("--metric", default=None, help='logit-diff:" a"," b" (two tokens)')
    p.add_argument("--ig-steps", type=int, default=0, help="integrated gradients steps (0 = gradient x activation)")
    p.add_argument("--top", type=int, default=20, help="features in the table (default 20)")
    p.add_argument("--verify", type=int, default=10, help="top features checked by exact ablation (default 10)")
    p.add_argument("--out", default=None, help="write the JSON (with a circuit-tracer-style graph) to this file")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.set_defaults(func=cmd_attribute)


def cmd_attribute(args: argparse.Namespace) -> int:
    from monoscope.steer.attribute import attribute, parse_metric, to_json
    from monoscope.steer.target import open_target

    if args.top < 1 or args.verify < 0:
        raise SteerError(f"--top {args.top} / --verify {args.verify}: pass --top >= 1 and --verify >= 0")
    t = open_target(args.sae, model=args.model, device=args.device, compute_dtype=args.compute_dtype, db=args.db)
    metric = parse_metric(t.lm.tokenizer, args.target, args.metric)
    res = attribute(t, args.prompt, metric, ig_steps=args.ig_steps, verify=args.verify)
    doc = to_json(res, t, args.prompt, top=max(args.top, args.verify))
    if args.out:
        from pathlib import Path

        from monoscope.fileio import write_bytes_atomic

        write_bytes_atomic(Path(args.out), (json.dumps(doc, ensure_ascii=False) + "\n").encode())
    if args.json:
        print(json.dumps(doc, ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console(file=sys.stdout)
    exact = {c["feature"]: c["exact"] for c in doc["checked_by_ablation"]}
    tab = Table(title=_esc(f"{doc['metric']} = {doc['metric_clean']:.3f} ({doc['method']}, {doc['hook']})"))
    for c in ("#", "feature", "label", "strongest at", "act", "attribution", "exact ablation"):
        tab.add_column(c, justify="right" if c in ("#", "feature", "act", "attribution", "exact ablation") else "left")
    for i, r in enumerate(doc["top_features"][:args.top]):
        ex = exact.get(r["feature"])
        tab.add_row(str(i + 1), str(r["feature"]), _esc(r["label"][:40]), _esc(f"{r['position']} {r['token']!r}"),
                    f"{r['activation']:.2f}", f"{r['attribution']:+.4f}", "" if ex is None else f"{ex:+.4f}")
    con.print(tab)
    err = doc["sum_error_attributions"]
    con.print(f"error term (all positions): {err:+.4f}; features: {doc['sum_feature_attributions']:+.4f}; "
              f"sum {err + doc['sum_feature_attributions']:+.4f} vs metric(clean) - metric(all nodes 0) = "
              f"{doc['metric_clean'] - doc['metric_all_nodes_zero']:+.4f}")
    if doc["correlation"] is not None:
        con.print(f"correlation of attributed and exact ablation effects over the top {len(exact)} features: "
                  f"{doc['correlation']:.3f}")
    if args.out:
        con.print(f"JSON: {args.out}")
    return 0


def add_steer_eval_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "steer-eval", help="dose-response of steering one feature: concept, fluency, KL, selectivity, with controls",
        description="Steer one feature at several strengths on the shipped neutral prompts and measure the concept "
        "(the feature's activation on the steered text read by the unsteered model; log-prob of the concept "
        "text), fluency (perplexity under the unsteered model), KL on neutral text and selectivity, against a "
        "random feature of matched density and a random direction of matched norm. The factor is picked on one "
        "half of the prompts and reported on the other, with bootstrap 95%% intervals; JSON + PNG.")
    _common(p)
    p.add_argument("--feature", type=int, required=True, help="feature id")
    c = p.add_mutually_exclusive_group(required=True)
    c.add_argument("--concept", help="the concept the feature stands for, e.g. 'Python'")
    c.add_argument("--concept-file", help="file with one concept text per line")
    p.add_argument("--factors", default="-10,-5,0,2,5,10", help="strengths: multiples of the feature's max activation")
    p.add_argument("--mode", default="clamp", choices=["clamp", "add"], help="edit mode (default clamp, the paper's)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="seed of the controls and the bootstrap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--prompts", type=int, default=None,
                   help="use only the first N shipped neutral prompts (N >= 4; default all 24)")
    p.add_argument("--judge", default=None, help="LLM judge spec (openai:MODEL or local:PATH.gguf); off by default")
    p.add_argument("--judge-endpoint", default=None, help="OpenAI-compatible server for --judge openai:MODEL")
    p.add_argument("--out", default=None, help="folder for steer_eval.json and .png (default: beside the SAE)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_steer_eval)


def cmd_steer_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from monoscope.steer.effect import neutral_prompts, parse_factors, steer_eval
    from monoscope.steer.target import open_target

    factors = parse_factors(args.factors)
    if args.concept_file is not None:
        path = Path(args.concept_file)
        if not path.is_file():
            raise SteerError(f"--concept-file {path} does not exist: pass a text file with one concept per line")
        concepts = path.read_text(encoding="utf-8").splitlines()
    else:
        concepts = [args.concept]
    if args.max_new_tokens < 1 or args.bootstrap < 10:
        raise SteerError(f"--max-new-tokens {args.max_new_tokens} / --bootstrap {args.bootstrap}: pass >= 1 and >= 10")
    t = open_target(args.sae, model=args.model, device=args.device, compute_dtype=args.compute_dtype, db=args.db)
    sae_dir = Path(args.sae)
    out = Path(args.out) if args.out else (sae_dir.parent / "steer" if sae_dir.name == "sae"
                                           else sae_dir.with_name(sae_dir.name + "-steer")) / f"feature-{args.feature}"
    judge = None
    if args.judge:
        from monoscope.interp.llm import open_llm

        judge = open_llm(args.judge, endpoint=args.judge_endpoint, cache=out / "judge-cache.sqlite")
    try:
        doc = steer_eval(t, args.feature, concepts, factors, mode=args.mode, max_new_tokens=args.max_new_tokens,
                         seed=args.seed, out_dir=out, judge=judge, n_boot=args.bootstrap, progress=not args.quiet,
                         prompts=neutral_prompts()[:args.prompts] if args.prompts else None)
    finally:
        if judge is not None and hasattr(judge, "close"):
            judge.close()
    print_steer_eval(doc, out)
    return 0


def print_steer_eval(doc: dict[str, Any], out: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(file=sys.stdout, width=160)
    judged = "judge_harmonic" in doc["table"][0]
    ms = ["concept_act", "concept_logp", "ppl", "kl", "selectivity"] + (["judge_harmonic"] if judged else [])
    tab = Table(title=_esc(f"feature {doc['feature']} {doc['label']!r} ({doc['mode']}, concept "
                           f"{', '.join(doc['concepts'])[:40]!r}): report half, mean [95% CI]"))
    tab.add_column("condition")
    tab.add_column("factor", justify="right")
    for m in ms:
        tab.add_column(m, justify="right")
    un = doc["unsteered"]
    tab.add_row("unsteered", "", f"{un['concept_act']['mean']:.3g}", "", f"{un['ppl']['mean']:.3g}", "0", "",
                *([""] if judged else []))
    for r in doc["table"]:
        mark = " *" if r["condition"] == "target" and r["factor"] == doc["chosen_factor"] else ""
        tab.add_row(r["condition"], f"{r['factor']:g}{mark}",
                    *(f"{r[m]['mean']:.3g} [{r[m]['ci95'][0]:.3g}, {r[m]['ci95'][1]:.3g}]" for m in ms))
    con.print(tab)
    ctl = doc["controls"]
    con.print(f"* factor chosen on the other half ({doc['chosen_on']}); random feature {ctl['random_feature']}"
              f" (density {ctl['random_feature_density']:.2g} vs {ctl['target_density']:.2g})")
    con.print(f"{out}/steer_eval.json, {out}/steer_eval.png")
