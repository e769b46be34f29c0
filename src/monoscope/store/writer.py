"""Writes a store shard by shard, so that a kill at any moment loses at most the shard in flight.

State lives in `progress.json` (rewritten atomically after each shard, and kept beside the manifest
as the store's recovery record): the capture's config key, the row policy, and the shards with their
digests. Run again with the same arguments, the capture checks every recorded shard (size, and
sha256 unless `trust_sizes`), redoes exactly the missing or damaged ones and continues after the
last; a complete store is checked the same way, so rerunning capture repairs it. A deleted or
damaged manifest is rebuilt from the recovery record, reusing the shards that still match. With
other arguments the writer refuses rather than mixing two stores in one folder.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from monoscope.errors import MonoscopeError, StoreError
from monoscope.fileio import read_json, remove_temp_files, write_json_atomic
from monoscope.locking import LOCK_NAME
from monoscope.store.manifest import MANIFEST, PROGRESS, Manifest, RowPolicy, ShardInfo, lost_records_message
from monoscope.store.shard import check_shard_file, shard_name, write_shard


def _clear(folder: Path) -> None:
    """Empty `folder` for --overwrite, keeping the lock file of the process that holds it."""
    for p in folder.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


class StoreWriter:
    """Writes shards into `folder`, resuming or repairing a store made with the same `config_key`.

    After construction: `shards` are the recorded shards (in order), `redo` the indices among them that
    failed the check and must be written again, `recorded` the manifest of a store that was complete
    (None otherwise), and `complete` that manifest when nothing needs redoing.
    """

    def __init__(self, folder: Path, config_key: str, *, overwrite: bool = False, trust_sizes: bool = False) -> None:
        self.folder = folder
        self.config_key = config_key
        self.shards: list[ShardInfo] = []
        self.redo: set[int] = set()
        self.row_policy: RowPolicy | None = None
        self.recorded: Manifest | None = None
        self.complete: Manifest | None = None
        self.notes: list[str] = []
        if overwrite and folder.exists():
            _clear(folder)
        folder.mkdir(parents=True, exist_ok=True)
        remove_temp_files(folder)
        progress = self._read_progress()
        manifest, damage = self._read_manifest()
        recorded = None if manifest is None else [s.record() for s in manifest.shards]
        if manifest is not None and (progress is None or progress.get("shards") == recorded):
            self.recorded = manifest
            self.shards = list(manifest.shards)
            self.row_policy = manifest.row_policy
        elif progress is not None:
            if manifest is not None:
                damage = f"lists {len(manifest.shards)} shards where progress.json records {len(progress['shards'])}"
            if damage:
                self._note(f"{folder / MANIFEST} {damage}: rebuilding it from {PROGRESS}, reusing the shards "
                           "that still match")
            if progress.get("row_policy"):
                self.row_policy = RowPolicy(**progress["row_policy"])
            self.shards = [ShardInfo(**raw) for raw in progress["shards"]]
        elif damage:
            raise StoreError(f"{folder / MANIFEST} {damage}, and no {PROGRESS} is left to rebuild it from: "
                             "recapture with --overwrite")
        elif any(p.name != LOCK_NAME for p in folder.iterdir()):
            lost = lost_records_message(folder)
            if lost is not None:
                raise StoreError(lost)
            raise StoreError(f"output folder {folder} is not empty and holds no monoscope store: "
                             "choose another --out, empty it, or pass --overwrite")
        self._check(trust_sizes)
        if self.recorded is not None and not self.redo:
            self.complete = self.recorded

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        print(f"note: {msg}", file=sys.stderr)

    def _different(self, other: Any) -> StoreError:
        return StoreError(
            f"output folder {self.folder} holds a different store (made with other arguments, key "
            f"{str(other)[:12]} vs {self.config_key[:12]}): use another --out, or --overwrite to replace it"
        )

    def _read_progress(self) -> dict[str, Any] | None:
        path = self.folder / PROGRESS
        if not path.is_file():
            return None
        try:
            progress = read_json(path, "capture progress file")
            if not isinstance(progress, dict) or not isinstance(progress.get("shards", []), list):
                raise MonoscopeError("not a progress record")
            progress.setdefault("shards", [])
            for raw in progress["shards"]:
                ShardInfo(**raw)
            if progress.get("row_policy"):
                RowPolicy(**progress["row_policy"])
        except (MonoscopeError, TypeError) as e:
            self._note(f"{path} is damaged ({str(e)[:80]}): ignoring it")
            return None
        if progress.get("config_key") != self.config_key:
            raise self._different(progress.get("config_key"))
        return progress

    def _read_manifest(self) -> tuple[Manifest | None, str]:
        """The manifest when it is readable, else (None, what is wrong with it; '' when there is none)."""
        if not (self.folder / MANIFEST).is_file():
            return None, ""
        try:
            manifest = Manifest.read(self.folder)
        except StoreError as e:
            return None, f"is damaged ({str(e)[:160]})"
        if manifest.capture.get("config_key") != self.config_key:
            raise self._different(manifest.capture.get("config_key"))
        return manifest, ""

    def _check(self, trust_sizes: bool) -> None:
        """Mark every recorded shard that is missing or fails its size (and digest) check for redoing."""
        for i, info in enumerate(self.shards):
            problem = check_shard_file(self.folder / info.file, info, digest=not trust_sizes)
            if problem is not None:
                self.redo.add(i)
                (self.folder / info.file).unlink(missing_ok=True)
        if self.redo:
            self._note(f"{len(self.redo)} of {len(self.shards)} shards in {self.folder} are missing or damaged "
                       f"({', '.join(self.shards[i].file for i in sorted(self.redo)[:5])}"
                       f"{', ...' if len(self.redo) > 5 else ''}): capturing them again")
        known = {s.file for s in self.shards}
        for p in self.folder.glob("shard-*.safetensors"):
            if p.name not in known:
                p.unlink()

    def needs(self, index: int) -> bool:
        """Whether shard `index` must be (re)written."""
        return index >= len(self.shards) or index in self.redo

    @property
    def last_needed(self) -> int | None:
        """For a recorded complete store, the last shard index to rewrite; None while shards remain to append."""
        if self.recorded is None:
            return None
        return max(self.redo) if self.redo else -1

    @property
    def done_contexts(self) -> int:
        """Contexts in intact recorded shards (not written again)."""
        return sum(s.contexts for i, s in enumerate(self.shards) if i not in self.redo)

    def _save_progress(self) -> None:
        write_json_atomic(self.folder / PROGRESS, {
            "config_key": self.config_key,
            "row_policy": None if self.row_policy is None else vars(self.row_policy),
            "shards": [s.record() for s in self.shards],
        })

    def add_shard(self, tokens: torch.Tensor, acts: torch.Tensor, keep: torch.Tensor,
                  index: int | None = None, n_hooks: int = 1) -> ShardInfo:
        """Write shard `index` (default: the next one; `keep` is its row-policy mask) and record it."""
        index = len(self.shards) if index is None else index
        if index > len(self.shards):
            raise StoreError(f"shard {index} written before shard {len(self.shards)}: capture batches out of order")
        return self.record_shard(index, write_shard(self.folder / shard_name(index), tokens, acts, keep,
                                                   n_hooks))

    def record_shard(self, index: int, info: ShardInfo) -> ShardInfo:
        """Record shard `index`, already written to its file (by `write_shard`, e.g. in another process of a
        distributed capture), in order, and save the progress."""
        if index > len(self.shards):
            raise StoreError(f"shard {index} recorded before shard {len(self.shards)}: capture batches out of order")
        if index == len(self.shards):
            self.shards.append(info)
        else:
            self.shards[index] = info
            self.redo.discard(index)
        self._save_progress()
        return info

    def set_row_policy(self, policy: RowPolicy) -> None:
        self.row_policy = policy
        self._save_progress()

    def finish(self, manifest: Manifest) -> Manifest:
        manifest.shards = list(self.shards)
        manifest.capture["config_key"] = self.config_key
        if self.redo:
            raise StoreError(f"shards {sorted(self.redo)} of {self.folder} were not written again: the corpus or "
                             "model changed since they were captured; recapture with --overwrite")
        self._save_progress()  # the recovery record stays beside the manifest
        manifest.write(self.folder)
        self.complete = manifest
        return manifest
