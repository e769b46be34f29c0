"""Capture speed on the default model against a plain transformers forward, measured in one run.

    python benchmarks/capture.py                 # -> benchmarks/results/capture.json
    python benchmarks/capture.py --contexts 64   # more tokens per measurement

Measures, on the same tokens (default corpus, context 128, `resid_post.15`):
- the baseline a user would write: the whole model with `output_hidden_states=True`, fp32;
- monoscope's forward to the hook (stops after block 15), in fp32 and in bf16 autocast, with the
  activations compared to the baseline's `hidden_states[16]`;
- the forward's FLOPs per token and the fraction of this machine's measured matmul peak it reaches;
- the end-to-end `monoscope capture` (tokenise + forward + checksummed shards) for two store sizes in
  child processes, with their peak RSS, to show memory does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import matmul_tflops, peak_rss_gb, write_result
from monoscope.corpus import open_corpus
from monoscope.corpus.contexts import batched_contexts
from monoscope.model import load_model
from monoscope.model.hooks import run_to_hook

HOOK = "resid_post.15"
CTX = 128


def forward_flops_per_token(lm, layers: int, ctx: int) -> float:  # type: ignore[no-untyped-def]
    """2·(weights touched) for the blocks run, plus attention scores and mixing (causal: ctx/2 keys)."""
    blocks = lm.layout.blocks[:layers]
    weights = sum(p.numel() for b in blocks for p in b.parameters() if p.dim() == 2)
    cfg = lm.model.config
    attn = 2 * 2 * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads) * (ctx / 2) * layers
    return 2 * weights + attn


def timed(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up (oneDNN picks kernels on first call)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def child_capture(tokens: int) -> dict[str, float]:
    """Run `monoscope capture` in a fresh process; its wall time and peak RSS (from the child)."""
    with tempfile.TemporaryDirectory() as tmp:
        code = (
            "import resource, time, json; from monoscope.capture import capture; t=time.perf_counter();"
            f"r=capture({tmp!r}+'/s', tokens={tokens}, hook={HOOK!r}, progress=False);"
            "print(json.dumps({'seconds': time.perf_counter()-t, 'capture_s': r.seconds,"
            "'tokens': r.manifest.n_tokens, 'tokens_per_s': r.tokens_per_s,"
            "'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20}))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, default=32, help="contexts per timed forward (x128 tokens)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--store-tokens", default="100000,400000", help="store sizes for the end-to-end runs")
    args = ap.parse_args()

    lm = load_model("default", device="cpu", compute_dtype="fp32")
    hp = lm.hook(HOOK)
    ids = next(batched_contexts(lm, open_corpus("default"), CTX, args.contexts))
    n_tok = ids.numel()

    def baseline() -> torch.Tensor:
        with torch.inference_mode():
            return lm.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[hp.layer + 1]

    def ours(dtype: str) -> torch.Tensor:
        lm.compute_dtype = dtype  # type: ignore[assignment]
        return lm.acts(hp, ids)

    t_base = timed(baseline, args.reps)
    want = baseline()
    res: dict[str, dict[str, float]] = {}
    flops_tok = forward_flops_per_token(lm, hp.layer + 1, CTX)
    unembed = 2 * lm.model.get_output_embeddings().weight.numel()
    base_flops = forward_flops_per_token(lm, lm.n_layers, CTX) + unembed
    peaks = {"fp32": matmul_tflops(4096, 576, 1536, torch.float32),
             "bf16": matmul_tflops(4096, 576, 1536, torch.bfloat16)}
    for dtype in ("fp32", "bf16"):
        t = timed(lambda dtype=dtype: ours(dtype), args.reps)
        got = ours(dtype)
        rel = ((got - want).norm(dim=-1) / want.norm(dim=-1))[:, 1:]
        tps = n_tok / t
        res[dtype] = {
            "tokens_per_s": tps,
            "speedup_vs_baseline": t_base / t,
            "max_abs_diff": float((got - want).abs().max()),
            "rel_err_mean": float(rel.mean()),
            "rel_err_max": float(rel.max()),
            "tflops": flops_tok * tps / 1e12,
            "fraction_of_matmul_peak": flops_tok * tps / 1e12 / peaks[dtype],
        }
    # the raw forward, no hook machinery, as a sanity check on the hook overhead
    with torch.inference_mode():
        t_trunc = timed(lambda: run_to_hook(lm.model, lm.layout, hp, ids), args.reps)

    e2e = {str(n): child_capture(int(n)) for n in args.store_tokens.split(",")}
    payload = {
        "config": {"model": lm.model_id, "hook": HOOK, "ctx_len": CTX, "tokens_per_forward": n_tok,
                   "reps": args.reps, "corpus": "default"},
        "matmul_peak_tflops": {"shape": "4096x576 @ 576x1536", **peaks},
        "forward_flops_per_token": flops_tok,
        "baseline_full_forward_fp32": {"tokens_per_s": n_tok / t_base, "flops_per_token": base_flops,
                                       "tflops": base_flops * (n_tok / t_base) / 1e12},
        "to_hook_fp32_no_wrapper_tokens_per_s": n_tok / t_trunc,
        "monoscope_to_hook": res,
        "end_to_end_capture": e2e,
        "peak_rss_gb_this_process": peak_rss_gb(),
        "target": "capture >= 2x baseline tokens/s, activations equal within dtype tolerance, peak RSS < 3 GB",
    }
    path = write_result("capture", payload)
    print(json.dumps({k: payload[k] for k in ("monoscope_to_hook", "baseline_full_forward_fp32",
                                              "end_to_end_capture")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
