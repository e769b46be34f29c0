"""A tiny, deterministic run folder: a 4-layer Llama saved to disk, a .txt corpus, run sizes of seconds."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

from monoscope.pipeline import RunConfig
from tests.conftest import TRAIN_TEXT, make_llama, make_tokenizer

TINY = {"hook": "resid_post.1", "tokens": 2048, "ctx_len": 16, "batch_contexts": 8, "contexts_per_shard": 16,
        "arch": "topk", "k": 4, "width": "4x", "small_width": "2x", "train_tokens": "8k", "train_batch_size": 512,
        "eval_tokens": 512, "features_tokens": 1024, "compute_dtype": "fp32", "device": "cpu", "feature_map": False,
        "explain_features": 0, "audit_packs": "people,code_types", "progress": False}
"""RunConfig settings of the tiny run (fp32 compute so the numbers are exact on any CPU)."""


def make_inputs(root: Path) -> tuple[Path, Path]:
    """A tiny Llama folder and a .txt corpus long enough for the store and the held-out evaluation."""
    tok = make_tokenizer()
    model = root / "model"
    make_llama(len(tok), seed=5).save_pretrained(model)
    tok.save_pretrained(model)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"{t} number {i}" for i, t in enumerate(TRAIN_TEXT * 8)) + "\n")
    return model, corpus


def tiny_config(out: Path, model: Path, corpus: Path, **over: Any) -> RunConfig:
    return RunConfig(out=out, model=str(model), corpus=str(corpus), **{**TINY, **over})


def cli_args(out: Path, model: Path, corpus: Path) -> list[str]:
    """The same run as `tiny_config`, as `monoscope run` options."""
    t = TINY
    return ["run", "--out", str(out), "--model", str(model), "--corpus", str(corpus), "--hook", t["hook"],
            "--tokens", str(t["tokens"]), "--ctx-len", str(t["ctx_len"]), "--batch-contexts", str(t["batch_contexts"]),
            "--contexts-per-shard", str(t["contexts_per_shard"]), "--arch", t["arch"], "--k", str(t["k"]),
            "--width", t["width"], "--small-width", t["small_width"], "--train-tokens", t["train_tokens"],
            "--train-batch-size", str(t["train_batch_size"]),
            "--eval-tokens", str(t["eval_tokens"]), "--features-tokens", str(t["features_tokens"]),
            "--compute-dtype", t["compute_dtype"], "--device", t["device"], "--no-map", "--explain-features", "0",
            "--audit-packs", t["audit_packs"],
            "--quiet"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def db_tables(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table that the pass computes (paths and timings left out)."""
    conn = sqlite3.connect(str(db))
    try:
        out = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
               for t in ("features", "examples", "splits", "vocab")}
        out["meta"] = [r for r in conn.execute("SELECT key, value FROM meta ORDER BY key")
                       if r[0] not in ("sae", "seconds", "created", "stream_seconds")]
    finally:
        conn.close()
    return out
