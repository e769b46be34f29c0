"""Which features fire on a text: `Searcher` runs the model to the SAE's hook, encodes every token and
ranks features by their activation *relative to each feature's maximum in the feature database*.

    s = Searcher.open("runs/default/sae")           # SAE, its database, the model the database names
    res = s.search_text("import numpy as np", top=10, max_density=1e-2)
    for h in res.hits: print(h.feature, h.rel, h.label, [e.token for e in h.evidence])

Raw activation favours dense, high-norm features (Neuronpedia ranks by it); the activation as a share
of the feature's own maximum (SAEDashboard's quantile view) puts a rare feature at its peak first.
Tokens are treated as the features pass treats them: BOS at position 0, then the text without special
tokens; the rows the pass excluded (the BOS, norm outliers by the database's row policy) never count.
`max_acts` gives the per-text maximum of every feature for many texts (contrast and multilingual search).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB
from monoscope.store.manifest import RowPolicy


class SearchError(MonoscopeError):
    """A search a user can fix: bad text, bad filter, a database or model that does not match the SAE."""


@dataclass
class Evidence:
    """One token where a feature fired."""

    position: int
    token: str
    act: float
    rel: float | None


@dataclass
class FeatureHit:
    feature: int
    act: float
    """Largest activation on the text."""
    rel: float | None
    """act / the feature's max_act in the database (None when the database never saw it fire)."""
    density: float | None
    max_act: float | None
    label: str
    explanation: str | None
    peak: int
    """Token position of `act`."""
    evidence: list[Evidence] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TextResult:
    text: str
    tokens: list[str]
    hits: list[FeatureHit]
    n_features: int
    n_active: int
    """Features with a non-zero activation somewhere on the text."""
    n_filtered: int
    """Active features the density filter removed."""
    notes: list[str]
    """Warnings a reader should see (e.g. a text longer than the contexts the database was built on)."""
    seconds: float
    """The whole search: tokenize, forward to the hook, encode, rank, evidence and labels (model and SAE loaded)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: tokenize, forward (the model to the hook: depends on the model and the hardware,
    not on the search), encode (SAE on every token), rank (relative ranking over every feature), evidence
    (per-token evidence, labels and explanations of the listed features)."""

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "n_features": self.n_features, "n_active": self.n_active,
                "n_filtered": self.n_filtered, "notes": self.notes, "seconds": round(self.seconds, 4),
                "timings": {k: round(v, 4) for k, v in self.timings.items()},
                "hits": [h.to_dict() for h in self.hits]}


def _finite(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


class Searcher:
    """A loaded model + SAE + feature database, checked to belong together."""

    def __init__(self, lm: Any, sae: Any, db: FeatureDB, *, sae_dir: str | Path = "") -> None:
        self.lm, self.sae, self.db, self.sae_dir = lm, sae, db, Path(sae_dir)
        meta = db.meta()
        self.meta = meta
        F = int(sae.cfg.d_sae)
        n_db = db.n_features()
        if n_db and n_db != F:
            raise SearchError(f"{db.path} describes {n_db:,} features but the SAE {sae_dir} has {F:,}: it was built "
                              "for another SAE; pass its own database with --db")
        self.max_act = _pad(db.column("max_act"), F)
        self.density = _pad(db.column("density"), F)
        rp = meta.get("row_policy")
        self.policy = RowPolicy(**rp) if isinstance(rp, dict) else RowPolicy()
        self.hp = lm.hook(sae.cfg.hook or meta.get("hook"))
        if lm.d_model != sae.cfg.d_in:
            raise SearchError(f"model {lm.model_id} is {lm.d_model} wide but SAE {sae_dir} reads d_in {sae.cfg.d_in}: "
                              "pass the model the SAE was trained on with --model")
        self.bos = lm.special_ids()[0]
        self.pad = lm.special_ids()[1] if lm.special_ids()[1] is not None else self.bos
        cfg = lm.model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.max_len = int(getattr(text_cfg, "max_position_embeddings", 0) or getattr(text_cfg, "n_positions", 0)
                           or 1 << 20)
        from monoscope.corpus.contexts import _Encoder

        self._encode_text = _Encoder(lm.tokenizer)
        self._explanations: dict[int, str] | None = None

    @property
    def n_features(self) -> int:
        return int(self.sae.cfg.d_sae)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, sae_dir: str | Path, *, db: str | Path | None = None, model: str | None = None,
             device: str | None = "auto", compute_dtype: str = "auto", lm: Any = None) -> Searcher:
        """Load the SAE (any format `load_any` reads), open its database (refused when it records another
        SAE's weights) and load the model the database was built with (or `model`, or `lm` already loaded)."""
        from monoscope.devices import resolve_device
        from monoscope.features.families import sae_key
        from monoscope.features.show import existing_db_path
        from monoscope.interop import load_any
        from monoscope.sae.io import weights_sha256

        sae_dir = Path(sae_dir)
        if not sae_dir.exists():
            raise SearchError(f"SAE folder {sae_dir} does not exist: pass the folder monoscope train wrote")
        path = existing_db_path(sae_dir, db)
        dev = resolve_device(device) if lm is None else lm.device
        sae = load_any(sae_dir, device=dev).eval()
        digest = weights_sha256(sae_dir) or sae_key(sae_dir, loaded=sae)
        fdb = FeatureDB.open(path, expect_sae_sha256=digest)
        if lm is None:
            from monoscope.model import load_model

            spec = model or fdb.meta().get("model")
            if not spec:
                raise SearchError(f"{path} does not say which model it was built with: pass --model")
            lm = load_model(str(spec), device=str(dev), compute_dtype=compute_dtype)  # type: ignore[arg-type]
        return cls(lm, sae, fdb, sae_dir=sae_dir)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ encoding
    def tokenize(self, texts: Sequence[str], names: Sequence[str] | None = None) -> list[list[int]]:
        """[BOS] + the text's tokens for every text; an empty or too-long text is an error naming it
        (`names[i]`, e.g. "pack.jsonl line 7", else its index)."""
        ids = self._encode_text(list(texts)) if texts else []
        out = []
        for i, (t, x) in enumerate(zip(texts, ids, strict=True)):
            name = names[i] if names is not None else f"text {i + 1}"
            if not t.strip() or not x:
                raise SearchError(f"{name} is empty: give text for the model to read")
            if len(x) + 1 > self.max_len:
                raise SearchError(f"{name} is {len(x) + 1:,} tokens (BOS included) but {self.lm.model_id} reads at "
                                  f"most {self.max_len:,}: split it into shorter texts")
            out.append([self.bos, *x])
        return out

    @torch.inference_mode()
    def codes(self, ids: Sequence[Sequence[int]], batch_tokens: int = 4096) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, codes [len, F] float32) per token list, rows the pass excludes set to zero. Texts are
        batched by length (right padding: a causal model's real tokens never see the padding)."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        i = 0
        while i < len(order):
            longest = len(ids[order[i]])
            j = i + 1
            while j < len(order) and len(ids[order[j]]) * (j - i + 1) <= batch_tokens:
                j += 1
            chunk = order[i:j]
            longest = max(len(ids[k]) for k in chunk)
            x = torch.full((len(chunk), longest), self.pad, dtype=torch.int64)
            valid = torch.zeros(len(chunk), longest, dtype=torch.bool)
            for r, k in enumerate(chunk):
                x[r, : len(ids[k])] = torch.tensor(ids[k], dtype=torch.int64)
                valid[r, : len(ids[k])] = True
            acts = self.lm.acts(self.hp, x)  # [B, T, d]
            keep = self.policy.keep(acts) & valid
            f = self.sae.encode_raw(acts.reshape(-1, acts.shape[-1])).float()
            f = f.reshape(len(chunk), longest, -1) * keep.to(f.device)[..., None]
            for r, k in enumerate(chunk):
                yield k, f[r, : len(ids[k])].cpu()
            i = j

    def max_acts(self, texts: Sequence[str], names: Sequence[str] | None = None) -> np.ndarray:
        """[len(texts), F] float32: each feature's largest activation on each text."""
        ids = self.tokenize(texts, names)
        out = np.zeros((len(ids), self.n_features), dtype=np.float32)
        for k, f in self.codes(ids):
            out[k] = f.max(0).values.numpy()
        return out

    # ------------------------------------------------------------------ ranking
    def relative(self, acts: np.ndarray) -> np.ndarray:
        """act / max_act per feature (NaN where the database never saw the feature fire)."""
        m = self.max_act
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(m > 0, acts / np.where(m > 0, m, 1.0), np.nan)

    def density_mask(self, min_density: float | None, max_density: float | None) -> np.ndarray:
        """[F] bool: features whose density in the database lies in [min_density, max_density]."""
        for name, v in (("--min-density", min_density), ("--max-density", max_density)):
            if v is not None and not 0.0 <= v <= 1.0:
                raise SearchError(f"{name} {v} is not a fraction of tokens: pass a value in [0, 1], e.g. 1e-3")
        if min_density is not None and max_density is not None and min_density > max_density:
            raise SearchError(f"--min-density {min_density} is above --max-density {max_density}: swap them")
        ok = np.ones(self.n_features, dtype=bool)
        d = self.density
        if min_density is not None:
            ok &= np.nan_to_num(d, nan=-1.0) >= min_density
        if max_density is not None:
            ok &= np.nan_to_num(d, nan=2.0) <= max_density
        return ok

    def labels(self, ids: Sequence[int]) -> dict[int, str]:
        out = {}
        for i in ids:
            row = self.db.feature(int(i))
            out[int(i)] = str((row or {}).get("label") or "")
        return out

    def explanations(self) -> dict[int, str]:
        if self._explanations is None:
            self._explanations = self.db.latest_explanations()
        return self._explanations

    def search_text(self, text: str, *, top: int = 20, min_density: float | None = None,
                    max_density: float | None = None, evidence: int = 5) -> TextResult:
        """The `top` features that fire on `text`, strongest relative to their own maximum first."""
        if top <= 0:
            raise SearchError(f"--top {top}: pass a positive number of features to list")
        mask = self.density_mask(min_density, max_density)
        clock = _Clock()
        ids = self.tokenize([text], ["the text"])[0]
        clock.lap("tokenize")
        with torch.inference_mode():
            acts = self.lm.acts(self.hp, torch.tensor([ids], dtype=torch.int64))[0]  # [T, d]
            clock.lap("forward")
            keep = self.policy.keep(acts[None])[0].to(acts.device)
            f = self.sae.encode_raw(acts).float()
            f = (f * keep[:, None]).cpu()  # [T, F], excluded rows zero
            best, peak = f.max(0)
        best_np = best.numpy()
        clock.lap("encode")
        rel = self.relative(best_np)
        active = best_np > 0
        n_active = int(active.sum())
        chosen = active & mask
        # rank: relative activation (unknown max last, then by raw activation)
        key = np.where(np.isnan(rel), -1.0, rel)
        cand = np.flatnonzero(chosen)
        order = cand[np.lexsort((-best_np[cand], -key[cand]))][:top]
        clock.lap("rank")
        tok = self.lm.tokenizer
        pieces = [tok.convert_tokens_to_string([p]) for p in tok.convert_ids_to_tokens(ids)]
        labels = self.labels(order.tolist())
        expl = self.explanations()
        cols = f[:, torch.from_numpy(order)].numpy() if len(order) else np.zeros((len(ids), 0), np.float32)
        hits = []
        for j, fid in enumerate(order.tolist()):
            col = cols[:, j]
            pos = np.flatnonzero(col > 0)
            pos = pos[np.argsort(-col[pos], kind="stable")][:evidence]
            m = self.max_act[fid]
            ev = [Evidence(int(p), pieces[p], float(col[p]), _finite(col[p] / m) if m > 0 else None) for p in pos]
            hits.append(FeatureHit(int(fid), float(best_np[fid]), _finite(rel[fid]), _finite(self.density[fid]),
                                   _finite(m), labels[fid], expl.get(fid), int(peak[fid]), ev))
        clock.lap("evidence")
        notes = []
        ctx = self.meta.get("ctx_len")
        if isinstance(ctx, int) and len(ids) > ctx:
            notes.append(f"the text is {len(ids):,} tokens but the database was built on contexts of {ctx}: "
                         f"activations after position {ctx} come from positions the SAE's data never had")
        return TextResult(text, pieces, hits, self.n_features, n_active, int((active & ~mask).sum()), notes,
                          clock.total(), dict(clock.laps))


class _Clock:
    """Phase timings: `lap(name)` records the seconds since the previous lap."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.t0


def _pad(values: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    out[: min(n, len(values))] = values[:n]
    return out
