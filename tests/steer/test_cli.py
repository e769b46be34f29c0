"""`monoscope steer` through a real subprocess on a tiny model folder + SAE + features database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.steer.helpers import make_run, run_cli


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    return make_run(tmp_path_factory.mktemp("steer"), tokenizer)


def test_steer_json_side_by_side(sae_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["steer", str(sae_dir), "--prompt", "the quick brown fox", "--max-new-tokens", "6", "--json",
            "--compute-dtype", "fp32", "--device", "cpu"]
    r = run_cli(*base, "--feature", "3,7", "--clamp", "10x")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"default", "steered", "edits", "seed"} <= set(out)
    assert out["seed"] == 0
    assert [e["feature"] for e in out["edits"]] == [3, 7]
    assert all(e["value"] == "10x" and e["raw_value"] > 0 for e in out["edits"])
    assert out["default"] != out["steered"]
    assert len(out["tokens"]["steered"]) == 6
    # the default continuation read by both models: default log-probs of the greedy tokens, steered ones lower
    assert sum(t["delta"] for t in out["tokens"]["default"]) < 0
    assert sum(t["delta"] for t in out["tokens"]["steered"]) > 0
    # same seed, same default text; an identity edit reproduces it
    from monoscope.cli import main

    assert main([*base, "--feature", "3", "--scale", "1"]) == 0
    out2 = json.loads(capsys.readouterr().out)
    assert out2["default"] == out["default"] == out2["steered"]
    assert all(abs(t["delta"]) < 1e-3 for t in out2["tokens"]["steered"])


def test_steer_table(sae_dir: Path) -> None:
    r = run_cli("steer", str(sae_dir), "--feature", "3", "--add", "-2", "--prompt", "def add(a, b):",
                "--max-new-tokens", "4", "--where", "generated", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "add #3 = -2 [f3]; where=generated" in r.stdout
    assert "log p steered" in r.stdout and "sum of Δ log p" in r.stdout


def test_steer_feature_out_of_range(sae_dir: Path) -> None:
    r = run_cli("steer", str(sae_dir), "--prompt", "the quick brown fox", "--feature", "256", "--clamp", "3")
    assert r.returncode == 2
    assert r.stderr == "error: feature 256 is out of range: this SAE has features 0..255\n"


@pytest.mark.parametrize(("extra", "message"), [
    (["--feature", "3", "--clamp", "nan"], "error: --clamp 'nan' is not finite"),
    (["--feature", "3", "--add", "infx"], "error: --add 'infx' is not finite"),
    (["--feature", "3", "--clamp", "big"], "error: --clamp 'big' is not a number"),
    (["--feature", "3", "--scale", "2x"], "error: --scale 2x: a scale is a plain factor"),
    (["--feature", "3", "--ablate", "--max-new-tokens", "300"],
     "error: the prompt plus --max-new-tokens needs 314 tokens but local:model has a 256-token context"),
    (["--feature", "3", "--ablate", "--chat"], "error: the tokenizer of local:model has no chat template"),
])
def test_steer_bad_input(sae_dir: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """In-process (the same `main` the subprocess runs; one subprocess each would cost ~10 s)."""
    from monoscope.cli import main

    assert main(["steer", str(sae_dir), "--prompt", "the quick brown fox", "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line
    assert err.startswith(message), err


def test_steer_wrong_model_or_hook(sae_dir: Path, tmp_path: Path, tokenizer,  # type: ignore[no-untyped-def]
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from monoscope.cli import main
    from tests.conftest import make_llama

    wide = tmp_path / "wide"
    make_llama(len(tokenizer), d=32).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    r = run_cli("steer", str(sae_dir), "--model", str(wide), "--feature", "3", "--ablate", "--prompt", "x")
    assert r.returncode == 2
    assert r.stderr.startswith("error: model local:wide is 32 wide at resid_post.1 but the SAE reads d_in 64: "
                               "the SAE was made for another model"), r.stderr
    shallow = tmp_path / "shallow"
    make_llama(len(tokenizer), layers=1).save_pretrained(shallow)
    tokenizer.save_pretrained(shallow)
    assert main(["steer", str(sae_dir), "--model", str(shallow), "--feature", "3", "--ablate", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after transformers' save_pretrained progress bar above
    assert err.startswith("error: the SAE reads hook 'resid_post.1', which local:shallow lacks"), err
