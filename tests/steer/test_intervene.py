"""Invariants of `steer` on a tiny Llama + tiny SAE (fp32): identity edits, KV-cache generation,
inactive ablation, and that a clamp lands in the re-encoded codes."""

from __future__ import annotations

import pytest
import torch

from monoscope.model.hooks import capture_at
from monoscope.steer import Edit, SteerError, steer
from tests.steer.helpers import HOOK, tiny_sae

PROMPT = "the quick brown fox jumps over"


@pytest.fixture(scope="module")
def sae(tiny_lm):  # type: ignore[no-untyped-def]
    return tiny_sae(tiny_lm)


def _ids(lm, text: str = PROMPT) -> torch.Tensor:  # type: ignore[no-untyped-def]
    bos = lm.special_ids()[0]
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    return torch.cat([torch.tensor([[bos]]), ids], 1)


@torch.no_grad()
def _codes(lm, sae, ids):  # type: ignore[no-untyped-def]
    return sae.encode_raw(lm.acts(lm.hook(HOOK), ids)[0])


def _logits(lm, ids):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return lm.model(input_ids=ids, use_cache=False).logits


def _active_feature(lm, sae, ids) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    codes = _codes(lm, sae, ids)[1:]
    f = int(codes.sum(0).argmax())
    return f, float(codes[:, f].max())


def test_setting_a_feature_to_its_own_value_leaves_logits_unchanged(tiny_lm, sae) -> None:  # type: ignore[no-untyped-def]
    ids = _ids(tiny_lm)
    clean = _logits(tiny_lm, ids)
    codes = _codes(tiny_lm, sae, ids)
    f, _ = _active_feature(tiny_lm, sae, ids)
    # scale by 1 and add 0 are identities; so is clamping every row to its own value (conditional on itself)
    for edit in (Edit(f, "scale", 1.0), Edit(f, "add", 0.0)):
        with steer(tiny_lm, sae, [edit]) as st:
            out = _logits(tiny_lm, ids)
        assert st.rows_edited == ids.shape[1] - 1  # every row but the BOS went through the reconstruction
        assert float((out - clean).abs().max()) < 1e-4
    # a clamp to the value the feature has where it is strongest, applied only there
    t = int(codes[1:, f].argmax()) + 1
    v = float(codes[t, f])
    with steer(tiny_lm, sae, [Edit(f, "clamp", v, when=(f, v - 1e-6))]) as st:
        out = _logits(tiny_lm, ids)
    assert st.rows_edited == 1
    assert float((out - clean).abs().max()) < 1e-4
    # and the same clamp to a different value does change the logits (the test can fail)
    with steer(tiny_lm, sae, [Edit(f, "clamp", v + 5.0, when=(f, v - 1e-6))]):
        assert float((_logits(tiny_lm, ids) - clean).abs().max()) > 1e-2


def test_ablating_an_inactive_feature_changes_nothing(tiny_lm, sae) -> None:  # type: ignore[no-untyped-def]
    ids = _ids(tiny_lm)
    clean = _logits(tiny_lm, ids)
    codes = _codes(tiny_lm, sae, ids)
    inactive = int(torch.nonzero(codes[1:].abs().sum(0) == 0)[0])
    active, _ = _active_feature(tiny_lm, sae, ids)
    with steer(tiny_lm, sae, [Edit(inactive, "ablate")]):
        assert float((_logits(tiny_lm, ids) - clean).abs().max()) < 1e-4
    with steer(tiny_lm, sae, [Edit(active, "ablate")]):
        assert float((_logits(tiny_lm, ids) - clean).abs().max()) > 1e-3


def test_clamp_shows_in_the_re_encoded_codes(tiny_lm, sae) -> None:  # type: ignore[no-untyped-def]
    ids = _ids(tiny_lm)
    f, fmax = _active_feature(tiny_lm, sae, ids)
    module_hp = tiny_lm.hook(HOOK)
    value = 10 * fmax
    with (steer(tiny_lm, sae, [Edit(f, "clamp", "10x")], max_act=lambda _i: fmax),
          capture_at(tiny_lm.layout, module_hp, stop=False) as box):  # registered after: sees the edit
        _logits(tiny_lm, ids)
    with torch.no_grad():
        after = sae.encode_raw(box["acts"][0].float())
        before = _codes(tiny_lm, sae, ids)
    # encoder = decoderᵀ with unit rows: the pre-activation moves by exactly (value − code), so rows where f
    # was active re-encode to the clamped value, the others to value + their (negative) pre-activation
    was = before[:, f] > 0
    was[0] = False
    assert int(was.sum()) >= 3
    assert torch.allclose(after[was, f], torch.full_like(after[was, f], value), rtol=1e-4)
    assert float(after[1:, f].min()) > 0.8 * value
    assert float(after[0, f]) == float(before[0, f])  # the BOS row is never edited


@pytest.mark.parametrize("where", ["all", "prompt", "generated"])
def test_steered_generation_with_kv_cache_equals_without(tiny_lm, sae, where: str) -> None:  # type: ignore[no-untyped-def]
    ids = _ids(tiny_lm)
    f, fmax = _active_feature(tiny_lm, sae, ids)
    eos = tiny_lm.tokenizer.eos_token_id
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=eos, eos_token_id=None, output_scores=True,
              return_dict_in_generate=True)
    outs = {}
    for cache in (True, False):
        with steer(tiny_lm, sae, [Edit(f, "clamp", 8 * fmax), Edit(3, "add", -2.0)], where=where) as st:
            outs[cache] = tiny_lm.model.generate(ids, use_cache=cache, **kw)
        assert st.prompt_len == ids.shape[1]
    plain = tiny_lm.model.generate(ids, use_cache=True, **kw)
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    for a, b in zip(outs[True].scores, outs[False].scores, strict=True):
        assert float((a - b).abs().max()) < 1e-4
    # steering changed what was generated (so the equality above is not between two unsteered runs)
    diff = max(float((a - b).abs().max()) for a, b in zip(outs[True].scores, plain.scores, strict=True))
    assert diff > 1e-2
    if where == "prompt":  # generated positions untouched: the first step already differs, and only through the prompt
        assert float((outs[True].scores[0] - plain.scores[0]).abs().max()) > 1e-2
    if where == "generated":  # the first new token is predicted from prompt positions only: unchanged
        assert float((outs[True].scores[0] - plain.scores[0]).abs().max()) < 1e-5


def test_generated_tokens_are_steered_with_kv_cache(tiny_lm, sae) -> None:  # type: ignore[no-untyped-def]
    """SAELens's tutorial hook skips length-1 forwards; here every cached step is edited."""
    ids = _ids(tiny_lm)
    with steer(tiny_lm, sae, [Edit(5, "add", 3.0)], where="generated") as st:
        tiny_lm.model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True,
                               pad_token_id=tiny_lm.tokenizer.eos_token_id, eos_token_id=None)
    assert st.rows_edited == 5  # the 6th token is sampled but never fed back


def test_bad_edits_are_one_line_errors(tiny_lm, sae) -> None:  # type: ignore[no-untyped-def]
    ids = _ids(tiny_lm)
    cases = [
        (Edit(256, "clamp", 1.0), "feature 256 is out of range: this SAE has features 0..255"),
        (Edit(1, "clamp", float("nan")), "is not finite"),
        (Edit(1, "add", "infx"), "is not finite"),
        (Edit(1, "clamp", "10x"), "needs feature 1's max activation from the features database"),
        (Edit(1, "clamp", 1.0, when=(999, 0.0)), "condition feature 999 is out of range"),
    ]
    for edit, msg in cases:
        with pytest.raises(SteerError, match=msg), steer(tiny_lm, sae, [edit]):
            _logits(tiny_lm, ids)
    with pytest.raises(SteerError, match="--where 'middle': use one of all, prompt, generated"), \
            steer(tiny_lm, sae, [Edit(1)], where="middle"):
        pass
