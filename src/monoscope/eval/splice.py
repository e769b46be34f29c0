"""LM loss with the SAE's reconstruction spliced in at the hook, against the clean and zero-ablated model.

One forward serves every variant: at the hook, the activation h [B, T, d] is replaced by the stack
[h; h with x̂ spliced; h zero-ablated; (h with x̂ + (x − x̂))] of batch V·B, so the blocks before the
hook run once and only the ones after it run V times. That needs the model's later blocks to
broadcast position embeddings and masks over the larger batch (true for the causal, unpadded
batches used here on Llama/Gemma/Qwen/GPT-2/NeoX); the first batch is checked against a plain
forward and any mismatch or error falls back to one forward per variant (`stacked=False`).

Only rows `keep` selects are replaced (in `monoscope eval`: the store's row policy, so the BOS and
norm outliers keep their clean activation: the SAE never trained on them, and splicing an attention
sink measures the sink, not the dictionary). Losses are counted at positions t that `count` selects
(default: every position whose input token is not the BOS, whose prediction no splice can change):

    CE_v           = mean over counted t ≤ T-2 of −log p_v(token_{t+1} | ...)    v ∈ clean, spliced, zero (, error)
    CE recovered   = (CE_zero − CE_spliced) / (CE_zero − CE_clean)
    KL_v           = mean over counted t ≤ T-1 of Σ_vocab p_clean (log p_clean − log p_v)    (KL(clean ‖ v))
These are SAELens's definitions (`benchmarks/saelens_eval.py` states them; a peers test compares the
numbers on the same tokens with the same kept rows).
The `error` variant adds the SAE error term back (x̂ + (x − x̂) = x up to rounding): its CE must equal
the clean CE; a difference means the splice machinery, not the SAE, is wrong.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from monoscope.model.hooks import HookPoint, hooked_at
from monoscope.model.load import LoadedModel
from monoscope.sae import SAE

VARIANTS = ("clean", "spliced", "zero", "error")


@dataclass(frozen=True)
class LMMetrics:
    """LM losses on held-out text (module docstring for definitions)."""

    predictions: int
    """Next-token predictions counted in CE."""
    kl_positions: int
    """Positions counted in KL (the last position of each context too: it has no target)."""
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_recovered: float
    kl_spliced: float
    kl_zero: float
    ce_error: float | None
    """CE with the SAE error term added back (a check: equals ce_clean up to rounding)."""
    kl_error: float | None

    @property
    def ce_delta(self) -> float:
        """CE increase caused by the splice (nats per token)."""
        return self.ce_spliced - self.ce_clean

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ce_delta": self.ce_delta}


@dataclass
class SpliceBatch:
    """What one batch produced: the rows the SAE saw (for reconstruction metrics) and loss sums."""

    x: Tensor  # [N, d] raw activations at the replaced rows
    x_hat: Tensor  # [N, d] raw reconstruction
    active: Tensor  # [N, d_sae] bool
    positions: Tensor  # [N] token position of each row
    ce_sum: dict[str, float]
    kl_sum: dict[str, float]
    predictions: int
    kl_positions: int


class LMAccumulator:
    def __init__(self, variants: tuple[str, ...]) -> None:
        self.variants = variants
        self.ce = dict.fromkeys(variants, 0.0)
        self.kl = dict.fromkeys(variants, 0.0)
        self.n = 0
        self.n_kl = 0

    def add(self, b: SpliceBatch) -> None:
        for v in self.variants:
            self.ce[v] += b.ce_sum[v]
            self.kl[v] += b.kl_sum[v]
        self.n += b.predictions
        self.n_kl += b.kl_positions

    def result(self) -> LMMetrics:
        if self.n == 0:
            raise ValueError("no predictions were evaluated")
        ce = {v: s / self.n for v, s in self.ce.items()}
        kl = {v: s / max(self.n_kl, 1) for v, s in self.kl.items()}
        denom = ce["zero"] - ce["clean"]
        rec = (ce["zero"] - ce["spliced"]) / denom if denom != 0 else float("nan")
        return LMMetrics(self.n, self.n_kl, ce["clean"], ce["spliced"], ce["zero"], rec, kl["spliced"], kl["zero"],
                         ce.get("error"), kl.get("error"))


class Splicer:
    """Runs batches of token ids through `lm` with the SAE spliced in at `hp` (module docstring)."""

    def __init__(self, lm: LoadedModel, hp: HookPoint, sae: SAE, keep: Callable[[Tensor, Tensor], Tensor], *,
                 count: Callable[[Tensor], Tensor] | None = None, error_check: bool = True,
                 zero_all: bool = False, stacked: bool | None = None) -> None:
        """keep: (h [B, T, d], ids [B, T]) -> [B, T] bool rows to replace. count: ids -> [B, T] bool
        positions whose losses count (default: input token is not the BOS). zero_all: the zero-ablated
        copy zeroes every row (SAELens's convention) instead of the replaced rows (so that a zero SAE
        spliced in IS the zero ablation). stacked: None = decide on the first batch (checked against a
        plain forward)."""
        self.zero_all = zero_all
        self.lm, self.hp, self.sae, self.keep = lm, hp, sae, keep
        bos = lm.special_ids()[0]
        self.count = count if count is not None else (lambda ids: ids != bos)
        self._ids: Tensor | None = None
        self.variants = VARIANTS if error_check else VARIANTS[:3]
        self.stacked = stacked
        self.fallback: str | None = None
        """Why the stacked forward was given up (None: it was not, or never tried)."""
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ the hook
    def _variants(self, h: Tensor) -> list[Tensor]:
        """h [B, T, d] -> one tensor per variant; fills the cache with x, x̂, features, positions."""
        keep, x, feats, x_hat = self._reconstruct(h)
        self._cache.update(x=x, x_hat=x_hat, active=feats != 0,
                           positions=torch.nonzero(keep)[:, 1])
        out = [h]
        for v in self.variants[1:]:
            hv = h.clone()
            if v == "spliced":
                hv[keep] = x_hat.to(h.dtype)
            elif v == "zero":
                if self.zero_all:
                    hv.zero_()
                else:
                    hv[keep] = 0
            else:  # error term added back
                hv[keep] = (x_hat + (x - x_hat)).to(h.dtype)
            out.append(hv)
        return out

    def _reconstruct(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(rows replaced [B, T] bool, x [N, d], features, x̂ [N, d]) for the activation h at the hook."""
        assert self._ids is not None
        keep = self.keep(h, self._ids).to(h.device)
        x = h[keep].float()  # [N, d]
        feats = self.sae.encode_raw(x)
        return keep, x, feats, self.sae.decode_raw(feats)

    @contextlib.contextmanager
    def _hooked(self, pick: int | None) -> Iterator[None]:
        """pick None: replace h by the stack of all variants; else by variant `pick` alone."""

        def replace(h: Tensor) -> Tensor:  # (separate forwards recompute the same h, hence the same x̂)
            vs = self._variants(h)
            return torch.cat(vs) if pick is None else vs[pick]

        with hooked_at(self.lm, self.hp, replace):
            yield

    def _logits(self, ids: Tensor) -> Tensor:
        with self.lm.autocast():
            return self.lm.model(input_ids=ids, use_cache=False).logits

    @torch.inference_mode()
    def variant_logits(self, ids: Tensor, variant: str) -> Tensor:
        """Logits [B, T, V] of one forward with one variant at the hook (e.g. "spliced" alone)."""
        ids = ids.to(self.lm.device)
        self._ids = ids
        with self._hooked(self.variants.index(variant)):
            return self._logits(ids)

    # ------------------------------------------------------------------ one batch
    @torch.inference_mode()
    def run(self, ids: Tensor) -> SpliceBatch:
        """ids [B, T] int64 -> reconstruction rows and loss sums for every variant."""
        ids = ids.to(self.lm.device)
        B = ids.shape[0]
        self._cache.clear()
        self._ids = ids
        logits: list[Tensor] | None = None
        if self.stacked is not False:
            try:
                with self._hooked(None):
                    stacked = self._logits(ids)
                if stacked.shape[0] != B * len(self.variants):
                    raise RuntimeError("the model did not carry the stacked batch through")
                logits = list(stacked.split(B))
                if self.stacked is None:  # first batch: the clean copy must equal a plain forward
                    self.stacked = self._same_predictions(self._logits(ids), logits[0], ids)
                    if not self.stacked:
                        self.fallback = "the stacked forward's clean copy differs from a plain forward"
                        logits = None
            except (RuntimeError, MemoryError) as e:
                self.stacked, logits = False, None
                self._give_up_stacking(e, B)
        if logits is None:
            logits = []
            for i in range(len(self.variants)):
                with self._hooked(i):
                    logits.append(self._logits(ids))
        return self._losses(ids, logits)

    def _give_up_stacking(self, e: BaseException, batch: int) -> None:
        """Record why the stacked forward failed; out of memory is said on stderr (it is slower from here on,
        and the user can keep the fast path with smaller batches), never swallowed silently."""
        from monoscope.fatal import is_out_of_memory

        if not is_out_of_memory(e):
            self.fallback = f"the model cannot run the stacked batch ({str(e).splitlines()[0][:160]})"
            return
        self.fallback = f"out of memory with {len(self.variants)} variants x {batch} contexts stacked"
        if self.lm.device.type == "cuda":
            torch.cuda.empty_cache()
        from monoscope.progress import console

        console.print(f"warning: the stacked LM forward ({len(self.variants)} variants x {batch} contexts) ran out of "
                      "memory: evaluating each variant in its own forward from here on (same numbers, ~2x slower); "
                      f"lower --batch-contexts (now {batch}) to keep the stacked forward", markup=False,
                      highlight=False, soft_wrap=True)

    def _same_predictions(self, a: Tensor, b: Tensor, ids: Tensor) -> bool:
        """Do two forwards give the same next-token log-probabilities (mean |Δ| below the rounding
        of the compute dtype)? A broadcasting mistake in the stacked batch is off by whole nats."""
        target = ids[:, 1:].unsqueeze(-1)
        la, lb = (torch.log_softmax(x[:, :-1].float(), dim=-1).gather(-1, target) for x in (a, b))
        tol = 1e-4 if self.lm.compute_dtype == "fp32" else 2e-2
        return bool((la - lb).abs().mean() < tol)

    def _losses(self, ids: Tensor, logits: list[Tensor]) -> SpliceBatch:
        mask = self.count(ids).to(ids.device)  # [B, T] positions counted
        ce_mask = mask[:, :-1]
        target = ids[:, 1:].unsqueeze(-1)  # [B, T-1, 1]
        # log p_v = logits_v − lse_v, so CE and KL need only lse_v and two reductions per variant:
        # KL(clean ‖ v) = Σ p_c·lp_c − (Σ p_c·logits_v − lse_v); no [B, T, V] log-softmax per variant.
        clean = logits[0].float()
        clean_lse = torch.logsumexp(clean, dim=-1)  # [B, T]
        p_clean = torch.softmax(clean, dim=-1)
        neg_entropy = (p_clean * clean).sum(-1) - clean_lse  # Σ p_c·lp_c  [B, T]
        ce: dict[str, float] = {}
        kl: dict[str, float] = {}
        for v, lg in zip(self.variants, logits, strict=True):
            lg32 = clean if v == "clean" else lg.float()
            lse = clean_lse if v == "clean" else torch.logsumexp(lg32, dim=-1)
            nll = lse[:, :-1] - lg32[:, :-1].gather(-1, target).squeeze(-1)  # [B, T-1]
            ce[v] = float(nll[ce_mask].sum())
            if v == "clean":
                kl[v] = 0.0
            else:
                klv = neg_entropy - ((p_clean * lg32).sum(-1) - lse)  # [B, T]
                kl[v] = float(klv[mask].sum())
        c = self._cache
        return SpliceBatch(c["x"].cpu(), c["x_hat"].cpu(), c["active"].cpu(), c["positions"].cpu(), ce, kl,
                           int(ce_mask.sum()), int(mask.sum()))


class TranscoderSplicer(Splicer):
    """The splice of a transcoder: the activation at `hp` (its target, e.g. `mlp_out.L`) is replaced by the
    transcoder's output computed from the activation at `source` (its input, e.g. `mlp_in.L`) of the same
    forward; x (what the CE/KL compare against and FVU is measured on) is the target's clean activation. The
    rows replaced are chosen by `keep` on the input and target side by side, as the paired store's row policy
    measured them."""

    def __init__(self, lm: LoadedModel, hp: HookPoint, sae: SAE, keep: Callable[[Tensor, Tensor], Tensor], *,
                 source: HookPoint, **kwargs: Any) -> None:
        super().__init__(lm, hp, sae, keep, **kwargs)
        self.source = source
        self._src: Tensor | None = None

    def _reconstruct(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert self._ids is not None and self._src is not None
        src = self._src[: h.shape[0]]
        keep = self.keep(torch.cat([src, h], -1), self._ids).to(h.device)
        feats = self.sae.encode_raw(src[keep].float())
        return keep, h[keep].float(), feats, self.sae.decode_raw(feats)

    @contextlib.contextmanager
    def _hooked(self, pick: int | None) -> Iterator[None]:
        def keep_src(value: Tensor) -> None:
            self._src = value

        try:
            with hooked_at(self.lm, self.source, keep_src), super()._hooked(pick):
                yield
        finally:
            self._src = None


class CrosscoderSplicer(Splicer):
    """The splice of an acausal crosscoder over hooks h_1..h_L (in forward order): each hook's activation is
    replaced by the crosscoder's reconstruction of that layer, all computed from the clean activations of every
    layer. The reconstruction of an early layer needs the later layers' clean activations, so a batch takes
    one clean forward (which captures them and gives the clean logits) and then one forward per variant with
    every hook replaced at once; there is no stacked forward. x and x̂ are the layers side by side
    ([N, L·d], as the store holds them); rows are chosen by `keep` on that row, as the store's row policy did."""

    def __init__(self, lm: LoadedModel, hps: list[HookPoint], sae: SAE, keep: Callable[[Tensor, Tensor], Tensor],
                 **kwargs: Any) -> None:
        super().__init__(lm, hps[-1], sae, keep, **{**kwargs, "stacked": False})
        self.hps = hps
        self.fallback = "a crosscoder is spliced with one forward per variant after a clean forward"

    @contextlib.contextmanager
    def _at_hooks(self, fn: Callable[[int, Tensor], Tensor | None]) -> Iterator[None]:
        """Hooks at every read hook point: `fn(layer, h)` sees the activation and may return its replacement."""
        with contextlib.ExitStack() as stack:
            for i, hp in enumerate(self.hps):
                stack.enter_context(hooked_at(self.lm, hp, functools.partial(fn, i)))
            yield

    def _clean_pass(self, ids: Tensor) -> Tensor:
        """Clean logits; fills the cache with the rows replaced, x, x̂, active features and positions."""
        acts: list[Tensor] = [torch.empty(0)] * len(self.hps)

        def grab(i: int, h: Tensor) -> None:
            acts[i] = h

        with self._at_hooks(grab):
            clean = self._logits(ids)
        h = torch.cat(acts, -1)  # [B, T, L·d]
        keep = self.keep(h, ids).to(h.device)
        x = h[keep].float()
        feats = self.sae.encode_raw(x)
        self._cache.update(keep=keep, x=x, x_hat=self.sae.decode_raw(feats), active=feats != 0,
                           positions=torch.nonzero(keep)[:, 1])
        return clean

    def _variant_pass(self, ids: Tensor, variant: str) -> Tensor:
        c = self._cache
        keep, x, x_hat = c["keep"], c["x"], c["x_hat"]
        w = x.shape[1] // len(self.hps)

        def put(i: int, h: Tensor) -> Tensor:
            hv = h.clone()
            if variant == "zero":
                if self.zero_all:
                    return hv.zero_()
                hv[keep] = 0
                return hv
            block = x_hat[:, i * w:(i + 1) * w]
            if variant == "error":  # the error term added back: the clean activation up to rounding
                block = block + (x[:, i * w:(i + 1) * w] - block)
            hv[keep] = block.to(h.dtype)
            return hv

        with self._at_hooks(put):
            return self._logits(ids)

    @torch.inference_mode()
    def variant_logits(self, ids: Tensor, variant: str) -> Tensor:
        ids = ids.to(self.lm.device)
        self._ids = ids
        clean = self._clean_pass(ids)
        return clean if variant == "clean" else self._variant_pass(ids, variant)

    @torch.inference_mode()
    def run(self, ids: Tensor) -> SpliceBatch:
        ids = ids.to(self.lm.device)
        self._cache.clear()
        self._ids = ids
        logits = [self._clean_pass(ids)]
        logits += [self._variant_pass(ids, v) for v in self.variants[1:]]
        return self._losses(ids, logits)
