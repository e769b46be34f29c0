"""Capture: run a corpus through a model to one hook point and write an activation store.

    monoscope capture --model default --corpus default --hook resid_post.15 --tokens 1M --out runs/x/acts

The forward stops right after the hooked block. Contexts are formed deterministically from the
corpus, batched so that every shard boundary is a batch boundary, and written shard by shard; a
killed capture run again with the same arguments resumes and ends with the same bytes as an
uninterrupted one. Run again on a finished store, it checks every shard and recomputes exactly the
damaged or missing ones (the writer says which), so `monoscope verify`'s advice to rerun is true.
The store folder is locked for the whole run: one writer per folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monoscope import __version__
from monoscope.corpus import Corpus, open_corpus
from monoscope.corpus.contexts import batched_contexts
from monoscope.errors import MonoscopeError, StoreError
from monoscope.locking import FolderLock
from monoscope.model import LoadedModel, load_model
from monoscope.model.hooks import HookPoint
from monoscope.progress import progress_bar
from monoscope.store.manifest import Manifest, RowPolicy
from monoscope.store.writer import StoreWriter
from monoscope.units import parse_count

STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class CaptureConfig:
    """What determines a store's content; two captures with equal configs write equal bytes."""

    tokens: int
    """How many tokens to capture (rounded up to whole contexts); the corpus may run out first."""
    ctx_len: int = 128
    """Tokens per context, BOS included."""
    dtype: str = "bfloat16"
    """Storage dtype: bfloat16 halves the disk of float32 at a relative error of ~0.2% per row."""
    batch_contexts: int = 32
    """Contexts per forward pass."""
    contexts_per_shard: int = 128
    """Contexts per shard file (a multiple of batch_contexts): ~19 MB for d_model 576 in bf16."""
    exclude_bos: bool = True
    """Mark position 0 as not-for-training (see RowPolicy)."""
    outlier_factor: float = 10.0
    """Mark rows whose norm exceeds this multiple of the median as not-for-training; 0 disables."""

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise MonoscopeError(f"--tokens {self.tokens}: must be a positive number of tokens, e.g. 1M")
        if self.ctx_len < 2:
            raise MonoscopeError(f"--ctx-len {self.ctx_len}: must be at least 2 (BOS plus one token)")
        if self.dtype not in STORE_DTYPES:
            raise MonoscopeError(f"--dtype {self.dtype!r}: use one of {', '.join(STORE_DTYPES)}")
        if self.batch_contexts <= 0 or self.contexts_per_shard <= 0:
            raise MonoscopeError("--batch-contexts and --contexts-per-shard must be positive")
        if self.contexts_per_shard % self.batch_contexts:
            raise MonoscopeError(
                f"--contexts-per-shard {self.contexts_per_shard} must be a multiple of --batch-contexts "
                f"{self.batch_contexts}, so a resumed capture batches exactly like an uninterrupted one"
            )
        if self.outlier_factor < 0:
            raise MonoscopeError(f"--outlier-factor {self.outlier_factor}: must be >= 0 (0 disables)")

    @property
    def n_contexts(self) -> int:
        return -(-self.tokens // self.ctx_len)


@dataclass(frozen=True)
class CaptureResult:
    folder: Path
    manifest: Manifest
    resumed_contexts: int  # contexts found already written (0 for a fresh capture)
    new_tokens: int
    seconds: float
    repaired_shards: int = 0  # shards of a finished store that were damaged or missing and were captured again

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def tokenizer_record(lm: LoadedModel) -> dict[str, Any]:
    bos, sep = lm.special_ids()
    conv = lm.tokenizer.convert_ids_to_tokens
    return {"sha256": lm.tokenizer_sha256, "bos_id": bos, "bos_token": conv(bos),
            "sep_id": sep, "sep_token": None if sep is None else conv(sep),
            "vocab_size": len(lm.tokenizer)}


Hooks = HookPoint | tuple[HookPoint, ...]
"""One hook, or several captured side by side in one forward (`--hook mlp_in.3,mlp_out.3`)."""


def hook_label(hp: Hooks) -> str:
    """The manifest's `hook`: the hook's name, or the names of several joined by commas in row order."""
    return ",".join(str(h) for h in hp) if isinstance(hp, tuple) else str(hp)


def config_key(lm: LoadedModel, hp: Hooks, corpus_fp: str, cfg: CaptureConfig) -> str:
    ident = {k: v for k, v in lm.identity().items() if k != "spec"}
    blob = json.dumps({"model": ident, "hook": hook_label(hp), "corpus": corpus_fp, "cfg": vars(cfg),
                       "tokenizer": tokenizer_record(lm), "compute": lm.compute_dtype,
                       "device": lm.device.type}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def capture(
    out: str | Path,
    *,
    model: str | LoadedModel = "default",
    corpus: str | Corpus = "default",
    hook: str | None = None,
    tokens: int | str = 100_000,
    ctx_len: int = 128,
    dtype: str = "bfloat16",
    batch_contexts: int = 32,
    contexts_per_shard: int = 128,
    exclude_bos: bool = True,
    outlier_factor: float = 10.0,
    device: str | None = "auto",
    compute_dtype: str = "auto",
    text_field: str = "text",
    strict_utf8: bool = False,
    overwrite: bool = False,
    trust_sizes: bool = False,
    progress: bool = True,
) -> CaptureResult:
    """Capture activations at `hook` into the store folder `out`, resuming an unfinished one and repairing a
    damaged one (every recorded shard is checked: size, and sha256 unless `trust_sizes`). `hook` may list
    several hooks (`mlp_in.3,mlp_out.3`): one forward stores them side by side in each row (a paired store for a
    transcoder, the layers of a crosscoder)."""
    cfg = CaptureConfig(tokens=parse_count(tokens, "--tokens"), ctx_len=ctx_len, dtype=dtype,
                        batch_contexts=batch_contexts, contexts_per_shard=contexts_per_shard, exclude_bos=exclude_bos,
                        outlier_factor=outlier_factor)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"--out {folder} is a file: pass a folder for the store")
    corp = open_corpus(corpus, text_field=text_field, strict_utf8=strict_utf8) if isinstance(corpus, str) else corpus
    with FolderLock(folder, "capture"):
        next(iter(corp.documents()))  # an empty or unreadable corpus fails here, before the model loads
        lm = model if isinstance(model, LoadedModel) else load_model(model, device=device,
                                                                        compute_dtype=compute_dtype)
        hp: Hooks = lm.hooks(hook) if hook is not None and "," in hook else lm.hook(hook)
        if isinstance(hp, tuple) and len(hp) == 1:
            hp = hp[0]
        key = config_key(lm, hp, corp.fingerprint(), cfg)
        writer = StoreWriter(folder, key, overwrite=overwrite, trust_sizes=trust_sizes)
        if writer.complete is not None:
            return CaptureResult(folder, writer.complete, writer.complete.n_contexts, 0, 0.0)
        return _write(writer, lm, hp, corp, cfg, progress)


def build_manifest(writer: StoreWriter, lm: LoadedModel, hp: Hooks, corp: Corpus, cfg: CaptureConfig) -> Manifest:
    """The manifest a finished capture writes (shards are filled in by `StoreWriter.finish`); a repaired store
    keeps its recorded facts. Shared with the distributed capture, so both write the same bytes."""
    if writer.recorded is not None:  # repaired: the manifest's facts stand, only its shard records change
        return writer.recorded
    return Manifest(
        model=lm.identity(), hook=hook_label(hp), d_model=lm.d_model, dtype=cfg.dtype, ctx_len=cfg.ctx_len,
        tokenizer=tokenizer_record(lm), row_policy=writer.row_policy or RowPolicy(),
        corpus={**corp.describe(), "fingerprint": corp.fingerprint(), "replaced_bytes": corp.replacements},
        capture={"config": vars(cfg), "compute_dtype": lm.compute_dtype, "device": lm.device.type,
                 "monoscope_version": __version__},
        requested_tokens=cfg.tokens,
    )


def _write(writer: StoreWriter, lm: LoadedModel, hp: Hooks, corp: Corpus, cfg: CaptureConfig,
           progress: bool) -> CaptureResult:
    """Compute and write every shard the writer still needs, then the manifest."""
    resumed = writer.done_contexts
    repaired = len(writer.redo) if writer.recorded is not None else 0
    store_dtype = STORE_DTYPES[cfg.dtype]
    cps = cfg.contexts_per_shard
    last = writer.last_needed  # a complete store being repaired stops after its last damaged shard
    t0 = time.perf_counter()
    new_contexts = 0
    buf_tok: list[torch.Tensor] = []
    buf_act: list[torch.Tensor] = []

    def flush(index: int) -> None:
        toks, acts = torch.cat(buf_tok), torch.cat(buf_act)
        if writer.row_policy is None:
            writer.set_row_policy(RowPolicy.measured(acts, cfg.exclude_bos, cfg.outlier_factor))
        policy = writer.row_policy
        assert policy is not None
        writer.add_shard(toks, acts, policy.keep(acts), index=index, n_hooks=len(hp) if isinstance(hp, tuple) else 1)
        buf_tok.clear()
        buf_act.clear()

    total = cfg.n_contexts * cfg.ctx_len if writer.recorded is None else writer.recorded.n_tokens
    index = 0
    batches = batched_contexts(lm, corp, cfg.ctx_len, cfg.batch_contexts)
    with progress_bar("capture", total=total, unit="tok", enabled=progress) as bar:
        bar.update(resumed * cfg.ctx_len)
        done = 0
        for ids in batches:
            ids = ids[: cfg.n_contexts - done]
            index = done // cps  # shards are whole batches, so a batch lies in exactly one shard
            if last is not None and index > last:
                break
            done += len(ids)
            if not writer.needs(index):  # in an intact shard: tokenised, not recomputed
                if done >= cfg.n_contexts:
                    break
                continue
            buf_tok.append(ids.to(torch.int32))
            acts = lm.acts_many(hp, ids) if isinstance(hp, tuple) else lm.acts(hp, ids)
            buf_act.append(acts.to(store_dtype).cpu())
            new_contexts += len(ids)
            bar.update(len(ids) * cfg.ctx_len)
            if done % cps == 0 or done >= cfg.n_contexts:
                flush(index)
            if done >= cfg.n_contexts:
                break
        if buf_tok:  # the corpus ran out inside shard `index`
            flush(index)
    if not writer.shards:
        raise StoreError(f"no contexts were captured from corpus {corp.describe().get('path', 'default')}")

    manifest = writer.finish(build_manifest(writer, lm, hp, corp, cfg))
    return CaptureResult(writer.folder, manifest, resumed, new_contexts * cfg.ctx_len, time.perf_counter() - t0,
                         repaired)
