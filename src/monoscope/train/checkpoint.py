"""Checkpoints: everything a run needs to continue bit-identically, written so a kill never breaks one.

Layout (`OUT/checkpoints/`):

    step-00001000/
      sae.safetensors   the SAE's state_dict (float32 master weights, BatchTopK threshold, JumpReLU log θ)
      optimizer.pt      Adam's state_dict (moments, step counts)
      state.pt          tensors and RNG states: dead-feature counters, metric accumulators,
                        torch CPU/CUDA RNG states, numpy's RNG state
      state.json        step, tokens, data cursor, Python's RNG state, config, data identity, counters
      COMPLETE          written last: {"step": 1000, "files": {name: sha256}}
    step-00002000/ ...

A checkpoint is written into `.tmp-step-…` beside the others (every file fsynced, COMPLETE last),
then renamed to `step-NNNNNNNN` in one atomic rename; only then are older ones pruned down to
`keep`. A kill at any moment leaves either the new complete folder or none (leftover `.tmp-*`
folders are removed on the next open), so the previous checkpoint is always usable. `latest()`
returns the newest folder whose COMPLETE marker is present and whose files match its digests,
skipping (and naming) any that do not.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import safetensors.torch
import torch

from monoscope.errors import MonoscopeError
from monoscope.fileio import fsync_dir, fsync_file, sha256_file

MARKER = "COMPLETE"
FILES = ("sae.safetensors", "optimizer.pt", "state.pt", "state.json")
_STEP_RE = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = ".tmp-"


class Checkpoint(NamedTuple):
    """One training state, split by how it is stored."""

    step: int
    sae: dict[str, torch.Tensor]
    """The SAE's state_dict (CPU tensors)."""
    optimizer: dict[str, Any]
    """The optimiser's state_dict."""
    tensors: dict[str, Any]
    """Tensors and RNG states (anything `torch.load(weights_only=True)` reads back)."""
    meta: dict[str, Any]
    """JSON-able: cursor, counters, config, data identity."""


class CheckpointSink(Protocol):
    """Where the trainer puts checkpoints and finds the newest one."""

    def save(self, ckpt: Checkpoint) -> str:
        """Store `ckpt`; returns where (for messages)."""
        ...

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        ...


class MemorySink:
    """Checkpoints kept in memory (deep copies): for tests and callers that manage storage."""

    def __init__(self) -> None:
        self.saved: list[Checkpoint] = []

    def save(self, ckpt: Checkpoint) -> str:
        self.saved.append(_deepcopy(ckpt))
        return f"memory checkpoint at step {ckpt.step}"

    def latest(self) -> Checkpoint | None:
        return _deepcopy(self.saved[-1]) if self.saved else None


class CheckpointDir:
    """Step-numbered checkpoint folders under `folder` (module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self.skipped: list[str] = []
        """Problems with checkpoints `latest()` passed over (shown to the user)."""
        if self.folder.is_dir():
            for p in self.folder.glob(TMP_PREFIX + "*"):
                shutil.rmtree(p, ignore_errors=True)

    def path(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}"

    def complete_steps(self) -> list[int]:
        """Steps of folders with a COMPLETE marker, oldest first (digests not checked)."""
        if not self.folder.is_dir():
            return []
        steps = []
        for p in self.folder.iterdir():
            m = _STEP_RE.match(p.name)
            if m and (p / MARKER).is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    # ---------------------------------------------------------------- writing
    def save(self, ckpt: Checkpoint) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{TMP_PREFIX}step-{ckpt.step:08d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            digests = {}
            for name in FILES:
                _write_part(tmp / name, name, ckpt)
                digests[name] = sha256_file(tmp / name)
            marker = json.dumps({"step": ckpt.step, "files": digests}, indent=2, sort_keys=True) + "\n"
            _write_part(tmp / MARKER, MARKER, marker)
            fsync_dir(tmp)
            final = self.path(ckpt.step)
            if final.exists():  # only an older attempt at this step (a newer complete one would have been resumed)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.folder)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise MonoscopeError(
                f"cannot write checkpoint {tmp.name} in {self.folder}: {e.strerror or e}; the previous checkpoint "
                "is intact: free some space and run again with --resume"
            ) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return str(final)

    def _prune(self) -> None:
        steps = self.complete_steps()
        for step in steps[: max(0, len(steps) - self.keep)]:
            shutil.rmtree(self.path(step), ignore_errors=True)
        newest = steps[-1] if steps else None
        for p in self.folder.iterdir():  # folders without a marker, older than the newest complete one
            m = _STEP_RE.match(p.name)
            if m and newest is not None and int(m.group(1)) < newest and not (p / MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)

    # ---------------------------------------------------------------- reading
    def latest(self) -> Checkpoint | None:
        self.skipped = []
        for step in reversed(self.complete_steps()):
            try:
                return self.load(step)
            except MonoscopeError as e:
                self.skipped.append(str(e))
        return None

    def load(self, step: int) -> Checkpoint:
        """Read and verify the checkpoint of `step`; a damaged one is a MonoscopeError naming the file."""
        folder = self.path(step)
        try:
            marker = json.loads((folder / MARKER).read_text())
            digests = marker["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MonoscopeError(f"checkpoint {folder}: unreadable {MARKER} marker ({e})") from e
        for name in FILES:
            path = folder / name
            if not path.is_file():
                raise MonoscopeError(f"checkpoint {folder}: {name} is missing")
            if sha256_file(path) != digests.get(name):
                raise MonoscopeError(f"checkpoint {folder}: {name} does not match its sha256 in {MARKER} (damaged)")
        try:
            sae = safetensors.torch.load_file(str(folder / "sae.safetensors"))
            optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
            tensors = torch.load(folder / "state.pt", weights_only=True)
            meta = json.loads((folder / "state.json").read_text())
        except Exception as e:
            raise MonoscopeError(f"checkpoint {folder} cannot be read ({e})") from e
        return Checkpoint(int(marker["step"]), sae, optimizer, tensors, meta)


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python `random` generator states."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- helpers


def _write_part(path: Path, name: str, ckpt: Checkpoint | str) -> None:
    """Write one file of a checkpoint and fsync it (a separate function so tests can fail it)."""
    if isinstance(ckpt, str):
        path.write_text(ckpt)
    elif name == "sae.safetensors":
        tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.sae.items()}
        safetensors.torch.save_file(tensors, str(path))
    elif name == "optimizer.pt":
        torch.save(ckpt.optimizer, path)
    elif name == "state.pt":
        torch.save(ckpt.tensors, path)
    elif name == "state.json":
        path.write_text(json.dumps(ckpt.meta, indent=2, sort_keys=True, allow_nan=False) + "\n")
    else:
        raise ValueError(f"unknown checkpoint part {name}")
    fsync_file(path)


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _deepcopy(ckpt: Checkpoint) -> Checkpoint:
    return Checkpoint(ckpt.step, {k: v.clone() for k, v in ckpt.sae.items()}, copy.deepcopy(ckpt.optimizer),
                      copy.deepcopy(ckpt.tensors), json.loads(json.dumps(ckpt.meta)))
