from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from monoscope.errors import ModelError
from monoscope.model import find_layout, parse_hook, run_to_hook
from tests.conftest import make_llama

V = 300


def _gemma() -> torch.nn.Module:
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=16, max_position_embeddings=256, sliding_window=8))


FAMILIES = {
    "llama": lambda: make_llama(V),
    "gemma3": _gemma,
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=4, num_attention_heads=4,
                                                  num_key_value_heads=2, max_position_embeddings=256)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=4, n_head=4, n_positions=256)),
    "neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=4, num_attention_heads=4,
                                                     max_position_embeddings=256)),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    return request.param, FAMILIES[request.param]().eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def test_hooks_match_hidden_states_and_decompose(family: tuple[str, torch.nn.Module]) -> None:
    name, model = family
    layout = find_layout(model)
    ids = _ids()
    hs = model(ids, output_hidden_states=True).hidden_states
    assert len(hs) == layout.n_layers + 1
    for layer in range(layout.n_layers - 1):  # HF applies the final norm to the last hidden state
        post = run_to_hook(model, layout, parse_hook(f"resid_post.{layer}", layout), ids)
        torch.testing.assert_close(post, hs[layer + 1], rtol=0, atol=0, msg=f"{name} resid_post.{layer}")
        nxt = run_to_hook(model, layout, parse_hook(f"resid_pre.{layer + 1}", layout), ids)
        torch.testing.assert_close(nxt, post, rtol=0, atol=0)
    for layer in range(layout.n_layers):
        pre = run_to_hook(model, layout, parse_hook(f"resid_pre.{layer}", layout), ids)
        attn = run_to_hook(model, layout, parse_hook(f"attn_out.{layer}", layout), ids)
        mlp = run_to_hook(model, layout, parse_hook(f"mlp_out.{layer}", layout), ids)
        post = run_to_hook(model, layout, parse_hook(f"resid_post.{layer}", layout), ids)
        # the residual stream is exactly the sum of what each sub-layer adds
        torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-5, atol=1e-5, msg=f"{name} layer {layer}")


def test_forward_stops_at_the_hook() -> None:
    model = make_llama(V)
    layout = find_layout(model)
    ran = []
    for i, block in enumerate(layout.blocks):
        block.register_forward_hook(lambda *_a, i=i: ran.append(i))
    norm_ran = []
    model.model.norm.register_forward_hook(lambda *_a: norm_ran.append(1))
    model.lm_head.register_forward_hook(lambda *_a: norm_ran.append(2))
    run_to_hook(model, layout, parse_hook("resid_post.1", layout), _ids())
    assert ran == [0, 1]
    assert norm_ran == []


@pytest.mark.parametrize("bad", ["resid_post.4", "resid_post.-1", "resid_postt.1", "resid_post", "mlp.2", "x"])
def test_bad_hook_names_list_valid_ones(bad: str) -> None:
    layout = find_layout(make_llama(V))
    with pytest.raises(ModelError) as e:
        parse_hook(bad, layout)
    msg = str(e.value)
    assert repr(bad) in msg
    assert "resid_pre.0..3" in msg and "resid_post.0..3" in msg and "attn_out.0..3" in msg and "mlp_out.0..3" in msg


def test_default_hook_is_middle_resid_post(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    assert str(tiny_lm.hook(None)) == "resid_post.2"
