"""`train(...)` on real stores, in process: outputs, refusals, crash inside a checkpoint save,
non-finite rows, streaming from a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import monoscope.train.checkpoint as ckpt_mod
from monoscope.errors import MonoscopeError
from monoscope.sae import load_sae
from monoscope.train import NonFiniteError, train
from monoscope.train.cli import main
from tests.conftest import TRAIN_TEXT, make_llama
from tests.train.helpers import assert_same_state, make_store

SMALL: dict[str, Any] = {"arch": "topk", "k": 4, "width": "4x", "tokens": 40 * 64, "batch_size": 64, "lr": 3e-3,
                         "dtype": "float32", "checkpoint_every": 10, "log_every": 5, "progress": False}
"""float32 on every CPU (auto would pick bf16 on AMX machines), so the golden values below hold anywhere."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("acts") / "store"
    make_store(folder)  # 4 shards x 16 contexts x 16 rows = 1024 rows: 16 batches per epoch
    return folder


@pytest.fixture(scope="module")
def reference(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "sae"
    train(out, store=store, **SMALL)
    return out


def test_train_writes_the_sae_its_log_and_checkpoints(reference: Path, store: Path) -> None:
    sae = load_sae(reference)
    assert sae.arch == "topk" and sae.cfg.d_in == 32 and sae.cfg.d_sae == 128 and sae.cfg.k == 4
    assert sae.cfg.hook == "resid_post.1" and sae.cfg.model == "synthetic"
    prov = sae.provenance
    assert prov["steps"] == 40 and prov["tokens"] == 2560 and prov["train_config"]["k"] == 4
    assert prov["data"]["kind"] == "store" and len(prov["data"]["manifest_sha256"]) == 64
    assert {"monoscope", "torch", "python"} <= set(prov["versions"])
    # golden values of this deterministic run (the same with 1 and 2 threads)
    final = prov["final_metrics"]
    assert final["fvu"] == pytest.approx(0.4704944252967834, rel=1e-4)
    assert final["loss"] == pytest.approx(11.503079986572265, rel=1e-4)
    assert final["l0"] == 4.0 and final["dead_frac"] == 0.0234375
    log = [json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(5, 41, 5))
    assert {"loss", "fvu", "l0", "dead_frac", "lr", "tokens_per_s"} <= set(log[0])
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["step-00000030", "step-00000040"]
    w = safetensors.torch.load_file(str(reference / "checkpoints" / "step-00000040" / "sae.safetensors"))
    assert torch.equal(w["W_dec"], sae.W_dec.detach())
    # a finished run: --resume is a no-op, a plain rerun is refused
    res = train(reference, store=store, resume=True, **SMALL)
    assert res.already_complete and res.steps == 40
    with pytest.raises(MonoscopeError, match="already holds a trained SAE"):
        train(reference, store=store, **SMALL)


def crash_at_checkpoint(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the save of checkpoint `step` die after writing two files, leaving them behind as a kill would."""
    real = ckpt_mod._write_part

    def dying(path: Path, name: str, ckpt: Any) -> None:
        real(path, name, ckpt)
        if name == "optimizer.pt" and ckpt.step == step:
            raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt_mod, "_write_part", dying)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", lambda *a, **k: None)  # a kill cleans nothing up


def test_a_kill_inside_a_checkpoint_save_resumes_to_identical_weights(
    store: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sae"
    crash_at_checkpoint(monkeypatch, 30)
    with pytest.raises(KeyboardInterrupt):
        train(out, store=store, **SMALL)
    monkeypatch.undo()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[1:] == ["step-00000010", "step-00000020"] and names[0].startswith(".tmp-step-00000030")
    assert not (out / "sae.safetensors").exists()
    with pytest.raises(MonoscopeError, match=r"holds checkpoints of an unfinished run.*--resume"):
        train(out, store=store, **SMALL)
    res = train(out, store=store, resume=True, **SMALL)
    assert res.resumed_from == 20 and res.steps == 40 and res.session_tokens == 20 * 64
    assert_same_state(out, reference)


def test_resume_with_other_settings_or_data_is_refused_with_the_differences(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sae"
    crash_at_checkpoint(monkeypatch, 20)
    with pytest.raises(KeyboardInterrupt):
        train(out, store=store, **SMALL)
    monkeypatch.undo()
    with pytest.raises(MonoscopeError) as e:
        train(out, store=store, resume=True, **{**SMALL, "k": 8, "lr": 1e-3, "log_every": 2})
    msg = str(e.value)
    assert "cannot resume" in msg and "k: 4 -> 8" in msg and "lr: 0.003 -> 0.001" in msg
    assert "log_every" not in msg and "\n" not in msg  # runtime-only settings may change
    other = tmp_path / "other"
    make_store(other, seed=1)
    with pytest.raises(MonoscopeError, match=r"data\.manifest_sha256"):
        train(out, store=other, resume=True, **SMALL)
    res = train(out, store=store, resume=True, **{**SMALL, "log_every": 5, "checkpoint_every": 7})
    assert res.resumed_from == 10 and res.steps == 40


def test_a_non_finite_row_stops_with_its_location_and_skip_continues(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    make_store(bad, poison_row=700)  # 700 = 2*256 + 11*16 + 12: shard 2, context 2*16 + 11, position 12 + 1
    with pytest.raises(NonFiniteError) as e:
        train(tmp_path / "a", store=bad, **{**SMALL, "checkpoint_every": 3})
    msg = str(e.value)
    assert "non-finite activations" in msg and "first 700 = shard-00002.safetensors context 43 position 13" in msg
    step = int(msg.split(":")[0].removeprefix("step "))
    ckpts = sorted((tmp_path / "a" / "checkpoints").glob("step-*"))
    assert all(int(p.name[5:]) < step for p in ckpts)
    res = train(tmp_path / "b", store=bad, **{**SMALL, "skip_nonfinite": True})
    assert res.skipped in (2, 3) and res.steps == 40  # the row comes round once per epoch, in 2.5 epochs
    assert all(torch.isfinite(p).all() for p in res.sae.parameters())


def test_cli_errors_are_one_line(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    o = str(tmp_path / "o")
    assert main([str(store), "--out", o, "--arch", "topk", "--tokens", "1k", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --arch topk needs --k") and err.count("\n") == 1
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--arch", "topk", "--k", "4",
                 "--tokens", "1k", "--batch-size", "64"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--arch", "topk", "--k", "4", "--tokens", "1k"]) == 2
    assert "needs an activation store folder (STORE) or --model" in capsys.readouterr().err
    assert main([str(store), "--out", str(tmp_path / "o"), "--arch", "topk", "--k", "4", "--width", "2x",
                 "--tokens", "640", "--batch-size", "64", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "topk k=4, 32 -> 64 features" in out and f"next: monoscope convert {tmp_path / 'o'} --to saelens" in out
    assert load_sae(tmp_path / "o").provenance["command"].startswith("monoscope train ")


def test_streaming_from_a_model_folder(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "tiny"
    make_llama(len(tokenizer), layers=2, seed=5).save_pretrained(model)
    tokenizer.save_pretrained(model)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i, t in enumerate(TRAIN_TEXT)))
    settings = {**SMALL, "tokens": 12 * 64, "width": "2x", "device": "cpu"}
    res = train(tmp_path / "sae", model=str(model), corpus=str(corpus), hook="resid_post.1", **settings)
    sae = load_sae(tmp_path / "sae")
    assert res.steps == 12 and sae.cfg.d_in == 64 and sae.cfg.hook == "resid_post.1"
    assert sae.cfg.normaliser > 0 and sae.provenance["data"]["kind"] == "stream"
