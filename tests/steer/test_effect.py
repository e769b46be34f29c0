"""steer-eval on a tiny model: every number in the JSON, the factor picked on one half, controls,
resume, and the CLI through a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monoscope.steer import SteerError
from monoscope.steer.effect import CONDITIONS, bootstrap, matched_feature, neutral_prompts, parse_factors
from tests.steer.helpers import make_run, run_cli


def test_shipped_prompts() -> None:
    p = neutral_prompts()
    assert len(p) >= 20 and len(set(p)) == len(p)
    assert p[0] == "Yesterday afternoon I finally sat down and"


def test_bootstrap_and_controls() -> None:
    v = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    mean, lo, hi = bootstrap(v, 2000, 0)
    assert mean == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0
    d = np.array([0.1, 0.0, 0.11, 0.5, 0.09, np.nan])
    picks = {matched_feature(d, 0, s) for s in range(20)}
    assert picks <= {2, 3, 4} and 1 not in picks and 0 not in picks
    with pytest.raises(SteerError, match="--factors '1,x': 'x' is not a number"):
        parse_factors("1,x")
    with pytest.raises(SteerError, match="is not finite"):
        parse_factors("1,inf")


def test_steer_eval_cli(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    sae_dir = make_run(tmp_path, tokenizer)
    out = tmp_path / "eval"
    args = ["steer-eval", str(sae_dir), "--feature", "3", "--concept", "the", "--factors", "0,5,20",
            "--max-new-tokens", "3", "--prompts", "4", "--out", str(out), "--device", "cpu", "--compute-dtype", "fp32",
            "--quiet", "--bootstrap", "200"]
    r = run_cli(*args, timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "steer_eval.json").read_text())
    assert (out / "steer_eval.png").stat().st_size > 10_000
    assert not (out / "partial.json").exists()
    assert len(doc["table"]) == 3 * len(CONDITIONS)
    assert doc["chosen_factor"] in (0, 5, 20)
    assert doc["halves"]["select"] == neutral_prompts()[0:4:2] and doc["halves"]["report"] == neutral_prompts()[1:4:2]
    rows = {(r["condition"], r["factor"]): r for r in doc["table"]}
    # a random direction added 0 times changes nothing
    assert rows[("random_direction", 0)]["kl"]["mean"] < 1e-6
    assert rows[("target", 0)]["concept_act"]["mean"] <= doc["unsteered"]["concept_act"]["mean"] + 1e-6
    # a stronger clamp moves the next-token distributions on the prompts further (KL grows with the dose)
    assert rows[("target", 20)]["kl"]["mean"] > rows[("target", 5)]["kl"]["mean"] > 0
    for row in doc["table"]:
        lo, hi = row["ppl"]["ci95"]
        assert lo <= row["ppl"]["mean"] <= hi
    assert "random_direction" in r.stdout and f"{out}/steer_eval.json" in r.stdout


def test_judge_scores_and_harmonic_mean() -> None:
    from monoscope.interp.llm import ChatResponse
    from monoscope.steer.effect import _judge

    class FakeLLM:
        def __init__(self) -> None:
            self.seen: list[str] = []

        def chat_many(self, reqs):  # type: ignore[no-untyped-def]
            self.seen += [r.messages[-1]["content"] for r in reqs]
            return [ChatResponse(text="Rating: 2" if "concept" in r.messages[-1]["content"] else "1")
                    if i < 4 else ChatResponse(text=None, error="timeout") for i, r in enumerate(reqs)]

    llm = FakeLLM()
    out = _judge(llm, "Python", ["import numpy", "def f(): pass", "lorem"])
    assert out["concept"][:2] == [2.0, 2.0] and out["fluency"][:2] == [1.0, 1.0]
    assert out["harmonic"][:2] == pytest.approx([4 / 3, 4 / 3])
    assert np.isnan(out["harmonic"][2])  # a failed request is missing, not 0
    assert 'the concept "Python"' in llm.seen[0] and "Text: import numpy" in llm.seen[0]


def test_steer_eval_resumes_from_partial(tiny_lm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from monoscope.steer.effect import steer_eval
    from monoscope.steer.target import Target
    from tests.steer.helpers import tiny_sae

    sae = tiny_sae(tiny_lm)
    dens = np.linspace(0.01, 0.2, sae.cfg.d_sae)
    t = Target(tiny_lm, sae, tiny_lm.hook(sae.cfg.hook), max_acts=np.full(sae.cfg.d_sae, 2.0), densities=dens)
    prompts = neutral_prompts()[:4]
    kw = dict(max_new_tokens=2, out_dir=tmp_path, prompts=prompts, progress=False, n_boot=50)
    first = steer_eval(t, 3, ["the"], [5.0], **kw)  # type: ignore[arg-type]
    assert not (tmp_path / "partial.json").exists()
    # a run killed after its first (condition, factor) left this partial file; the rerun must reuse it
    row = dict(first["samples"]["target@5"], condition="target", factor=5.0, texts=["SAVED"] * 4)
    (tmp_path / "partial.json").write_text(json.dumps({"key": first["key"], "done": {"target@5": row}}))
    again = steer_eval(t, 3, ["the"], [5.0], **kw)  # type: ignore[arg-type]
    assert again["samples"]["target@5"]["texts"] == ["SAVED"] * 4
    for k in ("random_feature@5", "random_direction@5"):  # recomputed, deterministically
        assert again["samples"][k]["texts"] == first["samples"][k]["texts"]
    assert torch.isfinite(torch.tensor(again["table"][0]["kl"]["mean"]))
