"""Default vs steered continuation of one prompt, from the same seed, with per-token log-probs.

Both continuations are generated with the KV cache (every generated token steered where `where`
says so). Each continuation is then read back by both the default and the steered model (one
teacher-forced forward each), so every token gets log p_default, log p_steered and their difference:
which tokens the edit promoted, and by how much.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from monoscope.steer.edits import Edit
from monoscope.steer.intervene import steer
from monoscope.steer.target import Target


def _generate(t: Target, ids: Tensor, edits: Sequence[Edit] | None, *, where: str, max_new_tokens: int,
              temperature: float, seed: int) -> Tensor:
    tok = t.lm.tokenizer
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, use_cache=True,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                              attention_mask=torch.ones_like(ids))
    kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    torch.manual_seed(seed)
    with torch.no_grad(), t.lm.autocast():
        if edits is None:
            out = t.lm.model.generate(ids, **kw)
        else:
            with steer(t.lm, t.sae, edits, where=where, prompt_len=ids.shape[1], max_act=t.max_act):
                out = t.lm.model.generate(ids, **kw)
    return out[:, ids.shape[1]:]


def token_logprobs(t: Target, ids: Tensor, new: Tensor, edits: Sequence[Edit] | None, where: str) -> Tensor:
    """log p(new[i] | ids, new[:i]) [n] under the default (edits None) or the steered model."""
    full = torch.cat([ids, new], 1)
    with torch.no_grad(), t.lm.autocast():
        if edits is None:
            logits = t.lm.model(input_ids=full, use_cache=False).logits
        else:
            with steer(t.lm, t.sae, edits, where=where, prompt_len=ids.shape[1], max_act=t.max_act):
                logits = t.lm.model(input_ids=full, use_cache=False).logits
    lp = torch.log_softmax(logits[0, ids.shape[1] - 1:-1].float(), dim=-1)
    return lp.gather(-1, new[0].unsqueeze(-1)).squeeze(-1).cpu()


def side_by_side(t: Target, edits: Sequence[Edit], prompt: str, *, chat: bool = False, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0, where: str = "all") -> dict[str, Any]:
    """{"prompt", "default", "steered", "edits", "seed", "tokens": {...}}: texts, then per token
    (text, logp_default, logp_steered, delta) for each continuation."""
    from monoscope.steer.edits import resolve_edits

    resolved = resolve_edits(edits, t.sae.cfg.d_sae, t.max_act)  # errors before any generation
    ids = t.encode(prompt, chat=chat)
    t.check_length(ids.shape[1] + max_new_tokens, "the prompt plus --max-new-tokens")
    tok = t.lm.tokenizer
    out: dict[str, Any] = {"prompt": prompt}
    tokens: dict[str, list[dict[str, Any]]] = {}
    for name, e in (("default", None), ("steered", edits)):
        new = _generate(t, ids, e, where=where, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        lp_d = token_logprobs(t, ids, new, None, where)
        lp_s = token_logprobs(t, ids, new, edits, where)
        out[name] = tok.decode(new[0], skip_special_tokens=True)
        tokens[name] = [{"token": tok.decode([int(i)]), "logp_default": round(float(a), 4),
                         "logp_steered": round(float(b), 4), "delta": round(float(b - a), 4)}
                        for i, a, b in zip(new[0].tolist(), lp_d, lp_s, strict=True)]
    out["edits"] = [{**r.spec, "raw_value": r.value} for r in resolved]
    out["seed"] = seed
    out["where"] = where
    out["temperature"] = temperature
    out["tokens"] = tokens
    return out
