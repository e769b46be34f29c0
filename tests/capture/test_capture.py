from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import monoscope.store.shard as shard_mod
from monoscope.capture import capture
from monoscope.cli import main
from monoscope.corpus import open_corpus
from monoscope.errors import MonoscopeError
from monoscope.store import ActivationStore
from monoscope.stream import stream_batches
from tests.conftest import TRAIN_TEXT, make_llama

SMALL = {"ctx_len": 16, "batch_contexts": 2, "contexts_per_shard": 4, "progress": False}


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.jsonl"
    docs = [f"{t} number {i}" for i, t in enumerate(TRAIN_TEXT)]
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return p


@pytest.fixture
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("model") / "tiny"
    make_llama(len(tokenizer), seed=5).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _digests(folder: Path) -> tuple[str, dict[str, str]]:
    m = json.loads((folder / "manifest.json").read_text())
    return (folder / "manifest.json").read_text(), {s["file"]: s["sha256"] for s in m["shards"]}


def test_capture_store_matches_model(tmp_path: Path, tiny_lm, corpus_file: Path) -> None:  # type: ignore[no-untyped-def]
    res = capture(tmp_path / "s", model=tiny_lm, corpus=str(corpus_file), hook="resid_post.1", tokens=300, **SMALL)
    m = res.manifest
    assert m.n_contexts == 19 and m.ctx_len == 16 and m.hook == "resid_post.1" and m.d_model == 64
    assert len(m.shards) == 5 and m.shards[-1].contexts == 3
    assert m.tokenizer["bos_id"] == tiny_lm.tokenizer.bos_token_id
    assert m.corpus["fingerprint"] and m.row_policy.median_norm > 0
    store = ActivationStore.open(tmp_path / "s", expect_hook="resid_post.1")
    toks = torch.stack([t for t, _ in store.iter_contexts()]).long()
    acts = torch.stack([a for _, a in store.iter_contexts()])
    bos = m.tokenizer["bos_id"]
    assert bool((toks[:, 0] == bos).all()) and not bool((toks[:, 1:] == bos).any())
    want = tiny_lm.acts(tiny_lm.hook("resid_post.1"), toks)
    torch.testing.assert_close(acts.float(), want, rtol=1e-2, atol=1e-2)  # bf16 storage
    assert store.n_rows == int(store.read_shard(0).keep.sum()) + sum(s.rows for s in m.shards[1:])
    assert store.n_rows <= 19 * 15


def test_rerun_is_a_noop_and_other_args_are_refused(tmp_path: Path, tiny_lm, corpus_file: Path) -> None:  # type: ignore[no-untyped-def]
    capture(tmp_path / "s", model=tiny_lm, corpus=str(corpus_file), tokens=200, **SMALL)
    before = _digests(tmp_path / "s")
    again = capture(tmp_path / "s", model=tiny_lm, corpus=str(corpus_file), tokens=200, **SMALL)
    assert again.new_tokens == 0 and _digests(tmp_path / "s") == before
    with pytest.raises(MonoscopeError, match="holds a different store"):
        capture(tmp_path / "s", model=tiny_lm, corpus=str(corpus_file), tokens=200, hook="resid_pre.1", **SMALL)


@pytest.mark.parametrize("crash_at", [1, 3])
def test_crash_inside_a_shard_write_resumes_to_identical_store(tmp_path: Path, tiny_lm, corpus_file: Path,  # type: ignore[no-untyped-def]
                                                                monkeypatch: pytest.MonkeyPatch, crash_at: int) -> None:
    capture(tmp_path / "ref", model=tiny_lm, corpus=str(corpus_file), tokens=300, **SMALL)
    real = shard_mod.write_bytes_atomic
    calls = {"n": 0}

    def crashing(path, data):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == crash_at + 1:  # die with the temp file written but not yet renamed
            Path(path).with_name(".tmp-crash").write_bytes(bytes(data)[: len(data) // 2])
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(shard_mod, "write_bytes_atomic", crashing)
    with pytest.raises(KeyboardInterrupt):
        capture(tmp_path / "s", model=tiny_lm, corpus=str(corpus_file), tokens=300, **SMALL)
    monkeypatch.setattr(shard_mod, "write_bytes_atomic", real)
    assert not (tmp_path / "s" / "manifest.json").exists()
    res = capture(tmp_path / "s", model=tiny_lm, corpus=str(corpus_file), tokens=300, **SMALL)
    assert res.resumed_contexts == crash_at * 4
    assert _digests(tmp_path / "s") == _digests(tmp_path / "ref")
    assert not list((tmp_path / "s").glob(".tmp-*"))


def test_disk_full_mid_capture(tmp_path: Path, tiny_lm, corpus_file: Path, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                               capsys: pytest.CaptureFixture[str]) -> None:
    import monoscope.fileio as fileio

    capture(tmp_path / "ref", model=tiny_lm, corpus=str(corpus_file), tokens=300, **SMALL)
    real = fileio.os.replace
    calls = {"n": 0}

    def full(src, dst):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if str(dst).endswith(".safetensors") and calls["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", full)
    with pytest.raises(MonoscopeError, match=r"disk full while writing .*shard-000\d\d\.safetensors"):
        capture(tmp_path / "s", model=tiny_lm, corpus=str(corpus_file), tokens=300, **SMALL)
    monkeypatch.setattr(fileio.os, "replace", real)
    assert not list((tmp_path / "s").glob(".tmp-*"))
    written = json.loads((tmp_path / "s" / "progress.json").read_text())["shards"]
    assert len(written) >= 1
    capture(tmp_path / "s", model=tiny_lm, corpus=str(corpus_file), tokens=300, **SMALL)
    assert _digests(tmp_path / "s") == _digests(tmp_path / "ref")


def _cli(model_dir: Path, corpus: Path, out: Path, tokens: int = 2000) -> list[str]:
    return [sys.executable, "-m", "monoscope.cli", "capture", "--model", str(model_dir), "--corpus", str(corpus),
            "--tokens", str(tokens), "--ctx-len", "16", "--batch-contexts", "2", "--contexts-per-shard", "2",
            "--out", str(out), "--compute-dtype", "fp32", "--quiet"]


def test_sigkill_and_resume_gives_identical_store(tmp_path: Path, model_dir: Path, corpus_file: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(_cli(model_dir, corpus_file, tmp_path / "ref"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_cli(model_dir, corpus_file, tmp_path / "s"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "s" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads(progress.read_text())["shards"]) >= 5:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "capture finished before it could be killed: give it more tokens"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "s" / "manifest.json").exists()
    out = subprocess.run(_cli(model_dir, corpus_file, tmp_path / "s"), check=True, env=env, capture_output=True,
                         text=True)
    assert "resumed after" in out.stdout
    assert _digests(tmp_path / "s") == _digests(tmp_path / "ref")
    assert subprocess.run([sys.executable, "-m", "monoscope.cli", "verify", str(tmp_path / "s")],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("stop_after", [1, 3, 7])
def test_stream_cursor_resumes_exactly(tiny_lm, corpus_file: Path, stop_after: int) -> None:  # type: ignore[no-untyped-def]
    corp = open_corpus(str(corpus_file))
    kw = {"seed": 4, "ctx_len": 16, "buffer_contexts": 3, "batch_contexts": 3}
    full = [next(b) for b in [stream_batches(tiny_lm, corp, "resid_post.1", 10, **kw)] for _ in range(12)]
    a = stream_batches(tiny_lm, corp, "resid_post.1", 10, **kw)
    for _ in range(stop_after):
        next(a)
    b = stream_batches(tiny_lm, corp, "resid_post.1", 10, **kw)
    b.load_state_dict(a.state_dict())
    for want in full[stop_after:]:
        got = next(b)
        assert torch.equal(got.rows, want.rows) and torch.equal(got.acts, want.acts)
    assert a.normaliser is not None and a.normaliser > 0


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def test_bad_inputs_are_one_line_errors(tmp_path: Path, model_dir: Path, corpus_file: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    base = ["capture", "--model", str(model_dir), "--corpus", str(corpus_file), "--out", str(tmp_path / "o"),
            "--ctx-len", "16", "--quiet"]
    _one_line_error(capsys, [*base, "--tokens", "0"], "--tokens 0")
    _one_line_error(capsys, [*base, "--tokens", "lots"], "--tokens lots")
    _one_line_error(capsys, [*base[:2], str(tmp_path / "none.gguf"), *base[3:], "--tokens", "100"], "none.gguf")
    (tmp_path / "empty.txt").write_text("")
    _one_line_error(capsys, [*base[:4], str(tmp_path / "empty.txt"), *base[5:], "--tokens", "100"], "empty.txt")
    (tmp_path / "short.txt").write_text("the fox")
    _one_line_error(capsys, [*base[:4], str(tmp_path / "short.txt"), *base[5:], "--tokens", "100"], "short.txt")
    _one_line_error(capsys, [*base, "--tokens", "100", "--hook", "resid_post.9"], "resid_post.9", "resid_post.0..3")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    _one_line_error(capsys, [*base, "--tokens", "100", "--out", str(tmp_path / "mine")], "not empty")
    (tmp_path / "bad.txt").write_bytes(b"the quick \xff\xfe fox\n")
    _one_line_error(capsys, [*base[:4], str(tmp_path / "bad.txt"), *base[5:], "--tokens", "100",
                             "--strict-utf8", "--out", str(tmp_path / "o2")], "bad.txt", "line 1")
