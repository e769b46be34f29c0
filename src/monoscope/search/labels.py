"""Features by what their label or explanation says: keyword search (SQLite FTS5 over `labels_fts`) and
semantic search (all-MiniLM-L6-v2 embeddings, offline), combined by reciprocal rank fusion.

    hits = search_labels(db, "python imports", top=10)          # both, fused
    hits = search_labels(db, "python imports", mode="keyword")  # FTS5 only (no model)

Keyword search matches any word of the query as a prefix (`import*` finds "import" and "imports"), ranked
by FTS5's bm25. Semantic search embeds one document per feature (label and explanations joined) once; the
matrix is cached beside the database as `features.db.emb-<hash>.npy`, hash over the embedder and every
document, so a new explanation or label invalidates it (a read-only folder falls back to the cache dir).
Fusion: score = Σ 1 / (60 + rank) over the two rankings (Cormack et al. 2009), so a feature found by
both ranks above one found by either alone at the same rank.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from monoscope.features.db import FeatureDB
from monoscope.search.text import SearchError

RRF_K = 60
MODES = ("both", "keyword", "semantic")


class EmbedderLike(Protocol):
    name: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class LabelHit:
    feature: int
    score: float
    """Reciprocal-rank-fusion score (the single ranking's 1/(60+rank) for one mode)."""
    keyword_rank: int | None
    semantic_rank: int | None
    cosine: float | None
    """Query-document cosine in the embedding space (semantic mode)."""
    text: str
    """The feature's label and explanations, as searched."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fts_query(query: str) -> str:
    """An FTS5 expression matching any word of `query` as a prefix; plural 's' dropped ('imports' -> 'import*')."""
    words = re.findall(r"\w+", query.lower())
    if not words:
        raise SearchError(f"--query {query!r} has no words to search for: pass e.g. --query 'python imports'")
    terms = []
    for w in words:
        stem = w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
        if f'"{stem}"*' not in terms:
            terms.append(f'"{stem}"*')
    return " OR ".join(terms)


def keyword_search(db: FeatureDB, query: str, limit: int = 100) -> list[int]:
    """Feature ids whose label or explanation matches a word of `query`, best bm25 first."""
    out: list[int] = []
    for fid, _ in db.search_labels(fts_query(query), limit=limit * 4):
        if fid not in out:
            out.append(fid)
    return out[:limit]


def _emb_path(db: FeatureDB, key: str) -> Path:
    return db.path.with_name(f"{db.path.name}.emb-{key[:16]}.npy")


def document_embeddings(db: FeatureDB, embedder: EmbedderLike) -> tuple[list[int], list[str], np.ndarray]:
    """(feature ids, documents, unit-norm embeddings [n, dim]), from the cache when the documents are unchanged."""
    from monoscope.cache import cache_dir
    from monoscope.fileio import write_bytes_atomic

    docs = db.search_documents()
    ids, texts = [d[0] for d in docs], [d[1] for d in docs]
    key = hashlib.sha256(json.dumps([embedder.name, docs]).encode()).hexdigest()
    candidates = [_emb_path(db, key), cache_dir() / "search-emb" / f"{key}.npy"]
    for p in candidates:
        if p.is_file():
            try:
                emb = np.load(p)
                if emb.shape[0] == len(texts):
                    return ids, texts, emb
            except (OSError, ValueError):
                pass
    emb = embedder.encode(texts).astype(np.float32) if texts else np.zeros((0, 384), np.float32)
    buf = io.BytesIO()
    np.save(buf, emb)
    for p in candidates:  # beside the database when writable, else the cache
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(p, buf.getvalue())
            break
        except Exception:  # a read-only folder only costs the re-embedding next time
            continue
    return ids, texts, emb


def semantic_search(db: FeatureDB, query: str, embedder: EmbedderLike, limit: int = 100
                    ) -> list[tuple[int, float]]:
    """(feature, cosine) of the documents nearest to `query`, nearest first."""
    ids, _, emb = document_embeddings(db, embedder)
    if not ids:
        return []
    q = embedder.encode([query]).astype(np.float32)[0]
    cos = emb @ q
    order = np.argsort(-cos, kind="stable")[:limit]
    return [(ids[i], float(cos[i])) for i in order]


def search_labels(db: FeatureDB, query: str, *, top: int = 20, mode: str = "both",
                  embedder: EmbedderLike | None = None) -> list[LabelHit]:
    """Features whose label/explanation fits `query`: keyword, semantic, or both fused by reciprocal rank."""
    if mode not in MODES:
        raise SearchError(f"--mode {mode!r} is unknown: use one of {', '.join(MODES)}")
    if not query.strip():
        raise SearchError("--query is empty: pass words to look for, e.g. --query 'python imports'")
    if top <= 0:
        raise SearchError(f"--top {top}: pass a positive number of features to list")
    pool = max(100, 5 * top)
    kw = keyword_search(db, query, pool) if mode in ("both", "keyword") else []
    sem: list[tuple[int, float]] = []
    if mode in ("both", "semantic"):
        if embedder is None:
            from monoscope.interp.scorers import default_embedder

            embedder = default_embedder()
        sem = semantic_search(db, query, embedder, pool)
    score: dict[int, float] = {}
    kw_rank = {f: r for r, f in enumerate(kw, 1)}
    sem_rank = {f: r for r, (f, _) in enumerate(sem, 1)}
    cos = dict(sem)
    for ranks in (kw_rank, sem_rank):
        for f, r in ranks.items():
            score[f] = score.get(f, 0.0) + 1.0 / (RRF_K + r)
    order = sorted(score, key=lambda f: (-score[f], f))[:top]
    docs = dict(db.search_documents()) if order else {}
    return [LabelHit(f, round(score[f], 6), kw_rank.get(f), sem_rank.get(f), cos.get(f), docs.get(f, ""))
            for f in order]
