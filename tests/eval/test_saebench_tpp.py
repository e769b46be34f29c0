"""SAEBench's targeted probe perturbation (TPP): the metric arithmetic, a hand-checkable synthetic SAE, golden values
on synthetic data and on the tiny model, and (when sae_bench is importable) a cross-check against SAEBench's own
`scr_and_tpp` code and probe trainer on the same activations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from monoscope.eval import saebench as sb
from tests.eval.saebench_helpers import RawSAE, saebench_scr_and_tpp_functions


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    return None


def test_tpp_metric_arithmetic() -> None:
    clean = {"a": 1.0, "b": 0.9, "c": 0.8}
    ablated = {"a": {2: {"a": 0.6, "b": 0.9, "c": 0.7}}, "b": {2: {"a": 1.0, "b": 0.5, "c": 0.8}},
               "c": {2: {"a": 0.9, "b": 0.9, "c": 0.8}}}
    mean, per = sb.tpp_metric(clean, ablated)
    # a: intended 0.4, unintended mean(0, 0.1) = 0.05 -> 0.35; b: 0.4 - 0 = 0.4; c: 0 - mean(0.1, 0) = -0.05
    assert per["a"]["tpp_threshold_2_total_metric"] == pytest.approx(0.35)
    assert per["a"]["tpp_threshold_2_unintended_diff_only"] == pytest.approx(0.05)
    assert per["b"]["tpp_threshold_2_total_metric"] == pytest.approx(0.4)
    assert per["c"]["tpp_threshold_2_total_metric"] == pytest.approx(-0.05)
    assert mean["tpp_threshold_2_total_metric"] == pytest.approx(0.7 / 3)
    assert mean["tpp_threshold_2_intended_diff_only"] == pytest.approx(0.8 / 3)


def test_top_n_latents_skips_zero_effects() -> None:
    eff = torch.tensor([0.0, 3.0, -1.0, 0.0, 2.0])
    assert sb.top_n_latents(eff, 2).tolist() == [1, 4]
    top = sb.top_n_latents(eff, 5).tolist()  # 3 non-zero effects: k = 3, and a zero outranks the negative one
    assert top[:2] == [1, 4] and top[2] in (0, 3)
    assert sb.top_n_latents(torch.zeros(4), 2).tolist() == []


def test_binary_task_balances_and_draws_from_every_other_class() -> None:
    idx = {"a": np.arange(0, 12), "b": np.arange(100, 110), "c": np.arange(200, 203)}
    sel, y = sb.binary_task(idx, "a", np.random.default_rng(0))
    assert y.tolist() == [1] * 12 + [0] * 12 or (y.sum() == len(y) // 2)
    neg = sel[y == 0]
    # ceil(12 / 2) = 6 asked from each other class; c has 3: 6 + 3 = 9 negatives, so 9 positives are kept
    assert len(neg) == 9 and (neg >= 200).sum() == 3 and y.sum() == 9


def _synthetic(n_per: int = 60, d: int = 8, F: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str],
                                                                                 torch.Tensor]:
    """Three classes; latent c (c < 3) is exactly the unit direction e_c and fires 3.0 on class c's texts only;
    latents 3.. are noise latents with random small decoder rows off e_0..e_2; x = f·W_dec + small noise."""
    rng = np.random.default_rng(seed)
    W = np.zeros((F, d), np.float32)
    W[:3, :3] = np.eye(3)
    W[3:, 3:] = 0.3 * rng.normal(size=(F - 3, d - 3))
    labels = [c for c in "abc" for _ in range(n_per)]
    f = np.zeros((len(labels), F), np.float32)
    for i, lab in enumerate(labels):
        f[i, "abc".index(lab)] = 3.0
        f[i, 3:] = np.maximum(rng.normal(size=F - 3), 0)
    x = f @ W + 0.05 * rng.normal(size=(len(labels), d))
    return x.astype(np.float32), f, labels, torch.from_numpy(W)


def test_hand_checkable_class_latent() -> None:
    """Probe c = e_c with bias −1.5: clean accuracy 1; ablating class c's top latent (its own, by effect) removes
    e_c, so probe c reads −1.5 on its positives (accuracy 0.5) and the other probes are untouched: TPP = 0.5."""
    x, f, labels, W = _synthetic()
    probes = {c: (torch.eye(8)[i], torch.tensor(-1.5)) for i, c in enumerate("abc")}
    cfg = sb.TPPConfig(n_values=[1])
    r = sb.tpp_task(x, f, labels, W, cfg, probes=probes)
    assert r["clean_accuracy"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert r["ablated_latents"] == {"a": {"1": [0]}, "b": {"1": [1]}, "c": {"1": [2]}}
    assert r["ablated_accuracy"]["a"]["1"] == {"a": 0.5, "b": 1.0, "c": 1.0}
    assert r["mean"] == pytest.approx({"tpp_threshold_1_total_metric": 0.5, "tpp_threshold_1_intended_diff_only": 0.5,
                                       "tpp_threshold_1_unintended_diff_only": 0.0}, abs=1e-7)


def test_tpp_task_golden_with_trained_probes() -> None:
    """SAEBench's trainer (20 epochs, lr 1e-3, batch 16, L1 1e-3) on the synthetic data; golden values (seeded)."""
    x, f, labels, W = _synthetic(n_per=100)
    r = sb.tpp_task(x, f, labels, W, sb.TPPConfig(n_values=[1, 2, 5]))
    got = {k: v for k, v in r["mean"].items() if k.endswith("total_metric")}
    assert got == pytest.approx(TASK_GOLDEN, abs=1e-6), got
    assert r["train_per_class"] == {"a": 80, "b": 80, "c": 80} and r["n_values_skipped"] == []


TASK_GOLDEN = {"tpp_threshold_1_total_metric": 0.02916666368643443, "tpp_threshold_2_total_metric": 0.02916667362054189,
               "tpp_threshold_5_total_metric": 0.09999999900658925}
"""Measured (seeded); SAEBench's short probe training leaves the probes close to their random start here, so the
class latents' effects compete with noise latents (the hand-checkable test above fixes the probes instead)."""


def test_tiny_model_golden(tmp_path: Path, tokenizer: Any) -> None:  # type: ignore[no-untyped-def]
    """End to end on the tiny model and SAE of tests/steer/helpers.make_run (`tpp`, with its own model pass)."""
    from monoscope.steer.target import open_target
    from tests.steer.helpers import make_run

    t = open_target(make_run(tmp_path, tokenizer, with_db=False), device="cpu", compute_dtype="fp32")
    cfg = sb.TPPConfig(max_per_class=40, probe_epochs=100, early_stopping_patience=100, packs=["sycophancy"])
    r = sb.tpp(t.lm, t.sae, t.hook, cfg)
    assert r["skipped_datasets"] == [{"name": "concepts", "reason": "1 classes; TPP needs at least 3"}]
    lang = r["datasets"]["language"]
    assert lang["classes"] == ["de", "es", "fr", "ja", "ru"] and lang["n_values_skipped"] == [500]
    assert r["higher_is_better"] == [f"tpp_threshold_{n}_total_metric" for n in (2, 5, 10, 20, 50, 100)]
    got = {k: v for k, v in r["mean"].items() if k.endswith("total_metric")}
    assert got == pytest.approx(TINY_GOLDEN, abs=1e-6), repr(got)


TINY_GOLDEN = {"tpp_threshold_2_total_metric": 0.0375, "tpp_threshold_5_total_metric": 0.065625,
               "tpp_threshold_10_total_metric": 0.065625, "tpp_threshold_20_total_metric": 0.065625,
               "tpp_threshold_50_total_metric": 0.059375, "tpp_threshold_100_total_metric": 0.01875}
"""Measured on the tiny model and SAE (seeded); 100 probe epochs because the tiny model's residual (norm ~0.13)
leaves SAEBench's 20 at chance."""


def test_tpp_without_a_multiclass_dataset_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    r = sb.tpp(None, None, None, sb.TPPConfig(), datasets=[])
    assert r["mean"] == {} and r["reason"] == ("no offline dataset with at least 3 classes of 10+ texts (install "
                                               "django for its translation catalogues, or use more concept packs)")
    sb.print_saebench_summary({"absorption": {"mean_absorption_fraction_score": None, "mean_full_absorption_score":
                               None, "letters_evaluated": 0, "words": 0}, "sparse_probing": {"mean": {}}, "tpp": r},
                              "x.json")
    out = capsys.readouterr().out.splitlines()
    assert out[-3:-1] == ["TPP datasets                            none",
                          "note: TPP not computed: " + r["reason"]]


def test_families_are_checked() -> None:
    assert sb.check_families(["scr", "tpp", "absorption"]) == ["absorption", "tpp", "scr"]
    with pytest.raises(sb.MonoscopeError) as e:
        sb.run_saebench("/nonexistent/sae", families=["tpp", "ravel"])  # refused before anything is opened
    assert str(e.value) == ("--saebench-metrics: unknown metric family 'ravel' (choose from absorption, probing, tpp, "
                            "scr, comma-separated)")
    with pytest.raises(sb.MonoscopeError, match="name at least one of absorption, probing, tpp, scr"):
        sb.check_families([])


def test_tpp_datasets_drop_small_classes() -> None:
    """ja has 80 messages of 20+ characters and each pack 60 positives: under min_per_class=90 they are dropped."""
    ds, skipped = sb.tpp_datasets(sb.TPPConfig(max_per_class=100, min_per_class=90, languages=["de", "fr", "es", "ja"],
                                               packs=["sycophancy", "bias", "deception"]))
    assert [d.name for d in ds] == ["language"] and sorted(set(ds[0].labels)) == ["de", "es", "fr"]
    assert len(ds[0].texts) == 300
    assert skipped == [{"name": "concepts", "reason": "0 classes; TPP needs at least 3"}]


# ------------------------------------------------------------------------------ cross-check with SAEBench
def _saebench_tpp_functions() -> dict[str, Any]:
    """SAEBench's TPP functions (`saebench_helpers`)."""
    return saebench_scr_and_tpp_functions({
        "get_effects_per_class_precomputed_acts", "get_all_node_effects_for_one_sae", "select_top_n_features",
        "ablated_precomputed_activations", "get_probe_test_accuracy", "perform_feature_ablations",
        "create_tpp_plotting_dict"})


def test_tpp_probe_trainer_matches_saebench_code() -> None:
    """SAEBench's `train_probe_gpu` from torch's global generator seeded s and monoscope's `train_tpp_probe` from
    a generator seeded s: the same initial weights, batches and steps, so the same probe and best accuracy."""
    pt = pytest.importorskip("sae_bench.evals.sparse_probing.probe_training",
                             reason="sae_bench not importable (see docs/saebench.md for the cross-check)")
    x, _, labels, _ = _synthetic(n_per=50)
    y = (np.array(labels) == "a").astype(np.int64)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    tr, te = slice(0, 120), slice(120, 150)
    w, b, acc = sb.train_tpp_probe(xt[tr], yt[tr], xt[te], yt[te], seed=7)
    torch.manual_seed(7)
    with torch.enable_grad():
        probe, their_acc = pt.train_probe_gpu(xt[tr], yt[tr].int(), xt[te], yt[te].int(), dim=8, batch_size=16,
                                              epochs=20, lr=1e-3, l1_penalty=1e-3, early_stopping_patience=20)
    assert torch.allclose(w, probe.net.weight.detach()[0], atol=1e-6)
    assert torch.allclose(b, probe.net.bias.detach()[0], atol=1e-6)
    assert acc == pytest.approx(their_acc, abs=1e-9)


def test_tpp_matches_saebench_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the same probes and the same binary train/test sets (SAEBench's `prepare_probe_data` draws them at
    random; here it returns monoscope's draw), SAEBench's node effects, top-n selection, per-token ablation with the
    error term, probe accuracies and TPP metric equal monoscope's pooled ones on the same per-token activations."""
    ns = _saebench_tpp_functions()
    pt = ns["probe_training"]
    from monoscope.sae import SAEConfig, build_sae

    torch.manual_seed(0)
    C, per, L, d, F = 4, 30, 5, 16, 64
    sae = build_sae(SAEConfig(arch="topk", d_in=d, d_sae=F, k=8, normaliser=2.0, compute_dtype="float32",
                              init_decoder_norm=1.0), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    centers = 1.5 * torch.randn(C, d, generator=g)
    labels = [str(c) for c in range(C) for _ in range(per)]
    tokens = torch.stack([centers[int(lab)] + torch.randn(L, d, generator=g) for lab in labels])  # [N, L, d]
    with torch.no_grad():
        codes = sae.encode_raw(tokens.reshape(-1, d)).reshape(len(labels), L, F)
    x, f = tokens.mean(1).numpy(), codes.mean(1).numpy()
    cfg = sb.TPPConfig(n_values=[2, 5, 10, 20])
    train, test = sb.tpp_split(labels, cfg.train_fraction, cfg.seed)
    classes = sorted(train)
    probes = {}
    for c in classes:
        probes[c] = pt.Probe(d, torch.float32)
        with torch.no_grad():
            probes[c].net.weight.copy_(torch.randn(1, d, generator=g) + 2 * centers[int(c)] / centers[int(c)].norm())
            probes[c].net.bias.fill_(-float(centers[int(c)].norm()))
    ours = sb.tpp_task(x, f, labels, sae.W_dec.detach() / 2.0, cfg,
                       probes={c: (p.net.weight.detach()[0], p.net.bias.detach()[0]) for c, p in probes.items()})

    def by_class(split: dict[str, np.ndarray], src: torch.Tensor) -> dict[str, torch.Tensor]:
        return {c: src[torch.from_numpy(split[c])] for c in classes}

    where = {int(i): (c, k) for split in (train, test) for c in classes for k, i in enumerate(split[c])}

    def prepare(acts: dict[str, torch.Tensor], cls: str, perform_scr: bool = False) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
        split, s = (train, 0) if len(acts[cls]) == len(train[cls]) else (test, 1)
        idx, y = sb.binary_task(split, cls, np.random.default_rng([cfg.seed, classes.index(cls), s]))
        rows = torch.stack([acts[where[int(i)][0]][where[int(i)][1]] for i in idx])
        return rows, torch.from_numpy(y).int()

    monkeypatch.setattr(pt, "prepare_probe_data", prepare)
    raw = RawSAE(sae)
    with torch.no_grad():
        effects = ns["get_all_node_effects_for_one_sae"](raw, probes, classes, False, by_class(train, tokens), 125)
        ablated = ns["perform_feature_ablations"](probes, raw, 125, by_class(test, tokens), effects, cfg.n_values,
                                                  classes, 500, False)
        clean = ns["get_probe_test_accuracy"](probes, classes, by_class(test, tokens.mean(1)), 500, False)
    theirs, theirs_per_class = ns["create_tpp_plotting_dict"](ablated, clean)
    for c in classes:
        for n in cfg.n_values:
            mask = ns["select_top_n_features"](effects[c], n, c)
            assert set(ours["ablated_latents"][c][str(n)]) == set(mask.nonzero().squeeze(1).tolist()), (c, n)
            assert ours["ablated_accuracy"][c][str(n)] == pytest.approx(ablated[c][n], abs=1e-9), (c, n)
    assert ours["clean_accuracy"] == pytest.approx(clean, abs=1e-9)
    assert ours["mean"] == pytest.approx(theirs, abs=1e-9)
    for c in classes:
        assert ours["per_class"][c] == pytest.approx(theirs_per_class[c], abs=1e-9), c
    assert len({round(v, 6) for k, v in theirs.items() if k.endswith("total_metric")}) > 1  # not all equal
