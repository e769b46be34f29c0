"""Non-finite SAE weights are refused by name wherever an SAE is loaded (eval, convert, any format), and
every JSON file monoscope writes is valid JSON: an undefined metric is null with the reason, never NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from monoscope.errors import MonoscopeError
from monoscope.eval import evaluate
from monoscope.fileio import nonfinite_to_null, write_json_atomic
from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.io import save_sae
from monoscope.store import Manifest, RowPolicy
from monoscope.store.writer import StoreWriter
from tests.reliability.helpers import monoscope, one_line_error
from tests.train.helpers import make_store

D = 32


def _sae(folder: Path, poison: tuple[str, tuple[int, ...], float] | None = None) -> Path:
    """A topk SAE for the synthetic store (model 'synthetic', hook resid_post.1), optionally with one bad value."""
    sae = build_sae(SAEConfig(arch="topk", d_in=D, d_sae=64, k=4, model="synthetic", hook="resid_post.1"), seed=0)
    if poison is not None:
        name, idx, value = poison
        with torch.no_grad():
            getattr(sae, name)[idx] = value
    return save_sae(sae.eval(), folder)


def _strict_json(path: Path) -> dict:  # type: ignore[type-arg]
    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_eval_and_convert_refuse_nan_weights_naming_the_tensor(tmp_path: Path) -> None:
    make_store(tmp_path / "store")
    sae = _sae(tmp_path / "sae", ("W_dec", (3, 5), math.nan))
    expected = (f"error: SAE weights {sae / 'sae.safetensors'}: tensor W_dec holds 1 non-finite value (first nan at "
                "[3, 5]): the SAE is broken (training diverged, or the file was edited); retrain it (a lower --lr) "
                "or restore a good copy")
    proc = monoscope("eval", str(sae), "--acts", str(tmp_path / "store"), "--out", str(tmp_path / "eval"), "--quiet")
    assert one_line_error(proc) == expected and not (tmp_path / "eval" / "metrics.json").exists()
    proc = monoscope("convert", str(sae), "--to", "saelens", "--out", str(tmp_path / "conv"))
    assert one_line_error(proc) == expected and not (tmp_path / "conv").exists()


def test_a_peer_format_with_inf_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from monoscope.cli import main

    good = _sae(tmp_path / "sae")
    assert main(["convert", str(good), "--to", "saelens", "--out", str(tmp_path / "sl")]) == 0
    weights = tmp_path / "sl" / "sae_weights.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    tensors["W_enc"][0, 7] = math.inf
    safetensors.torch.save_file(tensors, str(weights))
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "sl"), "--to", "monoscope", "--out", str(tmp_path / "back")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: SAE weights {weights}: tensor W_enc holds 1 non-finite value (first inf at [0, 7]): the SAE is "
        "broken (training diverged, or the file was edited); retrain it (a lower --lr) or restore a good copy")


def test_the_json_writer_refuses_nan_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(MonoscopeError, match=r"refusing to write .*x\.json: a\.b\[1\] is not a finite number"):
        write_json_atomic(tmp_path / "x.json", {"a": {"b": [1.0, math.nan]}})
    assert not (tmp_path / "x.json").exists()
    clean, replaced = nonfinite_to_null({"a": {"b": [1.0, math.nan]}, "c": -math.inf, "d": "nan"})
    assert clean == {"a": {"b": [1.0, None]}, "c": None, "d": "nan"}
    assert replaced == {"a.b[1]": "nan", "c": "-inf"}


def test_undefined_eval_metrics_are_null_with_a_reason(tmp_path: Path) -> None:
    """A store of constant activations has no variance: FVU divides by 0."""
    w = StoreWriter(tmp_path / "const", "c" * 64)
    policy = RowPolicy(exclude_bos=True, outlier_factor=0.0, median_norm=1.0)
    w.set_row_policy(policy)
    acts = torch.ones(8, 9, D, dtype=torch.bfloat16)
    w.add_shard(torch.zeros(8, 9, dtype=torch.int32), acts, policy.keep(acts))
    w.finish(Manifest(model={"id": "synthetic", "spec": "synthetic"}, hook="resid_post.1", d_model=D,
                      dtype="bfloat16", ctx_len=9, tokenizer={"sha256": "t" * 64}, row_policy=policy,
                      corpus={"kind": "synthetic"}, capture={}, requested_tokens=72))
    res = evaluate(_sae(tmp_path / "sae"), acts=tmp_path / "const", tokens=64, out=tmp_path / "eval", plots=False,
                   progress=False)
    assert math.isnan(res.store.fvu)
    m = _strict_json(tmp_path / "eval" / "metrics.json")
    assert m["store_rows"]["fvu"] is None and m["store_rows"]["explained_variance"] is None
    assert m["non_finite"]["store_rows.fvu"] == ("nan: the evaluated rows have no variance (constant activations), "
                                                 "so FVU divides by 0")
    assert m["store_rows"]["l0_mean"] == res.store.l0_mean  # the defined metrics are kept
