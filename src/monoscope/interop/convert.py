"""Find out which format an SAE folder is in, load any of them as a monoscope SAE, convert between them.

Detection (never by guessing an architecture, only by the files' own markers):
    cfg.json with "format": "monoscope-sae"        -> monoscope
    cfg.json + sae_weights.safetensors             -> SAELens
    cfg.json + sae.safetensors (no monoscope mark) -> sparsify
    no cfg.json, exactly one subfolder holding one -> that subfolder (sparsify's run folder with one
                                                       hookpoint, or a monoscope run folder's sae/)
A path to cfg.json or a weights file stands for its folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

import torch

from monoscope.interop.common import (
    CFG_NAME,
    SAELENS_WEIGHTS,
    SPARSIFY_WEIGHTS,
    InteropError,
    prepare_out,
    read_cfg,
    to_monoscope,
)
from monoscope.interop.saelens import read_saelens, write_saelens
from monoscope.interop.sparsify import read_sparsify, write_sparsify
from monoscope.sae import SAE, check_compatible, load_sae, save_sae

Format = Literal["monoscope", "saelens", "sparsify"]
FORMATS: tuple[str, ...] = get_args(Format)
_MONOSCOPE_MARK = "monoscope-sae"


def detect_format(path: str | os.PathLike[str]) -> tuple[Format, Path]:
    """(format, SAE folder) for `path`; every failure is one line saying what was expected."""
    folder = Path(path)
    if folder.is_file() and folder.name in (CFG_NAME, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS):
        folder = folder.parent
    if not folder.exists():
        raise InteropError(f"SAE folder {folder} does not exist")
    if not folder.is_dir():
        raise InteropError(f"{folder} is a file, not an SAE folder (pass the folder holding {CFG_NAME})")
    if not (folder / CFG_NAME).is_file():
        subs = sorted(d for d in folder.iterdir() if d.is_dir() and (d / CFG_NAME).is_file())
        if len(subs) == 1:
            return detect_format(subs[0])
        if subs:
            names = ", ".join(d.name for d in subs[:8]) + (", ..." if len(subs) > 8 else "")
            raise InteropError(
                f"{folder} holds {len(subs)} SAEs ({names}): pass one of them, e.g. {subs[0]}"
            )
        raise InteropError(
            f"{folder} holds no SAE: expected {CFG_NAME} with sae.safetensors (monoscope, sparsify) or "
            f"{SAELENS_WEIGHTS} (SAELens), or one subfolder with them (a sparsify run)"
        )
    cfg = read_cfg(folder, "an")
    if cfg.get("format") == _MONOSCOPE_MARK:
        return "monoscope", folder
    has_saelens = (folder / SAELENS_WEIGHTS).is_file()
    has_sparsify = (folder / SPARSIFY_WEIGHTS).is_file()
    if has_saelens and has_sparsify:
        raise InteropError(
            f"{folder} holds both {SAELENS_WEIGHTS} (SAELens) and {SPARSIFY_WEIGHTS} (sparsify): keep the one "
            f"that belongs to its {CFG_NAME}"
        )
    if has_saelens:
        return "saelens", folder
    if has_sparsify:
        return "sparsify", folder
    raise InteropError(
        f"{folder} has {CFG_NAME} but no weights: expected {SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} "
        "(sparsify, monoscope)"
    )


def load_any(
    path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    *,
    d_model: int | None = None,
    hook: str | None = None,
    model: str | None = None,
) -> SAE:
    """A monoscope SAE (eval mode) from a monoscope, SAELens or sparsify folder, so every stage can
    take a peer's SAE. `sae.encode_raw(x)` gives the same feature activations as the peer's own
    encode on raw activations x. d_model, hook, model: checked with `check_compatible` when given
    (a d_in that differs from the model's width is an error, never a silent fallback)."""
    fmt, folder = detect_format(path)
    if fmt == "monoscope":
        sae = load_sae(folder)
    else:
        raw, origin = read_saelens(folder) if fmt == "saelens" else read_sparsify(folder)
        origin = {"path": str(folder.resolve()), **{k: v for k, v in origin.items() if v is not None}}
        sae = to_monoscope(raw, {"imported_from": origin})
    check_compatible(sae, d_model=d_model, hook=hook, model=model)
    if device is not None:
        from monoscope.devices import resolve_device

        sae = sae.to(resolve_device(str(device)))
    return sae


def convert(
    src: str | os.PathLike[str],
    to: str,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Read the SAE at `src` (any format, detected) and write it to the folder `out` in format `to`
    ('saelens', 'sparsify' or 'monoscope'); returns `out`. What a format cannot represent
    faithfully is an error naming the field, before anything is written."""
    return convert_sae(src, to, out, overwrite=overwrite)[0]


def convert_sae(
    src: str | os.PathLike[str], to: str, out: str | os.PathLike[str], *, overwrite: bool = False
) -> tuple[Path, SAE, Format]:
    """`convert`, also returning the SAE that was written and the source's format (for reports)."""
    if to not in FORMATS:
        raise InteropError(f"unknown target format {to!r}: use one of {list(FORMATS)}")
    src_fmt, src_folder = detect_format(src)
    out_folder = Path(out)
    if out_folder.exists() and out_folder.resolve() == src_folder.resolve():
        raise InteropError(f"--out {out_folder} is the source folder: write the converted SAE to another folder")
    sae = load_any(src_folder)
    if to == "saelens":
        written = write_saelens(sae, out_folder, overwrite=overwrite)
    elif to == "sparsify":
        written = write_sparsify(sae, out_folder, overwrite=overwrite)
    else:
        prepare_out(out_folder, (CFG_NAME, SPARSIFY_WEIGHTS), overwrite)
        written = save_sae(sae, out_folder, overwrite=overwrite)
    return written, sae, src_fmt
