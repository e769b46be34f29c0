"""Streaming mode: shuffled batches straight from the model, with no store on disk.

    batches = stream_batches(load_model("default"), open_corpus("default"), "resid_post.15", 4096)
    for batch in batches: ...          # the same Batch records, state_dict/load_state_dict as a store

Each chunk is `buffer_contexts` consecutive contexts of the corpus, run to the hook, filtered by the
row policy and shuffled. Resuming recomputes only the chunk the cursor is in. The row policy's median
norm and the input normaliser are measured on the first chunk and kept in the cursor state, so a
resumed stream filters and scales exactly as the original did.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch

from monoscope.corpus import Corpus
from monoscope.corpus.contexts import batched_contexts
from monoscope.model import LoadedModel
from monoscope.model.hooks import HookPoint
from monoscope.store.batches import Chunk, RowStream
from monoscope.store.manifest import RowPolicy


class StreamBatches(RowStream):
    def __init__(self, lm: LoadedModel, corpus: Corpus, hook: HookPoint, batch_size: int, *, seed: int = 0,
                 ctx_len: int = 128, buffer_contexts: int = 256, batch_contexts: int = 32,
                 exclude_bos: bool = True, outlier_factor: float = 10.0) -> None:
        super().__init__(batch_size, seed)
        self.lm, self.corpus, self.hook = lm, corpus, hook
        self.ctx_len, self.buffer_contexts, self.batch_contexts = ctx_len, buffer_contexts, batch_contexts
        self.policy = RowPolicy(exclude_bos, outlier_factor, 0.0)
        self.normaliser: float | None = None
        self._ids: Iterator[torch.Tensor] | None = None
        self._next_chunk = 0  # chunk index the live context iterator is positioned at

    @property
    def d_model(self) -> int:
        return self.lm.d_model

    def _contexts(self, index: int) -> torch.Tensor | None:
        if self._ids is None or self._next_chunk != index:
            self._ids = iter(batched_contexts(self.lm, self.corpus, self.ctx_len, self.buffer_contexts))
            for _ in itertools.islice(self._ids, index):
                pass
        self._next_chunk = index + 1
        return next(self._ids, None)

    def load_chunk(self, index: int) -> Chunk | None:
        ids = self._contexts(index)
        if ids is None:
            return None
        acts = torch.cat([self.lm.acts(self.hook, part) for part in ids.split(self.batch_contexts)]).cpu()
        if self.policy.median_norm == 0.0:
            self.policy = RowPolicy.measured(acts, self.policy.exclude_bos, self.policy.outlier_factor)
        keep = self.policy.keep(acts)
        rows = acts[keep]
        if self.normaliser is None:
            self.normaliser = math.sqrt(self.lm.d_model / float(rows.double().pow(2).sum(-1).mean()))
        pos = torch.arange(keep.numel(), dtype=torch.int64).view_as(keep)[keep]
        return Chunk(rows, index * self.buffer_contexts * self.ctx_len + pos)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "median_norm": self.policy.median_norm, "normaliser": self.normaliser}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.policy = RowPolicy(self.policy.exclude_bos, self.policy.outlier_factor, state["median_norm"])
        self.normaliser = state["normaliser"]


def stream_batches(lm: LoadedModel, corpus: Corpus, hook: str | None, batch_size: int, **kwargs: Any) -> StreamBatches:
    """Batches from the model as it runs; `hook=None` is the default hook point."""
    return StreamBatches(lm, corpus, lm.hook(hook), batch_size, **kwargs)
