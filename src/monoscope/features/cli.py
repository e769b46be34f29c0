"""`monoscope features SAE_DIR [--corpus PATH] [--tokens N] [--also SAE_DIR ...]` (registered by monoscope.cli)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from monoscope.features.build import FeaturesResult, build_features


def add_features_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "features", help="one pass over a corpus -> every feature's statistics, examples, logit effects, neighbours",
        description="Run the corpus through the model to the SAE's hook and build its feature database "
        "(features/features.db beside the SAE): density, activation histogram, top and quantile-sampled "
        "examples, logit effects, nearest neighbours, co-occurrence, a cheap label; with --also, the same "
        "for other SAEs on the same hook (one forward pass) and the feature families between them; a feature map.")
    p.add_argument("sae", help="SAE folder (monoscope, SAELens or sparsify)")
    p.add_argument("--also", nargs="*", default=[], help="more SAE folders on the same hook (e.g. other widths)")
    p.add_argument("--corpus", default=None, help="text to read (default: the SAE's training corpus, else 'default')")
    p.add_argument("--model", default=None, help="model (default: the one the SAE's training store records)")
    p.add_argument("--tokens", default="1M", help="tokens to read (default 1M)")
    p.add_argument("--batch-contexts", type=int, default=32)
    p.add_argument("--no-map", action="store_true", help="skip the feature map (UMAP)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild a complete database, also one built with other options (refused without this); "
                        "the old one stays until the new one is complete, and explanations and scores whose "
                        "evidence is unchanged are carried over")
    p.add_argument("--device", default="auto")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="model forward and SAE encode (auto: bf16 autocast where bf16 is fast, the SAE's own "
                   "setting for the encode)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_features)


def cmd_features(args: argparse.Namespace) -> int:
    from monoscope.features.show import default_db_path
    from monoscope.fileio import check_output_dir

    check_output_dir(default_db_path(args.sae).parent, "feature database folder")  # before the model loads
    from monoscope.train.distributed import launched_distributed

    run = build_features
    if launched_distributed():  # torchrun: the batches are split over the ranks, rank 0 writes
        from monoscope.features.build import build_features_distributed

        run = build_features_distributed
    res = run(args.sae, also=args.also, corpus=args.corpus, model=args.model, tokens=args.tokens,
                         batch_contexts=args.batch_contexts, feature_map=not args.no_map, device=args.device,
                         compute_dtype=args.compute_dtype, progress=not args.quiet, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print_features_summary(res)
    return 0


def print_features_summary(res: FeaturesResult) -> None:
    if res.new_tokens:
        print(f"read {res.new_tokens:,} tokens in {res.seconds:,.1f} s ({res.tokens_per_s:,.0f} tokens/s)")
    for note in res.notes:
        print(note)
    for db in res.dbs:
        print(f"feature database: {db}")
    if res.interesting:
        print("most interesting features (consistent peak tokens, density 1e-4..1e-2; see meta interest_criterion):")
        for it in res.interesting:
            print(f"  #{it.feature}  {it.label[:80]}  (density {it.density:.2e})")
            print(f"     monoscope show {it.sae_dir} {it.feature}")
