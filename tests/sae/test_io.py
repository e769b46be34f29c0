"""save_sae / load_sae: exact round trips, and every way a folder can be wrong is a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monoscope.errors import MonoscopeError
from monoscope.sae import SAEConfig, build_sae, check_compatible, load_sae, save_sae
from monoscope.sae.io import CFG_NAME, WEIGHTS_NAME

ARCHS = [("relu-l1", {}), ("topk", {"k": 4}), ("batchtopk", {"k": 4}), ("jumprelu", {}),
         ("matryoshka", {"k": 4, "prefixes": [4, 12, 32]}), ("gated", {})]


def _trained_like(arch: str, kw: dict, dtype: str = "float32"):
    cfg = SAEConfig(
        arch=arch,
        d_in=8,
        d_sae=32,
        normaliser=0.37,
        hook="resid_post.3",
        model="tiny/llama",
        dtype=dtype,
        **kw,  # type: ignore[arg-type]
    )
    sae = build_sae(cfg, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    if arch in ("batchtopk", "matryoshka"):
        sae.train()
        sae(torch.randn(16, 8, generator=g))  # sets the inference threshold
        assert torch.isfinite(sae.threshold)
    return sae


@pytest.mark.parametrize(("arch", "kw"), ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact(tmp_path: Path, arch: str, kw: dict, dtype: str) -> None:
    sae = _trained_like(arch, kw, dtype)
    folder = save_sae(sae, tmp_path / "sae", provenance={"steps": 10, "store": "runs/x/acts"})
    assert sorted(p.name for p in folder.iterdir()) == [CFG_NAME, WEIGHTS_NAME]  # no temp files left
    loaded = load_sae(folder)
    assert type(loaded) is type(sae)
    assert not loaded.training
    assert loaded.provenance == {"steps": 10, "store": "runs/x/acts"}
    a, b = sae.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]) or (a[name].isnan().all() and b[name].isnan().all()), name
    want = sae.cfg.to_dict()
    if arch in ("batchtopk", "matryoshka"):
        want["threshold"] = float(sae.threshold)
    assert loaded.cfg.to_dict() == want
    x = torch.randn(5, 8)
    sae.eval()
    assert torch.equal(sae.encode(x), loaded.encode(x))
    meta = json.loads((folder / CFG_NAME).read_text())
    assert meta["architecture"] == arch and meta["format_version"] == 1
    assert meta["normaliser"] == 0.37 and meta["hook"] == "resid_post.3" and meta["d_sae"] == 32
    assert len(meta["weights"]["sha256"]) == 64


def test_jumprelu_log_threshold_saved_in_float32(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    save_sae(_trained_like("jumprelu", {}, "bfloat16"), tmp_path / "s")
    tensors = load_file(str(tmp_path / "s" / WEIGHTS_NAME))
    assert tensors["log_threshold"].dtype == torch.float32
    assert tensors["W_enc"].dtype == torch.bfloat16
    assert tensors["W_enc"].shape == (32, 8) and tensors["W_dec"].shape == (32, 8)


def test_overwrite_needs_consent_and_keeps_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "run.json").write_text("{}")
    sae = _trained_like("topk", {"k": 4})
    save_sae(sae, folder)
    with pytest.raises(MonoscopeError, match=r"already holds an SAE.*overwrite=True"):
        save_sae(sae, folder)
    with torch.no_grad():
        sae.b_dec.add_(1.0)
    save_sae(sae, folder, overwrite=True)
    assert torch.equal(load_sae(folder).b_dec, sae.b_dec)
    assert (folder / "run.json").read_text() == "{}"
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "run.json", "sae.safetensors"]


def test_load_then_save_keeps_provenance(tmp_path: Path) -> None:
    save_sae(_trained_like("relu-l1", {}), tmp_path / "a", provenance={"seed": 3})
    save_sae(load_sae(tmp_path / "a"), tmp_path / "b")
    assert load_sae(tmp_path / "b").provenance == {"seed": 3}


def test_provenance_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(MonoscopeError, match=r"not JSON-serialisable"):
        save_sae(_trained_like("relu-l1", {}), tmp_path / "a", provenance={"t": torch.zeros(1)})


# ----------------------------------------------------------------------------- load errors


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_sae(_trained_like("topk", {"k": 4}), tmp_path / "sae")


def _edit_cfg(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / CFG_NAME).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (folder / CFG_NAME).write_text(json.dumps(meta))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MonoscopeError, match=r"SAE folder .*nope does not exist"):
        load_sae(tmp_path / "nope")


def test_file_instead_of_folder(saved: Path) -> None:
    with pytest.raises(MonoscopeError, match=r"is a file, not an SAE folder.*pass its folder"):
        load_sae(saved / WEIGHTS_NAME)


def test_missing_cfg(saved: Path) -> None:
    (saved / CFG_NAME).unlink()
    with pytest.raises(MonoscopeError, match=r"cfg\.json is missing"):
        load_sae(saved)


def test_saelens_folder_gets_a_hint(tmp_path: Path) -> None:
    (tmp_path / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(MonoscopeError, match=r"looks like a SAELens folder"):
        load_sae(tmp_path)


def test_missing_weights(saved: Path) -> None:
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(MonoscopeError, match=r"sae\.safetensors are missing"):
        load_sae(saved)


def test_missing_architecture_is_never_guessed(saved: Path) -> None:
    _edit_cfg(saved, architecture=None)
    with pytest.raises(MonoscopeError, match=r"names no architecture.*never"):
        load_sae(saved)


def test_unknown_architecture(saved: Path) -> None:
    _edit_cfg(saved, architecture="clt")
    with pytest.raises(MonoscopeError, match=r"unknown architecture 'clt'"):
        load_sae(saved)


def test_other_format_is_rejected(saved: Path) -> None:
    # a sparsify folder has the same file names but its own cfg.json
    (saved / CFG_NAME).write_text(json.dumps({"expansion_factor": 32, "k": 32, "d_in": 8}))
    with pytest.raises(MonoscopeError, match=r"not a monoscope SAE config.*sparsify"):
        load_sae(saved)


def test_newer_format_version(saved: Path) -> None:
    _edit_cfg(saved, format_version=2)
    with pytest.raises(MonoscopeError, match=r"format_version=2.*upgrade"):
        load_sae(saved)


def test_invalid_json(saved: Path) -> None:
    (saved / CFG_NAME).write_text("{not json")
    with pytest.raises(MonoscopeError, match=r"not valid JSON"):
        load_sae(saved)


def test_corrupt_weights_name_file_and_digests(saved: Path) -> None:
    expected = json.loads((saved / CFG_NAME).read_text())["weights"]["sha256"]
    data = bytearray((saved / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0xFF  # flip bits inside a tensor
    (saved / WEIGHTS_NAME).write_bytes(bytes(data))
    import hashlib

    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(MonoscopeError) as info:
        load_sae(saved)
    msg = str(info.value)
    assert str(saved / WEIGHTS_NAME) in msg and expected in msg and actual in msg and "corrupt" in msg


def test_truncated_weights(saved: Path) -> None:
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(MonoscopeError, match=r"corrupt"):
        load_sae(saved)


def test_shape_mismatch_between_cfg_and_tensors(saved: Path) -> None:
    _edit_cfg(saved, d_sae=64)
    with pytest.raises(MonoscopeError, match=r"tensor \w+ has shape \[32(, 8)?\] but cfg\.json .*d_sae=64"):
        load_sae(saved)


def test_architecture_swap_is_caught(tmp_path: Path) -> None:
    # a jumprelu file relabelled as topk would silently lose its thresholds: refuse it
    folder = save_sae(_trained_like("jumprelu", {}), tmp_path / "j")
    _edit_cfg(folder, architecture="topk", k=4)
    with pytest.raises(MonoscopeError, match=r"does not hold a topk SAE.*unexpected \['log_threshold'\]"):
        load_sae(folder)


def test_unknown_config_key(saved: Path) -> None:
    _edit_cfg(saved, activation="relu")
    with pytest.raises(MonoscopeError, match=r"unknown SAE config keys"):
        load_sae(saved)


def test_check_compatible(saved: Path) -> None:
    sae = load_sae(saved)
    check_compatible(sae, d_model=8, hook="resid_post.3", model="tiny/llama")
    check_compatible(sae)  # nothing to compare
    with pytest.raises(MonoscopeError, match=r"d_in=8.*576 wide"):
        check_compatible(sae, d_model=576)
    with pytest.raises(MonoscopeError, match=r"hook 'resid_post\.3', not 'resid_post\.4'"):
        check_compatible(sae, hook="resid_post.4")
    with pytest.raises(MonoscopeError, match=r"model 'tiny/llama', not 'other'"):
        check_compatible(sae, model="other")


def test_sae_package_never_imports_transformers() -> None:
    code = "import sys, monoscope.sae; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_same_weights_save_to_the_same_bytes(tmp_path: Path) -> None:
    """safetensors orders its metadata from a hash map: without sorting, saves of one SAE differed in bytes."""
    sae = _trained_like("topk", {"k": 4})
    digests = {(save_sae(sae, tmp_path / f"s{i}") / WEIGHTS_NAME).read_bytes() for i in range(8)}
    assert len(digests) == 1
    loaded = load_sae(tmp_path / "s0")
    assert torch.equal(loaded.W_dec, sae.W_dec.detach())
    header = json.loads((tmp_path / "s0" / WEIGHTS_NAME).read_bytes()[8:][: int.from_bytes(
        (tmp_path / "s0" / WEIGHTS_NAME).read_bytes()[:8], "little")])
    assert list(header) == sorted(header) and header["__metadata__"] == {"architecture": "topk",
                                                                          "format": "monoscope-sae"}
