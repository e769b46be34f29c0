"""Per-token ablation effect of a feature on one of its contexts (the feature page's "ablation" panel, as
OpenAI's SAE viewer shows it).

The model reads the context twice: as is, and with the feature's code set to 0 at every position through
`monoscope.steer.intervene.steer` (mode `ablate`, where "all"): x <- x + (0 - f)·W_dec/c, so the SAE's error
term is kept and only this feature's contribution leaves the residual stream; the BOS row is never edited, as
in steering. For each token t >= 1 the panel shows

    delta[t] = loss_ablated[t] - loss_clean[t],   loss[t] = -log p(token t | tokens < t)

(nats): positive where the feature helped predict that token, negative where it hurt. `acts[t]` is the
feature's code at t on this forward (the window is read on its own, from BOS, so it can differ a little from
the stored activations, which saw the whole context).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from monoscope.model.hooks import HookPoint, capture_at
from monoscope.model.load import LoadedModel
from monoscope.sae import SAE
from monoscope.steer.edits import Edit
from monoscope.steer.intervene import steer


@torch.no_grad()
def ablation_effect(lm: LoadedModel, sae: SAE, hook: HookPoint, ids: Tensor, feature: int) -> dict[str, Any]:
    """ids [1, T] (BOS first) -> {acts [T], loss [T], loss_ablated [T], delta [T] (None at 0), rows_edited}."""
    with capture_at(lm.layout, hook, stop=False) as box, lm.autocast():
        clean = lm.model(input_ids=ids, use_cache=False).logits[0].float()
    acts = sae.encode_raw(box["acts"][0].float())[:, feature]
    with steer(lm, sae, [Edit(feature, "ablate")], where="all") as state, lm.autocast():
        ablated = lm.model(input_ids=ids, use_cache=False).logits[0].float()
    target = ids[0, 1:].to(clean.device)[:, None]
    loss = -torch.log_softmax(clean[:-1], -1).gather(1, target)[:, 0]
    loss_a = -torch.log_softmax(ablated[:-1], -1).gather(1, target)[:, 0]

    def col(v: Tensor) -> list[float | None]:
        return [None, *[round(float(x), 6) for x in v.tolist()]]

    return {"acts": [round(float(a), 4) for a in acts.tolist()], "loss": col(loss), "loss_ablated": col(loss_a),
            "delta": col(loss_a - loss), "rows_edited": int(state.rows_edited)}
