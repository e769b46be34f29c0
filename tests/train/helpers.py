"""Small synthetic activation stores and batch sources for the training tests.

Rows are sparse combinations of `n_true` hidden unit directions plus a mean offset and a little
noise, so an SAE can actually learn them (FVU falls well below 1) while d stays tiny.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from monoscope.store import Manifest, RowPolicy
from monoscope.store.batches import Batch
from monoscope.store.writer import StoreWriter

D = 32


def synthetic_rows(n: int, d: int = D, n_true: int = 96, active: int = 4, seed: int = 0) -> torch.Tensor:
    """[n, d] float32: `active` of `n_true` fixed directions per row, exponential amplitudes."""
    g = torch.Generator().manual_seed(1234)
    dirs = torch.randn(n_true, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=g) * 0.5
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, n_true, generator=g).argsort(dim=1)[:, :active]  # [n, active]
    amp = -torch.rand(n, active, generator=g).log() * 2.0
    x = (amp[..., None] * dirs[idx]).sum(1) + offset + 0.02 * torch.randn(n, d, generator=g)
    return x * 3.0  # raw scale != 1, so the normaliser matters


def make_store(folder: Path, *, d: int = D, n_shards: int = 4, contexts: int = 16, ctx_len: int = 17,
               seed: int = 0, poison_row: int | None = None) -> Manifest:
    """A complete store of n_shards·contexts·(ctx_len−1) training rows (BOS excluded).
    `poison_row`: the training row set to NaN (to test non-finite handling)."""
    w = StoreWriter(folder, "t" * 64)
    policy = RowPolicy(exclude_bos=True, outlier_factor=0.0, median_norm=1.0)
    w.set_row_policy(policy)
    per_shard = contexts * ctx_len
    for s in range(n_shards):
        acts = synthetic_rows(per_shard, d, seed=seed * 1000 + s).view(contexts, ctx_len, d).to(torch.bfloat16)
        if poison_row is not None:
            first = s * contexts * (ctx_len - 1)
            local = poison_row - first
            if 0 <= local < contexts * (ctx_len - 1):
                c, p = divmod(local, ctx_len - 1)
                acts[c, p + 1, 0] = float("nan")
        toks = torch.arange(per_shard, dtype=torch.int32).view(contexts, ctx_len) % 200
        keep = policy.keep(acts)
        w.add_shard(toks, acts, keep)
    m = Manifest(model={"id": "synthetic", "weights_sha256": "w" * 64, "spec": "synthetic"}, hook="resid_post.1",
                 d_model=d, dtype="bfloat16", ctx_len=ctx_len, tokenizer={"sha256": "t" * 64}, row_policy=policy,
                 corpus={"kind": "synthetic"}, capture={}, requested_tokens=n_shards * per_shard)
    return w.finish(m)


class RandomSource:
    """In-memory `BatchSource` over synthetic rows, with an exact cursor (for Trainer unit tests)."""

    def __init__(self, batch_size: int, d: int = D, n_rows: int = 4096, seed: int = 0) -> None:
        self.data = synthetic_rows(n_rows, d, seed=seed).to(torch.bfloat16)
        self.batch_size = batch_size
        self.pos = 0
        self.normaliser = float((d / self.data.float().pow(2).sum(1).mean()).sqrt())

    def __next__(self) -> Batch:
        idx = (torch.arange(self.batch_size) + self.pos * self.batch_size) % len(self.data)
        self.pos += 1
        return Batch(self.data[idx], idx.to(torch.int64))

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = int(state["pos"])


def cli(*args: str) -> list[str]:
    """The real `monoscope train` command in a child process (through the main CLI once it has
    the subcommand, else the train module's own entry point, which builds the same parser)."""
    from monoscope.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    if "train" in getattr(sub, "choices", {}):
        return [sys.executable, "-m", "monoscope.cli", "train", *args]
    return [sys.executable, "-m", "monoscope.train.cli", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def wait_for_checkpoint(proc: subprocess.Popen[bytes], folder: Path, timeout: float = 120) -> None:
    """Block until `folder` holds a complete checkpoint (or fail if the child exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((p / "COMPLETE").is_file() for p in folder.glob("step-*")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before its first checkpoint")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    raise AssertionError("no checkpoint appeared in time")


def final_state(out: Path) -> dict[str, torch.Tensor]:
    """Final weights, plus the last checkpoint's optimizer state and dead counters."""
    weights = safetensors.torch.load_file(str(out / "sae.safetensors"))
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    opt = torch.load(last / "optimizer.pt", weights_only=True)
    state = torch.load(last / "state.pt", weights_only=True)
    flat = {f"w.{k}": v for k, v in weights.items()}
    flat.update({f"opt.{i}.{k}": v for i, st in opt["state"].items() for k, v in st.items()})
    flat["dead_since"] = state["dead_since"]
    return flat


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    strip = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
             for line in (a / "train_log.jsonl").read_text().splitlines()]
    strip_b = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
               for line in (b / "train_log.jsonl").read_text().splitlines()]
    assert strip == strip_b
