"""One shard: a safetensors file holding contexts' token ids, activations and the keep mask.

Tensors: `tokens` int32 [contexts, ctx_len], `acts` (store dtype) [contexts, ctx_len, d_model],
`keep` uint8 [contexts, ctx_len] (1 = a training row, see `RowPolicy`). Reading checks the size
and the sha256 before parsing, so a flipped byte is reported with both digests, never trained on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from monoscope.errors import StoreError
from monoscope.fileio import sha256_file, write_bytes_atomic
from monoscope.store.manifest import ShardInfo

SHARD_FORMAT = "monoscope-shard/1"


class Shard(NamedTuple):
    tokens: torch.Tensor  # [contexts, ctx_len] int32
    acts: torch.Tensor  # [contexts, ctx_len, d_model] store dtype
    keep: torch.Tensor  # [contexts, ctx_len] bool

    def rows(self) -> torch.Tensor:
        """Kept rows [rows, d_model] in stored order."""
        return self.acts[self.keep]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def write_shard(path: Path, tokens: torch.Tensor, acts: torch.Tensor, keep: torch.Tensor, n_hooks: int = 1
                ) -> ShardInfo:
    """Write atomically; the returned record carries the digest the manifest will hold (and, for rows holding
    `n_hooks` > 1 hooks side by side, Σ‖x_h‖² per hook, from which each hook's normaliser follows)."""
    data = st_save(
        {"tokens": tokens.to(torch.int32).contiguous(), "acts": acts.contiguous(),
         "keep": keep.to(torch.uint8).contiguous()},
        metadata={"format": SHARD_FORMAT},
    )
    digest = write_bytes_atomic(path, data)
    sq = acts[keep.bool()].double().pow(2).sum(1)  # [rows] ‖x‖²
    # rows that are not finite add nothing (training stops at or skips them), so the record stays valid JSON
    per_hook = None
    if n_hooks > 1:
        parts = acts[keep.bool()].double().pow(2).unflatten(1, (n_hooks, -1)).sum(2)  # [rows, n_hooks]
        per_hook = [float(c[torch.isfinite(c)].sum()) for c in parts.unbind(1)]
    return ShardInfo(file=path.name, contexts=int(tokens.shape[0]), rows=int(keep.sum()), bytes=len(data),
                     sha256=digest, sum_sq=float(sq[torch.isfinite(sq)].sum()), sum_sq_hooks=per_hook)


def read_shard_bytes(path: Path, info: ShardInfo) -> bytes:
    """The file's bytes, after checking presence, size and digest against the manifest."""
    if not path.is_file():
        raise StoreError(f"shard {path.name} is missing from {path.parent}: the store is damaged; "
                         "recapture it (or restore the file)")
    data = path.read_bytes()
    if len(data) != info.bytes:
        raise StoreError(f"shard {path.name} is truncated or padded: {len(data)} bytes, the manifest says "
                         f"{info.bytes}; recapture it (monoscope capture resumes from intact shards)")
    actual = hashlib.sha256(data).hexdigest()
    if actual != info.sha256:
        raise StoreError(f"shard {path.name} is corrupt: sha256 {actual} but the manifest expects {info.sha256}")
    return data


def check_shard_file(path: Path, info: ShardInfo, *, digest: bool = True) -> str | None:
    """What is wrong with the shard file (None when intact): presence, size, and sha256 when `digest`."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"shard {path.name} is missing"
    if size != info.bytes:
        return f"shard {path.name} has {size} bytes, the manifest says {info.bytes}"
    if digest and sha256_file(path) != info.sha256:
        return f"shard {path.name} fails its sha256 check"
    return None


def read_shard(path: Path, info: ShardInfo) -> Shard:
    data = read_shard_bytes(path, info)
    try:
        t = st_load(data)
        return Shard(t["tokens"], t["acts"], t["keep"].bool())
    except (SafetensorError, KeyError) as e:
        raise StoreError(f"shard {path.name} passed its checksum but cannot be parsed ({e}): "
                         "it was written by another tool or version") from e
