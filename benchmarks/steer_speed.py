"""Steering and attribution speed on the default model (SmolLM2-135M, `resid_post.15`, 9,216-feature SAE).

    python benchmarks/steer_speed.py                        # -> benchmarks/results/steer_speed.json
    python benchmarks/steer_speed.py --sae runs/default/sae

Measures, on the same machine in one run:
- greedy generation of --new-tokens tokens (KV cache) plain and with a clamp edit at every position
  (`monoscope.steer.steer`), alternating runs, best of --repeats: tokens/s and the ratio (target >= 0.85);
- attribution of the log-prob of a token at the end of a 128-token prompt to every feature at every
  position (gradient x activation, one forward + backward), with and without the exact-ablation check
  of the top 10 features (target < 10 s).
Without a trained SAE (--sae missing), a random TopK SAE of the same shape is used: the cost of an edit
does not depend on the weights' values; the JSON says which. The machine is shared: the JSON records
the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result
from monoscope.model import load_model
from monoscope.sae import SAEConfig, build_sae
from monoscope.steer import Edit, steer
from monoscope.steer.attribute import attribute, parse_metric
from monoscope.steer.target import Target

TEXT = ("Sparse autoencoders decompose the activations of a language model into many features, each of which "
        "fires on a small fraction of tokens. To check that a feature means what its label says, we can clamp "
        "it to a large value during generation and read what the model writes, or we can ask which features "
        "at which positions made the model predict the next token. Both need the same machinery: an edit at "
        "the hook that keeps the reconstruction error, and gradients with respect to the feature activations. "
        "The numbers below come from one run of this script on the machine described in the JSON file.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sae", default="/work/main/runs/default/sae")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    lm = load_model("default")
    print(f"model loaded ({lm.compute_dtype})", file=sys.stderr, flush=True)
    if Path(args.sae, "cfg.json").is_file():
        from monoscope.interop import load_any

        sae, sae_desc = load_any(args.sae).eval(), str(args.sae)
    else:
        cfg = SAEConfig(arch="topk", d_in=lm.d_model, d_sae=16 * lm.d_model, k=32, hook="resid_post.15")
        sae, sae_desc = build_sae(cfg, seed=0).eval(), "random TopK of the default run's shape (no trained SAE found)"
    t = Target(lm, sae, lm.hook(sae.cfg.hook))
    prompt = t.encode("The best way to learn a new programming language is")
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, use_cache=True, temperature=None, top_k=None,
              top_p=None, min_new_tokens=args.new_tokens, pad_token_id=lm.tokenizer.eos_token_id,
              attention_mask=torch.ones_like(prompt))
    edits = [Edit(7, "clamp", 10.0)]

    def gen(steered: bool) -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), lm.autocast():
            if steered:
                with steer(lm, sae, edits, prompt_len=prompt.shape[1]):
                    lm.model.generate(prompt, **kw)
            else:
                lm.model.generate(prompt, **kw)
        return args.new_tokens / (time.perf_counter() - t0)

    gen(False), gen(True)  # warm-up
    plain, steered = [], []
    for i in range(args.repeats):
        plain.append(gen(False))
        steered.append(gen(True))
        print(f"repeat {i + 1}: plain {plain[-1]:.1f} tok/s, steered {steered[-1]:.1f} tok/s", file=sys.stderr,
              flush=True)
    ids128 = lm.tokenizer(TEXT * 3, add_special_tokens=False).input_ids[:127]
    text128 = lm.tokenizer.decode(ids128)
    metric = parse_metric(lm.tokenizer, " the", None)
    attribute(t, "warm up", metric, verify=0)
    t0 = time.perf_counter()
    res = attribute(t, text128, metric, verify=0)
    attr_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res_v = attribute(t, text128, metric, verify=10)
    attr_v_s = time.perf_counter() - t0
    out = {
        "sae": sae_desc, "d_sae": sae.cfg.d_sae, "hook": str(t.hook), "compute_dtype": lm.compute_dtype,
        "torch_threads": torch.get_num_threads(), "load_average_before": load0, "load_average_after": os.getloadavg(),
        "generation": {"new_tokens": args.new_tokens, "repeats": args.repeats, "edit": "clamp feature 7 to 10, all "
                       "positions", "plain_tokens_per_s": plain, "steered_tokens_per_s": steered,
                       "ratio_best": max(steered) / max(plain), "target_ratio": 0.85},
        "attribution": {"prompt_tokens": len(res.tokens), "features": sae.cfg.d_sae, "seconds": attr_s,
                        "seconds_with_ablation_check_of_10": attr_v_s, "correlation": res_v.correlation,
                        "target_seconds": 10.0},
    }
    path = write_result("steer_speed", out)
    ratio = out['generation']['ratio_best']
    print(f"plain {max(plain):.1f} tok/s, steered {max(steered):.1f} tok/s (ratio {ratio:.2f});"
          f" attribution of {len(res.tokens)} tokens x {sae.cfg.d_sae} features: {attr_s:.2f} s "
          f"({attr_v_s:.2f} s with 10 ablations) -> {path}")


if __name__ == "__main__":
    main()
