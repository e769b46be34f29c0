"""Feature families across SAE widths (Scaling Monosemanticity's feature-splitting analysis).

SAEs of different widths trained on the same hook learn related dictionaries: a feature of the narrow
SAE often "splits" into several features of the wide one whose decoder directions stay close to it.
Every feature of the wider (child) SAE is matched to its nearest feature of the narrower (parent) SAE
by decoder cosine; the Pearson correlation of their activations on real rows says whether the match
is functional and not only geometric. The matches go to the feature database's `splits` table:

    matches = build_families(db, "runs/x/sae-4x", "runs/x/sae-16x", acts)   # match + store
    split_children(db, "runs/x/sae-4x", 123, "runs/x/sae-16x")              # -> [child ids], best first
    families(db, sae_key("runs/x/sae-4x"), sae_key("runs/x/sae-16x"))       # {parent: [children]}

SAEs are named in the table by `sae_key`, so one database can hold the families of several pairs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB
from monoscope.sae import SAE, SAEFileError, read_sae_metadata

DEFAULT_MIN_COSINE = 0.5
"""A child whose best parent is below this decoder cosine has no parent (a feature new at that width).
Chance level, the best cosine of a random direction against F random parents in d dimensions
(~sqrt(2 ln F / d)), measures 0.16 for 9,216 parents at d=576 and 0.08 at d=2304. 0.5 (60 degrees) is far
above it at any realistic width, and still admits children that keep only half of the parent's
direction (a split refines a parent; it does not copy it). Both cosine and corr are stored, so a
query can be stricter."""

_BLOCK_ELEMS = 1 << 24
"""Cosines per [children, parents] block: 64 MiB, so 262,144 children against 65,536 parents never
build an F x F matrix."""

_CODE_ELEMS = 1 << 26
"""Codes per [rows, parent + child features] encoding block: 256 MiB; larger blocks amortise the
per-call encoder set-up (a copy of W_enc), which dominates at a few hundred rows."""

_KEY_RE = re.compile(r"^\d+:(tensors-)?[0-9a-f]{12}$")

SAELike = SAE | str | os.PathLike[str]


class Match(NamedTuple):
    """One child feature and its best parent: decoder cosine, and activation correlation (None
    without activation rows, or when either feature is constant on them)."""

    child: int
    parent: int
    cosine: float
    corr: float | None


def sae_key(sae: SAELike, loaded: SAE | None = None) -> str:
    """The name of an SAE in the `splits` table: f"{d_sae}:{sha[:12]}".

    For a monoscope SAE folder, sha is the weights file's sha256 from cfg.json (what `load_sae`
    checks and the feature database's meta records), so reading it costs nothing and a key can be
    recomputed from a database's meta. An in-memory SAE (or a SAELens/sparsify folder, loaded) gets
    f"{d_sae}:tensors-{sha[:12]}", sha256 over its tensors' names, dtypes, shapes and bytes: the file
    digest cannot be rebuilt from memory (safetensors writes its metadata in no fixed order), and the
    distinct form keeps the two kinds of key from being mistaken for each other. Pass folders when
    keys must agree across runs and machines; `loaded` (the folder's SAE, already loaded) saves loading a
    peer's folder again."""
    if isinstance(sae, SAE):
        return f"{sae.cfg.d_sae}:tensors-{_tensor_digest(sae)[:12]}"
    return _folder_key(Path(sae), loaded)


def _folder_key(folder: Path, loaded: SAE | None = None) -> str:
    try:
        meta = read_sae_metadata(folder)
    except SAEFileError:  # a peer's folder: key its converted tensors
        if loaded is None:
            from monoscope.interop import load_any

            loaded = load_any(folder)
        return sae_key(loaded)
    return f"{meta['d_sae']}:{meta['weights']['sha256'][:12]}"


def _tensor_digest(sae: SAE) -> str:
    h = hashlib.sha256()
    for name, t in sorted(sae.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _as_key(sae: SAELike) -> str:
    """An SAE, a folder, or a key already made by `sae_key` -> the key."""
    if isinstance(sae, str) and _KEY_RE.match(sae) and not Path(sae).exists():
        return sae
    if not isinstance(sae, SAE) and not Path(sae).exists():
        raise MonoscopeError(f"{sae!r} is neither an SAE folder nor a key made by sae_key (like '9216:0123456789ab'): "
                             "pass the SAE's folder")
    return sae_key(sae)


def _check_pair(parent: SAE, child: SAE) -> None:
    p, c = parent.cfg, child.cfg
    desc = (f"parent d_in={p.d_in} hook={p.hook!r} model={p.model!r} d_sae={p.d_sae}; "
            f"child d_in={c.d_in} hook={c.hook!r} model={c.model!r} d_sae={c.d_sae}")
    if p.d_in != c.d_in or (p.hook and c.hook and p.hook != c.hook) or (p.model and c.model and p.model != c.model):
        raise MonoscopeError(f"cannot match features of SAEs that read different activations ({desc}): "
                             "pass two SAEs trained on the same model and hook")
    if c.d_sae < p.d_sae:
        raise MonoscopeError(f"the child SAE is narrower than the parent ({desc}): pass the wider SAE as child "
                             "(features split as the width grows)")


@torch.no_grad()
def match_features(
    parent: SAE,
    child: SAE,
    acts: Tensor | None = None,
    *,
    min_cosine: float = DEFAULT_MIN_COSINE,
    chunk: int | None = None,
) -> list[Match]:
    """Each child feature's best parent by decoder cosine, kept when the cosine >= `min_cosine`.

    parent, child: SAEs on the same hook (child at least as wide). acts: raw activation rows
    [N, d_in] (e.g. 20k store rows); both SAEs encode them once, block by block, and the Pearson
    correlation over the rows is computed for the matched pairs only (float64 sums, so no
    [N, d_sae] matrix is kept). chunk: children per cosine block (default: 64 MiB blocks).
    Runs on the child SAE's device. Returns the matches sorted by child id."""
    _check_pair(parent, child)
    if not -1.0 <= min_cosine <= 1.0:
        raise MonoscopeError(f"min_cosine={min_cosine} is not a cosine: pass a value in [-1, 1] "
                             f"(default {DEFAULT_MIN_COSINE})")
    dev = child.W_dec.device
    w_par = _unit_rows(parent.W_dec.detach().to(dev))  # [Fp, d]
    n_par, n_child = parent.cfg.d_sae, child.cfg.d_sae
    step = chunk or max(1, _BLOCK_ELEMS // n_par)
    best_cos = torch.empty(n_child, device=dev)
    best_par = torch.empty(n_child, dtype=torch.long, device=dev)
    for s in range(0, n_child, step):
        block = _unit_rows(child.W_dec.detach()[s:s + step].to(dev)) @ w_par.T  # [chunk, Fp]
        best_cos[s:s + step], best_par[s:s + step] = block.max(dim=1)
    keep = (best_cos >= min_cosine).nonzero().squeeze(1)
    children, parents = keep, best_par[keep]
    corr: list[float | None] = [None] * len(children)
    if acts is not None and len(children):
        r = _pair_correlation(parent, child, acts, parents, children)
        corr = [None if not np.isfinite(v) else float(v) for v in r.tolist()]
    return [Match(int(c), int(p), float(cos), r)
            for c, p, cos, r in zip(children.tolist(), parents.tolist(), best_cos[keep].tolist(), corr, strict=True)]


def _unit_rows(w: Tensor) -> Tensor:
    w = w.float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _pair_correlation(parent: SAE, child: SAE, acts: Tensor, parents: Tensor, children: Tensor) -> Tensor:
    """[M] float64 Pearson correlation of child[children[m]] with parent[parents[m]] over the rows
    (NaN where a feature is constant on them, e.g. never fires). Every sum only visits non-zero codes
    (TopK codes are >99% zeros; dense column sums cost as much as the encoding)."""
    d_in = child.cfg.d_in
    if acts.dim() != 2 or acts.shape[1] != d_in or acts.shape[0] < 2:
        raise MonoscopeError(f"activation rows for feature correlation must be [N >= 2, {d_in}], got "
                             f"{tuple(acts.shape)}: pass raw activations at the SAEs' hook")
    dev = child.W_dec.device
    n_child, n_par = child.cfg.d_sae, parent.cfg.d_sae
    pair_of = torch.full((n_child,), -1, dtype=torch.long, device=dev)  # child id -> pair index
    pair_of[children] = torch.arange(len(children), device=dev)
    parent_of = torch.zeros(n_child, dtype=torch.long, device=dev)
    parent_of[children] = parents
    f64 = torch.float64
    c1, c2 = torch.zeros(n_child, dtype=f64, device=dev), torch.zeros(n_child, dtype=f64, device=dev)
    p1, p2 = torch.zeros(n_par, dtype=f64, device=dev), torch.zeros(n_par, dtype=f64, device=dev)
    cross = torch.zeros(len(children), dtype=f64, device=dev)
    rows = max(1, _CODE_ELEMS // (n_par + n_child))
    for s in range(0, acts.shape[0], rows):
        x = acts[s:s + rows]
        fc = child.encode_raw(x.to(dev))  # [B, Fc]
        fp = parent.encode_raw(x.to(parent.W_dec.device)).to(dev)  # [B, Fp]
        _add_moments(fp, p1, p2)
        r, c = _add_moments(fc, c1, c2)
        pair = pair_of[c]
        hit = pair >= 0
        r, c, pair = r[hit], c[hit], pair[hit]
        cross.index_add_(0, pair, fc[r, c].double() * fp[r, parent_of[c]].double())
    n = float(acts.shape[0])
    sx, sxx, sy, syy = c1[children], c2[children], p1[parents], p2[parents]
    cov = n * cross - sx * sy
    var = (n * sxx - sx * sx).clamp_min(0) * (n * syy - sy * sy).clamp_min(0)
    out = cov / var.sqrt()
    out[var <= 0] = float("nan")
    return out.clamp(-1.0, 1.0).cpu()


def _add_moments(f: Tensor, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """s1 += Σ_rows f, s2 += Σ_rows f² (float64, over the non-zeros); returns their (rows, columns)."""
    r, c = f.nonzero(as_tuple=True)
    v = f[r, c].double()
    s1.index_add_(0, c, v)
    s2.index_add_(0, c, v * v)
    return r, c


def store_families(db: FeatureDB, parent_key: str, child_key: str, matches: Sequence[Match]) -> int:
    """Replace the (parent_key, child_key) families in `db`'s splits table with `matches`; returns
    the rows written. Earlier rows of the pair go first, so a rerun with another `min_cosine` leaves no
    stale children. Runs in its own transaction unless the caller holds one."""
    rows = [(parent_key, int(m.parent), child_key, int(m.child), float(m.cosine),
             None if m.corr is None else float(m.corr)) for m in matches]
    ctx = contextlib.nullcontext() if db.in_transaction else db.transaction()
    with ctx:
        db.delete_splits(parent_key, child_key)
        db.put_splits(rows)
    return len(rows)


def families(db: FeatureDB, parent_key: str, child_key: str) -> dict[int, list[int]]:
    """{parent feature: [child features, best cosine first]} for one pair of SAEs."""
    out: dict[int, list[int]] = {}
    for p, c, _, _ in db.splits(parent_key, child_key):
        out.setdefault(int(p), []).append(int(c))
    return out


def split_children(db: FeatureDB, parent: SAELike, feature: int, child: SAELike) -> list[int]:
    """Features of `child` that split from `feature` of `parent`, best cosine first: the one-liner for
    "which features of the 16x SAE split from feature 123 of the 4x one". parent/child: SAE folders,
    SAEs or `sae_key` strings."""
    return [r["child"] for r in db.children(_as_key(parent), feature, _as_key(child))]


def split_parent(db: FeatureDB, child: SAELike, feature: int, parent: SAELike) -> int | None:
    """The feature of `parent` that `feature` of `child` split from (None: no parent above min_cosine)."""
    pkey = _as_key(parent)
    rows = [r for r in db.parent(_as_key(child), feature) if r["parent_sae"] == pkey]
    return rows[0]["parent"] if rows else None


def build_families(
    db: FeatureDB,
    parent: str | os.PathLike[str],
    child: str | os.PathLike[str],
    acts: Tensor | None = None,
    *,
    min_cosine: float = DEFAULT_MIN_COSINE,
    device: str | None = None,
) -> list[Match]:
    """Load two SAE folders (any format `load_any` reads), match their features and store the
    families under their folder keys: the whole analysis for one pair of widths."""
    from monoscope.interop import load_any

    p_sae, c_sae = load_any(parent, device), load_any(child, device)
    matches = match_features(p_sae, c_sae, acts, min_cosine=min_cosine)
    store_families(db, _folder_key(Path(parent), p_sae), _folder_key(Path(child), c_sae), matches)
    return matches
