"""The SAELens and sparsify formats without the peer packages: round trips through files, folders
written by hand (checked against the formulas the peers document), and every refusal."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from monoscope.errors import MonoscopeError
from monoscope.interop import InteropError, convert, detect_format, load_any, write_saelens, write_sparsify
from monoscope.interop.cli import add_convert_parser
from monoscope.sae import SAEConfig, build_sae, load_sae, save_sae
from tests.interop.helpers import (
    ARCHS,
    D_IN,
    D_SAE,
    NORMALISER,
    K,
    assert_close,
    float32,
    inputs,
    make_sae,
    saelens_cfg,
    saelens_tensors,
    sparsify_cfg,
    sparsify_tensors,
    topk_dense,
    write_folder,
)

SAELENS_W = "sae_weights.safetensors"
SPARSIFY_W = "sae.safetensors"


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("arch", "kw"), ARCHS)
@pytest.mark.parametrize("b_dec_to_input", [False, True])
def test_saelens_round_trip_keeps_raw_features(tmp_path: Path, arch: str, kw: dict[str, Any],
                                               b_dec_to_input: bool) -> None:
    sae = make_sae(arch, kw, b_dec_to_input=b_dec_to_input)
    out = convert(save_sae(sae, tmp_path / "mono"), "saelens", tmp_path / "lens")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"  # the normaliser is folded into the weights
    assert cfg["architecture"] == {"relu-l1": "standard", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}.get(
        arch, arch)
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    back = float32(load_any(out))
    assert back.cfg.arch == arch  # batchtopk and matryoshka come back through SAELens's training metadata
    assert back.cfg.normaliser == 1.0 and back.cfg.hook == "resid_post.3" and back.cfg.k == sae.cfg.k
    assert back.cfg.prefixes == sae.cfg.prefixes
    x = inputs()
    assert_close(back.encode_raw(x), sae.encode_raw(x))
    assert_close(back.reconstruct_raw(x), sae.reconstruct_raw(x))
    assert back.provenance["imported_from"]["format"] == "saelens"


@pytest.mark.parametrize("b_dec_to_input", [False, True])
def test_sparsify_round_trip_keeps_raw_features(tmp_path: Path, b_dec_to_input: bool) -> None:
    sae = make_sae("topk", {"k": K}, b_dec_to_input=b_dec_to_input)
    out = convert(save_sae(sae, tmp_path / "mono"), "sparsify", tmp_path / "run" / "layers.3")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["k"] == K and cfg["num_latents"] == D_SAE and cfg["d_in"] == D_IN
    assert cfg["normalize_decoder"] is False  # rows are 1/c long after folding c
    back = float32(load_any(tmp_path / "run"))  # the run folder with one hookpoint is accepted
    assert back.cfg.arch == "topk" and back.cfg.b_dec_to_input and back.cfg.hook == "resid_post.3"
    x = inputs()
    assert_close(back.encode_raw(x), sae.encode_raw(x))
    assert_close(back.reconstruct_raw(x), sae.reconstruct_raw(x))


def test_convert_to_monoscope_writes_a_checked_monoscope_folder(tmp_path: Path) -> None:
    lens = write_folder(tmp_path / "lens", saelens_cfg("topk", k=K), saelens_tensors(), SAELENS_W)
    out = convert(lens, "monoscope", tmp_path / "mono")
    sae = float32(load_sae(out))  # monoscope's own loader, checksum included
    assert sae.cfg.arch == "topk" and sae.cfg.k == K
    assert sae.provenance["imported_from"]["format"] == "saelens"
    assert sae.provenance["imported_from"]["model_name"] == "gpt2-small"
    assert sae.cfg.model is None  # a TransformerLens alias is not a model id monoscope could check


def test_bf16_weights_stay_bf16_when_nothing_is_folded(tmp_path: Path) -> None:
    tensors = {k: v.bfloat16() for k, v in sparsify_tensors().items()}
    folder = write_folder(tmp_path / "sp", sparsify_cfg(), tensors, SPARSIFY_W)
    sae = load_any(folder)
    assert sae.cfg.dtype == "bfloat16" and sae.W_enc.dtype == torch.bfloat16
    assert torch.equal(sae.W_enc, tensors["encoder.weight"])


# ----------------------------------------------------------------------------- SAELens by hand


def _lens_pre(t: dict[str, torch.Tensor], x: torch.Tensor, b_dec_to_input: bool = True) -> torch.Tensor:
    return ((x - t["b_dec"]) if b_dec_to_input else x) @ t["W_enc"] + t["b_enc"]


@pytest.mark.parametrize("b_dec_to_input", [False, True])
def test_saelens_standard_by_hand(tmp_path: Path, b_dec_to_input: bool) -> None:
    t = saelens_tensors()
    folder = write_folder(tmp_path / "s", saelens_cfg("standard", apply_b_dec_to_input=b_dec_to_input), t, SAELENS_W)
    sae = float32(load_any(folder))
    assert sae.cfg.arch == "relu-l1" and sae.cfg.hook == "resid_post.3"
    x = inputs()
    f = _lens_pre(t, x, b_dec_to_input).relu()
    assert_close(sae.encode_raw(x), f)
    assert_close(sae.reconstruct_raw(x), f @ t["W_dec"] + t["b_dec"])


def test_saelens_topk_rescaled_by_decoder_norm_is_folded(tmp_path: Path) -> None:
    t = saelens_tensors()
    cfg = saelens_cfg("topk", k=K, rescale_acts_by_decoder_norm=True)
    sae = float32(load_any(write_folder(tmp_path / "s", cfg, t, SAELENS_W)))
    x = inputs()
    norms = t["W_dec"].norm(dim=1)
    f = topk_dense(_lens_pre(t, x) * norms, K)  # SAELens's TopKSAE.encode
    assert_close(sae.encode_raw(x), f)
    assert_close(sae.reconstruct_raw(x), (f / norms) @ t["W_dec"] + t["b_dec"])
    assert_close(sae.decoder_norms(), torch.ones(D_SAE))  # unit rows, as monoscope trains topk
    assert sae.provenance["imported_from"]["rescale_acts_by_decoder_norm_folded"] is True


def test_saelens_jumprelu_by_hand_and_non_positive_thresholds(tmp_path: Path) -> None:
    t = saelens_tensors()
    theta = torch.rand(D_SAE, generator=torch.Generator().manual_seed(9)) * 0.5
    theta[:4] = torch.tensor([0.0, -0.3, 0.0, -1.0])  # act as 0: the ReLU already zeroes pre <= 0
    sae = float32(load_any(write_folder(tmp_path / "s", saelens_cfg("jumprelu"), {**t, "threshold": theta},
                                        SAELENS_W)))
    x = inputs()
    pre = _lens_pre(t, x)
    f = pre.relu() * (pre > theta)
    assert_close(sae.encode_raw(x), f)
    assert_close(sae.reconstruct_raw(x), f @ t["W_dec"] + t["b_dec"])
    again = float32(load_sae(convert(tmp_path / "s", "monoscope", tmp_path / "mono")))  # log θ = -inf survives
    assert_close(again.encode_raw(x), f)


def test_saelens_batchtopk_training_checkpoint(tmp_path: Path) -> None:
    t = saelens_tensors()
    cfg = saelens_cfg("batchtopk", k=float(K), rescale_acts_by_decoder_norm=True, topk_threshold_lr=0.01)
    folder = write_folder(tmp_path / "s", cfg, {**t, "topk_threshold": torch.tensor(0.4, dtype=torch.float64)},
                          SAELENS_W)
    sae = float32(load_any(folder))
    assert sae.cfg.arch == "batchtopk" and sae.cfg.k == K and sae.cfg.threshold == pytest.approx(0.4)
    x = inputs()
    pre = _lens_pre(t, x) * t["W_dec"].norm(dim=1)
    f = pre.relu() * (pre > 0.4)  # the JumpReLU SAELens saves it as for inference
    assert_close(sae.encode_raw(x), f)


def test_saelens_expected_average_only_in_reads_the_scaler(tmp_path: Path) -> None:
    t = saelens_tensors()
    cfg = saelens_cfg("standard", normalize_activations="expected_average_only_in")
    folder = write_folder(tmp_path / "s", cfg, t, SAELENS_W)
    with pytest.raises(InteropError, match=r"activation_scaler\.json"):
        load_any(folder)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.25, "has_whitening": False}))
    sae = float32(load_any(folder))
    assert sae.cfg.normaliser == 0.25
    x = inputs()
    f = _lens_pre(t, 0.25 * x).relu()  # SAELens's trainer scales the input by the factor
    assert_close(sae.encode_raw(x), f)
    assert_close(sae.reconstruct_raw(x), (f @ t["W_dec"] + t["b_dec"]) / 0.25)


def test_saelens_legacy_topk_with_k_in_activation_kwargs(tmp_path: Path) -> None:
    t = saelens_tensors()
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "hook_point": "blocks.2.hook_resid_pre",
           "model_name": "EleutherAI/pythia-70m", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "apply_b_dec_to_input": True, "normalize_activations": False, "sae_lens_training_version": "3.5.0"}
    sae = float32(load_any(write_folder(tmp_path / "s", cfg, t, SAELENS_W)))
    assert sae.cfg.arch == "topk" and sae.cfg.k == K
    assert sae.cfg.hook == "resid_pre.2" and sae.cfg.model == "EleutherAI/pythia-70m"
    assert_close(sae.encode_raw(inputs()), topk_dense(_lens_pre(t, inputs()), K))


def test_saelens_legacy_finetuning_scaling_factor_is_folded_into_the_decoder(tmp_path: Path) -> None:
    t = saelens_tensors()
    s = torch.rand(D_SAE) + 0.5
    cfg = saelens_cfg("standard", finetuning_scaling_factor=True)
    sae = float32(load_any(write_folder(tmp_path / "s", cfg, {**t, "scaling_factor": s}, SAELENS_W)))
    x = inputs()
    f = _lens_pre(t, x).relu()
    assert_close(sae.encode_raw(x), f)
    assert_close(sae.reconstruct_raw(x), (f * s) @ t["W_dec"] + t["b_dec"])


# ----------------------------------------------------------------------------- sparsify by hand


def test_sparsify_by_hand_in_a_run_folder(tmp_path: Path) -> None:
    t = sparsify_tensors()
    run = tmp_path / "run"
    write_folder(run / "layers.2", sparsify_cfg(num_latents=0, expansion_factor=D_SAE // D_IN), t, SPARSIFY_W)
    (run / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M", "hookpoints": ["layers.2"]}))
    (run / "best").mkdir()  # sparsify's save_best folder holds no cfg.json directly
    sae = float32(load_any(run))
    assert sae.cfg.arch == "topk" and sae.cfg.k == K and sae.cfg.normaliser == 1.0
    assert sae.cfg.hook == "resid_post.2" and sae.cfg.model == "HuggingFaceTB/SmolLM2-135M"
    x = inputs()
    f = topk_dense((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], K)
    assert_close(sae.encode_raw(x), f)
    assert_close(sae.reconstruct_raw(x), f @ t["W_dec"] + t["b_dec"])
    assert detect_format(run / "layers.2" / "cfg.json") == ("sparsify", run / "layers.2")


def test_sparsify_zero_skip_connection_is_accepted(tmp_path: Path) -> None:
    t = {**sparsify_tensors(), "W_skip": torch.zeros(D_IN, D_IN)}
    sae = load_any(write_folder(tmp_path / "sp", sparsify_cfg(skip_connection=True), t, SPARSIFY_W))
    assert sae.provenance["imported_from"]["W_skip"] == "all zeros, dropped"


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("cfg_change", "match"),
    [
        ({"architecture": None}, "names no architecture"),
        ({"architecture": "abstopk"}, "'abstopk' has no monoscope equivalent"),
        ({"architecture": "gated"}, r"not hold a SAELens gated SAE: missing tensors \['b_gate', 'b_mag', 'r_mag'\]"),
        ({"architecture": "matryoshka_batchtopk"}, r"missing tensors \['topk_threshold'\]"),
        ({"architecture": "topk"}, "needs k"),
        ({"architecture": "topk", "k": 2.5}, "k=2.5"),
        ({"normalize_activations": "layer_norm"}, "layer_norm.*each token"),
        ({"normalize_activations": "constant_norm_rescale"}, "constant_norm_rescale"),
        ({"normalize_activations": "covariance_whitening"}, "whitening was not folded"),
        ({"reshape_activations": "hook_z"}, "hook_z"),
        ({"d_in": D_IN + 1}, r"W_enc has shape \[16, 64\] but cfg.json \(d_in=17"),
        ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input"),
    ],
)
def test_saelens_refusals(tmp_path: Path, cfg_change: dict[str, Any], match: str) -> None:
    cfg = saelens_cfg("standard")
    cfg.update(cfg_change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    folder = write_folder(tmp_path / "s", cfg, saelens_tensors(), SAELENS_W)
    with pytest.raises(MonoscopeError, match=match) as e:
        load_any(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("widths", "match"), [
    (None, "needs matryoshka_widths, a list of whole widths; it has None"),
    ([8, 8.5], "needs matryoshka_widths, a list of whole widths"),
    ([24, 8], r"matryoshka_widths 24,8,64 \(= \[24, 8, 64\]\) must be strictly increasing"),
    ([8, 80], r"matryoshka_widths 8,80,64 \(= \[8, 80, 64\]\) must be strictly increasing"),  # d_sae appended
])
def test_saelens_matryoshka_widths_are_checked(tmp_path: Path, widths: Any, match: str) -> None:
    cfg = {**saelens_cfg("matryoshka_batchtopk"), "k": K, "matryoshka_widths": widths}
    tensors = {**saelens_tensors(), "topk_threshold": torch.tensor(0.1, dtype=torch.float64)}
    with pytest.raises(InteropError, match=match) as e:
        load_any(write_folder(tmp_path / "m", cfg, tensors, SAELENS_W))
    assert "\n" not in str(e.value)


def test_saelens_legacy_topk_without_k_never_loads_as_relu(tmp_path: Path) -> None:
    # SAELens #553: this file loaded as a 'standard' ReLU SAE
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "topk", "apply_b_dec_to_input": True}
    with pytest.raises(InteropError, match="needs k"):
        load_any(write_folder(tmp_path / "s", cfg, saelens_tensors(), SAELENS_W))
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "architecture": "standard", "activation_fn": "topk"}
    with pytest.raises(InteropError, match="#553"):
        load_any(write_folder(tmp_path / "t", cfg, saelens_tensors(), SAELENS_W))


def test_saelens_weight_problems(tmp_path: Path) -> None:
    t = saelens_tensors()
    with pytest.raises(InteropError, match="needs a 'threshold'"):
        load_any(write_folder(tmp_path / "a", saelens_cfg("jumprelu"), t, SAELENS_W))
    with pytest.raises(InteropError, match=r"unexpected \['b_gate'\]"):
        load_any(write_folder(tmp_path / "b", saelens_cfg("standard"), {**t, "b_gate": t["b_enc"].clone()}, SAELENS_W))
    folder = write_folder(tmp_path / "c", saelens_cfg("standard"), t, SAELENS_W)
    (folder / SAELENS_W).write_bytes(b"not safetensors")
    with pytest.raises(InteropError, match="cannot be read as safetensors"):
        load_any(folder)


@pytest.mark.parametrize(
    ("cfg_change", "tensor_change", "match"),
    [
        ({"activation": "groupmax"}, {}, "groupmax"),
        ({"k": None}, {}, "k .* is missing"),
        ({"signed": True}, {}, r"unknown sparsify settings \['signed'\]"),
        ({"skip_connection": True}, {"W_skip": torch.eye(D_IN)}, "non-zero W_skip"),
        ({"d_in": D_IN * 2}, {}, "encoder.weight has shape"),
        ({}, {"W_dec": None}, "no W_dec"),
    ],
)
def test_sparsify_refusals(tmp_path: Path, cfg_change: dict[str, Any], tensor_change: dict[str, Any],
                           match: str) -> None:
    cfg = {k: v for k, v in {**sparsify_cfg(), **cfg_change}.items() if v is not None}
    tensors = {k: v for k, v in {**sparsify_tensors(), **tensor_change}.items() if v is not None}
    with pytest.raises(InteropError, match=match):
        load_any(write_folder(tmp_path / "sp", cfg, tensors, SPARSIFY_W))


def test_sparsify_accepts_unknown_settings_left_off(tmp_path: Path) -> None:
    load_any(write_folder(tmp_path / "sp", sparsify_cfg(signed=False), sparsify_tensors(), SPARSIFY_W))


@pytest.mark.parametrize(("arch", "kw"), [a for a in ARCHS if a[0] != "topk"])
def test_only_topk_exports_to_sparsify(tmp_path: Path, arch: str, kw: dict[str, Any]) -> None:
    with pytest.raises(InteropError, match=f"architecture '{arch}' cannot be written for sparsify"):
        write_sparsify(make_sae(arch, kw, b_dec_to_input=False), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_untrained_batchtopk_cannot_be_exported(tmp_path: Path) -> None:
    sae = build_sae(SAEConfig(arch="batchtopk", d_in=D_IN, d_sae=D_SAE, k=K), seed=0)
    with pytest.raises(InteropError, match="no inference threshold"):
        write_saelens(sae, tmp_path / "out")


def test_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(InteropError, match="does not exist"):
        load_any(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InteropError, match="holds no SAE"):
        load_any(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "cfg.json").write_text("{}")
    with pytest.raises(InteropError, match="no weights"):
        load_any(tmp_path / "noweights")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "cfg.json").write_text("{not json")
    with pytest.raises(InteropError, match="not valid JSON"):
        load_any(tmp_path / "badjson")
    run = tmp_path / "run"
    for name in ("layers.1", "layers.2"):
        write_folder(run / name, sparsify_cfg(), sparsify_tensors(), SPARSIFY_W)
    with pytest.raises(InteropError, match=r"holds 2 SAEs \(layers.1, layers.2\): pass one of them"):
        load_any(run)
    # a SAELens folder with its cfg.json missing
    folder = write_folder(tmp_path / "lens", saelens_cfg("standard"), saelens_tensors(), SAELENS_W)
    (folder / "cfg.json").unlink()
    with pytest.raises(InteropError, match="holds no SAE"):
        load_any(folder)


def test_load_any_checks_the_model(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "s", saelens_cfg("standard"), saelens_tensors(), SAELENS_W)
    load_any(folder, d_model=D_IN, hook="resid_post.3")
    with pytest.raises(MonoscopeError, match=f"d_in={D_IN} .* 32 wide"):
        load_any(folder, d_model=32)
    with pytest.raises(MonoscopeError, match=r"hook 'resid_post\.3', not 'resid_post\.4'"):
        load_any(folder, hook="resid_post.4")
    # a TransformerLens hook with no monoscope name is kept verbatim, so it never matches silently
    cfg = saelens_cfg("standard")
    cfg["metadata"]["hook_name"] = "blocks.3.hook_resid_mid"
    other = write_folder(tmp_path / "t", cfg, saelens_tensors(), SAELENS_W)
    with pytest.raises(MonoscopeError, match=r"blocks\.3\.hook_resid_mid"):
        load_any(other, hook="resid_post.3")


def test_convert_output_rules(tmp_path: Path) -> None:
    sae = make_sae("topk", {"k": K}, b_dec_to_input=True)
    src = save_sae(sae, tmp_path / "mono")
    with pytest.raises(InteropError, match="unknown target format 'gguf'"):
        convert(src, "gguf", tmp_path / "x")
    with pytest.raises(InteropError, match="is the source folder"):
        convert(src, "saelens", src)
    out = convert(src, "saelens", tmp_path / "out")
    with pytest.raises(InteropError, match="already holds an SAE"):
        convert(src, "sparsify", out)
    convert(src, "sparsify", out, overwrite=True)  # replaces it, leaving no SAELens file behind
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", SPARSIFY_W]
    assert detect_format(out)[0] == "sparsify"
    convert(out, "monoscope", out.parent / "again")
    assert detect_format(out.parent / "again")[0] == "monoscope"


def test_saelens_export_files(tmp_path: Path) -> None:
    sae = make_sae("jumprelu", {}, b_dec_to_input=False)
    out = write_saelens(sae, tmp_path / "lens")
    tensors = safetensors.torch.load_file(str(out / SAELENS_W))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,), "threshold": (D_SAE,)}
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is False and cfg["dtype"] == "float32"
    assert cfg["metadata"]["monoscope_normaliser_folded"] == NORMALISER
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", SAELENS_W]  # no temp files left


# ----------------------------------------------------------------------------- CLI


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="monoscope")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_folder(tmp_path / "lens", saelens_cfg("topk", k=K), saelens_tensors(), SAELENS_W)
    out = tmp_path / "sp"
    assert _run_cli(["convert", str(src), "--to", "sparsify", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"result: {out}" in printed and "SparseCoder.load_from_disk" in printed
    assert "converted saelens SAE" in printed and "topk, d_in=16, d_sae=64, k=5" in printed
    assert "named after its hookpoint, here layers.3" in printed  # the SAELens hook was blocks.3.hook_resid_post
    assert load_any(out).cfg.k == K
    with pytest.raises(InteropError, match="already holds an SAE"):
        _run_cli(["convert", str(src), "--to", "sparsify", "--out", str(out)])
    assert _run_cli(["convert", str(src), "--to", "sparsify", "--out", str(out), "--overwrite"]) == 0
    with pytest.raises(SystemExit):
        _run_cli(["convert", str(src), "--to", "onnx", "--out", str(out)])
