"""Dead features: who has not fired for a window of tokens, and Anthropic's resampling to revive them.

A feature is *dead* when it has not been active on any of the last `window` tokens (Scaling
Monosemanticity: 10^7). The tracker keeps one int64 counter per feature, tokens since it last
fired, updated every step from `ForwardOutput.fired`; this costs two vector ops on [d_sae] and is
saved with each checkpoint. A feature becomes dead `window` tokens after its last activation, so
no feature is dead before `window` tokens have been seen.

Revival: topk and batchtopk get the dead mask for their AuxK loss every step. relu-l1 (and any
arch with `revive=resample`) is resampled at fixed fractions of the run (`TrainConfig.resample_at`,
default 20/40/60%, before the learning-rate decay), following Bricken et al. 2023 ("Towards
Monosemanticity", Appendix: neuron resampling), using the current batch as the input sample:
  1. weight each input of the batch by the square of its reconstruction loss ‖x − x̂‖²;
  2. draw one input per dead feature with those weights (a generator seeded by (seed, step), so
     resume repeats it exactly); centre it (x − b_dec) and normalise it to unit norm: v;
  3. W_dec[i] = v · (mean decoder norm of live features); W_enc[i] = v · 0.2 · (mean encoder norm
     of live features); b_enc[i] = 0;
  4. zero Adam's moments for those rows (exp_avg, exp_avg_sq), and restart their dead counters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from monoscope.sae import SAE


class DeadFeatureTracker:
    """Tokens since each feature last fired; `dead()` = not fired for `window` tokens."""

    def __init__(self, d_sae: int, window: int, device: torch.device | str = "cpu") -> None:
        self.window = window
        self.since = torch.zeros(d_sae, dtype=torch.int64, device=device)  # [F] tokens since last firing

    def update(self, fired: Tensor, n_tokens: int | Tensor) -> None:
        """fired [F] bool: features active somewhere in a batch of `n_tokens` tokens (a device
        scalar when the trainer masks a skipped step without a host sync)."""
        self.since.add_(n_tokens).masked_fill_(fired, 0)

    def dead(self) -> Tensor:
        """[F] bool mask of dead features."""
        return self.since >= self.window

    def dead_fraction(self) -> float:
        return float(self.dead().float().mean())

    def reset(self, features: Tensor) -> None:
        """Give `features` (indices) a fresh window, e.g. after resampling them."""
        self.since[features] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"since": self.since.detach().cpu().clone(), "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        since = state["since"]
        if since.shape != self.since.shape:
            raise ValueError(f"dead counters have shape {tuple(since.shape)}, expected {tuple(self.since.shape)}")
        self.since.copy_(since)
        self.window = int(state["window"])


@torch.no_grad()
def resample_dead(
    sae: SAE, optimizer: torch.optim.Optimizer, dead: Tensor, x: Tensor, x_hat: Tensor, generator: torch.Generator
) -> Tensor:
    """Re-initialise dead features toward badly reconstructed inputs (module docstring); returns
    the indices [n_dead] it resampled. x, x_hat: [B, d_in] scaled inputs and their reconstruction."""
    idx = dead.nonzero().squeeze(1)  # [n_dead]
    n_dead = idx.numel()
    if n_dead == 0:
        return idx
    alive = ~dead
    weights = (x.float() - x_hat.float()).pow(2).sum(1).pow(2).cpu().double()  # [B] loss²
    if not bool(torch.isfinite(weights).all()) or float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)
    pick = torch.multinomial(weights, n_dead, replacement=True, generator=generator)  # independent draws
    v = x.float()[pick.to(x.device)] - sae.b_dec.float()  # [n_dead, d]
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if bool(alive.any()):
        dec_norm = sae.W_dec.float()[alive].norm(dim=1).mean()
        enc_norm = sae.W_enc.float()[alive].norm(dim=1).mean()
    else:
        dec_norm = enc_norm = torch.tensor(1.0, device=v.device)
    reinit_features(sae, optimizer, idx, v, dec_norm, enc_norm)
    return idx


@torch.no_grad()
def reinit_features(sae: SAE, optimizer: torch.optim.Optimizer, idx: Tensor, v: Tensor, dec_norm: Tensor,
                    enc_norm: Tensor) -> None:
    """Steps 3-4 of resampling for features `idx` [n] toward unit directions v [n, d] (shared with the
    feature-sharded trainer, which draws v and the live norms over every shard)."""
    sae.W_dec[idx] = (v * dec_norm).to(sae.W_dec.dtype)
    sae.W_enc[idx] = (v * 0.2 * enc_norm).to(sae.W_enc.dtype)
    sae.b_enc[idx] = 0
    extras = [getattr(sae, name) for name in sae.per_feature_extras]  # gated: r_mag, b_mag
    for t in extras:
        t[idx] = 0
    for p in (sae.W_dec, sae.W_enc, sae.b_enc, *extras):
        state = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state:
                state[key][idx] = 0
