"""SAEConfig validation and parse_width: every bad value is an error that names it and the fix."""

from __future__ import annotations

import math

import pytest

from monoscope.errors import MonoscopeError
from monoscope.sae import SAEConfig, parse_width


def test_defaults_resolve_per_architecture() -> None:
    topk = SAEConfig(arch="topk", d_in=64, d_sae=512, k=8)
    assert topk.k_aux == 32  # d_in // 2
    assert topk.b_dec_to_input is True and topk.init_decoder_norm == 0.25
    assert SAEConfig(arch="batchtopk", d_in=64, d_sae=512, k=8).init_decoder_norm == 0.25
    assert SAEConfig(arch="matryoshka", d_in=64, d_sae=512, k=8, prefixes=(64, 512)).init_decoder_norm == 1.0
    relu = SAEConfig(arch="relu-l1", d_in=64, d_sae=512)
    assert relu.k is None and relu.k_aux is None
    assert relu.b_dec_to_input is False and relu.init_decoder_norm == 0.1
    assert SAEConfig(arch="jumprelu", d_in=8, d_sae=16).b_dec_to_input is False


def test_round_trip_through_dict() -> None:
    cfg = SAEConfig(arch="batchtopk", d_in=8, d_sae=32, k=4, normaliser=0.5, hook="resid_post.3", model="m")
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"arch": "relu", "d_in": 8, "d_sae": 16}, ["'relu'", "relu-l1"]),
        ({"arch": "topk", "d_in": 8, "d_sae": 16}, ["k is required", "topk"]),
        ({"arch": "topk", "d_in": 8, "d_sae": 16, "k": 0}, ["k=0", "from 1 to 16"]),
        ({"arch": "topk", "d_in": 8, "d_sae": 16, "k": 17}, ["k=17", "from 1 to 16"]),
        ({"arch": "topk", "d_in": 8, "d_sae": 16, "k": 2.5}, ["k=2.5", "integer"]),
        ({"arch": "relu-l1", "d_in": 8, "d_sae": 16, "k": 4}, ["k=4", "no meaning", "relu-l1"]),
        ({"arch": "jumprelu", "d_in": 8, "d_sae": 16, "k_aux": 4}, ["k_aux=4", "jumprelu"]),
        ({"arch": "relu-l1", "d_in": 0, "d_sae": 16}, ["d_in=0"]),
        ({"arch": "relu-l1", "d_in": True, "d_sae": 16}, ["d_in=True", "integer"]),
        ({"arch": "relu-l1", "d_in": 8, "d_sae": 16, "normaliser": 0.0}, ["normaliser=0.0", "> 0"]),
        ({"arch": "relu-l1", "d_in": 8, "d_sae": 16, "normaliser": math.nan}, ["normaliser=nan", "finite"]),
        ({"arch": "relu-l1", "d_in": 8, "d_sae": 16, "dtype": "float16"}, ["dtype='float16'", "bfloat16"]),
        ({"arch": "relu-l1", "d_in": 8, "d_sae": 16, "compute_dtype": "fp8"}, ["compute_dtype='fp8'"]),
        ({"arch": "topk", "d_in": 8, "d_sae": 16, "k": 2, "threshold": 0.5}, ["threshold=0.5", "batchtopk"]),
        ({"arch": "batchtopk", "d_in": 8, "d_sae": 16, "k": 2, "threshold": -1.0}, ["threshold=-1.0"]),
        ({"arch": "jumprelu", "d_in": 8, "d_sae": 16, "jumprelu_bandwidth": 0}, ["jumprelu_bandwidth=0"]),
        ({"arch": "relu-l1", "d_in": 8, "d_sae": 16, "hook": ""}, ["hook=''"]),
        ({"arch": "batchtopk", "d_in": 8, "d_sae": 16, "k": 2, "threshold_ema": 1.5}, ["threshold_ema=1.5"]),
    ],
)
def test_invalid_values_name_value_and_fix(kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(MonoscopeError) as info:
        SAEConfig(**kwargs)
    for needle in needles:
        assert needle in str(info.value)


def test_from_dict_rejects_unknown_and_missing() -> None:
    with pytest.raises(MonoscopeError, match=r"unknown SAE config keys \['activation'\]"):
        SAEConfig.from_dict({"arch": "topk", "d_in": 8, "d_sae": 16, "k": 2, "activation": "relu"})
    with pytest.raises(MonoscopeError, match="architecture is missing"):
        SAEConfig.from_dict({"d_in": 8, "d_sae": 16})
    with pytest.raises(MonoscopeError, match="d_sae is missing"):
        SAEConfig.from_dict({"arch": "relu-l1", "d_in": 8})


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        ("16x", 9216),
        ("16X", 9216),
        ("1.5x", 864),
        (9216, 9216),
        ("9216", 9216),
        ("16k", 16384),
        (" 2x ", 1152),
    ],
)
def test_parse_width(width: int | str, expected: int) -> None:
    assert parse_width(width, 576) == expected


@pytest.mark.parametrize(
    ("width", "needle"),
    [
        ("0x", "gives 0 features"),
        (0, "gives 0 features"),
        (-5, "gives -5"),
        ("abc", "not understood"),
        ("", "not understood"),
        ("1.3x", "not a whole number"),
        ("12.5", "fraction"),
        (True, "not a width"),
        (3.0, "type float"),
    ],
)
def test_parse_width_errors(width: object, needle: str) -> None:
    with pytest.raises(MonoscopeError) as info:
        parse_width(width, 576)  # type: ignore[arg-type]
    assert needle in str(info.value)
    assert repr(width) in str(info.value)
