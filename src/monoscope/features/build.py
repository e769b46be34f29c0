"""`build_features()`: one streaming pass (model forward to the hook, SAE encode) that fills each SAE's
feature database: statistics, top and quantile examples, histograms, logit effects, neighbours,
co-occurrence, cheap labels; then families across widths and the feature map.

    res = build_features("runs/default/sae", also=["runs/default/sae-4x"], tokens="1M")

The pass keeps, per SAE, `FeatureStats` and writes the sparse codes and the token ids to memory-mapped
files in `<features>/.pass/`; at the end the example windows are cut from those.

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
from collections import Counter
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
from monoscope.features.db import DB_NAME, FeatureDB, FeatureDBError, default_db_path
from monoscope.features.stats import FeatureStats
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


def _resolve_inputs(sae: SAE, model: str | None, corpus: str | None) -> tuple[str, str, int]:
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
    width: int  # L: codes kept per token

    @property
    def db_path(self) -> Path:
        """Where the pass builds the database (renamed to `final_path` once complete)."""
        return self.out / NEW_DB_NAME

    @property
    def final_path(self) -> Path:
        return self.out / DB_NAME


def _code_width(sae: SAE) -> int:
    k = sae.cfg.k
    return int(k) if k else 64


# ----------------------------------------------------------------------------- the pass


@locks_folders(lambda a: [default_features_dir(Path(d)) for d in (a["sae"], *a["also"])], "features")
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
    dev = resolve_device(device)
    dirs = [Path(sae), *(Path(a) for a in also)]
    saes = []
    for d in dirs:
        if not d.exists():
            raise MonoscopeError(f"SAE folder {d} does not exist: train one with monoscope train --out {d}")
        saes.append(load_any(d, device=dev).eval())
    first = saes[0]
    for d, s in zip(dirs[1:], saes[1:], strict=True):
        if s.cfg.d_in != first.cfg.d_in or (s.cfg.hook and first.cfg.hook and s.cfg.hook != first.cfg.hook):
            raise MonoscopeError(f"--also {d} reads {s.cfg.hook} (d_in {s.cfg.d_in}) but {dirs[0]} reads "
                                 f"{first.cfg.hook} (d_in {first.cfg.d_in}): every SAE of one pass reads the same hook")
    model_spec, corpus_spec, ctx_len = _resolve_inputs(first, model, corpus)
    n_ctx = max(1, n_tokens // ctx_len)
    widest = max(s.cfg.d_sae for s in saes)  # the dense codes of a batch stay under ~1 GB (262k features: 8 contexts)
    batch_contexts = max(1, min(batch_contexts, 2**28 // (ctx_len * widest)))
    from monoscope.features.families import sae_key

    targets = []
    for d, s in zip(dirs, saes, strict=True):
        key_ = sae_key(d, loaded=s)
        targets.append(_Target(d, s, weights_sha256(d) or key_, key_, default_features_dir(d),
                               FeatureStats(s.cfg.d_sae, top_k=top_k, reservoir=bins * per_bin), _code_width(s)))
    corp = open_corpus(corpus_spec)
    config = {
        "saes": [t.digest for t in targets], "model": model_spec, "corpus": corp.fingerprint(), "ctx_len": ctx_len,
        "contexts": n_ctx, "batch": batch_contexts, "top_k": top_k, "bins": bins, "per_bin": per_bin,
        "compute_dtype": compute_dtype, "format": 1,
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

    t0 = time.perf_counter()
    olds = [_existing(t, key, config, overwrite) for t in targets]
    if not overwrite and all(o == "same" for o in olds):
        res = FeaturesResult([t.final_path for t in targets], n_ctx * ctx_len, 0.0, 0)
        res.interesting = _interesting_from_db(targets[0])
        res.notes.append("already complete: nothing to do")
        return res

    work = targets[0].out / ".pass"
    work.mkdir(parents=True, exist_ok=True)
    had_state = (work / "state.pt").is_file()
    state = _load_state(work, key)  # an unfinished pass with these options resumes (with --overwrite too)
    if state is None:
        (work / _STAGES).unlink(missing_ok=True)
    stages = _load_stages(work, key)
    lm = load_model(model_spec, device=device, compute_dtype=compute_dtype)
    hp = lm.hook(first.cfg.hook)
    if lm.d_model != first.cfg.d_in:
        raise MonoscopeError(f"model {model_spec} is {lm.d_model} wide at {hp} but the SAE reads d_in "
                             f"{first.cfg.d_in}: pass the model the SAE was trained on with --model")
    toks = _memmap(work / "tokens.i32", np.int32, (n_ctx, ctx_len), state is not None)
    idx_maps = [_memmap(work / f"codes{i}.idx", np.int32, (n_ctx * ctx_len, t.width), state is not None)
                for i, t in enumerate(targets)]
    val_maps = [_memmap(work / f"codes{i}.val", np.float16, (n_ctx * ctx_len, t.width), state is not None)
                for i, t in enumerate(targets)]
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
    with progress_bar("features", total=n_ctx * ctx_len, unit="tok", enabled=progress) as bar:
        bar.update(done * ctx_len)
        batches = iter(()) if streamed else batched_contexts(lm, corp, ctx_len, batch_contexts, skip=done)
        since_ckpt = n_ckpt = 0
        for ids in batches:
            ids = ids[: n_ctx - done]
            acts = lm.acts(hp, ids)  # [B, T, d] float32
            if policy is None:
                policy = RowPolicy.measured(acts.cpu(), True, 10.0)
            keep = policy.keep(acts).reshape(-1).to(acts.device)
            x = acts.reshape(-1, acts.shape[-1])
            ctx_ids = torch.arange(done, done + len(ids))
            rows = slice(done * ctx_len, (done + len(ids)) * ctx_len)
            toks[done: done + len(ids)] = ids.numpy().astype(np.int32)
            if sampled < FAMILY_ROWS:  # raw rows kept for the activation correlation of families
                xs = x[keep][: FAMILY_ROWS - sampled].float().cpu().numpy()
                sample[sampled: sampled + len(xs)] = xs
                sampled += len(xs)
            with torch.inference_mode():
                for t, im, vm in zip(targets, idx_maps, val_maps, strict=True):
                    f = t.sae.encode_raw(x)
                    f[~keep] = 0
                    val, idx = f.topk(t.width, dim=1)
                    val, idx = val.clamp_min(0).cpu(), idx.cpu()
                    t.stats.update(idx, val, ctx_ids, ctx_len)
                    im[rows] = idx.numpy().astype(np.int32)
                    vm[rows] = val.numpy().astype(np.float16)
            done += len(ids)
            new += len(ids)
            since_ckpt += 1
            bar.update(len(ids) * ctx_len)
            if since_ckpt >= checkpoint_every and done < n_ctx:
                _save_state(work, key, done, sampled, policy, targets, [toks, sample, *idx_maps, *val_maps])
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
        _save_state(work, key, done, sampled, policy, targets, [toks, sample, *idx_maps, *val_maps], streamed=True)
        _kill_point("streamed")
    seconds = time.perf_counter() - t0

    meta_common = {"model": model_spec, "hook": str(hp), "corpus": {"spec": corpus_spec,
                   "fingerprint": corp.fingerprint()}, "tokens": done * ctx_len, "ctx_len": ctx_len,
                   "config_key": key, "created_by": f"monoscope {__version__}", "bins": bins, "top_k": top_k,
                   "interest_criterion": _INTEREST_DOC, "row_policy": vars(policy)}
    meta_common["config"] = config  # what a later pass with other options lists as different
    token_bytes = vocab_bytes(lm.tokenizer)
    vocab = vocab_texts(lm.tokenizer, token_bytes)  # a token holding part of a character: <0xNN>, not U+FFFD
    res = FeaturesResult([], done * ctx_len, seconds, new * ctx_len, stream_seconds=seconds)
    if had_state and state is None:
        res.notes.append(f"an unfinished pass in {work} with other options (or a damaged state) was started over")
    # finalisation in stages, each recorded once done (a rerun after a kill skips the finished ones)
    redo = _redo(targets, stages)
    for i, t in enumerate(targets):
        if i not in redo:
            continue
        _finalise(t, lm, np.asarray(toks[:done]), idx_maps[i], val_maps[i], vocab, meta_common, bins, per_bin,
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
            res.notes += _install(t, old)
            _stage_done(work, key, stages, f"installed:{i}")
    res.dbs = [t.final_path for t in targets]
    res.interesting = _interesting_from_db(targets[0])
    shutil.rmtree(work, ignore_errors=True)
    res.seconds = time.perf_counter() - t0
    return res


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
        with FeatureDB.open(path) as db:
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


def _install(t: _Target, old: str) -> list[str]:
    """Carry the old database's explanations (and scores) whose evidence is unchanged into the new one,
    then rename the new one over it. A rerun after a kill here finds the new database installed or not."""
    if not t.db_path.is_file():  # installed before a kill
        return []
    notes = []
    if t.final_path.is_file() and old in ("same", "stale"):
        from monoscope.interp.explain import carry_over

        try:
            with FeatureDB.open(t.final_path) as src, FeatureDB.open(t.db_path) as dst:
                kept, scores, dropped = carry_over(src, dst)
            if kept or dropped:
                notes.append(f"{t.final_path}: kept {kept} explanations ({scores} scores) whose evidence is "
                             f"unchanged, dropped {dropped} whose evidence changed")
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


def _windows(fids: Tensor, ctxs: Tensor, toks: np.ndarray, idx_map: np.memmap, val_map: np.memmap,
             ctx_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For examples (feature f, context c): (position of f's maximum in c, window start, window tokens
    [E, W], window activations of f [E, W]); W = WINDOW_BEFORE + WINDOW_AFTER, short windows padded -1/0."""
    c = ctxs.numpy()
    W = WINDOW_BEFORE + WINDOW_AFTER
    if len(c) == 0:  # a chunk of features none of which fired
        return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, W), np.int64), np.zeros((0, W), np.float32))
    rows = (c[:, None] * ctx_len + np.arange(ctx_len)[None, :]).reshape(-1)  # [E·T]
    idx = torch.from_numpy(np.asarray(idx_map[rows])).view(len(c), ctx_len, -1)
    val = torch.from_numpy(np.asarray(val_map[rows]).astype(np.float32)).view(len(c), ctx_len, -1)
    act = (val * (idx == fids[:, None, None])).sum(-1)  # [E, T] activation of f at every position
    pos = act.argmax(1)
    start = (pos - WINDOW_BEFORE + 1).clamp_min(0)
    off = start[:, None] + torch.arange(W)[None, :]  # [E, W]
    valid = off < ctx_len
    offc = off.clamp_max(ctx_len - 1)
    wt = torch.from_numpy(toks[c]).long().gather(1, offc)
    wa = act.gather(1, offc)
    return (pos.numpy(), start.numpy(), torch.where(valid, wt, -1).numpy(), torch.where(valid, wa, 0.0).numpy())


def _finalise(t: _Target, lm: Any, toks: np.ndarray, idx_map: np.memmap, val_map: np.memmap, vocab: list[str],
              meta_common: dict[str, Any], bins: int, per_bin: int, progress: bool) -> None:
    s = t.stats
    F = t.sae.cfg.d_sae
    ctx_len = toks.shape[1]
    density, mean_act = s.density(), s.mean_act()
    qv, qc, qb = s.quantile_examples(bins)
    logit_pos, logit_neg = _logit_effects(t.sae, lm)
    neigh_i, neigh_c = _neighbours(t.sae)
    cooc = s.cooccurrence()
    _remove_db(t.db_path)
    t.out.mkdir(parents=True, exist_ok=True)
    db = FeatureDB.create(t.db_path, {
        **meta_common, "sae": {"path": str(t.sae_dir.resolve()), "weights_sha256": t.digest, "arch": t.sae.cfg.arch,
                               "d_sae": F, "k": t.sae.cfg.k}, "sae_key": t.key, "n_features": F})
    edges = [float(e) for e in torch.logspace(-3, 3, 49)]
    label_rows: list[tuple[int, str]] = []
    with progress_bar("features: examples", total=F, unit="feat", enabled=progress) as bar, db.transaction():
        db.put_vocab(vocab)
        chunk = 64
        for s0 in range(0, F, chunk):
            fs = torch.arange(s0, min(F, s0 + chunk))
            ex_rows, feat_rows = [], []
            # top examples
            tv, tc = s.top_val[fs], s.top_ctx[fs]
            ok = (tc >= 0) & (tv > 0)
            ef, er = torch.nonzero(ok, as_tuple=True)
            top = _windows(fs[ef], tc[ef, er], toks, idx_map, val_map, ctx_len)
            # quantile examples: per_bin per bin, evenly spaced within the bin's samples
            qok = qc[fs] >= 0
            qf, qr = torch.nonzero(qok, as_tuple=True)
            qwin = _windows(fs[qf], qc[fs][qf, qr], toks, idx_map, val_map, ctx_len)
            for j, (fi, ri) in enumerate(zip(ef.tolist(), er.tolist(), strict=True)):
                ex_rows.append((int(fs[fi]), "top", ri, 0, float(tv[fi, ri]), int(tc[fi, ri]),
                                int(top[0][j] - top[1][j]), _trim(top[2][j]), _trim_acts(top[2][j], top[3][j])))
            for j, (fi, ri) in enumerate(zip(qf.tolist(), qr.tolist(), strict=True)):
                f_id = int(fs[fi])
                ex_rows.append((f_id, "quantile", ri, int(qb[f_id, ri]), float(qv[f_id, ri]), int(qc[f_id, ri]),
                                int(qwin[0][j] - qwin[1][j]), _trim(qwin[2][j]), _trim_acts(qwin[2][j], qwin[3][j])))
            db.put_examples(ex_rows)
            by_feature: list[list[int]] = [[] for _ in range(len(fs))]  # top examples of each feature
            for j, e in enumerate(ef.tolist()):
                by_feature[e].append(j)
            for fi, f_id in enumerate(fs.tolist()):
                mine = by_feature[fi]
                max_toks = [int(top[2][j][top[0][j] - top[1][j]]) for j in mine]
                prev_toks = [int(top[2][j][top[0][j] - top[1][j] - 1]) if top[0][j] - top[1][j] > 0 else -1
                             for j in mine]
                label, info, purity = _cheap_label(max_toks, prev_toks, logit_pos[f_id], vocab)
                distinct = len({int(tc[fi, er[j]]) for j in mine})
                d = float(density[f_id])
                interest = (purity * (1 + min(distinct, 20) / 20) * float(s.max_act[f_id] > 0)
                            if INTEREST_DENSITY[0] <= d <= INTEREST_DENSITY[1] and distinct >= 5 else 0.0)
                row = {
                    "id": f_id, "density": d, "fires": int(s.fires[f_id]), "max_act": float(s.max_act[f_id]),
                    "mean_act": float(mean_act[f_id]),
                    "hist": {"edges": edges, "counts": s.hist[f_id].tolist()},
                    "label": label, "label_tokens": info,
                    "logit_pos": [[vocab[i], round(v, 4)] for i, v in logit_pos[f_id]],
                    "logit_neg": [[vocab[i], round(v, 4)] for i, v in logit_neg[f_id]],
                    "neighbours": [[int(i), round(float(c), 4)] for i, c in zip(neigh_i[f_id], neigh_c[f_id],
                                                                               strict=True)],
                    "cooccur": None if cooc is None else [[int(i), round(float(p), 4)] for i, p in
                                                          zip(cooc[0][f_id], cooc[1][f_id], strict=True) if p > 0],
                    "interest": interest,
                }
                feat_rows.append(row)
                if label:
                    label_rows.append((f_id, label))
            db.put_features(feat_rows)
            bar.update(len(fs))
        db.index_labels(label_rows)
    db.close()


def _trim(tokens: np.ndarray) -> np.ndarray:
    return tokens[tokens >= 0]


def _trim_acts(tokens: np.ndarray, acts: np.ndarray) -> np.ndarray:
    return acts[tokens >= 0]


def _cheap_label(max_toks: list[int], prev_toks: list[int], logit: list[tuple[int, float]],
                 vocab: list[str]) -> tuple[str, dict[str, Any], float]:
    """A label without an LLM: the tokens the feature peaks on in its top examples (and the bigram when
    one dominates), plus the tokens it promotes. Returns (label, evidence, purity = share of the top
    examples whose peak token is one of the label's tokens)."""
    if not max_toks:
        return "", {}, 0.0
    counts = Counter(max_toks)
    common = counts.most_common(3)
    purity = sum(c for _, c in common) / len(max_toks)
    bigrams = Counter((p, m) for p, m in zip(prev_toks, max_toks, strict=True) if p >= 0).most_common(1)
    parts = [repr(vocab[t]) for t, _ in common]
    label = " | ".join(parts)
    if bigrams and bigrams[0][1] >= max(3, len(max_toks) // 3):
        (p, m), _ = bigrams[0]
        label = f"{vocab[p] + vocab[m]!r} ({label})"
    if logit:
        label += " → " + " ".join(repr(vocab[i]) for i, _ in logit[:3])
    info = {"peak_tokens": [[vocab[t], c] for t, c in common],
            "bigram": None if not bigrams else [vocab[bigrams[0][0][0]] + vocab[bigrams[0][0][1]], bigrams[0][1]],
            "promoted": [vocab[i] for i, _ in logit[:5]], "purity": round(purity, 4)}
    return label, info, purity


def _final_norm(lm: Any) -> Any:
    base = lm.model.base_model
    for name in ("norm", "ln_f", "final_layer_norm", "final_norm"):
        mod = getattr(base, name, None)
        if mod is not None:
            return mod
    raise MonoscopeError(f"cannot find the final norm of {type(lm.model).__name__}: logit effects unavailable")


@torch.inference_mode()
def _logit_effects(sae: SAE, lm: Any, top: int = 10) -> tuple[list[list[tuple[int, float]]],
                                                              list[list[tuple[int, float]]]]:
    """Per feature, the tokens its decoder direction most promotes and suppresses through the final
    norm (applied to the direction alone: its gain, at unit RMS) and the unembedding."""
    norm = _final_norm(lm)
    W_U = lm.model.get_output_embeddings().weight.float()  # [V, d]
    dev = W_U.device
    base = norm(torch.zeros(1, 1, W_U.shape[1], device=dev)).float().reshape(-1) @ W_U.T  # a LayerNorm's bias
    pos, neg = [], []
    W = sae.W_dec.float().to(dev)
    for s0 in range(0, W.shape[0], 1024):
        d = W[s0: s0 + 1024]
        d = d / d.square().mean(1, keepdim=True).sqrt().clamp_min(1e-12)
        eff = norm(d[:, None, :]).float().reshape(d.shape[0], -1) @ W_U.T - base  # [c, V]
        pv, pi = eff.topk(top, dim=1)
        nv, ni = (-eff).topk(top, dim=1)
        pos += [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(pi, pv, strict=True)]
        neg += [list(zip(i.tolist(), (-v).tolist(), strict=True)) for i, v in zip(ni, nv, strict=True)]
    return pos, neg


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
        layout.plot_feature_map(xy, density, t.out / "feature_map.png", title=f"{t.sae_dir} ")
        notes.append(f"feature map: {t.out / 'feature_map.png'}")
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
