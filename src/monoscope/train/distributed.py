"""Training on several processes with torch.distributed: data parallel, feature sharded, or both.

    torchrun --nproc-per-node 4 -m monoscope train runs/x/acts --arch topk --k 32 --width 64x \\
        --tokens 1G --shard-features 2 --out runs/x/sae          # 2 data-parallel x 2 feature shards

Launched by torchrun (or anything that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), every process calls `train_distributed` with the same arguments. The world of W
ranks is a 2-D `DeviceMesh` of shape (dp, fs), fs = `shard_features`, dp = W / fs:

* data parallel (dp): every rank walks the same shuffled batch cursor of the store and keeps its
  own disjoint slice of each global batch (rows [i·B/dp, (i+1)·B/dp)); gradients are averaged over
  the dp group, the dead-feature "fired" masks are OR-reduced, so every replica stays identical.
* feature sharded (fs): rank j of an fs group holds features [j·F/fs, (j+1)·F/fs) of W_enc, b_enc
  and W_dec (and their Adam moments and dead counters); b_dec is replicated. TopK stays global:
  each rank takes the top k of its slice, the candidates (values and global ids) are all-gathered,
  and the top k of the candidates are the row's features (the global top k is always among them).
  Each rank decodes its own selected features; the partial reconstructions (each with b_dec / fs)
  are all-reduced, so every rank has the full x̂ and the same loss; the backward of that sum is the
  identity for each rank's part. b_dec's gradient (the encoder path is partial per shard) is summed
  over the fs group; the global gradient norm for clipping sums the shards' squares. AuxK picks
  its k_aux dead latents globally the same way.

One rank's step equals one process's step on the same global batch up to float summation order
(tests: max abs weight difference <= 1e-5 after training, TopK indices identical).

Feature sharding: topk, and batchtopk and matryoshka (their k·B entries chosen over the whole mesh:
every rank's top k·B candidates all-gathered, one global cut; `_global_batch_select`; matryoshka's
prefix levels are partial sums per shard, the full prefixes clipped to its feature range, all levels
all-reduced together: `_level_parts`). relu-l1, jumprelu and gated (`_forward_local_select`): each
feature decides alone, so each shard computes its codes, its partial reconstruction (gated: also its
part of the frozen-decoder gate reconstruction) and its part of the per-feature penalty (relu-l1 and
gated: L1 weighted by decoder norms; jumprelu: L0 through the straight-through estimators), and one
all-reduce sums them; jumprelu's log_threshold and gated's r_mag/b_mag are split with their features
(`FEATURE_KEYS`). Dead features are revived by AuxK, by resampling (`_resample_sharded`: every rank
draws the inputs for all shards' dead features in global order, as one process does, and keeps its
own; the live features' mean norms are summed over the shards) or not at all. transcoder and
crosscoder train data parallel only.
Data parallel: every architecture; with fs = 1, topk, batchtopk and matryoshka run the sharded forward
above with one shard (`_global_batch_select` over the dp ranks: each rank's top k·B candidates' values
all-gathered, a global cut, the threshold's running minimum all-reduced), the others their own
forward on each replica's rows;
relu-l1 resamples dead features on the global batch (x̂ all-gathered at the resample steps), and
batchtopk's eval threshold is calibrated on rank 0 from the next global batches, as one process
does. Activations from a store (not streamed; `--loss mse`).

Outputs and resume: rank 0 alone writes the log, the checkpoints and the final SAE, atomically
(`CheckpointDir`). A checkpoint holds the assembled SAE (sae.safetensors, loadable as usual) and
every rank's own state (Adam moments of its shard, dead counters, metric sums, RNG states) in
optimizer.pt / state.pt, gathered to rank 0; on resume rank 0 reads it and scatters each rank its
part, so a run killed on any rank resumes to the same final weights as an uninterrupted run with
the same world size and `shard_features` (a different topology is refused).

Failure: every collective runs under the process group's timeout (`timeout_s`); a rank that dies
or hangs makes the others raise `DistributedError` (one line, naming the step and the last
checkpoint) instead of waiting forever; torchrun then stops the remaining workers. Setup errors
(bad flags, a finished or foreign --out) are agreed on by all ranks before training, so every rank
stops with the same message. SIGTERM/SIGINT on any rank stop all ranks after the same step with a
checkpoint (the stop flag is all-reduced each step).

Devices: CUDA with NCCL when a GPU is visible (each process uses cuda:LOCAL_RANK), else the CPU
with gloo; `--device cpu` forces gloo.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import monoscope
from monoscope.errors import MonoscopeError
from monoscope.fileio import check_output_dir
from monoscope.locking import folder_locks
from monoscope.progress import progress_bar
from monoscope.sae import SAE, SAEConfig, build_sae, save_sae
from monoscope.sae.base import fired_from_sparse
from monoscope.sae.jumprelu import INIT_L0, _SparseJumpReLUL0, jumprelu_l0
from monoscope.sae.relu import positive_mask, relu_linear
from monoscope.sae.sparse import SparsePattern, gather_linear, sparse_decode
from monoscope.sae.topk import _batch_topk, _order_view
from monoscope.store.batches import Batch
from monoscope.train.checkpoint import Checkpoint, CheckpointDir
from monoscope.train.config import TrainConfig
from monoscope.train.data import TrainData, store_data
from monoscope.train.dead import reinit_features, resample_dead
from monoscope.train.log import LOG_NAME, JsonlLog
from monoscope.train.trainer import CALIBRATION_BATCHES, BatchSource, Peeked, RunOutcome, Trainer

DEFAULT_TIMEOUT_S = 600.0
"""Process-group timeout: how long a rank waits in a collective for a silent peer (rank 0 writing a
large checkpoint keeps the others waiting, so it is generous; tests lower it)."""

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

FEATURE_SHARDED = ("topk", "batchtopk", "matryoshka", "relu-l1", "jumprelu", "gated")
"""Architectures whose features `--shard-features` splits over ranks; every architecture trains data parallel."""

SELECT_SHARDED = ("topk", "batchtopk", "matryoshka")
"""Feature-sharded architectures whose selection is global (`_global_topk`, `_global_batch_select`); the others
(relu-l1, jumprelu, gated) decide each feature alone and sum per-feature penalties over the shards."""

FEATURE_KEYS = ("W_enc", "b_enc", "W_dec", "log_threshold", "r_mag", "b_mag")
"""state_dict entries indexed by feature (dim 0): split over the fs ranks; every other entry is replicated."""

_T = TypeVar("_T")


class DistributedError(MonoscopeError):
    """Another rank died, hung, or failed: this rank stopped (the last checkpoint is intact)."""


def launched_distributed() -> bool:
    """True in a process started by torchrun (or with its environment variables set by hand)."""
    return all(v in os.environ for v in ENV_VARS)


@dataclass
class Topology:
    """This process's place in the (dp, fs) mesh and the groups it talks to."""

    world: int
    rank: int
    local_rank: int
    dp: int
    fs: int
    dp_rank: int
    fs_rank: int
    device: torch.device
    dp_group: Any
    fs_group: Any
    mesh: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, int]:
        """What a checkpoint records about the topology (a resume must match it)."""
        return {"world_size": self.world, "data_parallel": self.dp, "shard_features": self.fs}


def init_topology(shard_features: int = 1, device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Topology:
    """Join the process group (gloo on CPU, NCCL on CUDA: cuda:LOCAL_RANK) and build the (dp, fs) mesh.
    Reuses a process group the caller already initialised."""
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing and not dist.is_initialized():
        raise MonoscopeError(
            f"distributed training needs torchrun's environment ({', '.join(missing)} not set): launch it with "
            "`torchrun --nproc-per-node N -m monoscope train ...`"
        )
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if shard_features < 1 or world % shard_features:
        raise MonoscopeError(
            f"--shard-features {shard_features} does not divide the world size {world} (torchrun processes in "
            f"all): use a divisor of {world}, or launch a multiple of {shard_features} processes"
        )
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda"):
        raise MonoscopeError(f"--device {device!r} in distributed training: use auto, cpu or cuda (each process "
                             "takes cuda:LOCAL_RANK)")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not use_cuda:
        raise MonoscopeError(f"--device {device} asked for CUDA but no CUDA GPU is visible: use --device cpu or auto")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise MonoscopeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible: "
                                 "launch at most one process per GPU (--nproc-per-node)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    fs = shard_features
    dp = world // fs
    mesh = init_device_mesh(dev.type, (dp, fs), mesh_dim_names=("dp", "fs"))
    return Topology(world=world, rank=dist.get_rank(), local_rank=local_rank, dp=dp, fs=fs,
                    dp_rank=mesh.get_local_rank("dp"), fs_rank=mesh.get_local_rank("fs"), device=dev,
                    dp_group=mesh.get_group("dp"), fs_group=mesh.get_group("fs"), mesh=mesh)


def agree(fn: Callable[[], _T]) -> _T:
    """Run `fn` on every rank; if it raises a MonoscopeError on any rank, raise that error (the lowest
    rank's, naming it) on every rank, so no rank is left waiting in a collective for one that quit."""
    world, rank = dist.get_world_size(), dist.get_rank()
    error: str | None = None
    result: Any = None
    try:
        result = fn()
    except MonoscopeError as e:
        error = str(e)
    errors: list[str | None] = [None] * world
    dist.all_gather_object(errors, error)
    for r, msg in enumerate(errors):
        if msg is not None:
            where = "" if r == rank or world == 1 else f"rank {r}: "
            raise MonoscopeError(where + msg)
    return result  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- collectives with autograd


class _SumParts(torch.autograd.Function):
    """x̂ = Σ_ranks partial: forward all-reduces; each rank's part gets the full x̂ gradient back
    (∂x̂/∂partial_own = I; every rank computes the same loss copy, so nothing is summed)."""

    @staticmethod
    def forward(ctx: Any, part: Tensor, group: Any) -> Tensor:
        out = part.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _sum_parts(part: Tensor, group: Any, size: int) -> Tensor:
    return part if size == 1 else _SumParts.apply(part, group)


def _all_gather(t: Tensor, group: Any, size: int, dim: int) -> Tensor:
    """Concatenate `t` of every rank of `group` along `dim`, in rank order (dim 0: rows [size·b, ...]; dim 1:
    columns [B, size·m])."""
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _global_topk(pre: Tensor, k: int, offset: int, topo: Topology) -> tuple[Tensor, Tensor]:
    """Global top-k of each row of the sharded pre-activations pre [B, F_local] (no grad) -> (values
    [B, k] in pre's dtype, global feature ids [B, k]). Ranked like `TopKSAE` (integer view), so
    the positive entries chosen are the same as on one process."""
    kk = min(k, pre.shape[1])
    loc_key, loc_i = _order_view(pre).topk(kk, dim=1, sorted=False)  # [B, kk]
    vals = _all_gather(loc_key.view(pre.dtype), topo.fs_group, topo.fs, 1)  # [B, fs·kk]
    ids = _all_gather(loc_i + offset, topo.fs_group, topo.fs, 1)
    if vals.shape[1] == k:
        return vals, ids
    _, pos = _order_view(vals).topk(k, dim=1, sorted=False)  # [B, k]
    return vals.gather(1, pos), ids.gather(1, pos)


# ----------------------------------------------------------------------------- batches


class RankSlice:
    """This rank's disjoint slice of every global batch of `source` (same cursor on every rank)."""

    def __init__(self, source: BatchSource, parts: int, index: int) -> None:
        self.source = source
        self.parts = parts
        self.index = index
        self.last_full: Batch | None = None
        """The whole global batch of the last `__next__` (every rank checks it for NaN/inf alike)."""

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        full = next(self.source)
        self.last_full = full
        n = full.acts.shape[0] // self.parts
        lo = self.index * n
        return Batch(full.acts[lo: lo + n], full.rows[lo: lo + n])

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


# ----------------------------------------------------------------------------- the trainer


def shard_config(cfg: SAEConfig, fs: int) -> SAEConfig:
    """The SAEConfig of one feature shard (d_sae / fs features; k and k_aux capped to fit)."""
    d = cfg.to_dict()
    n = cfg.d_sae // fs
    d.update(d_sae=n)
    if d.get("prefixes") is not None:  # matryoshka: the shard's own config needs valid prefixes; the trainer
        d["prefixes"] = [n]  # decodes the full dictionary's prefixes across the shards (`_level_parts`)
    for name in ("k", "k_aux"):  # topk-style only (None for the others)
        if d.get(name) is not None:
            d[name] = min(int(d[name]), n)
    return SAEConfig.from_dict(d)


def shard_state(full: dict[str, Tensor], fs: int, fs_rank: int) -> dict[str, Tensor]:
    """Rows of the feature-indexed tensors (`FEATURE_KEYS`) of a full state_dict that shard `fs_rank` holds."""
    n = full["W_enc"].shape[0] // fs
    lo = fs_rank * n
    return {k: (v[lo: lo + n].clone() if k in FEATURE_KEYS else v.clone()) for k, v in full.items()}


def join_shards(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The full state_dict from the fs shards' state_dicts, in feature order (inverse of `shard_state`)."""
    return {k: (torch.cat([s[k] for s in shards]) if k in FEATURE_KEYS else shards[0][k]) for k in shards[0]}


class DistributedTrainer(Trainer):
    """`Trainer` whose SAE is this rank's feature shard (an SAE of its class built from `shard_config(full_cfg, fs)`)
    or its data-parallel replica (the whole SAE), and whose steps talk to the
    other ranks (module docstring)."""

    graphable = False  # its step talks to the other ranks: not captured as a CUDA graph (`graph_step`)

    def __init__(self, sae: SAE, full_cfg: SAEConfig, config: TrainConfig, source: RankSlice, topo: Topology,
                 **kwargs: Any) -> None:
        super().__init__(sae, config, source, dictionary_size=full_cfg.d_sae, **kwargs)
        self.topo = topo
        self.full_cfg = full_cfg
        self.sharded_topk = full_cfg.arch in SELECT_SHARDED
        """topk and batchtopk run the feature-sharded forward (any fs)."""
        self.sharded_local = topo.fs > 1 and not self.sharded_topk
        """relu-l1 (jumprelu, gated) over several shards: `_forward_local_select`; with fs = 1 their own forward."""
        self.k = int(full_cfg.k or 0)
        self.k_aux = int(full_cfg.k_aux or 0)
        self.offset = topo.fs_rank * sae.cfg.d_sae
        self.slice: RankSlice = source

    @torch.no_grad()
    def init_b_dec(self, sample_raw: Tensor) -> None:
        """`Trainer.init_b_dec`; jumprelu's thresholds aim at the full dictionary's initial L0 (each shard
        holds F / fs of the features, so it aims at that share: the same per-feature quantile)."""
        init_threshold = getattr(self.sae, "init_threshold_", None)
        if init_threshold is None or self.topo.fs == 1:
            return super().init_b_dec(sample_raw)
        x = self.scaled(sample_raw)
        x = x[torch.isfinite(x).all(1)]
        if not x.shape[0]:
            return None
        if self.cfg.init_b_dec != "zero":
            self.sae.init_b_dec_(x, method=self.cfg.init_b_dec)
        n_full = self.full_cfg.d_sae
        init_threshold(x, target_l0=min(INIT_L0, n_full / 4) * self.sae.cfg.d_sae / n_full)
        return None

    # ---------------------------------------------------------------- forward
    def _forward(self, x: Tensor, dead_mask: Tensor | None,
                 sparsity_coef: float) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
        """(total loss, [mse, sparsity, aux, fvu, l0] detached, fired [F_local], x̂ [b, d] detached) for this
        rank's rows x [b, d]."""
        if self.sharded_local:
            return self._forward_local_select(x, sparsity_coef)
        if not self.sharded_topk:  # a whole replica: the architecture's own forward on this rank's rows
            out = self.sae(x, sparsity_coef=sparsity_coef, dead_mask=dead_mask)
            return out.total, [out.mse.detach(), out.sparsity.detach(), out.aux.detach(), out.fvu, out.l0], \
                out.fired, out.x_hat.detach()
        sae, topo = self.sae, self.topo
        cd = sae.compute_dtype(x.device)
        x32, x_c = sae._prepare_input(x, cd)
        n_rows, n_loc = x.shape[0], sae.cfg.d_sae
        with torch.no_grad():
            pre = sae._encode_nograd(x_c, cd)  # [b, F_local]
            if self.full_cfg.arch in ("batchtopk", "matryoshka"):
                rows, cols, values, l0 = self._global_batch_select(pre)
            else:
                sel_v, sel_i = _global_topk(pre, self.k, self.offset, topo)  # [b, k]
                mine = (sel_i >= self.offset) & (sel_i < self.offset + n_loc)
                rows, slots = mine.nonzero(as_tuple=True)  # row-major
                cols = sel_i[rows, slots] - self.offset  # [nnz] local feature ids
                values = pre[rows, cols]
                l0 = (sel_v > 0).sum(dtype=torch.float32) / n_rows
            counts = torch.bincount(rows, minlength=n_rows)
            pattern = SparsePattern(cols, n_loc, counts.cumsum(0) - counts)
        xs, shift = sae._sparse_encoder_input(x32, x_c)
        vals = gather_linear(values, xs, sae.W_enc, sae.b_enc, pattern, shift).float().relu()  # [nnz]
        inner: Tensor | None = None
        if self.full_cfg.prefixes:  # matryoshka: every prefix level's partial sum, all levels in one all-reduce
            parts = self._level_parts(vals, cols, rows, n_rows, cd) + sae.b_dec.float() / topo.fs  # [b, M, d]
            levels = _sum_parts(parts, topo.fs_group, topo.fs)
            x_hat = levels[:, -1]
            inner = sum(((x32 - levels[:, m]).pow(2).sum(-1).mean() for m in range(levels.shape[1] - 1)),
                        x32.new_zeros(()))
        else:
            part = sparse_decode(vals, cols, sae.W_dec, dtype=cd, pattern=pattern).float()
            x_hat = _sum_parts(part + sae.b_dec.float() / topo.fs, topo.fs_group, topo.fs)  # [b, d]
        err = x32 - x_hat
        sq = err.pow(2).sum(-1)
        mse = sq.mean()
        aux = self._auxk(x_c, err, dead_mask, cd)
        if inner is not None:
            aux = inner if aux is None else inner + aux
        with torch.no_grad():
            fvu = sq.sum() / (x32 - x32.mean(0)).pow(2).sum().clamp_min(1e-12)
            fired = torch.zeros(n_loc, dtype=torch.bool, device=x.device)
            fired[cols[vals.detach() != 0]] = True
        total = mse if aux is None else mse + aux
        zero = torch.zeros((), device=x.device)
        aux_v = zero if aux is None else aux.detach()
        return total, [mse.detach(), zero, aux_v, fvu, l0], fired, x_hat.detach()

    def _level_parts(self, vals: Tensor, cols: Tensor, rows: Tensor, n_rows: int, cd: torch.dtype) -> Tensor:
        """Matryoshka: this shard's part of each prefix level, [b, M, d] (level m: Σ over its selected features
        whose global id is below prefixes[m]); the full prefixes clipped to this shard's feature range."""
        sae = self.sae
        n_loc = sae.cfg.d_sae
        prefixes = [min(max(p - self.offset, 0), n_loc) for p in self.full_cfg.prefixes or [self.full_cfg.d_sae]]
        m = len(prefixes)
        # entries are row-major and in feature order within a row, so each (row, group) bag is contiguous
        group = torch.bucketize(cols, cols.new_tensor(prefixes), right=True).clamp_max(m - 1)  # [nnz]
        counts = torch.bincount(rows * m + group, minlength=n_rows * m)
        bags = SparsePattern(cols, n_loc, counts.cumsum(0) - counts)
        parts = sparse_decode(vals.reshape(-1), cols, sae.W_dec, dtype=cd, pattern=bags).float()
        return parts.view(n_rows, m, -1).cumsum(1)

    def _global_batch_select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """batchtopk over the whole mesh: the k·B largest entries of the global batch (B = b·dp rows, every
        shard's features) -> this rank's (rows, local cols, values, L0 of its rows over all shards). Each rank's
        top k·B candidates are all-gathered (every (row, feature) entry lives on exactly one rank), the
        (k·B)-th largest is the cut; the running threshold takes the smallest kept positive value of all ranks."""
        topo = self.topo
        n_rows = pre.shape[0]
        n_keep = self.k * n_rows * topo.dp
        rows, cols, vals = _batch_topk(pre, min(n_keep, pre.numel()))  # row-major
        gathered = [torch.empty_like(vals) for _ in range(topo.world)]
        dist.all_gather(gathered, vals.contiguous())
        cut = _order_view(torch.cat(gathered)).topk(n_keep, sorted=False).values.min()
        keep = _order_view(vals) >= cut
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        pos = vals[vals > 0]
        if self.sae.training:
            m = (pos.min() if pos.numel() else pos.new_full((), math.inf)).float().reshape(1)
            dist.all_reduce(m, op=dist.ReduceOp.MIN)
            self.sae._update_threshold(m[torch.isfinite(m)])  # type: ignore[operator]
        n_pos = torch.tensor([pos.numel()], dtype=torch.float32, device=pre.device)
        if topo.fs > 1:
            dist.all_reduce(n_pos, group=topo.fs_group)
        return rows, cols, vals, n_pos[0] / n_rows

    def _auxk(self, x_c: Tensor, err: Tensor, dead_mask: Tensor | None, cd: torch.dtype) -> Tensor | None:
        """AuxK (`TopKSAE._auxk`) with the k_aux dead latents chosen over every shard."""
        if dead_mask is None:
            return None
        topo, sae = self.topo, self.sae
        sub = sae._aux_row_slice(err.shape[0])  # the same rows on every shard of a data-parallel rank
        if sub is not None:
            x_c, err = x_c[sub], err[sub]
        dead_idx = dead_mask.nonzero().squeeze(1)  # [n_dead_local]
        n_dead_t = torch.tensor([dead_idx.numel()], dtype=torch.int64, device=x_c.device)
        if topo.fs > 1:
            dist.all_reduce(n_dead_t, group=topo.fs_group)
        n_dead = int(n_dead_t)
        if n_dead == 0:
            return None
        k_aux = min(self.k_aux, n_dead)
        pre = F.linear(x_c, sae.W_enc.index_select(0, dead_idx).to(cd), sae.b_enc.index_select(0, dead_idx).to(cd))
        n_rows, n_local = pre.shape
        with torch.no_grad():
            kl = min(k_aux, n_local)
            key, pos = _order_view(pre.detach()).topk(kl, dim=1, sorted=False)  # [b, kl]
            vals = key.view(pre.dtype)
            ids = pos + topo.fs_rank * sae.cfg.d_sae  # position among this rank's dead latents, made global
            if kl < k_aux:  # pad: -0.0 is the smallest key of the integer view, its id matches no rank
                vals = torch.cat([vals, vals.new_full((n_rows, k_aux - kl), -0.0)], 1)
                ids = torch.cat([ids, ids.new_full((n_rows, k_aux - kl), -1)], 1)
            all_v = _all_gather(vals, topo.fs_group, topo.fs, 1)
            all_i = _all_gather(ids, topo.fs_group, topo.fs, 1)
            _, sel = _order_view(all_v).topk(k_aux, dim=1, sorted=False)
            chosen = all_i.gather(1, sel) - topo.fs_rank * sae.cfg.d_sae  # [b, k_aux] local dead positions
            keep = torch.zeros_like(pre)
            ok = (chosen >= 0) & (chosen < n_local)
            r, c = ok.nonzero(as_tuple=True)
            keep[r, chosen[r, c]] = 1.0
        f_aux = torch.relu(pre) * keep
        part = (f_aux @ sae.W_dec.index_select(0, dead_idx).to(cd)).float()  # [b, d]
        e_hat = _sum_parts(part, topo.fs_group, topo.fs)
        scale = min(n_dead / self.k_aux, 1.0)
        return self.cfg.aux_coef * scale * (e_hat - err.detach()).pow(2).sum(-1).mean()

    def _forward_local_select(self, x: Tensor, sparsity_coef: float) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
        """`_forward` for the architectures whose features decide alone (relu-l1): this shard's codes and
        partial reconstruction (plus b_dec / fs), its part of the per-feature penalty and of L0, summed over the
        fs group in one all-reduce (`_SumParts`: each rank's part gets the full gradient back). The loss
        is then the one process's loss on every rank."""
        sae, topo = self.sae, self.topo
        arch = self.full_cfg.arch
        cd = sae.compute_dtype(x.device)
        n_rows, d = x.shape
        via: Tensor | None = None  # gated: the gate path's partial reconstruction through the frozen decoder
        if arch == "relu-l1":
            x32, x_c = sae._prepare_input(x, cd)
            pre = sae._encode_nograd(x_c, cd)  # [b, F_local]
            with torch.no_grad():
                pattern = sae._active_pattern(positive_mask(pre))
            norms = sae.decoder_norms()  # [F_local]
            if pattern is None:  # dense codes
                f = relu_linear(pre, x_c, sae.W_enc, sae.b_enc)
                part = (f @ sae.W_dec.to(cd)).float()
                f_sum = torch.sum(f, dim=0, dtype=torch.float32)
                pen = (f_sum * norms).sum() / n_rows  # this shard's part of mean_b Σ_i f_i ‖W_dec[i]‖
                with torch.no_grad():
                    l0 = torch.count_nonzero(f).float() / n_rows
                    fired = f_sum > 0
            else:
                xs, shift = sae._sparse_encoder_input(x32, x_c)
                vals = gather_linear(pre[pattern.rows, pattern.flat], xs, sae.W_enc, sae.b_enc, pattern, shift).float()
                part = sparse_decode(vals, pattern.flat, sae.W_dec, dtype=cd, pattern=pattern).float()
                pen = (vals * norms[pattern.flat]).sum() / n_rows
                with torch.no_grad():
                    l0 = x32.new_tensor(pattern.nnz / n_rows)
                    fired = fired_from_sparse(pattern.flat, vals, sae.cfg.d_sae)
        elif arch == "jumprelu":  # threshold and straight-through estimators per feature; L0 summed over shards
            eps = sae.cfg.jumprelu_bandwidth
            x32, x_c, pre = sae._pre_nograd(x)  # [b, F_local] float32, >= 0
            log_theta = sae.log_threshold
            pattern = None
            if sae.cfg.sparse_kernels:
                with torch.no_grad():
                    pattern = sae._active_pattern(pre > log_theta.exp() - eps / 2)
            if pattern is None:  # dense codes
                pre = relu_linear(pre, x_c, sae.W_enc, sae.b_enc)
                f, l0_rows = jumprelu_l0(pre, log_theta, eps)
                part = (f.to(cd) @ sae.W_dec.to(cd)).float()
                with torch.no_grad():
                    fired = (f > 0).any(0)
            else:
                xs, shift = sae._sparse_encoder_input(x32, x_c)
                values = gather_linear(pre[pattern.rows, pattern.flat], xs, sae.W_enc, sae.b_enc, pattern, shift)
                f, l0_rows = _SparseJumpReLUL0.apply(values, log_theta, pattern, eps)
                part = sparse_decode(f, pattern.flat, sae.W_dec, dtype=cd, pattern=pattern).float()
                with torch.no_grad():
                    fired = fired_from_sparse(pattern.flat, f, sae.cfg.d_sae)
            pen = l0_rows.mean()  # this shard's part of the L0 (the penalty is L0 itself)
            l0 = pen.detach()
        elif arch == "gated":  # gate and magnitude paths per feature; L1 on the gate summed over shards
            x32, x_c = sae._prepare_input(x, cd)
            norms = sae.decoder_norms()
            z_all = F.linear(x_c, sae.W_enc.to(cd))  # [b, F_local]
            z0 = z_all.detach()
            with torch.no_grad():
                pattern = sae._active_pattern(z0.float() + sae.b_enc.float() > 0)
            w_frozen = sae.W_dec.detach()
            if pattern is None:  # dense codes
                pi_gate, pi_mag = sae._paths(z_all)
                gate = torch.relu(pi_gate)
                f = (pi_gate.detach() > 0) * torch.relu(pi_mag)
                part = (f.to(cd) @ sae.W_dec.to(cd)).float()
                via = (gate.to(cd) @ w_frozen.to(cd)).float()
                pen = (gate.sum(0) * norms).sum() / n_rows
                with torch.no_grad():
                    l0 = (f > 0).sum(dtype=torch.float32) / n_rows
                    fired = (f > 0).any(0)
            else:
                xs, shift = sae._sparse_encoder_input(x32, x_c)
                no_bias = torch.zeros(sae.cfg.d_sae, dtype=sae.b_enc.dtype, device=x.device)
                z = gather_linear(z0[pattern.rows, pattern.flat], xs, sae.W_enc, no_bias, pattern, shift)
                pi_gate, pi_mag = sae._paths(z, pattern.flat)
                f = torch.relu(pi_mag)
                part = sparse_decode(f, pattern.flat, sae.W_dec, dtype=cd, pattern=pattern).float()
                gate = torch.relu(pi_gate)
                via = sparse_decode(gate, pattern.flat, w_frozen, dtype=cd, pattern=pattern).float()
                pen = (gate * norms[pattern.flat]).sum() / n_rows
                with torch.no_grad():
                    l0 = (f > 0).sum(dtype=torch.float32) / n_rows
                    fired = fired_from_sparse(pattern.flat, f, sae.cfg.d_sae)
        else:
            raise MonoscopeError(f"--arch {arch} is not feature sharded")
        pieces = [(part + sae.b_dec.float() / topo.fs).reshape(-1)]
        if via is not None:
            pieces.append((via + sae.b_dec.detach().float() / topo.fs).reshape(-1))
        flat = _sum_parts(torch.cat([*pieces, pen.reshape(1), l0.reshape(1)]), topo.fs_group, topo.fs)
        n = n_rows * d
        x_hat = flat[:n].view(n_rows, d)
        sparsity = sparsity_coef * flat[len(pieces) * n]
        l0_all = flat[len(pieces) * n + 1].detach()
        sq = (x32 - x_hat).pow(2).sum(-1)
        mse = sq.mean()
        with torch.no_grad():
            fvu = sq.sum() / (x32 - x32.mean(0)).pow(2).sum().clamp_min(1e-12)
        zero = torch.zeros((), device=x.device)
        aux = zero if via is None else (x32 - flat[n: 2 * n].view(n_rows, d)).pow(2).sum(-1).mean()
        total = mse + sparsity + aux
        return total, [mse.detach(), sparsity.detach(), aux.detach(), fvu, l0_all], fired, x_hat.detach()

    @torch.no_grad()
    def _resample_sharded(self, x: Tensor, x_hat: Tensor, gen: torch.Generator) -> tuple[Tensor, int]:
        """`resample_dead` over the fs group: every rank draws the inputs for all dead features of every
        shard (the same draws, in global feature order, as one process) and keeps its own; the live
        features' mean norms are summed over the shards. Returns (this shard's local indices, the count over
        all shards)."""
        topo, sae = self.topo, self.sae
        dead = self.dead.dead()
        idx = dead.nonzero().squeeze(1)
        counts = _all_gather(torch.tensor([idx.numel()], dtype=torch.int64, device=self.device), topo.fs_group,
                             topo.fs, 0).tolist()
        alive = ~dead
        sums = torch.stack([sae.W_dec.float()[alive].norm(dim=1).sum(), sae.W_enc.float()[alive].norm(dim=1).sum(),
                            alive.sum().float()])
        dist.all_reduce(sums, group=topo.fs_group)
        n_dead = sum(counts)
        if n_dead == 0:
            return idx, 0
        weights = (x.float() - x_hat.float()).pow(2).sum(1).pow(2).cpu().double()  # [B] loss²
        if not bool(torch.isfinite(weights).all()) or float(weights.sum()) <= 0:
            weights = torch.ones_like(weights)
        pick = torch.multinomial(weights, n_dead, replacement=True, generator=gen)  # every shard's draws
        lo = sum(counts[: topo.fs_rank])
        pick = pick[lo: lo + idx.numel()]
        if idx.numel() == 0:
            return idx, n_dead
        v = x.float()[pick.to(x.device)] - sae.b_dec.float()
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if float(sums[2]) > 0:
            dec_norm, enc_norm = sums[0] / sums[2], sums[1] / sums[2]
        else:
            dec_norm = enc_norm = torch.tensor(1.0, device=v.device)
        reinit_features(sae, self.optimizer, idx, v, dec_norm, enc_norm)
        return idx, n_dead

    # ---------------------------------------------------------------- one step
    def train_step(self) -> None:
        batch = next(self.source)
        full = self.slice.last_full
        assert full is not None
        x_all = self.scaled(full.acts)  # every rank tests the whole global batch: all decide alike
        if not bool(torch.isfinite(x_all.sum())) and not bool(torch.isfinite(x_all).all()):
            self._nonfinite(full, x_all, "the batch holds non-finite activations")
            return
        x = self.scaled(batch.acts)
        sched = self.schedule()
        for group in self.optimizer.param_groups:
            group["lr"] = sched.lr
        dead_mask = self.dead.dead() if self.use_auxk else None
        total, metrics, fired, x_hat = self._forward(x, dead_mask, sched.sparsity_coef)
        total.backward()
        if not bool(torch.isfinite(total.detach())):  # poison the gradients: every rank then sees it
            for p in self._params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        self._reduce_grads()
        if self.unit_norm_decoder:
            self.sae.remove_parallel_grads_()
        grad_norm = self._clip_grads()
        if not bool(torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite(full, x_all, "the loss or its gradient is not finite (on at least one rank)")
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.unit_norm_decoder:
            self.sae.normalize_decoder_()
        if self.topo.dp > 1:
            f = fired.to(torch.uint8)
            dist.all_reduce(f, op=dist.ReduceOp.MAX, group=self.topo.dp_group)
            fired = f.bool()
        n = full.acts.shape[0]
        self.dead.update(fired, n)
        with torch.no_grad():
            mse, sparsity, aux, fvu, l0 = metrics
            self._acc += torch.stack([total.detach(), mse, sparsity, aux, fvu, l0,
                                      grad_norm.detach().float()]).double()
        self._acc_steps += 1
        self.step += 1
        self.tokens += n
        if self.step in self.resample_steps:  # on the whole global batch, as one process
            x_hat_all = _all_gather(x_hat, self.topo.dp_group, self.topo.dp, 0)
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
            if self.topo.fs > 1:
                idx, n_all = self._resample_sharded(x_all, x_hat_all, gen)
            else:
                idx = resample_dead(self.sae, self.optimizer, self.dead.dead(), x_all, x_hat_all, gen)
                n_all = idx.numel()
            self.dead.reset(idx)
            self.resampled += n_all

    def _reduce_grads(self) -> None:
        """b_dec's gradient summed over the fs group (its encoder path is partial per shard); every
        gradient averaged over the dp group (one flat all-reduce)."""
        topo = self.topo
        b = self.sae.b_dec
        if topo.fs > 1 and b.grad is not None:
            dist.all_reduce(b.grad, group=topo.fs_group)
        if topo.dp > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=topo.dp_group)
            flat /= topo.dp
            pos = 0
            for p, g in zip(self._params, grads, strict=True):
                n = g.numel()
                p.grad = flat[pos: pos + n].view_as(p).clone()
                pos += n

    def _clip_grads(self) -> Tensor:
        """torch's clip_grad_norm_ over the whole (sharded) parameter set: shard squares summed over fs."""
        rows = [p for name, p in self.sae.named_parameters() if name in FEATURE_KEYS]
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for p in rows:
            if p.grad is not None:
                sq = sq + torch.linalg.vector_norm(p.grad.float()).square()
        if self.topo.fs > 1:
            dist.all_reduce(sq, group=self.topo.fs_group)
        for p in self._params:  # replicated: b_dec and the extras of other architectures
            if p.grad is not None and not any(p is r for r in rows):
                sq = sq + torch.linalg.vector_norm(p.grad.float()).square()
        norm = sq.sqrt()
        if self.cfg.grad_clip > 0:
            coef = (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            for p in self._params:
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        return norm

    # ---------------------------------------------------------------- metrics
    def flush_metrics(self, seconds: float | None = None) -> dict[str, Any]:
        """Metric sums averaged over the dp replicas; the dead fraction over all shards."""
        if self.topo.dp > 1:
            dist.all_reduce(self._acc, group=self.topo.dp_group)
            self._acc /= self.topo.dp
        dead = torch.tensor([int(self.dead.dead().sum())], dtype=torch.int64, device=self.device)
        if self.topo.fs > 1:
            dist.all_reduce(dead, group=self.topo.fs_group)
        rec = super().flush_metrics(seconds)
        rec["dead_frac"] = float(dead) / self.full_cfg.d_sae
        return rec

    # ---------------------------------------------------------------- state
    def local_state(self) -> dict[str, Any]:
        """This rank's part of a checkpoint (CPU tensors)."""
        base = super().state()
        return {"sae": base.sae, "optimizer": _to_cpu(base.optimizer), "tensors": base.tensors, "meta": base.meta}

    def save_checkpoint(self) -> str | None:
        """Gather every rank's state on rank 0, which writes one checkpoint; all ranks learn where."""
        topo = self.topo
        parts: list[Any] | None = [None] * topo.world if topo.is_main else None
        dist.gather_object(self.local_state(), parts, dst=0)
        outcome: list[Any] = [None]
        if topo.is_main:
            assert parts is not None
            try:
                outcome[0] = ("ok", None if self.sink is None else self.sink.save(self._assemble(parts)))
            except MonoscopeError as e:
                outcome[0] = ("error", str(e))
        dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if kind == "error":
            raise MonoscopeError(value if topo.is_main else f"rank 0: {value}")
        return value  # type: ignore[no-any-return]

    def _assemble(self, parts: list[dict[str, Any]]) -> Checkpoint:
        """One checkpoint from every rank's part: the full SAE (shards of dp replica 0 in feature
        order), each rank's optimizer and tensors, rank 0's meta plus the topology."""
        fs = self.topo.fs
        shards = [parts[j]["sae"] for j in range(fs)]  # ranks 0..fs-1 = dp replica 0, fs ranks 0..fs-1
        full = join_shards(shards)
        meta = {**parts[0]["meta"], "distributed": self.topo.describe()}
        return Checkpoint(self.step, full, {"ranks": [p["optimizer"] for p in parts]},
                          {"ranks": [p["tensors"] for p in parts]}, meta)

    def load_part(self, part: dict[str, Any]) -> None:
        """Restore this rank's part (from `split_checkpoint`)."""
        self.load(Checkpoint(int(part["meta"]["step"]), part["sae"], part["optimizer"], part["tensors"], part["meta"]))

    # ---------------------------------------------------------------- loop
    def _agreed_stop(self) -> bool:
        """All ranks stop at the same step if any got SIGTERM/SIGINT."""
        flag = torch.tensor([self.stop_signal or 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag):
            self.stop_signal = self.stop_signal or int(flag)
            return True
        return False

    def run(self, on_log: Callable[[dict[str, Any]], None] | None = None,
            on_step: Callable[[int], None] | None = None) -> RunOutcome:
        """`Trainer.run` with the stop decision shared; a failed collective becomes DistributedError."""
        last_ckpt: str | None = None
        saved_at = self.step
        self._t_log, self._tok_log = time.perf_counter(), self.tokens
        try:
            while self.step < self.total_steps:
                if self._agreed_stop():
                    break
                self.train_step()
                if self._after_step(on_log, on_step):
                    last_ckpt, saved_at = self.save_checkpoint(), self.step
            self._raise_if_stopped(last_ckpt, saved_at, " on every rank")
            last_ckpt = self._final_checkpoint(last_ckpt, saved_at)
        except (RuntimeError, dist.DistError) as e:
            raise self.lost_contact(e, last_ckpt) from e
        return RunOutcome(self.step >= self.total_steps, False, last_ckpt)

    def lost_contact(self, e: BaseException, last_ckpt: str | None) -> DistributedError:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        where = f"checkpoint {last_ckpt}" if last_ckpt else "the newest checkpoint in --out/checkpoints"
        return DistributedError(
            f"rank {self.topo.rank} of {self.topo.world}: a collective failed during step {self.step + 1} ({first}); "
            f"another rank died, hung past the timeout, or failed: {where} is intact: relaunch the same command with "
            "--resume"
        )


# ----------------------------------------------------------------------------- the stage


def train_distributed(
    out: str | Path,
    *,
    store: str | Path,
    config: TrainConfig,
    shard_features: int = 1,
    resume: bool = False,
    command: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Any:
    """`monoscope.train.train` on every process of a torchrun launch (module docstring); call it with
    the same arguments on every rank. Returns the `TrainResult` on rank 0 and None on the others.
    Leaves the process group initialised only if the caller had initialised it."""
    owned = not dist.is_initialized()
    topo = init_topology(shard_features, config.device, timeout_s)
    done = False
    try:
        result = _train(topo, Path(out), Path(store), config, resume, command)
        done = True
        return result
    except dist.DistError as e:  # outside the training loop (setup, final gather): the same one-line error
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistributedError(f"rank {topo.rank} of {topo.world}: a collective failed outside the training loop "
                               f"({first}): another rank died or hung: relaunch the same command with --resume") from e
    finally:
        if owned:
            end_process_group(done)


def end_process_group(done: bool) -> None:
    """Destroy the process group this process initialised; after a run that finished on every rank, all ranks
    meet at a barrier first. Why: a rank that tore its gloo group down while another still used it (rank 0 writing
    the last files) aborted with "terminate called without an active exception" in 1-4 of 8 two-rank captures."""
    with contextlib.suppress(Exception):
        if done and dist.get_backend() == "gloo":  # a bounded wait: a rank that failed after its last collective
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        elif done:
            dist.barrier()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def check_one_process_options(cfg: TrainConfig) -> None:
    """The settings that train in one process only (the CLI calls this before the process group forms)."""
    if cfg.loss != "mse":
        raise MonoscopeError(f"--loss {cfg.loss} trains in one process (it runs the model, not a store): launch "
                             "monoscope train without torchrun, or use --loss mse")


def _check_supported(cfg: TrainConfig, topo: Topology) -> None:
    check_one_process_options(cfg)
    if topo.fs > 1 and cfg.arch not in FEATURE_SHARDED:
        raise MonoscopeError(f"--shard-features {topo.fs} splits the features of --arch "
                             f"{', '.join(FEATURE_SHARDED)} only, not {cfg.arch}: train {cfg.arch} data parallel "
                             "(--shard-features 1), or use --arch topk")
    if cfg.batch_size % topo.dp:
        raise MonoscopeError(f"--batch-size {cfg.batch_size} does not split over {topo.dp} data-parallel ranks "
                             f"(world {topo.world} / --shard-features {topo.fs}): use a multiple of {topo.dp}")


def _train(topo: Topology, out: Path, store: Path, cfg: TrainConfig, resume: bool, command: str | None) -> Any:
    from monoscope.train.run import (
        CHECKPOINTS,
        TrainResult,
        _check_out_folder,
        _check_same_run,
        _check_same_settings,
        _finished_sae,
        _sae_config,
    )

    stack = contextlib.ExitStack()
    with stack:
        ckpts = CheckpointDir(out / CHECKPOINTS, keep=cfg.keep_checkpoints) if topo.is_main else None

        def setup() -> tuple[TrainData, SAEConfig]:
            _check_supported(cfg, topo)
            if topo.is_main:
                check_output_dir(out)
                stack.enter_context(folder_locks([out], "train"))
                assert ckpts is not None
                _check_out_folder(out, ckpts, resume)
            data = store_data(store, cfg.batch_size, cfg.seed)
            sae_cfg = _sae_config(cfg, data)
            if sae_cfg.d_sae % topo.fs:
                raise MonoscopeError(f"--width {cfg.width} gives {sae_cfg.d_sae:,} features, which do not split into "
                                     f"--shard-features {topo.fs} equal shards: use a width divisible by {topo.fs}")
            return data, sae_cfg

        data, sae_cfg = agree(setup)

        def plan() -> tuple[str, Checkpoint | None, list[str]]:
            """rank 0: 'done' (finished SAE), 'resume' (with its checkpoint) or 'fresh'."""
            if not topo.is_main:
                return "", None, []
            assert ckpts is not None
            ckpt = ckpts.latest() if resume else None
            notes = [f"skipped damaged checkpoint: {s}" for s in ckpts.skipped]
            if ckpt is not None:
                _check_same_run(ckpt.meta, cfg, data, out)
                saved = ckpt.meta.get("distributed")
                if saved is None:
                    raise MonoscopeError(f"cannot resume {out} with torchrun: its checkpoint was made by one process; "
                                         "resume it without torchrun (or train into another --out)")
                if saved != topo.describe():
                    raise MonoscopeError(
                        f"cannot resume {out}: its checkpoint was made with world size {saved['world_size']} and "
                        f"--shard-features {saved['shard_features']}, this launch has world size {topo.world} and "
                        f"--shard-features {topo.fs}: relaunch with --nproc-per-node/--nnodes giving "
                        f"{saved['world_size']} processes and --shard-features {saved['shard_features']}")
            done = _finished_sae(out)
            if done is not None:
                _check_same_settings(done.provenance, cfg, data, out, what="the finished SAE in it was trained")
                return "done", None, notes
            if resume and ckpt is None:
                notes.append(f"no checkpoint in {out / CHECKPOINTS}: started from step 0")
            return ("resume" if ckpt is not None else "fresh"), ckpt, notes

        kind, ckpt, notes = agree(plan)
        decided = [kind]
        dist.broadcast_object_list(decided, src=0)
        kind = decided[0]
        if kind == "done":
            if not topo.is_main:
                return None
            done = _finished_sae(out)
            assert done is not None
            prov = done.provenance
            return TrainResult(out, done, cfg, int(prov.get("steps", 0)), int(prov.get("tokens", 0)),
                               dict(prov.get("final_metrics") or {}), 0.0, 0, already_complete=True, notes=notes)

        source: Any = data.batches
        if kind == "fresh":
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            source = Peeked(data.batches)
        else:  # every rank builds its shard from rank 0's full config
            box = [ckpt.meta["sae_config"] if ckpt is not None else None]
            dist.broadcast_object_list(box, src=0)
            sae_cfg = SAEConfig.from_dict(box[0])
        full = build_sae(sae_cfg, seed=cfg.seed)  # CPU; the same draw as one process makes
        if sae_cfg.arch in SELECT_SHARDED or topo.fs > 1:
            shard: SAE = type(full)(shard_config(sae_cfg, topo.fs), generator=torch.Generator())  # overwritten below
            shard.load_state_dict(shard_state(full.state_dict(), topo.fs, topo.fs_rank))
        else:  # a data-parallel replica: the whole SAE on every rank
            shard = full
        del full
        if topo.dp > 1 and sae_cfg.aux_rows:  # AuxK's row cap is the global batch's: each rank takes its share, the
            # rows one process would take (every s-th, s = ⌈B / aux_rows⌉) when dp divides aux_rows and s divides B/dp
            shard.cfg = replace(shard.cfg, aux_rows=max(1, sae_cfg.aux_rows // topo.dp))
        shard = shard.to(topo.device)
        log = JsonlLog(out / LOG_NAME) if topo.is_main else None
        meta = {"config": cfg.to_dict(), "data": data.identity, "sae_config": sae_cfg.to_dict()}
        trainer = DistributedTrainer(shard, sae_cfg, cfg, RankSlice(source, topo.dp, topo.dp_rank), topo,
                                     sink=ckpts, log=log, describe_row=data.describe_row, meta=meta)
        if kind == "fresh":
            assert isinstance(source, Peeked) and source.first is not None
            trainer.init_b_dec(source.first.acts)  # the whole first batch, on every rank alike
        else:
            trainer.load_part(_scatter_checkpoint(topo, ckpt))
        if log is not None:
            log.start(trainer.step)
        if data.n_rows is not None and cfg.tokens > data.n_rows:
            notes.append(f"{cfg.tokens:,} tokens from a store of {data.n_rows:,} rows: each row is seen "
                         f"~{cfg.tokens / data.n_rows:.1f} times (capture more for less repetition)")
        start_step, start_tokens = trainer.step, trainer.tokens
        t0 = time.perf_counter()
        show = cfg.progress and topo.is_main
        from monoscope.train.run import _stop_on_signals

        with progress_bar("train", total=cfg.steps * cfg.batch_size, unit="tok", enabled=show) as bar, \
                _stop_on_signals(trainer, keep_on_error=True):
            bar.update(trainer.tokens)
            outcome = trainer.run(on_step=bar.update if show else None)
        seconds = time.perf_counter() - t0
        trainer.use_averaged_weights()  # signum-sf: every shard's averaged weights, assembled below as one process's
        try:
            final = _gather_full_sae(trainer)
        except (RuntimeError, dist.DistError) as e:
            raise trainer.lost_contact(e, outcome.checkpoint) from e
        if not topo.is_main:
            return None
        assert final is not None
        if trainer.step > 0:  # after the final checkpoint, as one process: batchtopk's eval threshold from data
            _calibrate(final.to(topo.device), trainer)
        prov = {
            "command": command or "monoscope.train.train_distributed(...)",
            "train_config": cfg.to_dict(),
            "data": data.identity,
            "versions": {"monoscope": monoscope.__version__, "torch": torch.__version__,
                         "python": sys.version.split()[0]},
            "device": f"{topo.world} x {topo.device.type}",
            "distributed": topo.describe(),
            "compute_dtype": str(trainer.sae.compute_dtype()).removeprefix("torch."),
            "steps": trainer.step,
            "tokens": trainer.tokens,
            "skipped_steps": trainer.skipped,
            "resampled_features": trainer.resampled,
            "final_metrics": dict(trainer.last_metrics),
            "data_ended_early": False,
        }
        save_sae(final.eval(), out, provenance=prov, overwrite=True)
        return TrainResult(out, final, cfg, trainer.step, trainer.tokens, dict(trainer.last_metrics), seconds,
                           trainer.tokens - start_tokens, resumed_from=start_step if kind == "resume" else None,
                           skipped=trainer.skipped, notes=notes)


def _scatter_checkpoint(topo: Topology, ckpt: Checkpoint | None) -> dict[str, Any]:
    """Rank 0 splits its checkpoint into every rank's part and sends each its own."""
    parts: list[Any] | None = None
    if topo.is_main:
        assert ckpt is not None
        fs = topo.fs
        parts = []
        for r in range(topo.world):
            parts.append({"sae": shard_state(ckpt.sae, fs, r % fs), "optimizer": ckpt.optimizer["ranks"][r],
                          "tensors": ckpt.tensors["ranks"][r], "meta": ckpt.meta})
    box: list[Any] = [None]
    dist.scatter_object_list(box, parts, src=0)
    return box[0]  # type: ignore[no-any-return]


def _gather_full_sae(trainer: DistributedTrainer) -> SAE | None:
    """The full SAE assembled on rank 0 from dp replica 0's shards (None elsewhere)."""
    topo = trainer.topo
    mine = {k: v.detach().cpu().clone() for k, v in trainer.sae.state_dict().items()}
    parts: list[Any] | None = [None] * topo.world if topo.is_main else None
    dist.gather_object(mine, parts, dst=0)
    if not topo.is_main:
        return None
    assert parts is not None
    shards = parts[: topo.fs]
    full = join_shards(shards)
    sae = build_sae(trainer.full_cfg)
    sae.load_state_dict(full)
    return sae


def _calibrate(sae: SAE, trainer: DistributedTrainer) -> None:
    """`Trainer.calibrate_threshold` for the assembled SAE on rank 0: the next whole global batches of
    the cursor (the ones one process reads); nothing for architectures without a threshold."""
    calibrate = getattr(sae, "calibrate_threshold_", None)
    if calibrate is None:
        return
    xs: list[Tensor] = []
    for _ in range(CALIBRATION_BATCHES):
        try:
            x = trainer.scaled(next(trainer.slice.source).acts)
        except StopIteration:
            break
        x = x[torch.isfinite(x).all(1)]
        if x.shape[0]:
            xs.append(x)
    if xs:
        trainer.last_metrics = {**trainer.last_metrics, "threshold": float(calibrate(xs))}


def _to_cpu(obj: Any) -> Any:
    """A copy of a nested state with every tensor on the CPU (gathered states pickle device-free)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
