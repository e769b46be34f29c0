"""Speed of the spliced LM evaluation against the plain model forward, on the same tokens.

    python benchmarks/eval_speed.py                 # -> benchmarks/results/eval_speed.json
    python benchmarks/eval_speed.py --contexts 32   # more tokens per measurement

On the default model (bf16 autocast, as `monoscope eval` runs it), `resid_post.15`, a 16x d_model
TopK SAE (k=32; random weights: speed does not depend on what the SAE learned), batches of 8
contexts of 128 tokens, all timed on the same token batches (best of --reps):
- plain forward:      the model's forward with logits (what a user's eval loop starts from);
- spliced forward:    the same forward with x̂ = SAE(x) spliced in at the hook (one variant,
                      `Splicer` with only the spliced copy): the issue's "spliced evaluation";
- monoscope eval:     `Splicer.run`: clean, spliced and zero-ablated copies (and the error-term
                      check) carried by one stacked forward, with CE and KL for each, per token
                      evaluated. Reported with and without the error-term check.
Each speed is reported as tokens/s and as a fraction of the plain forward's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import peak_rss_gb, write_result
from monoscope.corpus import open_corpus
from monoscope.corpus.contexts import batched_contexts
from monoscope.eval.splice import Splicer
from monoscope.model import load_model
from monoscope.sae import SAEConfig, build_sae
from monoscope.store.manifest import RowPolicy

HOOK = "resid_post.15"
CTX = 128


def best_time(fn, batches: list[torch.Tensor], reps: int) -> float:  # type: ignore[no-untyped-def]
    """Best over reps of the total time to run fn on every batch (after one warm-up batch)."""
    fn(batches[0])
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, default=32, help="contexts timed (x128 tokens)")
    ap.add_argument("--batch", type=int, default=8, help="contexts per forward")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    lm = load_model("default", device="cpu", compute_dtype="auto")
    hp = lm.hook(HOOK)
    ids = next(batched_contexts(lm, open_corpus("default"), CTX, args.contexts))
    batches = list(ids.split(args.batch))
    tokens = ids.numel()
    with torch.inference_mode():
        x = lm.acts(hp, ids[:8])[:, 1:].reshape(-1, lm.d_model)
    normaliser = float((lm.d_model / x.square().sum(1).mean()).sqrt())
    sae = build_sae(SAEConfig(arch="topk", d_in=lm.d_model, d_sae=16 * lm.d_model, k=32, normaliser=normaliser,
                              hook=HOOK), seed=0).eval()
    policy = RowPolicy(exclude_bos=True, outlier_factor=0.0)
    keep = lambda h, _ids: policy.keep(h)  # noqa: E731

    @torch.inference_mode()
    def plain(b: torch.Tensor) -> None:
        with lm.autocast():
            lm.model(input_ids=b, use_cache=False)

    spliced_only = Splicer(lm, hp, sae, keep, error_check=False, stacked=False)

    def spliced(b: torch.Tensor) -> None:  # the spliced copy alone: one forward with x̂ at the hook
        spliced_only.variant_logits(b, "spliced")

    full = Splicer(lm, hp, sae, keep, error_check=True)
    no_check = Splicer(lm, hp, sae, keep, error_check=False)
    full.run(batches[0])
    no_check.run(batches[0])
    results = {}
    for name, fn in [("plain_forward", plain), ("spliced_forward", spliced),
                     ("eval_clean_spliced_zero", no_check.run), ("eval_with_error_check", full.run)]:
        s = best_time(fn, batches, args.reps)
        results[name] = {"seconds": s, "tokens_per_s": tokens / s}
        print(f"{name:>26}: {tokens / s:8,.0f} tokens/s", flush=True)
    base = results["plain_forward"]["tokens_per_s"]
    for r in results.values():
        r["fraction_of_plain_forward"] = r["tokens_per_s"] / base
    payload = {
        "command": "python benchmarks/eval_speed.py " + " ".join(sys.argv[1:]),
        "config": {"model": lm.model_id, "hook": HOOK, "ctx_len": CTX, "contexts": args.contexts,
                   "batch_contexts": args.batch, "compute_dtype": lm.compute_dtype, "sae": "topk k=32, 16x d_model",
                   "stacked_variants": full.stacked, "reps": args.reps},
        "results": results,
        "target": "spliced forward >= 80% of the plain forward's tokens/s",
        "target_met": results["spliced_forward"]["fraction_of_plain_forward"] >= 0.8,
        "peak_rss_gb": peak_rss_gb(),
    }
    print(f"spliced forward at {results['spliced_forward']['fraction_of_plain_forward']:.0%} of the plain forward; "
          f"the whole eval (3 variants) at {results['eval_clean_spliced_zero']['fraction_of_plain_forward']:.0%}")
    print(write_result("eval_speed", payload))


if __name__ == "__main__":
    main()
