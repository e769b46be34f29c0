"""Writes a store shard by shard, so that a kill at any moment loses at most the shard in flight.

State lives in `progress.json` (rewritten atomically after each shard): the capture's config key,
the row policy, and the finished shards with their digests. Run again with the same arguments, the
capture checks those shards, drops any that fail, and continues after the last good one; with other
arguments it refuses rather than mixing two stores in one folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from monoscope.errors import StoreError
from monoscope.fileio import read_json, remove_temp_files, write_json_atomic
from monoscope.store.manifest import MANIFEST, PROGRESS, Manifest, RowPolicy, ShardInfo
from monoscope.store.shard import read_shard_bytes, shard_name, write_shard


class StoreWriter:
    """Appends shards to `folder`, resuming an unfinished capture made with the same `config_key`."""

    def __init__(self, folder: Path, config_key: str, *, overwrite: bool = False) -> None:
        self.folder = folder
        self.config_key = config_key
        self.shards: list[ShardInfo] = []
        self.row_policy: RowPolicy | None = None
        self.complete: Manifest | None = None
        if overwrite and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        remove_temp_files(folder)
        if (folder / MANIFEST).is_file():
            manifest = Manifest.read(folder)
            if manifest.capture.get("config_key") != config_key:
                raise self._different(manifest.capture.get("config_key"))
            self.complete = manifest
        elif (folder / PROGRESS).is_file():
            self._resume(read_json(folder / PROGRESS, "capture progress file"))
        elif any(p.name != ".lock" for p in folder.iterdir()):
            raise StoreError(f"output folder {folder} is not empty and holds no monoscope store: "
                             "choose another --out, empty it, or pass --overwrite")

    def _different(self, other: Any) -> StoreError:
        return StoreError(
            f"output folder {self.folder} holds a different store (made with other arguments, key "
            f"{str(other)[:12]} vs {self.config_key[:12]}): use another --out, or --overwrite to replace it"
        )

    def _resume(self, progress: dict[str, Any]) -> None:
        if progress.get("config_key") != self.config_key:
            raise self._different(progress.get("config_key"))
        if progress.get("row_policy"):
            self.row_policy = RowPolicy(**progress["row_policy"])
        for raw in progress.get("shards", []):
            info = ShardInfo(**raw)
            try:
                read_shard_bytes(self.folder / info.file, info)
            except StoreError:
                break  # this one and everything after it are redone
            self.shards.append(info)
        known = {s.file for s in self.shards}
        for p in self.folder.glob("shard-*.safetensors"):
            if p.name not in known:
                p.unlink()

    @property
    def done_contexts(self) -> int:
        return sum(s.contexts for s in self.shards)

    def _save_progress(self) -> None:
        write_json_atomic(self.folder / PROGRESS, {
            "config_key": self.config_key,
            "row_policy": None if self.row_policy is None else vars(self.row_policy),
            "shards": [vars(s) for s in self.shards],
        })

    def add_shard(self, tokens: torch.Tensor, acts: torch.Tensor, keep: torch.Tensor) -> ShardInfo:
        """Write the next shard (`keep` is its row-policy mask) and record it in the progress file."""
        info = write_shard(self.folder / shard_name(len(self.shards)), tokens, acts, keep)
        self.shards.append(info)
        self._save_progress()
        return info

    def set_row_policy(self, policy: RowPolicy) -> None:
        self.row_policy = policy
        self._save_progress()

    def finish(self, manifest: Manifest) -> Manifest:
        manifest.shards = list(self.shards)
        manifest.capture["config_key"] = self.config_key
        manifest.write(self.folder)
        (self.folder / PROGRESS).unlink(missing_ok=True)
        self.complete = manifest
        return manifest
