"""Distributed training through the Python API (`train_distributed`), ranks forked as gloo processes.

Data parallel, feature sharded and both on a 2x2 mesh end with the weights of one process trained on
the same batches (max abs difference <= 1e-5, TopK indices identical); a rank killed mid-run makes the
others stop with a clear error well within 60 s; the rerun with resume=True ends bit-identical to an
uninterrupted run of the same world size; impossible combinations are one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.sae import load_sae
from monoscope.train import TrainConfig, train, train_distributed
from tests.distributed.helpers import COMMON, alive, fork_ranks, join_ranks, weights
from tests.train.helpers import synthetic_rows


@pytest.fixture(scope="module")
def reference(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, the ordinary trainer, same settings and batches."""
    out = tmp_path_factory.mktemp("ref") / "sae"
    train(out, store=store, progress=False, **COMMON)
    return out


def config(**over: object) -> TrainConfig:
    return TrainConfig(**{**COMMON, "progress": False, **over})  # type: ignore[arg-type]


def run_ranks(world: int, tmp: Path, timeout: float = 120, **kwargs: object) -> list[dict[str, object]]:
    return join_ranks(fork_ranks(world, tmp, **kwargs), tmp, timeout)


def topk_indices(out: Path) -> torch.Tensor:
    sae = load_sae(out)
    x = synthetic_rows(256, seed=7) * sae.cfg.normaliser
    f = sae.encode(x)
    return f.topk(sae.cfg.k, dim=1).indices.sort(dim=1).values  # type: ignore[arg-type]


@pytest.mark.parametrize(("world", "shards"), [(2, 1), (2, 2), (4, 2)], ids=["dp2", "fs2", "dp2xfs2"])
def test_same_weights_as_one_process(store: Path, reference: Path, tmp_path: Path, world: int, shards: int) -> None:
    out = tmp_path / "sae"
    res = run_ranks(world, tmp_path, store=store, out=out, config=config(), shard_features=shards, timeout_s=60)
    assert [r["code"] for r in res] == [0] * world, res
    a, b = weights(reference), weights(out)
    assert a.keys() == b.keys()
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(diff.values()) <= 1e-5, diff
    assert torch.equal(topk_indices(reference), topk_indices(out))
    prov = load_sae(out).provenance
    assert prov["distributed"] == {"world_size": world, "data_parallel": world // shards, "shard_features": shards}
    assert prov["steps"] == 60
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert len(torch.load(ckpt / "optimizer.pt", weights_only=True)["ranks"]) == world


@pytest.mark.parametrize("shards", [1, 2], ids=["dp2", "fs2"])
def test_aux_rows_takes_the_rows_of_one_process(store: Path, reference: Path, tmp_path: Path, shards: int) -> None:
    """AuxK on every 4th row (`aux_rows` 16 of a 64-row batch): two data-parallel ranks (8 of their 32 rows each) or
    two feature shards end with one process's weights; and those differ from AuxK on every row (the reference), so
    the cap took effect."""
    one = tmp_path / "one" / "sae"
    train(one, store=store, progress=False, **{**COMMON, "aux_rows": 16})
    out = tmp_path / "dp" / "sae"
    res = run_ranks(2, tmp_path, store=store, out=out, config=config(aux_rows=16), shard_features=shards,
                   timeout_s=60)
    assert [r["code"] for r in res] == [0, 0], res
    a, b, ref = weights(one), weights(out), weights(reference)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert max(float((a[k] - ref[k]).abs().max()) for k in a) > 1e-3


def wait_for_checkpoint(out: Path, procs: list[Any], after: int = 0) -> None:
    deadline = time.monotonic() + 120
    while not any(int(p.name[5:]) > after and (p / "COMPLETE").is_file() for p in (out / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline and all(p.is_alive() for p in procs), "no checkpoint appeared"
        time.sleep(0.005)
    assert all(p.is_alive() for p in procs), "the run finished before it could be stopped: give it more steps"


def test_sharded_default_dead_window_counts_the_whole_dictionary(store: Path, tmp_path: Path) -> None:
    """The default dead window's floor (64·F/k tokens) counts the whole dictionary's F, not a shard's: a sharded run
    calls the same features dead as one process does."""
    cfg = config(dead_window=None)
    out = tmp_path / "sae"
    assert [r["code"] for r in run_ranks(2, tmp_path, store=store, out=out, config=cfg, shard_features=2)] == [0, 0]
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert json.loads((ckpt / "state.json").read_text())["dead_window"] == cfg.dead_window_tokens(128) == 2048


def test_killed_rank_stops_the_others_then_resume_is_exact(store: Path, tmp_path: Path) -> None:
    cfg = config(tokens=240 * 64, checkpoint_every=20)
    ref = tmp_path / "ref"
    assert [r["code"] for r in run_ranks(2, tmp_path, store=store, out=ref, config=cfg, shard_features=2)] == [0, 0]

    # SIGTERM on one rank: every rank stops after the same step, with one checkpoint
    out = tmp_path / "sae"
    procs = fork_ranks(2, tmp_path, store=store, out=out, config=cfg, shard_features=2, timeout_s=30)
    wait_for_checkpoint(out, procs)
    os.kill(procs[1].pid, signal.SIGTERM)
    res = join_ranks(procs, tmp_path, timeout=60)
    assert [r["code"] for r in res] == [2, 2], res
    assert res[0]["msg"] == res[1]["msg"]
    m = re.match(r"TrainingInterrupted: stopped by signal 15 after step (\d+) of 240 on every rank \(checkpoint "
                 r".*step-(\d+)\): run the same command with --resume to continue$", str(res[0]["msg"]))
    assert m and m.group(1) == str(int(m.group(2))), res[0]["msg"]
    stopped_at = int(m.group(1))

    # SIGKILL on one rank after the resumed run's next checkpoint
    procs = fork_ranks(2, tmp_path, store=store, out=out, config=cfg, shard_features=2, resume=True, timeout_s=30)
    wait_for_checkpoint(out, procs, after=stopped_at)
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    res = join_ranks(procs, tmp_path, timeout=60)
    assert time.monotonic() - t0 < 60
    assert res[1]["code"] is None  # killed
    assert res[0]["code"] == 2, res
    msg = str(res[0]["msg"])
    assert msg.startswith("DistributedError: rank 0 of 2: a collective failed during step "), msg
    assert "relaunch the same command with --resume" in msg
    assert alive([p.pid for p in procs]) == []

    res = run_ranks(2, tmp_path, store=store, out=out, config=cfg, shard_features=2, resume=True)
    assert [r["code"] for r in res] == [0, 0], res
    a, b = weights(ref), weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    last_a = sorted((ref / "checkpoints").glob("step-*"))[-1]
    last_b = sorted((out / "checkpoints").glob("step-*"))[-1]
    opt_a = torch.load(last_a / "optimizer.pt", weights_only=True)["ranks"]
    opt_b = torch.load(last_b / "optimizer.pt", weights_only=True)["ranks"]
    for ra, rb in zip(opt_a, opt_b, strict=True):
        for i, st in ra["state"].items():
            for key, v in st.items():
                assert torch.equal(v, rb["state"][i][key]), (i, key)


def test_impossible_combinations_are_one_line_errors(store: Path, tmp_path: Path) -> None:
    res = run_ranks(2, tmp_path, store=store, out=tmp_path / "a", config=config(), shard_features=3)
    assert [r["code"] for r in res] == [2, 2]
    assert res[0]["msg"] == ("MonoscopeError: --shard-features 3 does not divide the world size 2 (torchrun processes "
                             "in all): use a divisor of 2, or launch a multiple of 3 processes")
    res = run_ranks(2, tmp_path, store=store, out=tmp_path / "b", config=config(width=129), shard_features=2)
    assert [r["code"] for r in res] == [2, 2]
    assert res[1]["msg"] == ("MonoscopeError: rank 0: --width 129 gives 129 features, which do not split into "
                             "--shard-features 2 equal shards: use a width divisible by 2")
    res = run_ranks(2, tmp_path, store=store, out=tmp_path / "b2", config=config(batch_size=63))
    assert [r["code"] for r in res] == [2, 2]
    assert res[0]["msg"] == ("MonoscopeError: --batch-size 63 does not split over 2 data-parallel ranks (world 2 / "
                             "--shard-features 1): use a multiple of 2")
    res = run_ranks(2, tmp_path, store=store, out=tmp_path / "c", config=config(arch="transcoder"), shard_features=2)
    assert [r["code"] for r in res] == [2, 2]
    assert res[0]["msg"] == ("MonoscopeError: --shard-features 2 splits the features of --arch topk, batchtopk, "
                             "matryoshka, relu-l1, jumprelu, gated only, not transcoder: train transcoder data "
                             "parallel (--shard-features 1), or use --arch topk")

    # a checkpoint of 2 ranks (1 x 2) resumed by 2 ranks as 2 x 1, and by one process
    out = tmp_path / "d"
    cfg = config(tokens=30 * 64, checkpoint_every=10)
    assert [r["code"] for r in run_ranks(2, tmp_path, store=store, out=out, config=cfg, shard_features=2)] == [0, 0]
    (out / "cfg.json").unlink()  # as if killed after the last checkpoint, before the final save
    (out / "sae.safetensors").unlink()
    res = run_ranks(2, tmp_path, store=store, out=out, config=cfg, shard_features=1, resume=True)
    assert [r["code"] for r in res] == [2, 2]
    assert res[0]["msg"] == (
        f"MonoscopeError: cannot resume {out}: its checkpoint was made with world size 2 and --shard-features 2, "
        "this launch has world size 2 and --shard-features 1: relaunch with --nproc-per-node/--nnodes giving 2 "
        "processes and --shard-features 2")
    with pytest.raises(MonoscopeError, match=r"^cannot resume .*: its checkpoint was made by 2 processes "
                                             r"\(--shard-features 2\): relaunch with torchrun --nproc-per-node 2 "
                                             r"and --shard-features 2$"):
        train(out, store=store, config=cfg, resume=True)
    assert not any(alive([c.pid]) for c in __import__("psutil").Process().children(recursive=True))


def test_without_torchrun_environment_is_an_error(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(MonoscopeError) as e:
        train_distributed(tmp_path / "x", store=store, config=config())
    assert str(e.value).startswith("distributed training needs torchrun's environment (RANK, WORLD_SIZE, "
                                   "MASTER_ADDR, MASTER_PORT not set): launch it with `torchrun")
