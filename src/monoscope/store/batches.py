"""Shuffled, resumable batches of activation rows: from a store on disk or straight from a model.

Both sources are a sequence of *chunks* (a window of shards; a buffer of freshly computed contexts),
each shuffled with a generator seeded by (seed, chunk index). The batch stream is the concatenation
of the shuffled chunks, cut every `batch_size` rows; a batch may span two chunks. So the whole
position is `(chunk, offset)`: `state_dict()` saves it, `load_state_dict()` restores it, and the
next batch is exactly the one an uninterrupted run would have produced.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from monoscope.errors import MonoscopeError


class Batch(NamedTuple):
    acts: torch.Tensor  # [batch, d_model] in the source dtype (raw scale: multiply by the normaliser)
    rows: torch.Tensor  # [batch] int64 global row ids, for tracing a row back to its shard and text


class Chunk(NamedTuple):
    acts: torch.Tensor  # [rows, d_model], stored order
    rows: torch.Tensor  # [rows] int64 global row ids


def _chunk_perm(seed: int, chunk: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + chunk) % (2**63))
    return torch.randperm(n, generator=g)


class RowStream(ABC):
    """Iterator of `Batch`; subclasses say how to build chunk `i` (None when the source ends)."""

    def __init__(self, batch_size: int, seed: int) -> None:
        if batch_size <= 0:
            raise MonoscopeError(f"batch size {batch_size} must be positive")
        self.batch_size = batch_size
        self.seed = seed
        self._chunk = 0  # index of the chunk the next row comes from
        self._offset = 0  # rows of that chunk already consumed
        self._cached: tuple[int, Chunk, torch.Tensor] | None = None

    @abstractmethod
    def load_chunk(self, index: int) -> Chunk | None:
        """Rows of chunk `index` in source order, or None past the end of the source."""

    def _shuffled(self, index: int) -> tuple[Chunk, torch.Tensor] | None:
        """Chunk `index` and its row permutation. The rows are not moved: `__next__` gathers each batch through
        the permutation, one copy of the batch instead of a copy of the whole window and then of the batch."""
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1], self._cached[2]
        # the old window goes before the new one is read: its memory (hundreds of MB) is then free for the new one to
        # reuse, which the trainer has glibc keep (`devices.keep_freed_cpu_memory`), instead of being page-faulted in
        self._cached = None
        chunk = self.load_chunk(index)
        if chunk is None:
            self._cached = None
            return None
        perm = _chunk_perm(self.seed, index, len(chunk.rows))
        self._cached = (index, chunk, perm)
        return chunk, perm

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        acts, rows, need = [], [], self.batch_size
        chunk_i, offset = self._chunk, self._offset
        while need:
            got = self._shuffled(chunk_i)
            if got is None:
                break
            chunk, perm = got
            take = min(need, len(chunk.rows) - offset)
            idx = perm[offset: offset + take]
            acts.append(chunk.acts.index_select(0, idx))
            rows.append(chunk.rows.index_select(0, idx))
            need -= take
            offset += take
            if offset >= len(chunk.rows):
                chunk_i, offset = chunk_i + 1, 0
            del got, chunk, perm, idx  # no reference to this window while the next one loads (`_shuffled`)
        if need:  # the source ended: the partial tail is dropped so every batch has batch_size rows
            raise StopIteration
        self._chunk, self._offset = chunk_i, offset
        if len(acts) == 1:
            return Batch(acts[0], rows[0])
        return Batch(torch.cat(acts), torch.cat(rows))

    def state_dict(self) -> dict[str, Any]:
        return {"chunk": self._chunk, "offset": self._offset, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise MonoscopeError(
                f"batch cursor was saved with seed {state['seed']} and batch size {state['batch_size']}, "
                f"but this reader has seed {self.seed} and batch size {self.batch_size}: use the same values"
            )
        self._chunk, self._offset = int(state["chunk"]), int(state["offset"])
