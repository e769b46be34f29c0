"""Feature statistics count every active code, for every architecture: on the same rows, the densities
of the feature database add up to the mean L0 that `monoscope eval` reports, and fire counts equal a
brute-force count; the sparse co-occurrence table is exact when its budget suffices and within its
stated error bound otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monoscope.capture import capture
from monoscope.errors import MonoscopeError
from monoscope.eval import evaluate
from monoscope.features import FeatureDB
from monoscope.features.build import build_features
from monoscope.features.stats import FeatureStats, PairCounts
from monoscope.sae import load_sae
from monoscope.store.reader import ActivationStore
from monoscope.train import train
from tests.conftest import TRAIN_TEXT, make_llama

HOOK = "resid_post.1"
ARCHS = {"relu-l1": {}, "topk": {"k": 8}, "batchtopk": {"k": 8}, "jumprelu": {}, "matryoshka": {"k": 8},
         "gated": {}}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("archs")
    make_llama(len(tokenizer), seed=3).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} item {i}"}) + "\n" for i, t in enumerate(TRAIN_TEXT * 3)))
    # float32 rows, the same batch size as the features pass: the store holds the very rows the pass sees
    capture(root / "acts", model=str(root / "model"), corpus=str(corpus), hook=HOOK, tokens=768, ctx_len=16,
            dtype="float32", batch_contexts=8, contexts_per_shard=16, compute_dtype="fp32", progress=False)
    return root


def _brute_force_fires(sae_dir: Path, store: Path) -> np.ndarray:
    sae = load_sae(sae_dir).eval()
    st = ActivationStore.open(store)
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    with torch.inference_mode():
        for i in range(len(st.manifest.shards)):
            sh = st.read_shard(i)
            fires += (sae.encode_raw(sh.acts[sh.keep.bool()].float()) > 0).sum(0)
    return fires.numpy()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_densities_add_up_to_eval_l0(root: Path, arch: str) -> None:
    sae_dir = root / f"sae-{arch}"
    train(sae_dir, store=root / "acts", arch=arch, width="4x", tokens=1024, batch_size=128, progress=False,
          **ARCHS[arch])
    store = ActivationStore.open(root / "acts")
    rows = store.manifest.n_rows  # every kept row of the store
    ev = evaluate(sae_dir, acts=root / "acts", tokens=rows, plots=False, progress=False)
    res = build_features(sae_dir, tokens=store.manifest.n_tokens, batch_contexts=8, feature_map=False,
                         compute_dtype="fp32", progress=False)
    with FeatureDB.open(res.dbs[0]) as db:
        density, fires = db.column("density"), db.column("fires").astype(np.int64)
        meta = db.meta()
    assert meta["rows_counted"] == rows  # the same rows as eval: the store's row policy
    assert density.sum() == pytest.approx(ev.store.l0_mean, rel=5e-3)
    assert np.array_equal(fires, _brute_force_fires(sae_dir, root / "acts"))
    if arch == "relu-l1":  # far above the 64 codes per token the pass used to keep
        assert ev.store.l0_mean > 64


@pytest.mark.parametrize("arch", ["matryoshka", "gated"])
def test_show_and_steer_work_for_the_newer_architectures(root: Path, arch: str) -> None:
    """The stages after the database, through the real CLI: `show` prints a page for a live feature,
    `steer --scale 1` leaves generation unchanged (the splice is exact), a 10x clamp changes it."""
    from tests.steer.helpers import run_cli

    sae_dir = root / f"sae-{arch}"
    if not (sae_dir / "cfg.json").exists():
        train(sae_dir, store=root / "acts", arch=arch, width="4x", tokens=1024, batch_size=128, progress=False,
              **ARCHS[arch])
    db_path = root / f"sae-{arch}-features" / "features.db"
    if not db_path.exists():
        build_features(sae_dir, tokens=256, batch_contexts=8, feature_map=False, compute_dtype="fp32", progress=False)
    with FeatureDB.open(db_path) as db:
        fires = db.column("fires")
    live = int(np.argmax(fires))
    assert fires[live] > 0
    shown = run_cli("show", str(sae_dir), str(live), "--examples", "2")
    assert shown.returncode == 0, shown.stderr
    assert f"feature {live}" in shown.stdout.lower() or f"#{live}" in shown.stdout
    base = ["steer", str(sae_dir), "--prompt", "the quick brown fox", "--max-new-tokens", "4", "--json",
            "--compute-dtype", "fp32", "--device", "cpu", "--feature", str(live)]
    same = run_cli(*base, "--scale", "1", timeout=300)
    assert same.returncode == 0, same.stderr
    out = json.loads(same.stdout)
    assert out["default"] == out["steered"]
    assert all(abs(t["delta"]) < 1e-3 for t in out["tokens"]["steered"])
    clamped = run_cli(*base, "--clamp", "10x", timeout=300)
    assert clamped.returncode == 0, clamped.stderr
    out = json.loads(clamped.stdout)
    assert out["edits"][0]["raw_value"] > 0
    assert sum(t["delta"] for t in out["tokens"]["steered"]) != 0


def test_compute_dtype_reaches_the_pass(root: Path) -> None:
    sae_dir = root / "sae-topk"
    if not sae_dir.exists():
        train(sae_dir, store=root / "acts", arch="topk", width="4x", tokens=1024, batch_size=128, progress=False,
              k=8)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                        str(Path(__file__).parents[2])])}
    out = subprocess.run([sys.executable, "-m", "monoscope.cli", "features", str(sae_dir), "--tokens", "128",
                          "--compute-dtype", "bf16", "--no-map", "--quiet", "--overwrite"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    with FeatureDB.open(root / "sae-topk-features") as db:
        assert db.meta()["compute_dtype"] == {"model": "bf16", "sae": "bfloat16"}
    with pytest.raises(MonoscopeError, match="unknown compute dtype 'fp16': use auto, fp32 or bf16"):
        build_features(sae_dir, compute_dtype="fp16")


def _random_rows(n: int, F: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(F, generator=g) ** 3 * 0.5  # a few dense features, many rare ones
    return (torch.rand(n, F, generator=g) < p).float() * torch.rand(n, F, generator=g)


def _exact_pairs(dense: torch.Tensor) -> np.ndarray:
    on = (dense > 0).long()
    c = (on.T @ on).numpy()
    np.fill_diagonal(c, 0)
    return c


def test_pair_counts_exact_when_the_budget_suffices() -> None:
    F, T = 48, 8
    dense = _random_rows(20 * T, F, 0)
    st = FeatureStats(F, top_k=2, reservoir=2)
    for b in range(20):
        d = dense[b * T: (b + 1) * T]
        r, f = torch.nonzero(d, as_tuple=True)
        st.update(r, f, d[r, f], torch.tensor([b]), T, T)
    exact = _exact_pairs(dense)
    ids, p = st.cooccurrence(top=5)
    assert st.cooc.exact and st.cooccurrence_error() == 0.0
    for i in range(F):
        want = sorted(range(F), key=lambda j: (-exact[i, j], j))[:5]  # count descending, then id
        have = [int(j) for j in ids[i] if j >= 0]
        assert have == [j for j in want if exact[i, j] > 0]
        fires = int((dense[:, i] > 0).sum())
        assert np.allclose(p[i][: len(have)], exact[i, have] / max(fires, 1))


def test_pair_counts_bounded_when_pruned() -> None:
    F, T = 48, 8
    dense = _random_rows(40 * T, F, 1)
    exact = _exact_pairs(dense)
    pc = PairCounts(F, budget=1000, report=5)  # fewer slots than distinct pairs: pruned
    for b in range(40):
        r, f = np.nonzero(dense[b * T: (b + 1) * T].numpy())
        pc.add(r, f, T)
    ids, cnt = pc.top(5)
    assert not pc.exact and pc.table.nnz <= 1000 and pc.err.max() > 0
    for i in range(F):
        for j, c in zip(ids[i], cnt[i], strict=True):
            if j >= 0:  # a stored count is a lower bound, within the feature's error bound
                assert c <= exact[i, j] <= c + pc.err[i]
        # the most co-occurring partner is found whenever the bound separates it from the rest
        best = exact[i].max()
        if best > 0 and best - pc.err[i] > np.sort(exact[i])[-2]:
            assert exact[i, ids[i][0]] == best


def test_pair_counts_resume_identical() -> None:
    """A checkpointed table (with its queue) continues exactly as an uninterrupted one."""
    F, T = 32, 8
    dense = _random_rows(12 * T, F, 2)
    a, b = PairCounts(F, budget=200, report=3), PairCounts(F, budget=200, report=3)
    for k in range(12):
        r, f = np.nonzero(dense[k * T: (k + 1) * T].numpy())
        a.add(r, f, T)
        b.add(r, f, T)
        if k == 5:  # a kill after a checkpoint here: the state goes through torch tensors and back
            c = PairCounts(F, budget=200, report=3)
            c.load_state_dict(b.state_dict())
            b = c
    assert all(np.array_equal(x, y) for x, y in zip(a.top(3), b.top(3), strict=True))
    assert np.array_equal(a.err, b.err)


def _reference_label(max_toks: list[int], prev_toks: list[int], promoted: list[int],
                     vocab: list[str]) -> tuple[str, dict, float]:
    """The per-feature label of the earlier finalisation (a Counter per feature), kept as the reference."""
    from collections import Counter

    if not max_toks:
        return "", {}, 0.0
    common = Counter(max_toks).most_common(3)
    purity = sum(c for _, c in common) / len(max_toks)
    bigrams = Counter((p, m) for p, m in zip(prev_toks, max_toks, strict=True) if p >= 0).most_common(1)
    label = " | ".join(repr(vocab[t]) for t, _ in common)
    if bigrams and bigrams[0][1] >= max(3, len(max_toks) // 3):
        (p, m), _ = bigrams[0]
        label = f"{vocab[p] + vocab[m]!r} ({label})"
    label += " → " + " ".join(repr(vocab[i]) for i in promoted[:3])
    info = {"peak_tokens": [[vocab[t], c] for t, c in common],
            "bigram": None if not bigrams else [vocab[bigrams[0][0][0]] + vocab[bigrams[0][0][1]], bigrams[0][1]],
            "promoted": [vocab[i] for i in promoted[:5]], "purity": round(purity, 4)}
    return label, info, purity


def test_column_wise_labels_match_the_per_feature_reference() -> None:
    from monoscope.features.build import _cheap_labels

    rng = np.random.default_rng(0)
    vocab = [f"t{i}" for i in range(7)] + ['q"uote', "ü", "\n"]
    F, K = 40, 20
    n_top = rng.integers(0, K + 1, F)
    n_top[:3], n_top[3] = 0, 12  # features without examples; one with a dominant bigram
    ef = np.repeat(np.arange(F), n_top)
    rank = np.concatenate([np.arange(n) for n in n_top])
    peak = rng.integers(0, 4, len(ef))  # few distinct tokens: ties and dominant bigrams happen
    prev = np.where(rng.random(len(ef)) < 0.1, -1, rng.integers(0, 3, len(ef)))
    peak[ef == 3], prev[ef == 3] = 8, 7
    promoted = rng.integers(0, len(vocab), (F, 5))
    vj, vr = [json.dumps(v) for v in vocab], [repr(v) for v in vocab]
    for f0, f1 in ((0, F), (5, 17)):
        sel = (ef >= f0) & (ef < f1)
        labels, infos, purity = _cheap_labels(f0, f1, ef[sel], rank[sel], peak[sel], prev[sel], n_top, promoted,
                                              vocab, vj, vr)
        for j, f in enumerate(range(f0, f1)):
            m = ef == f
            label, info, pur = _reference_label(peak[m].tolist(), prev[m].tolist(), promoted[f].tolist(), vocab)
            assert (labels[j], json.loads(infos[j]), purity[j]) == (label, info, pytest.approx(pur)), f
            if f == 3:  # the dominant bigram leads the label
                assert labels[j].startswith("'q\"uoteü' (")
