"""End-to-end training (`--loss e2e-kl|e2e-ce`) on a tiny Llama built here: the splice is exact, the
gradient reaches the SAE only, the KL falls, a resumed run ends bit-identical, bad input is one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import safetensors.torch
import torch

from monoscope.corpus import open_corpus
from monoscope.errors import MonoscopeError
from monoscope.model import load_model
from monoscope.sae import load_sae
from monoscope.train import TrainConfig, train
from monoscope.train.e2e import ContextBatches, e2e_term, spliced_logits
from tests.conftest import TRAIN_TEXT, make_llama
from tests.train.helpers import make_store

SRC = str(Path(__file__).resolve().parents[2] / "src")
HOOK = "resid_post.0"
SETTINGS: dict[str, Any] = {"arch": "topk", "k": 4, "width": "2x", "tokens": 12 * 64, "batch_size": 64, "lr": 3e-3,
                            "ctx_len": 16, "loss": "e2e-kl", "checkpoint_every": 4, "keep_checkpoints": 10,
                            "log_every": 4, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("e2e")
    model = root / "tiny"
    make_llama(len(tokenizer), layers=2, seed=5).save_pretrained(model)
    tokenizer.save_pretrained(model)
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i, t in enumerate(TRAIN_TEXT)))
    return model, corpus


def weights(out: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(out / "sae.safetensors"))


def kl_through_model(sae_dir: Path, model: Path, corpus: Path) -> float:
    """KL(clean ‖ spliced) of the SAE in `sae_dir` on the first training batch."""
    sae = load_sae(sae_dir)
    lm = load_model(str(model), device="cpu")
    batch = next(ContextBatches(lm, open_corpus(str(corpus)), lm.hook(HOOK), 64, 16))
    with torch.no_grad():
        x_hat = sae.decode_raw(sae.encode_raw(batch.acts))
        return float(e2e_term("e2e-kl", spliced_logits(lm, lm.hook(HOOK), batch.ids, batch.keep, x_hat), batch))


def test_splice_of_the_clean_activation_is_the_clean_model_and_only_the_sae_gets_gradients(
        tiny: tuple[Path, Path]) -> None:
    model, corpus = tiny
    lm = load_model(str(model), device="cpu")
    src = ContextBatches(lm, open_corpus(str(corpus)), lm.hook(HOOK), 64, 16)
    batch = next(src)
    assert batch.ids.shape == (4, 16) and batch.acts.shape == (int(batch.keep.sum()), 64)
    assert not bool(batch.keep[:, 0].any())  # the BOS keeps its clean activation
    same = spliced_logits(lm, lm.hook(HOOK), batch.ids, batch.keep, batch.acts)
    assert float((same - batch.clean_logits).abs().max()) < 1e-4
    assert abs(float(e2e_term("e2e-kl", same, batch))) < 1e-6

    lm.model.requires_grad_(False)
    x_hat = (batch.acts * 0.5).requires_grad_(True)
    kl = e2e_term("e2e-kl", spliced_logits(lm, lm.hook(HOOK), batch.ids, batch.keep, x_hat), batch)
    kl.backward()
    assert float(kl.detach()) > 1e-3 and x_hat.grad is not None and float(x_hat.grad.abs().sum()) > 0
    assert all(p.grad is None for p in lm.model.parameters())
    ce = e2e_term("e2e-ce", batch.clean_logits, batch)
    pred = batch.keep[:, :-1]
    want = torch.nn.functional.cross_entropy(batch.clean_logits[:, :-1][pred], batch.ids[:, 1:][pred])
    assert float(ce) == pytest.approx(float(want))


def test_e2e_kl_falls_and_a_resumed_run_is_exact(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, corpus = tiny
    out = tmp_path / "sae"
    res = train(out, model=str(model), corpus=str(corpus), hook=HOOK, **SETTINGS)
    assert res.steps == 12
    sae = load_sae(out)
    assert sae.provenance["train_config"]["loss"] == "e2e-kl"
    assert sae.provenance["data"]["kind"] == "e2e" and sae.provenance["data"]["ctx_len"] == 16
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    e2e = [r["e2e"] for r in log if "e2e" in r]
    assert len(e2e) == 3 and e2e[0] > e2e[1] > e2e[2], e2e  # the KL to the clean model falls
    # ... and ends below the KL of the same SAE trained on reconstruction MSE (same batches, same steps)
    mse = train(tmp_path / "mse", model=str(model), corpus=str(corpus), hook=HOOK, **{**SETTINGS, "loss": "mse"})
    assert kl_through_model(out, model, corpus) < 0.9 * kl_through_model(mse.out, model, corpus)
    for r in log:
        if "e2e" in r:
            assert r["e2e"] == pytest.approx(r["loss"] - r["sparsity"] - r["aux"])

    done = weights(out)
    for ck in (out / "checkpoints").glob("step-*"):
        if int(ck.name[5:]) > 4:
            shutil.rmtree(ck)
    (out / "sae.safetensors").unlink()
    (out / "cfg.json").unlink()
    again = train(out, model=str(model), corpus=str(corpus), hook=HOOK, resume=True, **SETTINGS)
    assert again.resumed_from == 4 and again.steps == 12
    w = weights(out)
    for k in done:
        assert torch.equal(done[k], w[k]), k


def test_e2e_ce_with_batchtopk(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, corpus = tiny
    settings = {**SETTINGS, "arch": "batchtopk", "loss": "e2e-ce", "tokens": 4 * 64}
    res = train(tmp_path / "sae", model=str(model), corpus=str(corpus), hook=HOOK, **settings)
    assert res.steps == 4 and res.metrics["threshold"] > 0  # calibrated from the next batches, as with mse
    log = [json.loads(line) for line in (tmp_path / "sae" / "train_log.jsonl").read_text().splitlines()]
    ce = [r["e2e"] for r in log if "e2e" in r]
    assert ce and 0 < ce[-1] < 20


def test_bad_input_is_one_line(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, corpus = tiny
    with pytest.raises(MonoscopeError) as e:
        train(tmp_path / "a", model=str(model), corpus=str(corpus), hook=HOOK, **{**SETTINGS, "batch_size": 60})
    assert str(e.value) == ("--batch-size 60 is not a whole number of 16-token contexts, which end-to-end training "
                            "splices: use a multiple of --ctx-len 16, e.g. 48")
    with pytest.raises(MonoscopeError, match=r"^--loss 'l2': use one of mse, e2e-kl, e2e-ce$"):
        TrainConfig(**{**SETTINGS, "loss": "l2"})
    from monoscope.train.distributed import _check_supported

    with pytest.raises(MonoscopeError) as e:
        _check_supported(TrainConfig(**SETTINGS), SimpleNamespace(fs=1, dp=2, world=2))  # type: ignore[arg-type]
    assert str(e.value) == ("--loss e2e-kl trains in one process (it runs the model, not a store): launch monoscope "
                            "train without torchrun, or use --loss mse")

    store = tmp_path / "acts"
    make_store(store, n_shards=1, contexts=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "monoscope.cli", "train", str(store), "--out", str(tmp_path / "b"),
                        "--arch", "topk", "--k", "4", "--tokens", "1k", "--batch-size", "64", "--loss", "e2e-kl",
                        "--quiet"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: --loss e2e-kl measures the loss through the model, which a store ({store}) "
                                "does not hold: pass --model MODEL (with --corpus and --hook) instead of the store, "
                                "or use --loss mse")
    assert not (tmp_path / "b").exists()
