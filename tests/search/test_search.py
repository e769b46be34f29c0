"""Search by text, label, contrast and neighbours on planted features (see conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.features.db import FeatureDB
from monoscope.sae.io import save_sae
from monoscope.search.contrast import benjamini_hochberg, cohens_d, contrast, contrast_scores, mann_whitney, neighbours
from monoscope.search.labels import fts_query, search_labels
from monoscope.search.text import Searcher
from tests.search.conftest import DENSE, DOG, FOX, F, Planted, _planted_sae

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def searcher(planted: Planted) -> Searcher:
    s = Searcher.open(planted.sae, device="cpu", compute_dtype="fp32")
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------- by text
def test_planted_feature_ranks_first_with_token_evidence(searcher: Searcher) -> None:
    res = searcher.search_text("the quick brown fox jumps", top=5)
    assert [h.feature for h in res.hits] == [FOX, DENSE]  # relative 1.0 before 0.5; nothing else fires
    fox, dense = res.hits
    assert fox.act == pytest.approx(1.0, abs=1e-4) and fox.rel == pytest.approx(1.0, abs=1e-4)
    assert dense.act == pytest.approx(5.0) and dense.rel == pytest.approx(0.5)
    assert res.n_active == 2 and res.n_features == F
    assert len(fox.evidence) == 1
    ev = fox.evidence[0]
    assert ev.token == " fox" and res.tokens[ev.position] == " fox" and ev.position == fox.peak
    assert fox.label == "' fox'" and fox.explanation == "the animal fox"
    assert len(dense.evidence) == 5 and 0 not in [e.position for e in dense.evidence]  # BOS never counts
    assert res.notes == []
    long = searcher.search_text("the fox " * 40)
    assert long.notes == ["the text is 82 tokens but the database was built on contexts of 64: activations after "
                          "position 64 come from positions the SAE's data never had"]


def test_relative_ranking_beats_raw(searcher: Searcher) -> None:
    # DOG: act 1.0, max_act 2.0 -> rel 0.5; DENSE: act 5.0 -> rel 0.5: equal rel, raw act breaks the tie
    res = searcher.search_text("the lazy dog and the fox", top=5)
    assert [h.feature for h in res.hits] == [FOX, DENSE, DOG]


def test_density_filter(searcher: Searcher) -> None:
    res = searcher.search_text("the quick brown fox", max_density=0.5)
    assert [h.feature for h in res.hits] == [FOX] and res.n_filtered == 1
    res = searcher.search_text("the quick brown fox", min_density=0.5)
    assert [h.feature for h in res.hits] == [DENSE]
    with pytest.raises(MonoscopeError, match=r"--min-density 0.5 is above --max-density 0.1: swap them"):
        searcher.search_text("fox", min_density=0.5, max_density=0.1)
    with pytest.raises(MonoscopeError, match=r"--max-density 2.0 is not a fraction of tokens"):
        searcher.search_text("fox", max_density=2.0)


def test_bad_text(searcher: Searcher) -> None:
    with pytest.raises(MonoscopeError, match=r"^the text is empty: give text for the model to read$"):
        searcher.search_text("   ")
    with pytest.raises(MonoscopeError, match=r"^the text is \d+ tokens \(BOS included\) but .* reads at most 256: "
                                             r"split it into shorter texts$"):
        searcher.search_text("the quick brown fox " * 100)


def test_batched_max_acts_match_one_by_one(searcher: Searcher) -> None:
    texts = ["the fox", "a dog jumps over the lazy dog again and again", "le renard brun", "one fox"]
    batched = searcher.max_acts(texts)
    single = np.stack([searcher.max_acts([t])[0] for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert batched[:, FOX].round(4).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_database_of_another_sae_is_refused(planted: Planted, tmp_path: Path) -> None:
    E = torch.randn(300, 64)
    other = tmp_path / "other-sae"
    save_sae(_planted_sae(E, 1, 2, seed=9), other)
    with pytest.raises(MonoscopeError,
                       match=r"was built for other SAE weights \(.*\): rebuild it with monoscope features "
                             r"SAE_DIR --overwrite"):
        Searcher.open(other, db=planted.db, device="cpu")


# ---------------------------------------------------------------------------------------------- by label
def test_keyword_search_finds_the_label_and_explanation(planted: Planted) -> None:
    assert fts_query("Python imports!") == '"python"* OR "import"*'
    with FeatureDB.open(planted.db) as db:
        hits = search_labels(db, "python imports", mode="keyword")
        assert hits[0].feature == 1 and hits[0].keyword_rank == 1
        assert {h.feature for h in hits} == {1, 6}  # "python" also in feature 6's explanation
        assert search_labels(db, "renard", mode="keyword") == []
        with pytest.raises(MonoscopeError, match=r"--query '\?\?' has no words to search for"):
            search_labels(db, "??", mode="keyword")


class CountingEmbedder:
    """Bag of words hashed into 64 dims: deterministic and model-free."""

    name = "bow-test"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), 64), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace("'", " ").split():
                out[i, sum(map(ord, w.rstrip("s"))) % 64] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_semantic_search_is_cached_beside_the_db_and_fused(planted: Planted, tmp_path: Path) -> None:
    db_path = tmp_path / "features.db"
    db_path.write_bytes(planted.db.read_bytes())
    emb = CountingEmbedder()
    with FeatureDB.open(db_path) as db:
        hits = search_labels(db, "definitions of functions", mode="semantic", embedder=emb)
        assert hits[0].feature == 6 and hits[0].semantic_rank == 1
        assert emb.calls == 2  # documents + query
        cached = list(tmp_path.glob("features.db.emb-*.npy"))
        assert len(cached) == 1
        search_labels(db, "french", mode="semantic", embedder=emb)
        assert emb.calls == 3  # the documents came from the cache
        both = search_labels(db, "python function", mode="both", embedder=emb)
        top = both[0]
        assert top.feature == 6 and top.keyword_rank is not None and top.semantic_rank is not None
        assert top.score == pytest.approx(1 / (60 + top.keyword_rank) + 1 / (60 + top.semantic_rank), abs=1e-6)
        with db.transaction():  # a new explanation changes the documents: a new cache file
            db.conn.execute("INSERT INTO explanations VALUES (7, 'test', '1', 'x', 'closing brackets', 'test')")
        search_labels(db, "brackets", mode="semantic", embedder=emb)
        assert len(list(tmp_path.glob("features.db.emb-*.npy"))) == 2


def test_real_minilm_semantic_search(planted: Planted, tmp_path: Path) -> None:
    db_path = tmp_path / "features.db"
    db_path.write_bytes(planted.db.read_bytes())
    with FeatureDB.open(db_path) as db:
        hits = search_labels(db, "importing python modules", mode="semantic")
    assert hits[0].feature == 1 and hits[0].cosine > 0.4


# ---------------------------------------------------------------------------------------------- by contrast
def test_mann_whitney_matches_scipy_and_brute_force() -> None:
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    pos = np.round(rng.gamma(1.0, size=(13, 40)) * (rng.random((13, 40)) < 0.5), 1)
    neg = np.round(rng.gamma(0.7, size=(9, 40)) * (rng.random((9, 40)) < 0.4), 1)  # many ties (zeros, rounding)
    pos[:, 0] = 0.0
    neg[:, 0] = 0.0  # constant column: p = 1, AUROC 0.5
    auc, p = mann_whitney(pos, neg)
    brute = ((pos[:, None, :] > neg[None, :, :]).sum((0, 1)) + 0.5 * (pos[:, None, :] == neg[None, :, :]).sum((0, 1)))
    np.testing.assert_allclose(auc, brute / (13 * 9), atol=1e-12)
    ref = mannwhitneyu(pos[:, 1:], neg[:, 1:], axis=0, method="asymptotic", use_continuity=False)
    np.testing.assert_allclose(p[1:], ref.pvalue, rtol=1e-9)
    assert p[0] == 1.0 and auc[0] == 0.5


def test_benjamini_hochberg_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.random(50), rng.random(10) * 1e-3, [0.02, 0.02]])
    m = len(p)
    s = np.sort(p)
    brute = np.array([min(1.0, min(m * s[k] / (k + 1) for k in range(m) if s[k] >= pi)) for pi in p])
    np.testing.assert_allclose(benjamini_hochberg(p), brute, rtol=1e-12)


def test_cohens_d() -> None:
    pos = np.array([[1.0], [2.0], [3.0]])
    neg = np.array([[0.0], [0.0], [1.0], [1.0]])
    sd = np.sqrt((2 * 1.0 + 3 * (1 / 3)) / 5)
    assert cohens_d(pos, neg)[0] == pytest.approx((2.0 - 0.5) / sd)
    assert np.isnan(cohens_d(np.zeros((3, 1)), np.zeros((2, 1)))[0])


def test_planted_feature_separates_the_sets(searcher: Searcher) -> None:
    pos = ["the dog barks", "a lazy dog sleeps", "my dog and the fox", "the dog", "the dog in summer", "one dog"]
    neg = ["the cat barks", "a lazy cat sleeps", "my cat and the fox", "the cat", "the cat in summer", "one cat"]
    res = contrast(searcher, pos, neg, top=3)
    top = res.hits[0]
    assert top.feature == DOG and top.auroc == 1.0 and top.frac_pos == 1.0 and top.frac_neg == 0.0
    assert top.label == "' dog'"
    # 6 vs 6, no ties between the sets: U = 36, the exact normal approximation with the zero-tie correction
    from scipy.stats import mannwhitneyu

    ref = mannwhitneyu([1.0] * 6, [0.0] * 6, method="asymptotic", use_continuity=False).pvalue
    assert top.p == pytest.approx(ref) and top.q == pytest.approx(ref * F / 1)  # BH: smallest p, rank 1 of F tests
    assert res.n_significant == 1
    fox = next(h for h in contrast(searcher, pos, neg, top=F, direction="both").hits if h.feature == FOX)
    assert fox.auroc == 0.5 and fox.p == 1.0  # on one text of each set
    with pytest.raises(MonoscopeError, match=r"a contrast needs texts on both sides: got 6 positive and 0 negative"):
        contrast(searcher, pos, [])


def test_contrast_scores_directions() -> None:
    pos = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0]])
    neg = np.array([[0.0, 5.0], [0.0, 6.0], [0.0, 7.0]])
    assert [h.feature for h in contrast_scores(pos, neg, direction="pos").hits] == [0, 1]
    assert [h.feature for h in contrast_scores(pos, neg, direction="neg").hits] == [1, 0]
    with pytest.raises(MonoscopeError, match=r"--direction 'up' is unknown: use one of pos, neg, both"):
        contrast_scores(pos, neg, direction="up")


def test_neighbours_are_decoder_cosine(planted: Planted) -> None:
    W = planted.W_dec / planted.W_dec.norm(dim=1, keepdim=True)
    sim = (W @ W.T).fill_diagonal_(-2)
    want = sim[FOX].topk(4).indices.tolist()
    with FeatureDB.open(planted.db) as db:
        rows = neighbours(db, FOX, top=4)
        assert [r.feature for r in rows] == want
        assert rows[0].cosine == pytest.approx(float(sim[FOX, want[0]]), abs=1e-4)
        with pytest.raises(MonoscopeError, match=r"--neighbours 99 is out of range: .* has features 0..11"):
            neighbours(db, 99)


# ---------------------------------------------------------------------------------------------- command line
def test_cli_text_json_subprocess(planted: Planted) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "monoscope.cli", "search", str(planted.sae), "the quick brown fox",
                        "--json", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [h["feature"] for h in out["hits"]] == [FOX, DENSE]
    assert out["hits"][0]["evidence"][0]["token"] == " fox"


def test_cli_modes_in_process(planted: Planted, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(planted.sae), "fox", "--query", "x"]) == 2
    assert capsys.readouterr().err.strip() == ("error: search got TEXT and --query: give exactly one of TEXT, "
                                               "--text-file, --query, --pos/--neg, --pack, --neighbours, "
                                               "--multilingual, --attribution")
    assert main(["search", str(planted.sae), "--query", "python imports", "--mode", "keyword", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["feature"] == 1
    assert main(["search", str(planted.sae), "--neighbours", str(FOX), "--top", "2"]) == 0
    assert "nearest features to #3" in capsys.readouterr().out
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.jsonl"
    pos.write_text("the dog\n\na dog runs\n")
    neg.write_text('{"text": "the cat"}\n{"text": "a cat runs"}\n')
    assert main(["search", str(planted.sae), "--pos", str(pos), "--neg", str(neg), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].split()[:2] == [str(DOG), "1.000"]
    neg.write_text('{"text": "the cat"}\n{"txt": "a cat runs"}\n')
    assert main(["search", str(planted.sae), "--pos", str(pos), "--neg", str(neg), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f'error: {neg} line 2 has no "text" string: write {{"text": "..."}}'
    long = tmp_path / "long.txt"
    long.write_text("the dog\n" + "fox " * 400 + "\n")
    assert main(["search", str(planted.sae), "--pos", str(long), "--neg", str(pos), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {long} line 2 is ") and err.endswith(
        " tokens (BOS included) but local:model reads at most 256: split it into shorter texts")
