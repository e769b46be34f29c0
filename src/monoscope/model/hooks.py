"""Hook points by name, found on any supported module layout, and a forward that stops at the hook.

A hook point is `KIND.LAYER`:

- `resid_pre.L`  the residual stream entering block L (block L's input);
- `resid_post.L` the residual stream leaving block L (block L's output; equals `resid_pre.(L+1)`);
- `attn_out.L`   what block L's attention adds to the residual stream;
- `mlp_in.L`     what block L's MLP reads (the input of its MLP module, after the block's pre-MLP norm);
- `mlp_out.L`    what block L's MLP adds to the residual stream.

Several hooks can be read in one forward (`capture_many`, `run_to_hooks`): a paired store for a transcoder
(`mlp_in.L,mlp_out.L`) or the layers of a crosscoder.

For Gemma-style blocks, which normalise the attention and MLP outputs before adding them
(`post_attention_layernorm`, `post_feedforward_layernorm`), `attn_out`/`mlp_out` are taken after
that norm, so they are always the exact term added to the residual stream. In Llama-style blocks the
module called `post_attention_layernorm` is the MLP's *input* norm and is never hooked.

The forward raises `_StopForward` from the hook once it has the activation, so no compute is spent
on later blocks, the final norm or the unembedding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from monoscope.errors import ModelError

HookKind = Literal["resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out"]
HOOK_KINDS: tuple[HookKind, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out")
_ORDER_IN_BLOCK = {"resid_pre": 0, "attn_out": 1, "mlp_in": 2, "mlp_out": 3, "resid_post": 4}

# Where each family keeps its stack of blocks, and what it calls the attention and MLP sub-modules.
_BLOCK_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                "model.decoder.layers", "layers", "h")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
# Gemma 2/3: norms applied to the sub-layer output before the residual add.
_ATTN_POST_NORM = "post_attention_layernorm"
_MLP_POST_NORM = "post_feedforward_layernorm"


@dataclass(frozen=True)
class HookPoint:
    """A parsed hook name; `str(hp)` gives back the canonical name."""

    kind: HookKind
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def order(self) -> tuple[int, int]:
        """Where the forward reaches it: (layer, place in the block)."""
        return self.layer, _ORDER_IN_BLOCK[self.kind]


@dataclass(frozen=True)
class Layout:
    """How one model's blocks are laid out: found once, used by every hook."""

    blocks: nn.ModuleList
    blocks_path: str
    attn_name: str
    mlp_name: str
    gemma_post_norms: bool

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def valid_names(self) -> str:
        last = self.n_layers - 1
        return ", ".join(f"{k}.0..{last}" for k in HOOK_KINDS)


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layout(model: nn.Module) -> Layout:
    """Locate the block stack and the sub-module names of a causal LM (Llama, Gemma, Qwen, GPT-2, NeoX…)."""
    for path in _BLOCK_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            break
    else:
        raise ModelError(
            f"cannot find the transformer blocks of {type(model).__name__}: looked for "
            f"{', '.join(_BLOCK_PATHS)}; supported layouts are Llama, Gemma, Qwen, GPT-2 and GPT-NeoX style"
        )
    block = blocks[0]
    attn = next((n for n in _ATTN_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
    mlp = next((n for n in _MLP_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
    if attn is None or mlp is None:
        raise ModelError(
            f"block {type(block).__name__} of {type(model).__name__} has no recognised attention "
            f"({'/'.join(_ATTN_NAMES)}) or MLP ({'/'.join(_MLP_NAMES)}) sub-module"
        )
    gemma = hasattr(block, _MLP_POST_NORM) and hasattr(block, "pre_feedforward_layernorm")
    return Layout(blocks=blocks, blocks_path=path, attn_name=attn, mlp_name=mlp, gemma_post_norms=gemma)


def parse_hook(name: str, layout: Layout) -> HookPoint:
    """Parse `KIND.LAYER`, checking both parts against this model; errors list every valid name."""
    kind, _, layer_s = name.strip().partition(".")
    if kind not in HOOK_KINDS or not layer_s.lstrip("-").isdigit():
        raise ModelError(f"unknown hook point {name!r}: valid names are {layout.valid_names()}")
    layer = int(layer_s)
    if not 0 <= layer < layout.n_layers:
        raise ModelError(
            f"hook point {name!r}: layer {layer} is out of range for a {layout.n_layers}-layer model; "
            f"valid names are {layout.valid_names()}"
        )
    return HookPoint(kind, layer)  # type: ignore[arg-type]


def default_hook(layout: Layout) -> HookPoint:
    """The residual stream after the middle block, the paper's choice."""
    return HookPoint("resid_post", layout.n_layers // 2)


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass once the activation is captured."""


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise ModelError(f"hooked module returned {type(value).__name__}, expected a tensor or a tuple of tensors")


def _module_for(layout: Layout, hp: HookPoint) -> tuple[nn.Module, bool]:
    """The module to hook and whether to read its input (pre-hook) instead of its output."""
    block = layout.blocks[hp.layer]
    if hp.kind == "resid_pre":
        return block, True
    if hp.kind == "resid_post":
        return block, False
    if hp.kind == "mlp_in":
        return getattr(block, layout.mlp_name), True
    if hp.kind == "attn_out":
        return (getattr(block, _ATTN_POST_NORM) if layout.gemma_post_norms else getattr(block, layout.attn_name)), False
    return (getattr(block, _MLP_POST_NORM) if layout.gemma_post_norms else getattr(block, layout.mlp_name)), False


@contextlib.contextmanager
def capture_at(layout: Layout, hp: HookPoint, *, stop: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each forward stores the hook's activation in the yielded dict under "acts".

    With `stop`, the forward is cut right after the hook (call it through `run_to_hook`).
    """
    box: dict[str, torch.Tensor] = {}
    module, pre = _module_for(layout, hp)

    def post_hook(_m: nn.Module, _args: Any, out: Any) -> None:
        box["acts"] = _first_tensor(out)
        if stop:
            raise _StopForward

    def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        box["acts"] = args[0] if args else kwargs["hidden_states"]
        if stop:
            raise _StopForward

    handle = (module.register_forward_pre_hook(pre_hook, with_kwargs=True) if pre
              else module.register_forward_hook(post_hook))
    try:
        yield box
    finally:
        handle.remove()


def run_to_hook(model: nn.Module, layout: Layout, hp: HookPoint, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Activations [batch, seq, d_model] at `hp`, computing nothing after it."""
    with capture_at(layout, hp, stop=True) as box:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    if "acts" not in box:
        raise ModelError(f"hook {hp} never fired: the model's forward did not reach {layout.blocks_path}[{hp.layer}]")
    return box["acts"]


def parse_hooks(names: str, layout: Layout) -> tuple[HookPoint, ...]:
    """`a,b,c` -> hook points in the order given (each checked by `parse_hook`); a repeated hook is an error."""
    hps = tuple(parse_hook(n, layout) for n in names.split(","))
    if len(set(hps)) != len(hps):
        raise ModelError(f"--hook {names!r} names a hook twice: list each hook once")
    return hps


@contextlib.contextmanager
def capture_many(layout: Layout, hps: tuple[HookPoint, ...], *, stop: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Like `capture_at` for several hooks in one forward: the yielded dict maps str(hook) -> activation; with
    `stop`, the forward ends once the last of them has fired."""
    box: dict[str, torch.Tensor] = {}
    want = len(hps)
    handles = []

    def store(name: str, value: torch.Tensor) -> None:
        box[name] = value
        if stop and len(box) == want:
            raise _StopForward

    for hp in hps:
        module, pre = _module_for(layout, hp)
        name = str(hp)
        if pre:
            def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
                store(name, args[0] if args else kwargs["hidden_states"])

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:
            def post_hook(_m: nn.Module, _args: Any, out: Any, name: str = name) -> None:
                store(name, _first_tensor(out))

            handles.append(module.register_forward_hook(post_hook))
    try:
        yield box
    finally:
        for h in handles:
            h.remove()


def run_to_hooks(model: nn.Module, layout: Layout, hps: tuple[HookPoint, ...], input_ids: torch.Tensor
                 ) -> torch.Tensor:
    """Activations at every hook of `hps` side by side, [batch, seq, n_hooks·d], in the order given; nothing is
    computed after the last of them. Hooks of different widths are an error (a store row has one width per hook)."""
    with capture_many(layout, hps) as box:
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
    missing = [str(hp) for hp in hps if str(hp) not in box]
    if missing:
        raise ModelError(f"hooks {', '.join(missing)} never fired: the model's forward did not reach them")
    acts = [box[str(hp)] for hp in hps]
    widths = {str(hp): a.shape[-1] for hp, a in zip(hps, acts, strict=True)}
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"{k} ({v})" for k, v in widths.items())
        raise ModelError(f"hooks of mismatched widths: {shown}: capture hooks of one width together")
    return torch.cat(acts, dim=-1)


@contextlib.contextmanager
def hooked_at(lm: Any, hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """While open, `fn(h)` sees the activation h at `hp` on every forward and may return its replacement
    (None keeps h): one forward hook or pre-hook, as the hook point needs."""
    module, pre = _module_for(lm.layout, hp)  # lm: a LoadedModel

    def post_hook(_m: torch.nn.Module, _args: Any, out: Any) -> Any:
        new = fn(_first_tensor(out))
        if new is None:
            return None
        return new if isinstance(out, torch.Tensor) else (new, *out[1:])

    def pre_hook(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        new = fn(args[0] if args else kwargs["hidden_states"])
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    handle = (module.register_forward_pre_hook(pre_hook, with_kwargs=True) if pre
              else module.register_forward_hook(post_hook))
    try:
        yield
    finally:
        handle.remove()
