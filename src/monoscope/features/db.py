"""The feature database: one SQLite file per SAE that every later stage reads (DESIGN.md section 3).

    db = FeatureDB.create(path, meta)        # a new, empty database (refuses to overwrite another SAE's)
    db = FeatureDB.open(path)                # an existing one; corrupt or foreign files are one-line errors
    with db.transaction(): db.put_features(rows); db.put_examples(rows)

Tables (all keyed by feature id, 0-based index of the SAE's feature):
- `meta(key, value)`: JSON values: format, sae (path, weights sha256, arch, d_sae), model, hook,
  corpus (spec, fingerprint), tokens, criterion for "interesting", created_by.
- `features`: density, fires, max_act, mean_act (over active tokens), hist (JSON: log10-spaced bin
  edges and counts of activations), label (cheap label), label_tokens (JSON), logit_pos / logit_neg
  (JSON [[token, value], ...]), neighbours (JSON [[id, cosine], ...]), cooccur (JSON [[id, P(j|i)]]),
  map_x, map_y (the feature map), interest (the score behind "most interesting").
- `examples(feature, kind, rank, bin, act, context, position, tokens, acts)`: kind 'top' (rank 0 =
  strongest) or 'quantile' (bin 0 = weakest decile); tokens int32 and acts float16 as BLOBs over the
  example's window; position = index of the maximum inside the window.
- `splits(parent_sae, parent, child_sae, child, cosine, corr)`: feature families across widths.
- `explanations` and `scores`: filled by `monoscope explain` (issue: interpretation).
- `vocab(id, text)`: the tokenizer's tokens as text, so pages render without loading the model.
- `labels_fts`: FTS5 over labels (and explanations), for search.
Writes happen in transactions; a database is complete when meta `complete` is true.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monoscope.errors import MonoscopeError

DB_FORMAT = "monoscope-features/1"
DB_NAME = "features.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    id INTEGER PRIMARY KEY, density REAL, fires INTEGER, max_act REAL, mean_act REAL, hist TEXT,
    label TEXT, label_tokens TEXT, logit_pos TEXT, logit_neg TEXT, neighbours TEXT, cooccur TEXT,
    map_x REAL, map_y REAL, interest REAL
);
CREATE TABLE IF NOT EXISTS examples (
    feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL, bin INTEGER NOT NULL,
    act REAL NOT NULL, context INTEGER NOT NULL, position INTEGER NOT NULL, tokens BLOB NOT NULL,
    acts BLOB NOT NULL, PRIMARY KEY (feature, kind, rank)
);
CREATE TABLE IF NOT EXISTS splits (
    parent_sae TEXT NOT NULL, parent INTEGER NOT NULL, child_sae TEXT NOT NULL, child INTEGER NOT NULL,
    cosine REAL NOT NULL, corr REAL, PRIMARY KEY (parent_sae, child_sae, child)
);
CREATE INDEX IF NOT EXISTS splits_by_parent ON splits (parent_sae, parent);
CREATE TABLE IF NOT EXISTS explanations (
    feature INTEGER NOT NULL, model TEXT NOT NULL, prompt_version TEXT NOT NULL, evidence_sha256 TEXT NOT NULL,
    text TEXT NOT NULL, created_by TEXT, PRIMARY KEY (feature, model, prompt_version)
);
CREATE TABLE IF NOT EXISTS scores (
    feature INTEGER NOT NULL, model TEXT NOT NULL, scorer TEXT NOT NULL, value REAL, details TEXT,
    PRIMARY KEY (feature, model, scorer)
);
CREATE TABLE IF NOT EXISTS vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS labels_fts USING fts5(feature UNINDEXED, text);
"""

FEATURE_COLUMNS = ("id", "density", "fires", "max_act", "mean_act", "hist", "label", "label_tokens", "logit_pos",
                   "logit_neg", "neighbours", "cooccur", "map_x", "map_y", "interest")
JSON_COLUMNS = frozenset({"hist", "label_tokens", "logit_pos", "logit_neg", "neighbours", "cooccur"})


class FeatureDBError(MonoscopeError):
    """A feature database is missing, corrupt, foreign or belongs to another SAE."""


class FeatureDB:
    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    # ------------------------------------------------------------------ opening
    @classmethod
    def _connect(cls, path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), isolation_level=None)  # explicit transactions only
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    @classmethod
    def open(cls, path: str | Path, *, expect_sae_sha256: str | None = None) -> FeatureDB:
        path = Path(path)
        if path.is_dir():
            path = path / DB_NAME
        if not path.is_file():
            raise FeatureDBError(f"feature database {path} does not exist: build it with monoscope features SAE_DIR")
        try:
            conn = cls._connect(path)
            rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise FeatureDBError(f"{path} is not a readable feature database ({e}): delete it and run "
                                 "monoscope features again") from None
        fmt = json.loads(rows.get("format", "null"))
        if fmt != DB_FORMAT:
            conn.close()
            raise FeatureDBError(f"{path} is not a monoscope feature database (format {fmt!r}, expected "
                                 f"{DB_FORMAT!r}): move it away or pass another path")
        db = cls(path, conn)
        if expect_sae_sha256 is not None:
            have = (db.meta().get("sae") or {}).get("weights_sha256")
            if have != expect_sae_sha256:
                raise FeatureDBError(f"{path} was built for another SAE (weights {str(have)[:12]}, not "
                                     f"{expect_sae_sha256[:12]}): delete it or use another --out")
        return db

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any]) -> FeatureDB:
        """A new database with the schema and `meta`, built under a temporary name and renamed, so a
        kill never leaves a half-made file at `path` (an existing file must be removed first)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raise FeatureDBError(f"{path} already exists: open it, or delete it to rebuild")
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.unlink(missing_ok=True)
        conn = sqlite3.connect(str(tmp), isolation_level=None)
        conn.executescript(_SCHEMA)
        db = cls(tmp, conn)
        with db.transaction():
            db.set_meta({"format": DB_FORMAT, "complete": False, **meta})
        conn.close()
        tmp.replace(path)
        return cls.open(path)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> FeatureDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All writes inside commit together or not at all (a kill leaves the previous state)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ meta
    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def set_meta(self, values: dict[str, Any]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                              [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()])

    # ------------------------------------------------------------------ features
    def put_features(self, rows: Iterable[dict[str, Any]]) -> None:
        """Insert or replace feature rows (dicts keyed by FEATURE_COLUMNS; missing ones are NULL)."""
        cols = ", ".join(FEATURE_COLUMNS)
        marks = ", ".join("?" * len(FEATURE_COLUMNS))
        self.conn.executemany(
            f"INSERT OR REPLACE INTO features ({cols}) VALUES ({marks})",
            ([_enc(c, r.get(c)) for c in FEATURE_COLUMNS] for r in rows))

    def update_features(self, column: str, values: Iterable[tuple[int, Any]]) -> None:
        """Set one column for many features: values = (id, value) pairs."""
        if column not in FEATURE_COLUMNS or column == "id":
            raise ValueError(f"unknown feature column {column!r}")
        self.conn.executemany(f"UPDATE features SET {column} = ? WHERE id = ?",
                              ((_enc(column, v), int(i)) for i, v in values))

    def feature(self, fid: int) -> dict[str, Any] | None:
        cur = self.conn.execute(f"SELECT {', '.join(FEATURE_COLUMNS)} FROM features WHERE id = ?", (int(fid),))
        row = cur.fetchone()
        return None if row is None else {c: _dec(c, v) for c, v in zip(FEATURE_COLUMNS, row, strict=True)}

    def n_features(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def column(self, column: str) -> np.ndarray:
        """One numeric column for every feature, indexed by id (NaN where NULL)."""
        if column not in FEATURE_COLUMNS:
            raise ValueError(f"unknown feature column {column!r}")
        rows = self.conn.execute(f"SELECT id, {column} FROM features ORDER BY id").fetchall()
        out = np.full(max((r[0] for r in rows), default=-1) + 1, np.nan)
        for i, v in rows:
            if v is not None:
                out[i] = v
        return out

    # ------------------------------------------------------------------ examples
    def put_examples(self, rows: Iterable[tuple[int, str, int, int, float, int, int, np.ndarray, np.ndarray]]) -> None:
        """(feature, kind, rank, bin, act, context, position, tokens int32 [W], acts float [W]) rows."""
        self.conn.executemany(
            "INSERT OR REPLACE INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((int(f), k, int(r), int(b), float(a), int(c), int(p), np.asarray(t, dtype=np.int32).tobytes(),
              np.asarray(v, dtype=np.float16).tobytes()) for f, k, r, b, a, c, p, t, v in rows))

    def examples(self, fid: int, kind: str) -> list[dict[str, Any]]:
        cur = self.conn.execute(
            "SELECT rank, bin, act, context, position, tokens, acts FROM examples WHERE feature = ? AND kind = ? "
            "ORDER BY bin DESC, rank", (int(fid), kind))
        return [{"rank": r, "bin": b, "act": a, "context": c, "position": p,
                 "tokens": np.frombuffer(t, dtype=np.int32),
                 "acts": np.frombuffer(v, dtype=np.float16).astype(np.float32)}
                for r, b, a, c, p, t, v in cur]

    # ------------------------------------------------------------------ families
    def put_splits(self, rows: Sequence[tuple[str, int, str, int, float, float | None]]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO splits VALUES (?, ?, ?, ?, ?, ?)", rows)

    def children(self, parent_sae: str, parent: int, child_sae: str | None = None) -> list[dict[str, Any]]:
        """Features of wider SAEs that split from `parent` of `parent_sae` (best match first)."""
        q = "SELECT child_sae, child, cosine, corr FROM splits WHERE parent_sae = ? AND parent = ?"
        args: list[Any] = [parent_sae, int(parent)]
        if child_sae is not None:
            q += " AND child_sae = ?"
            args.append(child_sae)
        rows = self.conn.execute(q + " ORDER BY cosine DESC", args).fetchall()
        return [{"child_sae": s, "child": c, "cosine": cos, "corr": r} for s, c, cos, r in rows]

    def parent(self, child_sae: str, child: int) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT parent_sae, parent, cosine, corr FROM splits WHERE child_sae = ? AND child = ?",
            (child_sae, int(child))).fetchall()
        return [{"parent_sae": s, "parent": p, "cosine": cos, "corr": r} for s, p, cos, r in rows]

    # ------------------------------------------------------------------ vocabulary
    def put_vocab(self, texts: Sequence[str]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO vocab (id, text) VALUES (?, ?)", enumerate(texts))

    def vocab(self) -> list[str]:
        rows = self.conn.execute("SELECT id, text FROM vocab ORDER BY id").fetchall()
        out = [""] * (rows[-1][0] + 1 if rows else 0)
        for i, t in rows:
            out[i] = t
        return out

    # ------------------------------------------------------------------ text search
    def index_labels(self, rows: Iterable[tuple[int, str]]) -> None:
        self.conn.executemany("INSERT INTO labels_fts (feature, text) VALUES (?, ?)", rows)

    def search_labels(self, query: str, limit: int = 20) -> list[tuple[int, str]]:
        try:
            cur = self.conn.execute("SELECT feature, text FROM labels_fts WHERE labels_fts MATCH ? ORDER BY rank "
                                    "LIMIT ?", (query, limit))
            return [(int(f), t) for f, t in cur]
        except sqlite3.OperationalError as e:
            raise FeatureDBError(f"cannot search for {query!r}: {e}; quote words with special characters") from None

    # ------------------------------------------------------------------ search accessors (monoscope.search)
    def latest_explanations(self) -> dict[int, str]:
        """Per feature, the explanation written last (any explaining model), for search results."""
        rows = self.conn.execute("SELECT feature, text FROM explanations ORDER BY rowid").fetchall()
        return {int(f): str(t) for f, t in rows}

    def search_documents(self) -> list[tuple[int, str]]:
        """(feature, label and explanations joined) for every feature that has either, by id: the text
        semantic label search embeds."""
        docs: dict[int, list[str]] = {}
        for f, lab in self.conn.execute("SELECT id, label FROM features WHERE label IS NOT NULL AND label != '' "
                                        "ORDER BY id"):
            docs.setdefault(int(f), []).append(str(lab))
        for f, t in self.conn.execute("SELECT feature, text FROM explanations ORDER BY feature, rowid"):
            if t and t not in docs.setdefault(int(f), []):
                docs[int(f)].append(str(t))
        return [(f, " ; ".join(parts)) for f, parts in sorted(docs.items())]


def _enc(column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in JSON_COLUMNS:
        return json.dumps(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _dec(column: str, value: Any) -> Any:
    if value is not None and column in JSON_COLUMNS:
        return json.loads(value)
    return value
