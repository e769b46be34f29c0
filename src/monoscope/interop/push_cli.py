"""`monoscope push SAE_DIR REPO_ID` (registered by monoscope.cli): upload an SAE folder with its cfg to the Hub."""

from __future__ import annotations

import argparse
from typing import Any


def add_push_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "push", help="upload an SAE folder with its cfg to a Hugging Face repository",
        description="Convert the SAE (any format monoscope reads) to SAELens's folder format (default; read by "
        "sae-lens and monoscope) or monoscope's, and upload it with huggingface_hub's upload_folder. Needs a "
        "token (hf auth login or HF_TOKEN) and the Hub (HF_HUB_OFFLINE unset).")
    p.add_argument("sae", metavar="SAE_DIR", help="SAE folder (monoscope, SAELens or sparsify)")
    p.add_argument("repo_id", metavar="REPO_ID", help="OWNER/NAME (created when missing)")
    p.add_argument("--subfolder", default=None, help="folder in the repository (e.g. layer_15/width_9k)")
    p.add_argument("--format", dest="fmt", default="saelens", choices=["saelens", "monoscope"])
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    from monoscope.interop.published import push

    url = push(args.sae, args.repo_id, subfolder=args.subfolder, fmt=args.fmt, private=args.private,
               message=args.message)
    sub = f"/{args.subfolder}" if args.subfolder else ""
    print(f"pushed {args.sae} -> {args.repo_id}{sub}: {url}")
    print(f"load it: monoscope eval hf:{args.repo_id}{sub} ...   (any stage takes hf:REPO[/SUBFOLDER])")
    return 0
