"""`steer(lm, sae, edits)`: edit SAE features at the SAE's hook during any forward or `generate`.

At each steered row x (raw activation at the hook), with codes f = encode(c·x) and edited codes f':

    x  <-  decode(f')/c + (x − decode(f)/c)            (the paper's clamp; DESIGN.md section 4)

The error term x − x̂ comes from the *clean* reconstruction, so only the edited features change
(computing it after the edit would cancel the edit). As the decoder is affine this is computed as
x + (f' − f)·W_dec/c over the edited columns only (the same sum, without two full decodes per
token). The normaliser c is folded in and out exactly as `eval/splice.py` splices x̂
(`sae.encode_raw`, and W_dec/c as in `sae.decode_raw`). Rows no edit touches are left bit-identical.

Positions: a pre-hook on the model reads where each forward starts (`position_ids`, `cache_position`,
else the KV cache's length, else 0), so with a KV cache every generated token (a forward of length 1) is steered
at its true position; `where="prompt"` edits positions < prompt_len, `"generated"` the others.
prompt_len is taken from the first forward inside the block unless given. Rows whose input token is
the BOS are never edited (the SAE never trained on the attention sink; editing it moves every later
position through attention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from monoscope.model.hooks import HookPoint, hooked_at
from monoscope.model.load import LoadedModel
from monoscope.sae import SAE
from monoscope.steer.edits import WHERE, Edit, ResolvedEdit, SteerError, resolve_edits


@dataclass
class SteerState:
    """What the block did (read after, or during, the block)."""

    hook: HookPoint
    edits: list[ResolvedEdit]
    where: str
    prompt_len: int | None
    rows_seen: int = 0
    """Rows (token positions) the hook saw, over every forward."""
    rows_edited: int = 0
    """Rows an edit applied to."""
    _pos: dict[str, Any] = field(default_factory=dict, repr=False)


def check_pair(lm: LoadedModel, sae: SAE, hook: str | None = None) -> HookPoint:
    """The hook the SAE reads on this model, with one-line errors for a hook the model lacks and an SAE
    made for another model (d_in mismatch)."""
    name = hook or sae.cfg.hook
    try:
        hp = lm.hook(name)
    except SteerError:
        raise
    except Exception as e:  # ModelError from parse_hook: already one line and lists valid names
        raise SteerError(f"the SAE reads hook {name!r}, which {lm.model_id} lacks ({e}); pass the model the "
                         "SAE was trained on with --model") from None
    if lm.d_model != sae.cfg.d_in:
        raise SteerError(f"model {lm.model_id} is {lm.d_model} wide at {hp} but the SAE reads d_in {sae.cfg.d_in}: "
                         "the SAE was made for another model; pass that model with --model")
    return hp


def _offset(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, Tensor | None]:
    """(position of the forward's first token, input ids) from what `generate` or a caller passes:
    position_ids, else cache_position, else the KV cache's length (`cache` or `past_key_values`), else 0."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
    for name in ("position_ids", "cache_position"):
        v = kwargs.get(name)
        if isinstance(v, Tensor) and v.numel() > 0:
            return int(v.reshape(-1)[0]), ids
    for name in ("cache", "past_key_values"):
        pkv = kwargs.get(name)
        if pkv is not None and hasattr(pkv, "get_seq_length"):
            return int(pkv.get_seq_length()), ids
    return 0, ids


def apply_edits(sae: SAE, x: Tensor, edits: Sequence[ResolvedEdit], allowed: Tensor) -> tuple[Tensor, Tensor]:
    """x [N, d] raw float32, allowed [N] bool (position rule) -> (new x [N, d], rows edited [N] bool).

    The codes and both decodes carry no gradient; x keeps its own, so a backward through a steered
    forward still reaches the layers before the hook (the edit acts as a constant shift)."""
    with torch.no_grad():
        return _apply(sae, x, edits, allowed)


def _apply(sae: SAE, x: Tensor, edits: Sequence[ResolvedEdit], allowed: Tensor) -> tuple[Tensor, Tensor]:
    codes = sae.encode_raw(x.detach())  # [N, F]
    edited = codes.clone()
    extra = torch.zeros_like(x)
    touched = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for e in edits:
        rows = allowed
        if e.when is not None:
            rows = rows & (codes[:, e.when[0]] > e.when[1])
        if not bool(rows.any()):
            continue
        if e.direction is not None:  # a free direction whose code is 0: clamp and add both add value·dir
            if e.mode in ("clamp", "add"):
                extra[rows] += e.value * e.direction.to(x.device, torch.float32)
                touched |= rows
            continue
        col = edited[:, e.feature]
        if e.mode == "clamp":
            new = torch.full_like(col, e.value)
        elif e.mode == "add":
            new = col + e.value
        elif e.mode == "scale":
            new = col * e.value
        else:
            new = torch.zeros_like(col)
        edited[:, e.feature] = torch.where(rows, new, col)
        touched |= rows
    if not bool(touched.any()):
        return x, touched
    # x̂(edited) + (x − x̂(codes)) = x + (edited − codes) W_dec / c: the decoder is affine, so only the edited
    # columns enter (no two full [N, F] decodes per generated token); equal up to float rounding
    cols = sorted({e.feature for e in edits if e.direction is None})
    shift = extra
    if cols:
        idx = torch.tensor(cols, device=x.device)
        delta = (edited[:, idx] - codes[:, idx]) * touched[:, None]
        shift = shift + delta @ sae.W_dec[idx].float() / sae.cfg.normaliser
    return x + shift, touched


@contextlib.contextmanager
def steer(lm: LoadedModel, sae: SAE, edits: Sequence[Edit], *, where: str = "all", prompt_len: int | None = None,
          max_act: Callable[[int], float | None] | None = None, hook: str | None = None,
          skip_bos: bool = True) -> Iterator[SteerState]:
    """Inside the block, every forward of `lm.model` (plain or `generate`, KV cache or not) has the
    edits applied at the SAE's hook (module docstring). `max_act(feature)` resolves "10x" strengths."""
    if where not in WHERE:
        raise SteerError(f"--where {where!r}: use one of {', '.join(WHERE)}")
    hp = check_pair(lm, sae, hook)
    resolved = resolve_edits(edits, sae.cfg.d_sae, max_act)
    state = SteerState(hp, resolved, where, prompt_len)
    bos = lm.special_ids()[0] if skip_bos else None

    def model_pre(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        off, ids = _offset(args, kwargs)
        state._pos["offset"], state._pos["ids"] = off, ids
        if state.prompt_len is None and off == 0 and ids is not None:
            state.prompt_len = int(ids.shape[-1])

    def replace(h: Tensor) -> Tensor:
        B, T, d = h.shape
        off = int(state._pos.get("offset", 0))
        pos = torch.arange(off, off + T, device=h.device)
        plen = state.prompt_len if state.prompt_len is not None else T + off
        allowed = torch.ones(T, dtype=torch.bool, device=h.device)
        if where == "prompt":
            allowed = pos < plen
        elif where == "generated":
            allowed = pos >= plen
        allowed = allowed.expand(B, T)
        ids = state._pos.get("ids")
        if bos is not None and isinstance(ids, Tensor) and ids.shape == (B, T):
            allowed = allowed & (ids.to(h.device) != bos)
        state.rows_seen += B * T
        if not bool(allowed.any()):
            return h
        with torch.autocast(h.device.type, enabled=False):
            x = h.reshape(B * T, d).float()
            new, touched = apply_edits(sae, x, resolved, allowed.reshape(-1))
        state.rows_edited += int(touched.sum())
        if not bool(touched.any()):
            return h
        return new.to(h.dtype).reshape(B, T, d)

    handle = lm.model.register_forward_pre_hook(model_pre, with_kwargs=True)
    try:
        with hooked_at(lm, hp, replace):
            yield state
    finally:
        handle.remove()
