"""Capture on several processes: disjoint slices of one corpus written into one store.

    torchrun --nproc-per-node 4 -m monoscope capture --model default --tokens 100M --out runs/x/acts

Every rank forms the same contexts and batches from the corpus (tokenising is cheap) and runs the
model only on the shards it owns: shard i belongs to rank i mod W. Work goes in rounds of W
shards; at the end of each round every rank writes its shard file (atomically, `write_shard`)
and rank 0 records the round's shards in order in the store's progress record, so a killed capture
loses at most the round in flight and resumes (with any world size) like a one-process capture.
The row policy is measured from shard 0, as in one process: rank 0 owns it and broadcasts the
policy before the round's keep masks are computed. Rank 0 alone holds the folder lock, reads the
store's state and writes the manifest at the end, with the same code as `capture`, so the store is
byte-identical (shards and manifest) to a one-process capture of the same contexts on the same
kind of device and precision.

Collectives carry only small objects (gloo, even when the model runs on cuda:LOCAL_RANK).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from monoscope.capture import STORE_DTYPES, CaptureConfig, CaptureResult, build_manifest, capture, config_key
from monoscope.corpus import Corpus, open_corpus
from monoscope.corpus.contexts import batched_contexts
from monoscope.errors import MonoscopeError, StoreError
from monoscope.locking import FolderLock
from monoscope.model import LoadedModel, load_model
from monoscope.progress import progress_bar
from monoscope.store.manifest import RowPolicy, ShardInfo
from monoscope.store.shard import shard_name, write_shard
from monoscope.store.writer import StoreWriter
from monoscope.train.distributed import DEFAULT_TIMEOUT_S, ENV_VARS, DistributedError, agree, end_process_group
from monoscope.units import parse_count


def capture_distributed(out: str | Path, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                        **options: Any) -> CaptureResult | None:
    """`monoscope.capture.capture` on every process of a torchrun launch (same arguments on every rank);
    returns the result on rank 0 and None on the others (module docstring). `options` are exactly
    `capture`'s keyword arguments, bound against its signature (defaults included), so the two
    entry points cannot drift apart; an unknown one is a TypeError, as for `capture` itself."""
    bound = inspect.signature(capture).bind(out, **options)
    bound.apply_defaults()
    args = dict(bound.arguments)
    owned = not dist.is_initialized()
    if owned:
        missing = [v for v in ENV_VARS if v not in os.environ]
        if missing:
            raise MonoscopeError(f"distributed capture needs torchrun's environment ({', '.join(missing)} not set): "
                                 "launch it with `torchrun --nproc-per-node N -m monoscope capture ...`")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    done = False
    try:
        result = _capture(Path(out), args)
        done = True
        return result
    except (RuntimeError, dist.DistError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistributedError(
            f"rank {dist.get_rank()} of {dist.get_world_size()}: a collective failed during the capture ({first}); "
            "another rank died, hung past the timeout, or failed: the shards recorded so far are intact: relaunch "
            "the same command to resume") from e
    finally:
        if owned:
            end_process_group(done)


def _capture(folder: Path, a: dict[str, Any]) -> CaptureResult | None:
    """`a`: `capture`'s arguments by name (`capture_distributed`)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    main = rank == 0
    model, corpus, device = a["model"], a["corpus"], a["device"]
    stack = contextlib.ExitStack()
    with stack:
        def setup() -> tuple[CaptureConfig, Corpus, LoadedModel, Any, str]:
            cfg = CaptureConfig(tokens=parse_count(a["tokens"], "--tokens"), ctx_len=a["ctx_len"], dtype=a["dtype"],
                                batch_contexts=a["batch_contexts"], contexts_per_shard=a["contexts_per_shard"],
                                exclude_bos=a["exclude_bos"], outlier_factor=a["outlier_factor"])
            if folder.exists() and not folder.is_dir():
                raise StoreError(f"--out {folder} is a file: pass a folder for the store")
            corp = open_corpus(corpus, text_field=a["text_field"], strict_utf8=a["strict_utf8"]) \
                if isinstance(corpus, str) else corpus
            next(iter(corp.documents()))
            if main:
                stack.enter_context(FolderLock(folder, "capture"))
            dev = device
            if isinstance(model, str) and device in (None, "auto", "cuda") and torch.cuda.is_available():
                dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            lm = model if isinstance(model, LoadedModel) else load_model(model, device=dev,
                                                                            compute_dtype=a["compute_dtype"])
            hook = a["hook"]
            if hook is not None and "," in hook:
                raise MonoscopeError(f"--hook {hook}: a distributed capture stores one hook; capture several hooks "
                                     "side by side in one process (monoscope capture without torchrun)")
            hp = lm.hook(hook)
            return cfg, corp, lm, hp, config_key(lm, hp, corp.fingerprint(), cfg)

        cfg, corp, lm, hp, key = agree(setup)
        writer = agree(lambda: StoreWriter(folder, key, overwrite=a["overwrite"], trust_sizes=a["trust_sizes"])
                       if main else None)
        state: list[Any] = [None]
        if main:
            assert writer is not None
            state[0] = {"complete": writer.complete is not None, "n_shards": len(writer.shards),
                        "redo": sorted(writer.redo), "last": writer.last_needed,
                        "policy": None if writer.row_policy is None else vars(writer.row_policy),
                        "resumed": writer.done_contexts,
                        "repaired": len(writer.redo) if writer.recorded is not None else 0}
        dist.broadcast_object_list(state, src=0)
        plan = state[0]
        if plan["complete"]:
            if not main:
                return None
            assert writer is not None and writer.complete is not None
            return CaptureResult(folder, writer.complete, writer.complete.n_contexts, 0, 0.0)
        return _rounds(folder, writer, lm, hp, corp, cfg, plan, world, rank, a["progress"])


def _rounds(folder: Path, writer: StoreWriter | None, lm: LoadedModel, hp: Any, corp: Corpus, cfg: CaptureConfig,
            plan: dict[str, Any], world: int, rank: int, progress: bool) -> CaptureResult | None:
    """The capture loop of `capture._write`, each rank computing only its own shards."""
    main = rank == 0
    redo = set(plan["redo"])

    def needs(index: int) -> bool:
        return index >= plan["n_shards"] or index in redo

    policy = None if plan["policy"] is None else RowPolicy(**plan["policy"])
    store_dtype = STORE_DTYPES[cfg.dtype]
    cps = cfg.contexts_per_shard
    last = plan["last"]
    t0 = time.perf_counter()
    new_contexts = 0
    buf_tok: list[torch.Tensor] = []
    buf_act: list[torch.Tensor] = []
    buf_index = -1
    current_round = 0

    def end_round() -> None:
        """Measure the policy (once, from shard 0 on rank 0), write this rank's shard, record them all."""
        nonlocal policy, buf_index
        acts = torch.cat(buf_act) if buf_act else None
        if policy is None:
            box: list[Any] = [None]
            if main and acts is not None and buf_index == 0:
                box[0] = RowPolicy.measured(acts, cfg.exclude_bos, cfg.outlier_factor)
            dist.broadcast_object_list(box, src=0)
            policy = box[0]
            if policy is not None and writer is not None:
                writer.set_row_policy(policy)
        mine: tuple[int, ShardInfo] | None = None
        if acts is not None:
            if policy is None:
                raise StoreError("the row policy was not measured before a shard was written (shard 0 missing)")
            toks = torch.cat(buf_tok)
            mine = (buf_index, write_shard(folder / shard_name(buf_index), toks, acts, policy.keep(acts)))
        infos: list[Any] | None = [None] * world if main else None
        dist.gather_object(mine, infos, dst=0)
        if main:
            assert infos is not None and writer is not None
            for index, info in sorted(i for i in infos if i is not None):
                writer.record_shard(index, info)
        buf_tok.clear()
        buf_act.clear()
        buf_index = -1

    total = cfg.n_contexts * cfg.ctx_len
    with progress_bar("capture", total=total, unit="tok", enabled=progress and main) as bar:
        bar.update(plan["resumed"] * cfg.ctx_len)
        done = 0
        for ids in batched_contexts(lm, corp, cfg.ctx_len, cfg.batch_contexts):
            ids = ids[: cfg.n_contexts - done]
            index = done // cps
            if last is not None and index > last:
                break
            if index // world != current_round:  # every rank crosses round boundaries at the same batch
                end_round()
                current_round = index // world
            done += len(ids)
            if needs(index) and index % world == rank:
                buf_tok.append(ids.to(torch.int32))
                buf_act.append(lm.acts(hp, ids).to(store_dtype).cpu())
                buf_index = index
                new_contexts += len(ids)
                bar.update(len(ids) * cfg.ctx_len * world)
            if done >= cfg.n_contexts:
                break
        end_round()
    counts: list[Any] | None = [None] * world if main else None
    dist.gather_object(new_contexts, counts, dst=0)
    outcome: list[Any] = [("ok", None)]
    result: CaptureResult | None = None
    if main:
        assert writer is not None and counts is not None
        try:
            if not writer.shards:
                raise StoreError(f"no contexts were captured from corpus {corp.describe().get('path', 'default')}")
            manifest = writer.finish(build_manifest(writer, lm, hp, corp, cfg))
            result = CaptureResult(writer.folder, manifest, plan["resumed"], sum(counts) * cfg.ctx_len,
                                   time.perf_counter() - t0, plan["repaired"])
        except MonoscopeError as e:
            outcome[0] = ("error", str(e))
    dist.broadcast_object_list(outcome, src=0)  # rank 0's verdict: every rank ends alike
    kind, value = outcome[0]
    if kind == "error":
        raise MonoscopeError(value if main else f"rank 0: {value}")
    return result
