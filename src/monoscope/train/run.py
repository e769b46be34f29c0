"""`train(...)`: the whole training stage behind `monoscope train`, as a Python call.

    from monoscope.train import train
    res = train("runs/x/sae", store="runs/x/acts", arch="topk", k=32, width="16x", tokens="50M")
    res = train("runs/x/sae", store="runs/x/acts", arch="topk", k=32, tokens="50M", resume=True)

The output folder ends up holding the final SAE (`cfg.json` + `sae.safetensors`, with provenance:
command, configs, data digest, versions, tokens, final metrics), `train_log.jsonl`, and
`checkpoints/` (the last `keep_checkpoints` complete ones, so a finished run can be inspected or
extended). A run killed at any point continues with `resume=True` to the same final weights, bit
for bit on CPU, as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import monoscope
from monoscope.devices import resolve_device
from monoscope.errors import MonoscopeError
from monoscope.locking import locks_folders
from monoscope.progress import progress_bar
from monoscope.sae import SAE, SAEConfig, build_sae, load_sae, save_sae
from monoscope.sae.config import SAEConfigError, parse_width
from monoscope.sae.io import CFG_NAME, WEIGHTS_NAME, SAEFileError
from monoscope.sae.multihook import multi_hook_fields
from monoscope.train.checkpoint import CheckpointDir
from monoscope.train.config import TrainConfig, TrainConfigError, cli_flag, config_diff
from monoscope.train.data import TrainData, e2e_data, store_data, stream_data
from monoscope.train.log import LOG_NAME, JsonlLog
from monoscope.train.prefetch import DevicePrefetch
from monoscope.train.trainer import Peeked, Trainer

CHECKPOINTS = "checkpoints"


@dataclass
class TrainResult:
    """What a `train` call did and where it put it."""

    out: Path
    """The SAE folder (load it with `monoscope.sae.load_sae`)."""
    sae: SAE
    config: TrainConfig
    steps: int
    """Steps done in total (this session and any before it)."""
    tokens: int
    metrics: dict[str, Any]
    """The last log record: means over the last log interval (loss, mse, fvu, l0, ...), dead_frac."""
    seconds: float
    """Wall time of this session's training loop."""
    session_tokens: int
    """Tokens trained in this session (the rest came from a checkpoint)."""
    resumed_from: int | None = None
    """Step of the checkpoint this session started from (None: from scratch)."""
    already_complete: bool = False
    """The folder already held the finished SAE: nothing was done."""
    data_ended: bool = False
    """A streamed corpus ran out before `config.tokens`."""
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.session_tokens / self.seconds if self.seconds > 0 else 0.0


@locks_folders(lambda a: [a["out"]], "train")
def train(
    out: str | Path,
    *,
    store: str | Path | None = None,
    model: str | None = None,
    corpus: str = "default",
    hook: str | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    command: str | None = None,
    **settings: Any,
) -> TrainResult:
    """Train an SAE on a store (`store=`) or on activations streamed from `model=` over `corpus`.

    config: a TrainConfig, or its fields as keyword arguments (`arch="topk", k=32, tokens="50M"`;
    `tokens` and `dead_window` accept '10M'-style counts). resume: continue from the newest complete
    checkpoint in `out/checkpoints` (refused if any setting differs); without it, a folder holding
    checkpoints or a finished SAE is refused. command: recorded in the SAE's provenance.
    """
    cfg = _make_config(config, settings)
    out = Path(out)
    if (store is None) == (model is None):
        raise MonoscopeError("train needs exactly one data source: an activation store folder, or --model to stream")
    e2e = cfg.loss != "mse"
    if e2e and model is None:
        raise MonoscopeError(f"--loss {cfg.loss} measures the loss through the model, which a store ({store}) does not "
                             "hold: pass --model MODEL (with --corpus and --hook) instead of the store, or use --loss "
                             "mse")
    ckpts = CheckpointDir(out / CHECKPOINTS, keep=cfg.keep_checkpoints)
    _check_out_folder(out, ckpts, resume)
    device = resolve_device(cfg.device)
    if store is not None:
        data = store_data(store, cfg.batch_size, cfg.seed)
    elif e2e:
        assert model is not None
        data = e2e_data(model, corpus, hook, cfg.batch_size, cfg.ctx_len, cfg.device)
    else:
        assert model is not None
        data = stream_data(model, corpus, hook, cfg.batch_size, cfg.seed, cfg.device, ctx_len=cfg.ctx_len)
    ckpt = ckpts.latest() if resume else None
    notes = [f"skipped damaged checkpoint: {s}" for s in ckpts.skipped]
    if ckpt is not None:
        if ckpt.meta.get("distributed"):
            d = ckpt.meta["distributed"]
            raise MonoscopeError(f"cannot resume {out} in one process: its checkpoint was made by {d['world_size']} "
                                 f"processes (--shard-features {d['shard_features']}): relaunch with torchrun "
                                 f"--nproc-per-node {d['world_size']} and --shard-features {d['shard_features']}")
        _check_same_run(ckpt.meta, cfg, data, out)
    done = _finished_sae(out)
    if done is not None:
        prov = done.provenance
        _check_same_settings(prov, cfg, data, out, what="the finished SAE in it was trained")
        return TrainResult(out, done, cfg, int(prov.get("steps", 0)), int(prov.get("tokens", 0)),
                           dict(prov.get("final_metrics") or {}), 0.0, 0, already_complete=True, notes=notes)
    if resume and ckpt is None:
        notes.append(f"no checkpoint in {out / CHECKPOINTS}: started from step 0")

    source: Any = data.batches
    if ckpt is None:
        torch.manual_seed(cfg.seed)  # nothing in the step draws from these, but any future use is then seeded
        random.seed(cfg.seed)
        source = Peeked(data.batches)  # the first batch sets b_dec (and a stream's normaliser)
        sae_cfg = _sae_config(cfg, data)
    else:
        sae_cfg = SAEConfig.from_dict(ckpt.meta["sae_config"])
    peeked = source if isinstance(source, Peeked) else None
    if store is not None and device.type == "cuda":  # store reads and copies overlap the GPU's steps
        source = DevicePrefetch(source, device)
    sae = build_sae(sae_cfg, seed=cfg.seed, device=device)
    log = JsonlLog(out / LOG_NAME)
    meta = {"config": cfg.to_dict(), "data": data.identity, "sae_config": sae_cfg.to_dict()}
    if e2e:
        from monoscope.train.e2e import E2ETrainer

        ctx = data.batches
        trainer: Trainer = E2ETrainer(sae, cfg, source, lm=ctx.lm, hook=ctx.hook,  # type: ignore[attr-defined]
                                      sink=ckpts, log=log, describe_row=data.describe_row, meta=meta)
    else:
        trainer = Trainer(sae, cfg, source, sink=ckpts, log=log, describe_row=data.describe_row, meta=meta)
    if ckpt is None:
        assert peeked is not None and peeked.first is not None
        trainer.init_b_dec(peeked.first.acts)
    else:
        trainer.load(ckpt)
    log.start(trainer.step)
    if data.n_rows is not None and cfg.tokens > data.n_rows:
        notes.append(f"{cfg.tokens:,} tokens from a store of {data.n_rows:,} rows: each row is seen "
                     f"~{cfg.tokens / data.n_rows:.1f} times (capture more for less repetition)")

    start_step, start_tokens = trainer.step, trainer.tokens
    t0 = time.perf_counter()
    try:  # the prefetching source's reader thread stops however training ends
        with progress_bar("train", total=cfg.steps * cfg.batch_size, unit="tok", enabled=cfg.progress) as bar, \
                _stop_on_signals(trainer):
            bar.update(trainer.tokens)

            def on_log(rec: dict[str, Any]) -> None:
                if rec["loss"] is not None:
                    bar.update(0, loss=f"{rec['loss']:.4g}", fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}",
                               dead=f"{rec['dead_frac']:.1%}")

            outcome = trainer.run(on_log=on_log, on_step=bar.update)
        seconds = time.perf_counter() - t0
        trainer.use_averaged_weights()  # signum-sf: save (and calibrate) its averaged weights, as sparsify does
        if trainer.step > 0:  # after the final checkpoint: batchtopk's eval threshold from data
            trainer.calibrate_threshold()
    finally:
        if isinstance(source, DevicePrefetch):
            source.close()
    if outcome.data_ended:
        notes.append(f"the data ran out after {trainer.tokens:,} of {cfg.tokens:,} tokens: the learning rate never "
                     "finished its decay; use a longer corpus or fewer --tokens")
    metrics = dict(trainer.last_metrics)
    save_sae(sae.eval(), out, provenance=_provenance(trainer, data, command, outcome.data_ended), overwrite=True)
    return TrainResult(out, sae, cfg, trainer.step, trainer.tokens, metrics, seconds,
                       trainer.tokens - start_tokens, resumed_from=start_step if ckpt is not None else None,
                       data_ended=outcome.data_ended, skipped=trainer.skipped, notes=notes)


# ----------------------------------------------------------------------------- helpers



def _make_config(config: TrainConfig | None, settings: dict[str, Any]) -> TrainConfig:
    if config is not None:
        if settings:
            raise TrainConfigError(f"pass either config= or settings as keywords, not both (got {sorted(settings)})")
        return config
    from monoscope.units import parse_count

    for name in ("tokens", "dead_window"):
        if isinstance(settings.get(name), str):
            settings[name] = parse_count(settings[name])
    try:
        return TrainConfig(**settings)
    except TypeError as e:
        raise TrainConfigError(f"train: {e}") from None


def _check_out_folder(out: Path, ckpts: CheckpointDir, resume: bool) -> None:
    """Without --resume, never train over a finished SAE or an unfinished run's checkpoints."""
    if out.exists() and not out.is_dir():
        raise MonoscopeError(f"--out {out} is a file: give a folder for the SAE")
    if resume:
        return
    if (out / CFG_NAME).is_file() or (out / WEIGHTS_NAME).is_file():
        raise MonoscopeError(f"{out} already holds a trained SAE: choose another --out, or delete {out} to retrain")
    if ckpts.complete_steps():
        raise MonoscopeError(
            f"{out} holds checkpoints of an unfinished run (newest: step {ckpts.complete_steps()[-1]}): pass "
            "--resume to continue it, or choose another --out"
        )


def _provenance(trainer: Trainer, data: TrainData, command: str | None, data_ended: bool) -> dict[str, Any]:
    """What cfg.json records about how the SAE was made."""
    return {
        "command": command or "monoscope.train.train(...)",
        "train_config": trainer.cfg.to_dict(),
        "data": data.identity,
        "versions": {"monoscope": monoscope.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
        "device": str(trainer.device),
        "compute_dtype": str(trainer.sae.compute_dtype()).removeprefix("torch."),
        "steps": trainer.step,
        "tokens": trainer.tokens,
        "skipped_steps": trainer.skipped,
        "resampled_features": trainer.resampled,
        "final_metrics": dict(trainer.last_metrics),
        "data_ended_early": data_ended,
    }


def _finished_sae(out: Path) -> SAE | None:
    """The final SAE if a previous session saved it completely (a save cut by a kill is redone)."""
    if not (out / CFG_NAME).is_file():
        return None
    try:
        return load_sae(out)
    except SAEFileError:
        return None


def _sae_config(cfg: TrainConfig, data: TrainData) -> SAEConfig:
    normaliser = data.get_normaliser()
    if normaliser is None:
        raise MonoscopeError("the data source did not provide an input normaliser")
    hooks = data.hooks or [data.hook or ""]
    where = f"store {data.identity.get('path')}" if data.identity.get("kind") == "store" else "the stream"
    try:
        shape = multi_hook_fields(cfg.arch, hooks, data.hook_normalisers or [float(normaliser)], data.d_model, where)
    except SAEConfigError as e:
        raise TrainConfigError(_named_as_flags(e)) from None
    if data.hook is None or data.hooks is None:  # one hook: exactly what it was before transcoders
        shape.update(hook=data.hook, normaliser=float(normaliser))
    return sae_config_for(cfg, data.d_model, data.model, **shape)


def sae_config_for(cfg: TrainConfig, d_model: int, model: str | None, **shape: Any) -> SAEConfig:
    """The SAEConfig that `train()` builds for `cfg` on inputs of width `d_model`; `shape`: the fields that
    `multi_hook_fields` gives (d_in, hook, normaliser, and a transcoder's or crosscoder's targets). One place, so
    that a benchmark driving `Trainer` itself trains the SAE a user's `train()` would."""
    d_sae = cfg.d_sae(d_model)
    if cfg.k is not None and cfg.k > d_sae:
        raise TrainConfigError(f"--k {cfg.k} is more than the {d_sae:,} features of --width {cfg.width} (d_model "
                               f"{d_model}): lower --k or raise --width")
    try:
        return SAEConfig(
            arch=cfg.arch, d_sae=d_sae, k=cfg.k, aux_coef=cfg.aux_coef, aux_rows=cfg.aux_rows or 0,
            prefixes=cfg.prefix_widths(d_model),
            model=model, dtype="float32", compute_dtype=cfg.dtype, init_decoder_norm=cfg.init_decoder_norm,
            **shape,
        )
    except SAEConfigError as e:
        raise TrainConfigError(_named_as_flags(e)) from None


def _named_as_flags(e: SAEConfigError) -> str:
    """An SAEConfig error with the option the user typed in place of the internal field."""
    return re.sub(r"SAEConfig\.(\w+)=", lambda m: cli_flag(m.group(1)) + " ", str(e))


def _check_same_run(meta: dict[str, Any], cfg: TrainConfig, data: TrainData, out: Path) -> None:
    """Refuse to resume a checkpoint made with other settings or other data, listing what differs."""
    _check_same_settings({"train_config": meta.get("config", {}), "data": meta.get("data", {})}, cfg, data, out,
                         what="its checkpoint was made")


_DATA_KEYS = ("kind", "manifest_sha256", "model", "corpus", "hook", "d_model")


def _check_same_settings(saved: dict[str, Any], cfg: TrainConfig, data: TrainData, out: Path, what: str) -> None:
    """Refuse a --resume whose settings or data differ from what `out` holds (a checkpoint's, or the finished
    SAE's provenance), listing each difference as `--flag: saved -> now`. The width counts as the feature
    count it gives (`--width 1152` and `--width 2x` are the same on d_model 576)."""
    old = dict(saved.get("train_config") or {})
    if not old:  # e.g. an SAE converted or saved by other code into this folder
        raise MonoscopeError(f"cannot resume {out}: it records no training settings to compare with (not written by "
                             "monoscope train): train into another --out")
    new = cfg.to_dict()
    d_model = data.d_model
    for conf in (old, new):
        try:
            conf["width"] = parse_width(conf["width"], d_model)
        except (KeyError, MonoscopeError):
            pass
    diffs = [_as_flag(d) for d in config_diff(old, new)]
    saved_data = saved.get("data") or {}
    diffs += [f"data.{k}: {saved_data.get(k)!r} -> {data.identity.get(k)!r}"
              for k in _DATA_KEYS if saved_data.get(k) != data.identity.get(k)]
    if diffs:
        raise MonoscopeError(
            f"cannot resume {out}: {what} with different settings ({'; '.join(diffs)}): rerun with the original "
            f"values, train into another --out, or delete {out} to train again with these"
        )


def _as_flag(diff: str) -> str:
    """`sparsity_coef: 5.0 -> 2.0` -> `--l1: 5.0 -> 2.0` (config_diff names fields; users type flags)."""
    name, sep, rest = diff.partition(":")
    return f"{cli_flag(name)}:{rest}" if sep else diff


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer, keep_on_error: bool = False) -> Iterator[None]:
    """SIGTERM/SIGINT ask the trainer to stop after its current step (it checkpoints, then raises
    TrainingInterrupted). Only the main thread can install handlers; elsewhere this does nothing.

    keep_on_error (a torchrun worker): when the block raises, the handler stays. torchrun SIGTERMs the
    survivors the moment a peer dies, often in the instant between this block ending and the CLI
    printing why: with the default handler back, that signal killed the worker before it said which
    step failed and how to resume. The process is about to exit; torchrun SIGKILLs it after its grace."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        trainer.stop_signal = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except BaseException:
        if not keep_on_error:
            _restore(old)
        raise
    _restore(old)


def _restore(handlers: dict[int, Any]) -> None:
    for s, h in handlers.items():
        signal.signal(s, h)
