"""`build_features()`: one streaming pass (model forward to the hook, SAE encode) that fills each SAE's
feature database: statistics, top and quantile examples, histograms, logit effects, neighbours,
co-occurrence, cheap labels; then families across widths and the feature map.

    res = build_features("runs/default/sae", also=["runs/default/sae-4x"], tokens="1M")

The pass keeps, per SAE, `FeatureStats` (bounded by features × examples, computed from every active
code) and writes all active codes (CSR: a row pointer per token, feature ids and activations appended)
and the token ids to memory-mapped files in `<features>/.pass/`; at the end the example windows are cut
from those in one sequential read of the codes per block of features.

Resume from any point. Every `checkpoint_every` batches, and once after the last batch, the state is
saved atomically with the cursor (`.pass/state.pt`, flagged `streamed` once the corpus part is read);
finalisation then runs in stages (each SAE's database, families, feature maps, completion, install),
each recorded in `.pass/stages.json` when done. A rerun after a kill at any point (between batches,
after the last one, inside or between finalisation stages) continues from the last saved point and
ends with the same database as an uninterrupted pass; a rerun of a complete pass is a no-op.

Old databases are kept until the new one is complete. Each SAE's database is built as
`<features>/.new-features.db` and renamed over `features.db` only when complete. A complete database
built with other options (or for other SAE weights) is never replaced silently: the pass refuses,
listing what differs, unless `overwrite`; then explanations and scores whose evidence is unchanged
are carried into the new database (`monoscope.interp.explain.carry_over`). A damaged database is a
one-line error naming the file (with `overwrite`, it is replaced and nothing is carried over).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from monoscope import __version__
from monoscope.corpus import open_corpus
from monoscope.corpus.contexts import batched_contexts
from monoscope.errors import MonoscopeError
from monoscope.features.db import (
    DB_NAME,
    PAIRS_FEATURES,
    PAIRS_FEATURES_POSITIVE,
    PAIRS_TOKENS,
    FeatureDB,
    FeatureDBError,
    default_db_path,
    example_dtype,
    pack_pair_lists,
    packed_example_rows,
)
from monoscope.features.stats import HIST_EDGES, FeatureStats
from monoscope.features.tokens import vocab_bytes, vocab_texts
from monoscope.fileio import write_bytes_atomic, write_json_atomic
from monoscope.locking import locks_folders
from monoscope.progress import progress_bar
from monoscope.sae import SAE
from monoscope.sae.io import weights_sha256
from monoscope.store.manifest import RowPolicy
from monoscope.units import parse_count

WINDOW_BEFORE, WINDOW_AFTER = 24, 8
"""An example shows this many tokens before the maximum and after it (clipped to the context)."""
FAMILY_ROWS = 16_384
"""Raw activation rows (the first ones the pass reads) kept to correlate features across SAE widths."""
INTEREST_DENSITY = (1e-4, 1e-2)
"""'Interesting' features fire on between 1 in 10,000 and 1 in 100 tokens (rarer: too little evidence;
denser: usually positional or generic)."""


NEW_DB_NAME = f".new-{DB_NAME}"
"""The database a pass builds, beside `features.db`, renamed over it once complete."""
MAP_NAME = "feature_map.png"
# Explanations and scores a rebuild could not carry over (paid LLM work): JSON lines beside the database.
DROPPED_ARCHIVE = "dropped-explanations.jsonl"
"""The feature map's picture beside the database; a pass draws it as `.new-feature_map.png` and renames it
with the database it belongs to (`_install`), so the two always describe the same pass."""
_OVERWRITE = "overwrite.json"
"""In `.pass/`: the options key of a pass started with `overwrite` (a rerun without it carries on)."""
KILL_ENV = "MONOSCOPE_FEATURES_KILL_AT"
"""Test hook: the pass dies right after the point this names (`checkpoint:N` = the N-th checkpoint this
process saves, `streamed`, `finalised:I` = SAE I's database written, `families`, `maps`, `complete`,
`installed:I`); with MONOSCOPE_FEATURES_KILL_HOW=raise it raises KeyboardInterrupt, else exits at once
(status 137, no clean-up), as a kill would."""


def default_features_dir(sae_dir: Path) -> Path:
    """`runs/x/sae` -> `runs/x/features`; any other SAE folder -> `<folder>-features` (`show` finds it)."""
    return default_db_path(sae_dir).parent


def _kill_point(name: str) -> None:
    if os.environ.get(KILL_ENV) != name:
        return
    if os.environ.get("MONOSCOPE_FEATURES_KILL_HOW") == "raise":
        raise KeyboardInterrupt(f"{KILL_ENV}={name}")
    os._exit(137)


@dataclass
class Interesting:
    sae_dir: Path
    feature: int
    label: str
    score: float
    density: float


@dataclass
class FeaturesResult:
    dbs: list[Path]
    tokens: int
    seconds: float
    new_tokens: int
    interesting: list[Interesting] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stream_seconds: float = 0.0
    """Set-up and the streaming pass (model load, forward, encode, statistics), without finalisation."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- set-up


def _store_manifest(sae: SAE) -> dict[str, Any] | None:
    data = (sae.provenance or {}).get("data") or {}
    path = data.get("path")
    if data.get("kind") == "store" and path and (Path(path) / "manifest.json").is_file():
        return json.loads((Path(path) / "manifest.json").read_text())
    return None


def _store_policy(sae: SAE) -> RowPolicy | None:
    """The row policy of the SAE's training store: the pass then counts the rows training and
    `monoscope eval` saw (same BOS rule, same outlier threshold), so densities add up to eval's L0."""
    m = _store_manifest(sae) or {}
    if "," in str(m.get("hook") or "") and sae.cfg.arch != "crosscoder":  # a transcoder's paired store: its
        return None  # policy measured norms of both hooks, the pass reads only the input (a crosscoder reads all)
    rp = m.get("row_policy")
    return RowPolicy(**rp) if isinstance(rp, dict) else None


def resolve_inputs(sae: SAE, model: str | None, corpus: str | None) -> tuple[str, str, int]:
    """(model spec, corpus spec, ctx_len): explicit values, else what the SAE's training store recorded."""
    m = _store_manifest(sae)
    data = (sae.provenance or {}).get("data") or {}
    if model is None:
        model = (m or {}).get("model", {}).get("spec") or data.get("model_spec")
        if model is None:
            raise MonoscopeError(f"cannot tell which model SAE {sae.cfg.model!r} reads (its training store is not "
                                 "found): pass --model")
    if corpus is None:
        corpus = str((m or {}).get("corpus", {}).get("path") or "default")
    return str(model), corpus, int((m or {}).get("ctx_len") or 128)


@dataclass
class _Target:
    """One SAE of the pass: where its database goes and its running state."""

    sae_dir: Path
    sae: SAE
    digest: str
    """Weights sha256 from cfg.json, or the tensor-hash key for a peer's folder."""
    key: str
    """The SAE's name in the splits table (`families.sae_key`)."""
    out: Path
    stats: FeatureStats

    @property
    def db_path(self) -> Path:
        """Where the pass builds the database (renamed to `final_path` once complete)."""
        return self.out / NEW_DB_NAME

    @property
    def final_path(self) -> Path:
        return self.out / DB_NAME

    @property
    def map_path(self) -> Path:
        """Where the pass draws the feature map (renamed to `final_map` with the database)."""
        return self.out / f".new-{MAP_NAME}"

    @property
    def final_map(self) -> Path:
        return self.out / MAP_NAME


class _Codes:
    """Every active code of one SAE over the pass, sparse by row (CSR) in `<work>/codes<i>.*`: `ptr`
    [rows + 1] int64 (memory-mapped; row r's codes are entries ptr[r]:ptr[r+1]), `idx` int32 feature ids
    and `val` float16 activations appended in row order. On resume the entry files are cut back to the
    checkpoint's entry count (`FeatureStats.entries`), so codes written after it are rewritten."""

    def __init__(self, work: Path, i: int, n_rows: int, resume_entries: int | None) -> None:
        self.ptr = _memmap(work / f"codes{i}.ptr", np.int64, (n_rows + 1,), resume_entries is not None)
        self.paths = (work / f"codes{i}.idx", work / f"codes{i}.val")
        self.nnz = resume_entries or 0
        self.files = []
        for path, size in zip(self.paths, (4, 2), strict=True):
            fh = open(path, "r+b" if resume_entries is not None and path.is_file() else "w+b")  # noqa: SIM115
            fh.truncate(self.nnz * size)
            fh.seek(self.nnz * size)
            self.files.append(fh)
        if resume_entries is None:
            self.ptr[0] = 0

    def append(self, row0: int, n_rows: int, rows: np.ndarray, feats: np.ndarray, vals: np.ndarray) -> None:
        """Codes of rows row0 ... row0 + n_rows − 1; rows are relative to row0 and ascending."""
        counts = np.bincount(rows, minlength=n_rows)
        self.ptr[row0 + 1: row0 + n_rows + 1] = self.nnz + np.cumsum(counts)
        self.files[0].write(feats.astype(np.int32).tobytes())
        self.files[1].write(vals.astype(np.float16).tobytes())
        self.nnz += len(feats)

    def flush(self) -> None:
        self.ptr.flush()
        for fh in self.files:
            fh.flush()

    def arrays(self, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ptr [n_rows + 1], idx, val) read-only, after the pass."""
        self.flush()
        for fh in self.files:
            fh.close()
        if self.nnz == 0:
            return np.asarray(self.ptr[: n_rows + 1]), np.zeros(0, np.int32), np.zeros(0, np.float16)
        idx = np.memmap(self.paths[0], dtype=np.int32, mode="r", shape=(self.nnz,))
        val = np.memmap(self.paths[1], dtype=np.float16, mode="r", shape=(self.nnz,))
        return np.asarray(self.ptr[: n_rows + 1]), idx, val


_SAE_COMPUTE = {"fp32": "float32", "bf16": "bfloat16"}


# ----------------------------------------------------------------------------- the pass


@locks_folders(lambda a: [] if _rank_world()[0] else [default_features_dir(Path(d)) for d in (a["sae"], *a["also"])],
               "features")
def build_features(
    sae: str | Path,
    *,
    also: Sequence[str | Path] = (),
    corpus: str | None = None,
    model: str | None = None,
    tokens: int | str = "1M",
    batch_contexts: int = 32,
    checkpoint_every: int = 25,
    top_k: int = 20,
    bins: int = 10,
    per_bin: int = 5,
    device: str | None = "auto",
    compute_dtype: str = "auto",
    feature_map: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> FeaturesResult:
    """Build the feature database of `sae` (and of every SAE in `also`, from the same forward pass)."""
    from monoscope.devices import resolve_device
    from monoscope.interop import load_any
    from monoscope.model import load_model

    n_tokens = parse_count(tokens)
    rank, world = _rank_world()
    if world > 1 and device in (None, "auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per process under torchrun
    if compute_dtype not in ("auto", *_SAE_COMPUTE):
        raise MonoscopeError(f"unknown compute dtype {compute_dtype!r}: use auto, fp32 or bf16")
    dev = resolve_device(device)
    dirs = [Path(sae), *(Path(a) for a in also)]
    saes = []
    for d in dirs:
        if not d.exists():
            raise MonoscopeError(f"SAE folder {d} does not exist: train one with monoscope train --out {d}")
        saes.append(load_any(d, device=dev).eval())
        if compute_dtype in _SAE_COMPUTE:  # the encode's matmuls as asked; "auto" keeps the SAE's own setting
            saes[-1].cfg.compute_dtype = _SAE_COMPUTE[compute_dtype]  # type: ignore[assignment]
    first = saes[0]
    for d, s in zip(dirs[1:], saes[1:], strict=True):
        if s.cfg.d_in != first.cfg.d_in or (s.cfg.hook and first.cfg.hook and s.cfg.hook != first.cfg.hook):
            raise MonoscopeError(f"--also {d} reads {s.cfg.hook} (d_in {s.cfg.d_in}) but {dirs[0]} reads "
                                 f"{first.cfg.hook} (d_in {first.cfg.d_in}): every SAE of one pass reads the same hook")
    model_spec, corpus_spec, ctx_len = resolve_inputs(first, model, corpus)
    n_ctx = max(1, n_tokens // ctx_len)
    widest = max(s.cfg.d_sae for s in saes)  # the dense codes of a batch stay under ~1 GB (262k features: 8 contexts)
    batch_contexts = max(1, min(batch_contexts, 2**28 // (ctx_len * widest)))
    from monoscope.features.families import sae_key

    targets = []
    for d, s in zip(dirs, saes, strict=True):
        key_ = sae_key(d, loaded=s)
        targets.append(_Target(d, s, weights_sha256(d) or key_, key_, default_features_dir(d),
                               FeatureStats(s.cfg.d_sae, top_k=top_k, reservoir=bins * per_bin)))
    corp = open_corpus(corpus_spec)
    config = {
        "saes": [t.digest for t in targets], "model": model_spec, "corpus": corp.fingerprint(), "ctx_len": ctx_len,
        "contexts": n_ctx, "batch": batch_contexts, "top_k": top_k, "bins": bins, "per_bin": per_bin,
        "compute_dtype": compute_dtype, "format": 3,
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

    t0 = time.perf_counter()
    if rank > 0:  # a distributed pass: this rank only computes its share of the batches for rank 0
        return _features_worker(model_spec, device, compute_dtype, first, [t.sae for t in targets], corp, ctx_len,
                                batch_contexts, n_ctx, t0)
    work = targets[0].out / ".pass"
    resumed_overwrite = not overwrite and _pending_overwrite(work, key)
    overwrite = overwrite or resumed_overwrite  # a rebuild killed before it was installed carries on
    olds = [_existing(t, key, config, overwrite) for t in targets]
    if not overwrite and all(o == "same" for o in olds):
        _broadcast_plan(world, None)
        res = FeaturesResult([t.final_path for t in targets], n_ctx * ctx_len, 0.0, 0)
        res.interesting = _interesting_from_db(targets[0])
        res.notes.append("already complete: nothing to do")
        return res

    work.mkdir(parents=True, exist_ok=True)
    if overwrite:  # recorded first: a rerun after a kill, with or without --overwrite, finishes the rebuild
        write_json_atomic(work / _OVERWRITE, {"key": key})
    else:
        (work / _OVERWRITE).unlink(missing_ok=True)
    had_state = (work / "state.pt").is_file()
    state = _load_state(work, key)  # an unfinished pass with these options resumes (with --overwrite too)
    if state is None:
        (work / _STAGES).unlink(missing_ok=True)
    stages = _load_stages(work, key)
    lm = load_model(model_spec, device=device, compute_dtype=compute_dtype)
    hp = _hook_points(lm, first)
    if lm.d_model * (len(hp) if isinstance(hp, tuple) else 1) != first.cfg.d_in:
        raise MonoscopeError(f"model {model_spec} is {lm.d_model} wide at {_hook_name(hp)} but the SAE reads d_in "
                             f"{first.cfg.d_in}: pass the model the SAE was trained on with --model")
    toks = _memmap(work / "tokens.i32", np.int32, (n_ctx, ctx_len), state is not None)
    codes = [_Codes(work, i, n_ctx * ctx_len, None if state is None else int(s["entries"]))
             for i, s in enumerate(state["stats"] if state is not None else targets)]
    sample = _memmap(work / "acts_sample.f32", np.float32, (FAMILY_ROWS, first.cfg.d_in), state is not None)
    done = sampled = 0
    policy: RowPolicy | None = None
    streamed = False
    if state is not None:
        done, sampled = int(state["done"]), int(state.get("sampled", 0))
        streamed = bool(state.get("streamed")) or done >= n_ctx
        policy = RowPolicy(**state["policy"])
        for t, s in zip(targets, state["stats"], strict=True):
            t.stats.load_state_dict(s)
    new = 0
    _broadcast_plan(world, {"done": done, "streamed": streamed, "policy": None if policy is None else vars(policy)})
    saes_ = [t.sae for t in targets]
    with progress_bar("features", total=n_ctx * ctx_len, unit="tok", enabled=progress) as bar:
        bar.update(done * ctx_len)
        batches = iter(()) if streamed else batched_contexts(lm, corp, ctx_len, batch_contexts, skip=done)
        since_ckpt = n_ckpt = 0
        if world > 1:  # every rank computes its share; rank 0 gets every batch's codes here, in corpus order
            outputs = _ordered_outputs(batches, n_ctx, done, lambda ids, pol, need: _encode_batch(
                lm, hp, ids, pol, first, saes_, need), policy, lambda: FAMILY_ROWS - sampled, lm, hp, first)
        else:
            outputs = ((ids, _encode_batch(lm, hp, ids, policy, first, saes_, FAMILY_ROWS - sampled))
                       for ids in (b[: n_ctx - done] for b in batches))
        for ids, out in outputs:
            policy = out.policy
            ctx_ids = torch.arange(done, done + len(ids))
            rows = slice(done * ctx_len, (done + len(ids)) * ctx_len)
            toks[done: done + len(ids)] = ids.numpy().astype(np.int32)
            if sampled < FAMILY_ROWS:  # raw rows kept for the activation correlation of families
                xs = out.sample[: FAMILY_ROWS - sampled]
                sample[sampled: sampled + len(xs)] = xs
                sampled += len(xs)
            for t, cf, (r, fi, v) in zip(targets, codes, out.codes, strict=True):
                t.stats.update(r, fi, v, ctx_ids, ctx_len, out.kept)
                cf.append(rows.start, rows.stop - rows.start, r.numpy(), fi.numpy(), v.numpy())
            done += len(ids)
            new += len(ids)
            since_ckpt += 1
            bar.update(len(ids) * ctx_len)
            if since_ckpt >= checkpoint_every and done < n_ctx:
                _save_state(work, key, done, sampled, policy, targets, [toks, sample, *codes])
                since_ckpt, n_ckpt = 0, n_ckpt + 1
                _kill_point(f"checkpoint:{n_ckpt}")
            if done >= n_ctx:
                break
    if done == 0:
        raise MonoscopeError(f"corpus {corpus_spec} holds no context of {ctx_len} tokens: pass a larger --corpus")
    if done < n_ctx:
        n_ctx = done  # the corpus ran out: the result says how many tokens were read
    assert policy is not None
    if not streamed:
        _save_state(work, key, done, sampled, policy, targets, [toks, sample, *codes], streamed=True)
        _kill_point("streamed")
    seconds = time.perf_counter() - t0

    meta_common = {"model": model_spec, "hook": _hook_name(hp), "corpus": {"spec": corpus_spec,
                   "fingerprint": corp.fingerprint()}, "tokens": done * ctx_len, "ctx_len": ctx_len,
                   "config_key": key, "created_by": f"monoscope {__version__}", "bins": bins, "top_k": top_k,
                   "interest_criterion": _INTEREST_DOC, "row_policy": vars(policy)}
    meta_common["config"] = config  # what a later pass with other options lists as different
    token_bytes = vocab_bytes(lm.tokenizer)
    vocab = vocab_texts(lm.tokenizer, token_bytes)  # a token holding part of a character: <0xNN>, not U+FFFD
    res = FeaturesResult([], done * ctx_len, seconds, new * ctx_len, stream_seconds=seconds)
    if resumed_overwrite:
        res.notes.append(f"carried on the unfinished --overwrite rebuild in {work} (the old database stayed in "
                         "place until the new one was complete)")
    if had_state and state is None:
        res.notes.append(f"an unfinished pass in {work} with other options (or a damaged state) was started over")
    # finalisation in stages, each recorded once done (a rerun after a kill skips the finished ones)
    redo = _redo(targets, stages)
    for i, t in enumerate(targets):
        if i not in redo:
            continue
        _finalise(t, lm, np.asarray(toks[:done]), codes[i].arrays(done * ctx_len), vocab, meta_common, bins,
                  progress)
        with FeatureDB.open(t.db_path) as db, db.transaction():  # token bytes: windows decode split characters
            db.put_vocab(vocab, token_bytes)
        _stage_done(work, key, stages, f"finalised:{i}")
    if len(targets) > 1 and "families" not in stages:
        res.notes += _families(targets, torch.from_numpy(np.asarray(sample[:sampled])))
        _stage_done(work, key, stages, "families")
    if feature_map and "maps" not in stages:
        res.notes += _maps(targets)
        _stage_done(work, key, stages, "maps")
    if "complete" not in stages:
        for t in targets:
            with FeatureDB.open(t.db_path) as db:
                with db.transaction():
                    db.set_meta({"complete": True})
                db.seal()
        _stage_done(work, key, stages, "complete")
    for i, (t, old) in enumerate(zip(targets, olds, strict=True)):
        if f"installed:{i}" not in stages:
            res.notes += _install(t, old, drew_map="maps" in stages)
            _stage_done(work, key, stages, f"installed:{i}")
    res.dbs = [t.final_path for t in targets]
    res.interesting = _interesting_from_db(targets[0])
    shutil.rmtree(work, ignore_errors=True)
    res.seconds = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- one batch, and the distributed pass


@dataclass
class _BatchOut:
    """What the pass keeps of one batch: the row policy used, kept rows, raw kept rows for families, and per
    SAE every active code (row within the batch, feature, activation; CPU)."""

    policy: RowPolicy
    kept: int
    sample: np.ndarray
    codes: list[tuple[Tensor, Tensor, Tensor]]


def _hook_points(lm: Any, sae: SAE) -> Any:
    """The HookPoint the SAE reads, or a crosscoder's hook points (a tuple: read side by side from one forward)."""
    if sae.cfg.arch == "crosscoder":
        return tuple(lm.hook(h) for h in str(sae.cfg.hook).split(","))
    return lm.hook(sae.cfg.hook)


def _hook_name(hp: Any) -> str:
    return ",".join(map(str, hp)) if isinstance(hp, tuple) else str(hp)


def _acts(lm: Any, hp: Any, ids: Tensor) -> Tensor:
    return lm.acts_many(hp, ids) if isinstance(hp, tuple) else lm.acts(hp, ids)


def _encode_batch(lm: Any, hp: Any, ids: Tensor, policy: RowPolicy | None, first: SAE, saes: list[SAE],
                  want_sample: int) -> _BatchOut:
    """Forward `ids` to the hook and encode with every SAE (the policy, when None, is the training store's,
    else measured on this batch); `want_sample` raw kept rows are returned for the families' correlation."""
    acts = _acts(lm, hp, ids)  # [B, T, d] float32 (a crosscoder's: [B, T, L·d])
    if policy is None:  # the training store's rows (as eval counts them), else measured here
        policy = _store_policy(first) or RowPolicy.measured(acts.cpu(), True, 10.0)
    keep = policy.keep(acts).reshape(-1).to(acts.device)
    x = acts.reshape(-1, acts.shape[-1])
    xs = x[keep][: max(want_sample, 0)].float().cpu().numpy()
    codes = []
    with torch.inference_mode():
        for sae in saes:
            f = sae.encode_raw(x)
            f[~keep] = 0
            r, fi = torch.nonzero(f > 0, as_tuple=True)  # every active code, by row
            v = f[r, fi].float().cpu()
            codes.append((r.cpu(), fi.cpu(), v))
    return _BatchOut(policy, int(keep.sum()), xs, codes)


def _rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast_plan(world: int, plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """Rank 0 tells the other ranks where the pass starts (None: nothing to do)."""
    if world == 1:
        return plan
    import torch.distributed as dist

    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _ordered_outputs(batches: Any, n_ctx: int, done: int, compute: Any, policy: RowPolicy | None, need: Any,
                     lm: Any, hp: Any, first: SAE) -> Any:
    """A distributed pass, on every rank: batches go in rounds of W, batch j of a round to rank j; each rank
    computes its own, and rank 0 gathers the round and yields (ids, _BatchOut) in corpus order, so its
    statistics, codes and checkpoints are exactly those of one process. A policy measured from the data
    comes from the session's first batch, computed by every rank alike."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    pending: list[Tensor] = []

    def round_() -> Any:
        box = [need() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        mine = compute(pending[rank], policy, int(box[0])) if rank < len(pending) else None
        outs: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(mine, outs, dst=0)
        if rank == 0:
            assert outs is not None
            yield from zip(list(pending), outs[: len(pending)], strict=True)
        pending.clear()

    for ids in batches:
        ids = ids[: n_ctx - done]
        if policy is None:
            policy = _store_policy(first) or RowPolicy.measured(_acts(lm, hp, ids).cpu(), True, 10.0)
        pending.append(ids)
        done += len(ids)
        if len(pending) == world or done >= n_ctx:
            yield from round_()
        if done >= n_ctx:
            break
    if pending:
        yield from round_()


def _features_worker(model_spec: str, device: str | None, compute_dtype: str, first: SAE, saes: list[SAE],
                     corp: Any, ctx_len: int, batch_contexts: int, n_ctx: int, t0: float) -> FeaturesResult:
    """A rank other than 0 of a distributed pass: its share of the forward and encode (`_ordered_outputs`)."""
    from monoscope.model import load_model

    plan = _broadcast_plan(_rank_world()[1], None)
    if plan is None or plan["streamed"]:
        return FeaturesResult([], 0, time.perf_counter() - t0, 0)
    lm = load_model(model_spec, device=device, compute_dtype=compute_dtype)
    hp = _hook_points(lm, first)
    done = int(plan["done"])
    policy = None if plan["policy"] is None else RowPolicy(**plan["policy"])
    batches = batched_contexts(lm, corp, ctx_len, batch_contexts, skip=done)
    for _ in _ordered_outputs(batches, n_ctx, done, lambda ids, pol, need: _encode_batch(
            lm, hp, ids, pol, first, saes, need), policy, lambda: 0, lm, hp, first):
        pass  # rank 0 alone receives outputs
    return FeaturesResult([], 0, time.perf_counter() - t0, 0)


def build_features_distributed(sae: str | Path, **kwargs: Any) -> FeaturesResult:
    """`build_features` on every process of a torchrun launch (same arguments everywhere): the batches are
    split over the ranks and rank 0 merges their codes in corpus order, so the database is the one a single
    process builds; rank 0 alone writes. Returns rank 0's result (an empty one elsewhere)."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise MonoscopeError(f"a distributed features pass needs torchrun's environment ({', '.join(missing)} "
                                 "not set): launch it with `torchrun --nproc-per-node N -m monoscope features ...`")
        dist.init_process_group("gloo")
    done = False
    try:
        result = build_features(sae, **kwargs)
        done = True
        return result
    except (RuntimeError, dist.DistError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise MonoscopeError(f"rank {dist.get_rank()} of {dist.get_world_size()}: a collective failed during the "
                             f"features pass ({first}): another rank died or failed: run the same command again to "
                             "resume from the last checkpoint") from e
    finally:
        if owned:
            from monoscope.train.distributed import end_process_group

            end_process_group(done)


# ----------------------------------------------------------------------------- state


def _memmap(path: Path, dtype: Any, shape: tuple[int, ...], resume: bool) -> np.memmap:
    mode = "r+" if resume and path.is_file() else "w+"
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)


def _save_state(work: Path, key: str, done: int, sampled: int, policy: RowPolicy, targets: list[_Target],
                maps: list[np.memmap], *, streamed: bool = False) -> None:
    """Flush the code files, then write the state atomically (the cursor never runs ahead of the data).
    `streamed`: the corpus part of the pass is over (the last batch is in)."""
    import io

    for m in maps:
        m.flush()
    buf = io.BytesIO()
    torch.save({"key": key, "done": done, "sampled": sampled, "policy": vars(policy), "streamed": streamed,
                "stats": [t.stats.state_dict() for t in targets]}, buf)
    write_bytes_atomic(work / "state.pt", buf.getvalue())


def _load_state(work: Path, key: str) -> dict[str, Any] | None:
    path = work / "state.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # a damaged state file: start over (the codes are rewritten)
        return None
    return state if state.get("key") == key else None


def _remove_db(path: Path) -> None:
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        p.unlink(missing_ok=True)


_STAGES = "stages.json"


def _load_stages(work: Path, key: str) -> set[str]:
    try:
        data = json.loads((work / _STAGES).read_text())
    except (OSError, ValueError):
        return set()
    return set(data.get("done") or []) if isinstance(data, dict) and data.get("key") == key else set()


def _stage_done(work: Path, key: str, stages: set[str], name: str) -> None:
    stages.add(name)
    write_json_atomic(work / _STAGES, {"key": key, "done": sorted(stages)})
    _kill_point(name)


def _redo(targets: list[_Target], stages: set[str]) -> set[int]:
    """The SAEs whose database must be (re)written. Stages after the databases (families, maps, complete,
    installs) stand only while every database they touched still exists; otherwise finalisation restarts."""
    def have(i: int) -> bool:
        return f"finalised:{i}" in stages and (targets[i].db_path.is_file() or f"installed:{i}" in stages)

    redo = {i for i in range(len(targets)) if not have(i)}
    if redo and any(not s.startswith("finalised:") for s in stages):
        keep = {f"finalised:{i}" for i, t in enumerate(targets) if i not in redo and t.db_path.is_file()}
        stages.intersection_update(keep)
        redo = {i for i in range(len(targets)) if f"finalised:{i}" not in stages}
    return redo


_OPTION_NAMES = {"saes": "SAE weights or --also", "model": "--model", "corpus": "--corpus (fingerprint)",
                 "ctx_len": "context length", "contexts": "--tokens (contexts)", "batch": "--batch-contexts",
                 "top_k": "top_k", "bins": "bins", "per_bin": "per_bin", "compute_dtype": "--compute-dtype",
                 "format": "pass format"}


def _differences(old: Any, new: dict[str, Any]) -> str:
    """What differs between the options a database was built with and this pass's, in a few words."""
    if not isinstance(old, dict):
        return "options not recorded in the database (built by an older monoscope)"
    out = []
    for k, v in new.items():
        if old.get(k) != v:
            name = _OPTION_NAMES.get(k, k)
            short = all(isinstance(x, int | float | str) and len(str(x)) <= 24 for x in (old.get(k), v))
            out.append(f"{name} {old.get(k)} -> {v}" if short else name)
    return ", ".join(out) or "the option digest"


def _existing(t: _Target, key: str, config: dict[str, Any], overwrite: bool) -> str:
    """What is at `t.final_path`: "none", "same" (complete, this pass's options), "stale" (another pass's
    options or unfinished: replaced), "damaged" (replaced, nothing carried over). Without `overwrite`, a
    complete database of other options, or a damaged one, is a one-line error saying what to do."""
    path = t.final_path
    if not path.exists():
        return "none"
    try:
        with FeatureDB.open(path, allow_old=True) as db:  # an older format: "other options" (pass format)
            db.check()
            meta = db.meta()
    except FeatureDBError as e:
        if overwrite:
            return "damaged"
        raise FeatureDBError(f"{e}".replace("SAE_DIR", str(t.sae_dir))) from None
    complete = bool(meta.get("complete"))
    if complete and meta.get("config_key") == key:
        return "same"
    if complete and not overwrite:
        raise FeatureDBError(f"{path} was built with other options ({_differences(meta.get('config'), config)}): "
                             f"rerun with --overwrite to rebuild it (the old database stays until the new one is "
                             "complete; explanations and scores whose evidence is unchanged are kept), or pass the "
                             "options it was built with")
    return "stale"


def _pending_overwrite(work: Path, key: str) -> bool:
    """Whether `work` holds an unfinished pass with these options that was started with `overwrite`."""
    try:
        return json.loads((work / _OVERWRITE).read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def _install(t: _Target, old: str, drew_map: bool) -> list[str]:
    """Carry the old database's explanations (and scores) whose evidence is unchanged into the new one,
    then rename the new one over it, then its feature map over the old map (`drew_map`; else an old map,
    which would describe the replaced database, goes). A rerun after a kill here finds the new database
    installed or not, and the map renamed or not, and finishes."""
    notes: list[str] = []
    if t.db_path.is_file():  # else installed before a kill
        notes += _install_db(t, old)
    if drew_map and t.map_path.is_file():
        os.replace(t.map_path, t.final_map)
    elif not drew_map and t.final_map.is_file():
        t.map_path.unlink(missing_ok=True)  # one an earlier, abandoned pass drew
        t.final_map.unlink()
        notes.append(f"removed {t.final_map}: it showed the replaced database (rebuild the map without --no-map)")
    return notes


def _install_db(t: _Target, old: str) -> list[str]:
    notes = []
    if t.final_path.is_file() and old in ("same", "stale"):
        from monoscope.interp.explain import carry_over

        try:
            with FeatureDB.open(t.final_path, allow_old=True) as src, FeatureDB.open(t.db_path) as dst:
                kept, scores, dropped = carry_over(src, dst, archive=t.final_path.parent / DROPPED_ARCHIVE)
            if kept or dropped:
                notes.append(f"{t.final_path}: kept {kept} explanations ({scores} scores) whose evidence is "
                             f"unchanged, dropped {dropped} whose evidence changed"
                             + (f" (saved in {t.final_path.parent / DROPPED_ARCHIVE})" if dropped else ""))
        except FeatureDBError as e:
            notes.append(f"explanations not carried over from {t.final_path}: {e}")
    elif old == "damaged":
        notes.append(f"replaced the damaged {t.final_path} (nothing could be carried over from it)")
    with FeatureDB.open(t.db_path) as db:  # the file alone must hold everything: it is renamed without its -wal
        db.seal()
    _remove_db(t.final_path)
    os.replace(t.db_path, t.final_path)
    _remove_db(t.db_path)  # any -wal/-shm left beside the renamed file (empty after the checkpoint)
    return notes


# ----------------------------------------------------------------------------- finalisation


def _window_acts(f: np.ndarray, ctx: np.ndarray, start: np.ndarray, codes: tuple[np.ndarray, np.ndarray, np.ndarray],
                 ctx_len: int, n_features: int, f0: int, f1: int, entry_rows: np.ndarray) -> np.ndarray:
    """[E, W] activations of feature f[e] over the window of context ctx[e] starting at start[e], for
    examples of features f0 ≤ f < f1 (W = WINDOW_BEFORE + WINDOW_AFTER; 0 past the context): one
    sequential read of the codes (`entry_rows[e]`: the row of code e), a run of contexts at a time, each
    code of those features found in a dense (context, feature) -> example table (no search per code)."""
    ptr, idx, val = codes
    W = WINDOW_BEFORE + WINDOW_AFTER
    key = ctx.astype(np.int64) * n_features + f
    uk, inv = np.unique(key, return_inverse=True)  # sorted by context, then feature
    out = np.zeros((len(uk), W), np.float32)
    if len(uk) == 0:
        return out
    ustart = np.zeros(len(uk), np.int64)
    ustart[inv] = start
    uctx, uf = uk // n_features, (uk % n_features - f0).astype(np.int64)
    c_lo, c_hi = int(uctx[0]), int(uctx[-1]) + 1
    span = max(1, min(c_hi - c_lo, (1 << 24) // (f1 - f0)))  # contexts per run: a table of <= 16M entries
    table = np.full((span, f1 - f0), -1, np.int32)
    for c0 in range(c_lo, c_hi, span):
        c1 = min(c0 + span, c_hi)
        ja, jb = (int(x) for x in np.searchsorted(uctx, [c0, c1]))
        if ja == jb:
            continue
        cells = (uctx[ja:jb] - c0, uf[ja:jb])
        table[cells] = np.arange(ja, jb, dtype=np.int32)
        ea, eb = int(ptr[c0 * ctx_len]), int(ptr[c1 * ctx_len])
        fe = np.asarray(idx[ea:eb]).astype(np.int64) - f0
        sel = np.flatnonzero((fe >= 0) & (fe < f1 - f0))
        row = entry_rows[sel + ea].astype(np.int64)
        j = table[row // ctx_len - c0, fe[sel]]
        off = row % ctx_len - ustart[j]
        hit = (j >= 0) & (off >= 0) & (off < W)
        out[j[hit], off[hit]] = np.asarray(val[ea:eb])[sel[hit]]
        table[cells] = -1
    return out[inv]


def _finalise(t: _Target, lm: Any, toks: np.ndarray, codes: tuple[np.ndarray, np.ndarray, np.ndarray],
              vocab: list[str], meta_common: dict[str, Any], bins: int, progress: bool) -> None:
    logit = _logit_effects(t.sae, lm)
    neigh = _neighbours(t.sae)
    cfg = t.sae.cfg
    meta = {**meta_common, "sae": {"path": str(t.sae_dir.resolve()), "weights_sha256": t.digest, "arch": cfg.arch,
                                   "d_sae": cfg.d_sae, "k": cfg.k}, "sae_key": t.key,
            "compute_dtype": {"model": lm.compute_dtype, "sae": str(t.sae.compute_dtype()).removeprefix("torch.")}}
    _remove_db(t.db_path)
    t.out.mkdir(parents=True, exist_ok=True)
    write_database(t.db_path, t.stats, toks, codes, vocab, meta, logit, neigh, bins, progress)


def write_database(path: Path, s: FeatureStats, toks: np.ndarray, codes: tuple[np.ndarray, np.ndarray, np.ndarray],
                   vocab: list[str], meta: dict[str, Any], logit: tuple[Tensor, Tensor, Tensor, Tensor],
                   neigh: tuple[Tensor, Tensor], bins: int, progress: bool = False, block: int = 32_768,
                   timings: dict[str, float] | None = None) -> None:
    """A new database at `path` from the pass's state: statistics, examples (windows cut from the sparse
    `codes` (ptr, idx, val) and the token ids `toks` [contexts, ctx_len]), cheap labels, logit effects
    (pos ids, pos values, neg ids, neg values [F, top]), neighbours (ids, cosines [F, top]), co-occurrence.
    Columns are computed with array ops over blocks of features and written with bulk inserts; the only
    per-feature Python is the cheap label and the JSON of its lists. `timings`: CPU seconds per phase are
    added to it (the benchmark's breakdown)."""
    clock = _PhaseClock(timings)
    F, T = s.d_sae, toks.shape[1]
    W = WINDOW_BEFORE + WINDOW_AFTER
    density, mean_act = s.density().numpy(), s.mean_act().numpy()
    fires, max_act, hist = s.fires.numpy(), s.max_act.numpy(), s.hist.numpy()
    qv, qc, qb, qp = (x.numpy() for x in s.quantile_examples(bins))
    tv, tc, tp = s.top_val.numpy(), s.top_ctx.numpy(), s.top_pos.numpy()
    co_ids, co_p = s.cooccurrence()
    co_p = np.round(co_p, 4)
    lp_i, lp_v, ln_i, ln_v = (x.cpu().numpy() for x in logit)
    lp_v, ln_v = np.round(lp_v.astype(np.float64), 4), np.round(ln_v.astype(np.float64), 4)
    ne_i, ne_c = neigh[0].numpy(), np.round(neigh[1].numpy().astype(np.float64), 4)
    # every example as flat columns, in primary-key order (feature, kind: quantile < top, rank)
    qf, qr = np.nonzero(qc >= 0)
    tf, tr = np.nonzero((tc >= 0) & (tv > 0))
    ex_f = np.concatenate([qf, tf])
    ex_top = np.concatenate([np.zeros(len(qf), bool), np.ones(len(tf), bool)])
    ex_rank = np.concatenate([qr, tr])
    order = np.argsort((ex_f.astype(np.int64) * 2 + ex_top) * (s.top_k + s.reservoir) + ex_rank)  # unique keys
    ex_f, ex_top, ex_rank = ex_f[order], ex_top[order], ex_rank[order]
    ex_bin = np.concatenate([qb[qf, qr], np.zeros(len(tf), np.int64)])[order]
    ex_act = np.concatenate([qv[qf, qr], tv[tf, tr]])[order].astype(np.float64)
    ex_ctx = np.concatenate([qc[qf, qr], tc[tf, tr]])[order]
    ex_pos = np.concatenate([qp[qf, qr], tp[tf, tr]])[order].astype(np.int64)
    ex_start = np.maximum(ex_pos - WINDOW_BEFORE + 1, 0)
    ex_len = np.minimum(W, T - ex_start)
    # the token each top example peaks on and the one before it (for the cheap labels)
    peak = toks[ex_ctx, ex_pos].astype(np.int64)
    prev = np.where(ex_pos > 0, toks[ex_ctx, np.maximum(ex_pos - 1, 0)], -1).astype(np.int64)
    n_top = np.bincount(tf, minlength=F)
    edges = json.dumps([float(e) for e in HIST_EDGES])
    vj, vr = [json.dumps(v) for v in vocab], [repr(v) for v in vocab]  # each token's JSON and repr, once
    tok_version = 2 if len(vocab) <= 1 << 16 and (toks.size == 0 or 0 <= int(toks.min()) <= int(toks.max()) < 1 << 16) \
        else 1  # uint16 token windows when every id fits
    flat = np.concatenate([np.ascontiguousarray(toks, dtype=np.int32).reshape(-1), np.zeros(W, np.int32)])
    windows = np.lib.stride_tricks.sliding_window_view(flat, W)  # row r: the W tokens from flat position r
    entry_rows = np.repeat(np.arange(len(codes[0]) - 1, dtype=np.int32), np.diff(codes[0]))  # each code's row
    hist_tpl = '{"edges": ' + edges + ', "counts": [' + ", ".join(["%d"] * hist.shape[1]) + "]}"

    clock("prepare")
    db = FeatureDB.create(path, {**meta, "n_features": F, "rows_counted": s.tokens, "cooccurrence": {
        "pairs_budget": s.cooc.budget, "exact": s.cooc.exact, "max_error": s.cooccurrence_error(),
        "note": "P(j | i) from a sparse pair table; once pruned, a reported value is low by at most max_error"}})
    label_rows: list[tuple[int, str]] = []
    with progress_bar("features: database", total=F, unit="feat", enabled=progress) as bar, db.bulk_load():
        db.put_vocab(vocab)
        for f0 in range(0, F, block):
            f1 = min(F, f0 + block)
            a, b = np.searchsorted(ex_f, [f0, f1])
            e = slice(a, b)
            clock("other")
            rec = np.empty(b - a, example_dtype(W, tok_version))  # every field is set below
            rec["kind"], rec["rank"], rec["bin"], rec["act"] = ex_top[e], ex_rank[e], ex_bin[e], ex_act[e]
            rec["context"], rec["position"] = ex_ctx[e], ex_pos[e] - ex_start[e]
            rec["ntok"] = rec["nact"] = ex_len[e]
            rec["tokens"] = windows[ex_ctx[e] * T + ex_start[e]]  # past ntok: the next context's (not read)
            clock("example windows")
            rec["acts"] = _window_acts(ex_f[e], ex_ctx[e], ex_start[e], codes, T, F, f0, f1, entry_rows)
            clock("example activations")
            packed = packed_example_rows(ex_f[e], rec)
            clock("example packing")
            db.put_packed_examples(packed)
            clock("sqlite examples")
            it = np.flatnonzero(ex_top[e]) + a  # the block's top examples
            labels, infos, purity = _cheap_labels(f0, f1, ex_f[it], ex_rank[it], peak[it], prev[it], n_top,
                                                  lp_i[:, :5], vocab, vj, vr)
            label_rows += [(f, lab) for f, lab in zip(range(f0, f1), labels, strict=True) if lab]
            clock("cheap labels")
            d = density[f0:f1]
            distinct = n_top[f0:f1]
            interest = np.where((d >= INTEREST_DENSITY[0]) & (d <= INTEREST_DENSITY[1]) & (distinct >= 5),
                                purity * (1 + np.minimum(distinct, 20) / 20) * (max_act[f0:f1] > 0), 0.0)
            rows = list(zip(
                range(f0, f1), d.tolist(), fires[f0:f1].tolist(), max_act[f0:f1].astype(np.float64).tolist(),
                mean_act[f0:f1].tolist(), [hist_tpl % tuple(h) for h in hist[f0:f1].tolist()], labels, infos,
                pack_pair_lists(PAIRS_TOKENS, lp_i[f0:f1], lp_v[f0:f1]),
                pack_pair_lists(PAIRS_TOKENS, ln_i[f0:f1], ln_v[f0:f1]),
                pack_pair_lists(PAIRS_FEATURES, ne_i[f0:f1], ne_c[f0:f1]),
                pack_pair_lists(PAIRS_FEATURES_POSITIVE, co_ids[f0:f1], co_p[f0:f1]),
                itertools.repeat(None), itertools.repeat(None), interest.tolist(), strict=False))
            clock("feature columns (JSON)")
            db.put_feature_rows(rows)
            clock("sqlite features")
            bar.update(f1 - f0)
        db.index_labels(label_rows)
        clock("sqlite label index")
    db.close()
    clock("sqlite commit and close")


class _PhaseClock:
    """Adds the CPU seconds since the previous call to `timings[phase]` (nothing when timings is None)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings, self.t = timings, time.process_time()

    def __call__(self, phase: str) -> None:
        if self.timings is not None:
            now = time.process_time()
            self.timings[phase] = self.timings.get(phase, 0.0) + now - self.t
            self.t = now


def _cheap_labels(f0: int, f1: int, ef: np.ndarray, rank: np.ndarray, peak: np.ndarray, prev: np.ndarray,
                  n_top: np.ndarray, promoted: np.ndarray, vocab: list[str], vocab_json: list[str],
                  vocab_repr: list[str]) -> tuple[list[str], list[str], np.ndarray]:
    """Labels without an LLM for features f0 ≤ f < f1, from their top examples (feature ef, rank, the
    token of the peak and the one before it, -1 at a context start): the (up to) 3 most common peak
    tokens (ties: the stronger example first) and, when one (previous, peak) bigram covers at least
    max(3, n/3) of the n examples, that bigram; then the 3 tokens the feature promotes most.
    Returns (labels, label evidence as JSON, purity = share of examples whose peak is one of the 3)."""
    n = f1 - f0
    K = int(rank.max(initial=0)) + 2
    labels, infos, purity = [""] * n, ["{}"] * n, np.zeros(n)
    if len(ef) == 0:
        return labels, infos, purity
    V = len(vocab)
    # (feature, token) counts and first rank; sorted by feature, count descending, first rank
    key = ef.astype(np.int64) * V + peak
    uk, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
    first_rank = np.full(len(uk), K, np.int64)
    np.minimum.at(first_rank, inv, rank)
    uf, ut = uk // V, uk % V
    order = np.argsort((uf * K + (K - cnt)) * K + first_rank)
    uf, ut, cnt = uf[order], ut[order], cnt[order]
    pos_in = np.arange(len(uf)) - np.searchsorted(uf, uf)
    top3 = pos_in < 3
    covered = np.bincount(uf[top3] - f0, weights=cnt[top3], minlength=n)
    tot = n_top[f0:f1]
    purity = np.where(tot > 0, covered / np.maximum(tot, 1), 0.0)
    common: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for f, t, c in zip((uf[top3] - f0).tolist(), ut[top3].tolist(), cnt[top3].tolist(), strict=True):
        common[f].append((t, c))
    # the most common bigram of each feature (ties: first seen)
    ok = prev >= 0
    bkey = (ef[ok].astype(np.int64) * V + prev[ok]) * V + peak[ok]
    bigram: dict[int, tuple[int, int, int]] = {}
    if len(bkey):
        bu, binv, bcnt = np.unique(bkey, return_inverse=True, return_counts=True)
        bfirst = np.full(len(bu), K, np.int64)
        np.minimum.at(bfirst, binv, rank[ok])
        bf = bu // (V * V)
        o = np.argsort((bf * K + (K - bcnt)) * K + bfirst)
        best = o[np.concatenate([[True], bf[o][1:] != bf[o][:-1]])]
        for f, b, c in zip(bf[best].tolist(), bu[best].tolist(), bcnt[best].tolist(), strict=True):
            bigram[f - f0] = ((b // V) % V, b % V, c)
    pr = promoted[f0:f1].tolist()
    for j in range(n):
        if not common[j]:
            continue
        m = int(tot[j])
        label = " | ".join(vocab_repr[t] for t, _ in common[j])
        bg = bigram.get(j)
        bg_json = "null"
        if bg is not None:
            bg_json = f"[{json.dumps(vocab[bg[0]] + vocab[bg[1]])}, {bg[2]}]"
            if bg[2] >= max(3, m // 3):
                label = f"{vocab[bg[0]] + vocab[bg[1]]!r} ({label})"
        if pr[j]:
            label += " → " + " ".join(vocab_repr[i] for i in pr[j][:3])
        labels[j] = label
        peaks = ", ".join(f"[{vocab_json[t]}, {c}]" for t, c in common[j])
        infos[j] = (f'{{"peak_tokens": [{peaks}], "bigram": {bg_json}, "promoted": '
                    f'[{", ".join(vocab_json[i] for i in pr[j][:5])}], "purity": {round(float(purity[j]), 4)!r}}}')
    return labels, infos, purity


def _final_norm(lm: Any) -> Any:
    base = lm.model.base_model
    for name in ("norm", "ln_f", "final_layer_norm", "final_norm"):
        mod = getattr(base, name, None)
        if mod is not None:
            return mod
    raise MonoscopeError(f"cannot find the final norm of {type(lm.model).__name__}: logit effects unavailable")


@torch.inference_mode()
def _logit_effects(sae: SAE, lm: Any, top: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per feature, the tokens its decoder direction most promotes and suppresses through the final
    norm (applied to the direction alone: its gain, at unit RMS) and the unembedding: (promoted ids,
    their effects, suppressed ids, their effects (negative)) [F, top]. A crosscoder's direction is the block
    it writes to the last layer it reads, the one nearest the unembedding (its direct effect)."""
    norm = _final_norm(lm)
    W_U = lm.model.get_output_embeddings().weight.float()  # [V, d]
    dev = W_U.device
    base = norm(torch.zeros(1, 1, W_U.shape[1], device=dev)).float().reshape(-1) @ W_U.T  # a LayerNorm's bias
    out: list[list[Tensor]] = [[], [], [], []]
    W = sae.W_dec.float().to(dev)[:, -W_U.shape[1]:]  # a crosscoder: the block it writes to its last layer
    for s0 in range(0, W.shape[0], 1024):
        d = W[s0: s0 + 1024]
        d = d / d.square().mean(1, keepdim=True).sqrt().clamp_min(1e-12)
        eff = norm(d[:, None, :]).float().reshape(d.shape[0], -1) @ W_U.T - base  # [c, V]
        pv, pi = eff.topk(top, dim=1)
        nv, ni = (-eff).topk(top, dim=1)
        for o, x in zip(out, (pi, pv, ni, -nv), strict=True):
            o.append(x.cpu())
    pi_, pv_, ni_, nv_ = (torch.cat(o) for o in out)
    return pi_, pv_, ni_, nv_


@torch.inference_mode()
def _neighbours(sae: SAE, top: int = 10) -> tuple[Tensor, Tensor]:
    """[F, top] ids and cosines of the nearest other features by decoder direction."""
    from monoscope.sae.base import bf16_is_fast

    W = sae.W_dec.float()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if bf16_is_fast(W.device) and W.shape[0] > 16_384:  # 262k features: 79 TFLOP in fp32, ~4x less time in bf16
        W = W.bfloat16()
    ids, cos = [], []
    k = min(top, W.shape[0] - 1)
    for s0 in range(0, W.shape[0], 2048):
        sim = W[s0: s0 + 2048] @ W.T
        sim[torch.arange(sim.shape[0]), torch.arange(s0, s0 + sim.shape[0])] = -2.0
        c, i = sim.topk(k, dim=1)
        ids.append(i.cpu())
        cos.append(c.float().cpu())
    return torch.cat(ids), torch.cat(cos)


# ----------------------------------------------------------------------------- across SAEs


def _families(targets: list[_Target], acts: Tensor) -> list[str]:
    """Feature families between every pair of SAEs (narrower = parent) by decoder cosine, with the
    activation correlation on `acts` (raw rows read by the pass), stored in both databases."""
    try:
        from monoscope.features import families as fam
    except ImportError:
        return ["feature families not computed: monoscope.features.families is missing"]
    order = sorted(targets, key=lambda t: t.sae.cfg.d_sae)
    notes = []
    for a, b in itertools.pairwise(order):
        matches = fam.match_features(a.sae, b.sae, acts.to(a.sae.W_dec.device) if len(acts) else None)
        for t in (a, b):
            with FeatureDB.open(t.db_path) as db, db.transaction():
                fam.store_families(db, a.key, b.key, matches)
                db.set_meta({"families": sorted({*db.meta().get("families", []), f"{a.key}->{b.key}"}),
                             f"sae_dir:{a.key}": str(a.sae_dir), f"sae_dir:{b.key}": str(b.sae_dir)})
        notes.append(f"families: {len(matches):,} features of {b.sae_dir} matched to {a.sae_dir}")
    return notes


def _maps(targets: list[_Target]) -> list[str]:
    try:
        from monoscope.features import layout
    except ImportError:
        return ["feature map not computed: monoscope.features.layout is missing"]
    notes = []
    for t in targets:
        xy = layout.feature_map(t.sae.W_dec.detach().float().cpu())
        with FeatureDB.open(t.db_path) as db:
            with db.transaction():
                layout.store_map(db, xy)
            density = db.column("density")
        layout.plot_feature_map(xy, density, t.map_path, title=f"{t.sae_dir} ")  # installed with the database
        notes.append(f"feature map: {t.final_map}")
    return notes


_INTEREST_DOC = (
    "interest = purity x (1 + min(distinct top contexts, 20)/20) for features with density in [1e-4, 1e-2] and "
    "top examples from >= 5 distinct contexts, else 0; purity = share of the top examples whose peak token is "
    "one of the 3 most common peak tokens (a feature that fires on a consistent token or pattern, often enough "
    "to have evidence, rarely enough to be specific)"
)


def _interesting_from_db(t: _Target, n: int = 3) -> list[Interesting]:
    with FeatureDB.open(t.final_path) as db:
        rows = db.most_interesting(n)
    return [Interesting(t.sae_dir, r["id"], str(r["label"]), float(r["interest"]), float(r["density"]))
            for r in rows]
