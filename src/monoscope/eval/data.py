"""What an evaluation reads: rows from the end of a store, and held-out text that follows it.

Held-out text is the store's own corpus continued past the contexts the store holds: same documents
stream, same packing, never seen in training (train() reads only the store). The corpus is reopened
from the manifest and its fingerprint must match, so "held out" is a fact, not a hope.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from monoscope.corpus import open_corpus
from monoscope.corpus.contexts import batched_contexts
from monoscope.errors import MonoscopeError
from monoscope.model.load import LoadedModel
from monoscope.store import ActivationStore


def check_rows(store: ActivationStore, tokens: int) -> None:
    """A store holding fewer kept rows than asked for is a one-line error naming both and the fix."""
    if tokens > store.n_rows:
        raise MonoscopeError(
            f"--tokens {tokens:,} is more than the {store.n_rows:,} training rows in store {store.folder}: "
            f"use --tokens {store.n_rows:,} or less, or capture more"
        )


def store_rows(store: ActivationStore, tokens: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(acts [N, d] raw float32, positions [N]) for the last `tokens` kept rows of the store, in batches
    of one shard, last shards first. Raises when the store holds fewer kept rows."""
    check_rows(store, tokens)
    left = tokens
    for i in reversed(range(len(store.manifest.shards))):
        shard = store.read_shard(i)
        keep = shard.keep.bool()
        pos = torch.nonzero(keep)[:, 1]
        acts = shard.acts[keep].float()
        if acts.shape[0] > left:
            acts, pos = acts[-left:], pos[-left:]
        left -= acts.shape[0]
        yield acts, pos
        if left <= 0:
            return


def heldout_contexts(store: ActivationStore, lm: LoadedModel, contexts: int, batch: int,
                     text: str | None = None) -> Iterator[Tensor]:
    """Token ids [≤batch, ctx_len] int64: up to `contexts` contexts of the store's corpus after the ones
    the store holds (or from the start of `text`, another corpus, when given); fewer when it runs out."""
    m = store.manifest
    if text is None:
        spec = str(m.corpus.get("path", ""))
        if not spec:
            raise MonoscopeError(f"store {store.folder} does not record its corpus: pass --text PATH to evaluate "
                                 "on other text")
        corpus = open_corpus(spec)
        fp = corpus.fingerprint()
        if fp != m.corpus.get("fingerprint"):
            raise MonoscopeError(
                f"corpus {spec} has changed since store {store.folder} was captured (fingerprint {fp[:12]} vs "
                f"{str(m.corpus.get('fingerprint'))[:12]}): held-out text cannot be located; pass --text PATH"
            )
        skip = m.n_contexts
    else:
        corpus, spec, skip = open_corpus(text), text, 0
    got = 0
    for ids in batched_contexts(lm, corpus, m.ctx_len, batch, skip=skip):
        ids = ids[: contexts - got]
        got += len(ids)
        yield ids
        if got >= contexts:
            return
    if got == 0:  # fewer than asked is fine (the result records how many); none is not
        where = " after the store's contexts" if text is None else ""
        raise MonoscopeError(f"corpus {spec} holds no context of {m.ctx_len} tokens{where}: pass --text PATH "
                             "with more text")


def store_digest(store_folder: str | Path) -> str:
    from monoscope.fileio import sha256_file

    return sha256_file(Path(store_folder) / "manifest.json")
