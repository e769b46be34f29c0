"""`monoscope search SAE_DIR ...` (registered by monoscope.cli): find features by text, label, contrast,
concept pack, neighbours or across languages.

    monoscope search runs/default/sae "import numpy as np"            # features firing on a text
    monoscope search runs/default/sae --query "python imports"         # labels and explanations
    monoscope search runs/default/sae --pos yes.txt --neg no.txt       # features separating two sets
    monoscope search runs/default/sae --pack sycophancy                # a shipped (or your) concept pack
    monoscope search runs/default/sae --neighbours 1234                # decoder-cosine neighbours
    monoscope search runs/default/sae --multilingual                   # one concept in >= 5 languages
    monoscope search runs/default/sae --attribution "The capital of France is" --target " Paris"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from monoscope.errors import MonoscopeError


def add_search_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "search", help="find features: by text, label/explanation, contrast of two text sets, pack, neighbours",
        description="Find features of an SAE. With TEXT: the features that fire on it, ranked by activation "
        "relative to each feature's maximum in the feature database, with the tokens they fire on. --query: "
        "keyword (FTS5) and semantic (MiniLM) search over labels and explanations, fused. --pos/--neg or "
        "--pack: features that separate two sets of texts (AUROC, effect size, Mann-Whitney p, BH q). "
        "--neighbours ID: nearest features by decoder cosine. --multilingual: features that fire for one "
        "concept in several languages. --attribution PROMPT --target TOKEN: features ranked by their attribution "
        "to the target token's log-prob at the prompt's last position (gradient x activation, the top ones "
        "checked by exact ablation).")
    p.add_argument("sae", metavar="SAE_DIR", help="SAE folder (its feature database must exist)")
    p.add_argument("text", nargs="?", default=None, metavar="TEXT", help="text to find the features of")
    mode = p.add_argument_group("other searches (one at a time)")
    mode.add_argument("--text-file", default=None, metavar="FILE", help="read TEXT from a file")
    mode.add_argument("--query", default=None, help="words to look for in labels and explanations")
    mode.add_argument("--mode", default="both", choices=["both", "keyword", "semantic"],
                      help="--query: keyword (FTS5), semantic (MiniLM) or both fused (default)")
    mode.add_argument("--pos", default=None, metavar="FILE", help="positive texts: .txt (one per line) or .jsonl")
    mode.add_argument("--neg", default=None, metavar="FILE", help="negative texts: .txt (one per line) or .jsonl")
    mode.add_argument("--pack", default=None, metavar="NAME|FILE",
                      help="concept pack: a shipped name (--list-packs) or a .jsonl with text,label,concept,source,"
                           "license")
    mode.add_argument("--list-packs", action="store_true", help="list the shipped concept packs and exit")
    mode.add_argument("--direction", default="pos", choices=["pos", "neg", "both"],
                      help="contrast: features firing more on the positives (default), on the negatives, or either; "
                      "--attribution: features raising the metric (default), lowering it, or either")
    mode.add_argument("--neighbours", type=int, default=None, metavar="ID", help="nearest features by decoder cosine")
    mode.add_argument("--multilingual", action="store_true",
                      help="features that fire for one concept (a country, a language, a phrase) in many languages")
    mode.add_argument("--min-languages", type=int, default=5, help="--multilingual: languages a feature must fire "
                      "in for a concept (default 5)")
    mode.add_argument("--groups", default=None, metavar="G,G",
                      help="--multilingual: only these groups of parallel concepts, from country,city,language,month,"
                      "weekday,message (default: all)")
    mode.add_argument("--attribution", default=None, metavar="PROMPT",
                      help="features that drive the model's next token on PROMPT towards --target")
    att = p.add_argument_group("--attribution")
    att.add_argument("--target", default=None, metavar="TOKEN", help='one token whose log-prob is attributed, '
                     'e.g. " Paris" (leading space included)')
    att.add_argument("--metric", default=None, help='instead of --target: logit-diff:" a"," b" (two tokens)')
    att.add_argument("--ig-steps", type=int, default=0, help="integrated gradients steps (default 0: gradient x "
                     "activation)")
    att.add_argument("--verify", type=int, default=10, help="top features checked by exact ablation (default 10)")
    p.add_argument("--top", type=int, default=20, help="features to list (default 20)")
    p.add_argument("--min-density", type=float, default=None, help="TEXT, --attribution: skip features rarer than "
                   "this")
    p.add_argument("--max-density", type=float, default=None, help="TEXT, --attribution: skip features denser than "
                   "this, e.g. 1e-2")
    p.add_argument("--evidence", type=int, default=5, help="TEXT: tokens shown per feature (default 5)")
    p.add_argument("--db", default=None, help="feature database (default: the one monoscope features wrote)")
    p.add_argument("--model", default=None, help="model (default: the one the database records)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_search)


def _modes(args: argparse.Namespace) -> list[str]:
    used = []
    if args.text is not None or args.text_file is not None:
        used.append("TEXT")
    if args.query is not None:
        used.append("--query")
    if args.pos is not None or args.neg is not None:
        used.append("--pos/--neg")
    if args.pack is not None:
        used.append("--pack")
    if args.neighbours is not None:
        used.append("--neighbours")
    if args.multilingual:
        used.append("--multilingual")
    if args.attribution is not None:
        used.append("--attribution")
    return used


def cmd_search(args: argparse.Namespace) -> int:
    if args.list_packs:
        from monoscope.search.packs import list_packs

        for info in list_packs():
            print(f"{info['name']:<16} v{info['version']}  {info['n_pos']:>4} pos {info['n_neg']:>4} neg  "
                  f"{info['concept']}")
        return 0
    used = _modes(args)
    if len(used) != 1:
        what = "nothing" if not used else " and ".join(used)
        raise MonoscopeError(f"search got {what}: give exactly one of TEXT, --text-file, --query, --pos/--neg, "
                             "--pack, --neighbours, --multilingual, --attribution")
    mode = used[0]
    if mode != "--attribution" and (args.target is not None or args.metric is not None):
        raise MonoscopeError("--target and --metric go with --attribution PROMPT: add it, or drop them")
    if mode == "--attribution" and (args.target is None) == (args.metric is None):
        raise MonoscopeError('--attribution needs exactly one of --target " token" and --metric logit-diff:" a"," b"')
    if args.groups is not None:
        if mode != "--multilingual":
            raise MonoscopeError("--groups goes with --multilingual: add it, or drop --groups")
        from monoscope.search.multilingual import parallel_concepts

        parallel_concepts(groups=_groups(args.groups))  # a bad group name fails before the model loads
    if mode == "--query":
        return _query(args)
    if mode == "--neighbours":
        return _neighbours(args)
    from monoscope.search.text import Searcher

    s = Searcher.open(args.sae, db=args.db, model=args.model, device=args.device, compute_dtype=args.compute_dtype)
    try:
        if mode == "TEXT":
            return _text(args, s)
        if mode == "--pos/--neg":
            return _contrast_files(args, s)
        if mode == "--pack":
            return _pack(args, s)
        if mode == "--attribution":
            return _attribution(args, s)
        return _multilingual(args, s)
    finally:
        s.close()


def _open_db(args: argparse.Namespace) -> Any:
    from monoscope.features.db import FeatureDB
    from monoscope.features.show import existing_db_path
    from monoscope.sae.io import weights_sha256

    if not Path(args.sae).exists():
        raise MonoscopeError(f"SAE folder {args.sae} does not exist: pass the folder monoscope train wrote")
    return FeatureDB.open(existing_db_path(args.sae, args.db), expect_sae_sha256=weights_sha256(args.sae))


def _out(args: argparse.Namespace, obj: Any) -> None:
    print(json.dumps(obj, indent=1, ensure_ascii=False))


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def _short(s: str | None, n: int = 70) -> str:
    s = (s or "").replace("\n", "⏎")
    return s if len(s) <= n else s[: n - 1] + "…"


def _text(args: argparse.Namespace, s: Any) -> int:
    text = args.text
    if args.text_file is not None:
        path = Path(args.text_file)
        if not path.is_file():
            raise MonoscopeError(f"--text-file {path} does not exist: pass a text file")
        text = path.read_text(encoding="utf-8", errors="replace")
    res = s.search_text(text, top=args.top, min_density=args.min_density, max_density=args.max_density,
                        evidence=args.evidence)
    if args.json:
        _out(args, res.to_dict())
        return 0
    print(f"{len(res.tokens)} tokens, {res.n_active:,} of {res.n_features:,} features fire"
          + (f" ({res.n_filtered:,} left out by the density filter)" if res.n_filtered else "")
          + f"; searched in {res.seconds:.3f} s")
    for note in res.notes:
        print(f"note: {note}")
    print(f"{'feature':>8} {'rel':>6} {'act':>7} {'density':>8}  label / explanation")
    for h in res.hits:
        print(f"{h.feature:>8} {_fmt(h.rel, '.2f'):>6} {h.act:>7.3g} {_fmt(h.density, '.1e'):>8}  "
              f"{_short(h.explanation or h.label)}")
        ev = "  ".join(f"{e.token!r}@{e.position}:{e.act:.3g}" for e in h.evidence)
        print(f"{'':>8} tokens: {_short(ev, 100)}")
    print(f"next: monoscope show {args.sae} FEATURE")
    return 0


def _query(args: argparse.Namespace) -> int:
    from monoscope.search.labels import search_labels

    with _open_db(args) as db:
        hits = search_labels(db, args.query, top=args.top, mode=args.mode)
    if args.json:
        _out(args, {"query": args.query, "mode": args.mode, "hits": [h.to_dict() for h in hits]})
        return 0
    if not hits:
        print(f"no label or explanation matches {args.query!r}")
        return 0
    print(f"{'feature':>8} {'score':>8} {'kw':>4} {'sem':>4} {'cos':>5}  label / explanation")
    for h in hits:
        print(f"{h.feature:>8} {h.score:>8.4f} {_fmt(h.keyword_rank, 'd'):>4} {_fmt(h.semantic_rank, 'd'):>4} "
              f"{_fmt(h.cosine, '.2f'):>5}  {_short(h.text)}")
    return 0


def _neighbours(args: argparse.Namespace) -> int:
    from monoscope.search.contrast import neighbours

    with _open_db(args) as db:
        rows = neighbours(db, args.neighbours, top=args.top)
    if args.json:
        _out(args, {"feature": args.neighbours, "neighbours": [vars(r) for r in rows]})
        return 0
    print(f"nearest features to #{args.neighbours} by decoder cosine:")
    for r in rows:
        print(f"{r.feature:>8} {r.cosine:>6.3f} {_fmt(r.density, '.1e'):>8}  {_short(r.label)}")
    return 0


def read_texts(path: str | Path, flag: str) -> tuple[list[str], list[str]]:
    """(texts, names like 'FILE line N') from a .txt (one text per non-empty line) or .jsonl ({"text": ...})."""
    p = Path(path)
    if not p.is_file():
        raise MonoscopeError(f"{flag} {p} does not exist: pass a .txt (one text per line) or .jsonl file")
    texts, names = [], []
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MonoscopeError(f"{p} line {n} is not JSON ({e.msg}): one object per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise MonoscopeError(f"{p} line {n} has no \"text\" string: write {{\"text\": \"...\"}}")
            line = obj["text"]
        texts.append(line)
        names.append(f"{p} line {n}")
    if not texts:
        raise MonoscopeError(f"{flag} {p} holds no texts: put one text per line")
    return texts, names


def _print_contrast(args: argparse.Namespace, res: Any, title: str) -> None:
    if args.json:
        _out(args, {"title": title, **res.to_dict()})
        return
    print(f"{title}: {res.n_pos} positive vs {res.n_neg} negative texts; {res.n_significant:,} of "
          f"{res.n_features:,} features separate them at BH q < {res.alpha}")
    for note in res.notes:
        print(f"warning: {note}")
    print(f"{'feature':>8} {'AUROC':>6} {'d':>6} {'q':>8} {'pos%':>5} {'neg%':>5}  label")
    for h in res.hits:
        print(f"{h.feature:>8} {h.auroc:>6.3f} {_fmt(h.effect, '.2f'):>6} {h.q:>8.2g} {100 * h.frac_pos:>5.0f} "
              f"{100 * h.frac_neg:>5.0f}  {_short(h.label, 60)}")


def _contrast_files(args: argparse.Namespace, s: Any) -> int:
    from monoscope.search.contrast import contrast

    if args.pos is None or args.neg is None:
        raise MonoscopeError("a contrast needs both --pos FILE and --neg FILE")
    pos, pn = read_texts(args.pos, "--pos")
    neg, nn = read_texts(args.neg, "--neg")
    res = contrast(s, pos, neg, pos_names=pn, neg_names=nn, top=args.top, direction=args.direction)
    _print_contrast(args, res, f"{args.pos} vs {args.neg}")
    return 0


def _pack(args: argparse.Namespace, s: Any) -> int:
    from monoscope.search.packs import contrast_pack, load_pack

    pack = load_pack(args.pack)
    res = contrast_pack(s, pack, top=args.top, direction=args.direction)
    _print_contrast(args, res, f"pack {pack.name} v{pack.version} ({pack.concept})")
    return 0


def _groups(value: str) -> tuple[str, ...]:
    groups = tuple(g.strip() for g in value.split(",") if g.strip())
    if not groups:
        raise MonoscopeError(f"--groups {value!r} names no group: use e.g. --groups city,country")
    return groups


def _multilingual(args: argparse.Namespace, s: Any) -> int:
    from monoscope.search.multilingual import multilingual_search, parallel_concepts

    concepts = parallel_concepts(groups=_groups(args.groups)) if args.groups is not None else None
    res = multilingual_search(s, concepts=concepts, min_languages=args.min_languages, top=args.top)
    if args.json:
        _out(args, res.to_dict())
        return 0
    print(f"{len(res.concepts)} concepts in {len(res.languages)} languages ({', '.join(res.languages)}); "
          f"{res.n_found} features fire for one concept in >= {res.min_languages} languages")
    for note in res.notes:
        print(f"note: {note}")
    for h in res.hits:
        chance = "" if h.chance is None else f" (by chance: {h.chance:.2f} features)"
        print(f"{h.feature:>8} {h.concept!r:<28} {h.n_languages:>2} languages{chance}, consistency "
              f"{h.consistency:.2f}  {_short(h.label, 40)}")
        print(f"{'':>8} " + "  ".join(f"{e.language}:{e.rel:.2f}" for e in h.evidence))
    return 0



def _attribution(args: argparse.Namespace, s: Any) -> int:
    from monoscope.search.attribution import search_attribution

    res = search_attribution(s, args.attribution, target=args.target, metric=args.metric, top=args.top,
                             direction=args.direction, ig_steps=args.ig_steps, verify=args.verify,
                             min_density=args.min_density, max_density=args.max_density)
    if args.json:
        _out(args, res.to_dict())
        return 0
    print(f"{res.metric} = {res.metric_clean:.3f} at the end of {args.attribution!r} ({res.method}); "
          f"{res.n_attributed:,} of {res.n_features:,} features attributed"
          + (f" ({res.n_filtered:,} left out by the density filter)" if res.n_filtered else "")
          + f"; SAE error term {res.error_attribution:+.3f}")
    for note in res.notes:
        print(f"note: {note}")
    print(f"{'feature':>8} {'attrib':>8} {'exact':>8} {'act':>7} {'density':>8}  at token  label / explanation")
    for h in res.hits:
        print(f"{h.feature:>8} {h.attribution:>+8.3f} {_fmt(h.exact, '+.3f'):>8} {h.activation:>7.3g} "
              f"{_fmt(h.density, '.1e'):>8}  {_short(repr(h.token), 10):<9} {_short(h.explanation or h.label, 50)}")
    if res.correlation is not None:
        print(f"attributed vs exact ablation effect: correlation {res.correlation:.3f}")
    print(f"next: monoscope steer {args.sae} --feature FEATURE --ablate --prompt {json.dumps(args.attribution)}")
    return 0
