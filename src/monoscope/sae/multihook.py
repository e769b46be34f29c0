"""Dictionaries over several hook points captured in one pass: the transcoder and the acausal crosscoder.

Both are TopK dictionaries (`topk.py`: exactly k active features per token, AuxK on dead latents, unit-norm
decoder rows, except for a transcoder trained with `--transcoder-init sparsify`: `init_sparsify_`) trained on
the rows of a store captured with `--hook A,B[,C...]`, whose rows are the hooks' activations side by side
([B, n_hooks·d_model], in the order given).

Transcoder (Dunefsky, Chlenski & Nanda 2024; sparsify's `transcode=True`): reads x = the input hook (e.g.
`mlp_in.L`, what the MLP reads) and reconstructs y = the target hook (`mlp_out.L`, what the MLP adds):

    f = TopK(W_enc (c_in·x) + b_enc),    ŷ = (Σ_active f_i W_dec[i] + b_dec) / c_out

The loss is ‖c_out·y − c_out·ŷ‖² (FVU against the target). TopK, not ReLU + L1, because it is what sparsify
(the peer that trains transcoders) and circuit-tracer's CLT recipes use, L0 is set rather than tuned through a
penalty, and it reuses the sparse TopK kernels. b_dec lives in the target's space, so it is never subtracted
from the input. `encode` takes the input hook alone ([B, d_in]); features are read from the input hook.

Crosscoder (acausal; Lindsey et al. 2024, "Sparse Crosscoders"): one dictionary over L hooks of one width d:

    f = TopK(Σ_l W_enc^l (c_l·x_l) + b_enc),    x̂_l = (Σ_active f_i W_dec^l[i] + b_dec^l) / c_l

With the hooks side by side the encoder's sum over layers IS one matmul over the concatenated row, and the
decoder writes every layer with one matmul, so this is a TopK SAE on [x_1; …; x_L] with one scale c_l per layer
(each layer's block has E‖c_l·x_l‖² = d, so no layer dominates the loss through its norm). Decoder rows are unit
norm over all layers together (the TopK convention; Anthropic's L1 variant weights by Σ_l ‖W_dec^l[i]‖ instead).
"""

from __future__ import annotations

import torch
from torch import Tensor

from monoscope.sae.config import SAEConfig, SAEConfigError
from monoscope.sae.topk import TopKSAE


class TranscoderSAE(TopKSAE):
    """TopK transcoder: encodes the input hook, decodes the target hook (module docstring)."""

    arch = "transcoder"

    @property
    def store_hook(self) -> str | None:
        return f"{self.cfg.hook},{self.cfg.target_hook}" if self.cfg.hook else None

    @property
    def row_width(self) -> int:
        return 2 * self.cfg.d_in

    def split_target(self, x_raw: Tensor) -> tuple[Tensor, Tensor]:
        d = self.cfg.d_in
        return x_raw[..., :d], x_raw[..., d:]

    def scale(self, x_raw: Tensor) -> Tensor:
        """Input rows [B, d_in] -> c_in·x; store rows [B, 2·d_in] -> [c_in·x, c_out·y]."""
        x = x_raw.float()
        if x.shape[-1] == 2 * self.cfg.d_in:
            d = self.cfg.d_in
            return torch.cat([x[..., :d] * self.cfg.normaliser, x[..., d:] * float(self.cfg.target_normaliser)], -1)  # type: ignore[arg-type]
        return x * self.cfg.normaliser

    def unscale(self, x: Tensor) -> Tensor:
        """Outputs live in the target's space: ŷ / c_out."""
        return x.float() / float(self.cfg.target_normaliser)  # type: ignore[arg-type]

    def _prepare_input(self, x: Tensor, cd: torch.dtype) -> tuple[Tensor, Tensor]:
        """(target float32, input in the compute dtype) from [B, 2·d_in] rows; an input alone ([B, d_in], for
        encoding) is returned in the target's place: encoding computes no loss from it."""
        d = self.cfg.d_in
        if x.dim() != 2 or x.shape[1] not in (d, 2 * d):
            raise ValueError(f"transcoder expects inputs [B, {d}] or input+target rows [B, {2 * d}], got "
                             f"{tuple(x.shape)}")
        x32 = x.float()
        if x.shape[1] == 2 * d:
            return x32[:, d:], x32[:, :d].to(cd)
        return x32, x32.to(cd)

    @torch.no_grad()
    def init_b_dec_(self, sample: Tensor, method: str = "geometric_median", max_iter: int = 100) -> Tensor:
        """b_dec (target space) from the target half of scaled store rows (or a target sample [N, d_in])."""
        target = sample[:, self.cfg.d_in:] if sample.dim() == 2 and sample.shape[1] == 2 * self.cfg.d_in else sample
        return super().init_b_dec_(target, method, max_iter)

    @torch.no_grad()
    def init_sparsify_(self, sample: Tensor, encoder_norm: float, generator: torch.Generator | None = None) -> None:
        """sparsify's transcoder start (`--transcoder-init sparsify`), from scaled store rows [N, 2·d_in]: encoder
        entries U(±a) with a = encoder_norm·sqrt(3/d_in) (expected row norm `encoder_norm`; nn.Linear's init when it
        is 1/sqrt(3)), b_enc = -mean(input)·W_encᵀ so the pre-activations start centred, W_dec = 0 (every feature
        starts as a zero output; its row grows from the error it sees). b_dec is `init_b_dec_`'s. `generator` (a
        CPU generator) makes it reproducible on every device."""
        d = self.cfg.d_in
        if sample.dim() != 2 or sample.shape[1] != 2 * d:
            raise ValueError(f"init_sparsify_ needs scaled store rows [N, {2 * d}], got {tuple(sample.shape)}")
        a = float(encoder_norm) * (3.0 / d) ** 0.5
        w = (torch.rand(self.cfg.d_sae, d, generator=generator, dtype=torch.float32) * 2 - 1) * a  # [F, d]
        self.W_enc.copy_(w.to(self.W_enc.device, self.W_enc.dtype))
        mean_in = sample[:, :d].float().mean(0).to(self.W_enc.device)  # [d]
        self.b_enc.copy_((-(self.W_enc.float() @ mean_in)).to(self.b_enc.dtype))
        self.W_dec.zero_()


class CrosscoderSAE(TopKSAE):
    """Acausal TopK crosscoder over the hooks of `cfg.hook` (module docstring)."""

    arch = "crosscoder"

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(cfg, generator)
        self._scales: dict[torch.device, Tensor] = {}

    @property
    def hooks(self) -> list[str]:
        n = len(self.cfg.hook_normalisers or [])
        return self.cfg.hook.split(",") if self.cfg.hook else [f"layer{i}" for i in range(n)]

    @property
    def hook_width(self) -> int:
        return self.cfg.d_in // len(self.cfg.hook_normalisers or [1])

    def _scale_vec(self, device: torch.device) -> Tensor:
        vec = self._scales.get(device)
        if vec is None:
            c = torch.tensor(self.cfg.hook_normalisers, dtype=torch.float32)
            vec = self._scales[device] = c.repeat_interleave(self.hook_width).to(device)
        return vec

    def scale(self, x_raw: Tensor) -> Tensor:
        """[B, L·d] raw rows -> each layer's block times its own c_l."""
        return x_raw.float() * self._scale_vec(x_raw.device)

    def unscale(self, x: Tensor) -> Tensor:
        return x.float() / self._scale_vec(x.device)


_ORDER_IN_BLOCK = {"resid_pre": 0, "attn_out": 1, "mlp_in": 2, "mlp_out": 3, "resid_post": 4}


def _parse(name: str) -> tuple[str, int] | None:
    kind, _, layer = name.partition(".")
    return (kind, int(layer)) if kind in _ORDER_IN_BLOCK and layer.isdigit() else None


def multi_hook_fields(arch: str, hooks: list[str], scales: list[float], d_model: int, where: str) -> dict[str, object]:
    """SAEConfig fields (d_in, hook, normaliser, target_hook/hook_normalisers) of `arch` trained on store rows
    holding `hooks` side by side with per-hook scales `scales`; a mismatch between the architecture and the
    store is a one-line error naming the capture to run."""
    multi = arch in ("transcoder", "crosscoder")
    if not multi:
        if len(hooks) > 1:
            raise SAEConfigError(f"{where} holds {len(hooks)} hooks side by side ({','.join(hooks)}): train --arch "
                                 "transcoder or --arch crosscoder on it, or capture one --hook for this architecture")
        return {"d_in": d_model, "hook": hooks[0], "normaliser": scales[0]}
    if arch == "transcoder":
        if len(hooks) != 2:
            raise SAEConfigError(
                f"--arch transcoder needs a store of two hooks of one layer (input, target), but {where} holds "
                f"{','.join(hooks)}: capture one with --hook mlp_in.L,mlp_out.L")
        src, dst = _parse(hooks[0]), _parse(hooks[1])
        if src is not None and dst is not None:
            if src[1] != dst[1]:
                raise SAEConfigError(
                    f"--arch transcoder on hooks of different layers ({hooks[0]} -> {hooks[1]}): a transcoder replaces "
                    f"one layer's MLP; capture --hook mlp_in.{dst[1]},mlp_out.{dst[1]} (or train a crosscoder across "
                    "layers)")
            if _ORDER_IN_BLOCK[src[0]] >= _ORDER_IN_BLOCK[dst[0]]:
                raise SAEConfigError(
                    f"--arch transcoder reads the first hook and reconstructs the second, but {hooks[0]} does not come "
                    f"before {hooks[1]} in the forward: capture --hook mlp_in.{src[1]},mlp_out.{src[1]}")
        return {"d_in": d_model, "hook": hooks[0], "target_hook": hooks[1], "normaliser": scales[0],
                "target_normaliser": scales[1]}
    if len(hooks) < 2:
        raise SAEConfigError(f"--arch crosscoder reads several hooks, but {where} holds one ({hooks[0]}): capture "
                             "e.g. --hook resid_post.2,resid_post.4,resid_post.6")
    return {"d_in": d_model * len(hooks), "hook": ",".join(hooks), "normaliser": 1.0,
            "hook_normalisers": [float(c) for c in scales]}
