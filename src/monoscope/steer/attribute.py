"""Attribution of a next-token metric to SAE features at each position (and the SAE error term).

At the SAE's hook the activation of every non-BOS position is rewritten as a function of nodes:

    x_t = decode(f_t)/c + e_t         f_t = encode(c·x_t) (the codes),  e_t = x_t − decode(f_t)/c

which equals the clean x_t, so the forward is unchanged; the codes f and the error e are leaves of
the graph. For a metric m of the last position's logits (log p of a target token, or a logit
difference), the attribution of node n is

    gradient x activation:   A_n = a_n · ∂m/∂a_n               (one forward + backward)
    integrated gradients:    A_n = a_n · mean_k ∂m/∂a_n |_(α_k a)   α_k = (k + ½)/steps

both estimates of m(clean) − m(node set to 0). IG scales every node together from 0 (x = b_dec/c)
to its value, so Σ_n A_n = m(clean) − m(all nodes 0) up to the Riemann error (completeness); the
error term per position is a node of its own (saprmarks/feature-circuits does the same). The top
features (attribution summed over positions) are then checked by exact ablation: the feature's
code set to 0 at every position with the clean error term kept, m re-measured; the Pearson
correlation between attributed and exact effects says how linear the model is around this input.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from monoscope.model.hooks import hooked_at
from monoscope.steer.edits import SteerError
from monoscope.steer.target import Target


@dataclass(frozen=True)
class Metric:
    """`logprob` of one token, or `logit-diff` between two tokens, at the prompt's last position."""

    kind: str
    tokens: tuple[int, ...]
    texts: tuple[str, ...]

    def __call__(self, logits: Tensor) -> Tensor:
        """logits [B, V] (last position) -> [B]."""
        if self.kind == "logprob":
            return torch.log_softmax(logits.float(), dim=-1)[:, self.tokens[0]]
        return logits[:, self.tokens[0]].float() - logits[:, self.tokens[1]].float()

    def describe(self) -> str:
        if self.kind == "logprob":
            return f"log p({self.texts[0]!r})"
        return f"logit({self.texts[0]!r}) - logit({self.texts[1]!r})"


def _one_token(tok: Any, text: str) -> int:
    ids = tok(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = [tok.decode([i]) for i in ids]
        raise SteerError(f"{text!r} is {len(ids)} tokens ({pieces}) for this tokenizer: pass a single token, "
                         "e.g. with its leading space")
    return int(ids[0])


def parse_metric(tok: Any, target: str | None, metric: str | None) -> Metric:
    """--target " token" or --metric logit-diff:" a"," b" -> Metric (one-line errors)."""
    if (target is None) == (metric is None):
        raise SteerError('pass exactly one of --target " token" and --metric logit-diff:" a"," b"')
    if target is not None:
        return Metric("logprob", (_one_token(tok, target),), (target,))
    kind, _, rest = str(metric).partition(":")
    if kind != "logit-diff" or not rest:
        raise SteerError(f'--metric {metric!r}: use logit-diff:" a"," b" (two quoted tokens)')
    parts = next(csv.reader([rest], quotechar='"', skipinitialspace=False))
    if len(parts) != 2:
        raise SteerError(f'--metric {metric!r}: give exactly two tokens, logit-diff:" a"," b"')
    return Metric("logit-diff", tuple(_one_token(tok, p) for p in parts), tuple(parts))


@dataclass
class Attribution:
    """Per feature and position attributions (dense [T, F]), the error nodes [T] and the checks."""

    metric: Metric
    tokens: list[str]
    method: str
    codes: Tensor  # [T, F] clean codes (row 0, the BOS, is not a node: zeros)
    attr: Tensor  # [T, F]
    error_attr: Tensor  # [T]
    m_clean: float
    m_zero: float
    """Metric with every node at 0 (x = b_dec/c at every non-BOS position)."""
    checked: list[dict[str, Any]] = field(default_factory=list)
    correlation: float | None = None

    @property
    def total(self) -> float:
        return float(self.attr.sum() + self.error_attr.sum())

    def top_features(self, n: int) -> list[int]:
        per = self.attr.sum(0)
        return [int(i) for i in per.abs().argsort(descending=True)[:n] if float(per[i]) != 0.0]


class _Runner:
    """Forwards of the model with the hook's output replaced by a given tensor."""

    def __init__(self, t: Target, ids: Tensor) -> None:
        self.t, self.ids = t, ids

    def clean_acts(self) -> Tensor:
        return self.t.lm.acts(self.t.hook, self.ids)[0]  # [T, d] fp32

    def last_logits(self, x: Tensor) -> Tensor:
        """x [B, T, d] (the hook's activation for B copies of the prompt) -> last-position logits [B, V]."""
        return self.logits(x, last_only=True)[:, -1]

    def logits(self, x: Tensor, *, last_only: bool = False) -> Tensor:
        """x [B, T, d] (the hook's activation for B copies of the prompt) -> logits [B, T, V] (or [B, 1, V])."""
        ids = self.ids.expand(x.shape[0], -1)
        with hooked_at(self.t.lm, self.t.hook, lambda h: x.to(h.dtype)), self.t.lm.autocast():
            if not last_only:
                return self.t.lm.model(input_ids=ids, use_cache=False).logits
            try:
                return self.t.lm.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
            except TypeError:  # a model class without logits_to_keep
                return self.t.lm.model(input_ids=ids, use_cache=False).logits


@dataclass
class _Nodes:
    """The clean activation split into nodes: x [T, d] = codes @ W + base_shift + err on every non-BOS row."""

    x: Tensor
    codes: Tensor  # [T, F] (row 0, the BOS, is not a node: zeros)
    err: Tensor  # [T, d]
    W: Tensor  # [F, d] raw-space decoder rows
    base_shift: Tensor  # [1, d] = decode_raw(0)
    node_rows: Tensor  # [T, 1]: 0 for the BOS row, 1 elsewhere


def _nodes(t: Target, r: _Runner) -> _Nodes:
    sae = t.sae
    W = sae.W_dec.detach().float() / sae.cfg.normaliser
    base_shift = (sae.b_dec.detach().float() / sae.cfg.normaliser)[None]
    with torch.no_grad():
        x = r.clean_acts()
        codes = sae.encode_raw(x)
        codes[0] = 0  # the BOS row is not a node: it keeps its clean activation
        err = x - (codes @ W + base_shift)  # fp32, the same sum the forwards rebuild
        err[0] = 0
    node_rows = torch.zeros(x.shape[0], 1, device=x.device)
    node_rows[1:] = 1.0
    return _Nodes(x, codes, err, W, base_shift, node_rows)


def attribute(t: Target, prompt: str, metric: Metric, *, ig_steps: int = 0, verify: int = 10,
              batch: int = 8) -> Attribution:
    """Attribute `metric` to every feature x position and error node (module docstring)."""
    if ig_steps < 0 or ig_steps > 1024:
        raise SteerError(f"--ig-steps {ig_steps}: pass 0 (gradient x activation) or 1..1024")
    ids = t.encode(prompt)
    t.check_length(ids.shape[1])
    if ids.shape[1] < 2:
        raise SteerError("the prompt is empty: pass some text with --prompt")
    r = _Runner(t, ids)
    n = _nodes(t, r)
    x, codes, err, W, base_shift, node_rows = n.x, n.codes, n.err, n.W, n.base_shift, n.node_rows
    with torch.no_grad():
        base = x.clone()
        base[1:] = base_shift  # all nodes 0
    alphas = [1.0] if ig_steps == 0 else [(k + 0.5) / ig_steps for k in range(ig_steps)]
    g_codes = torch.zeros_like(codes)
    g_err = torch.zeros_like(err)
    for i in range(0, len(alphas), batch):
        a = torch.tensor(alphas[i:i + batch], device=x.device)[:, None, None]  # [S, 1, 1]
        c_node = (a * codes).requires_grad_(True)  # [S, T, F]
        e_node = (a * err).requires_grad_(True)  # [S, T, d]
        xs = x.expand(len(a), -1, -1) * (1 - node_rows) + (c_node @ W + base_shift + e_node) * node_rows
        m = metric(r.last_logits(xs))
        gc, ge = torch.autograd.grad(m.sum(), (c_node, e_node))
        g_codes += gc.sum(0)
        g_err += ge.sum(0)
    g_codes /= len(alphas)
    g_err /= len(alphas)
    with torch.no_grad():
        m_clean = float(metric(r.last_logits(x[None]))[0])
        m_zero = float(metric(r.last_logits(base[None]))[0])
    tok = t.lm.tokenizer
    res = Attribution(metric, [tok.decode([i]) for i in ids[0].tolist()], "ig" if ig_steps else "grad-x-act",
                      codes.cpu(), (codes * g_codes).cpu(), (err * g_err).sum(-1).cpu(), m_clean, m_zero)
    if verify > 0:
        _verify(res, r, x, codes, W, verify, batch)
    return res


def text_attribution(t: Target, ids: Tensor) -> Tensor:
    """Per feature [F]: gradient x activation of the text's log-likelihood (the sum over positions of
    log p(next token), the BOS row not a node), summed over positions. Positive = the feature helps the model
    predict this text; the audit contrasts a concept's positive texts with its negatives this way, since a pack
    defines no single target token. ids [1, T] with the BOS first."""
    if ids.shape[1] < 2:
        raise SteerError("the text is empty: nothing to attribute")
    r = _Runner(t, ids)
    n = _nodes(t, r)
    c_node = n.codes.clone().requires_grad_(True)
    xs = n.x * (1 - n.node_rows) + (c_node @ n.W + n.base_shift + n.err) * n.node_rows
    logp = torch.log_softmax(r.logits(xs[None])[0, :-1].float(), dim=-1)
    m = logp.gather(1, ids[0, 1:, None].to(logp.device)).sum()
    (g,) = torch.autograd.grad(m, (c_node,))
    return (n.codes * g).sum(0).detach().cpu()


@torch.no_grad()
def _verify(res: Attribution, r: _Runner, x: Tensor, codes: Tensor, W: Tensor, n: int, batch: int) -> None:
    """Exact ablation of the top-n features (every position, clean error term kept)."""
    feats = res.top_features(n)
    per = res.attr.sum(0)
    exact: list[float] = []
    for i in range(0, len(feats), batch):
        fs = feats[i:i + batch]
        xs = torch.stack([x - codes[:, f:f + 1] * W[f] for f in fs])  # [B, T, d]
        exact += [res.m_clean - float(v) for v in res.metric(r.last_logits(xs))]
    for f, e in zip(feats, exact, strict=True):
        pos = int(res.attr[:, f].abs().argmax())
        res.checked.append({"feature": f, "attribution": float(per[f]), "exact": e, "position": pos,
                            "token": res.tokens[pos], "activation": float(res.codes[pos, f])})
    if len(feats) >= 3:
        a = torch.tensor([c["attribution"] for c in res.checked], dtype=torch.float64)
        b = torch.tensor(exact, dtype=torch.float64)
        if float(a.std()) > 0 and float(b.std()) > 0:
            res.correlation = float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def to_json(res: Attribution, t: Target, prompt: str, top: int = 50) -> dict[str, Any]:
    """Everything measured, plus a graph in the layout of circuit-tracer's JSON (metadata, nodes, links):
    feature and error nodes at the SAE's layer linked to one metric node with their attributions."""
    layer = t.hook.layer
    per = res.attr.sum(0)
    feats = res.top_features(top)
    rows = []
    for f in feats:
        pos = int(res.attr[:, f].abs().argmax())
        rows.append({"feature": f, "label": t.label(f), "attribution": float(per[f]), "position": pos,
                     "token": res.tokens[pos], "attribution_at_position": float(res.attr[pos, f]),
                     "activation": float(res.codes[pos, f])})
    T = len(res.tokens)
    target_id = f"metric_{T - 1}"
    nodes: list[dict[str, Any]] = [{"node_id": target_id, "feature": None, "layer": "metric", "ctx_idx": T - 1,
                                    "feature_type": "logit", "is_target_logit": True, "clerp": res.metric.describe(),
                                    "token_prob": math.exp(res.m_clean) if res.metric.kind == "logprob" else None}]
    links = []
    nz = torch.nonzero(res.attr[:, feats] if feats else torch.zeros(0, 0))
    for p, j in nz.tolist():
        f = feats[j]
        nid = f"{layer}_{f}_{p}"
        nodes.append({"node_id": nid, "feature": f, "layer": str(layer), "ctx_idx": p, "feature_type": "sae feature",
                      "activation": float(res.codes[p, f]), "clerp": t.label(f), "is_target_logit": False})
        links.append({"source": nid, "target": target_id, "weight": float(res.attr[p, f])})
    for p in range(1, T):
        nid = f"E_{layer}_{p}"
        nodes.append({"node_id": nid, "feature": None, "layer": str(layer), "ctx_idx": p,
                      "feature_type": "sae error", "clerp": "SAE error term", "is_target_logit": False})
        links.append({"source": nid, "target": target_id, "weight": float(res.error_attr[p])})
    return {
        "prompt": prompt, "metric": res.metric.describe(), "method": res.method, "hook": str(t.hook),
        "metric_clean": res.m_clean, "metric_all_nodes_zero": res.m_zero,
        "sum_feature_attributions": float(res.attr.sum()), "sum_error_attributions": float(res.error_attr.sum()),
        "top_features": rows, "checked_by_ablation": res.checked, "correlation": res.correlation,
        "error_by_position": [float(v) for v in res.error_attr],
        "graph": {"metadata": {"slug": "monoscope-attribution", "scan": t.lm.model_id, "prompt": prompt,
                               "prompt_tokens": res.tokens, "info": {"hook": str(t.hook), "method": res.method}},
                  "nodes": nodes, "links": links},
    }
