"""Search by attribution on the planted model (conftest.py): the ranking equals the steering package's
attribution, exact effects equal an ablation through the steering hook, filters and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.search import search_attribution
from monoscope.search.text import Searcher
from monoscope.steer import Edit, steer
from monoscope.steer.attribute import attribute, parse_metric
from monoscope.steer.target import Target
from tests.search.conftest import DENSE, DOG, FOX, Planted

SRC = str(Path(__file__).resolve().parents[2] / "src")
PROMPT = "the fox and the dog and the"


@pytest.fixture(scope="module")
def searcher(planted: Planted) -> Searcher:
    s = Searcher.open(planted.sae, device="cpu", compute_dtype="fp32")
    yield s
    s.close()


def test_ranking_and_exact_effects_match_steering(searcher: Searcher) -> None:
    res = search_attribution(searcher, PROMPT, target=" cat", direction="both", top=5, verify=5)
    # only the planted features fire on this prompt, so only they are attributed
    assert res.n_attributed == 3 and {h.feature for h in res.hits} == {FOX, DOG, DENSE}
    t = Target(searcher.lm, searcher.sae, searcher.hp)
    metric = parse_metric(searcher.lm.tokenizer, " cat", None)
    ref = attribute(t, PROMPT, metric, verify=0)
    per = ref.attr.sum(0)
    assert [h.feature for h in res.hits] == ref.top_features(3)  # by magnitude, as `monoscope attribute`
    assert res.metric == "log p(' cat')" and res.metric_clean == pytest.approx(ref.m_clean, abs=1e-5)
    ids = t.encode(PROMPT)
    for h in res.hits:
        assert h.attribution == pytest.approx(float(per[h.feature]), abs=1e-6)
        with torch.no_grad(), steer(searcher.lm, searcher.sae, [Edit(h.feature, "ablate")]):
            logits = searcher.lm.model(input_ids=ids, use_cache=False).logits[:, -1]
        assert h.exact == pytest.approx(res.metric_clean - float(metric(logits)[0]), abs=1e-4)
    fox = next(h for h in res.hits if h.feature == FOX)
    assert fox.token == " fox" and fox.activation == pytest.approx(1.0, abs=1e-4) and fox.rel == pytest.approx(1.0,
                                                                                                               abs=1e-4)
    assert fox.label == "' fox'" and fox.explanation == "the animal fox"
    assert res.correlation is not None  # three checked features


def test_direction_and_density_filter(searcher: Searcher) -> None:
    both = search_attribution(searcher, PROMPT, target=" cat", direction="both", verify=0)
    signs = {h.feature: h.attribution for h in both.hits}
    pos = search_attribution(searcher, PROMPT, target=" cat", verify=0)
    neg = search_attribution(searcher, PROMPT, target=" cat", direction="neg", verify=0)
    assert [h.feature for h in pos.hits] == sorted((f for f, a in signs.items() if a > 0), key=lambda f: -signs[f])
    assert [h.feature for h in neg.hits] == sorted((f for f, a in signs.items() if a < 0), key=lambda f: signs[f])
    assert all(h.exact is None for h in pos.hits)  # verify=0: nothing ablated
    sparse = search_attribution(searcher, PROMPT, target=" cat", direction="both", max_density=0.5, verify=0)
    assert DENSE not in {h.feature for h in sparse.hits} and sparse.n_filtered == 1
    diff = search_attribution(searcher, PROMPT, metric='logit-diff:" cat"," dog"', direction="both", verify=0)
    assert diff.metric == "logit(' cat') - logit(' dog')" and len(diff.hits) == 3


def test_bad_input(searcher: Searcher) -> None:
    with pytest.raises(MonoscopeError, match=r"' elephant' is \d+ tokens .*: pass a single token"):
        search_attribution(searcher, PROMPT, target=" elephant")
    with pytest.raises(MonoscopeError, match=r"^--attribution got an empty prompt: pass the text the model continues$"):
        search_attribution(searcher, "  ", target=" cat")
    with pytest.raises(MonoscopeError, match=r"^--direction 'up': use one of pos, neg, both$"):
        search_attribution(searcher, PROMPT, target=" cat", direction="up")


def test_cli_json_subprocess(planted: Planted) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "monoscope.cli", "search", str(planted.sae), "--attribution", PROMPT,
                        "--target", " cat", "--direction", "both", "--json", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {h["feature"] for h in out["hits"]} == {FOX, DOG, DENSE}
    assert all(h["exact"] is not None for h in out["hits"]) and out["metric"] == "log p(' cat')"


def test_cli_table_and_errors(planted: Planted, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(planted.sae), "--attribution", PROMPT, "--target", " cat", "--direction", "both",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("log p(' cat') = ") and "3 of 12 features attributed" in out
    assert main(["search", str(planted.sae), "--attribution", PROMPT, "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == ('error: --attribution needs exactly one of --target " token" and '
                                               '--metric logit-diff:" a"," b"')
    assert main(["search", str(planted.sae), "fox", "--target", " cat"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --target and --metric go with --attribution PROMPT: add it, "
                                               "or drop them")
