"""Distributed capture: forked gloo ranks write disjoint shards of one corpus into one store that is
byte-identical (every shard, the manifest, the progress record) to a one-process capture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monoscope.capture import capture
from monoscope.capture_dist import capture_distributed
from tests.conftest import TRAIN_TEXT
from tests.distributed.helpers import fork_ranks, join_ranks

SMALL = {"ctx_len": 16, "batch_contexts": 2, "contexts_per_shard": 4, "progress": False, "hook": "resid_post.1",
         "tokens": 300}


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.jsonl"
    docs = [f"{t} number {i}" for i, t in enumerate(TRAIN_TEXT)]
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return p


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock" and p.is_file()}


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_capture_is_byte_identical(tmp_path: Path, tiny_lm, corpus_file: Path, world: int) -> None:  # type: ignore[no-untyped-def]
    one = capture(tmp_path / "one", model=tiny_lm, corpus=str(corpus_file), **SMALL)  # type: ignore[arg-type]
    assert len(one.manifest.shards) == 5  # 19 contexts, 4 per shard: rounds of `world` shards, the last partial
    out = tmp_path / "many"
    res = join_ranks(fork_ranks(world, tmp_path, capture_distributed, out=out, model=tiny_lm,
                                corpus=str(corpus_file), **SMALL), tmp_path)
    assert [r["code"] for r in res] == [0] * world, res
    a, b = files(tmp_path / "one"), files(out)
    assert a.keys() == b.keys()
    assert "manifest.json" in a and "shard-00004.safetensors" in a
    for name in a:
        assert a[name] == b[name], name

    # run again: the finished store is checked and left as it is
    res = join_ranks(fork_ranks(world, tmp_path, capture_distributed, out=out, model=tiny_lm,
                                corpus=str(corpus_file), **SMALL), tmp_path)
    assert [r["code"] for r in res] == [0] * world, res
    assert files(out) == b

    # a damaged and a missing shard: recaptured by their owners, the store ends byte-identical again
    (out / "shard-00001.safetensors").write_bytes(b"broken")
    (out / "shard-00003.safetensors").unlink()
    res = join_ranks(fork_ranks(world, tmp_path, capture_distributed, out=out, model=tiny_lm,
                                corpus=str(corpus_file), **SMALL), tmp_path)
    assert [r["code"] for r in res] == [0] * world, res
    assert files(out) == b


def test_capture_cli_under_torchrun_environment(tmp_path: Path, tokenizer, corpus_file: Path) -> None:  # type: ignore[no-untyped-def]
    """`monoscope capture` as two real processes with torchrun's variables equals one process's store."""
    from tests.conftest import make_llama
    from tests.distributed.helpers import launch_ranks, wait_all

    model = tmp_path / "tiny"
    make_llama(len(tokenizer), seed=5).save_pretrained(model)
    tokenizer.save_pretrained(model)
    args = ["--model", str(model), "--corpus", str(corpus_file), "--hook", "resid_post.1", "--tokens", "300",
            "--ctx-len", "16", "--batch-contexts", "2", "--contexts-per-shard", "4", "--device", "cpu", "--quiet"]
    capture(tmp_path / "one", model=str(model), corpus=str(corpus_file), device="cpu", **SMALL)  # type: ignore[arg-type]
    res = wait_all(launch_ranks(2, ["capture", *args, "--out", str(tmp_path / "many")]), timeout=300)
    assert [r[0] for r in res] == [0, 0], [r[2][-2000:] for r in res]
    assert res[0][1].count("next: monoscope verify") == 1 and "next:" not in res[1][1]
    assert files(tmp_path / "one") == files(tmp_path / "many")
