"""Launching real ranks for the distributed tests: bare torchrun environments, or torchrun itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import safetensors.torch
import torch

SRC = str(Path(__file__).resolve().parents[2] / "src")
ROOT = str(Path(__file__).resolve().parents[2])

COMMON: dict[str, Any] = {"arch": "topk", "k": 4, "width": 128, "tokens": 60 * 64, "batch_size": 64, "lr": 3e-3,
                          "dead_window": 256, "checkpoint_every": 20, "log_every": 10}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([SRC, ROOT, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def train_args(store: Path, out: Path, settings: dict[str, Any], *extra: str) -> list[str]:
    flat = [str(store), "--out", str(out), "--quiet", *extra]
    for k, v in settings.items():
        flat += ["--" + k.replace("_", "-"), str(v)]
    return flat


def launch_ranks(world: int, argv: list[str], **extra_env: str) -> list[subprocess.Popen[str]]:
    """`world` processes of `python -m monoscope ARGV` with the variables torchrun would set."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        e = env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra_env)
        procs.append(subprocess.Popen([sys.executable, "-m", "monoscope", *argv], env=e, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def wait_all(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[tuple[int, str, str]]:
    """Every process's (returncode, stdout, stderr); kills them all if one overruns `timeout`."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def torchrun(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "monoscope", *argv]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(out / "sae.safetensors"))


def alive(pids: list[int]) -> list[int]:
    """The pids of `pids` that are still running (zombies count as gone)."""
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def _rank_main(rank: int, world: int, port: int, fn: Any, kwargs: dict[str, Any], result: str) -> None:
    """A forked rank: a Python API call (`train_distributed` by default) with torchrun's variables set."""
    import json
    import traceback

    from monoscope.errors import MonoscopeError

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code, msg = 0, ""
    try:
        fn(**kwargs)
    except MonoscopeError as e:
        code, msg = 2, f"{type(e).__name__}: {e}"
    except BaseException:  # reported to the test, which fails on it
        code, msg = 3, traceback.format_exc()
    Path(result).write_text(json.dumps({"code": code, "msg": msg}))
    os._exit(code)


def fork_ranks(world: int, tmp: Path, fn: Any = None, **kwargs: Any) -> list[Any]:
    """`world` forked processes each calling `fn(**kwargs)` (default `train_distributed`; fast: no re-import)."""
    import multiprocessing

    from monoscope.train import train_distributed

    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = []
    for rank in range(world):
        p = ctx.Process(target=_rank_main, args=(rank, world, port, fn or train_distributed, kwargs,
                                                    str(tmp / f"rank{rank}.json")))
        p.start()
        procs.append(p)
    return procs


def join_ranks(procs: list[Any], tmp: Path, timeout: float = 120) -> list[dict[str, Any]]:
    """Each forked rank's {"code", "msg"} (code None: it died without reporting)."""
    import json

    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    out = []
    for rank, p in enumerate(procs):
        f = tmp / f"rank{rank}.json"
        out.append(json.loads(f.read_text()) if f.is_file() else {"code": None, "msg": f"exit {p.exitcode}"})
        f.unlink(missing_ok=True)
    return out


def one_process_and_ranks(store: Path, tmp: Path, settings: dict[str, Any], world: int,
                          **kwargs: Any) -> tuple[Path, Path, Any]:
    """Train `settings` in this process (tmp/ref) and on `world` forked gloo ranks (tmp/sae, `kwargs` such as
    shard_features passed on); every rank must exit 0. Returns (ref, out, the ranks' TrainConfig)."""
    from monoscope.train import TrainConfig, train

    ref, out = tmp / "ref", tmp / "sae"
    train(ref, store=store, progress=False, **settings)
    cfg = TrainConfig(**{**settings, "progress": False})
    res = join_ranks(fork_ranks(world, tmp, store=store, out=out, config=cfg, timeout_s=60, **kwargs), tmp)
    assert [r["code"] for r in res] == [0] * world, res
    return ref, out, cfg


def torchrun_sharded_matches_one_process(store: Path, tmp: Path, settings: dict[str, Any], out: Path) -> Path:
    """`settings` trained in this process (tmp/ref) and by a real `torchrun --nproc-per-node 2 ... --shard-features
    2` into `out`: the run exits 0 with one process's weights (max abs difference <= 1e-5). Returns ref."""
    from monoscope.train import train

    ref = tmp / "ref"
    train(ref, store=store, progress=False, **settings)
    done = subprocess.run(torchrun(2, ["train", *train_args(store, out, settings, "--shard-features", "2")]),
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    return ref
