"""End-to-end training: the SAE's loss measured through the model (`--loss e2e-kl` or `e2e-ce`).

    monoscope train --model HuggingFaceTB/SmolLM2-135M --corpus my.jsonl --hook resid_post.15 \\
        --arch topk --k 32 --tokens 10M --batch-size 4096 --loss e2e-kl --out runs/x/sae-e2e

Reconstruction MSE rewards what is large in the residual stream, not what the model uses; training
through the model makes the dictionary keep what changes the next-token distribution (Braun et al.
2024, "Identifying Functionally Important Features with End-to-End Sparse Dictionary Learning";
sparsify's `loss_fn="kl"`/`"ce"`). One step, on `batch_size / ctx_len` whole contexts of the corpus
(in corpus order, `batched_contexts`, the same contexts every stage uses):

  1. clean forward (no grad): the activation h [n, T, d] at the hook and the clean logits;
  2. x = c·h at the spliced positions (every position whose token is not the BOS: the attention sink
     keeps its clean activation, as in `monoscope eval`), out = sae(x, λ, dead mask);
  3. spliced forward: the same contexts with h replaced by x̂/c at those positions; the model's
     parameters are frozen (requires_grad off), so the gradient reaches the SAE only;
  4. e2e-kl: mean over positions t whose input token is not the BOS of KL(p_clean ‖ p_spliced)
     (`monoscope eval`'s kl_spliced; sparsify minimises −Σ p_clean log p_spliced, the same up to a
     constant); e2e-ce: the next-token cross-entropy of the spliced model at those positions
     (t ≤ T − 2; eval's ce_spliced).
  5. loss = e2e term + the architecture's sparsity term + its aux term (AuxK, gated's aux): the MSE
     is logged (`mse`, `fvu`) but not optimised; the log's `e2e` is the e2e term alone.
Everything after (parallel-gradient removal, clipping, Adam, decoder norms, dead features,
resampling, checkpoints) is the ordinary `Trainer`'s, so exact resume holds: the data cursor is
the number of batches taken, and a resumed run re-tokenises up to it (no model forward).
The input normaliser c is measured on the first batch (kept in the cursor state, like a stream's).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from monoscope.errors import MonoscopeError
from monoscope.model.hooks import HookPoint, _first_tensor, _module_for, capture_at
from monoscope.model.load import LoadedModel
from monoscope.sae.base import ForwardOutput
from monoscope.train.trainer import Trainer

E2E_LOSSES = ("e2e-kl", "e2e-ce")


class ContextBatch(NamedTuple):
    """A batch of whole contexts; `acts`/`rows` as in `store.batches.Batch` (the spliced rows)."""

    acts: Tensor  # [N, d] float32 raw activations at the spliced positions
    rows: Tensor  # [N] int64 corpus token ids of those rows (context · ctx_len + position)
    ids: Tensor  # [n, T] int64 token ids
    keep: Tensor  # [n, T] bool: the spliced positions
    clean_logits: Tensor  # [n, T, V] float32


class ContextBatches:
    """`batch_size / ctx_len` contexts of the corpus per batch, in corpus order, each run through the
    clean model once (module docstring); a `BatchSource` whose cursor is the number of batches taken."""

    def __init__(self, lm: LoadedModel, corpus: Any, hook: HookPoint, batch_size: int, ctx_len: int) -> None:
        if batch_size % ctx_len:
            raise MonoscopeError(f"--batch-size {batch_size} is not a whole number of {ctx_len}-token contexts, which "
                                 f"end-to-end training splices: use a multiple of --ctx-len {ctx_len}, e.g. "
                                 f"{max(1, batch_size // ctx_len) * ctx_len}")
        self.lm, self.corpus, self.hook = lm, corpus, hook
        self.ctx_len = ctx_len
        self.n_ctx = batch_size // ctx_len
        self.taken = 0
        self.normaliser: float | None = None
        self._ids: Iterator[Tensor] | None = None
        self.bos = lm.special_ids()[0]

    @property
    def d_model(self) -> int:
        return self.lm.d_model

    def __iter__(self) -> ContextBatches:
        return self

    def __next__(self) -> ContextBatch:
        from monoscope.corpus.contexts import batched_contexts

        if self._ids is None:
            self._ids = batched_contexts(self.lm, self.corpus, self.ctx_len, self.n_ctx, skip=self.taken * self.n_ctx)
        ids = next(self._ids)
        if ids.shape[0] < self.n_ctx:  # the corpus's last, short batch: the data has ended
            raise StopIteration
        first = self.taken * self.n_ctx
        self.taken += 1
        ids = ids.to(self.lm.device)
        h, logits = clean_forward(self.lm, self.hook, ids)
        keep = ids != self.bos  # [n, T]
        acts = h[keep]  # [N, d]
        if self.normaliser is None:
            self.normaliser = math.sqrt(self.lm.d_model / float(acts.double().pow(2).sum(-1).mean()))
        pos = torch.arange(ids.numel(), device=ids.device).view_as(ids)[keep]
        return ContextBatch(acts, (first * self.ctx_len + pos).cpu(), ids, keep, logits)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_taken": self.taken, "normaliser": self.normaliser}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.taken = int(state["batches_taken"])
        self.normaliser = state["normaliser"]
        self._ids = None


@torch.no_grad()
def clean_forward(lm: LoadedModel, hp: HookPoint, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(h [n, T, d] float32 at `hp`, logits [n, T, V] float32) of one plain forward."""
    with capture_at(lm.layout, hp, stop=False) as box, lm.autocast():
        logits = lm.model(input_ids=ids, use_cache=False).logits
    return box["acts"].float(), logits.float()


def spliced_logits(lm: LoadedModel, hp: HookPoint, ids: Tensor, keep: Tensor, x_hat: Tensor) -> Tensor:
    """Logits [n, T, V] float32 of a forward with the activation at `hp` replaced by `x_hat` [N, d] (raw
    scale) at the `keep` positions; differentiable in `x_hat`."""
    module, pre = _module_for(lm.layout, hp)

    def splice(h: Tensor) -> Tensor:
        out = h.clone()
        out[keep] = x_hat.to(h.dtype)
        return out

    def post_hook(_m: torch.nn.Module, _args: Any, out: Any) -> Any:
        new = splice(_first_tensor(out))
        return new if isinstance(out, torch.Tensor) else (new, *out[1:])

    def pre_hook(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (splice(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": splice(kwargs["hidden_states"])}

    handle = (module.register_forward_pre_hook(pre_hook, with_kwargs=True) if pre
              else module.register_forward_hook(post_hook))
    try:
        with lm.autocast():
            return lm.model(input_ids=ids, use_cache=False).logits.float()  # type: ignore[no-any-return]
    finally:
        handle.remove()


def e2e_term(loss: str, logits: Tensor, batch: ContextBatch) -> Tensor:
    """KL(p_clean ‖ p_spliced) or the spliced CE, averaged over positions whose input is not the BOS."""
    count = batch.keep
    if loss == "e2e-kl":
        lp = logits.log_softmax(-1)
        clean_lp = batch.clean_logits.log_softmax(-1)
        kl = (clean_lp.exp() * (clean_lp - lp)).sum(-1)  # [n, T]
        return kl[count].mean()
    pred = count[:, :-1]  # predictions of token t+1 from inputs that are not the BOS
    return F.cross_entropy(logits[:, :-1][pred], batch.ids[:, 1:][pred])


class E2ETrainer(Trainer):
    """`Trainer` whose loss is measured through the model (module docstring); its source is a
    `ContextBatches` (possibly behind `Peeked`)."""

    graphable = False  # its loss runs the model: not captured as a CUDA graph (`graph_step`)

    def __init__(self, *args: Any, lm: LoadedModel, hook: HookPoint, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.cfg.loss not in E2E_LOSSES:
            raise MonoscopeError(f"E2ETrainer needs --loss {' or '.join(E2E_LOSSES)}, not {self.cfg.loss}")
        self.lm, self.hook = lm, hook
        lm.model.requires_grad_(False)  # the gradient reaches the SAE only

    def _loss(self, batch: Any, x: Tensor, out: ForwardOutput) -> Tensor:
        x_hat = out.x_hat / self.sae.cfg.normaliser  # [N, d] raw scale
        logits = spliced_logits(self.lm, self.hook, batch.ids, batch.keep, x_hat.to(self.lm.device))
        return e2e_term(self.cfg.loss, logits, batch).to(self.device) + out.sparsity + out.aux

    def flush_metrics(self, seconds: float | None = None) -> dict[str, Any]:
        """The log record plus `e2e`, the end-to-end term alone (loss − sparsity − aux)."""
        rec = super().flush_metrics(seconds)
        parts = (rec["loss"], rec["sparsity"], rec["aux"])
        rec["e2e"] = None if None in parts else parts[0] - parts[1] - parts[2]
        return rec
