"""What `monoscope serve PATH` serves: the SAEs found in PATH, their feature databases, eval outputs and
maps, read through `FeatureDB` accessors only (no SQL here).

PATH is a run folder (`sae/`, `sae-<w>/`, each with its features database, `eval/`, `audit/`) or one SAE
folder with its database beside it (`runfolder` rules). Everything a URL can name is discovered once at
start-up and looked up by name (`Site.entry`, `Entry.png`), so no request path is ever joined to the file
system: there is nothing to traverse.

SQLite connections belong to the thread that opened them; the server answers page requests from a thread
pool, so each thread opens its own read connection per database (`Entry.db`). Values every page needs
(meta, the vocabulary, feature count) are read once and shared.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from monoscope.errors import MonoscopeError
from monoscope.features.db import DB_NAME, FeatureDB
from monoscope.features.tokens import Vocab, token_text, visible
from monoscope.runfolder import MAIN_SAE, eval_dir_for, features_dir_for

MAP_POINTS = 30_000
"""Most features drawn on the interactive map (the most interesting first, then the most frequent): a
browser canvas stays smooth at this size; the PNG map shows every feature."""


_SPECIAL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""What `visible` rewrites (categories Cc, Zl, Zp); text without any, and not all spaces, is returned as is."""


@lru_cache(maxsize=1 << 17)
def _visible(text: str) -> str:
    """`visible`, with a fast path and remembered: a page shows ~2,000 tokens of one vocabulary."""
    if _SPECIAL.search(text) is None and (len(text) < 2 or text.strip(" ")):
        return text
    return visible(text)


class ServeError(MonoscopeError):
    """A folder `monoscope serve` cannot serve."""


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


@dataclass
class Entry:
    """One SAE of the site: its folder, feature database, eval folder and the files a page may show."""

    name: str
    sae_dir: Path
    db_path: Path
    eval_dir: Path
    pngs: dict[str, Path] = field(default_factory=dict)
    """URL name -> file, for eval plots and the feature map PNG: the only files served from the run."""
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def db(self) -> FeatureDB:
        """This thread's read connection to the feature database."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = FeatureDB.open(self.db_path)
            self._local.db = db
        return db

    @cached_property
    def meta(self) -> dict[str, Any]:
        return self.db().meta()

    @cached_property
    def n_features(self) -> int:
        """Features of the SAE: meta sae.d_sae when recorded, else the rows present."""
        sae = self.meta.get("sae")
        d = sae.get("d_sae") if isinstance(sae, dict) else None
        return int(d) if isinstance(d, int) and not isinstance(d, bool) else self.db().n_features()

    @cached_property
    def sae_key(self) -> str | None:
        k = self.meta.get("sae_key")
        return k if isinstance(k, str) else None

    @cached_property
    def vocab(self) -> Vocab:
        with self._lock:
            db = self.db()
            return Vocab(db.vocab(), db.vocab_bytes())

    @cached_property
    def metrics(self) -> dict[str, Any] | None:
        """eval/metrics.json of this SAE when present and readable."""
        p = self.eval_dir / "metrics.json"
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError):
            return None

    @cached_property
    def shown_tokens(self) -> list[str | None]:
        """Each token's text as a context window shows it (`_visible`) when its bytes are whole UTF-8 with
        text on their own, else None (those need joint decoding): built once, read by every feature page."""
        return [_visible(w) if w else None for w in self.vocab.whole]

    def token(self, tok: Any) -> str:
        """A token listed on its own (logit effects, label evidence), whitespace visible."""
        return visible(token_text(self.vocab.texts, tok), standalone=True)

    coact: tuple[Any, Any] | None = field(default=None, repr=False)
    """(ids, xy) of the co-activation map when the server computed it (`serve/coact.py`)."""
    coact_pending: bool = field(default=False, repr=False)
    """The co-activation map is being laid out in the background (`monoscope serve`'s default)."""
    _coact_doc: dict[str, Any] | None = field(default=None, repr=False)

    @cached_property
    def map_data(self) -> dict[str, Any]:
        """The decoder map of the features pass (features.map_x/map_y)."""
        return _map_doc(self, self.db().map_points())

    @property
    def coact_data(self) -> dict[str, Any] | None:
        """The co-activation map, once computed (it may arrive from a background thread after start-up)."""
        if self.coact is None:
            return None
        if self._coact_doc is None:
            self._coact_doc = self._coact_doc_now()
        return self._coact_doc

    def _coact_doc_now(self) -> dict[str, Any]:
        assert self.coact is not None
        ids, xy = self.coact
        where = {int(i): (float(x), float(y)) for i, (x, y) in zip(ids.tolist(), xy.tolist(), strict=True)}
        pts = [(i, *where[i], lab, d, lt) for i, _, _, lab, d, lt in self.db().map_points(placed_only=False)
               if i in where]
        return _map_doc(self, pts)


def _map_doc(entry: Entry, pts: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Up to MAP_POINTS points (id, x, y, label, density; the most interesting, then the densest, when there
    are more) and region names: the most common peak tokens of the features in each cell of a 6x6 grid."""
    if not pts:
        return {"n": 0, "shown": 0, "points": [], "regions": []}
    if len(pts) > MAP_POINTS:
        interest = entry.db().column("interest")
        dens = entry.db().column("density")

        def key(p: tuple[Any, ...]) -> tuple[float, float]:
            i = p[0]
            a = interest[i] if i < len(interest) and not math.isnan(interest[i]) else 0.0
            d = dens[i] if i < len(dens) and not math.isnan(dens[i]) else 0.0
            return (-a, -d)

        shown = sorted(pts, key=key)[:MAP_POINTS]
        shown.sort(key=lambda p: p[0])
    else:
        shown = pts
    xs = [p[1] for p in pts]
    ys = [p[2] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    g = 6
    cells: dict[tuple[int, int], Counter[str]] = {}
    where: dict[tuple[int, int], list[float]] = {}
    for _, x, y, _, _, lt in pts:
        c = (min(int((x - x0) / ((x1 - x0) or 1) * g), g - 1), min(int((y - y0) / ((y1 - y0) or 1) * g), g - 1))
        peaks = lt.get("peak_tokens") if isinstance(lt, dict) else None
        if peaks and isinstance(peaks[0], list) and peaks[0]:
            tok = entry.token(peaks[0][0]).strip("·")
            if tok:
                cells.setdefault(c, Counter())[tok] += 1
                s = where.setdefault(c, [0.0, 0.0, 0.0])
                s[0] += x
                s[1] += y
                s[2] += 1
    regions = []
    for c, cnt in cells.items():
        n = sum(cnt.values())
        if n < 5:
            continue
        top = [t for t, _ in cnt.most_common(3)]
        sx, sy, sn = where[c]
        regions.append({"x": sx / sn, "y": sy / sn, "text": " ".join(top), "n": n})
    return {"n": len(pts), "shown": len(shown), "bounds": [x0, x1, y0, y1],
            "points": [[p[0], round(p[1], 4), round(p[2], 4), p[3] or "", _finite(p[4])] for p in shown],
            "regions": regions}


def _png_names(entry: Entry, features_dir: Path) -> None:
    plots = (entry.metrics or {}).get("plots")
    for name in plots if isinstance(plots, list) else []:
        if isinstance(name, str) and "/" not in name and name.endswith(".png") and (entry.eval_dir / name).is_file():
            entry.pngs[f"eval-{name}"] = entry.eval_dir / name
    if (features_dir / "feature_map.png").is_file():
        entry.pngs["feature_map.png"] = features_dir / "feature_map.png"


class Site:
    """The SAEs of one run folder (or one SAE folder), by name."""

    def __init__(self, path: str | Path, compare: list[str | Path] | None = None) -> None:
        root = Path(path)
        if not root.is_dir():
            raise ServeError(f"{root} is not a folder: pass a run folder (runs/NAME) or an SAE folder with its "
                             "features database")
        self.root = root.resolve()
        self.entries: dict[str, Entry] = {}
        if (root / "cfg.json").is_file() or (root / "sae.safetensors").is_file():  # one SAE folder
            self.run_dir: Path | None = None
            self._add(self.root)
        else:
            self.run_dir = self.root
            subs = sorted(d for d in self.root.iterdir() if d.is_dir() and (d / "cfg.json").is_file())
            subs.sort(key=lambda d: (d.name != MAIN_SAE, d.name))
            for d in subs:
                self._add(d)
        if not self.entries:
            raise ServeError(f"{root} has no SAE with a features database: build one with monoscope features "
                             f"{root / MAIN_SAE if self.run_dir else root}, then serve again")
        for other in compare or []:
            self._add_compare(Path(other))
        self._decoders: dict[str, Any] = {}
        self._decoder_lock = threading.Lock()
        for e in self.entries.values() if len(self.entries) > 1 else ():  # best matches need every decoder:
            self.decoder(e)  # read now, at start-up, not by the first page (~1 s per 10^5 features)
        self.by_key = {e.sae_key: e for e in self.entries.values() if e.sae_key}

    def _add_compare(self, sae_dir: Path) -> None:
        """An SAE from elsewhere (`--compare`), served beside this site's under a name of its own."""
        if not (sae_dir / "cfg.json").is_file() and not (sae_dir / "sae.safetensors").is_file():
            raise ServeError(f"--compare {sae_dir} is not an SAE folder (no cfg.json): pass the folder monoscope "
                             "train wrote")
        if not (features_dir_for(sae_dir) / DB_NAME).is_file():
            raise ServeError(f"--compare {sae_dir} has no features database ({features_dir_for(sae_dir) / DB_NAME}): "
                             f"build one with monoscope features {sae_dir}, then serve again")
        if any(e.sae_dir == sae_dir.resolve() for e in self.entries.values()):
            return
        name = sae_dir.resolve().name
        if name in self.entries:
            name = f"{sae_dir.resolve().parent.name}-{name}"
        n = 2
        while name in self.entries:
            name, n = f"{name}-{n}", n + 1
        self._add(sae_dir.resolve(), name)

    def _add(self, sae_dir: Path, name: str | None = None) -> None:
        fdir = features_dir_for(sae_dir)
        db_path = fdir / DB_NAME
        if not db_path.is_file():
            return
        if name is None:
            name = sae_dir.name if self.run_dir is not None else sae_dir.name or "sae"
        e = Entry(name, sae_dir, db_path, eval_dir_for(sae_dir))
        e.db()  # opened (and checked to be a feature database) at start-up: a bad file is a one-line error now
        _png_names(e, fdir)
        self.entries[name] = e

    @property
    def default(self) -> Entry:
        return next(iter(self.entries.values()))

    def entry(self, name: str) -> Entry | None:
        return self.entries.get(name)

    @cached_property
    def audit_report(self) -> Path | None:
        """<run>/audit/report.html when an audit was written."""
        if self.run_dir is None:
            return None
        p = self.run_dir / "audit" / "report.html"
        return p if p.is_file() else None

    @cached_property
    def audit_summary(self) -> dict[str, Any] | None:
        """<run>/audit/report.json's top-level numbers and strings (whatever the audit recorded), when present."""
        if self.run_dir is None:
            return None
        p = self.run_dir / "audit" / "report.json"
        try:
            doc = json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict):
            return None
        return {k: v for k, v in doc.items() if isinstance(v, str | int | float | bool)}

    def decoder(self, entry: Entry) -> Any:
        """The SAE's decoder rows, unit length (torch [F, d_in] float32), loaded once on first use; None when
        its weights cannot be read (a stand-in folder)."""
        with self._decoder_lock:
            if entry.name not in self._decoders:
                from monoscope.interop import load_any

                try:
                    w = load_any(entry.sae_dir, device="cpu").W_dec.detach().float()
                except (MonoscopeError, OSError):
                    self._decoders[entry.name] = None
                else:
                    self._decoders[entry.name] = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return self._decoders[entry.name]

    def best_matches(self, entry: Entry, fid: int) -> list[dict[str, Any]]:
        """Feature `fid`'s best match in each other SAE of the site that reads the same width (the largest
        decoder cosine): [{sae, id, cosine, label}]; nothing when the site has one SAE."""
        others = [e for e in self.entries.values() if e.name != entry.name]
        if not others:
            return []
        mine = self.decoder(entry)
        if mine is None or not 0 <= fid < mine.shape[0]:
            return []
        out = []
        for other in others:
            w = self.decoder(other)
            if w is None or w.shape[1] != mine.shape[1]:
                continue
            cos = w @ mine[fid]
            j = int(cos.argmax())
            label = (other.db().briefs([j]).get(j) or {}).get("label") or ""
            out.append({"sae": other.name, "id": j, "cosine": round(float(cos[j]), 4), "label": label})
        return out

    def family(self, entry: Entry, fid: int) -> dict[str, list[dict[str, Any]]]:
        """Parents (narrower SAEs) and children (wider SAEs) of feature `fid` across the site's SAEs."""
        key = entry.sae_key
        out: dict[str, list[dict[str, Any]]] = {"parents": [], "children": []}
        if key is None:
            return out
        seen: set[tuple[str, str, int]] = set()
        for e in self.entries.values():
            db = e.db()
            for p in db.parent(key, fid):
                other = self.by_key.get(p["parent_sae"])
                if other is not None and ("p", other.name, p["parent"]) not in seen:
                    seen.add(("p", other.name, p["parent"]))
                    out["parents"].append({"sae": other.name, "id": int(p["parent"]), "cosine": p["cosine"],
                                           "corr": _finite(p["corr"])})
            for c in db.children(key, fid):
                other = self.by_key.get(c["child_sae"])
                if other is not None and ("c", other.name, c["child"]) not in seen:
                    seen.add(("c", other.name, c["child"]))
                    out["children"].append({"sae": other.name, "id": int(c["child"]), "cosine": c["cosine"],
                                            "corr": _finite(c["corr"])})
        for rel in out.values():
            for r in rel:
                other = self.entries[r["sae"]]
                r["label"] = (other.db().briefs([r["id"]]).get(r["id"]) or {}).get("label") or ""
        return out
