"""A tiny run for the feature-database reliability tests: a seeded 4-layer llama, a corpus with CJK, Cyrillic
and emoji text (characters a byte-level tokenizer splits across tokens), a store and two TopK SAEs."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from monoscope.capture import capture
from monoscope.train import train
from tests.conftest import TRAIN_TEXT, make_llama, make_tokenizer

HOOK = "resid_post.1"
SRC = str(Path(__file__).resolve().parents[2] / "src")
MULTIBYTE = ["日本語のテキストです", "Привет, как дела?", "emoji 🙂🚀 and more 🙂", "中文 字符 测试"]
KW: dict[str, Any] = {"tokens": 512, "batch_contexts": 2, "checkpoint_every": 3, "feature_map": False,
                      "progress": False}
"""32 contexts of 16 tokens in 16 batches: checkpoints after batches 3, 6, 9, 12 and 15."""


def make_run(root: Path) -> Path:
    """root/{model, corpus.jsonl, acts, sae (4x), sae-2x}."""
    tok = make_tokenizer()
    model = root / "model"
    make_llama(len(tok), seed=5).save_pretrained(model)
    tok.save_pretrained(model)
    corpus = root / "corpus.jsonl"
    lines = [f"{t} {MULTIBYTE[i % len(MULTIBYTE)]} number {i}" for i, t in enumerate(TRAIN_TEXT * 4)]
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines), encoding="utf-8")
    capture(root / "acts", model=str(model), corpus=str(corpus), hook=HOOK, tokens=1024, ctx_len=16,
            batch_contexts=8, contexts_per_shard=16, compute_dtype="fp32", progress=False)
    for name, width in (("sae", "4x"), ("sae-2x", "2x")):
        train(root / name, store=root / "acts", arch="topk", k=4, width=width, tokens=4096, batch_size=256,
              progress=False)
    return root


def dump(db_path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table, sorted (meta without the SAE's absolute path)."""
    conn = sqlite3.connect(str(db_path))
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE "
                                         "'labels_fts_%' AND name NOT LIKE 'sqlite_%'")]
    out = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    out["meta"] = [r for r in out["meta"] if r[0] != "sae" and not r[0].startswith("sae_dir:")]
    conn.close()
    return out


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Any:
    """`python -m monoscope.cli ARGS` in a subprocess, as a user runs it."""
    import subprocess

    e = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "monoscope.cli", *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


def shared_run(factory: Any) -> Path:
    """One tiny run per pytest session (tests copy the SAE folders they write beside)."""
    import shutil

    root = factory.getbasetemp() / "features-run"
    if not (root / "ready").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        make_run(root)
        (root / "ready").touch()
    return root


def copy_saes(run: Path, dest: Path, *names: str) -> Path:
    """run/NAME -> dest/NAME for each name (their databases then go to dest/features, dest/NAME-features)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copytree(run / n, dest / n)
    return dest
