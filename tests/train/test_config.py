from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from monoscope.train.cli import add_train_parser, config_from_args
from monoscope.train.config import TrainConfig, TrainConfigError, config_diff, field_docs


def test_every_field_has_a_docstring() -> None:
    docs = field_docs(TrainConfig)
    missing = [f.name for f in fields(TrainConfig) if not docs.get(f.name)]
    assert missing == []


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"arch": "topk", "tokens": 10_000}, "--k"),
        ({"arch": "relu-l1", "tokens": 10_000, "k": 32}, "--k 32 has no meaning for --arch relu-l1"),
        ({"arch": "topk", "tokens": 10_000, "k": 8, "sparsity_coef": 5.0}, "--l1 5.0 has no meaning"),
        ({"arch": "topk", "tokens": 100, "k": 8}, "--tokens 100 is less than one batch of 4096"),
        ({"arch": "topk", "tokens": 10_000, "k": 8, "lr_decay_frac": 1.5}, "--lr-decay-frac 1.5"),
        ({"arch": "topk", "tokens": 10_000, "k": 8, "lr": -1.0}, "--lr -1.0"),
        ({"arch": "topk", "tokens": 10_000, "k": 8, "width": "16y"}, "--width"),
        ({"arch": "relu-l1", "tokens": 10_000, "revive": "auxk"}, "--revive auxk needs a topk-style SAE"),
        ({"arch": "topk-ish", "tokens": 10_000}, "--arch 'topk-ish' is not an SAE architecture: use one of"),
        ({"arch": "topk", "tokens": 10_000, "k": 8, "keep_checkpoints": 0}, "--keep-checkpoints 0"),
        ({"arch": "topk", "tokens": 10_000, "k": 8, "aux_rows": -4},
         "--aux-rows -4: use a number of rows >= 1 such as 512, or 0 for every row"),
    ],
)
def test_invalid_settings_name_the_value_and_the_fix(kwargs: dict, needle: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(TrainConfigError) as e:
        TrainConfig(**kwargs)
    assert needle in str(e.value)
    assert ":" in str(e.value) and "\n" not in str(e.value)


def test_derived_values() -> None:
    cfg = TrainConfig(arch="relu-l1", tokens=1_000_000, batch_size=1000)
    assert cfg.steps == 1000 and cfg.sparsity_coef == 5.0 and cfg.revive_method == "resample"
    assert cfg.dead_window_tokens(9216) == 25_000  # 1/40 of a run shorter than 400M tokens; no floor without k
    assert cfg.resample_steps == (200, 400, 600)
    assert TrainConfig(arch="relu-l1", tokens=10**9).dead_window_tokens(9216) == 10_000_000
    # topk-style: at least 64 mean-rate firings (64 · F / k tokens), 1/40 of the run above that, 10M at most
    assert TrainConfig(arch="topk", tokens=200_000, k=32).dead_window_tokens(9216) == 18_432
    assert TrainConfig(arch="topk", tokens=1_000_000, k=32).dead_window_tokens(9216) == 25_000
    assert TrainConfig(arch="batchtopk", tokens=100_000, k=64, batch_size=8192).dead_window_tokens(4096) == 8192
    assert TrainConfig(arch="topk", tokens=10**8, k=1).dead_window_tokens(2**20) == 10_000_000
    assert TrainConfig(arch="topk", tokens=200_000, k=32, dead_window=7).dead_window_tokens(9216) == 7
    topk = TrainConfig(arch="topk", tokens=10_000, k=32)
    assert topk.revive_method == "auxk" and topk.resample_steps == ()
    assert topk.d_sae(576) == 9216 and abs(topk.learning_rate(576) - 1.5e-3 / (9216 / 2**14) ** 0.5) < 1e-12
    assert TrainConfig(arch="jumprelu", tokens=10_000).revive_method == "none"


def test_diff_lists_fields_and_ignores_runtime_ones() -> None:
    a = TrainConfig(arch="topk", tokens=10_000, k=8).to_dict()
    b = TrainConfig(arch="topk", tokens=10_000, k=16, lr=1e-3, log_every=7, checkpoint_every=3).to_dict()
    assert config_diff(a, b) == ["k: 8 -> 16", "lr: None -> 0.001"]
    # a run saved before --aux-rows existed ran AuxK on every row: resuming it today names the change
    old = {k: v for k, v in a.items() if k != "aux_rows"}
    assert config_diff(old, a) == ["aux_rows: 0 -> 512"]
    # the fewer rows are measured for topk, batchtopk and matryoshka: transcoders and crosscoders keep every row
    assert [TrainConfig(arch=arch, tokens=10_000, k=8).aux_rows
            for arch in ("topk", "batchtopk", "matryoshka", "transcoder", "crosscoder")] == [512, 512, 512, 0, 0]
    assert TrainConfig(arch="batchtopk", tokens=10_000, k=8, aux_rows=64).aux_rows == 64
    assert TrainConfig(arch="relu-l1", tokens=10_000).aux_rows == 0  # no AuxK at all


def test_cli_options_cover_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "train", "acts", "--out", "o", "--arch", "relu-l1", "--tokens", "2M", "--width", "9216", "--l1", "3",
        "--batch-size", "1k", "--lr", "1e-4", "--lr-decay-frac", "0.1", "--l1-warmup-frac", "0.02",
        "--grad-clip", "0", "--dead-window", "500k", "--revive", "none", "--resample-at", "0.3,0.5",
        "--init-b-dec", "mean", "--dtype", "fp32", "--device", "cpu", "--seed", "3", "--checkpoint-every", "10",
        "--keep-checkpoints", "3", "--log-every", "5", "--skip-nonfinite", "--quiet",
    ])
    cfg = config_from_args(args)
    assert cfg == TrainConfig(
        arch="relu-l1", tokens=2_000_000, width=9216, sparsity_coef=3.0, batch_size=1000, lr=1e-4,
        lr_decay_frac=0.1, sparsity_warmup_frac=0.02, grad_clip=0.0, dead_window=500_000, revive="none",
        resample_at=(0.3, 0.5), init_b_dec="mean", dtype="float32", device="cpu", seed=3, checkpoint_every=10,
        keep_checkpoints=3, log_every=5, skip_nonfinite=True, progress=False,
    )
    # unset options keep the dataclass defaults
    args = parser.parse_args(["train", "acts", "--out", "o", "--arch", "topk", "--k", "32", "--tokens", "1M"])
    assert config_from_args(args) == TrainConfig(arch="topk", k=32, tokens=1_000_000)


def test_every_field_is_an_option() -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]  # type: ignore[index]
    dests = {a.dest for a in sub._actions}
    assert {f.name for f in fields(TrainConfig)} - dests == {"progress"}  # progress is --quiet
