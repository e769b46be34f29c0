"""The feature database: one SQLite file per SAE that every later stage reads (DESIGN.md section 3), and
the only module that speaks SQL to it: every other module goes through `FeatureDB`'s accessors.

    path = default_db_path("runs/x/sae")        # runs/x/features/features.db (one rule for every stage)
    db = FeatureDB.create(path, meta)            # a new, empty database (refuses to overwrite a file)
    db = FeatureDB.open(path, expect_sae_sha256=digest)  # an existing one, checked against the SAE
    with db.transaction(): db.put_features(rows); db.put_examples(rows)

Tables (all keyed by feature id, 0-based index of the SAE's feature):
- `meta(key, value)`: JSON values: format, complete, config_key and config (the options of the pass
  that built it), sae (path, weights sha256, arch, d_sae, k), sae_key, model, hook, corpus (spec,
  fingerprint), tokens, ctx_len, bins, top_k, row_policy, interest_criterion, created_by, families.
- `features`: density, fires, max_act, mean_act (over active tokens), hist (JSON: log10-spaced bin
  edges and counts of activations), label (cheap label), label_tokens (JSON), logit_pos / logit_neg
  ([[token, value], ...]), neighbours ([[id, cosine], ...]), cooccur ([[id, P(j|i)]]), map_x, map_y (the
  feature map), interest (the score behind "most interesting"). The four lists are JSON text, or, as the
  features pass writes them, a packed BLOB (`pack_pair_lists`: tag byte, int32 ids, float64 values; token
  texts from `vocab`); `feature()` returns the same lists either way.
- `examples(feature, n_top, n_quantile, data)`: one row per feature that has examples, keyed by the
  feature id (one indexed read serves a feature page). `data` packs all its examples: a 12-byte header
  (magic `MSEX`, record version, window width W, count n; little-endian) then n fixed-size records
  (`example_dtype(W, version)`: kind 1 = top (rank 0 = strongest) or 0 = quantile (bin 0 = weakest decile),
  rank, bin, position of the maximum inside the window, act, context, the lengths of the token and
  activation windows, tokens [W] (int32, or uint16 in record version 2, written when the vocabulary has at
  most 65,536 tokens) and acts float16 [W]; what lies past the lengths is not read). The pass writes
  one packed row per feature with array ops; `examples()` returns them one dict per example as before.
- `splits(parent_sae, parent, child_sae, child, cosine, corr)`: feature families across widths.
- `explanations(feature, model, prompt_version, evidence_sha256, text, created_by)` and
  `scores(feature, model, scorer, value, details)`: filled by `monoscope explain`.
- `vocab(id, text, bytes)`: each token as text and as the raw bytes it stands for (NULL in databases
  written before bytes were stored), so pages render without the tokenizer and windows decode
  characters split across tokens (`monoscope.features.tokens`).
- `labels_fts`: FTS5 over labels and explanations, for search.

Writes happen in transactions. `monoscope features` builds a database under another name and renames it
into place once complete, so a file at `features.db` written by it has meta `complete` = true. Any SQLite
failure (a damaged file, a locked one, a full disk) surfaces as a one-line `FeatureDBError` naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from monoscope.errors import MonoscopeError

DB_FORMAT = "monoscope-features/2"
"""/2: examples packed into one row per feature (/1: one row per example, ~10^7 rows at 262,144 features)."""
OLD_FORMATS = ("monoscope-features/1",)
"""Formats a rebuild can still read its explanations and scores from (`FeatureDB.open(allow_old=True)`)."""
DB_NAME = "features.db"
EXAMPLES_MAGIC = b"MSEX"
EXAMPLE_TOKENS = {1: "<i4", 2: "<u2"}
"""Record versions of packed examples by their token dtype: 2 (uint16) when every id fits (vocabularies up to
65,536 tokens: a third smaller), else 1 (int32)."""
_EX_HEADER = struct.Struct("<4sHHI")  # magic, record version, window width, examples

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    id INTEGER PRIMARY KEY, density REAL, fires INTEGER, max_act REAL, mean_act REAL, hist TEXT,
    label TEXT, label_tokens TEXT, logit_pos TEXT, logit_neg TEXT, neighbours TEXT, cooccur TEXT,
    map_x REAL, map_y REAL, interest REAL
);
CREATE TABLE IF NOT EXISTS examples (
    feature INTEGER PRIMARY KEY, n_top INTEGER NOT NULL, n_quantile INTEGER NOT NULL, data BLOB NOT NULL
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
CREATE TABLE IF NOT EXISTS vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL, bytes BLOB);
CREATE VIRTUAL TABLE IF NOT EXISTS labels_fts USING fts5(feature UNINDEXED, text);
"""

FEATURE_COLUMNS = ("id", "density", "fires", "max_act", "mean_act", "hist", "label", "label_tokens", "logit_pos",
                   "logit_neg", "neighbours", "cooccur", "map_x", "map_y", "interest")
JSON_COLUMNS = frozenset({"hist", "label_tokens", "logit_pos", "logit_neg", "neighbours", "cooccur"})
EXAMPLE_KINDS = {"quantile": 0, "top": 1}


def example_dtype(width: int, version: int = 1) -> np.dtype:
    """One packed example with windows of `width` tokens (int32 tokens for record version 1, uint16 for 2):
    fixed size, little-endian."""
    return np.dtype([("kind", "u1"), ("rank", "<u2"), ("bin", "<u2"), ("position", "<u2"), ("ntok", "<u2"),
                     ("nact", "<u2"), ("act", "<f8"), ("context", "<i8"), ("tokens", EXAMPLE_TOKENS[version], (width,)),
                     ("acts", "<f2", (width,))])


def packed_example_rows(feature: np.ndarray, records: np.ndarray) -> list[tuple[int, int, int, bytes]]:
    """(feature, n_top, n_quantile, data) rows of the examples table from `records` (`example_dtype`)
    sorted by `feature`: one slice of one buffer per feature, no per-example Python."""
    if len(feature) == 0:
        return []
    width = records.dtype["tokens"].shape[0]
    version = 2 if records.dtype["tokens"].base == np.dtype("<u2") else 1
    size = records.dtype.itemsize
    starts = np.flatnonzero(np.concatenate([[True], feature[1:] != feature[:-1]]))
    ends = np.append(starts[1:], len(feature))
    tops = np.add.reduceat(records["kind"].astype(np.int64), starts)
    buf = memoryview(np.ascontiguousarray(records).view(np.uint8))
    hdr = _EX_HEADER.pack
    return [(f, t, (b - a) - t, hdr(EXAMPLES_MAGIC, version, width, b - a) + buf[a * size: b * size])
            for f, t, a, b in zip(feature[starts].tolist(), tops.tolist(), starts.tolist(), ends.tolist(),
                                  strict=True)]


def unpack_examples(data: bytes) -> np.ndarray:
    """The records of one packed examples row (`example_dtype`); ValueError for a foreign blob."""
    if len(data) < _EX_HEADER.size:
        raise ValueError("packed examples shorter than their header")
    magic, version, width, n = _EX_HEADER.unpack_from(data)
    if magic != EXAMPLES_MAGIC or version not in EXAMPLE_TOKENS:
        raise ValueError(f"packed examples of unknown format ({magic!r}, version {version})")
    dt = example_dtype(width, version)
    if len(data) != _EX_HEADER.size + n * dt.itemsize:
        raise ValueError(f"packed examples hold {len(data)} bytes, expected {_EX_HEADER.size + n * dt.itemsize}")
    return np.frombuffer(data, dtype=dt, count=n, offset=_EX_HEADER.size)


def _example_dicts(rec: np.ndarray, kind: str) -> list[dict[str, Any]]:
    """The examples of one kind, as `FeatureDB.examples` returns them (ordered bin descending, then rank)."""
    rec = rec[rec["kind"] == EXAMPLE_KINDS[kind]]
    rec = rec[np.lexsort((rec["rank"], -rec["bin"].astype(np.int64)))]
    return [{"rank": int(r["rank"]), "bin": int(r["bin"]), "act": float(r["act"]), "context": int(r["context"]),
             "position": int(r["position"]), "tokens": r["tokens"][: r["ntok"]].astype(np.int32),
             "acts": r["acts"][: r["nact"]].astype(np.float32)} for r in rec]


class FeatureDBError(MonoscopeError):
    """A feature database is missing, corrupt, foreign or belongs to another SAE."""


# ---------------------------------------------------------------------------------------------- paths
def default_db_path(sae_dir: str | Path) -> Path:
    """Where `monoscope features` writes (and `show` and `explain` read) the database of `sae_dir`:
    `<run>/sae` -> `<run>/features/features.db`, any other folder -> `<sae_dir>-features/features.db`
    (the layout rule lives in `monoscope.runfolder`)."""
    from monoscope.runfolder import features_dir_for

    return features_dir_for(sae_dir) / DB_NAME


def existing_db_path(sae_dir: str | Path, db_path: str | Path | None = None) -> Path:
    """The feature database of `sae_dir` (or `db_path`, a file or its folder); a one-line error naming the
    command that builds it when there is none."""
    path = Path(db_path) if db_path is not None else default_db_path(sae_dir)
    if path.is_dir():
        path = path / DB_NAME
    if not path.is_file():
        how = "" if db_path is None else " (or fix --db)"
        raise FeatureDBError(f"no feature database at {path}: build it with monoscope features {sae_dir}{how}")
    return path


def sae_digest(sae_dir: str | Path) -> str | None:
    """The weights digest a feature database records for the SAE folder `sae_dir` (meta sae.weights_sha256):
    cfg.json's sha256 for a monoscope SAE, the tensor key for a peer's folder (loaded); None when the folder
    does not exist."""
    from monoscope.sae.io import weights_sha256

    folder = Path(sae_dir)
    if not folder.is_dir():
        return None
    digest = weights_sha256(folder)
    if digest is None:
        from monoscope.features.families import sae_key

        digest = sae_key(folder)
    return digest


def open_for_sae(sae_dir: str | Path, db_path: str | Path | None = None) -> FeatureDB:
    """The feature database of `sae_dir` (or `db_path`), checked to be built for that SAE's weights when the
    folder exists (a database alone, its SAE elsewhere, is still readable): what `show` and `explain` open."""
    path = existing_db_path(sae_dir, db_path)
    return FeatureDB.open(path, expect_sae_sha256=sae_digest(sae_dir), sae_dir=sae_dir)


def sqlite_error(path: Path, e: sqlite3.Error) -> FeatureDBError:
    """A one-line error for an SQLite failure on `path`, with what to do about it."""
    msg = str(e)
    if "locked" in msg or "busy" in msg:
        return FeatureDBError(f"feature database {path} is locked by another process ({msg}): wait for it to finish "
                              "and run the command again")
    if "full" in msg:
        return FeatureDBError(f"disk full while writing {path} ({msg}): free some space in {path.parent} and run "
                              "the command again")
    return FeatureDBError(f"feature database {path} is damaged ({msg}): rebuild it with monoscope features "
                          "SAE_DIR --overwrite (explanations whose evidence is unchanged are kept when the old file "
                          "is still readable), or move it away")


_F = TypeVar("_F", bound=Callable[..., Any])


def _guarded(fn: _F) -> _F:
    """Turn any SQLite failure inside a FeatureDB method into a one-line FeatureDBError naming the file."""
    @functools.wraps(fn)
    def wrapper(self: FeatureDB, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise sqlite_error(self.path, e) from None
    return wrapper  # type: ignore[return-value]


def _missing_table(e: sqlite3.Error) -> bool:
    return isinstance(e, sqlite3.OperationalError) and "no such" in str(e)


# ---------------------------------------------------------------------------------------------- the database
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
    def open(cls, path: str | Path, *, expect_sae_sha256: str | None = None,
             sae_dir: str | Path | None = None, allow_old: bool = False) -> FeatureDB:
        """An existing database. `expect_sae_sha256`: the weights digest of the SAE (folder `sae_dir`) the caller
        reads it for; a database built for other weights is a one-line error naming the command that rebuilds it.
        A database of an older format (OLD_FORMATS) is a one-line error naming the rebuild, unless `allow_old`
        (a rebuild reads its meta, explanations and scores to carry them over; nothing else is read)."""
        path = Path(path)
        if path.is_dir():
            path = path / DB_NAME
        if not path.is_file():
            raise FeatureDBError(f"feature database {path} does not exist: build it with monoscope features SAE_DIR")
        conn = None
        try:
            conn = cls._connect(path)
            rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            fmt = json.loads(rows.get("format", "null"))
        except (sqlite3.Error, ValueError) as e:
            if conn is not None:
                conn.close()
            if isinstance(e, sqlite3.Error) and ("locked" in str(e) or "busy" in str(e)):
                raise sqlite_error(path, e) from None
            raise FeatureDBError(f"{path} is not a readable feature database ({e}): rebuild it with monoscope "
                                 "features SAE_DIR --overwrite, or move it away") from None
        if fmt in OLD_FORMATS and not allow_old:
            conn.close()
            raise FeatureDBError(f"{path} is a feature database of an older format ({fmt}; this monoscope reads "
                                 f"{DB_FORMAT}): rebuild it with monoscope features {sae_dir or 'SAE_DIR'} --overwrite "
                                 "(explanations and scores whose evidence is unchanged are kept)")
        if fmt != DB_FORMAT and not (allow_old and fmt in OLD_FORMATS):
            conn.close()
            raise FeatureDBError(f"{path} is not a monoscope feature database (format {fmt!r}, expected "
                                 f"{DB_FORMAT!r}): move it away or pass another path")
        db = cls(path, conn)
        if expect_sae_sha256 is not None:
            meta = db.meta()
            sae = meta.get("sae") if isinstance(meta.get("sae"), dict) else {}
            have = sae.get("weights_sha256")
            if have != expect_sae_sha256:
                db.close()
                where = sae.get("path") or "another SAE"
                raise FeatureDBError(f"{path} was built for other SAE weights ({where}, weights {str(have)[:12]}; "
                                     f"{sae_dir or 'this SAE'}: {expect_sae_sha256[:12]}): rebuild it with "
                                     f"monoscope features {sae_dir or 'SAE_DIR'} --overwrite")
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
        try:
            conn = sqlite3.connect(str(tmp), isolation_level=None)
            conn.executescript(_SCHEMA)
            db = cls(tmp, conn)
            with db.transaction():
                db.set_meta({"format": DB_FORMAT, "complete": False, **meta})
            conn.close()
        except sqlite3.Error as e:
            tmp.unlink(missing_ok=True)
            raise sqlite_error(path, e) from None
        tmp.replace(path)
        return cls.open(path)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> FeatureDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All writes inside commit together or not at all (a kill leaves the previous state)."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise sqlite_error(self.path, e) from None
        try:
            yield self.conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise sqlite_error(self.path, e) from None

    @contextlib.contextmanager
    def bulk_load(self) -> Iterator[sqlite3.Connection]:
        """One transaction for writing a new database in bulk: the rollback journal in memory and no syncs
        (a fresh file's pages are appended, so there is little to journal; the write-ahead log would write
        every page twice). Only for a database no one else has open, that a kill makes the caller rebuild
        (the features pass writes `.new-features.db`, removed and rewritten when its stage reruns)."""
        try:
            self.conn.execute("PRAGMA journal_mode=MEMORY")
            self.conn.execute("PRAGMA synchronous=OFF")
        except sqlite3.Error as e:
            raise sqlite_error(self.path, e) from None
        with self.transaction() as conn:
            yield conn
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as e:
            raise sqlite_error(self.path, e) from None

    @_guarded
    def check(self) -> None:
        """Read every page (SQLite's quick_check): a damaged file is a one-line FeatureDBError."""
        bad = [ln for r in self.conn.execute("PRAGMA quick_check").fetchall() if r[0] != "ok"
               for ln in str(r[0]).splitlines() if ln.strip()]
        if bad:
            more = f" and {len(bad) - 1} more problems" if len(bad) > 1 else ""
            raise sqlite_error(self.path, sqlite3.DatabaseError(f"integrity check: {bad[0]}{more}"))

    @_guarded
    def seal(self) -> None:
        """Fold the write-ahead log into the file, so the file alone holds everything (it can be renamed or
        copied without its -wal and -shm companions); a reader holding the log open is a one-line error."""
        busy, _, _ = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise sqlite_error(self.path, sqlite3.OperationalError("database is locked (checkpoint)"))

    # ------------------------------------------------------------------ meta
    @_guarded
    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta").fetchall()}

    @_guarded
    def set_meta(self, values: dict[str, Any]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                              [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()])

    # ------------------------------------------------------------------ features
    @_guarded
    def put_features(self, rows: Iterable[dict[str, Any]]) -> None:
        """Insert or replace feature rows (dicts keyed by FEATURE_COLUMNS; missing ones are NULL)."""
        cols = ", ".join(FEATURE_COLUMNS)
        marks = ", ".join("?" * len(FEATURE_COLUMNS))
        self.conn.executemany(
            f"INSERT OR REPLACE INTO features ({cols}) VALUES ({marks})",
            ([_enc(c, r.get(c)) for c in FEATURE_COLUMNS] for r in rows))

    @_guarded
    def update_features(self, column: str, values: Iterable[tuple[int, Any]]) -> None:
        """Set one column for many features: values = (id, value) pairs."""
        if column not in FEATURE_COLUMNS or column == "id":
            raise ValueError(f"unknown feature column {column!r}")
        self.conn.executemany(f"UPDATE features SET {column} = ? WHERE id = ?",
                              ((_enc(column, v), int(i)) for i, v in values))

    @_guarded
    def feature(self, fid: int) -> dict[str, Any] | None:
        cur = self.conn.execute(f"SELECT {', '.join(FEATURE_COLUMNS)} FROM features WHERE id = ?", (int(fid),))
        row = cur.fetchone()
        if row is None:
            return None
        out = {c: _dec(c, v) for c, v in zip(FEATURE_COLUMNS, row, strict=True)}
        tokens = {c: v for c, v in out.items() if isinstance(v, _TokenPairs)}
        if tokens:  # packed [[token id, value]]: the ids' texts, in one indexed read
            ids = sorted({i for v in tokens.values() for i in v.ids})
            marks = ",".join("?" * len(ids))
            text = dict(self.conn.execute(f"SELECT id, text FROM vocab WHERE id IN ({marks})", ids).fetchall())
            for c, v in tokens.items():
                out[c] = [[text.get(i, f"<{i}>"), x] for i, x in zip(v.ids, v.values, strict=True)]
        return out

    @_guarded
    def n_features(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    @_guarded
    def feature_ids(self, ids: Sequence[int]) -> set[int]:
        """Those of `ids` that have a row."""
        out: set[int] = set()
        ids = [int(i) for i in ids]
        for s in range(0, len(ids), 500):
            part = ids[s: s + 500]
            out |= {int(r[0]) for r in self.conn.execute(
                f"SELECT id FROM features WHERE id IN ({','.join('?' * len(part))})", part).fetchall()}
        return out

    @_guarded
    def most_interesting(self, n: int, *, with_examples: bool = False) -> list[dict[str, Any]]:
        """The `n` features that fired, by interest, then max_act, then id: [{id, label, interest, density}].
        with_examples: only features that have examples (any interest); else only interest > 0."""
        where = ("max_act > 0 AND EXISTS (SELECT 1 FROM examples e WHERE e.feature = f.id)" if with_examples
                 else "interest > 0")
        rows = self.conn.execute(f"SELECT id, label, interest, density FROM features f WHERE {where} "
                                 "ORDER BY interest DESC, max_act DESC, id LIMIT ?", (int(n),)).fetchall()
        return [{"id": int(i), "label": lab, "interest": it, "density": d} for i, lab, it, d in rows]

    @_guarded
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

    @_guarded
    def briefs(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """{id: {label, density, max_act}} of those of `ids` that have a row, in one query per 500 ids: what a
        page needs to name the features it links to (neighbours, co-occurring features, search hits)."""
        out: dict[int, dict[str, Any]] = {}
        ids = [int(i) for i in ids]
        for s in range(0, len(ids), 500):
            part = ids[s: s + 500]
            for i, lab, d, m in self.conn.execute(
                    f"SELECT id, label, density, max_act FROM features WHERE id IN ({','.join('?' * len(part))})",
                    part).fetchall():
                out[int(i)] = {"label": lab, "density": d, "max_act": m}
        return out

    @_guarded
    def map_points(self, *, placed_only: bool = True) -> list[tuple[int, Any, Any, str | None, float | None, Any]]:
        """(id, map_x, map_y, label, density, label_tokens decoded) of every feature placed on the map (or of
        every feature, positions possibly None, with placed_only=False), by id: what an interactive map draws
        and names its regions by."""
        where = "WHERE map_x IS NOT NULL AND map_y IS NOT NULL " if placed_only else ""
        rows = self.conn.execute("SELECT id, map_x, map_y, label, density, label_tokens FROM features "
                                 f"{where}ORDER BY id").fetchall()
        return [(int(i), x, y, lab, d, _dec("label_tokens", lt)) for i, x, y, lab, d, lt in rows]

    @_guarded
    def cooccurrence(self) -> list[tuple[int, list[list[float]]]]:
        """(id, [[j, P(j fires | id fires)], ...]) of every feature with co-occurrence data, by id: the graph a
        co-activation map is laid out from."""
        rows = self.conn.execute("SELECT id, cooccur FROM features WHERE cooccur IS NOT NULL ORDER BY id").fetchall()
        pairs = ((int(i), _dec("cooccur", c)) for i, c in rows)  # packed BLOBs (format 2) decode like JSON lists
        return [(i, [list(p) for p in ps]) for i, ps in pairs if ps]

    # ------------------------------------------------------------------ examples
    @_guarded
    def put_examples(self, rows: Iterable[tuple[int, str, int, int, float, int, int, np.ndarray, np.ndarray]]) -> None:
        """(feature, kind, rank, bin, act, context, position, tokens int32 [W], acts float [W]) rows, each
        replacing the feature's example of the same kind and rank (the features pass writes whole features
        with `put_packed_examples`)."""
        by_feature: dict[int, list[tuple[Any, ...]]] = {}
        for f, k, r, b, a, c, p, t, v in rows:
            if k not in EXAMPLE_KINDS:
                raise ValueError(f"unknown example kind {k!r}")
            by_feature.setdefault(int(f), []).append((k, int(r), int(b), float(a), int(c), int(p),
                                                      np.asarray(t, dtype=np.int32), np.asarray(v, dtype=np.float16)))
        out = []
        for f, new in sorted(by_feature.items()):
            have: dict[tuple[str, int], tuple[Any, ...]] = {}
            for kind in EXAMPLE_KINDS:
                for e in self.examples(f, kind):
                    have[(kind, e["rank"])] = (kind, e["rank"], e["bin"], e["act"], e["context"], e["position"],
                                               e["tokens"], e["acts"].astype(np.float16))
            have.update({(e[0], e[1]): e for e in new})
            ex = [have[k] for k in sorted(have, key=lambda k: (EXAMPLE_KINDS[k[0]], k[1]))]
            width = max([len(e[6]) for e in ex] + [len(e[7]) for e in ex] + [1])
            rec = np.zeros(len(ex), example_dtype(width))
            for i, (k, r, b, a, c, p, t, v) in enumerate(ex):
                rec[i]["kind"], rec[i]["rank"], rec[i]["bin"], rec[i]["act"] = EXAMPLE_KINDS[k], r, b, a
                rec[i]["context"], rec[i]["position"], rec[i]["ntok"], rec[i]["nact"] = c, p, len(t), len(v)
                rec[i]["tokens"][: len(t)], rec[i]["acts"][: len(v)] = t, v
            out += packed_example_rows(np.full(len(ex), f), rec)
        self.put_packed_examples(out)

    @_guarded
    def put_packed_examples(self, rows: Iterable[tuple[int, int, int, bytes]]) -> None:
        """Insert or replace (feature, n_top, n_quantile, data) rows, as `packed_example_rows` makes them."""
        self.conn.executemany("INSERT OR REPLACE INTO examples (feature, n_top, n_quantile, data) VALUES (?, ?, ?, ?)",
                              rows)

    @_guarded
    def packed_examples(self, fid: int) -> np.ndarray | None:
        """Every example of `fid` as records of `example_dtype` (one indexed read); None when it has none."""
        row = self.conn.execute("SELECT data FROM examples WHERE feature = ?", (int(fid),)).fetchone()
        if row is None:
            return None
        try:
            return unpack_examples(row[0])
        except ValueError as e:
            raise sqlite_error(self.path, sqlite3.DatabaseError(f"examples of feature {fid}: {e}")) from None

    def examples(self, fid: int, kind: str) -> list[dict[str, Any]]:
        """The `kind` ('top' or 'quantile') examples of `fid`, ordered bin descending then rank: dicts of
        rank, bin, act, context, position, tokens (int32 [<= W]) and acts (float32, same length)."""
        if kind not in EXAMPLE_KINDS:
            raise ValueError(f"unknown example kind {kind!r}")
        rec = self.packed_examples(fid)
        return [] if rec is None else _example_dicts(rec, kind)

    @_guarded
    def features_with_examples(self) -> list[int]:
        return [int(r[0]) for r in self.conn.execute("SELECT feature FROM examples ORDER BY feature")]

    @_guarded
    def n_examples(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(SUM(n_top + n_quantile), 0) FROM examples").fetchone()[0])

    # ------------------------------------------------------------------ families
    @_guarded
    def put_splits(self, rows: Sequence[tuple[str, int, str, int, float, float | None]]) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO splits VALUES (?, ?, ?, ?, ?, ?)", rows)

    @_guarded
    def delete_splits(self, parent_sae: str, child_sae: str) -> None:
        self.conn.execute("DELETE FROM splits WHERE parent_sae = ? AND child_sae = ?", (parent_sae, child_sae))

    @_guarded
    def splits(self, parent_sae: str, child_sae: str) -> list[tuple[int, int, float, float | None]]:
        """(parent, child, cosine, corr) of one pair of SAEs, by parent, best cosine first."""
        return [(int(p), int(c), float(cos), r) for p, c, cos, r in self.conn.execute(
            "SELECT parent, child, cosine, corr FROM splits WHERE parent_sae = ? AND child_sae = ? "
            "ORDER BY parent, cosine DESC", (parent_sae, child_sae)).fetchall()]

    @_guarded
    def children(self, parent_sae: str, parent: int, child_sae: str | None = None) -> list[dict[str, Any]]:
        """Features of wider SAEs that split from `parent` of `parent_sae` (best match first)."""
        q = "SELECT child_sae, child, cosine, corr FROM splits WHERE parent_sae = ? AND parent = ?"
        args: list[Any] = [parent_sae, int(parent)]
        if child_sae is not None:
            q += " AND child_sae = ?"
            args.append(child_sae)
        rows = self.conn.execute(q + " ORDER BY cosine DESC", args).fetchall()
        return [{"child_sae": s, "child": c, "cosine": cos, "corr": r} for s, c, cos, r in rows]

    @_guarded
    def parent(self, child_sae: str, child: int) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT parent_sae, parent, cosine, corr FROM splits WHERE child_sae = ? AND child = ?",
            (child_sae, int(child))).fetchall()
        return [{"parent_sae": s, "parent": p, "cosine": cos, "corr": r} for s, p, cos, r in rows]

    # ------------------------------------------------------------------ vocabulary
    @_guarded
    def put_vocab(self, texts: Sequence[str], token_bytes: Sequence[bytes] | None = None) -> None:
        """Every token's text (and, when given, the bytes it stands for), by id."""
        if token_bytes is not None and len(token_bytes) != len(texts):
            raise ValueError(f"{len(texts)} token texts but {len(token_bytes)} token byte strings")
        self.conn.executemany("INSERT OR REPLACE INTO vocab (id, text, bytes) VALUES (?, ?, ?)",
                              ((i, t, None if token_bytes is None else bytes(token_bytes[i]))
                               for i, t in enumerate(texts)))

    @_guarded
    def vocab(self) -> list[str]:
        rows = self.conn.execute("SELECT id, text FROM vocab ORDER BY id").fetchall()
        out = [""] * (rows[-1][0] + 1 if rows else 0)
        for i, t in rows:
            out[i] = t
        return out

    @_guarded
    def vocab_bytes(self) -> list[bytes] | None:
        """Every token's bytes by id; None for a database written before they were stored."""
        try:
            rows = self.conn.execute("SELECT id, bytes FROM vocab ORDER BY id").fetchall()
        except sqlite3.OperationalError as e:
            if _missing_table(e):
                return None
            raise
        if not rows or any(b is None for _, b in rows):
            return None
        out = [b""] * (rows[-1][0] + 1)
        for i, b in rows:
            out[i] = bytes(b)
        return out

    # ------------------------------------------------------------------ explanations and scores
    @_guarded
    def explanation(self, fid: int, model: str, prompt_version: str) -> tuple[str, str] | None:
        """(evidence_sha256, text) of the explanation of `fid` by `model` with `prompt_version`."""
        row = self.conn.execute("SELECT evidence_sha256, text FROM explanations WHERE feature = ? AND model = ? AND "
                                "prompt_version = ?", (int(fid), model, prompt_version)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    @_guarded
    def latest_explanation(self, fid: int) -> dict[str, Any] | None:
        """The most recently written explanation of `fid` ({model, prompt_version, text}); None when there is
        none or the database predates the table."""
        try:
            row = self.conn.execute("SELECT model, prompt_version, text FROM explanations WHERE feature = ? "
                                    "ORDER BY rowid DESC LIMIT 1", (int(fid),)).fetchone()
        except sqlite3.OperationalError as e:
            if _missing_table(e):
                return None
            raise
        return None if row is None else {"model": row[0], "prompt_version": row[1], "text": row[2]}

    @_guarded
    def put_explanations(self, model: str, prompt_version: str, rows: Sequence[tuple[int, str, str]],
                         created_by: str) -> None:
        """Store (feature, evidence_sha256, text) explanations, replacing earlier ones of the same model and
        prompt version, and index them for search (an old explanation's index entry goes, a label of equal
        text stays). Call inside a transaction."""
        for f, sha, text in rows:
            old = self.explanation(f, model, prompt_version)
            if old is not None:
                self.conn.execute("DELETE FROM labels_fts WHERE rowid = (SELECT rowid FROM labels_fts WHERE "
                                  "feature = ? AND text = ? ORDER BY rowid DESC LIMIT 1)", (int(f), old[1]))
            self.conn.execute("INSERT OR REPLACE INTO explanations (feature, model, prompt_version, evidence_sha256, "
                              "text, created_by) VALUES (?, ?, ?, ?, ?, ?)",
                              (int(f), model, prompt_version, sha, text, created_by))
        self.index_labels([(int(f), text) for f, _, text in rows])

    @_guarded
    def score(self, fid: int, model: str, scorer: str) -> tuple[float | None, str | None] | None:
        """(value, details JSON) of one stored score."""
        row = self.conn.execute("SELECT value, details FROM scores WHERE feature = ? AND model = ? AND scorer = ?",
                                (int(fid), model, scorer)).fetchone()
        return None if row is None else (row[0], row[1])

    @_guarded
    def scores(self, fid: int) -> list[tuple[str, str, float | None]]:
        """(model, scorer, value) of every score of `fid`; [] for a database that predates the table."""
        try:
            rows = self.conn.execute("SELECT model, scorer, value FROM scores WHERE feature = ? ORDER BY scorer, "
                                     "model", (int(fid),)).fetchall()
        except sqlite3.OperationalError as e:
            if _missing_table(e):
                return []
            raise
        return [(str(m), str(s), v) for m, s, v in rows]

    @_guarded
    def put_scores(self, rows: Iterable[tuple[int, str, str, float | None, str | None]]) -> None:
        """Insert or replace (feature, model, scorer, value, details JSON) scores."""
        self.conn.executemany("INSERT OR REPLACE INTO scores (feature, model, scorer, value, details) "
                              "VALUES (?, ?, ?, ?, ?)", ((int(f), m, s, v, d) for f, m, s, v, d in rows))

    @_guarded
    def all_explanations(self) -> list[tuple[int, str, str, str, str, str | None]]:
        """Every (feature, model, prompt_version, evidence_sha256, text, created_by), in insertion order."""
        return [tuple(r) for r in self.conn.execute(  # type: ignore[misc]
            "SELECT feature, model, prompt_version, evidence_sha256, text, created_by FROM explanations "
            "ORDER BY rowid").fetchall()]

    @_guarded
    def all_scores(self) -> list[tuple[int, str, str, float | None, str | None]]:
        """Every (feature, model, scorer, value, details)."""
        return [tuple(r) for r in self.conn.execute(  # type: ignore[misc]
            "SELECT feature, model, scorer, value, details FROM scores ORDER BY rowid").fetchall()]

    @_guarded
    def n_explanations(self) -> tuple[int, int]:
        """(explanations, scores) stored."""
        return (int(self.conn.execute("SELECT COUNT(*) FROM explanations").fetchone()[0]),
                int(self.conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0]))

    # ------------------------------------------------------------------ text search
    @_guarded
    def index_labels(self, rows: Iterable[tuple[int, str]]) -> None:
        self.conn.executemany("INSERT INTO labels_fts (feature, text) VALUES (?, ?)", rows)

    @_guarded
    def search_labels(self, query: str, limit: int = 20) -> list[tuple[int, str]]:
        try:
            cur = self.conn.execute("SELECT feature, text FROM labels_fts WHERE labels_fts MATCH ? ORDER BY rank "
                                    "LIMIT ?", (query, limit))
            return [(int(f), t) for f, t in cur.fetchall()]
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise
            raise FeatureDBError(f"cannot search for {query!r}: {e}; quote words with special characters") from None

    # ------------------------------------------------------------------ bulk writes (the features pass)
    def put_feature_rows(self, rows: Iterable[Sequence[Any]]) -> None:
        """Insert or replace feature rows given as tuples in FEATURE_COLUMNS order, JSON columns already
        encoded as strings: the features pass builds them column-wise for 10^5-10^6 features."""
        cols = ", ".join(FEATURE_COLUMNS)
        marks = ", ".join("?" * len(FEATURE_COLUMNS))
        self.conn.executemany(f"INSERT OR REPLACE INTO features ({cols}) VALUES ({marks})", rows)

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
        if isinstance(value, bytes):
            return _unpack_pairs(value)
        return json.loads(value)
    return value


PAIRS_TOKENS, PAIRS_FEATURES, PAIRS_FEATURES_POSITIVE = 1, 2, 3
"""Tags of a packed pair list (`pack_pair_lists`): [[token text, value]] (texts from the vocab table),
[[feature id, value]], and the latter keeping only the pairs with id >= 0 and value > 0 (co-occurrence)."""


class _TokenPairs:
    """A packed [[token id, value]] list before its texts are looked up."""

    def __init__(self, ids: list[int], values: list[float]) -> None:
        self.ids, self.values = ids, values


def pack_pair_lists(tag: int, ids: np.ndarray, values: np.ndarray) -> list[bytes]:
    """Row i of `ids` [F, n] and `values` [F, n] as one BLOB: a tag byte, n int32 ids, n float64 values
    (what the JSON list columns hold, packed without per-feature Python: `feature()` returns the same lists)."""
    F, n = ids.shape
    mat = np.empty((F, 1 + 12 * n), np.uint8)
    mat[:, 0] = tag
    mat[:, 1: 1 + 4 * n] = np.ascontiguousarray(ids, dtype="<i4").view(np.uint8).reshape(F, 4 * n)
    mat[:, 1 + 4 * n:] = np.ascontiguousarray(values, dtype="<f8").view(np.uint8).reshape(F, 8 * n)
    return mat.view(np.dtype((np.void, mat.shape[1]))).reshape(-1).tolist()


def _unpack_pairs(data: bytes) -> Any:
    n = (len(data) - 1) // 12
    tag = data[0]
    ids = np.frombuffer(data, "<i4", n, 1).tolist()
    values = np.frombuffer(data, "<f8", n, 1 + 4 * n).tolist()
    if tag == PAIRS_TOKENS:
        return _TokenPairs(ids, values)
    if tag == PAIRS_FEATURES_POSITIVE:
        return [[i, v] for i, v in zip(ids, values, strict=True) if i >= 0 and v > 0]
    return [[i, v] for i, v in zip(ids, values, strict=True)]
