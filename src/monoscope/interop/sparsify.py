"""EleutherAI sparsify's SAE folder: `cfg.json` + `sae.safetensors`, usually one folder per hookpoint
under a training run's folder (`<run>/layers.6/`, with the run's `config.json` beside them).

Weights: encoder.weight [latents, d_in] (monoscope's W_enc), encoder.bias [latents], W_dec
[latents, d_in], b_dec [d_in], W_skip [d_in, d_in] with a skip connection. sparsify computes
`f = topk(ReLU(encoder(x − b_dec)))`, `x̂ = f W_dec + b_dec`: monoscope's topk with b_dec on the input
and normaliser 1.0 (sparsify has no input scaling).

cfg.json keys: d_in, k, num_latents (0: expansion_factor·d_in), activation ('topk' | 'groupmax'),
normalize_decoder, multi_topk, skip_connection, transcode.

Import: only activation 'topk' (a missing key is 'topk': sparsify had no other activation before
groupmax, and its config defaults to it) with k present. Refused, naming the field: groupmax (a max
per group of latents, not a top-k) and a skip connection with non-zero W_skip (x̂ has a dense linear
term monoscope lacks). `transcode=true` (sparsify's TopK transcoder: `f = topk(ReLU(encoder(x)))` with no
b_dec on the input, `ŷ = f W_dec + b_dec` predicting the module's output) is monoscope's transcoder with
both scales 1; a hookpoint `layers.L.mlp` gives hooks `mlp_in.L` -> `mlp_out.L` (any other: no hooks).
multi_topk is a training loss only and normalize_decoder a training constraint: both are ignored
for inference and noted in the provenance. Unknown keys that are set (truthy) are refused, since
they may change the encoder; unknown keys left false/0/empty are accepted.

Export: topk, and transcoder (as `transcode=true`, `normalize_decoder=false`, both scales folded in; its
hookpoint `layers.L.mlp`). relu-l1, jumprelu and batchtopk (whose inference is a threshold, not a per-token
top-k) are refused. The normaliser is folded in, and a monoscope SAE without b_dec on the input
gets b_enc + W_enc·b_dec, the same pre-activations with sparsify's subtraction.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from monoscope.interop.common import (
    CFG_NAME,
    SPARSIFY_WEIGHTS,
    InteropError,
    RawSAE,
    cfg_int,
    check_keys,
    check_shape,
    from_monoscope,
    hook_from_module_path,
    hook_to_module_path,
    import_dtype,
    model_id,
    prepare_out,
    read_cfg,
    read_weights,
    write_sae_files,
)
from monoscope.sae import SAE

_KNOWN_KEYS = {"d_in", "k", "num_latents", "expansion_factor", "activation", "normalize_decoder",
               "multi_topk", "skip_connection", "transcode"}
RUN_CONFIG = "config.json"


def read_sparsify(folder: Path) -> tuple[RawSAE, dict[str, Any]]:
    """Parse a sparsify SAE folder (one hookpoint) into a RawSAE and the facts about its origin."""
    cfg = read_cfg(folder, "sparsify")
    path = folder / CFG_NAME
    unknown = sorted(k for k, v in cfg.items() if k not in _KNOWN_KEYS and v not in (None, False, 0, "", [], {}))
    if unknown:
        raise InteropError(
            f"{path}: unknown sparsify settings {unknown} are set: this monoscope cannot tell whether they change "
            f"the encoder, so it does not convert the SAE (it knows {sorted(_KNOWN_KEYS)})"
        )
    activation = cfg.get("activation", "topk")
    if activation == "groupmax":
        raise InteropError(
            f"{path}: activation='groupmax' keeps the largest latent of each of k groups, not the k largest "
            "overall: monoscope has no such architecture"
        )
    if activation != "topk":
        raise InteropError(f"{path}: activation={activation!r} is unknown; sparsify's are 'topk' and 'groupmax'")
    transcode = bool(cfg.get("transcode"))
    d_in = cfg_int(cfg, "d_in", path)
    if "k" not in cfg:
        raise InteropError(
            f"{path}: k (active latents per token) is missing: a sparsify SAE is TopK and needs it; add \"k\": N"
        )
    k = cfg_int(cfg, "k", path)
    assert d_in is not None and k is not None
    num_latents = cfg_int(cfg, "num_latents", path, required=False, lo=0) or 0
    if num_latents == 0:
        factor = cfg_int(cfg, "expansion_factor", path, required=False)
        if factor is None:
            raise InteropError(f"{path}: neither num_latents nor expansion_factor gives the number of latents")
        num_latents = factor * d_in
    if k > num_latents:
        raise InteropError(f"{path}: k={k} is more than the {num_latents} latents")

    wpath = folder / SPARSIFY_WEIGHTS
    tensors = read_weights(wpath)
    if "W_dec" not in tensors:
        raise InteropError(f"{wpath} has no W_dec: it was saved without a decoder, so it cannot reconstruct")
    check_keys(tensors, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, {"W_skip"}, wpath, "sparsify SAE")
    dims = f"d_in={d_in}, latents={num_latents}"
    check_shape(tensors["encoder.weight"], "encoder.weight", (num_latents, d_in), wpath, dims)
    check_shape(tensors["encoder.bias"], "encoder.bias", (num_latents,), wpath, dims)
    check_shape(tensors["W_dec"], "W_dec", (num_latents, d_in), wpath, dims)
    check_shape(tensors["b_dec"], "b_dec", (d_in,), wpath, dims)
    if "W_skip" in tensors:
        check_shape(tensors["W_skip"], "W_skip", (d_in, d_in), wpath, dims)
        if bool(tensors["W_skip"].any()):
            raise InteropError(
                f"{wpath}: skip_connection with a non-zero W_skip adds a dense linear map of the input to the "
                "reconstruction; monoscope's SAEs have none"
            )
    elif cfg.get("skip_connection"):
        raise InteropError(f"{path}: skip_connection=true but {wpath.name} has no W_skip")

    notes: dict[str, Any] = {}
    if cfg.get("multi_topk"):
        notes["multi_topk"] = "training loss only; inference uses k"
    if cfg.get("normalize_decoder") is False:
        notes["normalize_decoder"] = False
    if "W_skip" in tensors:
        notes["W_skip"] = "all zeros, dropped"
    weights = {n: tensors[n] for n in ("encoder.weight", "encoder.bias", "W_dec", "b_dec")}
    hookpoint, model = _run_context(folder)
    hook = hook_from_module_path(hookpoint) if hookpoint else None
    target = None
    if transcode:  # what an MLP module reads and adds: mlp_in.L -> mlp_out.L; another module: not a hook we have
        mlp = re.fullmatch(r"(?:.*\.)?(?:layers|h)\.(\d+)\.mlp", hookpoint or "")
        hook, target = (f"mlp_in.{mlp.group(1)}", f"mlp_out.{mlp.group(1)}") if mlp else (None, None)
        notes["transcode"] = f"sparsify transcoder at {hookpoint!r}" if hookpoint else "sparsify transcoder"
    raw = RawSAE(
        arch="transcoder" if transcode else "topk",
        W_enc=tensors["encoder.weight"],
        b_enc=tensors["encoder.bias"],
        W_dec=tensors["W_dec"],
        b_dec=tensors["b_dec"],
        b_dec_to_input=not transcode,
        k=k,
        normaliser=1.0,
        target_hook=target,
        hook=hook,
        model=model_id(model),
        dtype=import_dtype(weights, False),
        notes=notes,
    )
    origin = {"format": "sparsify", "hookpoint": hookpoint, "model": model, **notes}
    return raw, origin


def write_sparsify(sae: SAE, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write a topk `sae` as a sparsify folder whose `SparseCoder.load_from_disk(folder)` encodes raw
    activations to the same top-k latents as `sae.encode_raw` (float32 weights)."""
    folder = Path(folder)
    cfg = sae.cfg
    if cfg.arch not in ("topk", "transcoder"):
        why = {
            "relu-l1": "a ReLU SAE has no fixed number of active latents",
            "jumprelu": "a JumpReLU SAE keeps latents above per-latent thresholds",
            "batchtopk": "a BatchTopK SAE keeps latents above one global threshold at inference",
            "matryoshka": "a Matryoshka SAE keeps latents above one global threshold at inference",
            "gated": "a gated SAE has no fixed number of active latents",
            "crosscoder": "a crosscoder reads several hooks at once; sparsify has no crosscoder",
        }[cfg.arch]
        raise InteropError(
            f"architecture {cfg.arch!r} cannot be written for sparsify, whose SAEs keep exactly k latents per token "
            f"({why}); export it to SAELens instead, or train a topk SAE"
        )
    transcode = cfg.arch == "transcoder"
    raw = from_monoscope(sae, b_dec_to_input=not transcode)
    norms = raw.W_dec.double().norm(dim=1)
    unit = bool(torch.allclose(norms, torch.ones_like(norms), rtol=0, atol=1e-4))
    tensors: dict[str, Tensor] = {
        "encoder.weight": raw.W_enc.float(),
        "encoder.bias": raw.b_enc.float(),
        "W_dec": raw.W_dec.float(),
        "b_dec": raw.b_dec.float(),
    }
    out = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.d_sae // cfg.d_in),  # informational: num_latents takes precedence
        # sparsify renormalises the decoder while training when true; after folding a normaliser the
        # rows are 1/c long, and saying true would make fine-tuning change the SAE.
        "normalize_decoder": unit and not transcode,  # sparsify never normalises a transcoder's decoder
        "num_latents": cfg.d_sae,
        "k": int(cfg.k),  # type: ignore[arg-type]
        "multi_topk": False,
        "skip_connection": False,
        "transcode": transcode,
        "d_in": cfg.d_in,
    }
    prepare_out(folder, (CFG_NAME, SPARSIFY_WEIGHTS), overwrite)
    write_sae_files(folder, SPARSIFY_WEIGHTS, tensors, out)
    return folder


def suggested_hookpoint(sae: SAE) -> str | None:
    """The folder name sparsify's `load_many` would give this SAE (`layers.L` for `resid_post.L`, `layers.L.mlp`
    for a transcoder of `mlp_in.L` -> `mlp_out.L`)."""
    if sae.cfg.arch == "transcoder":
        m = re.fullmatch(r"mlp_in\.(\d+)", sae.cfg.hook or "")
        return f"layers.{m.group(1)}.mlp" if m and sae.cfg.target_hook == f"mlp_out.{m.group(1)}" else None
    return hook_to_module_path(sae.cfg.hook)


def _run_context(folder: Path) -> tuple[str | None, str | None]:
    """(hookpoint, model) from sparsify's layout: the SAE folder is named after its hookpoint and the
    run folder above it holds the run's `config.json` (with `model` when run from the CLI)."""
    run_cfg: dict[str, Any] = {}
    parent_cfg = folder.parent / RUN_CONFIG
    if parent_cfg.is_file():
        try:
            data = json.loads(parent_cfg.read_text(encoding="utf-8"))
            run_cfg = data if isinstance(data, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            run_cfg = {}
    name = folder.resolve().name
    hookpoints = run_cfg.get("hookpoints")
    in_run = isinstance(hookpoints, list) and name in hookpoints
    hook = name if in_run or hook_from_module_path(name) != name else None
    model = run_cfg.get("model") if isinstance(run_cfg.get("model"), str) else None
    return hook, model
