"""The activation store's manifest: everything needed to trust and trace a row.

Written last, atomically, by the capture; a store without `manifest.json` is incomplete (its
`progress.json` says how far it got, and `monoscope capture` with the same arguments resumes it).
The manifest holds no timestamps or timings, so a resumed capture ends with the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from monoscope.errors import StoreError
from monoscope.fileio import read_json, write_json_atomic

STORE_FORMAT = "monoscope-store/1"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: `contexts` contexts of `ctx_len` tokens, `rows` of them kept for training."""

    file: str
    contexts: int
    rows: int
    bytes: int
    sha256: str
    sum_sq: float  # Σ‖x‖² over kept rows, fp64: the normaliser is derived from these, never re-read
    sum_sq_hooks: list[float] | None = None  # per hook of a multi-hook store (Σ‖x_h‖²); absent for one hook
    xxh3: str | None = None  # xxh3-128 of the file: what reading checks (stores from before it have only sha256)

    def record(self) -> dict[str, Any]:
        """The JSON record (no `sum_sq_hooks` key for a one-hook store, no `xxh3` for an older one: older stores
        keep their bytes)."""
        d = asdict(self)
        for key in ("sum_sq_hooks", "xxh3"):
            if d[key] is None:
                del d[key]
        return d


@dataclass(frozen=True)
class RowPolicy:
    """Which captured rows training sees; every row is stored, a `keep` mask marks the others.

    - Position 0 (the BOS) is excluded when `exclude_bos`: its residual norm is ~100x the median
      (an attention sink), so it would dominate the reconstruction loss while meaning nothing.
    - Rows whose norm exceeds `outlier_factor` x `median_norm` are excluded as well (other attention
      sinks; 0 disables). `median_norm` is measured on the first shard's non-BOS rows.
    """

    exclude_bos: bool = True
    outlier_factor: float = 10.0
    median_norm: float = 0.0

    @classmethod
    def measured(cls, acts: torch.Tensor, exclude_bos: bool, outlier_factor: float) -> RowPolicy:
        """The policy with its median norm taken from `acts` [contexts, ctx_len, d_model]."""
        a = acts[:, 1:] if exclude_bos else acts
        return cls(exclude_bos, outlier_factor, float(a.float().norm(dim=-1).nanmedian()))  # NaN rows: not a norm

    def keep(self, acts: torch.Tensor) -> torch.Tensor:
        """[contexts, ctx_len] bool: True for the rows training should see."""
        keep = torch.ones(acts.shape[:2], dtype=torch.bool)
        if self.exclude_bos:
            keep[:, 0] = False
        if self.outlier_factor > 0 and self.median_norm > 0:
            keep &= acts.float().norm(dim=-1).cpu() <= self.outlier_factor * self.median_norm
        return keep


def lost_records_message(folder: Path) -> str | None:
    """The one-line fix for a folder that holds shards but neither the manifest nor the recovery record
    (both deleted): its shards cannot be checked or reused, only recaptured; None when it holds no shard."""
    n = sum(1 for _ in folder.glob("shard-*.safetensors")) if folder.is_dir() else 0
    if n == 0:
        return None
    return (f"{folder} holds {n} activation shard(s) but neither {MANIFEST} nor {PROGRESS} (the store's records are "
            f"lost, so its shards cannot be checked or reused): recapture it with the monoscope capture command that "
            f"made it and --overwrite (--out {folder}), or delete the folder")


@dataclass
class Manifest:
    model: dict[str, Any]
    hook: str
    d_model: int
    dtype: str
    ctx_len: int
    tokenizer: dict[str, Any]
    row_policy: RowPolicy
    corpus: dict[str, Any]
    capture: dict[str, Any]
    shards: list[ShardInfo] = field(default_factory=list)
    requested_tokens: int = 0
    format: str = STORE_FORMAT

    @property
    def n_contexts(self) -> int:
        return sum(s.contexts for s in self.shards)

    @property
    def n_tokens(self) -> int:
        return self.n_contexts * self.ctx_len

    @property
    def n_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def mean_sq_norm(self) -> float:
        return sum(s.sum_sq for s in self.shards) / max(self.n_rows, 1)

    @property
    def normaliser(self) -> float:
        """c with E‖c·x‖² = d_model over kept rows (the paper's input scaling)."""
        msq = self.mean_sq_norm
        return math.sqrt(self.d_model / msq) if msq > 0 else 1.0

    @property
    def hooks(self) -> list[str]:
        """The hooks whose activations a row holds side by side (`capture --hook a,b`), in that order."""
        return self.hook.split(",")

    @property
    def row_width(self) -> int:
        """Width of one stored row: d_model per hook."""
        return self.d_model * len(self.hooks)

    @property
    def hook_normalisers(self) -> list[float]:
        """Per hook, c_h with E‖c_h·x_h‖² = d_model over kept rows (a one-hook store: [normaliser])."""
        if len(self.hooks) == 1:
            return [self.normaliser]
        n = max(self.n_rows, 1)
        sums = [sum((s.sum_sq_hooks or [0.0] * len(self.hooks))[h] for s in self.shards) for h in
                range(len(self.hooks))]
        return [math.sqrt(self.d_model * n / v) if v > 0 else 1.0 for v in sums]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards"] = [s.record() for s in self.shards]
        d.update(n_contexts=self.n_contexts, n_tokens=self.n_tokens, n_rows=self.n_rows,
                 mean_sq_norm=self.mean_sq_norm, normaliser=self.normaliser)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = "manifest") -> Manifest:
        if not isinstance(d, dict):
            raise StoreError(f"{where} holds a JSON {type(d).__name__ if d is not None else 'null'}, not a store "
                             "manifest (an object): rerun the same monoscope capture command to rebuild it")
        if d.get("format") != STORE_FORMAT:
            raise StoreError(f"{where} has format {d.get('format')!r}, expected {STORE_FORMAT!r}: "
                             "this is not a monoscope activation store (or one from a newer version)")
        try:
            for name in ("model", "tokenizer", "corpus", "capture", "row_policy"):
                if not isinstance(d[name], dict):
                    raise TypeError(f"{name!r} is not an object")
            if not isinstance(d["shards"], list):
                raise TypeError("'shards' is not a list")
            return cls(
                model=d["model"], hook=d["hook"], d_model=int(d["d_model"]), dtype=d["dtype"],
                ctx_len=int(d["ctx_len"]), tokenizer=d["tokenizer"], row_policy=RowPolicy(**d["row_policy"]),
                corpus=d["corpus"], capture=d["capture"], shards=[ShardInfo(**s) for s in d["shards"]],
                requested_tokens=int(d.get("requested_tokens", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            what = f"key {e} is missing" if isinstance(e, KeyError) else str(e)
            raise StoreError(f"{where} is malformed ({what}): rerun the same monoscope capture command to rebuild "
                             "it, or recapture with --overwrite") from e

    def write(self, folder: Path) -> None:
        write_json_atomic(folder / MANIFEST, self.to_json())

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            if (folder / PROGRESS).is_file():
                raise StoreError(f"{folder} is not a complete activation store: {MANIFEST} is missing (capture did "
                                 "not finish: run the same monoscope capture command again to resume)")
            raise StoreError(lost_records_message(folder) or f"{folder} is not an activation store ({MANIFEST} is "
                             f"missing): capture one with monoscope capture --out {folder}, or pass a store's folder")
        try:
            data = read_json(path, "store manifest")
        except Exception as e:
            raise StoreError(str(e)) from e
        return cls.from_json(data, str(path))
