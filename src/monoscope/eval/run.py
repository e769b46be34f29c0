"""`evaluate()`: how faithful is this dictionary? Reconstruction on store rows, and with `lm=True` the
LM losses with the reconstruction spliced in on held-out text; metrics.json + PNG plots.

    res = evaluate("runs/default/sae", acts="runs/default/acts", lm=True, tokens=100_000)
    res.store.fvu, res.heldout.fvu, res.lm.ce_recovered, res.out / "metrics.json"
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monoscope import __version__
from monoscope.errors import MonoscopeError
from monoscope.eval.data import check_rows, heldout_contexts, store_digest, store_rows
from monoscope.eval.metrics import ReconAccumulator, ReconMetrics
from monoscope.eval.splice import LMAccumulator, LMMetrics, Splicer
from monoscope.fileio import nonfinite_to_null, write_json_atomic
from monoscope.progress import progress_bar
from monoscope.sae import SAE
from monoscope.sae.io import weights_sha256
from monoscope.store import ActivationStore
from monoscope.units import parse_count


@dataclass
class EvalResult:
    out: Path
    store: ReconMetrics
    """Reconstruction on the last `tokens` kept rows of the store (rows training may have seen)."""
    heldout: ReconMetrics | None = None
    """Reconstruction on held-out text (with `lm`)."""
    lm: LMMetrics | None = None
    plots: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    """What metrics.json holds."""
    tokens_per_s: float | None = None
    """Held-out tokens per second of the LM evaluation (every variant included)."""
    reused: bool = False
    """True when an identical earlier evaluation was returned (`reuse`)."""
    notes: list[str] = field(default_factory=list)
    """What the user should know about how the request was met (e.g. fewer store rows than the default)."""


DEFAULT_TOKENS = 100_000
"""Store rows (and held-out tokens with `lm`) when `tokens` is not given."""


def default_out(sae_dir: Path) -> Path:
    """`runs/x/sae` -> `runs/x/eval` (the run-folder layout, `monoscope.runfolder`); else `<folder>-eval`."""
    from monoscope.runfolder import eval_dir_for

    return eval_dir_for(sae_dir)


def _load_sae(sae_dir: Path, store: ActivationStore, device: torch.device) -> SAE:
    from monoscope.interop import load_any
    from monoscope.sae.io import check_compatible

    sae = load_any(sae_dir, device=device)
    m = store.manifest
    check_compatible(sae, d_model=m.d_model, hook=m.hook)
    if sae.row_width != m.row_width:
        raise MonoscopeError(f"SAE {sae_dir} ({sae.cfg.arch}) reads rows of {sae.store_hook} but store {store.folder} "
                             f"holds {m.hook}: evaluate it on a store captured with --hook {sae.store_hook}")
    model_ids = {m.model.get("id"), m.model.get("spec")}
    if sae.cfg.model is not None and sae.cfg.model not in model_ids:
        raise MonoscopeError(
            f"SAE {sae_dir} was trained on model {sae.cfg.model!r} but store {store.folder} holds activations of "
            f"{m.model.get('id')!r}: evaluate it on a store captured from {sae.cfg.model!r}"
        )
    return sae.eval()


def evaluate(
    sae: str | Path,
    *,
    acts: str | Path,
    lm: bool = False,
    tokens: int | str | None = None,
    out: str | Path | None = None,
    text: str | None = None,
    batch_contexts: int = 8,
    error_check: bool = True,
    device: str | None = "auto",
    compute_dtype: str | None = None,
    plots: bool = True,
    progress: bool = True,
    reuse: bool = False,
) -> EvalResult:
    """Evaluate the SAE folder `sae` (monoscope, SAELens or sparsify) on store `acts`.

    tokens: rows read from the end of the store, and (with `lm`) held-out tokens of text; None: DEFAULT_TOKENS,
    or every row of a smaller store (said in `notes`), while an explicit count above the store's rows is an
    error (the user asked for something the store cannot give). text: a
    corpus to use instead of the store's corpus after the store. compute_dtype: the model's forward
    (default: the capture's, so the SAE sees activations computed the way it was trained on). reuse:
    return the metrics.json already in `out` when it evaluated the same SAE weights, store, tokens and
    options (what `monoscope run` does on a rerun).
    """
    from monoscope.devices import resolve_device

    sae_dir = Path(sae)
    if not sae_dir.exists():
        raise MonoscopeError(f"SAE folder {sae_dir} does not exist: train one with monoscope train --out {sae_dir}")
    n_tokens = DEFAULT_TOKENS if tokens is None else parse_count(tokens)
    if n_tokens < 1:
        raise MonoscopeError(f"--tokens {tokens} must be at least 1")
    if batch_contexts < 1:
        raise MonoscopeError(f"--batch-contexts {batch_contexts} must be at least 1")
    store = ActivationStore.open(acts)
    dev = resolve_device(device)
    model = _load_sae(sae_dir, store, dev)
    notes: list[str] = []
    n_rows = n_tokens
    if tokens is None and store.n_rows < n_tokens:
        n_rows = store.n_rows
        notes.append(f"store {store.folder} holds {store.n_rows:,} training rows, fewer than the default "
                     f"{DEFAULT_TOKENS:,}: evaluated all of them (--tokens N sets the count)")
    check_rows(store, n_rows)  # before any heavy work
    out_dir = Path(out) if out is not None else default_out(sae_dir)
    m = store.manifest
    request = {"tokens": n_tokens, "store_rows": n_rows, "lm": lm, "text": text, "error_check": error_check,
               "compute_dtype": compute_dtype, "batch_contexts": batch_contexts}
    if reuse and (done := _previous(out_dir, sae_dir, model, store, request)) is not None:
        return done
    t0 = time.perf_counter()

    acc = ReconAccumulator(model.cfg.d_sae, m.ctx_len)
    per_hook = _per_hook_accumulators(model, m.ctx_len)
    with progress_bar("eval: store rows", total=n_rows, unit="tok", enabled=progress) as bar, torch.inference_mode():
        for x, pos in store_rows(store, n_rows):
            for xb, pb in zip(x.split(8192), pos.split(8192), strict=True):
                xb = xb.to(dev)
                x_in, target = model.split_target(xb)  # a transcoder encodes its input, reconstructs its target
                f = model.encode_raw(x_in)
                x_hat = model.decode_raw(f)
                acc.add(target, x_hat, f != 0, pb)
                for i, (_, a) in enumerate(per_hook):
                    w = model.hook_width
                    a.add(target[:, i * w:(i + 1) * w], x_hat[:, i * w:(i + 1) * w], f != 0, pb)
                bar.update(len(xb))
    res = EvalResult(out_dir, acc.result(), notes=notes)
    density = {"store": acc.density()}
    if per_hook:
        res.metrics["per_hook"] = {h: {k: v for k, v in a.result().to_dict().items() if k in _PER_HOOK_KEYS}
                                   for h, a in per_hook}

    if lm:
        from monoscope.model.load import load_model

        lmodel = load_model(str(m.model.get("spec") or m.model["id"]), device=device,
                            compute_dtype=compute_dtype or m.capture.get("compute_dtype", "auto"))
        if lmodel.tokenizer_sha256 != m.tokenizer.get("sha256"):
            raise MonoscopeError(f"model {m.model.get('spec')} now has a different tokenizer than when store "
                                 f"{store.folder} was captured: recapture the store")
        if model.cfg.arch == "transcoder":
            from monoscope.eval.splice import TranscoderSplicer

            if model.cfg.hook is None or model.cfg.target_hook is None:
                raise MonoscopeError(f"transcoder {sae_dir} records no input/target hooks (imported without its "
                                     "hookpoint), so --lm cannot tell which module it replaces: evaluate without --lm")

            splicer: Splicer = TranscoderSplicer(lmodel, lmodel.hook(str(model.cfg.target_hook)), model,
                                                 lambda h, _ids: m.row_policy.keep(h), error_check=error_check,
                                                 source=lmodel.hook(str(model.cfg.hook)))
        elif model.cfg.arch == "crosscoder":
            from monoscope.eval.splice import CrosscoderSplicer

            splicer = CrosscoderSplicer(lmodel, [lmodel.hook(h) for h in model.hooks], model,  # type: ignore[attr-defined]
                                        lambda h, _ids: m.row_policy.keep(h), error_check=error_check)
        else:
            splicer = Splicer(lmodel, lmodel.hook(m.hook), model, lambda h, _ids: m.row_policy.keep(h),
                              error_check=error_check)
        hacc = ReconAccumulator(model.cfg.d_sae, m.ctx_len)
        lacc = LMAccumulator(splicer.variants)
        n_ctx = max(1, math.ceil(n_tokens / m.ctx_len))
        t_lm = time.perf_counter()
        done = 0
        with progress_bar("eval: held-out LM", total=n_ctx * m.ctx_len, unit="tok", enabled=progress) as bar:
            for ids in heldout_contexts(store, lmodel, n_ctx, batch_contexts, text):
                b = splicer.run(ids)
                hacc.add(b.x, b.x_hat, b.active, b.positions)
                lacc.add(b)
                done += ids.numel()
                bar.update(ids.numel())
        res.tokens_per_s = done / (time.perf_counter() - t_lm)
        res.heldout, res.lm = hacc.result(), lacc.result()
        density["heldout"] = hacc.density()
        res.metrics["lm_eval"] = {"tokens": done, "stacked_variants": splicer.stacked,
                                  "stacked_fallback": splicer.fallback,
                                  "compute_dtype": lmodel.compute_dtype, "device": str(lmodel.device),
                                  "text": text or "store corpus after the store's contexts",
                                  "tokens_per_s": res.tokens_per_s}

    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        res.plots = _plots(res, density, out_dir)
    lm_eval, hooks_fvu = res.metrics.get("lm_eval"), res.metrics.get("per_hook")
    res.metrics = _metrics_json(res, sae_dir, model, store, n_tokens, time.perf_counter() - t0)
    res.metrics["lm_eval"] = lm_eval
    if hooks_fvu is not None:
        res.metrics["per_hook"] = hooks_fvu
    res.metrics["request"] = request
    res.metrics, replaced = nonfinite_to_null(res.metrics)
    if replaced:  # undefined metrics are null with the reason, never a bare NaN (which is not JSON)
        res.metrics["non_finite"] = {k: f"{v}: {_undefined_reason(k)}" for k, v in replaced.items()}
    write_json_atomic(out_dir / "metrics.json", res.metrics)
    return res


_PER_HOOK_KEYS = ("rows", "fvu", "explained_variance", "mse", "shrinkage_norm_ratio", "shrinkage_projection")


def _per_hook_accumulators(sae: SAE, ctx_len: int) -> list[tuple[str, ReconAccumulator]]:
    """A crosscoder's reconstruction, hook by hook (metrics.json `per_hook`: FVU, MSE, shrinkage per layer)."""
    if sae.cfg.arch != "crosscoder":
        return []
    return [(h, ReconAccumulator(sae.cfg.d_sae, ctx_len)) for h in sae.hooks]  # type: ignore[attr-defined]


_UNDEFINED = {
    "fvu": "the evaluated rows have no variance (constant activations), so FVU divides by 0",
    "explained_variance": "1 - FVU, and FVU is undefined",
    "ce_recovered": "the zero-ablated loss equals the clean loss, so CE recovered divides by 0",
}


def _undefined_reason(key: str) -> str:
    name = key.rsplit(".", 1)[-1].split("[", 1)[0]
    return _UNDEFINED.get(name, "the value is undefined or overflowed on the evaluated data")


def _previous(out_dir: Path, sae_dir: Path, sae: SAE, store: ActivationStore,
              request: dict[str, Any]) -> EvalResult | None:
    """The earlier result in `out_dir` if it answered exactly this request on these weights and store."""
    from monoscope.fileio import read_json

    path = out_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        prev = read_json(path, "evaluation metrics")
        same = (prev.get("request") == request and prev["sae"]["weights_sha256"] == weights_sha256(sae_dir)
                and prev["sae"]["weights_sha256"] is not None
                and prev["store"]["manifest_sha256"] == store_digest(store.folder))
        if not same:
            return None
        lm = prev.get("lm")
        res = EvalResult(out_dir, ReconMetrics(**prev["store_rows"]),
                         None if prev.get("heldout") is None else ReconMetrics(**prev["heldout"]),
                         None if lm is None else LMMetrics(**{k: v for k, v in lm.items() if k != "ce_delta"}),
                         [out_dir / p for p in prev.get("plots", [])], prev,
                         (prev.get("lm_eval") or {}).get("tokens_per_s"))
    except (MonoscopeError, KeyError, TypeError):  # an older or damaged file: evaluate again
        return None
    res.reused = True
    res.notes = [str(n) for n in prev.get("notes") or []]
    return res


def _plots(res: EvalResult, density: dict[str, torch.Tensor], out_dir: Path) -> list[Path]:
    from monoscope.eval import plots as P

    key = "heldout" if res.heldout is not None else "store"
    rec = res.heldout or res.store
    files = [P.density_histogram(density[key].numpy(), rec.rows, out_dir / "density.png",
                                 "held-out " if key == "heldout" else "store "),
             P.l0_histogram(rec, out_dir / "l0.png")]
    series = {"store rows": res.store} | ({"held-out text": res.heldout} if res.heldout else {})
    files.append(P.fvu_by_position(series, out_dir / "fvu_by_position.png"))
    if res.lm is not None:
        files.append(P.loss_bars(res.lm, out_dir / "losses.png"))
    return files


def _metrics_json(res: EvalResult, sae_dir: Path, sae: SAE, store: ActivationStore, tokens: int,
                  seconds: float) -> dict[str, Any]:
    sae_sha = weights_sha256(sae_dir)
    cfg = sae.cfg
    return {
        "format": "monoscope-eval/1",
        "sae": {"path": str(sae_dir.resolve()), "weights_sha256": sae_sha, "arch": cfg.arch, "d_in": cfg.d_in,
                "d_sae": cfg.d_sae, "k": cfg.k, "hook": cfg.hook, "model": cfg.model,
                **({"target_hook": cfg.target_hook} if cfg.target_hook else {})},
        "store": {"path": str(store.folder.resolve()), "manifest_sha256": store_digest(store.folder),
                  "hook": store.manifest.hook, "model": store.manifest.model.get("id"),
                  "rows_evaluated": res.store.rows, "which_rows": "the last kept rows of the store"},
        "tokens_requested": tokens,
        "store_rows": res.store.to_dict(),
        "heldout": None if res.heldout is None else res.heldout.to_dict(),
        "lm": None if res.lm is None else res.lm.to_dict(),
        "plots": [p.name for p in res.plots],
        "notes": res.notes,
        "seconds": seconds,
        "monoscope_version": __version__,
    }
