"""Reference harness: SAELens's own evals (`sae_lens.evals.run_evals`) on an SAE exported to SAELens,
on token batches we choose, so monoscope's `eval` stage can be checked against the library's numbers.

The issue asks that "the same SAE exported to SAELens and evaluated with SAELens's own evals on the same
tokens gives the same explained variance, CE loss and KL within a stated tolerance". This file runs the
SAELens side and states, in `definitions`, exactly how SAELens 6.54 computes each number (read from
`sae_lens/evals.py` and TransformerLens's `lm_cross_entropy_loss`, and re-derived in plain torch by
`tests/peers/test_saelens_eval_harness.py` to 1e-4): a comparison is only meaningful when monoscope
uses the same positions, splice rule and averaging.

The model: SAELens evals need a TransformerLens `HookedTransformer`. TransformerLens 3.9 does not know
SmolLM2 by name, so `hooked_transformer_from_hf` builds the config by hand from the HF `LlamaConfig`
(the fields TransformerLens's own `convert_hf_model_config` sets for `LlamaForCausalLM`) and converts
the weights with TransformerLens's `convert_llama_weights`. No folding or centring, so the residual
stream is HF's: `blocks.L.hook_resid_post` = HF `hidden_states[L + 1]` = monoscope `resid_post.L`.

Usage: python benchmarks/saelens_eval.py SAELENS_SAE_DIR [--store runs/bench/acts] [--contexts 8]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

#: what SAELens's `run_evals` returns, flattened to the names monoscope's eval uses
_NAMES: dict[str, tuple[str, str]] = {
    "explained_variance": ("reconstruction_quality", "explained_variance"),
    "explained_variance_legacy": ("reconstruction_quality", "explained_variance_legacy"),
    "mse": ("reconstruction_quality", "mse"),
    "cossim": ("reconstruction_quality", "cossim"),
    "l0": ("sparsity", "l0"),
    "l1": ("sparsity", "l1"),
    "l2_ratio": ("shrinkage", "l2_ratio"),
    "relative_reconstruction_bias": ("shrinkage", "relative_reconstruction_bias"),
    "ce_clean": ("model_performance_preservation", "ce_loss_without_sae"),
    "ce_spliced": ("model_performance_preservation", "ce_loss_with_sae"),
    "ce_zero": ("model_performance_preservation", "ce_loss_with_ablation"),
    "ce_loss_recovered": ("model_performance_preservation", "ce_loss_score"),
    "kl_spliced": ("model_behavior_preservation", "kl_div_with_sae"),
    "kl_zero": ("model_behavior_preservation", "kl_div_with_ablation"),
    "kl_div_score": ("model_behavior_preservation", "kl_div_score"),
}


def definitions(ignored: list[int], hook_name: str) -> dict[str, str]:
    """How SAELens 6.54 computes each returned number, for the token ids `ignored` it masks."""
    ign = f"token ids {sorted(ignored)}" if ignored else "no token ids"
    rows = (f"positions (context, t) whose INPUT token is not one of {ign}, pooled over all batches. run_evals's "
            "default exclude_special_tokens=True masks the tokenizer's bos/eos/pad/sep/decoder_start ids: for "
            "SmolLM2 BOS=1 <|im_start|> and eos=pad=2 <|im_end|>, NOT the document separator 0 <|endoftext|>")
    return {
        "positions": f"x = fp32 TransformerLens {hook_name} activation; 'kept rows' = {rows}. Tokens are fed "
                     "as given (no BOS prepended); all positions go through the model.",
        "explained_variance": "pooled R^2 over all kept rows of all batches: 1 - [sum ||x - x_hat||^2 / N] / "
                              "[sum ||x||^2 / N - ||sum x / N||^2] = 1 - sum||x - x_hat||^2 / sum||x - mean||^2 "
                              "with ONE global mean over kept rows (not per token, not per batch); sums "
                              "accumulated in float64 across batches (each batch's sum in fp32). "
                              "x_hat = sae.decode(sae.encode(x)) on the clean x (nothing spliced).",
        "fvu": "1 - explained_variance (derived here, not a SAELens output).",
        "explained_variance_legacy": "per-row 1 - ||x - x_hat||^2 / ||x - mean_batch||^2 (mean over the batch's "
                                     "kept rows), averaged over kept rows; SAELens calls it the old, incorrect "
                                     "formula.",
        "mse": "mean over kept rows of sum_d (x - x_hat)^2 (sum over dims, mean over rows).",
        "cossim": "mean over kept rows of cos(x, x_hat).",
        "l0": "mean over kept rows of #(feature activations != 0) (TopK: topk then ReLU, so <= k).",
        "l1": "mean over kept rows of sum |feature activations|.",
        "l2_ratio": "mean over kept rows of ||x_hat|| / ||x||.",
        "relative_reconstruction_bias": "per batch mean||x_hat||^2 / mean<x, x_hat>, then averaged over batches "
                                        "(one value per batch, unweighted).",
        "splice": "spliced run: the hook output is replaced by sae.decode(sae.encode(x)) ONLY at kept positions; "
                  "at ignored positions (BOS, <|im_end|>) the clean activation is kept. Zero-ablated run: the "
                  "hook output is zeroed at ALL positions, ignored ones (BOS) included.",
        "ce": "TransformerLens per-token loss: position t (t = 0..ctx_len-2) scores -log p(token[t+1] | "
              "logits[t]); the last position has no target and is never included. Position t is kept iff "
              "token[t] (the INPUT, not the target) is not ignored: the prediction made at BOS (of token 1) is "
              "dropped, a prediction OF an ignored token is kept. ce_clean / ce_spliced / ce_zero = mean over "
              "all kept (context, t) pairs of all batches (one global token mean, not a mean of batch means); "
              "natural log, nats per token.",
        "ce_loss_recovered": "SAELens ce_loss_score = (ce_zero - ce_spliced) / (ce_zero - ce_clean), from the "
                             "pooled means above.",
        "kl": "per position t: KL(clean || run) = sum_v p_clean(v) (log p_clean(v) - log p_run(v)) over the full "
              "vocabulary (F.kl_div(log_softmax(run), softmax(clean)).sum(-1)), fp32, natural log; ALL "
              "positions t = 0..ctx_len-1 including the last, kept iff token[t] is not ignored; kl_spliced / "
              "kl_zero = mean over kept positions of all batches.",
        "kl_div_score": "(kl_zero - kl_spliced) / kl_zero, from the pooled means.",
        "caveat": "SmolLM2 resid_post.15 rows at the separator <|endoftext|> (id 0) have norms > 10x the median "
                  "(attention sinks, like BOS): SAELens keeps them, and on 8 contexts x 128 tokens 2 such rows "
                  "held 95% of the total variance, so explained_variance is mostly about them. monoscope's "
                  "training row policy drops them; pass exclude_special_tokens=[0, 1, 2] for numbers without them.",
        "counts": "n_rows = kept rows for explained variance / L0 / mse / KL; n_ce = kept CE positions "
                  "(kept rows minus those at the last position).",
    }


def hooked_transformer_from_hf(hf_model: Any, tokenizer: Any, n_ctx: int = 2048) -> Any:
    """A TransformerLens HookedTransformer with exactly the HF Llama's weights and residual stream.

    Built by hand because TransformerLens resolves configs by hub name and does not list SmolLM2; the
    fields are the ones its `convert_hf_model_config` sets for `LlamaForCausalLM`. `n_ctx` only sizes
    the rotary tables and causal-mask buffers (n_ctx^2 bools per layer), so it is kept small.
    fold_ln / centring are off so that hook activations equal HF's hidden states.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    c = hf_model.config
    if next(hf_model.parameters()).dtype != torch.float32:
        raise ValueError("load the HF model in float32 (monoscope: compute_dtype='fp32')")
    if c.model_type != "llama":
        raise ValueError(f"only Llama-architecture models are supported here, got {c.model_type!r}")
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope scaling {rope} is not reproduced by this builder")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=head_dim, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=n_ctx, eps=c.rms_norm_eps, d_vocab=c.vocab_size, act_fn=c.hidden_act,
        n_key_value_heads=kv if kv != c.num_attention_heads else None, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=head_dim,
        rotary_base=rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)), final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", dtype=torch.float32, device=str(hf_model.device),
        default_prepend_bos=False,
    )
    with warnings.catch_warnings():  # HookedTransformer is deprecated in TL 3.x but is what SAELens evals take
        warnings.simplefilter("ignore", DeprecationWarning)
        tl = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
    tl.load_and_process_state_dict(convert_llama_weights(hf_model, cfg), fold_ln=False,
                                   center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    return tl.to(hf_model.device, print_details=False).eval()


def load_default_hooked_transformer(n_ctx: int = 2048, device: str = "cpu") -> tuple[Any, Any]:
    """(HookedTransformer, HF model) for monoscope's default model in fp32."""
    from monoscope.model.load import load_model

    lm = load_model("default", compute_dtype="fp32", device=device)
    return hooked_transformer_from_hf(lm.model, lm.tokenizer, n_ctx=n_ctx), lm.model


@torch.no_grad()
def tl_hf_agreement(tl: Any, hf_model: Any, tokens: torch.Tensor, layer: int = 15) -> dict[str, float]:
    """How far TL's `blocks.{layer}.hook_resid_post` and logits are from HF's (fp32, same tokens)."""
    tokens = tokens.to(hf_model.device)
    out = hf_model(tokens, output_hidden_states=True)
    name = f"blocks.{layer}.hook_resid_post"
    logits, cache = tl.run_with_cache(tokens, names_filter=[name])
    h, a = out.hidden_states[layer + 1].float(), cache[name].float()
    d = (h - a).abs()
    return {
        "resid_max_abs": d.max().item(),
        "resid_max_abs_excl_pos0": d[:, 1:].max().item(),
        "resid_max_abs_value": h.abs().max().item(),
        "resid_rel_frobenius": ((h - a).norm() / h.norm()).item(),
        "resid_max_row_rel": ((h - a).norm(dim=-1) / h.norm(dim=-1)).max().item(),
        "logits_max_abs": (out.logits.float() - logits).abs().max().item(),
        "logprobs_max_abs": (out.logits.float().log_softmax(-1) - logits.log_softmax(-1)).abs().max().item(),
    }


class _TokenBatches:
    """The four members of `sae_lens.ActivationsStore` that `run_evals` reads: our tokens, in order."""

    def __init__(self, tokens: torch.Tensor, batch_size: int) -> None:
        self.tokens, self.store_batch_size_prompts, self.context_size = tokens, batch_size, tokens.shape[1]
        self._next = 0

    def get_batch_tokens(self, batch_size: int | None = None) -> torch.Tensor:
        n = batch_size or self.store_batch_size_prompts
        if self._next >= len(self.tokens):
            raise RuntimeError("SAELens asked for more batches than the tokens hold")
        out = self.tokens[self._next:self._next + n]
        self._next += n
        return out

    def reset_input_dataset(self) -> None:
        self._next = 0


def _flatten(nested: dict[str, Any]) -> dict[str, float]:
    flat = {ours: float(nested[group][key]) for ours, (group, key) in _NAMES.items()}
    flat["fvu"] = 1.0 - flat["explained_variance"]
    return flat


def _run(sae: Any, tl: Any, tokens: torch.Tensor, batch_size: int, ignored: list[int]) -> dict[str, Any]:
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    n_batches = -(-len(tokens) // batch_size)
    cfg = EvalConfig(batch_size_prompts=batch_size, n_eval_reconstruction_batches=n_batches, compute_kl=True,
                     compute_ce_loss=True, n_eval_sparsity_variance_batches=n_batches, compute_l2_norms=True,
                     compute_sparsity_metrics=True, compute_variance_metrics=True)
    metrics, _ = run_evals(sae, _TokenBatches(tokens, batch_size), tl, ActivationScaler(), cfg,  # type: ignore[arg-type]
                           exclude_special_tokens=ignored if ignored else False)
    return metrics


def saelens_eval(
    saelens_sae_dir: str | Path,
    tokens: torch.Tensor,
    hook: str = "resid_post.15",
    batch_size: int = 8,
    *,
    model: Any = None,
    exclude_special_tokens: bool | list[int] = True,
    per_batch: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run SAELens's `run_evals` (KL, CE, variance, sparsity, L2) on `tokens` [n_ctx, ctx_len].

    model: a HookedTransformer from `hooked_transformer_from_hf` (built from the default model when
    None). exclude_special_tokens: SAELens's own argument (True = the tokenizer's bos/eos/pad/sep ids;
    False = keep every position; a list = those ids). per_batch: also run SAELens on each batch alone
    (doubles the time; SAELens itself only reports pooled numbers). Returns the flattened metrics,
    counts, `definitions` (how each is computed), `saelens_raw` (run_evals's nested dict) and timings.
    """
    from sae_lens import SAE
    from sae_lens.util import get_special_token_ids

    from monoscope.interop.common import hook_to_transformer_lens

    folder = Path(saelens_sae_dir)
    sae_cfg = json.loads((folder / "cfg.json").read_text())
    if sae_cfg.get("normalize_activations", "none") != "none":
        raise ValueError(f"{folder}: normalize_activations={sae_cfg['normalize_activations']!r}; this harness "
                         "passes no ActivationScaler, so it needs an SAE with the normaliser folded in ('none')")
    hook_name = hook_to_transformer_lens(hook)
    saved_hook = (sae_cfg.get("metadata") or {}).get("hook_name", sae_cfg.get("hook_name"))
    if saved_hook != hook_name:
        raise ValueError(f"{folder} was trained at {saved_hook!r}, not {hook_name!r} ({hook})")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_ctx, ctx_len], got {tuple(tokens.shape)}")
    tokens = tokens.long().to(device)
    if model is None:
        model, _ = load_default_hooked_transformer(n_ctx=tokens.shape[1], device=device)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"contexts of {tokens.shape[1]} tokens exceed the model's n_ctx {model.cfg.n_ctx}")
    sae = SAE.load_from_disk(str(folder), device=device, dtype="float32")
    if sae.cfg.d_in != model.cfg.d_model:
        raise ValueError(f"SAE d_in {sae.cfg.d_in} != model d_model {model.cfg.d_model}")

    if exclude_special_tokens is True:
        ignored = sorted(int(t) for t in get_special_token_ids(model.tokenizer))
    else:
        ignored = sorted(int(t) for t in exclude_special_tokens) if exclude_special_tokens else []
    kept = ~torch.isin(tokens, torch.tensor(ignored, dtype=tokens.dtype, device=tokens.device))

    t0 = time.perf_counter()
    raw = _run(sae, model, tokens, batch_size, ignored)
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = _flatten(raw)
    result |= {
        "n_contexts": tokens.shape[0], "ctx_len": tokens.shape[1], "batch_size": batch_size,
        "n_rows": int(kept.sum()), "n_ce": int(kept[:, :-1].sum()), "ignored_token_ids": ignored,
        "hook": hook, "hook_name": hook_name, "seconds": seconds, "seconds_per_context": seconds / tokens.shape[0],
        "versions": {"sae_lens": version("sae-lens"), "transformer_lens": version("transformer-lens"),
                     "torch": torch.__version__},
        "definitions": definitions(ignored, hook_name),
        "saelens_raw": raw,
    }
    if per_batch:
        result["per_batch"] = [
            _flatten(_run(sae, model, tokens[i:i + batch_size], batch_size, ignored))
            | {"n_rows": int(kept[i:i + batch_size].sum()), "n_ce": int(kept[i:i + batch_size, :-1].sum())}
            for i in range(0, len(tokens), batch_size)
        ]
    return result


def store_tokens(store: str | Path, n_contexts: int, ctx_len: int | None = None) -> torch.Tensor:
    """The first `n_contexts` contexts of a monoscope store (BOS at position 0), truncated to ctx_len."""
    from monoscope.store import ActivationStore

    out = []
    for tok, _ in ActivationStore.open(store).iter_contexts():
        out.append(tok[:ctx_len].long())
        if len(out) == n_contexts:
            break
    return torch.stack(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sae", help="SAELens SAE folder (e.g. from `monoscope convert SAE --to saelens`)")
    p.add_argument("--store", default="runs/bench/acts", help="monoscope store the tokens come from")
    p.add_argument("--contexts", type=int, default=8)
    p.add_argument("--ctx-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hook", default="resid_post.15")
    p.add_argument("--exclude", default="special",
                   help="positions SAELens masks: 'special' (its default), 'none', or token ids '0,1,2'")
    p.add_argument("--per-batch", action="store_true")
    p.add_argument("--check-hf", action="store_true", help="also report TL-vs-HF agreement on the first batch")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tokens = store_tokens(a.store, a.contexts, a.ctx_len)
    t0 = time.perf_counter()
    tl, hf = load_default_hooked_transformer(n_ctx=tokens.shape[1])
    build = time.perf_counter() - t0
    exclude: bool | list[int] = (a.exclude == "special" or ([] if a.exclude == "none" else
                                 [int(t) for t in a.exclude.split(",")]))
    res = saelens_eval(a.sae, tokens, a.hook, a.batch_size, model=tl, exclude_special_tokens=exclude,
                       per_batch=a.per_batch)
    res["seconds_model_build"] = build
    if a.check_hf:
        layer = int(a.hook.rsplit(".", 1)[1])
        res["tl_vs_hf"] = tl_hf_agreement(tl, hf, tokens[:a.batch_size], layer)
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
