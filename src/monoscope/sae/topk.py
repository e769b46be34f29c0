"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) SAEs, with the AuxK loss.

    pre = W_enc (x − b_dec) + b_enc                       [B, d_sae] (b_dec subtracted by default)
    topk:       keep the k largest pre-activations of each row, then ReLU
    batchtopk:  training: keep the k·B largest over the whole batch, then ReLU;
                eval: keep pre > θ, a global threshold (running mean of the smallest kept value,
                recalibrated from data at the end of training by `calibrate_threshold_`)
    x̂ = Σ_active f_i W_dec[i] + b_dec

AuxK (Gao et al. §A.2): given the trainer's boolean dead mask [d_sae], the k_aux largest
pre-activations among dead latents (ReLU'd) reconstruct the residual e = x − x̂ (detached):
    aux = aux_coef · min(n_dead / k_aux, 1) · mean_b ‖ê − e‖²,   ê = Σ f_aux,i W_dec[i]
aux_coef defaults to 1/32. Using the same units as `mse` matches sparsify, where both terms are
divided by the same batch variance; the min(…) factor scales the term down when fewer than k_aux
latents are dead. The gradient reaches the dead latents' encoder rows and decoder rows.

Training contract: decoder rows at unit norm. Per step the trainer calls
`loss.backward()`, `sae.remove_parallel_grads_()`, (clip), `optimizer.step()`,
`sae.normalize_decoder_()`. BatchTopK updates its threshold inside `forward` in training mode.

Fast path (cfg.sparse_kernels, the default): the dense pre-activations are computed once without
autograd (into a reused workspace), the top entries are chosen, and `sparse.gather_linear` /
`sparse.sparse_decode` carry the gradient through the active entries only; no [B, d_sae] gradient
or dense decoder product is built. AuxK reuses those pre-activations for the dead latents and
carries its gradient through the k_aux chosen entries per row the same way (no second encoder
matmul; dense AuxK cost several times the rest of a step when most latents are dead).
`sparse_kernels=False` runs plain dense autograd (a reference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from monoscope import native
from monoscope.devices import cpu_flags
from monoscope.errors import MonoscopeError
from monoscope.sae.base import SAE, ForwardOutput, fired_from_sparse, with_ones
from monoscope.sae.config import SAEConfig
from monoscope.sae.sparse import (
    SparsePattern,
    block_linear_decode,
    gather_linear,
    pad_rows,
    padded_width,
    row_sq_err,
)

SYNC_FREE_AUXK_DEVICES: set[str] = {"cuda"}
"""Device types whose AuxK takes a top-k over masked pre-activations and dense products (`_auxk_masked`) instead of
listing the dead latents with a host sync; on a CPU the sync is free, and the dead list the smaller work."""
BLOCK_AUXK_DEAD_PER_K_AUX: dict[torch.dtype, int] = {torch.bfloat16: 24, torch.float32: 4}
"""On a CPU, AuxK runs as dense matmuls over the dead block (`block_linear_decode`) while n_dead is at most this
many times k_aux, and through the per-entry sparse kernels above that. Measured on a 2-core AMX CPU (4096 rows,
576 -> 9,216, k_aux 288): the block is 1.8x faster at 2,500 dead and even at 6,000 in bf16, and breaks even near
3,000 in float32, whose matmuls are ~8x slower (an AVX2 CPU without AMX is slower still, hence the float32 margin)."""


SCREEN_CANDIDATES_PER_K = 2
"""The int8 screen re-scores this many candidates per active feature exactly (`SAEConfig.encoder_screen`). On 4,096
held-out rows of a 16x SAE trained on the default corpus (k 32): with 1.25k candidates 99.8% of the rows chose the
bf16 product's features, with 2k every row (benchmarks/screen_topk.py)."""
SCREEN_MIN_ROWS, SCREEN_MIN_FEATURES = 256, 2048
"""`encoder_screen="auto"` screens batches of at least this many rows and SAEs of at least this many features."""


def _screen_applies(mode: str, x_c: Tensor, cd: torch.dtype, n_feat: int, k: int) -> bool:
    if mode == "off" or x_c.device.type != "cpu" or cd != torch.bfloat16 or SCREEN_CANDIDATES_PER_K * k > n_feat:
        return False
    if mode == "int8":
        return True
    return (x_c.shape[0] >= SCREEN_MIN_ROWS and n_feat >= SCREEN_MIN_FEATURES and "amx_bf16" not in cpu_flags()
            and native.screen_fast())


def _block_auxk(device: torch.device, cd: torch.dtype, n_dead: int, k_aux: int) -> bool:
    return device.type == "cpu" and n_dead <= BLOCK_AUXK_DEAD_PER_K_AUX.get(cd, 0) * k_aux


def _relu_topk_rows(pre: Tensor, k: int) -> Tensor:
    """pre [B, n] in place: ReLU'd, each row cut to its k largest entries (`native.relu_topk_rows` without the
    kernel). A row with at most k positive entries keeps them all: the ReLU drops the rest, so the top-k runs only
    on the rows holding more (none late in a run, where rows hold ~100 of k_aux = d/2; a third at the peak of a
    1M-token run). Positive floats are the positive integers of the order view: clamping those to 1 and summing in
    int16 (n < 2^15) counts them in ~1.5 ms at 4096 x 2,500, where a bool comparison and sum take ~11."""
    n = pre.shape[1]
    keys = _order_view(pre)
    counts = keys.clamp(0, 1).sum(1, dtype=torch.int16 if n < 2**15 else torch.int32)  # [B]
    heavy = (counts > k).nonzero().squeeze(1)  # [n_heavy]
    codes = pre.relu_()  # heavy rows keep > k positive entries: their top k is unchanged
    if heavy.numel():
        key_v, local = _row_topk(_order_view(codes.index_select(0, heavy)), k)  # [n_heavy, k]
        codes.index_copy_(0, heavy, torch.zeros(heavy.numel(), n, dtype=pre.dtype, device=pre.device)
                          .scatter_(1, local, key_v.view(pre.dtype)))
    return codes


class _Selected(NamedTuple):
    """What `_TopKStyle._encode_selected` hands the decoder half of a forward."""

    cd: torch.dtype
    x32: Tensor  # [B, d] float32 input
    x_c: Tensor  # [B, d] encoder input in the compute dtype
    dense: bool  # plain autograd (sparse_kernels off)
    vals: Tensor  # differentiable active values (float32, ReLU'd)
    pattern: SparsePattern
    indices: Tensor
    offsets: Tensor | None
    pre: Tensor | None  # [B, F] pre-activations (no grad on the sparse path: the reused workspace); None when
    # the int8 screen chose the entries (`_screened_select`)
    xs: Tensor  # encoder input for `gather_linear`
    shift: Tensor | None  # its x_shift (b_dec when subtracted from x needing no gradient)


class _TopKStyle(SAE):
    """Shared machinery: pre-activations, gathering, decoding, AuxK; subclasses choose entries."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # Reused [B, d_sae] buffer for the no-grad pre-activations of the sparse path: allocating
        # 75-150 MB per step costs page faults comparable to the matmul itself on CPU.
        self._workspace: Tensor | None = None

    # ---------------------------------------------------------------- selection (per subclass)
    def _select(self, pre: Tensor, update: bool = False) -> tuple[Tensor, SparsePattern, Tensor, Tensor | None]:
        """Choose active entries of pre [B, F] (no grad); `update`: training-time state updates.

        Returns (values in pre's dtype, pattern, indices as exposed in ForwardOutput, offsets)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- building blocks
    def _pre_acts(self, x_c: Tensor, cd: torch.dtype, with_grad: bool) -> Tensor:
        """pre = x_c W_encᵀ + b_enc  [B, F] in the compute dtype; without grad into a reused
        workspace (nothing keeps a reference to it past `forward`)."""
        if with_grad:
            return F.linear(x_c, self.W_enc.to(cd), self.b_enc.to(cd))
        shape = (x_c.shape[0], self.cfg.d_sae)
        ws = self._workspace
        if ws is None or ws.shape != shape or ws.dtype != cd or ws.device != x_c.device:
            ws = self._workspace = torch.empty(shape, dtype=cd, device=x_c.device)
        return self._encode_nograd(x_c, cd, out=ws)

    def _dense_pre(self, sel: _Selected, cd: torch.dtype) -> Tensor:
        """The forward's no-grad [B, F] pre-activations of `sel`'s rows, computed now when the screen skipped them."""
        return sel.pre if sel.pre is not None else self._pre_acts(sel.x_c, cd, with_grad=False)

    def _screened_select(self, x_c: Tensor, cd: torch.dtype) -> tuple[Tensor, SparsePattern, Tensor, None] | None:
        """`_select`'s result through the int8 screen (`SAEConfig.encoder_screen`), or None where it does not
        apply: per-row top-k only (`TopKSAE`)."""
        return None

    def _gather(
        self,
        pre: Tensor,
        values: Tensor,
        pattern: SparsePattern,
        x_c: Tensor,
        dense: bool,
        x_shift: Tensor | None = None,
    ) -> Tensor:
        """Differentiable active pre-activations, shaped like `values`."""
        if dense:  # pre carries autograd: index it, the gradient is scattered back densely
            return pre[pattern.rows, pattern.flat].reshape(values.shape)
        return gather_linear(values, x_c, self.W_enc, self.b_enc, pattern, x_shift)

    def _decode_active(self, vals: Tensor, pattern: SparsePattern, cd: torch.dtype, dense: bool) -> Tensor:
        """Σ_active vals · W_dec[feature]  -> [B, d_in] in the compute dtype (no bias)."""
        if dense:
            f = torch.zeros(pattern.n_rows, self.cfg.d_sae, dtype=cd, device=vals.device)
            f = f.index_put((pattern.rows, pattern.flat), vals.reshape(-1).to(cd))  # [B, F]
            return f @ self.W_dec.to(cd)
        return self._sparse_decode(vals, pattern, cd)

    def _auxk(
        self, x_c: Tensor, err: Tensor, dead_mask: Tensor | None, cd: torch.dtype, sel: _Selected | None = None
    ) -> Tensor | None:
        """AuxK loss (module docstring). With the sparse kernels and the forward's selection `sel`, the dead
        latents' pre-activations are read from the forward's no-grad [B, F] pre-activations (no second encoder
        matmul) and only the k_aux chosen entries per row carry gradient (`gather_linear`, `sparse_decode`):
        the dense form costs ~6 encoder-sized matmuls over the [B, n_dead] block, several times the whole
        sparse forward and backward when most latents are dead (83% on a 94-step transcoder run). Without
        `sel` or with sparse kernels off it is computed densely (the reference; both agree to float rounding,
        tests/sae/test_auxk_sparse.py)."""
        if dead_mask is None:
            return None
        if dead_mask.shape != (self.cfg.d_sae,) or dead_mask.dtype != torch.bool:
            raise ValueError(
                f"dead_mask must be a bool tensor [{self.cfg.d_sae}], got {dead_mask.dtype} {tuple(dead_mask.shape)}"
            )
        sub = self._aux_row_slice(err.shape[0])
        if sub is not None:  # a strided subset of the rows (`SAEConfig.aux_rows`)
            x_c, err = x_c[sub], err[sub]
            if sel is not None:
                sel = sel._replace(x_c=sel.x_c[sub], xs=sel.xs[sub].contiguous(),
                                   pre=None if sel.pre is None else sel.pre[sub])
        if sel is not None and not sel.dense and x_c.device.type in SYNC_FREE_AUXK_DEVICES:
            return self._auxk_masked(err, dead_mask.to(x_c.device), cd, sel)
        dead_idx = dead_mask.to(x_c.device).nonzero().squeeze(1)  # [n_dead]
        n_dead = dead_idx.numel()
        if n_dead == 0:
            return None
        k_aux_cfg = int(self.cfg.k_aux)  # type: ignore[arg-type]
        k_aux = min(k_aux_cfg, n_dead)
        scale = min(n_dead / k_aux_cfg, 1.0)
        if sel is not None and not sel.dense and _block_auxk(x_c.device, cd, n_dead, k_aux_cfg):
            with torch.no_grad():  # the dead block's pre-activations: one [B, n_pad] matmul beats a column gather
                # padded with zero rows to a width of few values (`sparse.padded_width`): their pre-activations are 0,
                # never chosen, so every result is the unpadded block's
                n_pad = padded_width(n_dead)
                we_dead = pad_rows(self.W_enc.index_select(0, dead_idx), n_pad)  # reused by the block's backward
                pre_dead = F.linear(sel.xs.detach(), we_dead.to(cd), pad_rows(self.b_enc.index_select(0, dead_idx),
                                                                              n_pad).to(cd))
                # each row's top k_aux ReLU'd entries, in place: the C kernel (`native.relu_topk_rows`), or PyTorch
                codes = pre_dead if native.relu_topk_rows(pre_dead, k_aux) else _relu_topk_rows(pre_dead, k_aux)
            # joint_backward: the main path's gather_linear and sparse_decode give W_enc and W_dec dense gradients
            # in the same backward, into which the block's rows are added
            e_hat = block_linear_decode(codes, dead_idx, sel.xs, self.W_enc, we_dead, self.b_enc, self.W_dec,
                                        sel.shift, row_grads=self.joint_backward)  # [B, d] in cd
            return self._aux_term(e_hat, err, scale)
        if sel is not None and not sel.dense:
            with torch.no_grad():
                pre_dead = self._dense_pre(sel, cd).index_select(1, dead_idx)  # [B, n_dead]
                key_v, local = _row_topk(_order_view(pre_dead), k_aux)  # [B, k_aux]
                values = key_v.view(pre_dead.dtype)
                pattern = SparsePattern(dead_idx[local], self.cfg.d_sae)
            f_aux = gather_linear(values, sel.xs, self.W_enc, self.b_enc, pattern, sel.shift).float().relu()
            e_hat = self._sparse_decode(f_aux, pattern, cd)  # [B, d] in cd
            return self._aux_term(e_hat, err, scale)
        w_enc = self.W_enc.index_select(0, dead_idx).to(cd)  # [n_dead, d]
        b_enc = self.b_enc.index_select(0, dead_idx).to(cd)  # [n_dead]
        pre = F.linear(x_c, w_enc, b_enc)  # [B, n_dead]
        with torch.no_grad():
            local = _order_view(pre.detach()).topk(k_aux, dim=1, sorted=False).indices  # [B, k_aux]
            keep = torch.zeros_like(pre).scatter_(1, local, 1.0)  # [B, n_dead] 0/1
        f_aux = torch.relu(pre) * keep  # [B, n_dead]
        e_hat = f_aux @ self.W_dec.index_select(0, dead_idx).to(cd)  # [B, d] in cd
        return self._aux_term(e_hat, err, scale)

    def _aux_row_slice(self, n_rows: int) -> slice | None:
        """Every s-th row, s = ⌈n_rows / aux_rows⌉, when a batch holds more than `SAEConfig.aux_rows`; else None."""
        cap = int(self.cfg.aux_rows)
        return slice(None, None, -(-n_rows // cap)) if 0 < cap < n_rows else None

    def _aux_term(self, e_hat: Tensor, err: Tensor, scale: float | Tensor) -> Tensor:
        """aux_coef · scale · mean_b ‖ê − e‖² (module docstring): the one AuxK term every form computes (ê in the
        compute dtype or float32)."""
        return self.cfg.aux_coef * scale * row_sq_err(e_hat, err.detach()).mean()

    def _auxk_masked(self, err: Tensor, dead: Tensor, cd: torch.dtype, sel: _Selected) -> Tensor:
        """`_auxk` without a host sync, for GPUs (where `nonzero`, which sizes the dead list, stalls the CPU until
        the queued kernels finish, and a captured step allows none): each row's top k_aux of the pre-activations
        with the live latents masked out, kept as a dense [B, F] 0/1 mask, and the term through dense products.
        Live latents picked when fewer than k_aux are dead are masked out, and non-positive picks are zeroed by
        the ReLU as before, so the loss and the gradients are `_auxk`'s (tests/sae/test_auxk_sparse.py); with no
        dead latent the term is 0.

        Why dense: k_aux = d/2 entries per row are ~9x the k active ones. Gathered per entry (4,096 x 288 rows of
        W_enc and W_dec, forward and backward) they took most of an H200's step; as [B, F] matmuls, which that card
        runs at hundreds of TFLOP/s, they cost about as much as the encoder's own product."""
        k_aux = int(self.cfg.k_aux)  # type: ignore[arg-type]
        with torch.no_grad():
            masked = self._dense_pre(sel, cd).masked_fill(~dead, float("-inf"))  # [B, F]
            _, idx = _order_view(masked).topk(min(k_aux, self.cfg.d_sae), dim=1, sorted=False)  # [B, k_aux]
            keep = torch.zeros_like(masked).scatter_(1, idx, dead[idx].to(masked.dtype))  # [B, F] chosen dead
            scale = (dead.sum() / k_aux).clamp(max=1.0)  # min(n_dead / k_aux, 1), on the device
        pre = F.linear(sel.x_c, self.W_enc.to(cd), self.b_enc.to(cd))  # [B, F], differentiable (b_dec's too)
        e_hat = (torch.relu(pre) * keep) @ self.W_dec.to(cd)  # [B, d] in cd
        return self._aux_term(e_hat, err, scale)

    # ---------------------------------------------------------------- interface
    def encode(self, x: Tensor) -> Tensor:
        """Dense [B, d_sae] float32 codes (differentiable through plain autograd)."""
        cd = self.compute_dtype(x.device)
        _, x_c = self._prepare_input(x, cd)
        pre = self._pre_acts(x_c, cd, with_grad=True)
        with torch.no_grad():
            values, pattern, _, _ = self._select(pre.detach(), update=False)
        vals = self._gather(pre, values, pattern, x_c, dense=True).float().relu()
        f = torch.zeros(x.shape[0], self.cfg.d_sae, device=x.device, dtype=torch.float32)
        return f.index_put((pattern.rows, pattern.flat), vals.reshape(-1))

    def _encode_selected(self, x: Tensor) -> _Selected:
        """The encoder half of `forward` (shared by every subclass's forward): input preparation,
        pre-activations, selection (training-time state updates in training mode) and the
        differentiable active values."""
        cd = self.compute_dtype(x.device)
        x32, x_c = self._prepare_input(x, cd)
        dense = not self.cfg.sparse_kernels
        screened = None if dense else self._screened_select(x_c, cd)
        if screened is not None:  # no [B, F] product: `pre` is made only if AuxK asks for it (`_dense_pre`)
            pre, (values, pattern, indices, offsets) = None, screened
        else:
            pre = self._pre_acts(x_c, cd, with_grad=dense)  # [B, F]
            with torch.no_grad():
                values, pattern, indices, offsets = self._select(pre.detach(), update=self.training)
        xs, shift = self._sparse_encoder_input(x32, x_c)
        vals = self._gather(pre, values, pattern, xs, dense, shift).float().relu()  # like `values`
        return _Selected(cd, x32, x_c, dense, vals, pattern, indices, offsets, pre, xs, shift)

    def forward(  # type: ignore[override]
        self, x: Tensor, sparsity_coef: float = 0.0, dead_mask: Tensor | None = None
    ) -> ForwardOutput:
        sel = self._encode_selected(x)
        cd, x32, x_c, dense, vals, pattern, indices, offsets = sel[:8]
        x_hat = torch.add(self._decode_active(vals, pattern, cd, dense), self.b_dec)  # [B, d] float32 (promoted)
        aux = self._auxk(x_c, x32 - x_hat, dead_mask, cd, sel)
        with torch.no_grad():
            l0 = (vals > 0).sum(dtype=torch.float32) / x.shape[0]
            fired = fired_from_sparse(pattern.flat, vals.reshape(-1), self.cfg.d_sae)
        return self._output(x32, x_hat, vals, indices, offsets, None, aux, l0, fired)


class TopKSAE(_TopKStyle):
    """Exactly k active features per token (some may be 0 after the ReLU)."""

    arch = "topk"

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        # the int8 weights of the encoder screen and the `encoder_copy_key` they were packed from
        self._screen_w: tuple[Tensor, Tensor, Tensor] | None = None
        self._screen_key: tuple[int, ...] | None = None
        self._finish_init(generator)

    def _select(self, pre: Tensor, update: bool = False) -> tuple[Tensor, SparsePattern, Tensor, None]:
        key_v, top_i = _row_topk(_order_view(pre), int(self.cfg.k))  # type: ignore[arg-type]
        top_v = key_v.view(pre.dtype)  # [B, k]
        return top_v, SparsePattern(top_i, self.cfg.d_sae), top_i, None

    def _screened_select(self, x_c: Tensor, cd: torch.dtype) -> tuple[Tensor, SparsePattern, Tensor, None] | None:
        k = int(self.cfg.k)  # type: ignore[arg-type]
        if not _screen_applies(self.cfg.encoder_screen, x_c, cd, self.cfg.d_sae, k):
            return None
        w_aug = self.encoder_in(cd, x_c.device)  # [F, d + 1]
        key = self.encoder_copy_key(cd)
        if key is None or self._screen_key != key or self._screen_w is None:
            self._screen_w = native.screen_pack(w_aug, self.cfg.d_in, with_bias=True)
            self._screen_key = key
        if self._screen_w is None:
            return None
        got = native.screen_topk(with_ones(x_c, cd), w_aug, self._screen_w, self.cfg.d_in, k,
                                 min(self.cfg.d_sae, SCREEN_CANDIDATES_PER_K * k))
        if got is None:
            return None
        key_v, top_i = got
        return key_v.view(cd), SparsePattern(top_i, self.cfg.d_sae), top_i, None


class BatchTopKSAE(_TopKStyle):
    """k·B active entries per training batch; a global threshold θ at inference (eval mode)."""

    arch = "batchtopk"
    fp32_names = ("threshold",)

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg)
        init = math.nan if cfg.threshold is None else float(cfg.threshold)
        self.threshold: Tensor
        self.register_buffer("threshold", torch.tensor(init, dtype=torch.float32))  # [] NaN = unset
        self._finish_init(generator)

    @property
    def has_threshold(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    def _select(self, pre: Tensor, update: bool = False) -> tuple[Tensor, SparsePattern, Tensor, Tensor]:
        n_rows, n_feat = pre.shape
        if self.training:
            rows, cols, vals = _batch_topk(pre, int(self.cfg.k) * n_rows)  # type: ignore[arg-type]
            if update:
                self._update_threshold(vals)
        else:
            if not self.has_threshold:
                raise MonoscopeError(
                    "this batchtopk SAE has no inference threshold (it was never trained, and "
                    "cfg.threshold is None): train it, set cfg.threshold before building it, or call "
                    ".train() to use batch top-k selection"
                )
            rows, cols = (pre > self.threshold.to(pre.dtype)).nonzero(as_tuple=True)  # row-major
            vals = pre[rows, cols]
        counts = torch.bincount(rows, minlength=n_rows)  # [B]
        offsets = counts.cumsum(0) - counts  # [B]
        return vals, SparsePattern(cols, n_feat, offsets), cols, offsets

    @torch.no_grad()
    def calibrate_threshold_(self, x_batches: Iterable[Tensor]) -> float:
        """Set θ from data so that the eval-mode L0 is k: over the rows of `x_batches` (scaled
        activations [B, d_in] each), θ lies between the (k·N)-th and (k·N + 1)-th largest
        pre-activation, N the total number of rows. The running mean of training lags far behind
        in short runs (292 steps at k=32 gave an eval L0 of 18); this removes the lag. Returns
        the new θ; with no rows (or no positive pre-activation) θ is left as it was."""
        k = int(self.cfg.k)  # type: ignore[arg-type]
        cands: list[Tensor] = []
        n_rows = 0
        for x in x_batches:
            cd = self.compute_dtype(x.device)
            _, x_c = self._prepare_input(x, cd)
            pre = self._pre_acts(x_c, cd, with_grad=False)  # [B, F] workspace
            n_rows += pre.shape[0]
            # the batch's top 2kB entries: the global top kN holds ~kB per batch, so it is within
            # these unless batches differ wildly (then θ is slightly high, never below a true top)
            n_keep = min(2 * k * pre.shape[0], pre.numel())
            cands.append(_batch_topk(pre, n_keep)[2].float())
        if n_rows == 0:
            return float(self.threshold)
        vals = torch.cat(cands)
        vals = vals[vals > 0]
        want = k * n_rows
        if vals.numel() == 0:
            return float(self.threshold)
        if vals.numel() <= want:  # fewer positive entries than k per row: keep every positive one
            theta = vals.min() * 0.5
        else:
            top = vals.topk(want + 1).values  # sorted descending
            theta = 0.5 * (top[want - 1] + top[want])
        self.threshold.copy_(theta)
        return float(theta)

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        """θ ← (1 − w)θ + w · min(kept positive activations); the first batch sets θ."""
        pos = kept[kept > 0]
        if pos.numel() == 0:
            return
        m = pos.min().float()
        if not self.has_threshold:
            self.threshold.copy_(m)
        else:
            w = self.cfg.threshold_ema
            self.threshold.mul_(1 - w).add_(w * m)


def _batch_topk(pre: Tensor, n_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-`n_keep` entries of pre [B, F] over the whole matrix -> (rows, cols, values),
    sorted row-major.

    A flat top-k over B·F entries is ~10x slower than per-row top-k on CPU, so: take each row's
    top m = 2·n_keep/B entries as candidates, then the top n_keep among all candidates, with
    threshold t. A row whose smallest candidate is still above t may hold more entries above t:
    only such rows get twice as many candidates and the selection is redone. When no row is in
    that state, no entry outside the candidates can beat t and the result is exact (ties at t
    are broken arbitrarily, as by any top-k)."""
    n_rows, n_feat = pre.shape
    dev = pre.device
    dtype = pre.dtype
    pre = _order_view(pre)
    m = min(n_feat, 2 * -(-n_keep // n_rows))
    cand_v, cand_i = _row_topk(pre, m)  # [B, m]
    vals, cols = cand_v.reshape(-1), cand_i.reshape(-1)  # [N] candidates, flat
    rows = torch.arange(n_rows, device=dev).repeat_interleave(m)  # [N]
    row_min = cand_v.amin(1)  # [B] smallest candidate of each row
    row_m = torch.full((n_rows,), m, device=dev)  # [B] candidates taken from each row
    while True:
        top_v, top_pos = vals.topk(n_keep, sorted=False)  # [n_keep]
        unsure = (row_min > top_v.min()) & (row_m < n_feat)  # [B]
        if not bool(unsure.any()):
            break
        redo = unsure.nonzero().squeeze(1)  # [n_redo]
        m = min(n_feat, 2 * int(row_m[redo].max()))
        more_v, more_i = pre.index_select(0, redo).topk(m, dim=1, sorted=False)  # [n_redo, m]
        keep = ~unsure[rows]
        vals = torch.cat([vals[keep], more_v.reshape(-1)])
        cols = torch.cat([cols[keep], more_i.reshape(-1)])
        rows = torch.cat([rows[keep], redo.repeat_interleave(m)])
        row_min[redo] = more_v.amin(1)
        row_m[redo] = m
    sel_rows, sel_cols = rows[top_pos], cols[top_pos]
    order = torch.argsort(sel_rows * n_feat + sel_cols)
    return sel_rows[order], sel_cols[order], top_v[order].view(dtype)


def _row_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`x.topk(k, dim=1, sorted=False)` for a 2-D x. On a CPU each row's entries come in increasing column order,
    through the C kernel (`monoscope.native.row_topk`) or, without a compiler, through group maxima in PyTorch: the
    same values, and the same columns unless several entries tie at the k-th value (the kernel takes the lowest
    of them; in bf16 that is common, in float32 rare, so float32 runs agree either way). The kernel is ~1.4x faster
    on the AMX machine."""
    if x.device.type != "cpu":
        return x.topk(k, dim=1, sorted=False)
    got = native.row_topk(x, k)  # None for inputs it does not take, or without a compiler
    if got is not None:
        return got
    v, i = _group_topk(x, k)
    i, order = i.sort(1)
    return v.gather(1, order), i


def _group_topk(x: Tensor, k: int, group: int = 4) -> tuple[Tensor, Tensor]:
    """`x.topk(k, dim=1, sorted=False)` through group maxima (exact).

    Why: aten's CPU top-k costs ~1 ns per element whatever k is (40 ms for 4096 x 9216 in bf16, over a quarter
    of a training step on an AMX CPU), while an elementwise max runs at memory speed. The row is cut into
    `group` strided slices; every top-k element lies in one of the k columns with the largest maximum over the
    slices (a column whose maximum is at least the k-th largest value holds one of the k largest, so there are at
    most k of them), so the top k of the slice maxima (recursively) names k·group candidates, and the top k of
    those is the answer. Ties at the k-th value may be broken differently from aten's; the values are the same."""
    n_rows, n = x.shape
    if n % group or n // group < 4 * k:
        return x.topk(k, dim=1, sorted=False)
    cols = n // group
    _, best = _group_topk(x.view(n_rows, group, cols).amax(1), k, group)  # [B, k] columns with the largest maxima
    cand = (best.unsqueeze(-1) + torch.arange(0, n, cols, device=x.device)).reshape(n_rows, k * group)
    v, j = x.gather(1, cand).topk(k, dim=1, sorted=False)
    return v, cand.gather(1, j)


def _order_view(t: Tensor) -> Tensor:
    """A view of t whose integer order agrees with t's on positive values (bf16 -> int16,
    float32 -> int32; sign-magnitude floats compare like integers when positive). Integer top-k
    is ~17% faster on CPU. Non-positive entries, which the ReLU after the top-k zeroes anyway,
    may be ranked differently among themselves: outputs and gradients do not change."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t
