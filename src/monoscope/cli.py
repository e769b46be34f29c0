"""The `monoscope` command: a thin layer over the Python API, one subcommand per stage.

Every command checks its inputs before heavy work, prints a one-line error (no traceback) for any
problem the user can fix, and ends by saying where its output is and what to run next.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from monoscope import __version__
from monoscope.errors import MonoscopeError

DEFAULT_RUN = Path("runs/default")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="Hugging Face id, local folder, .gguf file, or 'default' (SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="forward precision: auto = bf16 autocast where fast (AMX/AVX512-BF16 CPU, CUDA), else fp32")


def _add_capture_args(p: argparse.ArgumentParser, *, tokens_default: str | None) -> None:
    _add_model_args(p)
    p.add_argument("--corpus", default="default",
                   help="'default' (offline mix of prose, code, 100+ languages), .txt, .jsonl, .parquet, "
                        "or a local Hugging Face dataset folder")
    p.add_argument("--text-field", default="text", help="text field of .jsonl / column of .parquet (default: text)")
    p.add_argument("--strict-utf8", action="store_true", help="reject non-UTF-8 bytes instead of replacing them")
    p.add_argument("--hook", default=None,
                   help="hook point, e.g. resid_post.15 (default: resid_post at the middle layer)"
                        + ("; several, comma-separated (mlp_in.6,mlp_out.6), are stored side by side from one "
                           "forward" if tokens_default is None else ""))
    p.add_argument("--tokens", default=tokens_default, required=tokens_default is None,
                   help="tokens to capture: 500000, 500k, 2M")
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per context, BOS included (default 128)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="storage dtype")
    p.add_argument("--batch-contexts", type=int, default=32, help="contexts per forward pass (default 32)")
    p.add_argument("--contexts-per-shard", type=int, default=128, help="contexts per shard file (default 128)")
    p.add_argument("--keep-bos", action="store_true", help="let training see position 0 (the BOS) too")
    p.add_argument("--outlier-factor", type=float, default=10.0,
                   help="exclude rows with norm > this x the median from training (0: keep all; default 10)")
    p.add_argument("--overwrite", action="store_true", help="replace a different store already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def _capture(args: argparse.Namespace, out: Path) -> None:
    from monoscope.capture import capture
    from monoscope.report import print_store_summary
    from monoscope.train.distributed import launched_distributed

    if launched_distributed():  # torchrun: each rank captures its own shards of the same store
        from monoscope.capture_dist import capture_distributed

        capture = capture_distributed  # type: ignore[assignment]
    res = capture(out, model=args.model, corpus=args.corpus, hook=args.hook, tokens=args.tokens,
                  ctx_len=args.ctx_len, dtype=args.dtype, batch_contexts=args.batch_contexts,
                  contexts_per_shard=args.contexts_per_shard, exclude_bos=not args.keep_bos,
                  outlier_factor=args.outlier_factor, device=args.device, compute_dtype=args.compute_dtype,
                  text_field=args.text_field, strict_utf8=args.strict_utf8, overwrite=args.overwrite,
                  trust_sizes=getattr(args, "trust_sizes", False), progress=not args.quiet)
    if res is not None:  # None on the ranks other than 0 of a distributed capture
        print_store_summary(res)


def cmd_capture(args: argparse.Namespace) -> int:
    from monoscope.fileio import check_output_dir

    check_output_dir(args.out)  # before the model loads
    _capture(args, Path(args.out))
    if os.environ.get("RANK", "0") == "0":  # one line per launch, also under torchrun
        print(f"next: monoscope verify {args.out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from monoscope.store import ActivationStore

    store = ActivationStore.open(args.store)
    problems = store.verify()
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    n = len(store.manifest.shards)
    if problems:
        print(f"{len(problems)} problem(s) in {args.store} ({n} shards in its manifest): run the same monoscope "
              "capture command again; it checks every shard and recaptures exactly the damaged or missing ones",
              file=sys.stderr)
        return 1
    print(f"OK {n} shards, {store.manifest.n_contexts:,} contexts, {store.n_rows:,} training rows: "
          f"every size and digest ({'sha256 and xxh3' if all(s.xxh3 for s in store.manifest.shards) else 'sha256'})"
          f" matches {Path(args.store) / 'manifest.json'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`monoscope run`: the options map one to one onto `monoscope.pipeline.RunConfig` fields."""
    from monoscope.pipeline import RunConfig, config_fields, run

    settings = {name: getattr(args, name) for name in config_fields() if hasattr(args, name)}
    cfg = RunConfig(**settings, feature_map=not args.no_map, audit=not args.no_audit, progress=not args.quiet)
    res = run(cfg, command=" ".join(sys.argv))
    f = res.folder
    print(f"\nresults: activations {f.acts}  SAEs {f.sae}, {f.small_sae}  evaluation {f.eval} "
          f"(metrics.json, plots)  features {f.features_db}"
          + (" (with LLM explanations and scores)" if res.explained else "")
          + (f"  audit {f.audit / 'report.html'}" if res.audit is not None else ""))
    print(f"next: monoscope show {f.sae} FEATURE   |   monoscope convert {f.sae} --to saelens "
          f"--out {f.root / 'sae-saelens'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monoscope", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"monoscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the main job on the embedded default: capture, train, eval, features, explain")
    p.add_argument("--out", default=str(DEFAULT_RUN), help=f"run folder (default {DEFAULT_RUN})")
    _add_capture_args(p, tokens_default="1M")
    p.add_argument("--arch", default="topk",
                   choices=["relu-l1", "topk", "batchtopk", "jumprelu", "matryoshka", "gated"])
    p.add_argument("--k", type=int, default=32, help="active features per token (topk, batchtopk)")
    p.add_argument("--width", default="16x", help="features: a count or a multiple of d_model (default 16x)")
    p.add_argument("--train-tokens", default="2M", help="training tokens (several passes over a small store)")
    p.add_argument("--train-batch-size", type=int, default=4096,
                   help="activation rows per optimiser step of each SAE (default 4096)")
    p.add_argument("--small-width", default="4x", help="width of the second SAE, for feature splitting (default 4x)")
    p.add_argument("--eval-tokens", default="50k", help="store rows and held-out tokens to evaluate on (default 50k)")
    p.add_argument("--features-tokens", default="500k", help="tokens read for the feature database (default 500k)")
    p.add_argument("--no-map", action="store_true", help="skip the feature map (UMAP) in the features stage")
    p.add_argument("--explain-features", type=int, default=2,
                   help="features the last stage explains with an LLM (default 2; 0 skips the stage)")
    p.add_argument("--explain-llm", default="local:small",
                   help="LLM for the explain stage: local:small (default: the strongest installed local model up to "
                        "Qwen2.5-Coder-0.5B, see `monoscope models list`), local:default (the strongest, slower), "
                        "local:PATH.gguf, or openai:MODEL with --explain-endpoint")
    p.add_argument("--explain-endpoint", default=None, help="OpenAI-compatible server for --explain-llm openai:MODEL")
    p.add_argument("--explain-scorers", default="embedding,detection",
                   help="scorers for the explain stage (default embedding,detection: bounded time on CPU)")
    p.add_argument("--no-audit", action="store_true",
                   help="skip the last stage: the concept audit of the main SAE (OUT/audit/report.html)")
    p.add_argument("--audit-packs", default="all", help="concept packs the audit reads: all (default) or names, "
                   "comma-separated")
    p.add_argument("--audit-steer-top", type=int, default=0,
                   help="candidates per pack whose steering effect the audit measures (default 0: skipped, "
                        "CPU-expensive)")
    p.add_argument("--audit-attribution-texts", type=int, default=8,
                   help="positives (and as many negatives) per pack the audit's attribution route reads (default 8; "
                        "0 skips the route)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("capture", help="run a corpus through a model and store activations at a hook point")
    p.add_argument("--out", required=True, help="store folder (created; an unfinished capture there resumes)")
    _add_capture_args(p, tokens_default=None)
    p.add_argument("--trust-sizes", action="store_true",
                   help="when rerun on an existing store, check shard sizes only, not their sha256 (faster)")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("verify", help="check every shard of an activation store against its manifest")
    p.add_argument("store", help="store folder")
    p.set_defaults(func=cmd_verify)

    from monoscope.eval.cli import add_eval_parser
    from monoscope.features.cli import add_features_parser
    from monoscope.features.show import add_show_parser
    from monoscope.interop.cli import add_convert_parser
    from monoscope.interop.push_cli import add_push_parser
    from monoscope.interp.cli import add_explain_parser
    from monoscope.interp.models_cli import add_models_parser
    from monoscope.scaling.cli import add_sweep_parser
    from monoscope.search.audit_cli import add_audit_parser
    from monoscope.search.cli import add_search_parser
    from monoscope.serve.cli import add_serve_parser
    from monoscope.steer.cli import add_attribute_parser, add_steer_eval_parser, add_steer_parser
    from monoscope.train.cli import add_train_parser

    add_train_parser(sub)
    add_eval_parser(sub)
    add_features_parser(sub)
    add_show_parser(sub)
    add_explain_parser(sub)
    add_models_parser(sub)
    add_convert_parser(sub)
    add_steer_parser(sub)
    add_attribute_parser(sub)
    add_steer_eval_parser(sub)
    add_search_parser(sub)
    add_audit_parser(sub)
    add_sweep_parser(sub)
    add_serve_parser(sub)
    add_push_parser(sub)
    return parser


DISTRIBUTED_COMMANDS = ("train", "capture", "features")
"""The commands that run on several processes under torchrun; the others refuse such a launch."""


def _check_launch(args: argparse.Namespace) -> None:
    """Refuse a torchrun launch of a one-process command (each rank would redo it, fighting over its folders)."""
    command = getattr(args, "command", None)
    torchrun = all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if torchrun and os.environ["WORLD_SIZE"].strip() not in ("", "1") and command not in DISTRIBUTED_COMMANDS:
        raise MonoscopeError(f"monoscope {command} runs in one process: launch it without torchrun (torchrun runs "
                             f"{', '.join(DISTRIBUTED_COMMANDS)})")


def _resolve_published(args: argparse.Namespace) -> None:
    """`saelens:RELEASE/ID` or `hf:REPO[/SUB]` in any command's SAE argument becomes a local SAE folder
    (monoscope.interop.published), so every stage takes a published SAE the same way."""
    from monoscope.interop.published import is_published, resolve_sae

    for name in ("sae", "path", "src"):
        value = getattr(args, name, None)
        if isinstance(value, str) and is_published(value):
            setattr(args, name, str(resolve_sae(value)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from monoscope.train.trainer import TrainingInterrupted

    try:
        _check_launch(args)
        _resolve_published(args)
        return int(args.func(args))
    except TrainingInterrupted as e:  # a checkpoint was saved: say how to continue
        print(f"interrupted: {e}", file=sys.stderr)
        return 128 + e.signum
    except MonoscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, MemoryError, RuntimeError) as e:  # a path or out-of-memory: one line; anything else is a bug
        from monoscope.fatal import describe

        msg = describe(e, args)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
