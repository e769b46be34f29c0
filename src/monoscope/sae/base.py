"""The interface every SAE architecture implements, and what they share.

An SAE reads activations in the *scaled* space x = c·x_raw (c = `cfg.normaliser`, chosen so that
E‖x‖² = d_in) and returns its reconstruction in that same space. Methods without a suffix
(`encode`, `decode`, `forward`) work in the scaled space; the `*_raw` methods take and return raw
activations, folding c in and out, so a metric never compares a scaled input with an unscaled
output (SAELens #518).

Parameters (float32 master copies unless `cfg.dtype` says otherwise):
    W_enc [d_sae, d_in]  encoder rows (nn.Linear layout; sparsify's encoder.weight; SAELens W_enc.T)
    b_enc [d_sae]
    W_dec [d_sae, d_in]  decoder rows = feature directions (SAELens and sparsify W_dec)
    b_dec [d_in]
plus per-architecture extras (JumpReLU `log_threshold` [d_sae], BatchTopK buffer `threshold` []).
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from monoscope.devices import bf16_is_fast
from monoscope.sae.config import SAEConfig
from monoscope.sae.sparse import SparsePattern, row_sq_err, sparse_decode

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _version_key(*ts: Tensor) -> tuple[int, ...] | None:
    """(data pointer, version counter) of each tensor: it changes with every in-place write or replaced storage;
    None for inference tensors, which have no version counter."""
    try:
        return tuple(v for t in ts for v in (t.data_ptr(), t._version))
    except RuntimeError:
        return None


class ForwardOutput(NamedTuple):
    """Everything a training or evaluation step needs from one forward pass (scaled space).

    Loss terms are scalars; the differentiable ones (`mse`, `sparsity`, `aux`, `total`) satisfy
    `total = mse + sparsity + aux` exactly, each already multiplied by its coefficient.
    """

    x_hat: Tensor
    """[B, d_in] float32 reconstruction in the scaled space."""
    acts: Tensor
    """Feature activations, dense or sparse depending on what the step computed (building a dense
    [B, d_sae] matrix can cost more than the whole sparse step):
    dense [B, d_sae] (compute dtype) for relu-l1/jumprelu batches that took the dense path;
    otherwise values aligned with `indices`: [B, k] for topk, [nnz] (rows given by `offsets`) for
    batchtopk and for relu-l1/jumprelu batches on the sparse path. Kept entries can be 0 (topk's
    ReLU, jumprelu's inactive entries inside the STE window). `dense_acts()` always works."""
    indices: Tensor | None
    """Feature ids of `acts` when sparse ([B, k] or [nnz], int64); None when `acts` is dense."""
    offsets: Tensor | None
    """[B] start of row b's entries in flat `acts`/`indices`; None for dense or [B, k] forms."""
    mse: Tensor
    """Mean over the batch of Σ_d (x − x̂)²: the reconstruction loss (differentiable)."""
    sparsity: Tensor
    """Sparsity penalty with its coefficient: relu-l1 λ·mean_b Σ_i f_i‖W_dec[i]‖₂; jumprelu
    λ·mean_b L0 (straight-through); 0 for topk-style (differentiable)."""
    aux: Tensor
    """Auxiliary loss with its coefficient: AuxK for topk-style when a dead mask is given
    (aux_coef · min(n_dead/k_aux, 1) · mean_b ‖ê − e‖², same units as `mse`), else 0."""
    total: Tensor
    """mse + sparsity + aux: what the trainer backpropagates."""
    l0: Tensor
    """Mean number of non-zero features per token (float, detached)."""
    fvu: Tensor
    """Fraction of variance unexplained over the batch, Σ‖x − x̂‖² / Σ‖x − x̄‖² (detached)."""
    fired: Tensor
    """[d_sae] bool: features with a non-zero activation somewhere in this batch (for the
    trainer's dead-feature counters)."""

    def dense_acts(self) -> Tensor:
        """[B, d_sae] float32 activations (materialises the sparse forms)."""
        if self.indices is None:
            return self.acts.float()
        d_sae = self.fired.shape[0]
        n_rows = self.x_hat.shape[0]
        vals = self.acts.detach().float()
        if self.offsets is None:
            return torch.zeros(n_rows, d_sae, device=vals.device).scatter_(1, self.indices, vals)
        counts = torch.diff(self.offsets, append=self.offsets.new_tensor([self.indices.numel()]))
        rows = torch.repeat_interleave(torch.arange(n_rows, device=vals.device), counts)
        out = torch.zeros(n_rows, d_sae, device=vals.device)
        out[rows, self.indices] = vals
        return out


class SAE(nn.Module):
    """Base class: parameters, initialisation, scaling, decoder constraints, shared maths.

    Subclasses implement `encode` and `forward`; see the module docstring for conventions.
    """

    arch: ClassVar[str] = ""
    fp32_names: ClassVar[tuple[str, ...]] = ()
    """Parameters/buffers that stay float32 whatever `.to(dtype)` is asked (thresholds)."""
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows are kept at unit norm during training (False: relu-l1 and gated, whose L1 term
    is weighted by the decoder norms instead)."""
    per_feature_extras: ClassVar[tuple[str, ...]] = ()
    """Further [d_sae] parameters of one feature each (gated's r_mag, b_mag): resampling resets them."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.arch != self.arch:
            raise ValueError(f"{type(self).__name__} builds arch {self.arch!r}, got a config for {cfg.arch!r}")
        self.cfg = cfg
        self.provenance: dict[str, Any] = {}
        """Free-form record of how the SAE was made; `save_sae` writes it, `load_sae` restores it."""
        self.joint_backward = False
        """Set by a caller that always backpropagates the reconstruction and the auxiliary loss together (the
        Trainer): the CPU AuxK block may then hand its weight gradients over as sparse rows, which autograd adds
        into the main path's dense ones in place (`sparse.block_linear_decode`). Off, `out.aux.backward()` on its
        own still gives dense `.grad`s."""
        n_feat, d = cfg.d_sae, cfg.d_in
        # compute-dtype copies of [W_enc, b_enc] (for `_encode_nograd`) and of W_dec (`decoder_in`), converted on
        # every use unless the CPU's fused optimiser step wrote them and nothing changed the parameters since
        # (`mark_copies_current`, `_copy_keys`)
        self._w_aug: dict[torch.dtype, Tensor] = {}
        self._w_dec_c: dict[torch.dtype, Tensor] = {}
        self._copy_keys: dict[tuple[str, torch.dtype], tuple[int, ...]] = {}
        self.W_enc = nn.Parameter(torch.empty(n_feat, d))  # [F, d]
        self.b_enc = nn.Parameter(torch.zeros(n_feat))  # [F]
        self.W_dec = nn.Parameter(torch.empty(n_feat, d))  # [F, d]
        self.b_dec = nn.Parameter(torch.zeros(d))  # [d]

    def _finish_init(self, generator: torch.Generator | None) -> None:
        """Call at the end of a subclass __init__: initialise, then move to cfg.dtype."""
        self.reset_parameters(generator)
        if self.cfg.dtype != "float32":
            self.to(_DTYPES[self.cfg.dtype])

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows: random directions of norm `cfg.init_decoder_norm`; encoder = decoderᵀ
        (W_enc rows = W_dec rows; Gao et al., Anthropic's April 2024 update, Gemma Scope);
        biases zero. `generator` (a CPU generator) makes it reproducible on every device."""
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator)  # [F, d]
        w = w / w.norm(dim=1, keepdim=True) * float(self.cfg.init_decoder_norm)  # type: ignore[arg-type]
        self.W_dec.copy_(w)
        self.W_enc.copy_(w)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_b_dec_(self, sample: Tensor, method: str = "geometric_median", max_iter: int = 100) -> Tensor:
        """Set b_dec to the geometric median (default, robust to outliers; as SAELens does) or the
        mean of `sample` [N, d_in], given in the SCALED space (multiply raw activations by
        `cfg.normaliser`, or use `self.scale(x_raw)`). Returns the new b_dec."""
        if sample.dim() != 2 or sample.shape[1] != self.cfg.d_in:
            raise ValueError(f"init_b_dec_ needs a sample [N, {self.cfg.d_in}], got {tuple(sample.shape)}")
        pts = sample.detach().float().to(self.b_dec.device)
        if method == "mean":
            centre = pts.mean(0)
        elif method == "geometric_median":
            centre = geometric_median(pts, max_iter=max_iter)
        else:
            raise ValueError(f"init_b_dec_ method {method!r}: use 'geometric_median' or 'mean'")
        self.b_dec.copy_(centre.to(self.b_dec.dtype))
        return self.b_dec.detach().clone()

    # ------------------------------------------------------------------ dtype handling
    def _apply(self, fn: Any, recurse: bool = True) -> SAE:  # type: ignore[override]
        # Keep the fp32-pinned tensors in float32 (and exact) whatever dtype the rest moves to:
        # save them, let nn.Module convert everything, then restore on the new device.
        saved = {n: getattr(self, n).detach().clone() for n in self.fp32_names if hasattr(self, n)}
        super()._apply(fn, recurse)
        for name, value in saved.items():
            t = getattr(self, name)
            t.data = value.to(device=t.device, dtype=torch.float32)
        return self

    def compute_dtype(self, device: torch.device | None = None) -> torch.dtype:
        """Dtype of the large matmuls on `device` (default: where the parameters are)."""
        name = self.cfg.compute_dtype
        if name == "auto":
            dev = device if device is not None else self.W_enc.device
            return torch.bfloat16 if bf16_is_fast(dev) else torch.float32
        return _DTYPES[name]

    # ------------------------------------------------------------------ interface
    def encode(self, x: Tensor) -> Tensor:
        """[B, d_in] scaled activations -> [B, d_sae] float32 feature activations."""
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        """[B, d_sae] feature activations -> [B, d_in] float32 reconstruction (scaled space)."""
        cd = self.compute_dtype(f.device)
        return (f.to(cd) @ self.W_dec.to(cd)).float() + self.b_dec.float()

    def forward(  # type: ignore[override]
        self, x: Tensor, sparsity_coef: float = 0.0, dead_mask: Tensor | None = None
    ) -> ForwardOutput:
        """One training/evaluation pass on scaled activations x [B, d_in].

        sparsity_coef: λ of relu-l1 (L1 on f_i‖W_dec[i]‖) or of jumprelu (L0); ignored by topk-style.
        dead_mask: [d_sae] bool of features the trainer counts as dead; topk-style SAEs compute
        the AuxK loss on them; ignored by the others.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ the data it reads
    @property
    def store_hook(self) -> str | None:
        """The hook label of the store rows it trains on (a transcoder: `input,target`)."""
        return self.cfg.hook

    @property
    def row_width(self) -> int:
        """Width of the store rows it trains on (a transcoder's rows hold input and target)."""
        return self.cfg.d_in

    @property
    def hook_width(self) -> int:
        """The model's width at each hook it reads (a crosscoder reads several hooks of this width)."""
        return self.cfg.d_in

    def split_target(self, x_raw: Tensor) -> tuple[Tensor, Tensor]:
        """Store rows -> (what it encodes, what it reconstructs): the same rows, except for a transcoder."""
        return x_raw, x_raw

    # ------------------------------------------------------------------ raw-space helpers
    def scale(self, x_raw: Tensor) -> Tensor:
        """Raw activations -> the scaled space the SAE works in: c·x_raw (float32)."""
        return x_raw.float() * self.cfg.normaliser

    def unscale(self, x: Tensor) -> Tensor:
        """Scaled-space vectors (x, x̂) -> raw space: x / c (float32)."""
        return x.float() / self.cfg.normaliser

    def encode_raw(self, x_raw: Tensor) -> Tensor:
        """Raw activations [B, d_in] -> features [B, d_sae] = encode(c·x_raw)."""
        return self.encode(self.scale(x_raw))

    def decode_raw(self, f: Tensor) -> Tensor:
        """Features [B, d_sae] -> reconstruction in RAW space, decode(f) / c."""
        return self.unscale(self.decode(f))

    def reconstruct_raw(self, x_raw: Tensor) -> Tensor:
        """Raw activations -> raw reconstruction: decode(encode(c·x_raw)) / c. Compare this, not
        `forward(...).x_hat`, with raw activations (for splicing into the model, raw-space MSE)."""
        return self.unscale(self.decode(self.encode(self.scale(x_raw))))

    # ------------------------------------------------------------------ decoder constraints
    def decoder_norms(self) -> Tensor:
        """[d_sae] L2 norm of each decoder row (float32, differentiable)."""
        return self.W_dec.float().norm(dim=1)

    @torch.no_grad()
    def normalize_decoder_(self, only_if: Tensor | None = None) -> None:
        """Rescale every decoder row to unit L2 norm (topk, batchtopk, jumprelu: after each
        optimiser step). `only_if`: a bool scalar on the device; when false the rows stay as they are
        (a skipped step, decided without a host sync)."""
        w = self.W_dec
        norms = torch.linalg.vector_norm(w, dim=1, keepdim=True, dtype=torch.float32)  # [F, 1]
        norms = norms.clamp_min(1e-12)
        if only_if is not None:
            norms = torch.where(only_if, norms, torch.ones_like(norms))  # x / 1 is exact
        w.div_(norms.to(w.dtype))  # in place: no [F, d] temporaries

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Remove from W_dec.grad its component along each decoder row (before the optimiser step),
        so the step moves rows along their unit sphere and `normalize_decoder_` only corrects
        second-order drift (Bricken et al. 2023; Gao et al. 2024)."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        dots = torch.linalg.vecdot(g, w, dim=1).float()  # [F] <g_i, w_i>
        sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square().clamp_min(1e-12)  # [F]
        g.addcmul_(w, (dots / sq).to(g.dtype)[:, None], value=-1)  # g -= coef·w, in place

    # ------------------------------------------------------------------ shared maths
    def _prepare_input(self, x: Tensor, cd: torch.dtype) -> tuple[Tensor, Tensor]:
        """(x in float32 [B, d], encoder input in the compute dtype, centred by b_dec if configured)."""
        if x.dim() != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(f"{self.arch} SAE expects activations [B, {self.cfg.d_in}], got {tuple(x.shape)}")
        x32 = x.float()
        x_c = x32 - self.b_dec.float() if self.cfg.b_dec_to_input else x32
        return x32, x_c.to(cd)

    def _sparse_encoder_input(self, x32: Tensor, x_c: Tensor) -> tuple[Tensor, Tensor | None]:
        """(x_c, x_shift) for `gather_linear`: when b_dec is subtracted and x needs no gradient,
        x_c detached plus b_dec as x_shift (its gradient is then a cheap [F]·[F, d] product)."""
        if self.cfg.b_dec_to_input and not x32.requires_grad:
            return x_c.detach(), self.b_dec
        return x_c, None

    @torch.no_grad()
    def _encode_nograd(self, x_c: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        """pre = x_c W_encᵀ + b_enc  [B, F] in `dtype`, without autograd (the sparse and dense
        training paths attach their own backward to it).

        The bias is folded into the matmul as an extra input column of ones ([x_c, 1] @
        [W_enc, b_enc]ᵀ): addmm would first copy the bias into every row of the [B, F] output,
        a pass that costs ~30% of the bf16 matmul on CPU."""
        w_aug = self.encoder_in(dtype, x_c.device)
        x_aug = with_ones(x_c, dtype)
        if out is None:
            return torch.mm(x_aug, w_aug.t())
        return torch.mm(x_aug, w_aug.t(), out=out)

    @torch.no_grad()
    def encoder_in(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """[W_enc, b_enc] [F, d + 1] in `dtype` (no autograd): the copy the fused optimiser step wrote while it is
        current, else refreshed from the parameters."""
        w_aug = self._copy_buffer("enc", dtype, device)
        if not self._copy_current("enc", dtype, self.W_enc, self.b_enc):
            d = self.cfg.d_in
            w_aug[:, :d].copy_(self.W_enc)
            w_aug[:, d].copy_(self.b_enc)
        return w_aug

    def encoder_copy_key(self, dtype: torch.dtype) -> tuple[int, ...] | None:
        """What identifies the parameters `encoder_in` holds while the fused step's record of them stands (None
        when there is none: the copy may have been refreshed by any forward)."""
        return self._copy_keys.get(("enc", dtype)) if self._copy_current("enc", dtype, self.W_enc, self.b_enc) else None

    def copy_buffers(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """The buffers of the compute-dtype copies ([F, d + 1] [W_enc, b_enc] and [F, d] W_dec), made on first use."""
        return self._copy_buffer("enc", dtype, device), self._copy_buffer("dec", dtype, device)

    def _copy_buffer(self, name: str, dtype: torch.dtype, device: torch.device) -> Tensor:
        """One of `copy_buffers` ("enc" or "dec"), made on first use: the decoder's only where the fused step asks
        for it (a forward alone never needs it)."""
        store, shape = ((self._w_aug, (self.cfg.d_sae, self.cfg.d_in + 1)) if name == "enc"
                        else (self._w_dec_c, tuple(self.W_dec.shape)))
        t = store.get(dtype)
        if (t is None or t.device != device or t.shape != shape
                or (t.is_inference() and not torch.is_inference_mode_enabled())):  # one made under inference_mode
            t = store[dtype] = torch.empty(shape, dtype=dtype, device=device)
            self._copy_keys.pop((name, dtype), None)
        return t

    def _sparse_decode(self, values: Tensor, pattern: SparsePattern, cd: torch.dtype, weight: Tensor | None = None,
                       weight_c: Tensor | None = None) -> Tensor:
        """Σ values · W_dec rows over `pattern` in the compute dtype (`sparse.sparse_decode`), reading the decoder's
        compute-dtype copy (`decoder_in`, or `weight_c` when the caller holds it): the one decode every
        architecture's sparse path runs. `weight`: a stand-in for W_dec with its values (gated's frozen copy)."""
        return sparse_decode(values, pattern.flat, self.W_dec if weight is None else weight, dtype=cd,
                             pattern=pattern, weight_c=self.decoder_in(cd) if weight_c is None else weight_c)

    def decoder_in(self, dtype: torch.dtype) -> Tensor:
        """W_dec in `dtype` (no autograd): the copy the fused optimiser step wrote while it is current, so a
        forward after that step converts nothing; else a new conversion (not into that buffer, which a backward
        may still need); W_dec itself when it is already in `dtype`."""
        if self.W_dec.dtype == dtype:
            return self.W_dec.detach()
        if self._copy_current("dec", dtype, self.W_dec):
            return self._w_dec_c[dtype]
        return self.W_dec.detach().to(dtype)

    def _copy_current(self, name: str, dtype: torch.dtype, *params: Tensor) -> bool:
        key = self._copy_keys.get((name, dtype))
        return key is not None and key == _version_key(*params)

    def invalidate_copies(self) -> None:
        """Forget that the compute-dtype copies are current: for whoever changes the parameters in a way that may
        leave their version counters alone (torch's fused Adam does; the Trainer calls this after every
        `optimizer.step()`)."""
        self._copy_keys.clear()

    def mark_copies_current(self, dtype: torch.dtype, encoder: bool, decoder: bool) -> None:
        """Record that the compute-dtype copies hold the parameters as they are now, which the caller wrote (the
        fused optimiser step; the encoder's bias column is copied here). Only such a record lets a forward skip
        the conversion, and only while the parameters' (data pointer, version) stay as recorded: any in-place
        change through torch's ops bumps the version."""
        if encoder:
            with torch.no_grad():
                self._w_aug[dtype][:, self.cfg.d_in].copy_(self.b_enc)
            key = _version_key(self.W_enc, self.b_enc)
            if key is not None:
                self._copy_keys["enc", dtype] = key
        if decoder:
            key = _version_key(self.W_dec)
            if key is not None:
                self._copy_keys["dec", dtype] = key

    def _active_pattern(self, mask: Tensor) -> SparsePattern | None:
        """Pattern of the True entries of mask [B, F] (row-major), or None when more than
        `cfg.sparse_max_density` of them are set (the dense path is faster then) or sparse kernels
        are off."""
        if not self.cfg.sparse_kernels:
            return None
        rows, cols = mask.nonzero(as_tuple=True)  # row-major
        if rows.numel() > self.cfg.sparse_max_density * mask.numel():
            return None
        counts = torch.bincount(rows, minlength=mask.shape[0])  # [B]
        return SparsePattern(cols, mask.shape[1], counts.cumsum(0) - counts)

    def _output(
        self,
        x32: Tensor,
        x_hat: Tensor,
        acts: Tensor,
        indices: Tensor | None,
        offsets: Tensor | None,
        sparsity: Tensor | None,
        aux: Tensor | None,
        l0: Tensor,
        fired: Tensor,
    ) -> ForwardOutput:
        sq = row_sq_err(x_hat, x32)  # [B]
        mse = sq.mean()
        zero = x_hat.new_zeros(())
        sparsity = zero if sparsity is None else sparsity
        aux = zero if aux is None else aux
        with torch.no_grad():
            var = (x32 - x32.mean(0)).pow(2).sum()
            fvu = sq.sum() / var.clamp_min(1e-12)
        return ForwardOutput(
            x_hat=x_hat,
            acts=acts,
            indices=indices,
            offsets=offsets,
            mse=mse,
            sparsity=sparsity,
            aux=aux,
            total=mse + sparsity + aux,
            l0=l0.detach().float(),
            fvu=fvu,
            fired=fired,
        )


def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's iteration for argmin_y Σ_n ‖points[n] − y‖ over points [N, d] -> [d]."""
    y = points.mean(0)
    for _ in range(max_iter):
        dist = (points - y).norm(dim=1).clamp_min(1e-8)  # [N]
        w = 1.0 / dist
        y_new = (w[:, None] * points).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * max(1.0, float(y.norm()))
        y = y_new
        if done:
            break
    return y


def fired_from_sparse(indices: Tensor, values: Tensor, d_sae: int) -> Tensor:
    """[d_sae] bool: features with a non-zero value among (indices, values). A count per feature, not a boolean-mask
    index: that one lists the non-zero entries with a host sync on a GPU (and is ~4x slower on a CPU)."""
    counts = torch.zeros(d_sae, dtype=torch.int32, device=indices.device)
    return counts.index_add_(0, indices.reshape(-1), (values.reshape(-1) != 0).to(torch.int32)) > 0


def with_ones(x: Tensor, dtype: torch.dtype) -> Tensor:
    """[x, 1] [B, d + 1] in `dtype`: the encoder input that meets `encoder_in`'s bias column."""
    out = torch.empty(x.shape[0], x.shape[1] + 1, dtype=dtype, device=x.device)
    out[:, : x.shape[1]].copy_(x)
    out[:, x.shape[1]].fill_(1)
    return out
