"""`monoscope convert SRC --to saelens|sparsify|monoscope --out DIR` (registered by monoscope.cli)."""

from __future__ import annotations

import argparse
from typing import Any

from monoscope.interop.convert import FORMATS, convert_sae
from monoscope.interop.sparsify import suggested_hookpoint

_LOAD_HINT = {
    "saelens": 'in SAELens: SAE.load_from_disk("{out}")',
    "sparsify": 'in sparsify: SparseCoder.load_from_disk("{out}")',
    "monoscope": 'in monoscope: load_sae("{out}"), or pass the folder to any stage that takes an SAE',
}


def add_convert_parser(subparsers: Any) -> None:
    """Register the `convert` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "convert",
        help="convert an SAE between monoscope, SAELens and sparsify folders",
        description="Convert an SAE folder (format detected: monoscope, SAELens, or sparsify, including a sparsify "
        "run folder with one hookpoint) to another format. The converted SAE gives the same feature activations "
        "on raw activations; what the target cannot represent is an error.",
    )
    p.add_argument("src", help="SAE folder to read (monoscope, SAELens or sparsify)")
    p.add_argument("--to", required=True, choices=FORMATS, help="format to write")
    p.add_argument("--out", required=True, help="folder to write (created)")
    p.add_argument("--overwrite", action="store_true", help="replace an SAE already in --out")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from monoscope.fileio import check_output_dir

    check_output_dir(args.out)
    out, sae, src_fmt = convert_sae(args.src, args.to, args.out, overwrite=args.overwrite)
    cfg = sae.cfg
    k = f", k={cfg.k}" if cfg.k is not None else ""
    print(f"converted {src_fmt} SAE {args.src} -> {args.to}: {cfg.arch}, d_in={cfg.d_in}, d_sae={cfg.d_sae}{k}")
    print(f"result: {out}")
    hookpoint = suggested_hookpoint(sae) if args.to == "sparsify" else None
    if hookpoint is not None and out.name != hookpoint:
        print(f"note: sparsify's load_many expects each SAE in a folder named after its hookpoint, here {hookpoint}")
    print("load it " + _LOAD_HINT[args.to].format(out=out))
    return 0
