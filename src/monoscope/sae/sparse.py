"""Sparse kernels for SAEs whose codes have few active features per token (topk, batchtopk).

Why: with k=32 of d_sae=9216 features active, a dense decoder multiplies a [B, d_sae] matrix that
is 99.7% zeros, and the dense backward of the encoder does the same. Here both only touch the
active rows:

* `sparse_decode`: x̂[b] = Σ_j vals[b, j] · W[idx[b, j]] via `embedding_bag`; its backward gives
  d vals (one dot product per active entry) and d W (rows of W that were used, accumulated over the
  transposed pattern: a C kernel on CPUs, a second `embedding_bag` elsewhere). No [B, d_sae] tensor is
  ever built.
* `gather_linear`: the values of the active pre-activations, `(x_c @ W.T + b)[b, idx]`, taken from a
  dense matrix the caller already computed without autograd (it needs all of them to choose the
  top k). Its backward is sparse: d W = Σ over active entries of g · x_c[row], d b = bincount, and
  d x_c (only when x_c needs a gradient, e.g. through b_dec) via `embedding_bag`.

Both accept a `SparsePattern`: which (row, feature) pairs are active, grouped by row, with its
transpose (grouped by feature) built lazily once and shared by every kernel of the step.
Each op runs in the dtype of the tensors handed in (`compute_dtype`); gradients come back in the
dtype of the inputs that asked for them (float32 master parameters).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from monoscope import native

_MODE_SUM = 0  # embedding_bag mode id of "sum" in aten


class SparsePattern:
    """Active (row, feature) pairs of one batch, grouped by row.

    Built either from `indices` [B, k] (every row has k entries) or from flat `indices` [nnz] plus
    `offsets` [B] (row b owns entries offsets[b] .. offsets[b+1]-1; rows may be empty).
    """

    def __init__(self, indices: Tensor, n_features: int, offsets: Tensor | None = None) -> None:
        if indices.dim() == 2:
            n_rows, k = indices.shape
            self.flat = indices.reshape(-1)  # [B*k] feature ids
            self.offsets = torch.arange(0, n_rows * k, k, device=indices.device)  # [B]
            # expand, not repeat_interleave: sizes known on the host, so no sync on a GPU (a captured step needs none)
            self.rows = torch.arange(n_rows, device=indices.device)[:, None].expand(n_rows, k).reshape(-1)  # [B*k]
        elif indices.dim() == 1 and offsets is not None:
            n_rows = offsets.numel()
            self.flat = indices
            self.offsets = offsets
            counts = torch.diff(offsets, append=offsets.new_tensor([indices.numel()]))  # [B]
            self.rows = torch.repeat_interleave(torch.arange(n_rows, device=indices.device), counts)
        else:
            raise ValueError("SparsePattern needs indices [B, k], or indices [nnz] with offsets [B]")
        self.n_rows = n_rows
        self.n_features = n_features
        self._transpose: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def nnz(self) -> int:
        return self.flat.numel()

    def transpose(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order [nnz], rows grouped by feature [nnz], per-feature offsets [n_features]).

        `order` sorts the entries by feature id (stable, so results are deterministic)."""
        if self._transpose is None:
            keys = self.flat.int() if self.n_features < 2**31 else self.flat  # int32 sorts ~2x faster
            order = torch.argsort(keys, stable=True)  # [nnz]
            t_rows = self.rows.index_select(0, order)  # [nnz]
            # index_add, not bincount: on a GPU bincount reads the indices' min and max back to the host
            counts = torch.zeros(self.n_features, dtype=torch.int64, device=self.flat.device).index_add_(
                0, self.flat, torch.ones_like(self.flat, dtype=torch.int64))  # [F]
            t_offsets = counts.cumsum(0) - counts  # [F] start of each feature's entries
            self._transpose = (order, t_rows, t_offsets)
        return self._transpose


def _transposed_accumulate(pattern: SparsePattern, values: Tensor, rows_src: Tensor, dtype: torch.dtype) -> Tensor:
    """out[f] = Σ_{entries n with feature f} values[n] · rows_src[row_n]  -> [F, d] in `dtype` (the weight's).

    bf16 inputs and a float32 result on a CPU: the C kernel (`native.feature_rows`), which sums in float32 and writes
    each row once, where aten's bag would round to bf16 and a second pass widen to float32."""
    order, t_rows, t_offsets = pattern.transpose()
    if dtype == torch.float32:
        got = native.feature_rows(rows_src, values, order, t_rows, t_offsets)
        if got is not None:
            return got
    return F.embedding_bag(t_rows, rows_src, t_offsets, mode="sum",
                           per_sample_weights=values.index_select(0, order)).to(dtype)


def entry_dots(g: Tensor, w: Tensor, pattern: SparsePattern, *, path: str | None = None) -> Tensor:
    """[nnz] dot products <g[row_n], w[idx_n]>: the gradient of a sparse decode's values.

    Paths: "native", the C kernel for bf16 on a CPU (`monoscope.native.entry_dots`: ~2x aten's fused kernel there,
    with float32 sums and a float32 result); "aten", aten's fused kernel (the result in w's dtype); "gather", the rows
    gathered and multiplied with a float32 sum, for CUDA, where aten's kernel has no bf16/fp16 version (it raised
    NotImplementedError on an H100 with torch 2.11). path=None picks the first that applies; a test passes each
    path by name to compare them."""
    if path is None:
        path = "gather" if g.is_cuda and g.dtype in (torch.bfloat16, torch.float16) else "native"
    if path == "native":
        got = native.entry_dots(g, w, pattern.flat, pattern.offsets)
        if got is not None:
            return got
        path = "aten"
    if path == "aten":
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            g, w, pattern.flat, pattern.offsets, pattern.rows, _MODE_SUM, -1)
    if path != "gather":
        raise ValueError(f"entry_dots path must be 'native', 'aten' or 'gather', got {path!r}")
    return (g.index_select(0, pattern.rows) * w.index_select(0, pattern.flat)).sum(-1, dtype=torch.float32)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, values: Tensor, weight: Tensor, pattern: SparsePattern, dtype: torch.dtype,
                weight_c: Tensor | None) -> Tensor:
        v = values.reshape(-1).to(dtype)  # [nnz]
        w = weight.to(dtype) if weight_c is None else weight_c  # [F, d]
        out = F.embedding_bag(pattern.flat, w, pattern.offsets, mode="sum", per_sample_weights=v)  # [B, d]
        ctx.save_for_backward(v, w)
        ctx.pattern = pattern
        ctx.values_shape, ctx.values_dtype, ctx.weight_dtype = values.shape, values.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        v, w = ctx.saved_tensors
        p: SparsePattern = ctx.pattern
        g = grad_out.to(w.dtype).contiguous()  # [B, d]
        grad_v = grad_w = None
        if ctx.needs_input_grad[0]:
            # d vals[n] = <g[row_n], W[idx_n]>, one dot product per active entry.
            grad_v = entry_dots(g, w, p).reshape(ctx.values_shape).to(ctx.values_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _transposed_accumulate(p, v, g, ctx.weight_dtype)  # [F, d], zero rows for unused features
        return grad_v, grad_w, None, None, None


def sparse_decode(
    values: Tensor,
    indices: Tensor,
    weight: Tensor,
    offsets: Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    pattern: SparsePattern | None = None,
    weight_c: Tensor | None = None,
) -> Tensor:
    """x̂[b] = Σ_j values[b, j] · weight[indices[b, j]], differentiable in `values` and `weight`.

    values, indices: [B, k] (or [nnz] with `offsets` [B]); weight: [F, d] -> returns [B, d] in
    `dtype` (default: weight's dtype). The decoder bias is not added. Pass `pattern` to share the
    index bookkeeping with `gather_linear` for the same entries, and `weight_c`, weight already in
    `dtype` (`SAE.decoder_in`), to skip its conversion.
    """
    if pattern is None:
        pattern = SparsePattern(indices, weight.shape[0], offsets)
    dtype = dtype or weight.dtype
    if weight_c is not None and (weight_c.dtype != dtype or weight_c.shape != weight.shape):
        raise ValueError(f"weight_c must be weight {tuple(weight.shape)} in {dtype}, got {weight_c.dtype} "
                         f"{tuple(weight_c.shape)}")
    return _SparseDecode.apply(values, weight, pattern, dtype, weight_c)


class _GatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        values: Tensor,
        x_c: Tensor,
        weight: Tensor,
        bias: Tensor,
        x_shift: Tensor | None,
        pattern: SparsePattern,
    ) -> Tensor:
        ctx.save_for_backward(x_c, weight)
        ctx.pattern = pattern
        ctx.bias_dtype = bias.dtype
        ctx.shift_dtype = None if x_shift is None else x_shift.dtype
        return values.clone()

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor
    ) -> tuple[None, Tensor | None, Tensor | None, Tensor | None, Tensor | None, None]:
        x_c, weight = ctx.saved_tensors
        p: SparsePattern = ctx.pattern
        dtype = x_c.dtype
        g = grad.reshape(-1)  # [nnz]
        grad_x = grad_w = grad_b = grad_shift = None
        if ctx.needs_input_grad[1]:
            grad_x = F.embedding_bag(
                p.flat, weight.to(dtype), p.offsets, mode="sum", per_sample_weights=g.to(dtype)
            )  # [B, d]
        if ctx.needs_input_grad[2]:
            grad_w = _transposed_accumulate(p, g.to(dtype), x_c, weight.dtype)  # [F, d]
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            g_feat = torch.zeros(p.n_features, dtype=torch.float32, device=g.device)
            g_feat.index_add_(0, p.flat, g.float())  # [F] Σ of the gradient per feature
            if ctx.needs_input_grad[3]:
                grad_b = g_feat.to(ctx.bias_dtype)
            if ctx.needs_input_grad[4]:
                # x_c = x − shift: d shift = −Σ_b d x_c[b] = −Σ_f g_feat[f] · W[f]
                grad_shift = -(g_feat @ weight.float()).to(ctx.shift_dtype)  # [d]
        return None, grad_x, grad_w, grad_b, grad_shift, None


def gather_linear(
    values: Tensor,
    x_c: Tensor,
    weight: Tensor,
    bias: Tensor,
    pattern: SparsePattern,
    x_shift: Tensor | None = None,
) -> Tensor:
    """Make the precomputed active pre-activations differentiable, with a sparse backward.

    values: [B, k] or [nnz] = ((x − x_shift) @ weight.T + bias)[active entries of `pattern`],
    computed by the caller without autograd; x_c: [B, d] the encoder input x − x_shift in the
    compute dtype; weight: [F, d]; bias: [F]; x_shift: [d] or None (b_dec when it is subtracted
    from the input). Returns a copy of `values` whose gradient flows to x_c, weight, bias and
    x_shift as if the dense linear layer had been differentiated (only active entries carry
    gradient). Pass x_c detached with x_shift when x itself needs no gradient: x_shift's gradient
    then costs one [F]·[F, d] product instead of a [B, d] embedding-bag.
    """
    return _GatherLinear.apply(values, x_c, weight, bias, x_shift, pattern)


TRANSPOSED_GRAD_MIN_BLOCK = 2048
"""From this many features in a block, `block_linear_decode`'s backward multiplies transposed copies of its inputs
(below, the copies cost more than the faster products save: measured on a 2-core AMX CPU, 4,096 rows, d 576: at
4,200 features 181 -> 172 ms per training step, at 300 features 87 -> 93)."""


class _BlockLinearDecode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        codes: Tensor,
        cols: Tensor,
        x_c: Tensor,
        w_enc: Tensor,
        we_block: Tensor,
        b_enc: Tensor,
        x_shift: Tensor | None,
        w_dec: Tensor,
        row_grads: bool,
    ) -> Tensor:
        wd = pad_rows(w_dec.index_select(0, cols).to(codes.dtype), codes.shape[1])  # [n_pad, d]
        ctx.save_for_backward(codes, wd, cols, x_c, w_enc, we_block)
        ctx.meta = (w_enc.dtype, b_enc.dtype, None if x_shift is None else x_shift.dtype, w_dec.dtype, w_dec.shape[0])
        ctx.row_grads = row_grads
        return codes @ wd  # [B, d]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        f, wd, cols, x_c, w_enc, we_block = ctx.saved_tensors
        we_dtype, be_dtype, sh_dtype, wd_dtype, n_feat = ctx.meta
        need = ctx.needs_input_grad
        g = grad.to(f.dtype)  # [B, d]
        # [B, n] d codes through the ReLU and the choice (f is 0 off them): ReLU's own backward kernel, ~7x faster
        # on a CPU than a masked_fill with a bool mask, in place. wd's transposed view, not a contiguous copy (torch
        # 2.13, 2-core AMX CPU, bf16, the output memory reused as `devices.keep_freed_cpu_memory` makes it in the
        # Trainer: 8.2 against 11.5 ms at 4,096 x 4,200, 1.1 against 2.6 at
        # 512 x 4,200, equal at 4,096 x 2,500)
        d_pre = torch.mm(g, wd.t())
        torch.ops.aten.threshold_backward.grad_input(d_pre, f, 0, grad_input=d_pre)
        grad_x = grad_we = grad_be = grad_sh = grad_wd = g_feat = None
        n_rows, d = x_c.shape
        n = cols.numel()  # the block's own features: the padding's rows and columns are cut off every gradient
        if need[2]:
            grad_x = (d_pre @ we_block.to(f.dtype)).to(x_c.dtype)  # [B, d]
        wide = f.shape[1] >= TRANSPOSED_GRAD_MIN_BLOCK
        if need[3] and not wide:
            grad_we = _rows_grad(cols, (d_pre.t() @ x_c.to(f.dtype))[:n].to(we_dtype), w_enc.shape, ctx.row_grads)
        elif need[3]:
            # the weight gradients as [d, B] @ [B, n] with both operands contiguous, transposed after: oneDNN takes
            # d_preᵀ @ x as a transposed operand, which it copies and multiplies ~1.5x slower (at 4,096 x 4,200 dead:
            # 15.7 ms + a 6.8 ms copy each, against ~11); x's extra row of ones gives d_pre's column sums, the bias
            # gradient, in the same product (a float32 sum over d_pre's columns took 16.5 ms there)
            x_t = torch.empty(d + 1, n_rows, dtype=f.dtype, device=f.device)
            x_t[:d].copy_(x_c.t())
            x_t[d].fill_(1)
            prod = x_t @ d_pre  # [d + 1, n]
            grad_we = _rows_grad(cols, prod[:d, :n].t().to(we_dtype, memory_format=torch.contiguous_format),
                                 w_enc.shape, ctx.row_grads)
            g_feat = prod[d, :n].float()  # [n]
        if need[5] or need[6]:
            if g_feat is None:
                g_feat = d_pre[:, :n].sum(0, dtype=torch.float32)  # [n]
            if need[5]:
                grad_be = torch.zeros(w_enc.shape[0], dtype=be_dtype, device=f.device).index_copy_(
                    0, cols, g_feat.to(be_dtype))
            if need[6]:  # x_c = x − shift: d shift = −Σ_f g_feat[f] · W_enc[f]
                grad_sh = -(g_feat @ we_block[:n].float()).to(sh_dtype)
        if need[7]:
            prod = (g.t().contiguous() @ f).t() if wide else f.t() @ g  # [n_pad, d]
            grad_wd = _rows_grad(cols, prod[:n].to(wd_dtype, memory_format=torch.contiguous_format),
                                 (n_feat, wd.shape[1]), ctx.row_grads)
        return None, None, grad_x, grad_we, None, grad_be, grad_sh, grad_wd, None


BLOCK_PAD = 64
"""`block_linear_decode`'s callers pad a block of n features to a multiple of this many (`padded_width`; 4x this
above 1,024): oneDNN builds a new matmul kernel for every shape it has not seen, ~2-4 ms per product on a 2-core AMX
CPU against ~0.7 for the product itself at 4,096 x 576 x 200, and AuxK's dead count, the block's width, changes
almost every step. Measured there in a 220-step training run: the dead block's forward product took 3.2 ms per step
unpadded, and its five products ~15 ms of a ~130 ms step."""


def padded_width(n: int) -> int:
    """n rounded up to the block width `block_linear_decode` is handed (`BLOCK_PAD`)."""
    step = BLOCK_PAD if n <= 16 * BLOCK_PAD else 4 * BLOCK_PAD
    return -(-n // step) * step


def pad_rows(t: Tensor, n: int) -> Tensor:
    """t [m, ...] with zero rows appended up to n rows (t itself when it has n)."""
    return t if t.shape[0] == n else F.pad(t, (0, 0) * (t.dim() - 1) + (0, n - t.shape[0]))


def _rows_grad(cols: Tensor, rows: Tensor, shape: tuple[int, ...] | torch.Size, sparse: bool) -> Tensor:
    """The [F, d] gradient that is `rows` at `cols` (sorted, distinct) and 0 elsewhere: dense, or as a sparse COO
    tensor with dense rows, which autograd adds into another gradient of the same weight in place (an index_add
    over the n rows) instead of zero-filling, writing and then adding a full [F, d] tensor: ~0.5 against ~3 ms
    per weight at 600 of 9,216 rows (AMX CPU). Only for a weight that also gets a dense gradient in the same
    backward: alone, a sparse gradient would become the weight's `.grad`, which the optimizers refuse."""
    if sparse:
        return torch.sparse_coo_tensor(cols.unsqueeze(0), rows, tuple(shape), is_coalesced=True,
                                       check_invariants=False)
    return torch.zeros(tuple(shape), dtype=rows.dtype, device=rows.device).index_copy_(0, cols, rows)


def block_linear_decode(
    codes: Tensor,
    cols: Tensor,
    x_c: Tensor,
    w_enc: Tensor,
    we_block: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    x_shift: Tensor | None = None,
    *,
    row_grads: bool = False,
) -> Tensor:
    """Σ_j codes[b, j] · w_dec[cols[j]] -> [B, d] over a block of features, in codes' dtype, with the gradients
    that `gather_linear` followed by `sparse_decode` would give for the entries where codes > 0. codes: [B, n_pad]
    the block's chosen ReLU'd pre-activations (of x_c @ w_enc[cols].T + b_enc[cols], computed without autograd), 0
    elsewhere, including the n_pad − n columns past the block's n = len(cols) (`padded_width`: the padding keeps the
    matmuls' shapes few); we_block [n_pad, d]: w_enc[cols] as the caller gathered it for them, zero rows after (no
    grad; its backward reuses it).

    Why: when the chosen entries all lie in a block of n features not much wider than the k chosen per row
    (AuxK: k_aux of the n dead latents), three matmuls over the block beat the per-entry embedding-bag kernels
    on CPUs with fast matmuls: those kernels run far below the matmul peak (`SAE._auxk` chooses).

    row_grads: return w_enc's and w_dec's gradients as sparse rows (`_rows_grad`); only when the same backward
    also gives both weights a dense gradient (AuxK beside the main sparse path)."""
    return _BlockLinearDecode.apply(codes, cols, x_c, w_enc, we_block, b_enc, x_shift, w_dec, row_grads)


class _RowSqErr(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pred: Tensor, target: Tensor) -> Tensor:
        diff = torch.sub(pred, target)  # [B, d] float32 (promoted), the one intermediate
        ctx.save_for_backward(diff)
        ctx.pred_dtype = pred.dtype
        return torch.linalg.vecdot(diff, diff)  # [B]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (diff,) = ctx.saved_tensors
        out = torch.empty(diff.shape, dtype=ctx.pred_dtype, device=diff.device)
        return torch.mul(diff, (2 * grad).unsqueeze(1), out=out), None


def row_sq_err(pred: Tensor, target: Tensor) -> Tensor:
    """‖pred[b] − target[b]‖² per row -> [B] float32, differentiable in pred [B, d] (any float dtype: a bf16 decode
    stays bf16), target [B, d] float32.

    Why: autograd's sub, pow and sum make ~7 passes over [B, d] forward and backward, each as costly as a small
    kernel on a CPU; this makes 2 forward and 1 backward, writing the gradient straight in pred's dtype. A target
    that needs a gradient (attribution through the input) takes plain autograd."""
    if target.requires_grad:
        return (pred.float() - target).pow(2).sum(-1)
    return _RowSqErr.apply(pred, target)
