"""monoscope's SAE folder format: `cfg.json` + `sae.safetensors`, checksummed, written atomically.

cfg.json (format_version 1):
    {"format": "monoscope-sae", "format_version": 1,
     "architecture": "topk",                       # required; never guessed (SAELens #553)
     "d_in": 576, "d_sae": 9216, "k": 32, ...,     # every other SAEConfig field, by name
     "weights": {"file": "sae.safetensors", "sha256": "<hex>", "bytes": 42467448},
     "provenance": {...},                          # free dict from the caller (run, data, steps)
     "written_by": {"monoscope": "0.1.0", "torch": "2.13.0"}}
sae.safetensors: the module's state_dict: W_enc [d_sae, d_in], b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in], plus log_threshold [d_sae] (jumprelu), threshold [] (batchtopk, matryoshka) or r_mag and
b_mag [d_sae] (gated), in `cfg.dtype`
(thresholds always float32).

Each file is written to a temporary name in the target folder, fsynced, then renamed over the
final name; the weights go first and cfg.json (which holds their digest) last, so a crash leaves
either the old SAE, or a digest mismatch that `load_sae` reports, never a silently truncated file.
Other files in the folder (a run's JSON, say) are left alone.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

import monoscope
from monoscope.errors import MonoscopeError
from monoscope.fileio import fsync_dir, fsync_file, sha256_file, write_bytes_atomic
from monoscope.sae.base import SAE
from monoscope.sae.config import ARCHITECTURES, THRESHOLD_STYLE, SAEConfig
from monoscope.sae.registry import SAE_CLASSES

FORMAT = "monoscope-sae"
FORMAT_VERSION = 1
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"
_META_KEYS = ("format", "format_version", "architecture", "weights", "provenance", "written_by")


class SAEFileError(MonoscopeError):
    """An SAE folder is missing, corrupt, of another format, or does not fit its config."""


def save_sae(
    sae: SAE,
    path: str | os.PathLike[str],
    provenance: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `sae` to the folder `path` (created if needed) and return the folder.

    provenance: JSON-able dict stored in cfg.json (default: `sae.provenance`, which `load_sae`
    fills, so load -> save keeps it). overwrite: replace an SAE already in the folder.
    For batchtopk, the trained inference threshold is written to cfg.json's `threshold` too.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SAEFileError(f"cannot save an SAE to {folder}: it is a file; give a folder path")
    cfg_path, weights_path = folder / CFG_NAME, folder / WEIGHTS_NAME
    if not overwrite and (cfg_path.exists() or weights_path.exists()):
        raise SAEFileError(
            f"{folder} already holds an SAE ({CFG_NAME} / {WEIGHTS_NAME}): pass overwrite=True to "
            "replace it, or choose another folder"
        )
    prov = dict(sae.provenance if provenance is None else provenance)
    cfg = sae.cfg.to_dict()
    threshold = getattr(sae, "threshold", None)
    if sae.arch in THRESHOLD_STYLE and isinstance(threshold, torch.Tensor) and bool(torch.isfinite(threshold)):
        cfg["threshold"] = float(threshold)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": cfg.pop("arch"),
    }
    meta.update(cfg)
    try:
        json.dumps(prov, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SAEFileError(
            f"provenance for {folder} is not JSON-serialisable ({e}): pass plain str/number/list/dict"
        ) from e

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.state_dict().items()}
    tmp = folder / f".{WEIGHTS_NAME}.{uuid.uuid4().hex}.tmp"
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": FORMAT, "architecture": sae.arch})
        sort_safetensors_header(tmp)
        fsync_file(tmp)
        digest, size = sha256_file(tmp), tmp.stat().st_size
        os.replace(tmp, weights_path)
    finally:
        tmp.unlink(missing_ok=True)
    meta["weights"] = {"file": WEIGHTS_NAME, "sha256": digest, "bytes": size}
    meta["provenance"] = prov
    meta["written_by"] = {"monoscope": monoscope.__version__, "torch": torch.__version__}
    write_bytes_atomic(cfg_path, (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode())
    fsync_dir(folder)
    return folder


def sort_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, in place and at the same length.

    safetensors writes `__metadata__` from a hash map whose order changes from call to call, so two saves
    of the same weights differed in their bytes (and sha256, which cfg.json, eval and the feature database
    key on) whenever the metadata held more than one key. Sorting makes the bytes a function of the weights."""
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = fh.read(n)
        text = json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
        if len(text) > n:  # never grows the header (offsets are relative to its end): leave it as written
            return
        fh.seek(8)
        fh.write(text + b" " * (n - len(text)))


def load_sae(path: str | os.PathLike[str], device: torch.device | str | None = None) -> SAE:
    """Read an SAE folder written by `save_sae`; the SAE comes back in eval mode on `device`
    (default CPU) with `sae.provenance` set. Every problem is a `SAEFileError` naming the file."""
    folder = Path(path)
    if not folder.exists():
        raise SAEFileError(
            f"SAE folder {folder} does not exist: pass the folder holding {CFG_NAME} and {WEIGHTS_NAME} "
            "(what `monoscope train` or save_sae wrote)"
        )
    if not folder.is_dir():
        hint = f" (pass its folder, {folder.parent})" if folder.name in (CFG_NAME, WEIGHTS_NAME) else ""
        raise SAEFileError(f"{folder} is a file, not an SAE folder{hint}")
    meta = read_sae_metadata(folder)
    cfg = config_from_metadata(meta, source=str(folder / CFG_NAME))

    weights = meta.get("weights")
    if not isinstance(weights, dict) or not isinstance(weights.get("sha256"), str):
        raise SAEFileError(f"{folder / CFG_NAME} has no weights.sha256: it is incomplete; re-save the SAE")
    fname = weights.get("file", WEIGHTS_NAME)
    if not isinstance(fname, str) or Path(fname).name != fname or fname in ("", ".", ".."):
        raise SAEFileError(f"{folder / CFG_NAME}: weights.file={fname!r} must be a plain file name in the folder")
    wpath = folder / fname
    if not wpath.is_file():
        raise SAEFileError(f"SAE weights {wpath} are missing: the folder is incomplete; re-save or re-train the SAE")
    expected = weights["sha256"].lower()
    actual = sha256_file(wpath)
    if actual != expected:
        raise SAEFileError(
            f"SAE weights {wpath} are corrupt: sha256 is {actual} but {CFG_NAME} expects {expected} "
            "(the file was changed or truncated); restore it or re-save the SAE"
        )
    try:
        tensors = safetensors.torch.load_file(str(wpath), device="cpu")
    except Exception as e:  # the checksum matched, so this is a file written wrong, not damaged
        raise SAEFileError(f"SAE weights {wpath} cannot be read as safetensors: {e}") from e

    with torch.device("meta"):  # shapes only: no time or memory spent on a random init
        sae = SAE_CLASSES[cfg.arch](cfg)  # type: ignore[call-arg]
    _check_tensors(sae, tensors, wpath, cfg)
    check_finite_weights(tensors, wpath, unset_threshold_ok=cfg.arch in THRESHOLD_STYLE)
    sae.load_state_dict(tensors, strict=True, assign=True)
    threshold = tensors.get("threshold")
    if (
        cfg.arch in THRESHOLD_STYLE
        and threshold is not None
        and cfg.threshold is not None
        and (not torch.isfinite(threshold) or float(threshold) != cfg.threshold)
    ):
        raise SAEFileError(
            f"{folder}: threshold {cfg.threshold!r} in {CFG_NAME} disagrees with {float(threshold)!r} in "
            f"{fname}: re-save the SAE (do not edit one without the other)"
        )
    sae.provenance = dict(meta.get("provenance") or {})
    if device is not None:
        from monoscope.devices import resolve_device

        sae = sae.to(resolve_device(str(device)))
    return sae.eval()


def weights_sha256(path: str | os.PathLike[str]) -> str | None:
    """The weights digest a monoscope SAE folder records in cfg.json; None for a peer's folder (SAELens,
    sparsify), which records none."""
    try:
        return str(read_sae_metadata(path)["weights"]["sha256"])
    except (MonoscopeError, KeyError, TypeError):
        return None


def read_sae_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed cfg.json of an SAE folder, checked to be ours and of a version we read."""
    folder = Path(path)
    cfg_path = folder / CFG_NAME
    if not cfg_path.is_file():
        hint = ""
        if (folder / "sae_weights.safetensors").exists():
            hint = " (this looks like a SAELens folder: import it with the SAELens converter first)"
        raise SAEFileError(f"{cfg_path} is missing: {folder} is not a monoscope SAE folder{hint}")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFileError(f"{cfg_path} is not valid JSON ({e}): restore it or re-save the SAE") from e
    if not isinstance(meta, dict):
        raise SAEFileError(f"{cfg_path} must hold a JSON object, not {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise SAEFileError(
            f"{cfg_path} is not a monoscope SAE config (format={meta.get('format')!r}, expected {FORMAT!r}); "
            "if it is a sparsify or SAELens export, import it with the matching converter"
        )
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise SAEFileError(
            f"{cfg_path} has format_version={version!r}; this monoscope reads 1..{FORMAT_VERSION}: "
            "upgrade monoscope to read SAEs written by a newer version"
        )
    return meta


def config_from_metadata(meta: dict[str, Any], source: str = CFG_NAME) -> SAEConfig:
    """SAEConfig from cfg.json contents; a missing or unknown architecture is an error."""
    arch = meta.get("architecture")
    if arch is None or arch == "":
        raise SAEFileError(
            f"{source} names no architecture: it must be one of {list(ARCHITECTURES)}; monoscope never "
            "guesses it (an SAE loaded with the wrong one gives silently wrong features)"
        )
    if arch not in ARCHITECTURES:
        raise SAEFileError(f"{source}: unknown architecture {arch!r}: this monoscope knows {list(ARCHITECTURES)}")
    fields = {k: v for k, v in meta.items() if k not in _META_KEYS}
    fields["arch"] = arch
    return SAEConfig.from_dict(fields, source=source)


def check_compatible(
    sae: SAE, *, d_model: int | None = None, hook: str | None = None, model: str | None = None
) -> None:
    """Raise a MonoscopeError if `sae` cannot read the given model's activations.

    d_model: the model's width at the hook (must equal the SAE's d_in). hook, model: compared with
    the SAE's recorded hook and model id when the SAE records one (an SAE with no record of its
    hook cannot be checked and passes)."""
    cfg = sae.cfg
    origin = f"(trained on model={cfg.model!r}, hook={cfg.hook!r})"
    if d_model is not None and d_model != sae.hook_width:
        raise MonoscopeError(
            f"the SAE reads d_in={sae.hook_width} activations but the model is {d_model} wide at the hook "
            f"{origin}: use an SAE trained on this model"
        )
    if hook is not None and cfg.hook is not None and hook not in (cfg.hook, sae.store_hook):
        raise MonoscopeError(
            f"the SAE was trained on hook {sae.store_hook!r}, not {hook!r}: use --hook {sae.store_hook} or an SAE "
            f"trained on {hook!r}"
        )
    if model is not None and cfg.model is not None and model.rstrip("/") != cfg.model.rstrip("/"):
        raise MonoscopeError(
            f"the SAE was trained on model {cfg.model!r}, not {model!r}: use that model or an SAE trained on {model!r}"
        )


# ----------------------------------------------------------------------------- helpers


def check_finite_weights(tensors: dict[str, torch.Tensor], wpath: Path, *, unset_threshold_ok: bool = False) -> None:
    """Refuse weights holding NaN or ±inf, naming the tensor: every stage would turn them into NaN metrics,
    features and exports. Allowed: -inf in `log_threshold` (a JumpReLU threshold of 0) and, with
    `unset_threshold_ok`, a NaN `threshold` scalar (a batchtopk SAE whose inference threshold is unset)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if name == "log_threshold":
            bad &= t != float("-inf")
        if name == "threshold" and unset_threshold_ok and t.dim() == 0:
            bad &= ~torch.isnan(t)
        n_bad = int(bad.sum())
        if n_bad:
            first = [int(i) for i in bad.nonzero()[0]] if t.dim() else []
            value = float(t[tuple(first)]) if t.dim() else float(t)
            raise SAEFileError(
                f"SAE weights {wpath}: tensor {name} holds {n_bad:,} non-finite value{'s' if n_bad > 1 else ''} "
                f"(first {value} at {first}): the SAE is broken (training diverged, or the file was edited); "
                "retrain it (a lower --lr) or restore a good copy"
            )


def _check_tensors(sae: SAE, tensors: dict[str, torch.Tensor], wpath: Path, cfg: SAEConfig) -> None:
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SAEFileError(
            f"{wpath} does not hold a {cfg.arch} SAE: missing tensors {missing}, unexpected {unexpected}; "
            f"check the architecture in {CFG_NAME}"
        )
    for name, ref in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise SAEFileError(
                f"{wpath}: tensor {name} has shape {list(got.shape)} but {CFG_NAME} (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}) implies {list(ref.shape)}: the config and weights do not belong together"
            )
        if got.dtype != ref.dtype:
            raise SAEFileError(
                f"{wpath}: tensor {name} is {got.dtype} but {CFG_NAME} says dtype={cfg.dtype!r} "
                f"(expected {ref.dtype}): re-save the SAE"
            )

