"""SAEBench's spurious correlation removal (SCR): the metric arithmetic, the offline place-name dataset, a
hand-checkable synthetic SAE, golden values on synthetic data and on the tiny model, and (when sae_bench is
importable) a cross-check against SAEBench's own `scr_and_tpp` code on the same activations."""

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


def _clean(intended: float = 0.9, spurious: float = 1.0, b_on_i: float = 0.6, b_on_s: float = 0.95) -> dict[str,
                                                                                                             float]:
    return {"spurious": spurious, "intended": intended, "biased": 1.0, "biased probe on intended data": b_on_i,
            "biased probe on spurious data": b_on_s}


def test_scr_metric_arithmetic() -> None:
    clean = _clean()
    ablated = {"spurious": {2: {"biased probe on intended data": 0.75, "biased probe on spurious data": 0.7},
                            20: {"biased probe on intended data": 0.55, "biased probe on spurious data": 0.6}},
               "intended": {2: {"biased probe on intended data": 0.5, "biased probe on spurious data": 0.97},
                            20: {"biased probe on intended data": 0.5, "biased probe on spurious data": 0.9}}}
    r = sb.scr_metric(clean, ablated)
    # dir1: (0.75 - 0.6) / (0.9 - 0.6) = 0.5, (0.55 - 0.6) / 0.3 = -1/6; dir2: (0.97 - 0.95) / 0.05 = 0.4, -1.0
    assert r == pytest.approx({"scr_dir1_threshold_2": 0.5, "scr_dir1_threshold_20": -1 / 6,
                               "scr_dir2_threshold_2": 0.4, "scr_dir2_threshold_20": -1.0,
                               "scr_metric_threshold_2": 0.5, "scr_metric_threshold_20": -1 / 6})
    # the biased probe worse on the spurious data: direction 2 is the metric
    r2 = sb.scr_metric(_clean(b_on_i=0.95, b_on_s=0.6), ablated)
    assert r2["scr_metric_threshold_2"] == pytest.approx(r2["scr_dir2_threshold_2"])
    assert r2["scr_metric_threshold_2"] == pytest.approx((0.97 - 0.6) / (1.0 - 0.6))
    # equal accuracies on both data: no metric key, as SAEBench
    assert not any(k.startswith("scr_metric") for k in sb.scr_metric(_clean(b_on_i=0.8, b_on_s=0.8), ablated))


def test_scr_metric_small_gap_is_zero() -> None:
    """(clean − original) < 0.001 scores 0 whatever the ablation did; at 0.001 and above it divides."""
    ablated = {"spurious": {5: {"biased probe on intended data": 0.9, "biased probe on spurious data": 1.0}},
               "intended": {5: {"biased probe on intended data": 0.5, "biased probe on spurious data": 0.5}}}
    r = sb.scr_metric(_clean(intended=0.6005, b_on_i=0.6, b_on_s=0.99), ablated)
    assert r["scr_dir1_threshold_5"] == 0 and r["scr_metric_threshold_5"] == 0
    r = sb.scr_metric(_clean(intended=0.6015, b_on_i=0.6, b_on_s=0.99), ablated)
    assert r["scr_dir1_threshold_5"] == pytest.approx(0.3 / 0.0015)
    # dir2's clean (1.0) − original (0.99) = 0.01: divides; ablation to 0.5 gives −49
    assert r["scr_dir2_threshold_5"] == pytest.approx(-49.0)
    r = sb.scr_metric(_clean(intended=0.5, b_on_i=0.6, b_on_s=0.99), ablated)  # negative gap: 0 too
    assert r["scr_dir1_threshold_5"] == 0


# ------------------------------------------------------------------------------ dataset
def test_scr_dataset_quadrants() -> None:
    m_tr, m_te = 100, 50
    ds = sb.scr_dataset(("country", "city"), ("en", "fr"), m_tr, m_te, seed=42)
    assert ds.name == "country_city_en_fr" and "CLDR" in ds.source and "Unicode License" in ds.source
    assert {k: len(v) for k, v in ds.train.items()} == {k: 2 * m_tr for k in sb.SAEBENCH_KEYS}
    assert {k: len(v) for k, v in ds.test.items()} == {k: 2 * m_te for k in sb.SAEBENCH_KEYS}
    places = sb.place_names()
    every: dict[str, list[tuple[str, str]]] = {}  # each possible text -> the (group, language) quadrants it is in
    for g in ("country", "city"):
        for names in places[g].values():
            for lang in ("en", "fr"):
                for t in sb.TEMPLATES[lang]:
                    every.setdefault(t.format(names[lang]), []).append((g, lang))

    def quadrant(text: str) -> tuple[str, str]:
        assert len(every[text]) == 1, text  # one frame, one name, one group
        return every[text][0]

    for split, m in ((ds.train, m_tr), (ds.test, m_te)):
        q = {k: [quadrant(t) for t in v] for k, v in split.items()}
        # SAEBench's composition: spurious = en (both groups), intended = countries (both languages), ...
        assert sorted(q["spurious"]) == sorted([("country", "en")] * m + [("city", "en")] * m)
        assert sorted(q["spurious_neg"]) == sorted([("country", "fr")] * m + [("city", "fr")] * m)
        assert sorted(q["intended"]) == sorted([("country", "en")] * m + [("country", "fr")] * m)
        assert sorted(q["intended_neg"]) == sorted([("city", "en")] * m + [("city", "fr")] * m)
        assert set(q["biased"]) == {("country", "en")} and set(q["biased_neg"]) == {("city", "fr")}
        for k, v in split.items():
            assert len(set(v)) == len(v), k  # no text twice in a key
    # a text is in one quadrant only; train and test share no place name
    train_texts = {t for v in ds.train.values() for t in v}
    test_texts = {t for v in ds.test.values() for t in v}
    assert not train_texts & test_texts
    quads: dict[str, set[tuple[str, str]]] = {}
    for t in train_texts | test_texts:
        quads.setdefault(t, set()).add(quadrant(t))
    assert all(len(v) == 1 for v in quads.values())
    # several frames per language in every key (the probe cannot read one fixed string)
    for k, v in ds.train.items():
        frames = {t.split("{}")[0] for t in sb.TEMPLATES["en"] + sb.TEMPLATES["fr"] for x in v
                  if x.startswith(t.split("{}")[0]) and x.endswith(t.split("{}")[1])}
        assert len(frames) >= 4, k
    assert ds.info["distinct_names_per_quadrant"] == {
        "train": {"en_country": 171, "en_city": 100, "fr_country": 100, "fr_city": 200},
        "test": {"en_country": 86, "en_city": 50, "fr_country": 50, "fr_city": 100}}
    assert {g: len(v) for g, v in places.items()} == {"country": 257, "city": 351}


def test_scr_dataset_is_seeded() -> None:
    a = sb.scr_dataset(("city", "country"), ("en", "de"), 30, 10, seed=1)
    b = sb.scr_dataset(("city", "country"), ("en", "de"), 30, 10, seed=1)
    c = sb.scr_dataset(("city", "country"), ("en", "de"), 30, 10, seed=2)
    assert a.train == b.train and a.test == b.test
    assert a.train["biased"] != c.train["biased"]
    assert a.train["biased"][:2] == ["The answer to the quiz question was Taipei.",
                                     "She wrote Mbabane on the whiteboard."]


def test_scr_dataset_gender_frames() -> None:
    """The default spurious attribute: English frames differing in He/She (his/her) only, English names."""
    ds = sb.scr_dataset(("country", "city"), ("he", "she"), 100, 50, seed=42)
    assert all(t.startswith("He ") for t in ds.train["biased"]) and all(t.startswith("She ") for t in
                                                                       ds.train["biased_neg"])
    assert sorted(t.split()[0] for t in ds.train["intended"]) == ["He"] * 100 + ["She"] * 100
    en = {n["en"] for n in sb.place_names()["country"].values()}
    assert all(any(t.endswith(f" {n}.") or f" {n} " in t for n in en) for t in ds.train["biased"][:20])
    assert [list(p[2:]) for p in sb.SCRConfig().pairs] == [["he", "she"], ["he", "she"]]


def test_scr_dataset_too_small_is_skipped() -> None:
    with pytest.raises(ValueError, match=r"1270 train texts of en country names, 2000 needed \(1000 per quadrant\)"):
        sb.scr_dataset(("country", "city"), ("en", "fr"), 1000, 10, seed=0)  # 254 countries x 5 frames to train
    ds, skipped = sb.scr_datasets(sb.SCRConfig(pairs=[["country", "city", "en", "fr"]], train_per_quadrant=1000))
    assert ds == [] and skipped[0]["name"] == "country_city_en_fr" and "needed" in skipped[0]["reason"]
    r = sb.scr(None, None, None, sb.SCRConfig(train_per_quadrant=1000))
    assert r["mean"] == {} and len(r["skipped_datasets"]) == 2 and r["reason"].startswith("no SCR dataset")
    with pytest.raises(ValueError, match=r"no sentence frames for 'xx' \(have en, fr, de, es, he, she\)"):
        sb.scr_dataset(("country", "city"), ("en", "xx"), 10, 5, seed=0)


# ------------------------------------------------------------------------------ synthetic SAE
def _synthetic(m_tr: int = 100, m_te: int = 50, a_s: float = 2.0, a_i: float = 1.0, noise: float = 0.3,
               signal_noise: bool = True, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any], torch.Tensor]:
    """Pooled (x, f) per data key. Latent 0 is e_0 and fires a_s on spurious-positive texts, latent 1 (e_1) on
    spurious-negative ones, latents 2 and 3 (e_2, e_3) a_i on intended-positive / -negative ones; latents 4..11 are
    noise latents whose decoder rows lie in dims 4..7; x = f·W_dec + noise (in dims 4..7 only unless
    signal_noise)."""
    rng = np.random.default_rng(seed)
    d, F = 8, 12
    W = np.zeros((F, d), np.float32)
    W[:4, :4] = np.eye(4)
    W[4:, 4:] = 0.5 * rng.normal(size=(F - 4, d - 4))

    def rows(ip: int, sp: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        f = np.zeros((n, F), np.float32)
        f[:, 0 if sp else 1] = a_s
        f[:, 2 if ip else 3] = a_i
        f[:, 4:] = np.maximum(rng.normal(size=(n, F - 4)), 0)
        eps = noise * rng.normal(size=(n, d))
        if not signal_noise:
            eps[:, :4] = 0
        return (f @ W + eps).astype(np.float32), f

    def keys(m: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        parts = {"spurious": [(1, 1, m), (0, 1, m)], "spurious_neg": [(1, 0, m), (0, 0, m)],
                 "intended": [(1, 1, m), (1, 0, m)], "intended_neg": [(0, 1, m), (0, 0, m)],
                 "biased": [(1, 1, 2 * m)], "biased_neg": [(0, 0, 2 * m)]}
        out = {}
        for k, ps in parts.items():
            xs, fs = zip(*[rows(*p) for p in ps], strict=True)
            out[k] = (np.concatenate(xs), np.concatenate(fs))
        return out

    return keys(m_tr), keys(m_te), torch.from_numpy(W)


def test_hand_checkable_spurious_latents() -> None:
    """Probes fixed: spurious e_0 − e_1, intended e_2 − e_3, biased (e_0 − e_1) + 0.5·(e_2 − e_3), no bias; signals
    of 1. The biased probe follows the language: 0.5 on the intended data, 1.0 on the spurious data, so direction 1
    counts. The spurious probe's only non-zero effects are latents 0 and 1; ablating both leaves the biased probe
    reading the place kind alone (1.0): SCR = (1 − 0.5) / (1 − 0.5) = 1; one of them: en or fr texts right, the
    other half by kind: 0.75, SCR 0.5. Direction 2 is 0: the biased probe is already at the spurious probe's 1.0."""
    tr, te, W = _synthetic(a_s=1.0, signal_noise=False)
    e = torch.eye(8)
    probes = {"spurious": (e[0] - e[1], torch.tensor(0.0)), "intended": (e[2] - e[3], torch.tensor(0.0)),
              "biased": (e[0] - e[1] + 0.5 * (e[2] - e[3]), torch.tensor(0.0))}
    r = sb.scr_task(tr, te, W, sb.SCRConfig(n_values=[1, 2, 5]), probes=probes)
    c = r["clean_accuracy"]
    assert (c["spurious"], c["intended"], c["biased"]) == (1.0, 1.0, 1.0)
    assert (c["biased probe on intended data"], c["biased probe on spurious data"]) == (0.5, 1.0)
    assert (c["spurious probe on intended data"], c["intended probe on spurious data"]) == (0.5, 0.5)
    assert r["direction"] == 1
    lat = r["ablated_latents"]
    assert lat["spurious"]["1"] in ([0], [1]) and sorted(lat["spurious"]["2"]) == sorted(lat["spurious"]["5"]) == [0, 1]
    assert sorted(lat["intended"]["5"]) == [2, 3]
    assert r["results"] == {"scr_dir1_threshold_1": 0.5, "scr_metric_threshold_1": 0.5, "scr_dir1_threshold_2": 1.0,
                            "scr_metric_threshold_2": 1.0, "scr_dir1_threshold_5": 1.0, "scr_metric_threshold_5": 1.0,
                            "scr_dir2_threshold_1": 0.0, "scr_dir2_threshold_2": 0.0, "scr_dir2_threshold_5": 0.0}
    # ablating the noise latents instead leaves the biased probe where it was
    te_x = {k: sb.ablate_pooled(torch.from_numpy(x), torch.from_numpy(f), torch.arange(4, 12), W)
            for k, (x, f) in te.items()}
    assert sb.scr_accuracies(probes, te_x)["biased probe on intended data"] == 0.5


def _train_probes(tr: dict[str, Any], te: dict[str, Any], cfg: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    def binary(data: dict[str, Any], role: str) -> tuple[torch.Tensor, torch.Tensor]:
        pos, neg = data[role][0], data[sb.PAIRED[role]][0]
        return (torch.from_numpy(np.concatenate([pos, neg])),
                torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)]))

    out = {}
    for i, r in enumerate(sb.ROLES):
        w, b, _ = sb.train_tpp_probe(*binary(tr, r), *binary(te, r), seed=cfg.seed + i)
        out[r] = (w, b)
    return out


def test_scr_task_golden_with_trained_probes() -> None:
    """SAEBench's trainer on the synthetic data (spurious signal 2, intended 1): the biased probe leans on the
    language; ablating the spurious latents (0, 1) closes most of its gap to the intended probe (golden, seeded),
    ablating noise latents does not."""
    tr, te, W = _synthetic()
    cfg = sb.SCRConfig(n_values=[1, 2, 5])
    r = sb.scr_task(tr, te, W, cfg)
    assert r["direction"] == 1 and r["ablated_latents"]["spurious"]["2"] == [0, 1]
    assert r["results"] == pytest.approx(SYNTH_GOLDEN, abs=1e-6), r["results"]
    assert r["results"]["scr_metric_threshold_2"] > 0.5
    assert r["train_texts"] == {k: 200 for k in sb.SAEBENCH_KEYS} and r["n_values_skipped"] == []
    probes = _train_probes(tr, te, cfg)  # the same probes as scr_task's (seed + role index)
    assert sb.scr_task(tr, te, W, cfg, probes=probes)["results"] == r["results"]
    te_x = {k: torch.from_numpy(x) for k, (x, _) in te.items()}
    original = sb.scr_accuracies(probes, te_x)["biased probe on intended data"]
    noise = {k: sb.ablate_pooled(torch.from_numpy(x), torch.from_numpy(f), torch.arange(4, 12), W)
             for k, (x, f) in te.items()}
    after = sb.scr_accuracies(probes, noise)["biased probe on intended data"]
    gap = r["clean_accuracy"]["intended"] - original
    assert abs(after - original) / gap < 0.15, (original, after)  # measured 0.08; the latents 0, 1 give 0.71


SYNTH_GOLDEN = {"scr_dir1_threshold_1": 0.75, "scr_metric_threshold_1": 0.75,
                "scr_dir1_threshold_2": 0.7083333747254461, "scr_metric_threshold_2": 0.7083333747254461,
                "scr_dir1_threshold_5": 0.6875000620881692, "scr_metric_threshold_5": 0.6875000620881692,
                "scr_dir2_threshold_1": 0.4761905032220562,
                "scr_dir2_threshold_2": 0.19047625805514054, "scr_dir2_threshold_5": -0.11904748388971893}
"""Measured (seeded)."""


def test_tiny_model_golden(tmp_path: Path, tokenizer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """End to end on the tiny model and SAE of tests/steer/helpers.make_run, one pair, 20/10 texts per quadrant."""
    from monoscope.steer.target import open_target
    from tests.steer.helpers import make_run

    t = open_target(make_run(tmp_path, tokenizer, with_db=False), device="cpu", compute_dtype="fp32")
    cfg = sb.SCRConfig(pairs=[["country", "city", "en", "fr"]], train_per_quadrant=20, test_per_quadrant=10,
                       probe_epochs=100, early_stopping_patience=100)
    r = sb.scr(t.lm, t.sae, t.hook, cfg)
    ds = r["datasets"]["country_city_en_fr"]
    assert ds["n_values_skipped"] == [500] and ds["test_texts"] == {k: 20 for k in sb.SAEBENCH_KEYS}
    assert ds["roles"] == {"spurious": "en / fr", "intended": "country / city", "biased": "en_country / fr_city"}
    assert r["higher_is_better"] == [f"scr_metric_threshold_{n}" for n in (2, 5, 10, 20, 50, 100)]
    # the tiny random model cannot tell a country from a city (intended probe at 0.5): direction 1 (the biased probe
    # follows the language) scores 0 by the small-gap rule; direction 2's ablations cost the biased probe accuracy
    c = ds["clean_accuracy"]
    assert (c["intended"], c["biased probe on intended data"], ds["direction"]) == (0.5, 0.5, 1)
    assert r["mean"] == ds["results"] == pytest.approx(TINY_GOLDEN, abs=1e-6), repr(ds["results"])
    sb.print_saebench_summary({"scr": r}, "x.json")
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "SCR datasets                            country_city_en_fr"
    assert out[0].startswith("scr_metric_threshold_2 (higher is better) ")


TINY_GOLDEN = {**{f"scr_{k}_threshold_{n}": 0.0 for k in ("dir1", "metric") for n in (2, 5, 10, 20, 50, 100)},
               "scr_dir2_threshold_2": -3.9999928474528588, "scr_dir2_threshold_5": -7.999988079088098,
               "scr_dir2_threshold_10": -7.999988079088098, "scr_dir2_threshold_20": -7.999988079088098,
               "scr_dir2_threshold_50": -5.999990463270478, "scr_dir2_threshold_100": -9.999985694905718}
"""Measured on the tiny model and SAE (seeded)."""


# ------------------------------------------------------------------------------ cross-check with SAEBench
def _saebench_scr_functions() -> dict[str, Any]:
    """SAEBench's SCR functions (`saebench_helpers`)."""
    return saebench_scr_and_tpp_functions({
        "get_effects_per_class_precomputed_acts", "get_all_node_effects_for_one_sae", "select_top_n_features",
        "ablated_precomputed_activations", "get_probe_test_accuracy", "get_scr_probe_test_accuracy",
        "perform_feature_ablations", "get_scr_plotting_dict"})


def _saebench_name(key: str) -> str:
    """monoscope's accuracy key (role, or "{role} probe on {role} data") in SAEBench's names."""
    for role, name in sb.SAEBENCH_KEYS.items():
        key = key.replace(f"{role} probe", f"{name} probe").replace(f"on {role} data", f"on {name} data")
    return sb.SAEBENCH_KEYS.get(key, key)


def test_scr_matches_saebench_code() -> None:
    """The same per-token activations, SAE and probes: SAEBench's SCR effects (`get_effects_per_class_precomputed_acts`
    with perform_scr=True), top-n selection, per-token ablation with the error term, clean and ablated accuracies of
    every probe on every data key, and `get_scr_plotting_dict` equal monoscope's pooled ones."""
    ns = _saebench_scr_functions()
    pt = ns["probe_training"]
    from monoscope.sae import SAEConfig, build_sae

    torch.manual_seed(0)
    L, d, F, m_tr, m_te = 5, 16, 64, 30, 15
    sae = build_sae(SAEConfig(arch="topk", d_in=d, d_sae=F, k=8, normaliser=2.0, compute_dtype="float32",
                              init_decoder_norm=1.0), seed=0).eval()
    g = torch.Generator().manual_seed(1)
    c_s, c_i = 1.5 * torch.randn(2, d, generator=g), 1.0 * torch.randn(2, d, generator=g)

    def texts(ip: int, sp: int, n: int) -> torch.Tensor:
        return c_s[1 - sp] + c_i[1 - ip] + torch.randn(n, L, d, generator=g)

    def keys(m: int) -> dict[str, torch.Tensor]:
        pp, pn, np_, nn_ = texts(1, 1, 2 * m), texts(0, 1, m), texts(1, 0, m), texts(0, 0, 2 * m)
        return {"spurious": torch.cat([pp[:m], pn]), "spurious_neg": torch.cat([np_, nn_[:m]]),
                "intended": torch.cat([pp[:m], np_]), "intended_neg": torch.cat([pn, nn_[:m]]),
                "biased": pp, "biased_neg": nn_}

    train, test = keys(m_tr), keys(m_te)
    with torch.no_grad():
        def pooled(acts: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
            return {k: (v.mean(1).numpy(), sae.encode_raw(v.reshape(-1, d)).reshape(len(v), L, F).mean(1).numpy())
                    for k, v in acts.items()}

        ours_tr, ours_te = pooled(train), pooled(test)
    ds = c_s[0] - c_s[1]
    di = c_i[0] - c_i[1]
    weights = {"spurious": ds / ds.norm() + 0.3 * torch.randn(d, generator=g),
               "intended": di / di.norm() + 0.3 * torch.randn(d, generator=g),
               "biased": ds / ds.norm() + 0.4 * di / di.norm() + 0.3 * torch.randn(d, generator=g)}
    probes = {}
    for r, w in weights.items():
        p = pt.Probe(d, torch.float32)
        with torch.no_grad():
            p.net.weight.copy_(w[None])
            mid = 0.5 * (train[r].mean((0, 1)) + train[sb.PAIRED[r]].mean((0, 1)))
            p.net.bias.fill_(-float(mid @ w))
        probes[sb.SAEBENCH_KEYS[r]] = p
    cfg = sb.SCRConfig(n_values=[2, 5, 10, 20])
    ours = sb.scr_task(ours_tr, ours_te, sae.W_dec.detach() / 2.0, cfg,
                       probes={r: (probes[sb.SAEBENCH_KEYS[r]].net.weight.detach()[0],
                                   probes[sb.SAEBENCH_KEYS[r]].net.bias.detach()[0]) for r in sb.ROLES})
    raw = RawSAE(sae)
    chosen = list(sb.SAEBENCH_KEYS[r] for r in sb.ROLES)
    theirs_tr = {sb.SAEBENCH_KEYS[k]: v for k, v in train.items()}
    theirs_te = {sb.SAEBENCH_KEYS[k]: v for k, v in test.items()}
    with torch.no_grad():
        effects = ns["get_all_node_effects_for_one_sae"](raw, probes, chosen, True, theirs_tr, 125)
        ablated = ns["perform_feature_ablations"](probes, raw, 125, theirs_te, effects, cfg.n_values, chosen, 500, True)
        clean = ns["get_probe_test_accuracy"](probes, chosen, {k: v.mean(1) for k, v in theirs_te.items()}, 500, True)
    theirs = ns["get_scr_plotting_dict"](ablated, clean)
    assert {_saebench_name(k): v for k, v in ours["clean_accuracy"].items()} == pytest.approx(clean, abs=1e-6)
    for r in ("spurious", "intended"):
        for n in cfg.n_values:
            mask = ns["select_top_n_features"](effects[sb.SAEBENCH_KEYS[r]], n, r)
            assert set(ours["ablated_latents"][r][str(n)]) == set(mask.nonzero().squeeze(1).tolist()), (r, n)
            assert {_saebench_name(k): v for k, v in ours["ablated_accuracy"][r][str(n)].items()} == pytest.approx(
                ablated[sb.SAEBENCH_KEYS[r]][n], abs=1e-6), (r, n)
    assert ours["results"] == pytest.approx(theirs, abs=1e-6)
    # not a trivial agreement: the metric is there, direction 1, and not all scores equal or 0
    assert ours["direction"] == 1 and "scr_metric_threshold_2" in theirs
    assert len({round(v, 6) for v in theirs.values()}) > 2
