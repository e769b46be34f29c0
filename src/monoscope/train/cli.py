"""`monoscope train`: the command over `monoscope.train.train`, with options derived from TrainConfig.

    monoscope train runs/x/acts --arch topk --k 32 --width 16x --tokens 50M --out runs/x/sae
    monoscope train runs/x/acts --arch relu-l1 --l1 5 --tokens 50M --out runs/x/sae
    monoscope train --model HuggingFaceTB/SmolLM2-135M --corpus my.jsonl --hook resid_post.15 \\
        --arch topk --k 32 --tokens 10M --out runs/x/sae        # streamed: no store on disk
    monoscope train runs/x/acts ... --out runs/x/sae --resume  # after a kill, SIGTERM or Ctrl-C

Tiny CPU run (seconds): `monoscope train runs/x/acts --arch topk --k 8 --width 2x --tokens 200k
--batch-size 1024 --out /tmp/sae`.

Every TrainConfig field is an option named after it (`--lr-decay-frac`, `--dead-window`, ...), with
its docstring as help; counts accept 10M-style suffixes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from monoscope.errors import MonoscopeError
from monoscope.fileio import check_output_dir
from monoscope.train.config import TrainConfig, field_docs
from monoscope.train.distributed import launched_distributed
from monoscope.train.run import TrainResult, train

_ALIASES = {
    "sparsity_coef": ["--l1", "--sparsity-coef"],
    "sparsity_warmup_frac": ["--l1-warmup-frac", "--sparsity-warmup-frac"],
}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32"}
_NOT_OPTIONS = {"progress"}  # --quiet instead
_DESCRIPTION = "Train a sparse autoencoder (relu-l1, topk, batchtopk or jumprelu) on model activations."
_EXAMPLES = "examples:\n" + "\n".join((__doc__ or "").splitlines()[2:8])


def add_train_parser(subparsers: Any) -> None:
    """Register `train` on an argparse subparsers object; `args.func(args)` returns the exit code."""
    p = subparsers.add_parser(
        "train", help="train a sparse autoencoder on an activation store (or on a model, streamed)",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EXAMPLES,
    )
    p.add_argument("store", nargs="?", help="activation store folder (from monoscope capture)")
    p.add_argument("--out", required=True, help="SAE folder to create (checkpoints go in OUT/checkpoints)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest complete checkpoint (same settings required)")
    p.add_argument("--model", default=None, help="stream activations from this model instead of a store")
    p.add_argument("--corpus", default="default", help="with --model: the corpus to stream (default: the offline mix)")
    p.add_argument("--hook", default=None, help="with --model: hook point (default: resid_post at the middle layer)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    dist_group = p.add_argument_group("several processes (launch with torchrun --nproc-per-node N -m monoscope train)")
    dist_group.add_argument("--shard-features", type=int, default=1, metavar="N",
                            help="split the dictionary's features over N ranks (the rest of the world is data "
                                 "parallel; N must divide the world size); default 1: pure data parallel")
    dist_group.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                            help="how long a rank waits for a silent peer before stopping with an error "
                                 "(default 600)")
    add_config_options(p)
    p.set_defaults(func=cmd_train)


def add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field; unset options keep the dataclass defaults."""
    hints = typing.get_type_hints(TrainConfig)
    docs = field_docs(TrainConfig)
    group = p.add_argument_group("training settings (TrainConfig)")
    for f in fields(TrainConfig):
        if f.name in _NOT_OPTIONS:
            continue
        flags = _ALIASES.get(f.name, ["--" + f.name.replace("_", "-")])
        required = f.default is MISSING and f.default_factory is MISSING
        help_text = docs.get(f.name, "")
        if not required:
            help_text += f" (default: {_show(f.default)})"
        kind = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text.replace("%", "%%")}
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            choices = _literal_choices(kind)
            if choices:
                kwargs["choices"] = choices
                kwargs["type"] = lambda s: _DTYPE_ALIASES.get(s, s)
            else:
                kwargs["type"] = _parser_for(kind)
                kwargs["metavar"] = f.name.upper()
        group.add_argument(*flags, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    settings = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    settings["progress"] = not getattr(args, "quiet", False)
    return TrainConfig(**settings)


def cmd_train(args: argparse.Namespace) -> int:
    if args.store is None and args.model is None:
        raise MonoscopeError("monoscope train needs an activation store folder (STORE) or --model to stream from")
    if args.store is not None and args.model is not None:
        raise MonoscopeError(f"give either a store ({args.store}) or --model ({args.model}), not both")
    check_output_dir(args.out)  # before the store is opened or a model loads
    cfg = config_from_args(args)
    argv = sys.argv[1:] if sys.argv[1:2] == ["train"] else ["train", *sys.argv[1:]]
    command = "monoscope " + shlex.join(argv)
    if launched_distributed() or args.shard_features != 1 or args.dist_timeout is not None:
        return _cmd_train_distributed(args, cfg, command)
    res = train(args.out, store=args.store, model=args.model, corpus=args.corpus, hook=args.hook, config=cfg,
                resume=args.resume, command=command)
    print_train_summary(res)
    print(f"next: monoscope convert {res.out} --to saelens --out {res.out}-saelens   (or load it with "
          "monoscope.sae.load_sae)")
    return 0


def _cmd_train_distributed(args: argparse.Namespace, cfg: TrainConfig, command: str) -> int:
    """`monoscope train` on one rank of a torchrun launch: rank 0 prints the summary."""
    from monoscope.train.distributed import DEFAULT_TIMEOUT_S, check_one_process_options, train_distributed

    if not launched_distributed():
        raise MonoscopeError(f"--shard-features/--dist-timeout need several processes: launch with `torchrun "
                             f"--nproc-per-node N -m monoscope train ...` (N a multiple of --shard-features "
                             f"{args.shard_features})")
    if args.model is not None:
        raise MonoscopeError("distributed training reads an activation store, not --model: capture a store first "
                             "(monoscope capture), then train on it with torchrun")
    check_one_process_options(cfg)  # before the process group forms
    timeout = DEFAULT_TIMEOUT_S if args.dist_timeout is None else args.dist_timeout
    if timeout <= 0:
        raise MonoscopeError(f"--dist-timeout {args.dist_timeout} must be positive (seconds)")
    res = train_distributed(args.out, store=args.store, config=cfg, shard_features=args.shard_features,
                            resume=args.resume, command=command, timeout_s=timeout)
    if res is not None:  # rank 0
        print_train_summary(res)
        print(f"next: monoscope convert {res.out} --to saelens --out {res.out}-saelens   (or load it with "
              "monoscope.sae.load_sae)")
    return 0


def print_train_summary(res: TrainResult) -> None:
    """One screen: what was trained, on what, how well, how fast, where it is."""
    cfg, sae_cfg, m = res.config, res.sae.cfg, res.metrics
    t = Table(title=f"SAE {res.out}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    k = f" k={sae_cfg.k}" if sae_cfg.k else f" λ={cfg.sparsity_coef:g}"
    t.add_row("SAE", f"{sae_cfg.arch}{k}, {sae_cfg.d_in} -> {sae_cfg.d_sae:,} features")
    t.add_row("data", f"{sae_cfg.model} {sae_cfg.hook}, normaliser {sae_cfg.normaliser:.5g}")
    t.add_row("trained", f"{res.steps:,} steps x {cfg.batch_size:,} = {res.tokens:,} tokens"
              + (f" ({res.skipped} non-finite batches skipped)" if res.skipped else ""))
    if m:
        t.add_row("final (last log interval)", f"FVU {_num(m, 'fvu', '.4f')}  L0 {_num(m, 'l0', '.1f')}  "
                  f"dead {_num(m, 'dead_frac', '.2%')}  loss {_num(m, 'loss', '.4g')}")
    if res.already_complete:
        t.add_row("this run", "already complete: nothing to do")
    elif res.session_tokens:
        how = f"resumed at step {res.resumed_from:,}; " if res.resumed_from is not None else ""
        t.add_row("this run", f"{how}{res.session_tokens:,} tokens in {res.seconds:,.1f} s = "
                  f"{res.tokens_per_s:,.0f} tokens/s")
    for note in res.notes:
        t.add_row("note", note)
    Console().print(t)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m monoscope.train.cli ARGS` = `monoscope train ARGS` (argv without "train")."""
    from monoscope.cli import main as monoscope_main

    return monoscope_main(["train", *(sys.argv[1:] if argv is None else argv)])


# ----------------------------------------------------------------------------- option types


def _num(metrics: dict[str, Any], key: str, spec: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else format(value, spec)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return str(value)


def _literal_choices(kind: Any) -> list[str] | None:
    if typing.get_origin(kind) is Literal:
        values = list(typing.get_args(kind))
        return values + [a for a, v in _DTYPE_ALIASES.items() if v in values]
    return None


def _parser_for(kind: Any) -> Callable[[str], Any]:
    args = set(typing.get_args(kind)) - {type(None)}
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType) and args == {int, str}:
        return lambda s: int(s) if s.strip().isdigit() else s  # width: 9216 or 16x
    base = next(iter(args)) if origin in (typing.Union, types.UnionType) and len(args) == 1 else kind
    if base is int:
        return _count
    if base is float:
        return float
    if typing.get_origin(base) is tuple:
        return lambda s: tuple(float(v) for v in s.split(",") if v.strip())
    return str


def _count(text: str) -> int:
    """A 10M-style count; a bad one is argparse's one-line usage error with parse_count's message."""
    from monoscope.units import parse_count

    try:
        return parse_count(text)
    except (MonoscopeError, ValueError, OverflowError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
