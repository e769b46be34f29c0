"""SAELens's SAE folder: `cfg.json` + `sae_weights.safetensors` (read from SAELens 6 and its older
layout, written in SAELens 6's layout).

Weights: W_enc [d_in, d_sae] (the transpose of monoscope's), b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in], plus `threshold` [d_sae] for JumpReLU. SAELens computes
`pre = (x − b_dec·apply_b_dec_to_input) @ W_enc + b_enc`, as monoscope does with `b_dec_to_input`.

Architectures, import (SAELens -> monoscope):
    standard                 -> relu-l1
    topk                     -> topk (k required; rescale_acts_by_decoder_norm folded into the weights)
    jumprelu                 -> jumprelu (θ ≤ 0 acts as θ = 0; a 'batchtopk'-trained one with a uniform θ
                                -> batchtopk, which is what SAELens saved it from)
    batchtopk                -> batchtopk (a SAELens training checkpoint: topk_threshold is θ)
    matryoshka_batchtopk     -> matryoshka (a training checkpoint: topk_threshold is θ, matryoshka_widths
                                the prefixes); a 'jumprelu' saved from one (uniform θ, training details
                                with k and matryoshka_widths) -> matryoshka too
    gated                    -> gated (b_gate is monoscope's b_enc; r_mag, b_mag as they are)
    anything else            -> an error naming it (abstopk, transcoders, temporal, ...)
export (monoscope -> SAELens): relu-l1 -> standard, topk -> topk, jumprelu -> jumprelu, gated -> gated,
batchtopk and matryoshka -> jumprelu with a uniform threshold θ (SAELens's own inference form of both)
and `metadata.training_architecture` = "batchtopk" / "matryoshka_batchtopk" (with k and, for
matryoshka, matryoshka_widths), so importing it again gives the same architecture back. SAELens has
no inference class for matryoshka: its `SAE.load_from_disk` loads the export as the JumpReLU it is.

Normalisation: `normalize_activations = "none"` -> normaliser 1.0; "expected_average_only_in"
(SAELens scaled its inputs by a constant during training and did not fold it, e.g. a checkpoint)
-> the `scaling_factor` of the `activation_scaler.json` SAELens writes beside it, and an error
without one, since SAELens itself would then run the SAE on unscaled inputs. Per-token
normalisations (layer_norm, constant_norm_rescale) and unfolded whitening have no monoscope
equivalent and are refused. Exports fold monoscope's normaliser into the weights and write "none".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from monoscope.interop.common import (
    CFG_NAME,
    SAELENS_WEIGHTS,
    InteropError,
    RawSAE,
    cfg_int,
    check_keys,
    check_shape,
    from_monoscope,
    hook_from_transformer_lens,
    hook_to_transformer_lens,
    import_dtype,
    model_id,
    prepare_out,
    read_cfg,
    read_json_object,
    read_weights,
    write_sae_files,
    writer_stamp,
)
from monoscope.sae import SAE

SCALER_NAME = "activation_scaler.json"
_ARCH_FROM_SAELENS = {"standard": "relu-l1", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk",
                      "matryoshka_batchtopk": "matryoshka", "gated": "gated"}
_ARCH_TO_SAELENS = {"relu-l1": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                    "matryoshka": "jumprelu", "gated": "gated"}
NO_SAELENS = {
    "transcoder": "architecture 'transcoder' cannot be written for SAELens: sae-lens 6 has ReLU, JumpReLU and skip "
                  "transcoders but no TopK one (checked on 6.54), so its encoder would keep other latents; export it "
                  "for sparsify (--to sparsify), whose transcoders are TopK",
    "crosscoder": "architecture 'crosscoder' cannot be written for SAELens: sae-lens 6 has no crosscoder (checked on "
                  "6.54); keep the monoscope folder",
}
# The cfg.json layout written here is SAELens 6's; older versions are read through their own layout.
FORMAT_VERSION = "6.0.0"


def read_saelens(folder: Path) -> tuple[RawSAE, dict[str, Any]]:
    """Parse a SAELens folder into a RawSAE and the facts about its origin (for the provenance)."""
    cfg = read_cfg(folder, "SAELens")
    path = folder / CFG_NAME
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = meta.get("sae_lens_version") or cfg.get("sae_lens_version")
    legacy = not _is_v6(version)

    arch_src = _architecture(cfg, path, legacy)
    arch = _ARCH_FROM_SAELENS.get(arch_src)
    if arch is None:
        raise InteropError(
            f"{path}: SAELens architecture {arch_src!r} has no monoscope equivalent; monoscope reads "
            f"{sorted(_ARCH_FROM_SAELENS)}"
        )
    d_in = cfg_int(cfg, "d_in", path)
    d_sae = cfg_int(cfg, "d_sae", path)
    assert d_in is not None and d_sae is not None

    reshape = cfg.get("reshape_activations", "none")
    if reshape not in (None, "none"):
        raise InteropError(
            f"{path}: reshape_activations={reshape!r}: this SAE reads per-head attention outputs reshaped from "
            "[..., n_heads, d_head], a hook monoscope does not provide"
        )
    normaliser = _normaliser(cfg, folder, path)
    b_dec_to_input = cfg.get("apply_b_dec_to_input", True)  # SAELens's default, in every version
    if not isinstance(b_dec_to_input, bool):
        raise InteropError(f"{path}: apply_b_dec_to_input={b_dec_to_input!r} must be true or false")

    wpath = folder / SAELENS_WEIGHTS
    tensors = read_weights(wpath)
    notes: dict[str, Any] = {}
    required = {"W_enc", "b_enc", "W_dec", "b_dec"}
    optional = {"scaling_factor", "finetuning_scaling_factor"}
    if arch == "jumprelu":
        optional |= {"threshold", "log_threshold"}
    if arch in ("batchtopk", "matryoshka"):
        required.add("topk_threshold")
    if arch == "gated":
        required = (required - {"b_enc"}) | {"b_gate", "b_mag", "r_mag"}
    check_keys(tensors, required, optional, wpath, f"SAELens {arch_src} SAE")
    dims = f"d_in={d_in}, d_sae={d_sae}"
    check_shape(tensors["W_enc"], "W_enc", (d_in, d_sae), wpath, dims)
    check_shape(tensors["W_dec"], "W_dec", (d_sae, d_in), wpath, dims)
    b_name = "b_gate" if arch == "gated" else "b_enc"
    per_feature = [b_name, *(("r_mag", "b_mag") if arch == "gated" else ())]
    for name in per_feature:
        check_shape(tensors[name], name, (d_sae,), wpath, dims)
    check_shape(tensors["b_dec"], "b_dec", (d_in,), wpath, dims)
    weights = {n: tensors[n] for n in ("W_enc", "W_dec", "b_dec", *per_feature)}
    w_enc = tensors["W_enc"].t()  # -> [d_sae, d_in]
    b_enc, w_dec, b_dec = tensors[b_name], tensors["W_dec"], tensors["b_dec"]
    transformed = False

    scale_name = next((n for n in ("finetuning_scaling_factor", "scaling_factor") if n in tensors), None)
    if scale_name is not None:  # SAELens < 6: features were multiplied by it before the decoder
        s = tensors[scale_name].double()
        check_shape(s, scale_name, (d_sae,), wpath, dims)
        if not torch.all(s == 1):
            if not cfg.get("finetuning_scaling_factor"):
                raise InteropError(
                    f"{wpath}: {scale_name} is not all ones but cfg.json has finetuning_scaling_factor=false, so it "
                    "is unclear whether the decoder applies it (SAELens refuses this file too)"
                )
            w_dec = w_dec.double() * s[:, None]  # (f·s) W_dec = f (s·W_dec)
            transformed = True
            notes["finetuning_scaling_factor_folded"] = True

    k: int | None = None
    threshold: Tensor | None = None
    prefixes: list[int] | None = None
    if arch == "matryoshka":
        prefixes = _widths(cfg.get("matryoshka_widths"), path, d_sae)
    if arch in ("topk", "batchtopk", "matryoshka"):
        k = _k(cfg, path, arch_src, d_sae)
        if cfg.get("rescale_acts_by_decoder_norm", False):
            # SAELens: f = topk(pre·‖W_dec_i‖), x̂ = (f/‖W_dec_i‖) W_dec. Scaling encoder row i by
            # ‖W_dec_i‖ and decoder row i by its inverse computes the same f and x̂.
            w_enc, b_enc, w_dec = w_enc.double(), b_enc.double(), w_dec.double()
            norms = w_dec.norm(dim=1)
            if bool((norms == 0).any()):
                bad = int((norms == 0).nonzero()[0, 0])
                raise InteropError(
                    f"{wpath}: W_dec row {bad} is zero with rescale_acts_by_decoder_norm=true: SAELens divides "
                    "by it (NaN), so the SAE has no well-defined output to convert"
                )
            w_enc, b_enc, w_dec = w_enc * norms[:, None], b_enc * norms, w_dec / norms[:, None]
            transformed = True
            notes["rescale_acts_by_decoder_norm_folded"] = True
    if arch in ("batchtopk", "matryoshka"):
        t = tensors["topk_threshold"]
        check_shape(t, "topk_threshold", (), wpath, dims)
        threshold = t.float()
    if arch == "jumprelu":
        if "threshold" in tensors:
            threshold = tensors["threshold"].float()
            name = "threshold"
        elif "log_threshold" in tensors:  # older SAELens training checkpoints
            threshold = tensors["log_threshold"].double().exp().float()
            name = "log_threshold"
        else:
            raise InteropError(f"{wpath}: a jumprelu SAE needs a 'threshold' tensor [d_sae={d_sae}]; it has none")
        check_shape(threshold, name, (d_sae,), wpath, dims)
        trained_as = meta.get("training_architecture")
        details = meta.get("training_architecture_details")
        k_trained = details.get("k") if isinstance(details, dict) else None
        if (
            trained_as in ("batchtopk", "matryoshka_batchtopk")
            and isinstance(k_trained, (int, float))
            and not isinstance(k_trained, bool)
            and float(k_trained).is_integer()
            and 1 <= k_trained <= d_sae
            and bool(torch.all(threshold == threshold[0]))
            and float(threshold[0]) >= 0
        ):
            arch, k, threshold = _ARCH_FROM_SAELENS[trained_as], int(k_trained), threshold[0].clone()
            notes["saved_as"] = f"jumprelu with a uniform threshold (SAELens's inference form of {trained_as})"
            if arch == "matryoshka":
                prefixes = _widths(details.get("matryoshka_widths") if isinstance(details, dict) else None, path,
                                   d_sae)

    hook_src = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    model_src = meta.get("model_name") or cfg.get("model_name")
    head = meta.get("hook_head_index", cfg.get("hook_head_index"))
    if isinstance(hook_src, str) and head is not None:  # one head's slice: no monoscope hook reads it
        hook_src = f"{hook_src}[head {head}]"
    raw = RawSAE(
        arch=arch,
        W_enc=w_enc,
        b_enc=b_enc,
        W_dec=w_dec,
        b_dec=b_dec,
        b_dec_to_input=b_dec_to_input,
        k=k,
        threshold=threshold,
        prefixes=prefixes,
        r_mag=tensors["r_mag"] if arch == "gated" else None,
        b_mag=tensors["b_mag"] if arch == "gated" else None,
        normaliser=normaliser,
        hook=hook_from_transformer_lens(hook_src) if isinstance(hook_src, str) else None,
        model=model_id(model_src),
        dtype=import_dtype(weights, transformed),
        notes=notes,
    )
    origin = {
        "format": "saelens",
        "sae_lens_version": version,
        "architecture": arch_src,
        "hook_name": hook_src,
        "model_name": model_src,
        **notes,
    }
    if normaliser != 1.0:
        origin["scaling_factor"] = normaliser
    return raw, origin


def write_saelens(sae: SAE, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write `sae` as a SAELens folder whose `SAE.load_from_disk(folder).encode(x_raw)` equals
    `sae.encode_raw(x_raw)` (float32 weights, monoscope's normaliser folded in)."""
    folder = Path(folder)
    cfg = sae.cfg
    if cfg.arch not in _ARCH_TO_SAELENS:
        raise InteropError(NO_SAELENS[cfg.arch])
    arch = _ARCH_TO_SAELENS[cfg.arch]
    raw = from_monoscope(sae, b_dec_to_input=bool(cfg.b_dec_to_input))
    tensors: dict[str, Tensor] = {
        "W_enc": raw.W_enc.t().float().contiguous(),  # [d_in, d_sae]
        "b_gate" if cfg.arch == "gated" else "b_enc": raw.b_enc.float(),
        "W_dec": raw.W_dec.float(),
        "b_dec": raw.b_dec.float(),
    }
    if cfg.arch == "gated":
        assert raw.r_mag is not None and raw.b_mag is not None
        tensors["r_mag"], tensors["b_mag"] = raw.r_mag.float(), raw.b_mag.float()
    metadata: dict[str, Any] = {"sae_lens_version": FORMAT_VERSION, "written_by": writer_stamp()}
    hook_name = hook_to_transformer_lens(cfg.hook)
    if hook_name is not None:
        metadata["hook_name"] = hook_name
    if cfg.model is not None:
        metadata["model_name"] = cfg.model
    if cfg.normaliser != 1.0:
        metadata["monoscope_normaliser_folded"] = float(cfg.normaliser)
    out: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cfg.arch == "topk":
        out["k"] = int(cfg.k)  # type: ignore[arg-type]
        out["rescale_acts_by_decoder_norm"] = False
    elif cfg.arch == "jumprelu":
        tensors["threshold"] = raw.threshold.float()  # type: ignore[union-attr]
    elif cfg.arch in ("batchtopk", "matryoshka"):
        tensors["threshold"] = raw.threshold.float().expand(cfg.d_sae).clone()  # type: ignore[union-attr]
        metadata["training_architecture"] = "batchtopk" if cfg.arch == "batchtopk" else "matryoshka_batchtopk"
        metadata["training_architecture_details"] = {
            "k": int(cfg.k),  # type: ignore[arg-type]
            "topk_threshold_lr": cfg.threshold_ema,
            "rescale_acts_by_decoder_norm": False,
        }
        if cfg.arch == "matryoshka":
            metadata["training_architecture_details"]["matryoshka_widths"] = list(cfg.prefixes or [])
    out["metadata"] = metadata
    prepare_out(folder, (CFG_NAME, SAELENS_WEIGHTS), overwrite)
    write_sae_files(folder, SAELENS_WEIGHTS, tensors, out)
    return folder


# ----------------------------------------------------------------------------- helpers


def _is_v6(version: Any) -> bool:
    if not isinstance(version, str):
        return False
    head = version.strip().lstrip("v").split(".", 1)[0]
    return head.isdigit() and int(head) >= 6


def _architecture(cfg: dict[str, Any], path: Path, legacy: bool) -> str:
    """The SAELens architecture, never defaulted: a topk SAE must not load as standard (SAELens #553)."""
    arch = cfg.get("architecture")
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str")
    if arch in (None, ""):
        if legacy and act == "topk":
            return "topk"
        hint = ""
        if legacy and act in ("relu", None):
            hint = ' (if it is a plain ReLU SAE, add "architecture": "standard" to cfg.json)'
        raise InteropError(
            f"{path} names no architecture: monoscope never guesses it, since an SAE loaded as the wrong "
            f"one gives silently wrong features (SAELens #553){hint}"
        )
    if not isinstance(arch, str):
        raise InteropError(f"{path}: architecture={arch!r} must be a string")
    if arch == "standard" and act not in (None, "relu"):
        raise InteropError(
            f"{path}: architecture 'standard' with activation_fn={act!r}: a standard SAE is ReLU; this file is "
            "inconsistent (SAELens #553), fix its architecture"
        )
    return arch


def _k(cfg: dict[str, Any], path: Path, arch: str, d_sae: int) -> int:
    k = cfg.get("k")
    if k is None and isinstance(cfg.get("activation_fn_kwargs"), dict):
        k = cfg["activation_fn_kwargs"].get("k")
    if k is None:
        raise InteropError(
            f"{path}: a {arch} SAE needs k (active features per token) and cfg.json has none; add \"k\": N"
        )
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not float(k).is_integer() or not 1 <= k <= d_sae:
        raise InteropError(f"{path}: k={k!r} must be a whole number from 1 to d_sae={d_sae} for monoscope's {arch}")
    return int(k)


def _widths(widths: Any, path: Path, d_sae: int) -> list[int]:
    """SAELens's matryoshka_widths as monoscope prefixes (checked; SAELens itself appends d_sae when missing)."""
    if not isinstance(widths, list) or not widths or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or not float(w).is_integer() for w in widths):
        raise InteropError(
            f"{path}: a matryoshka SAE needs matryoshka_widths, a list of whole widths; it has {widths!r}"
        )
    out = [int(w) for w in widths]
    if out[-1] != d_sae:  # SAELens adds the full width as the last level
        out.append(d_sae)
    from monoscope.sae.config import SAEConfigError, check_prefixes

    try:
        return check_prefixes(out, d_sae, "matryoshka_widths")
    except SAEConfigError as e:
        raise InteropError(f"{path}: {e}") from None


def _normaliser(cfg: dict[str, Any], folder: Path, path: Path) -> float:
    mode = cfg.get("normalize_activations", "none")
    if isinstance(mode, bool):  # SAELens < 6 wrote a bool for the April-update scaling
        mode = "expected_average_only_in" if mode else "none"
    if mode in (None, "none"):
        return 1.0
    if mode == "expected_average_only_in":
        scaler = folder / SCALER_NAME
        factor = None
        if scaler.is_file():
            data = read_json_object(scaler)
            if data.get("has_whitening"):
                raise InteropError(f"{scaler}: has_whitening=true: unfolded whitening has no monoscope equivalent")
            factor = data.get("scaling_factor")
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 0:
            return float(factor)
        raise InteropError(
            f"{path}: normalize_activations='expected_average_only_in' but no {SCALER_NAME} with a scaling_factor "
            "beside it, so the input scale the weights expect is unknown; fold it first "
            "(sae.fold_activation_norm_scaling_factor(factor) in SAELens, then save_model)"
        )
    why = {
        "layer_norm": "it normalises each token by its own mean and std",
        "constant_norm_rescale": "it rescales each token to norm sqrt(d_in)",
        "covariance_whitening": "the whitening was not folded into the weights",
    }.get(mode, "monoscope does not know it") if isinstance(mode, str) else "it is not a string"
    raise InteropError(
        f"{path}: normalize_activations={mode!r} has no monoscope equivalent ({why}); monoscope reads 'none' "
        "and 'expected_average_only_in' with its activation_scaler.json"
    )

