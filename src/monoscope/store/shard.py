"""One shard: a safetensors file holding contexts' token ids, activations and the keep mask.

Tensors: `tokens` int32 [contexts, ctx_len], `acts` (store dtype) [contexts, ctx_len, d_model],
`keep` uint8 [contexts, ctx_len] (1 = a training row, see `RowPolicy`). Reading checks the size
and a digest before parsing, so a flipped byte is reported with both digests, never trained on.

Two digests per shard: sha256 (provenance, and what `verify` checks) and xxh3-128, what reading for training
checks. Why: on a 2-core machine sha256 hashes ~1 GB/s, which cost ~9% of a training run's time (0.92 of 1.92 s of
store reading per 900k bf16 rows at d 576, against a ~22 s run); xxh3 hashes ~9 GB/s and catches accidental
corruption as surely (a flipped byte, a torn write). Stores from before it have only sha256, which reading then
checks.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import NamedTuple

import torch
import xxhash
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
                     sha256=digest, sum_sq=float(sq[torch.isfinite(sq)].sum()), sum_sq_hooks=per_hook,
                     xxh3=xxhash.xxh3_128_hexdigest(data))


def read_shard_bytes(path: Path, info: ShardInfo, *, full: bool = False) -> bytearray:
    """The file's bytes, after checking presence, size and digest against the manifest: xxh3 where the manifest
    has it, else sha256; `full`: every digest the manifest has (`verify`)."""
    if not path.is_file():
        raise StoreError(f"shard {path.name} is missing from {path.parent}: the store is damaged; "
                         "recapture it (or restore the file)")
    with open(path, "rb") as fh:  # a bytearray: the tensors of `read_shard` are views of it, not copies
        data = bytearray(info.bytes + 1)  # one spare byte: a longer file shows up as a longer read
        n = fh.readinto(data)
    if n != info.bytes:
        raise StoreError(f"shard {path.name} is truncated or padded: {path.stat().st_size} bytes, the manifest says "
                         f"{info.bytes}; recapture it (monoscope capture resumes from intact shards)")
    del data[info.bytes:]
    checks = [("sha256", lambda: hashlib.sha256(data).hexdigest(), info.sha256)] if full or info.xxh3 is None else []
    if info.xxh3 is not None:
        checks.append(("xxh3", lambda: xxhash.xxh3_128_hexdigest(data), info.xxh3))
    for name, digest, expected in checks:
        if (actual := digest()) != expected:
            raise StoreError(f"shard {path.name} is corrupt: {name} {actual} but the manifest expects {expected}")
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


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}


def _tensor_views(data: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes, as views of them: safetensors' own `load` copies every tensor
    out of the buffer, a second pass over a shard that training reads once per window."""
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(bytes(data[8: 8 + n]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    base, out = 8 + n, {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        dtype, shape = _DTYPES[spec["dtype"]], [int(v) for v in spec["shape"]]
        if not 0 <= begin <= end <= len(data) - base:
            raise ValueError(f"tensor {name} lies outside the file")
        flat = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=base + begin)
        out[name] = flat.view(dtype).reshape(shape)
    return out


def read_shard(path: Path, info: ShardInfo) -> Shard:
    data = read_shard_bytes(path, info)
    try:
        t = _tensor_views(data)
        return Shard(t["tokens"], t["acts"], t["keep"].bool())
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise StoreError(f"shard {path.name} passed its checksum but cannot be parsed ({e}): "
                         "it was written by another tool or version") from e
