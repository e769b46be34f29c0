"""What the SAELens and sparsify converters share: a peer-neutral SAE in raw activation space, and
the file, hook-name and dtype conventions.

Every converter goes through `RawSAE`, which describes an SAE by what it computes on *raw* inputs:

    pre = W_enc (c·x − b_dec·[b_dec_to_input]) + b_enc        f = activation(pre)     x̂ = (f W_dec + b_dec) / c

with `c = normaliser`. Exporting folds c into the weights (c = 1 in the file, the peers' own
convention: SAELens folds its scaling factor the same way at the end of training) so the peer's
encode on raw activations gives the same feature activations as monoscope's `encode_raw`. Importing
keeps the peer's weights as they are and sets c to what the peer's config implies (1.0 unless
SAELens recorded an unfolded scaling factor). Any fold is computed in float64.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

import monoscope
from monoscope.errors import MonoscopeError
from monoscope.fileio import write_bytes_atomic, write_json_atomic
from monoscope.sae import SAE, SAEConfig, build_sae
from monoscope.sae.config import THRESHOLD_STYLE

CFG_NAME = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"  # monoscope's own weights file has the same name
ALL_SAE_FILES = (CFG_NAME, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS)


class InteropError(MonoscopeError):
    """A peer SAE folder cannot be read, or an SAE cannot be written in a peer format faithfully."""


@dataclass
class RawSAE:
    """An SAE as the formula in the module docstring: [d_sae, d_in] rows for W_enc and W_dec, in the
    file's dtype, or float64 where a fold was computed (copies only when needed: SAEs can be GBs)."""

    arch: str
    W_enc: Tensor  # [d_sae, d_in]
    b_enc: Tensor  # [d_sae]
    W_dec: Tensor  # [d_sae, d_in]
    b_dec: Tensor  # [d_in]
    b_dec_to_input: bool
    k: int | None = None
    threshold: Tensor | None = None
    """jumprelu: θ [d_sae]; batchtopk, matryoshka: θ [] (float32, compared with pre as given)."""
    prefixes: list[int] | None = None
    """matryoshka: the nested prefix widths (SAELens's matryoshka_widths)."""
    r_mag: Tensor | None = None
    """gated: [d_sae] log-scale of the magnitude path (b_enc is the gate bias b_gate)."""
    b_mag: Tensor | None = None
    """gated: [d_sae] bias of the magnitude path."""
    normaliser: float = 1.0
    target_normaliser: float = 1.0
    """transcoder: the output scale (x̂_raw = x̂ / target_normaliser)."""
    target_hook: str | None = None
    """transcoder: the hook it reconstructs."""
    hook: str | None = None
    model: str | None = None
    dtype: str = "float32"
    """dtype the imported SAE gets: bfloat16 only when the file is bf16 and nothing was folded."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What the import did or ignored (folds, training-only settings), kept in the provenance."""

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[0])


# ----------------------------------------------------------------------------- monoscope <-> RawSAE


def to_monoscope(raw: RawSAE, provenance: dict[str, Any]) -> SAE:
    """Build a monoscope SAE (eval mode, CPU) computing exactly what `raw` describes."""
    cfg = SAEConfig(
        arch=raw.arch,  # type: ignore[arg-type]
        d_in=raw.d_in,
        d_sae=raw.d_sae,
        k=raw.k,
        normaliser=float(raw.normaliser),
        hook=raw.hook,
        model=raw.model,
        dtype=raw.dtype,  # type: ignore[arg-type]
        b_dec_to_input=raw.b_dec_to_input,
        threshold=float(raw.threshold) if raw.arch in THRESHOLD_STYLE and raw.threshold is not None else None,
        prefixes=list(raw.prefixes) if raw.arch == "matryoshka" and raw.prefixes is not None else None,
        **({"target_hook": raw.target_hook, "target_normaliser": float(raw.target_normaliser)}
           if raw.arch == "transcoder" else {}),  # type: ignore[arg-type]
    )
    sae = build_sae(cfg, seed=0)
    wdt = torch.bfloat16 if raw.dtype == "bfloat16" else torch.float32
    state: dict[str, Tensor] = {
        "W_enc": raw.W_enc.to(wdt),
        "b_enc": raw.b_enc.to(wdt),
        "W_dec": raw.W_dec.to(wdt),
        "b_dec": raw.b_dec.to(wdt),
    }
    if raw.arch == "jumprelu":
        assert raw.threshold is not None
        # θ <= 0 behaves as θ = 0 (the ReLU already zeroes pre <= 0): log θ = -inf, exp gives 0 back.
        state["log_threshold"] = raw.threshold.double().clamp_min(0).log().float()
    elif raw.arch in THRESHOLD_STYLE:
        state["threshold"] = torch.tensor(float(raw.threshold), dtype=torch.float32)  # type: ignore[arg-type]
    elif raw.arch == "gated":
        assert raw.r_mag is not None and raw.b_mag is not None
        state["r_mag"], state["b_mag"] = raw.r_mag.to(wdt), raw.b_mag.to(wdt)
    sae.load_state_dict(state, strict=True)
    sae.provenance = provenance
    return sae.eval()


def from_monoscope(sae: SAE, *, b_dec_to_input: bool) -> RawSAE:
    """`sae` with its normaliser folded into the weights (c = 1) and b_dec applied to the input or
    not, as the target format needs; thresholds are unchanged because the pre-activations are."""
    cfg = sae.cfg
    c = float(cfg.normaliser)
    c_out = float(cfg.target_normaliser) if cfg.arch == "transcoder" else c  # a transcoder decodes its target
    fold = c != 1.0 or c_out != 1.0 or bool(cfg.b_dec_to_input) != b_dec_to_input
    w_enc, b_enc, w_dec, b_dec = (
        p.detach().cpu().double() if fold else p.detach().cpu() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    )
    r_mag = b_mag = None
    if cfg.arch == "gated":  # π_mag = exp(r_mag)·W(c·x − b_dec) + b_mag: the same folds, its bias shift scaled
        r_mag, b_mag = (getattr(sae, n).detach().cpu() for n in ("r_mag", "b_mag"))
        if fold:
            r_mag, b_mag = r_mag.double(), b_mag.double()
    # pre = W(c·x − b_dec) + b_enc = cW(x − b_dec/c) + b_enc; without b_dec on the input the bias moves.
    if bool(cfg.b_dec_to_input) != b_dec_to_input:
        shift = w_enc @ b_dec if cfg.b_dec_to_input else -(w_enc @ b_dec)
        b_enc = b_enc - shift
        if b_mag is not None and r_mag is not None:
            b_mag = b_mag - shift * r_mag.exp()
    threshold = None
    if cfg.arch == "jumprelu":
        threshold = sae.log_threshold.detach().cpu().float().exp()  # exactly what monoscope compares with
    elif cfg.arch in THRESHOLD_STYLE:
        t = sae.threshold.detach().cpu().float()  # type: ignore[union-attr]
        if not bool(torch.isfinite(t)):
            raise InteropError(
                f"this {cfg.arch} SAE has no inference threshold (it was never trained): train it first; "
                "an untrained threshold cannot be exported"
            )
        threshold = t
    if c != 1.0 or c_out != 1.0:
        w_enc, w_dec, b_dec = w_enc * c, w_dec / c_out, b_dec / c_out
    notes: dict[str, Any] = {"normaliser_folded": c} if c != 1.0 else {}
    if cfg.arch == "transcoder" and c_out != 1.0:
        notes["target_normaliser_folded"] = c_out
    return RawSAE(
        arch=cfg.arch,
        W_enc=w_enc,
        b_enc=b_enc,
        W_dec=w_dec,
        b_dec=b_dec,
        b_dec_to_input=b_dec_to_input,
        k=cfg.k,
        threshold=threshold,
        prefixes=list(cfg.prefixes) if cfg.prefixes is not None else None,
        r_mag=r_mag,
        b_mag=b_mag,
        normaliser=1.0,
        target_hook=cfg.target_hook,
        hook=cfg.hook,
        model=cfg.model,
        notes=notes,
    )


def import_dtype(tensors: dict[str, Tensor], transformed: bool) -> str:
    """bfloat16 when every weight is bf16 and no fold touched them (lossless); float32 otherwise
    (float16 widens exactly; float64 rounds to float32, monoscope's widest parameter dtype)."""
    if not transformed and tensors and all(t.dtype == torch.bfloat16 for t in tensors.values()):
        return "bfloat16"
    return "float32"


# ----------------------------------------------------------------------------- files


def read_cfg(folder: Path, what: str) -> dict[str, Any]:
    """The folder's cfg.json as a dict; a missing or malformed file is one line naming it."""
    path = folder / CFG_NAME
    if not path.is_file():
        raise InteropError(f"{path} is missing: {folder} is not a {what} SAE folder")
    return read_json_object(path)


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InteropError(f"{path} is not valid JSON ({e}): restore it or re-save the SAE") from e
    if not isinstance(data, dict):
        raise InteropError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise InteropError(f"SAE weights {path} are missing: the folder is incomplete")
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises several types for a damaged file
        raise InteropError(f"SAE weights {path} cannot be read as safetensors: {e}") from e
    from monoscope.sae.io import check_finite_weights

    check_finite_weights(tensors, path)
    return tensors


def check_keys(tensors: dict[str, Tensor], required: set[str], optional: set[str], path: Path, what: str) -> None:
    missing = sorted(required - set(tensors))
    unexpected = sorted(set(tensors) - required - optional)
    if missing or unexpected:
        raise InteropError(
            f"{path} does not hold a {what}: missing tensors {missing}, unexpected {unexpected}; "
            "the weights and cfg.json do not belong together, or the SAE uses a variant monoscope cannot represent"
        )


def check_shape(t: Tensor, name: str, shape: tuple[int, ...], path: Path, dims: str) -> None:
    if tuple(t.shape) != shape:
        raise InteropError(
            f"{path}: tensor {name} has shape {list(t.shape)} but cfg.json ({dims}) implies {list(shape)}: "
            "the config and the weights do not belong together"
        )


def cfg_int(cfg: dict[str, Any], key: str, path: Path, *, required: bool = True, lo: int = 1) -> int | None:
    """An integer field of a peer cfg.json (a float with an integral value is accepted)."""
    value = cfg.get(key)
    if value is None:
        if required:
            raise InteropError(f"{path}: {key!r} is missing: it must be an integer >= {lo}")
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InteropError(f"{path}: {key}={value!r} must be an integer >= {lo}")
    return value


def prepare_out(folder: Path, own: tuple[str, ...], overwrite: bool) -> None:
    """Create `folder` for a new SAE. An SAE already there (any format) is an error unless
    `overwrite`, which also removes the other formats' files so the folder stays unambiguous."""
    if folder.exists() and not folder.is_dir():
        raise InteropError(f"cannot write an SAE to {folder}: it is a file; give a folder path")
    present = [n for n in ALL_SAE_FILES if (folder / n).exists()]
    if present and not overwrite:
        raise InteropError(
            f"{folder} already holds an SAE ({', '.join(present)}): pass overwrite=True (--overwrite) to replace "
            "it, or choose another folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for name in present:
        if name not in own:
            (folder / name).unlink()


def write_sae_files(folder: Path, weights_name: str, tensors: dict[str, Tensor], cfg: dict[str, Any]) -> None:
    """Weights first, cfg.json last, each atomically: an interrupted write never leaves a cfg.json
    that points at half a weights file."""
    data = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    write_bytes_atomic(folder / weights_name, data)
    write_json_atomic(folder / CFG_NAME, cfg)


def writer_stamp() -> str:
    return f"monoscope {monoscope.__version__}"


# ----------------------------------------------------------------------------- hook names

_KIND_TO_TL = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post",
               "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}
_TL_TO_KIND = {v: k for k, v in _KIND_TO_TL.items()}
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out)$")
_MONO_HOOK = re.compile(r"^(resid_pre|resid_post|attn_out|mlp_out)\.(\d+)$")
# A decoder block's module path in a Hugging Face model: its output is the residual stream after it.
_HF_BLOCK = re.compile(
    r"^(?:model\.(?:language_model\.)?layers|model\.decoder\.layers|gpt_neox\.layers|transformer\.h|layers|h)\.(\d+)$"
)


def hook_from_transformer_lens(name: str | None) -> str | None:
    """TransformerLens hook name -> monoscope's (`blocks.3.hook_resid_post` -> `resid_post.3`).

    TransformerLens's attn_out/mlp_out are the terms added to the residual stream (after Gemma's
    post-norms), as monoscope's are. Other hooks keep their name verbatim, so `check_compatible`
    refuses to pair them with a monoscope hook rather than passing an unchecked SAE."""
    if not name:
        return None
    m = _TL_HOOK.match(name)
    return f"{_TL_TO_KIND[m.group(2)]}.{m.group(1)}" if m else name


def hook_to_transformer_lens(hook: str | None) -> str | None:
    if hook is None:
        return None
    m = _MONO_HOOK.match(hook)
    return f"blocks.{m.group(2)}.{_KIND_TO_TL[m.group(1)]}" if m else hook


def hook_from_module_path(name: str) -> str | None:
    """A Hugging Face module path (sparsify's hookpoint) -> monoscope's hook: a block's output is
    `resid_post.L`; any other module keeps its path verbatim."""
    m = _HF_BLOCK.match(name)
    return f"resid_post.{m.group(1)}" if m else name


def hook_to_module_path(hook: str | None) -> str | None:
    """monoscope's `resid_post.L` -> sparsify's hookpoint `layers.L` (the only hook both name)."""
    if hook is None:
        return None
    m = _MONO_HOOK.match(hook)
    return f"layers.{m.group(2)}" if m and m.group(1) == "resid_post" else None


def model_id(name: Any) -> str | None:
    """A peer's model name as monoscope's `cfg.model`, only when it is a Hugging Face id or a path
    (has a '/'): TransformerLens aliases such as 'gpt2-small' name no model monoscope loads, and
    `check_compatible` would refuse every real id against them."""
    return name if isinstance(name, str) and "/" in name.strip() else None
