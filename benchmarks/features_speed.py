"""The features pass against a capture of the same tokens, on the default model, in one run.

    python benchmarks/features_speed.py                    # 1M tokens -> benchmarks/results/features_speed.json
    python benchmarks/features_speed.py --tokens 200k      # a quick look

Both read the same tokens of the default corpus through SmolLM2-135M-Instruct to `resid_post.15` with the
same compute dtype (bf16 autocast): `monoscope capture` (tokenise, forward, checksummed bf16 shards) and
`monoscope features` with a 16 x d_model TopK SAE (k=32; weights from a short training on the captured
store, so activations are realistic). Reported: each one's wall time and tokens/s, the features pass
split into its streaming part (forward + encode + statistics + codes, with checkpoints) and its
finalisation (examples, logit effects, neighbours, labels, database; UMAP map excluded, timed
separately), the ratio to the capture time (issue target: the pass <= 1.3x the capture), peak RSS and the
database size.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import peak_rss_gb, write_result
from monoscope.capture import capture
from monoscope.features.build import build_features
from monoscope.train import train
from monoscope.units import parse_count

HOOK = "resid_post.15"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1M")
    ap.add_argument("--keep", default=None, help="folder to keep the run in (default: a temporary one)")
    args = ap.parse_args()
    n = parse_count(args.tokens)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="monoscope-fbench-"))
    try:
        t0 = time.perf_counter()
        cap = capture(root / "acts", model="default", corpus="default", hook=HOOK, tokens=n, progress=False)
        t_capture = time.perf_counter() - t0
        print(f"capture: {n:,} tokens in {t_capture:.1f} s ({n / t_capture:,.0f} tok/s)", flush=True)
        train(root / "sae", store=root / "acts", arch="topk", k=32, width="16x", tokens=min(n, 500_000),
              progress=False)
        t0 = time.perf_counter()
        res = build_features(root / "sae", tokens=n, feature_map=False, progress=False)
        t_features = time.perf_counter() - t0
        db = res.dbs[0]
        print(f"features: {t_features:.1f} s total, streaming {res.seconds:.1f} s", flush=True)
        from monoscope.features import layout
        from monoscope.sae import load_sae

        t0 = time.perf_counter()
        layout.feature_map(load_sae(root / "sae").W_dec.detach().float())
        t_map = time.perf_counter() - t0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    stream_s = res.stream_seconds
    payload = {
        "command": "python benchmarks/features_speed.py " + " ".join(sys.argv[1:]),
        "config": {"model": "default (SmolLM2-135M-Instruct GGUF)", "hook": HOOK, "tokens": n, "sae": "topk k=32 16x",
                   "compute_dtype": cap.manifest.capture["compute_dtype"]},
        "capture": {"seconds": t_capture, "tokens_per_s": n / t_capture},
        "features": {"seconds_total": t_features, "seconds_streaming": stream_s,
                     "seconds_finalise": t_features - stream_s, "tokens_per_s_streaming": n / stream_s,
                     "ratio_to_capture_total": t_features / t_capture,
                     "ratio_to_capture_streaming": stream_s / t_capture},
        "feature_map_seconds": t_map,
        "target": "features pass <= 1.3 x capture time of the same tokens",
        "target_met_total": t_features / t_capture <= 1.3,
        "peak_rss_gb": peak_rss_gb(),
    }
    print(f"ratio to capture: total {t_features / t_capture:.2f}x, streaming part {stream_s / t_capture:.2f}x; "
          f"map {t_map:.1f} s; database {db}")
    print(write_result("features_speed", payload))


if __name__ == "__main__":
    main()
