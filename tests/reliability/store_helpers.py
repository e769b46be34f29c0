"""What the store, lock and capture-argument tests share: a tiny saved model, a corpus file, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TRAIN_TEXT, make_llama

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])]),
       "PYTHONUNBUFFERED": "1"}
SMALL = ["--ctx-len", "16", "--batch-contexts", "2", "--contexts-per-shard", "2", "--compute-dtype", "fp32",
         "--device", "cpu", "--quiet"]
SMALL_API = {"ctx_len": 16, "batch_contexts": 2, "contexts_per_shard": 2, "compute_dtype": "fp32", "device": "cpu",
             "progress": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("model") / "tiny"
    make_llama(len(tokenizer), seed=5).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def write_corpus(path: Path, n_docs: int = 100) -> Path:
    docs = [f"{TRAIN_TEXT[i % len(TRAIN_TEXT)]} number {i}" for i in range(n_docs)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "monoscope.cli", *map(str, args)]


def run_cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), env=ENV, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert the CLI failed with exit 2 and exactly one `error: ...` line holding every needle."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err
    return err


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a store by name (the lock file excluded): equal dicts mean byte-identical stores."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}
