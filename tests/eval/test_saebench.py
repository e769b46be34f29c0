"""SAEBench-compatible metrics: the per-word absorption rule, feature splits, probes, the tiny-model run with
golden values, the CLI's one-line error, and (when sae_bench is importable) a cross-check against SAEBench's
own code on the same activations."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from monoscope.eval import saebench as sb
from tests.steer.helpers import run_cli

CFG = sb.AbsorptionConfig()


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    return None


def _word(contrib: list[float], cos: list[float], x_proj: float, main: list[int]) -> tuple[float, bool]:
    c = np.array(contrib, dtype=np.float32)
    return sb.word_absorption(np.maximum(c, 0) * 2, x_proj, c, np.array(cos, dtype=np.float32), main, CFG)


def test_word_absorption_rules() -> None:
    # the letter's own latent carries the whole projection: no absorption
    assert _word([1.0, 0.0, 0.0], [0.9, 0.5, 0.0], 1.0, [0]) == (0.0, False)
    # own latent silent, one probe-aligned latent carries 80%: absorbed fully, and full absorption
    assert _word([0.0, 0.8, 0.1], [0.9, 0.5, 0.05], 1.0, [0]) == (1.0, True)
    # own latent carries 0.3, an absorber 0.5 of the 0.7 left: 0.5 / (0.5 + 0.3); not full (own latent fires)
    frac, full = _word([0.3, 0.5, 0.0], [0.9, 0.5, 0.0], 1.0, [0])
    assert frac == pytest.approx(0.625) and not full
    # absorbers below the 0.4 proportion threshold: no absorption even with the own latent silent
    assert _word([0.0, 0.3, 0.0], [0.9, 0.5, 0.0], 1.0, [0]) == (0.0, False)
    # an absorber whose cosine is under 0.1 does not count for the fraction; still full (cos >= 0.025)
    assert _word([0.0, 0.9, 0.0], [0.9, 0.05, 0.0], 1.0, [0]) == (0.0, True)


def test_feature_splits_grow_while_f1_jumps() -> None:
    feats = [[7], [7, 3], [7, 3, 9], [7, 3, 9, 1]]
    assert sb.feature_splits([0.5, 0.6, 0.61, 0.9], feats, 0.03) == [7, 3]
    assert sb.feature_splits([0.5, 0.52, 0.9, 0.95], feats, 0.03) == [7]


def test_multi_probe_separates_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    y = torch.nn.functional.one_hot(x[:, :3].argmax(1), 3)
    w1, b1 = sb.train_multi_probe(x, y, epochs=50, seed=1, batch_size=32)
    w2, b2 = sb.train_multi_probe(x, y, epochs=50, seed=1, batch_size=32)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    acc = ((x @ w1.T + b1).argmax(1) == y.argmax(1)).float().mean().item()
    assert acc > 0.85
    wl, _ = sb.train_multi_probe(x, y, epochs=50, seed=1, l1=0.05, batch_size=32)  # L1: noise dimensions ~0
    assert wl[:, 3:].abs().max() < 0.05 < wl[:, :3].abs().max()


def test_alpha_tokens_and_prompt(tokenizer) -> None:  # type: ignore[no-untyped-def]
    words = sb.alpha_tokens(tokenizer)
    assert len(words) == 91 and words[:4] == [" a", " b", " br", " de"]
    p = sb.icl_prompt(" fox", words, random.Random(0), CFG.prompt_template, 2)
    lines = p.split("\n")
    assert lines[0] == "" and lines[-1] == " fox has the first letter:" and len(lines) == 4
    assert all(ln.endswith(" has the first letter: " + ln.strip()[0].upper()) for ln in lines[1:3])


def test_tiny_model_golden(tmp_path: Path, tokenizer, capsys) -> None:  # type: ignore[no-untyped-def]
    from tests.steer.helpers import make_run

    sae_dir = make_run(tmp_path, tokenizer, with_db=False)
    path, _ = sb.run_saebench(sae_dir, out=tmp_path / "out", device="cpu", max_words=300, max_per_class=30,
                              packs=["sycophancy"])
    saved = json.loads(path.read_text())
    assert saved["format"] == "monoscope-saebench/1" and saved["families"] == ["absorption", "probing", "tpp", "scr"]
    assert {k for k in saved["differences_from_saebench"] if k.startswith("scr")} == {
        "scr.datasets", "scr.sizes", "scr.probe_seed", "scr.ablations", "scr.ablation", "scr.effects", "scr.n_values"}
    assert {k for k in saved["differences_from_saebench"] if k.startswith("tpp.")} == {
        "tpp.datasets", "tpp.sizes", "tpp.negatives", "tpp.probe_seed", "tpp.ablation", "tpp.effects", "tpp.n_values"}
    a = saved["absorption"]
    assert (a["words"], a["train_words"], a["letters_evaluated"]) == (91, 72, 1)
    assert a["mean_absorption_fraction_score"] is None and "SAEBench requires 20" in a["reason"]
    assert a["lower_is_better"] == ["mean_absorption_fraction_score", "mean_full_absorption_score"]
    p = saved["sparse_probing"]
    assert [(t["dataset"], t["class"], t["test"]) for t in p["tasks"]] == [
        ("pack:sycophancy", "1", 24), ("language", "de", 12), ("language", "es", 12), ("language", "fr", 12),
        ("language", "ja", 12), ("language", "ru", 12), ("code", "docstring", 12)]
    golden = GOLDEN_MEAN
    for k, v in golden.items():
        assert p["mean"][k] == pytest.approx(v, abs=1e-6), k
    # TPP at SAEBench's probe defaults: the tiny model's residual (norm ~0.13) leaves 20 epochs at lr 1e-3 near chance
    # (tests/eval/test_saebench_tpp.py trains longer for golden values that move)
    t = saved["tpp"]
    assert list(t["datasets"]) == ["language"] and t["skipped_datasets"][0]["name"] == "concepts"
    assert t["datasets"]["language"]["clean_accuracy"] == pytest.approx(
        {"de": 0.5833333134651184, "es": 0.5, "fr": 0.5, "ja": 0.5, "ru": 0.5}, abs=1e-6)
    assert t["higher_is_better"] == [f"tpp_threshold_{n}_total_metric" for n in (2, 5, 10, 20, 50, 100)]
    assert [t["mean"][k] for k in t["higher_is_better"]] == pytest.approx([-0.004166665673255921] * 5 + [0.0],
                                                                          abs=1e-6)
    # SCR at its defaults (2 place-name runs, he/she, 100 / 50 texts per quadrant) on the tiny random model: noise
    # around the small-gap rule, checked for being the same (tests/eval/test_saebench_scr.py has the arithmetic)
    r = saved["scr"]
    assert sorted(r["datasets"]) == ["city_country_he_she", "country_city_he_she"] and r["skipped_datasets"] == []
    assert r["higher_is_better"] == [f"scr_metric_threshold_{n}" for n in (2, 5, 10, 20, 50, 100)]
    assert [r["mean"][k] for k in r["higher_is_better"]] == pytest.approx([-1.75, 0.0, 0.75, 0.25, 0.5, 0.75], abs=1e-5)
    sb.print_saebench_summary(saved, path)
    out = capsys.readouterr().out.splitlines()
    assert "tpp_threshold_20_total_metric (higher is better) -0.0042" in out
    assert "TPP datasets (skipped: concepts)        language" in out
    assert "scr_metric_threshold_20 (higher is better) 0.2500" in out
    assert "SCR datasets                            city_country_he_she, country_city_he_she" in out  # keys sorted


GOLDEN_MEAN = {"llm_test_accuracy": 0.5714285714285714, "sae_test_accuracy": 0.7916666666666667,
               "sae_top_1_test_accuracy": 0.6666666666666667, "sae_top_2_test_accuracy": 0.6666666666666667,
               "sae_top_5_test_accuracy": 0.7202380952380951}
"""Measured on the tiny model and SAE of tests/steer/helpers.make_run (seeded)."""


def test_cli_needs_acts_or_saebench(tmp_path: Path) -> None:
    r = run_cli("eval", str(tmp_path / "sae"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: monoscope eval needs --acts STORE (the store of the SAE's model and hook), "
                                "or --saebench for the SAEBench metrics")


# ------------------------------------------------------------------------------ cross-check with SAEBench
class _FakeTL:
    """What SAEBench's FeatureAbsorptionCalculator asks of a HookedTransformer, answered from fixed
    activations: the word's activation at the read position of each prompt."""

    def __init__(self, acts: dict[str, torch.Tensor], pos: int) -> None:
        self.acts, self.pos = acts, pos
        self.tokenizer = None

    def to_tokens(self, text: str) -> torch.Tensor:
        return torch.zeros(1, 12, dtype=torch.long)

    def run_with_cache(self, prompts: list[str], names_filter: list[str]) -> tuple[None, dict[str, torch.Tensor]]:
        d = next(iter(self.acts.values())).shape[0]
        out = torch.zeros(len(prompts), 12, d)
        for i, p in enumerate(prompts):
            word = p.split("\n")[-1][: -len(" has the first letter:")]
            out[i, self.pos] = self.acts[word]
        return None, {names_filter[0]: out}


class _FakeSAE:
    def __init__(self, sae: Any) -> None:
        self.sae, self.device, self.W_dec = sae, torch.device("cpu"), sae.W_dec.detach()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode_raw(x)


def test_absorption_matches_saebench_code() -> None:
    calc_mod = pytest.importorskip("sae_bench.evals.absorption.feature_absorption_calculator",
                                   reason="sae_bench not importable (see docs/saebench.md for the cross-check)")
    from monoscope.sae import SAEConfig, build_sae

    torch.manual_seed(0)
    d, F = 16, 64
    sae = build_sae(SAEConfig(arch="topk", d_in=d, d_sae=F, k=6, normaliser=1.0, compute_dtype="float32",
                              init_decoder_norm=1.0), seed=0).eval()
    probe = torch.randn(d)
    probe /= probe.norm()
    with torch.no_grad():  # latents 0-3 point along the probe, so absorption happens
        for i in range(4):
            v = probe + 0.6 * torch.randn(d)
            sae.W_dec[i] = v / v.norm()
            sae.W_enc[i] = sae.W_dec[i]
        sae.b_dec.zero_()
        if hasattr(sae, "b_enc"):
            sae.b_enc.zero_()
    words = [f" w{i}" for i in range(60)]
    acts = {w: 2 * torch.randn(d) + 3 * sae.W_dec[i % 4].detach() for i, w in enumerate(words)}
    calc = calc_mod.FeatureAbsorptionCalculator(model=_FakeTL(acts, 5), icl_word_list=words[:20],
                                                max_icl_examples=2, base_template="{word} has the first letter:",
                                                word_token_pos=5, batch_size=7)
    main = [0]
    theirs = calc.calculate_absorption(_FakeSAE(sae), words=words, probe_direction=probe, main_feature_ids=main,
                                       layer=0, show_progress=False)
    W = sae.W_dec.detach().numpy()
    cos = W @ probe.numpy() / np.linalg.norm(W, axis=1)
    fracs, fulls = [], []
    with torch.no_grad():
        for w, r in zip(words, theirs.word_results, strict=True):
            f = sae.encode_raw(acts[w][None])[0].numpy()
            frac, full = sb.word_absorption(f, float(acts[w] @ probe), f * np.linalg.norm(W, axis=1) * cos, cos,
                                            main, CFG)
            assert frac == pytest.approx(float(r.absorption_fraction), abs=1e-5), w
            assert full == bool(r.is_full_absorption), w
            fracs.append(frac)
            fulls.append(full)
    assert 0 < sum(f > 0 for f in fracs) < len(words) and any(fulls)  # the check saw both outcomes


def test_sparse_probing_matches_saebench_code() -> None:
    """SAEBench's own top-k selection and sklearn probe (`get_top_k_mean_diff_mask`, `apply_topk_mask_reduce_dim`,
    `train_sklearn_probe`) on the same pooled activations pick the same latents and give the same accuracies."""
    pt = pytest.importorskip("sae_bench.evals.sparse_probing.probe_training",
                             reason="sae_bench not importable (see docs/saebench.md for the cross-check)")
    rng = np.random.default_rng(0)
    n, d, F = 240, 12, 48
    y = np.repeat([1, 0], n // 2)
    x = rng.normal(size=(n, d)) + 0.8 * y[:, None] * rng.normal(size=d)
    f = np.maximum(rng.normal(size=(n, F)) + np.outer(y, rng.uniform(0, 1.5, F) * (rng.random(F) < 0.2)), 0)
    perm = rng.permutation(n)
    x, f, y = x[perm].astype(np.float32), f[perm].astype(np.float32), y[perm]
    tr, te = slice(0, 192), slice(192, n)
    ours = sb.probe_task(x[tr], x[te], f[tr], f[te], y[tr], y[te], (1, 2, 5))

    def theirs(a: np.ndarray, k: int | None) -> tuple[set[int], float]:
        a_tr, a_te = torch.from_numpy(a[tr]), torch.from_numpy(a[te])
        y_tr, y_te = torch.from_numpy(y[tr]), torch.from_numpy(y[te])
        kept = set(range(a.shape[1]))
        if k is not None:
            mask = pt.get_top_k_mean_diff_mask(a_tr, y_tr, k)
            kept = set((~mask).nonzero().squeeze(1).tolist())
            a_tr, a_te = pt.apply_topk_mask_reduce_dim(a_tr, mask), pt.apply_topk_mask_reduce_dim(a_te, mask)
        return kept, pt.train_sklearn_probe(a_tr, y_tr, a_te, y_te)[1]

    assert ours["llm_test_accuracy"] == pytest.approx(theirs(x, None)[1], abs=1e-9)
    assert ours["sae_test_accuracy"] == pytest.approx(theirs(f, None)[1], abs=1e-9)
    for k in (1, 2, 5):
        feats, acc = theirs(f, k)
        assert set(ours[f"sae_top_{k}_features"]) == feats
        assert ours[f"sae_top_{k}_test_accuracy"] == pytest.approx(acc, abs=1e-9), k
    assert len({ours[f"sae_top_{k}_test_accuracy"] for k in (1, 2, 5)}) > 1  # the check saw different probes
