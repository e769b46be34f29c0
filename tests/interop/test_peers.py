"""Against the real peers: SAEs built and saved by sae-lens and eai-sparsify through their own APIs
load in monoscope with the same feature activations on the same raw inputs, and monoscope's
exports load in the peers' own loaders with the same feature activations and reconstructions.

Tolerance (helpers.ATOL/RTOL): 1e-5 absolute + 1e-5 relative, float32 on both sides; the only
differences are the rounding of folds (normaliser, decoder norms) done in float64 and rounded once.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from monoscope.interop import convert, load_any
from monoscope.sae import save_sae
from tests.interop.helpers import (
    ARCHS,
    D_IN,
    D_SAE,
    K,
    assert_close,
    float32,
    inputs,
    make_sae,
)

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def sae_lens() -> ModuleType:
    return pytest.importorskip("sae_lens", reason="make test installs sae-lens")


@pytest.fixture(scope="module")
def sparsify() -> ModuleType:
    return pytest.importorskip("sparsify", reason="make test installs eai-sparsify")


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int, threshold: bool = False) -> None:
    """Random values in every parameter (biases too), thresholds in [0.05, 0.55)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name == "threshold" and threshold:
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.05)
        else:
            p.copy_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))


def _sparsify_dense(coder: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense features [B, latents], reconstruction) from sparsify's own encode and decode."""
    out = coder.encode(x)
    dense = torch.zeros(x.shape[0], coder.num_latents).scatter_(1, out.top_indices, out.top_acts)
    return dense, coder.decode(out.top_acts, out.top_indices)


# ----------------------------------------------------------------------------- SAELens -> monoscope

LENS_CASES = [
    ("StandardSAE", "StandardSAEConfig", {}, "relu-l1"),
    ("StandardSAE", "StandardSAEConfig", {"apply_b_dec_to_input": False}, "relu-l1"),
    ("TopKSAE", "TopKSAEConfig", {"k": K}, "topk"),
    ("TopKSAE", "TopKSAEConfig", {"k": K, "rescale_acts_by_decoder_norm": True}, "topk"),
    ("JumpReLUSAE", "JumpReLUSAEConfig", {}, "jumprelu"),
    ("JumpReLUSAE", "JumpReLUSAEConfig", {"apply_b_dec_to_input": False}, "jumprelu"),
    ("GatedSAE", "GatedSAEConfig", {}, "gated"),
    ("GatedSAE", "GatedSAEConfig", {"apply_b_dec_to_input": False}, "gated"),
]


@pytest.mark.parametrize(("cls", "cfg_cls", "kw", "arch"), LENS_CASES)
@torch.no_grad()
def test_saelens_saes_load_with_the_same_features(tmp_path: Path, sae_lens: ModuleType, cls: str, cfg_cls: str,
                                                  kw: dict[str, Any], arch: str) -> None:
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name="blocks.3.hook_resid_post", model_name="gpt2-small")
    peer = getattr(sae_lens, cls)(getattr(sae_lens, cfg_cls)(d_in=D_IN, d_sae=D_SAE, metadata=meta, **kw))
    _randomise(peer, seed=5, threshold=True)
    peer.save_model(tmp_path / "lens")
    peer = sae_lens.SAE.load_from_disk(tmp_path / "lens")  # compare with what SAELens itself loads
    ours = float32(load_any(tmp_path / "lens"))
    assert ours.cfg.arch == arch and ours.cfg.hook == "resid_post.3" and ours.cfg.normaliser == 1.0
    x = inputs()
    f = peer.encode(x)
    assert (f > 0).sum(1).float().mean() > 2  # a meaningful comparison, not two zero matrices
    assert_close(ours.encode_raw(x), f)
    assert_close(ours.reconstruct_raw(x), peer.decode(f))


@torch.no_grad()
def test_saelens_batchtopk_training_and_inference_saves(tmp_path: Path, sae_lens: ModuleType) -> None:
    from sae_lens.saes.sae import TrainStepInput

    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)  # rescales by decoder norm (default)
    trainer_sae = sae_lens.BatchTopKTrainingSAE(cfg)
    _randomise(trainer_sae, seed=6)
    for seed in range(3):  # SAELens's own training pass learns the inference threshold
        step = TrainStepInput(sae_in=inputs(64, seed=seed), coefficients={}, dead_neuron_mask=None,
                              n_training_steps=seed, is_logging_step=False)
        trainer_sae.training_forward_pass(step)
    assert float(trainer_sae.topk_threshold) > 0
    trainer_sae.save_inference_model(tmp_path / "inference")  # a JumpReLU with a uniform threshold
    trainer_sae.save_model(tmp_path / "checkpoint")  # architecture 'batchtopk', unfolded norms
    peer = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    assert type(peer).__name__ == "JumpReLUSAE"
    x = inputs()
    f = peer.encode(x)
    assert (f > 0).sum(1).float().mean() > 1
    for folder in ("inference", "checkpoint"):
        ours = float32(load_any(tmp_path / folder))
        assert ours.cfg.arch == "batchtopk" and ours.cfg.k == K
        assert_close(ours.encode_raw(x), f)
        assert_close(ours.reconstruct_raw(x), peer.decode(f))


@torch.no_grad()
def test_saelens_matryoshka_training_and_inference_saves(tmp_path: Path, sae_lens: ModuleType) -> None:
    """SAELens's own Matryoshka trainer: its checkpoint ('matryoshka_batchtopk', topk_threshold and
    matryoshka_widths) and its inference save (a JumpReLU with the widths in the training details) both
    load as monoscope's matryoshka with the same prefixes and the same features."""
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    widths = [8, 24, D_SAE]
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=list(widths))
    trainer_sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    _randomise(trainer_sae, seed=8)
    for seed in range(3):
        step = TrainStepInput(sae_in=inputs(64, seed=seed), coefficients={}, dead_neuron_mask=None,
                              n_training_steps=seed, is_logging_step=False)
        out = trainer_sae.training_forward_pass(step)
    assert {f"inner_mse_loss_{w}" for w in widths[:-1]} <= set(out.losses)
    trainer_sae.save_inference_model(tmp_path / "inference")
    trainer_sae.save_model(tmp_path / "checkpoint")
    peer = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    assert type(peer).__name__ == "JumpReLUSAE"
    x = inputs()
    f = peer.encode(x)
    assert (f > 0).sum(1).float().mean() > 1
    for folder in ("inference", "checkpoint"):
        ours = float32(load_any(tmp_path / folder))
        assert ours.cfg.arch == "matryoshka" and ours.cfg.k == K and ours.cfg.prefixes == widths
        assert_close(ours.encode_raw(x), f)
        assert_close(ours.reconstruct_raw(x), peer.decode(f))


@torch.no_grad()
def test_saelens_unfolded_scaling_factor(tmp_path: Path, sae_lens: ModuleType) -> None:
    from sae_lens.training.activation_scaler import ActivationScaler

    factor = 0.21
    peer = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE,
                                                           normalize_activations="expected_average_only_in"))
    _randomise(peer, seed=7)
    peer.save_model(tmp_path / "ckpt")
    ActivationScaler(scaling_factor=factor).save(str(tmp_path / "ckpt" / "activation_scaler.json"))
    ours = float32(load_any(tmp_path / "ckpt"))
    assert ours.cfg.normaliser == factor
    x = inputs()
    # SAELens's trainer feeds the SAE x·factor; SAELens's own fold must agree with our normaliser.
    f = peer.encode(x * factor)
    assert_close(ours.encode_raw(x), f)
    assert_close(ours.reconstruct_raw(x), peer.decode(f) / factor)
    peer.fold_activation_norm_scaling_factor(factor)
    assert_close(ours.encode_raw(x), peer.encode(x))
    assert_close(ours.reconstruct_raw(x), peer.decode(peer.encode(x)))


# ----------------------------------------------------------------------------- monoscope -> SAELens

PEER_CLASS = {"relu-l1": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "batchtopk": "JumpReLUSAE",
              "matryoshka": "JumpReLUSAE", "gated": "GatedSAE"}


@pytest.mark.parametrize(("arch", "kw"), ARCHS)
@pytest.mark.parametrize("b_dec_to_input", [False, True])
@torch.no_grad()
def test_exports_load_in_saelens(tmp_path: Path, sae_lens: ModuleType, arch: str, kw: dict[str, Any],
                                 b_dec_to_input: bool) -> None:
    sae = make_sae(arch, kw, b_dec_to_input=b_dec_to_input)
    out = convert(save_sae(sae, tmp_path / "mono"), "saelens", tmp_path / "lens")
    peer = sae_lens.SAE.load_from_disk(out)
    assert type(peer).__name__ == PEER_CLASS[arch]
    assert peer.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    x = inputs()
    f = peer.encode(x)
    assert (f > 0).sum(1).float().mean() > 1
    assert_close(f, sae.encode_raw(x))
    assert_close(peer.decode(f), sae.reconstruct_raw(x))
    assert_close(peer(x), sae.reconstruct_raw(x))  # SAELens's forward, too


# ----------------------------------------------------------------------------- sparsify <-> monoscope


@pytest.mark.parametrize("latents", [{"num_latents": D_SAE}, {"expansion_factor": D_SAE // D_IN}])
@torch.no_grad()
def test_sparsify_saes_load_with_the_same_features(tmp_path: Path, sparsify: ModuleType,
                                                   latents: dict[str, int]) -> None:
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(k=K, **latents))
    _randomise(coder, seed=8)
    run = tmp_path / "run"
    coder.save_to_disk(run / "layers.3")  # sparsify's trainer layout: one folder per hookpoint
    sparsify.TrainConfig(sparsify.SparseCoderConfig(k=K), hookpoints=["layers.3"]).save_json(str(run / "config.json"))
    coder = sparsify.SparseCoder.load_from_disk(run / "layers.3")
    ours = float32(load_any(run))
    assert ours.cfg.arch == "topk" and ours.cfg.k == K and ours.cfg.hook == "resid_post.3"
    x = inputs()
    f, x_hat = _sparsify_dense(coder, x)
    assert_close(ours.encode_raw(x), f)
    assert_close(ours.reconstruct_raw(x), x_hat)
    assert_close(ours.reconstruct_raw(x), coder(x).sae_out)  # sparsify's forward, too


@pytest.mark.parametrize("b_dec_to_input", [False, True])
@torch.no_grad()
def test_topk_exports_load_in_sparsify(tmp_path: Path, sparsify: ModuleType, b_dec_to_input: bool) -> None:
    sae = make_sae("topk", {"k": K}, b_dec_to_input=b_dec_to_input)
    out = convert(save_sae(sae, tmp_path / "mono"), "sparsify", tmp_path / "run" / "layers.3")
    coder = sparsify.SparseCoder.load_from_disk(out)
    assert coder.cfg.k == K and coder.num_latents == D_SAE
    assert list(sparsify.SparseCoder.load_many(str(tmp_path / "run"), local=True)) == ["layers.3"]
    x = inputs()
    f, x_hat = _sparsify_dense(coder, x)
    assert_close(f, sae.encode_raw(x))
    assert_close(x_hat, sae.reconstruct_raw(x))


@torch.no_grad()
def test_saelens_topk_to_sparsify_through_monoscope(tmp_path: Path, sae_lens: ModuleType,
                                                    sparsify: ModuleType) -> None:
    """One peer to the other: SAELens's own encode and sparsify's agree after `convert`."""
    peer = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True))
    _randomise(peer, seed=9)
    peer.save_model(tmp_path / "lens")
    out = convert(tmp_path / "lens", "sparsify", tmp_path / "sp")
    coder = sparsify.SparseCoder.load_from_disk(out)
    x = inputs()
    f, x_hat = _sparsify_dense(coder, x)
    assert_close(f, peer.encode(x))
    assert_close(x_hat, peer.decode(peer.encode(x)))
