"""The features pass on a tiny model: what lands in the database, and that a killed pass resumes to the
same database as an uninterrupted one."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.features import FeatureDB
from monoscope.features import stats as stats_mod
from monoscope.features.build import build_features, default_features_dir
from monoscope.features.stats import FeatureStats

HOOK = "resid_post.1"


@pytest.fixture(scope="module")
def run(features_run: Path) -> Path:
    """The tiny run of `features_run` (tests/conftest.py)."""
    return features_run


def _dump(db_path: Path) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(str(db_path))
    out = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
           for t in ("features", "examples", "splits", "vocab")}
    out["meta"] = [r for r in conn.execute("SELECT * FROM meta ORDER BY key") if r[0] != "sae"]
    conn.close()
    return out


def test_stats_match_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    F, T, B, L = 12, 5, 6, 3
    dense = torch.rand(B * T, F, generator=g) * (torch.rand(B * T, F, generator=g) < 0.3)
    val, idx = dense.topk(L, dim=1)
    dense_kept = torch.zeros_like(dense).scatter(1, idx, val)
    st = FeatureStats(F, top_k=2, reservoir=4)
    for b, rows in ((torch.arange(3), slice(0, 15)), (torch.arange(3, 6), slice(15, 30))):  # two batches
        r, f = torch.nonzero(dense_kept[rows], as_tuple=True)
        st.update(r, f, dense_kept[rows][r, f], b, T, 15)
    assert torch.equal(st.fires, (dense_kept > 0).sum(0))
    assert torch.allclose(st.max_act, dense_kept.max(0).values)
    cmax = dense_kept.view(B, T, F).amax(1)  # [B, F]
    assert torch.allclose(st.top_val, cmax.T.topk(2, dim=1).values)
    assert int(st.hist.sum()) == int((dense_kept > 0).sum())
    on = (dense_kept > 0).int()
    ids, cnt = st.cooc.top(F)
    got = np.zeros((F, F), np.int64)
    for i in range(F):
        got[i, ids[i][ids[i] >= 0]] = cnt[i][ids[i] >= 0]
    want = (on.T @ on).numpy()
    np.fill_diagonal(want, 0)
    assert st.cooc.exact and (got == want).all()
    # the reservoir holds only contexts where the feature is active, at most `reservoir` of them
    for f in range(F):
        held = {int(c) for c in st.res_ctx[f] if c >= 0}
        assert held <= {int(c) for c in torch.nonzero(cmax[:, f] > 0).flatten()}
        assert len(held) == min(4, int((cmax[:, f] > 0).sum()))


def test_features_database_contents(run: Path) -> None:
    res = build_features(run / "sae", also=[run / "sae-2x"], tokens=512, batch_contexts=4, feature_map=False,
                         progress=False)
    assert res.dbs == [run / "features" / "features.db", run / "sae-2x-features" / "features.db"]
    assert default_features_dir(run / "sae") == run / "features"
    db = FeatureDB.open(res.dbs[0])
    meta = db.meta()
    assert meta["complete"] is True and meta["tokens"] == 512 and meta["sae"]["weights_sha256"]
    assert db.n_features() == 256
    f = next(db.feature(i) for i in range(256) if (db.feature(i) or {}).get("fires"))
    assert f is not None and 0 < f["density"] <= 1 and f["max_act"] >= f["mean_act"] > 0
    assert sum(f["hist"]["counts"]) == f["fires"] and len(f["logit_pos"]) == 10 and len(f["neighbours"]) == 10
    assert f["label"] and f["cooccur"] is not None
    top = db.examples(f["id"], "top")
    assert top and [e["act"] for e in top] == sorted((e["act"] for e in top), reverse=True)
    best = top[0]
    assert best["acts"][best["position"]] == pytest.approx(f["max_act"], rel=1e-2)  # window centred on the max
    assert best["acts"].max() == pytest.approx(best["acts"][best["position"]])
    vocab = db.vocab()
    assert len(vocab) == 300 and all(0 <= t < 300 for t in best["tokens"])
    q = db.examples(f["id"], "quantile")
    assert q and all(0 <= e["bin"] < 10 for e in q)
    # search: a word of a cheap label finds that feature, and every hit contains the word
    g, word = next((g, m.group(0)) for i in range(256) if (g := db.feature(i)) and g["label"]
                   and (m := re.search(r"[a-z]{3,}", g["label"])))
    hits = db.search_labels(json.dumps(word), limit=1000)
    assert (g["id"], g["label"]) in hits and all(word in t.lower() for _, t in hits)
    db.close()
    # families: every 4x feature has a parent among the 2x features (or none below the cosine floor)
    with FeatureDB.open(res.dbs[1]) as small:
        fams = small.meta().get("families")
        assert fams and len(fams) == 1
        rows = small.conn.execute("SELECT parent, child, cosine, corr FROM splits").fetchall()
        assert rows and all(c >= 0.5 and (r is None or -1 <= r <= 1) for _, _, c, r in rows)
        assert any(r is not None for *_, r in rows)  # activation correlation from the pass's rows
    # a rerun with the same inputs is a no-op
    again = build_features(run / "sae", also=[run / "sae-2x"], tokens=512, batch_contexts=4, feature_map=False,
                           progress=False)
    assert again.new_tokens == 0 and "already complete" in again.notes[0]


def test_killed_pass_resumes_to_the_same_database(run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kw = {"tokens": 512, "batch_contexts": 2, "checkpoint_every": 3, "feature_map": False, "progress": False}
    ref = build_features(run / "sae", overwrite=True, **kw)
    want = _dump(ref.dbs[0])
    calls = {"n": 0}
    real = stats_mod.FeatureStats.update

    def dying(self, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt  # a kill between checkpoints
        return real(self, *a, **k)

    monkeypatch.setattr(stats_mod.FeatureStats, "update", dying)
    with pytest.raises(KeyboardInterrupt):
        build_features(run / "sae", overwrite=True, **kw)
    monkeypatch.setattr(stats_mod.FeatureStats, "update", real)
    assert (run / "features" / ".pass" / "state.pt").is_file()
    assert _dump(ref.dbs[0]) == want  # the old database stays until the new one is complete
    res = build_features(run / "sae", overwrite=True, **kw)  # an unfinished --overwrite pass resumes
    assert 0 < res.new_tokens < 512  # resumed from the checkpoint, not from the start
    assert _dump(res.dbs[0]) == want


def test_features_that_never_fire(run: Path, tmp_path: Path) -> None:
    """A chunk of features with no examples at all (here: every feature dead) still gives a database."""
    from monoscope.sae import load_sae
    from monoscope.sae.io import save_sae

    sae = load_sae(run / "sae")
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
    save_sae(sae, tmp_path / "dead")
    res = build_features(tmp_path / "dead", model=str(run / "model"), corpus=str(run / "corpus.jsonl"), tokens=128,
                         feature_map=False, progress=False)
    with FeatureDB.open(res.dbs[0]) as db:
        assert db.n_features() == 256 and db.n_examples() == 0 and db.features_with_examples() == []
        assert all(db.column("density") == 0)
    assert res.interesting == []


def test_bad_input(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MonoscopeError, match="does not exist"):
        build_features(run / "missing")
    (run / "junk-features").mkdir(exist_ok=True)
    (run / "junk-features" / "features.db").write_bytes(b"not sqlite" * 100)
    from monoscope.features.db import FeatureDBError

    with pytest.raises(FeatureDBError, match="not a readable feature database"):
        FeatureDB.open(run / "junk-features" / "features.db")
    assert main(["features", str(run / "nope"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_windows_are_bounded_by_context(run: Path) -> None:
    with FeatureDB.open(run / "features" / "features.db") as db:
        rows = [(e["tokens"], e["acts"], e["position"]) for f in db.features_with_examples()
                for kind in ("top", "quantile") for e in db.examples(f, kind)]
        assert len(rows) == db.n_examples() > 0
    for toks, acts, p in rows:
        assert toks.dtype == np.int32 and 1 <= len(toks) <= 16 and 0 <= p < len(toks) and len(acts) == len(toks)
        assert acts[p] == acts.max() > 0  # the position is the window's maximum
