"""Transcoder and crosscoder end to end on a saved tiny Llama: a multi-hook capture in one forward, training,
evaluation (FVU against the target, the transcoder splice checked against a hand-made splice, a crosscoder's
per-hook FVU), the features pass and `show` on a transcoder, and the one-line errors a user can cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from monoscope.capture import capture
from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.eval import evaluate
from monoscope.eval.data import heldout_contexts, store_rows
from monoscope.model import load_model
from monoscope.sae import SAEConfig, load_sae
from monoscope.store import ActivationStore
from monoscope.train import train
from tests.conftest import TRAIN_TEXT, make_llama, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"ctx_len": 16, "batch_contexts": 4, "contexts_per_shard": 8, "progress": False, "compute_dtype": "fp32"}
TRAIN = {"width": "2x", "tokens": 64 * 60, "batch_size": 64, "lr": 3e-3, "progress": False, "log_every": 20,
         "checkpoint_every": 30}
PAIR = "mlp_in.1,mlp_out.1"
LAYERS = "resid_post.0,resid_post.1,resid_post.2"
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model (evaluate reloads it), a corpus, a paired store and a three-layer store."""
    t = tmp_path_factory.mktemp("multihook")
    tok = make_tokenizer()
    make_llama(len(tok), seed=5).save_pretrained(t / "model")
    tok.save_pretrained(t / "model")
    (t / "corpus.jsonl").write_text("".join(json.dumps({"text": f"{x} number {i}"}) + "\n"
                                            for i, x in enumerate(TRAIN_TEXT * 3)))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    for name, hooks in (("pair", PAIR), ("layers", LAYERS), ("out", "mlp_out.1")):
        capture(t / name, model=str(t / "model"), corpus=str(t / "corpus.jsonl"), hook=hooks, tokens=640, **SMALL)
    train(t / "tc", store=t / "pair", arch="transcoder", k=4, **TRAIN)
    train(t / "xc", store=t / "layers", arch="crosscoder", k=8, **TRAIN)
    torch.set_num_threads(n)
    return t


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "monoscope.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=300)


def test_paired_store_holds_both_hooks_of_one_forward(run: Path) -> None:
    pair, single = ActivationStore.open(run / "pair"), ActivationStore.open(run / "out")
    m = pair.manifest
    assert m.hooks == ["mlp_in.1", "mlp_out.1"] and m.row_width == 2 * m.d_model == 128
    # the target half is byte for byte what a capture of mlp_out.1 alone stores
    for (ta, a), (tb, b) in zip(pair.iter_contexts(), single.iter_contexts(), strict=True):
        assert torch.equal(ta, tb) and torch.equal(a[:, 64:], b)
    # each hook's normaliser: E‖c_h·x_h‖² = d_model over the kept rows
    rows = torch.cat([x for x, _ in store_rows(pair, pair.n_rows)])
    for h, c in enumerate(m.hook_normalisers):
        block = rows[:, h * 64:(h + 1) * 64].double()
        assert float((c * block).square().sum(1).mean()) == pytest.approx(64.0, rel=1e-9)
    # a one-hook store's records keep their old form (no per-hook sums)
    assert "sum_sq_hooks" not in json.loads((run / "out" / "manifest.json").read_text())["shards"][0]
    assert "sum_sq_hooks" in json.loads((run / "pair" / "manifest.json").read_text())["shards"][0]


def test_transcoder_eval_fvu_on_the_target_and_splice_in_place_of_the_mlp(run: Path) -> None:
    sae = load_sae(run / "tc")
    assert sae.cfg.arch == "transcoder" and sae.cfg.hook == "mlp_in.1" and sae.cfg.target_hook == "mlp_out.1"
    res = evaluate(run / "tc", acts=run / "pair", lm=True, tokens=300, batch_contexts=4, progress=False)
    # FVU against the target hook, computed here from the store rows
    rows = torch.cat([x for x, _ in store_rows(ActivationStore.open(run / "pair"), 300)])
    with torch.no_grad():
        y_hat = sae.reconstruct_raw(rows[:, :64])
    y = rows[:, 64:].double()
    fvu = float((y - y_hat.double()).square().sum() / (y - y.mean(0)).square().sum())
    assert res.store.fvu == pytest.approx(fvu, rel=1e-6) and 0.05 < fvu < 0.9
    lm = res.lm
    assert lm is not None and lm.ce_error == pytest.approx(lm.ce_clean, abs=1e-5)
    # the spliced CE is that of a plain forward whose MLP output is the transcoder's output on its input
    model = load_model(str(run / "model"), compute_dtype="fp32")
    store = ActivationStore.open(run / "pair")
    policy = store.manifest.row_policy
    mlp = model.model.model.layers[1].mlp

    def replace(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        keep = policy.keep(torch.cat([args[0], out], -1))
        new = out.clone()
        new[keep] = sae.reconstruct_raw(args[0][keep]).to(out.dtype)
        return new

    nll, n = 0.0, 0
    bos = model.special_ids()[0]
    handle = mlp.register_forward_hook(replace)
    try:
        with torch.inference_mode():
            for ids in heldout_contexts(store, model, -(-300 // 16), 4):
                logp = torch.log_softmax(model.model(input_ids=ids).logits.float(), -1)
                tgt = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
                mask = ids[:, :-1] != bos
                nll -= float(tgt[mask].sum())
                n += int(mask.sum())
    finally:
        handle.remove()
    assert lm.predictions == n and lm.ce_spliced == pytest.approx(nll / n, abs=1e-5)
    assert lm.ce_spliced != pytest.approx(lm.ce_clean, abs=1e-5)
    saved = json.loads((run / "tc-eval" / "metrics.json").read_text())
    assert saved["sae"]["target_hook"] == "mlp_out.1" and saved["store"]["hook"] == PAIR


def test_crosscoder_reports_fvu_per_hook(run: Path) -> None:
    sae = load_sae(run / "xc")
    assert sae.cfg.d_in == 3 * 64 and sae.cfg.hook == LAYERS and len(sae.cfg.hook_normalisers or []) == 3
    res = evaluate(run / "xc", acts=run / "layers", tokens=300, progress=False, plots=False)
    per = res.metrics["per_hook"]
    assert list(per) == LAYERS.split(",")
    assert sum(p["mse"] for p in per.values()) == pytest.approx(res.store.mse, rel=1e-9)  # blocks of one row
    rows = torch.cat([x for x, _ in store_rows(ActivationStore.open(run / "layers"), 300)])
    with torch.no_grad():
        x_hat = sae.reconstruct_raw(rows)
    for i, p in enumerate(per.values()):
        x, xh = rows[:, i * 64:(i + 1) * 64].double(), x_hat[:, i * 64:(i + 1) * 64].double()
        assert p["fvu"] == pytest.approx(float((x - xh).square().sum() / (x - x.mean(0)).square().sum()), rel=1e-6)
        assert 0.0 < p["fvu"] < 0.9


def _grab(acts: list[torch.Tensor]) -> Any:
    def hook(_m: torch.nn.Module, _a: Any, out: Any) -> None:
        acts.append(out[0] if isinstance(out, tuple) else out)
    return hook


def _put(keep: torch.Tensor, block: torch.Tensor) -> Any:
    def hook(_m: torch.nn.Module, _a: Any, out: Any) -> Any:
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[keep] = block.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h
    return hook


def test_crosscoder_splice_replaces_every_layer_with_its_reconstruction(run: Path) -> None:
    """`eval --lm` on a crosscoder: every read layer's kept rows replaced at once by the crosscoder's
    reconstruction of that layer from the clean activations of all layers, checked against a hand-made
    two-pass splice; the error term added back gives the clean loss."""
    sae = load_sae(run / "xc")
    res = evaluate(run / "xc", acts=run / "layers", lm=True, tokens=300, batch_contexts=4, progress=False,
                   plots=False, out=run / "xc-lm")
    lm = res.lm
    assert lm is not None and lm.ce_error == pytest.approx(lm.ce_clean, abs=1e-5)
    assert res.metrics["lm_eval"]["stacked_variants"] is False
    model = load_model(str(run / "model"), compute_dtype="fp32")
    store = ActivationStore.open(run / "layers")
    policy = store.manifest.row_policy
    layers = [model.model.model.layers[i] for i in range(3)]
    bos = model.special_ids()[0]
    nll, n = 0.0, 0
    with torch.inference_mode():
        for ids in heldout_contexts(store, model, -(-300 // 16), 4):
            acts: list[torch.Tensor] = []
            hs = [m.register_forward_hook(_grab(acts)) for m in layers]
            model.model(input_ids=ids)
            for h in hs:
                h.remove()
            row = torch.cat(acts, -1)
            keep = policy.keep(row)
            x_hat = sae.reconstruct_raw(row[keep].float())
            hs = [m.register_forward_hook(_put(keep, x_hat[:, i * 64:(i + 1) * 64])) for i, m in enumerate(layers)]
            try:
                logp = torch.log_softmax(model.model(input_ids=ids).logits.float(), -1)
            finally:
                for h in hs:
                    h.remove()
            tgt = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            mask = ids[:, :-1] != bos
            nll -= float(tgt[mask].sum())
            n += int(mask.sum())
    assert lm.predictions == n and lm.ce_spliced == pytest.approx(nll / n, abs=1e-5)
    # the reconstruction is much nearer the clean loss than zero ablation (on this random tiny model a splice can
    # land a hair below the clean loss, so clean < spliced is not asserted)
    assert abs(lm.ce_spliced - lm.ce_clean) < 0.5 * (lm.ce_zero - lm.ce_clean)


def test_features_and_show_on_a_transcoder_read_its_input_hook(run: Path) -> None:
    done = cli("features", str(run / "tc"), "--tokens", "300", "--batch-contexts", "4", "--no-map", "--quiet",
               "--compute-dtype", "fp32")
    assert done.returncode == 0, done.stderr
    from monoscope.features.db import FeatureDB

    with FeatureDB.open(run / "tc-features" / "features.db") as db:
        assert db.meta()["hook"] == "mlp_in.1"
        fid = db.features_with_examples()[0]
    shown = cli("show", str(run / "tc"), str(fid))
    assert shown.returncode == 0, shown.stderr
    assert f"feature {fid}" in shown.stdout.lower()


def test_features_of_a_crosscoder_read_every_layer_from_one_forward(run: Path) -> None:
    """The pass encodes the layers side by side (the training store's rows: densities add up to eval's L0) and
    the logit effects read the block the crosscoder writes to its last layer."""
    from monoscope.features.build import _logit_effects, build_features
    from monoscope.features.db import FeatureDB

    res = build_features(run / "xc", tokens=320, batch_contexts=4, feature_map=False, progress=False,
                         compute_dtype="fp32")
    sae = load_sae(run / "xc")
    ev = evaluate(run / "xc", acts=run / "layers", tokens=600, progress=False, plots=False)
    with FeatureDB.open(res.dbs[0]) as db:
        assert db.meta()["hook"] == LAYERS
        density = db.conn.execute("SELECT SUM(density) FROM features").fetchone()[0]
        fid = db.features_with_examples()[0]
        top = db.feature(fid)["logit_pos"]
        vocab = dict(db.conn.execute("SELECT id, text FROM vocab").fetchall())
    assert density == pytest.approx(ev.store.l0_mean, rel=0.05)
    model = load_model(str(run / "model"), compute_dtype="fp32")
    promoted = _logit_effects(sae, model)[0][fid]
    last = sae.W_dec[fid, -64:].float()
    direct = model.model.lm_head.weight.float() @ (last / last.square().mean().sqrt())
    assert int(promoted[0]) == int(direct.argmax())
    assert top[0][0] == vocab[int(direct.argmax())]


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*argv, "--quiet"] if argv[0] in ("train", "eval", "capture") else argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_bad_input_is_one_line(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, corpus = str(run / "model"), str(run / "corpus.jsonl")
    cap = ["capture", "--model", model, "--corpus", corpus, "--tokens", "64", "--ctx-len", "16",
           "--compute-dtype", "fp32"]
    # a transcoder on hooks of different layers names the pair to capture
    capture(run / "skew", model=model, corpus=corpus, hook="mlp_in.1,mlp_out.2", tokens=320, **SMALL)
    err = one_line_error(["train", str(run / "skew"), "--out", str(run / "bad1"), "--arch", "transcoder", "--k", "4",
                          "--tokens", "640", "--batch-size", "64"], capsys)
    assert "different layers (mlp_in.1 -> mlp_out.2)" in err and "--hook mlp_in.2,mlp_out.2" in err
    err = one_line_error(["train", str(run / "pair"), "--out", str(run / "bad2"), "--arch", "topk", "--k", "4",
                          "--tokens", "640", "--batch-size", "64"], capsys)
    assert "holds 2 hooks side by side (mlp_in.1,mlp_out.1)" in err and "--arch transcoder" in err
    err = one_line_error(["train", str(run / "out"), "--out", str(run / "bad3"), "--arch", "crosscoder", "--k", "4",
                          "--tokens", "640", "--batch-size", "64"], capsys)
    assert "holds one (mlp_out.1)" in err and "--hook resid_post.2,resid_post.4,resid_post.6" in err
    err = one_line_error(["train", str(run / "out"), "--out", str(run / "bad4"), "--arch", "transcoder", "--k", "4",
                          "--tokens", "640", "--batch-size", "64"], capsys)
    assert "--hook mlp_in.L,mlp_out.L" in err
    err = one_line_error([*cap, "--hook", "mlp_in.1,mlp_outt.1", "--out", str(run / "bad5")], capsys)
    assert "unknown hook point 'mlp_outt.1'" in err and "mlp_in.0..3" in err
    err = one_line_error([*cap, "--hook", "mlp_in.1,mlp_in.1", "--out", str(run / "bad6")], capsys)
    assert "names a hook twice" in err
    err = one_line_error(["eval", str(run / "tc"), "--acts", str(run / "out")], capsys)
    assert "--hook mlp_in.1,mlp_out.1" in err
    err = one_line_error(["convert", str(run / "tc"), "--to", "saelens", "--out", str(run / "bad7")], capsys)
    assert "no TopK one" in err
    with pytest.raises(MonoscopeError, match=r"crosscoder widths do not match: d_in=100 is not 3 hooks"):
        SAEConfig(arch="crosscoder", d_in=100, d_sae=64, k=4, hook_normalisers=[1.0, 1.0, 1.0])
    from monoscope.pipeline import RunConfig

    with pytest.raises(MonoscopeError, match="monoscope run trains SAEs on one hook"):
        RunConfig(out=run / "r", hook=PAIR)
    # the real command in a child process
    done = cli(*cap, "--hook", "mlp_in.9,mlp_out.9", "--out", str(run / "bad8"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "layer 9 is out of range for a 4-layer model" in done.stderr
