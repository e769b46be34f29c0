"""The dead window of TopK-style SAEs on short runs: 1/40 of the run, against floors of N mean-rate firings (N x F / k
tokens; at N = 64 a feature firing at a sixteenth of the mean rate or more is called dead with under 2% chance), on
two corpora: held-out FVU, features never active on the held-out rows, tokens/s. Each run alone, one after the other
(A B per cell), every window passed explicitly. This sweep chose the default (`TrainConfig.dead_window`: 1/40 of the
run with the floor at 64, `DEAD_WINDOW_FIRINGS`).

    python benchmarks/dead_window_sweep.py --data default=/tmp/tvp-seq --data pydoc=/tmp/tvp-seq-pydoc \
        --tokens 200k,500k --floors 64 -> benchmarks/results/dead_window_sweep.json
    ... --tokens 900k --floors 64,128,256 --name dead_window_sweep_900k

A --data folder is what `train_vs_peers.py` prepares (`train_store/`, `heldout.safetensors`), so the held-out rows
are those of the speed benchmarks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import write_result  # noqa: E402
from monoscope.sae.config import parse_width  # noqa: E402
from monoscope.train import train  # noqa: E402
from monoscope.train.config import dead_window_rule  # noqa: E402
from monoscope.units import parse_count  # noqa: E402
from peers import HeldOut, evaluate, load_now  # noqa: E402
from train_vs_peers import _mono_recon  # noqa: E402


def heldout(sae: Any, held: HeldOut) -> dict[str, float]:
    """Held-out FVU in raw scale and the share of features never active, as the speed benchmarks measure them."""
    recon, restore = _mono_recon(sae)()
    try:
        ev = evaluate(recon, held, sae.cfg.d_sae)
    finally:
        restore()
    return {"fvu": ev["fvu"], "dead_heldout": ev["dead_heldout_frac"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, metavar="NAME=DIR",
                    help="a folder prepared by train_vs_peers.py (train_store/, heldout.safetensors); repeatable")
    ap.add_argument("--tokens", default="200k,500k", help="comma-separated run lengths")
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--width", default="16x")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--floors", default="64", help="comma-separated floors in mean-rate firings (window >= N F / k)")
    ap.add_argument("--name", default="dead_window_sweep")
    args = ap.parse_args()
    load_start = load_now()
    cells = []
    for item in args.data:
        name, _, folder = item.partition("=")
        held = HeldOut(load_file(str(Path(folder) / "heldout.safetensors"))["rows"])
        n_features = parse_width(args.width, held.rows.shape[1])
        for tokens in [int(parse_count(t)) for t in args.tokens.split(",")]:
            for firings in [0] + [int(v) for v in args.floors.split(",") if v.strip()]:
                rule = f"floor {firings}F/k" if firings else "tokens/40"
                window = dead_window_rule(tokens, args.batch, n_features, args.k, firings)
                out = Path(tempfile.mkdtemp(prefix="dws-"))
                try:
                    res = train(out / "sae", store=str(Path(folder) / "train_store"), arch=args.arch, k=args.k,
                                width=args.width, tokens=tokens, batch_size=args.batch, dead_window=window,
                                seed=0, progress=False, checkpoint_every=0)
                    cell = {"data": name, "tokens": res.tokens, "rule": rule,
                            "dead_window": window,
                            "tokens_per_s": res.tokens / res.seconds, "train_s": res.seconds,
                            **heldout(res.sae, held), "load": load_now()}
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                print(json.dumps(cell), flush=True)
                cells.append(cell)
    path = write_result(args.name, {
        "what": "dead window of TopK-style SAEs: tokens/40 against floors of N mean-rate firings",
        "command": "python benchmarks/dead_window_sweep.py " + " ".join(sys.argv[1:]),
        "config": {"arch": args.arch, "k": args.k, "width": args.width, "batch": args.batch},
        "load": {"start": load_start, "end": load_now()}, "cells": cells})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
