"""Server time of `monoscope serve` pages on a feature database of 262,144 features.

    python benchmarks/serve_speed.py                      # -> benchmarks/results/serve_speed.json
    python benchmarks/serve_speed.py --features 262144 --dir /tmp/serve-bench --pages 300

The database is synthetic, written through the writer the features pass uses (`FeatureDB.create`,
`put_feature_rows` with packed lists, `put_packed_examples`, `put_vocab`, `index_labels`,
`put_explanations`: format 2) with the real
run's shapes: a 49,152-token vocabulary; every feature a full row (48-bin histogram, 10 promoted and 10
suppressed tokens, 10 neighbours, 10 co-occurring features, a label of vocabulary words, label evidence,
a map position); one in 8 features an explanation. Examples: the real pass stores 20 top + 10 x 5 quantile
windows of 32 tokens per feature (~20 KB a feature, ~5 GB at this width); here 1 feature in
`--examples-every` (default 16) has that full set and the others none, so the file stays ~0.4 GB and builds
in minutes on 2 cores. The timed feature pages are drawn from the features with examples, so every timed page
reads and renders a full set. The SAE folder is a stand-in (cfg.json only): pages never load weights.

Measured in-process through the ASGI app (FastAPI's TestClient: routing, validation, the database reads,
template rendering and the middleware, without a socket), after one warm-up request per page kind (the
template compile and the vocabulary load, reported separately as `first_request_ms`):
- feature page (HTML) and its JSON, over `--pages` random features with examples: p50, p95, max, as the client
  sees them and as the app's `server-timing` header reports them (`*_server`: the route's own time);
- search page by label/explanation (keyword mode), over 50 queries of label words: p50, p95, max.
Targets: feature page < 100 ms, search page < 300 ms (p95). The machine is shared with other work; its load
average is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result
from monoscope.features.db import (
    PAIRS_FEATURES,
    PAIRS_FEATURES_POSITIVE,
    PAIRS_TOKENS,
    FeatureDB,
    example_dtype,
    pack_pair_lists,
    packed_example_rows,
)

VOCAB = 49_152
WINDOW = 32
_WORDS = ("the of and to in is was for on that with as by at from his her their this which function return "
          "import class def python numpy array list dict value number time year city river music war king church "
          "school water light night money price market law court game team player film book song love death "
          "life world house car road ship plane bird dog fox cat horse tree flower color red blue green code "
          "error file data model token layer train loss paris london berlin tokyo china france germany japan "
          "science math chemistry physics biology medicine doctor patient disease virus cell protein gene")
WORDS = _WORDS.split()


def build(dest: Path, n: int, examples_every: int, seed: int = 0) -> tuple[Path, float]:
    """The run folder `dest` with a synthetic database of `n` features; returns (run folder, build seconds)."""
    rng = np.random.default_rng(seed)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "sae").mkdir(parents=True)
    (dest / "sae" / "cfg.json").write_text(json.dumps({"format": "monoscope-sae", "d_sae": n, "stand_in": True}))
    t0 = time.perf_counter()
    db = FeatureDB.create(dest / "features" / "features.db", {
        "sae": {"path": str(dest / "sae"), "d_sae": n, "arch": "topk", "k": 32, "weights_sha256": "synthetic"},
        "sae_key": f"{n}:synthetic", "model": "synthetic", "hook": "resid_post.15", "tokens": 1_000_000,
        "ctx_len": 128, "bins": 10, "top_k": 20})
    vocab = [random.Random(i).choice(WORDS) + (str(i) if i >= len(WORDS) else "") for i in range(VOCAB)]
    vocab[: len(WORDS)] = [" " + w for w in WORDS]
    edges = np.logspace(-3, 3, 49).tolist()
    with db.transaction():
        db.put_vocab(vocab, [t.encode() for t in vocab])
    block = 8192
    n_ex = 20 + 10 * 5  # 20 top + 5 per quantile bin x 10 bins, as the real pass stores
    kinds = np.array([1] * 20 + [0] * 50, np.uint8)
    ranks = np.array(list(range(20)) + list(range(5)) * 10, np.uint16)
    bins = np.array([0] * 20 + [b for b in range(10) for _ in range(5)], np.uint16)
    for s in range(0, n, block):
        ids = np.arange(s, min(s + block, n))
        m = len(ids)
        counts = np.zeros((m, 48), dtype=np.int64)
        lo = rng.integers(15, 30, m)
        for r in range(m):
            counts[r, lo[r]: lo[r] + 8] = rng.integers(0, 500, 8)
        w = rng.integers(0, len(WORDS), (m, 3))
        labels = [(int(i), f"' {WORDS[a]}' | ' {WORDS[b]}' → ' {WORDS[c]}'") for i, (a, b, c) in
                  zip(ids.tolist(), w.tolist(), strict=True)]
        infos = [json.dumps({"peak_tokens": [[int(a), 9], [int(b), 3]], "purity": 0.8}) for a, b, _ in w.tolist()]
        toks = rng.integers(0, VOCAB, (m, 20))
        nb = rng.integers(0, n, (m, 20))
        rows = list(zip(
            ids.tolist(), rng.uniform(1e-5, 1e-2, m).tolist(), counts.sum(1).tolist(), rng.uniform(1, 20, m).tolist(),
            rng.uniform(0.5, 3, m).tolist(), [json.dumps({"edges": edges, "counts": c}) for c in counts.tolist()],
            [lab for _, lab in labels], infos,
            pack_pair_lists(PAIRS_TOKENS, toks[:, :10], rng.uniform(1, 5, (m, 10))),
            pack_pair_lists(PAIRS_TOKENS, toks[:, 10:], -rng.uniform(1, 5, (m, 10))),
            pack_pair_lists(PAIRS_FEATURES, nb[:, :10], -np.sort(-rng.uniform(0, 1, (m, 10)), 1)),
            pack_pair_lists(PAIRS_FEATURES_POSITIVE, nb[:, 10:], -np.sort(-rng.uniform(0, 1, (m, 10)), 1)),
            rng.normal(size=m).tolist(), rng.normal(size=m).tolist(), rng.uniform(0, 2, m).tolist(), strict=True))
        with_ex = ids[ids % examples_every == 0]
        rec = np.zeros(len(with_ex) * n_ex, example_dtype(WINDOW, 2))
        rec["kind"], rec["rank"], rec["bin"] = np.tile(kinds, len(with_ex)), np.tile(ranks, len(with_ex)), \
            np.tile(bins, len(with_ex))
        rec["tokens"] = rng.integers(0, VOCAB, (len(rec), WINDOW))
        acts = np.where(rng.random((len(rec), WINDOW)) < 0.2, rng.uniform(0, 10, (len(rec), WINDOW)), 0)
        rec["acts"] = acts.astype(np.float16)
        rec["position"] = rec["acts"].argmax(1)
        rec["act"] = rec["acts"].max(1)
        rec["context"] = rng.integers(0, 10**6, len(rec))
        rec["ntok"] = rec["nact"] = WINDOW
        with db.transaction():
            db.put_feature_rows(rows)
            db.put_packed_examples(packed_example_rows(np.repeat(with_ex, n_ex), rec))
            db.index_labels(labels)
            expl = [(int(i), "synthetic", f"text about {random.Random(int(i)).choice(WORDS)} and "
                     f"{random.Random(int(i) + 1).choice(WORDS)}") for i in ids if i % 8 == 0]
            db.put_explanations("synthetic-llm", "1", expl, created_by="benchmark")
    with db.transaction():
        db.set_meta({"complete": True})
    db.seal()
    db.close()
    return dest, time.perf_counter() - t0


SERVER_MS: list[float] = []
"""The app's own time of each timed feature page (its `server-timing` header: the route, without the HTTP client
and ASGI plumbing around it), in the order timed."""


def timed(client: Any, url: str) -> float:
    t0 = time.perf_counter()
    r = client.get(url)
    dt = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise SystemExit(f"{url}: HTTP {r.status_code} {r.text[:200]}")
    st = r.headers.get("server-timing", "")
    if st.startswith("app;dur="):
        SERVER_MS.append(float(st[8:]))
    return dt


def summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"n": len(s), "p50_ms": round(statistics.median(s), 2), "p95_ms": round(s[int(0.95 * (len(s) - 1))], 2),
            "max_ms": round(s[-1], 2), "mean_ms": round(statistics.fmean(s), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=262_144)
    ap.add_argument("--examples-every", type=int, default=16)
    ap.add_argument("--dir", default="/tmp/monoscope-serve-bench")
    ap.add_argument("--pages", type=int, default=300)
    ap.add_argument("--reuse", action="store_true", help="reuse a database built before in --dir")
    ap.add_argument("--name", default="serve_speed")
    args = ap.parse_args()
    from fastapi.testclient import TestClient

    from monoscope.serve import create_app

    dest = Path(args.dir)
    if args.reuse and (dest / "features" / "features.db").is_file():
        build_s = None
    else:
        dest, build_s = build(dest, args.features, args.examples_every)
        print(f"built {args.features:,} features in {build_s:.0f} s", flush=True)
    size = (dest / "features" / "features.db").stat().st_size
    t0 = time.perf_counter()
    client = TestClient(create_app(dest))
    startup = (time.perf_counter() - t0) * 1000
    rng = random.Random(1)
    with_ex = list(range(0, args.features, args.examples_every))
    first = {"feature_page": timed(client, f"/sae/sae/feature/{with_ex[1]}"),
             "search_page": timed(client, "/sae/sae/search?q=python")}
    fids = rng.sample(with_ex, min(args.pages, len(with_ex)))
    SERVER_MS.clear()
    page = [timed(client, f"/sae/sae/feature/{f}") for f in fids]
    page_server = list(SERVER_MS)
    SERVER_MS.clear()
    js = [timed(client, f"/sae/sae/feature/{f}.json") for f in fids]
    js_server = list(SERVER_MS)
    no_ex = [timed(client, f"/sae/sae/feature/{f + 1}") for f in fids[:100]]
    queries = [" ".join(rng.sample(WORDS, rng.choice((1, 2)))) for _ in range(50)]
    search = [timed(client, f"/sae/sae/search?q={q.replace(' ', '+')}") for q in queries]
    res = {
        "features": args.features, "features_with_examples": len(with_ex),
        "examples_per_feature": 70, "window_tokens": WINDOW, "database_bytes": size,
        "build_seconds": None if build_s is None else round(build_s, 1),
        "app_startup_ms": round(startup, 1), "first_request_ms": {k: round(v, 1) for k, v in first.items()},
        "feature_page_html": summary(page), "feature_page_json": summary(js),
        "feature_page_html_server": summary(page_server), "feature_page_json_server": summary(js_server),
        "feature_page_html_without_examples": summary(no_ex), "search_page_keyword": summary(search),
        "targets": {"feature_page_p95_ms": 100, "search_page_p95_ms": 300},
        "met": {"feature_page": summary(page)["p95_ms"] < 100, "search_page": summary(search)["p95_ms"] < 300},
        "how": "in-process ASGI (TestClient), warm, random features with examples; see the module docstring",
    }
    path = write_result(args.name, res)
    print(json.dumps({k: res[k] for k in ("feature_page_html", "feature_page_json", "feature_page_html_server",
                                          "feature_page_json_server", "search_page_keyword", "met")},
                     indent=1))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
