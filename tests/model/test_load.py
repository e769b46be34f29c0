from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monoscope.errors import ModelError
from monoscope.model import load_model, resolve_source
from tests.conftest import make_llama


def test_load_local_folder_gives_the_same_activations(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    model = make_llama(len(tokenizer), seed=3)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), device="cpu", compute_dtype="fp32")
    assert lm.source.kind == "folder" and lm.d_model == 64 and lm.n_layers == 4
    assert lm.weights_sha256 and len(lm.weights_sha256) == 64
    ids = torch.randint(3, len(tokenizer), (2, 10))
    with torch.inference_mode():
        want = model(ids, output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(lm.acts(lm.hook("resid_post.2"), ids), want, rtol=0, atol=0)
    assert lm.tokenizer_sha256 == load_model(str(tmp_path / "m"), device="cpu").tokenizer_sha256


def test_bf16_autocast_is_close_to_fp32(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(3, 300, (2, 16))
    exact = tiny_lm.acts(tiny_lm.hook("resid_post.2"), ids)
    tiny_lm.compute_dtype = "bf16"
    try:
        approx = tiny_lm.acts(tiny_lm.hook("resid_post.2"), ids)
    finally:
        tiny_lm.compute_dtype = "fp32"
    rel = (approx - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert float(rel.mean()) < 0.02


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"GGUF file .*nope\.gguf.* not found"):
        resolve_source(str(tmp_path / "nope.gguf"))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_source(str(tmp_path / "no-such-folder"))


def test_folder_without_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_source(str(tmp_path))


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"cannot load model 'nobody-xyz/not-a-model'.*offline"):
        load_model("nobody-xyz/not-a-model", device="cpu")


def test_bad_device() -> None:
    with pytest.raises(Exception, match="--device"):
        load_model("default", device="tpu")
