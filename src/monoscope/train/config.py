"""`TrainConfig`: every setting that decides what a training run computes, checked on construction.

The config is stored in each checkpoint; resuming with a config that differs in any field except
the runtime-only ones (`RUNTIME_FIELDS`: how often to log or checkpoint, the progress display)
is refused with the list of differing fields, because a resumed run must end bit-identical to an
uninterrupted one. Field docstrings double as the CLI's help text (`field_docs`).
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import math
import textwrap
from dataclasses import MISSING, dataclass, fields
from typing import Any, Literal, get_args

from monoscope.errors import MonoscopeError
from monoscope.sae.config import ARCHITECTURES, TOPK_STYLE, Arch, parse_width

DType = Literal["auto", "float32", "bfloat16"]
Revive = Literal["auto", "auxk", "resample", "none"]
InitBDec = Literal["geometric_median", "mean", "zero"]
Loss = Literal["mse", "e2e-kl", "e2e-ce"]
Optim = Literal["adam", "signum-sf"]
TranscoderInit = Literal["sae", "sparsify"]
SIGNUM_ARCHS = ("topk", "batchtopk", "transcoder")
"""Architectures `--optimizer signum-sf` is tested on (sparsify trains TopK SAEs and transcoders with it)."""

SIGNUM_INIT_NORM = 0.577
"""`--init-decoder-norm` default with signum-sf: sparsify's encoder init (`nn.Linear`, entries U(±1/sqrt(d)), rows of
norm ≈ 1/sqrt(3)), which is the same weight in monoscope's scaled space (a sign step moves every weight by ±lr, so
the initial scale sets how far the first steps go). 40 steps on SmolLM2 resid_post.15, held-out FVU at 25% with norm
1 -> 0.577: 0.454 -> 0.367 (default corpus), 0.427 -> 0.345 (pydoc + stdlib);
benchmarks/results/convergence_vs_sparsify.json."""

RUNTIME_FIELDS: frozenset[str] = frozenset({"checkpoint_every", "keep_checkpoints", "log_every", "progress"})
"""Fields that may change between a run and its resumption: they do not touch the numbers."""

DEFAULT_DEAD_WINDOW = 10_000_000
"""Tokens without firing after which a feature counts as dead (Scaling Monosemanticity: 10^7)."""
DEAD_WINDOW_FIRINGS = 64
"""The default dead window of a topk-style SAE holds at least this many mean-rate firings (`TrainConfig.dead_window`):
at 64, a feature firing at a sixteenth of the mean rate or more is called dead with under 2% chance."""


def dead_window_rule(tokens: int, batch: int, d_sae: int, k: int | None, firings: int = DEAD_WINDOW_FIRINGS) -> int:
    """1/40 of a run of `tokens`, at least `firings` mean-rate firings (firings·d_sae/k tokens, when k is given), at
    least a batch, at most `DEFAULT_DEAD_WINDOW`: the default dead window (`TrainConfig.dead_window`), and the rule
    `benchmarks/dead_window_sweep.py` varies `firings` of."""
    window = tokens // 40
    if k:
        window = max(window, firings * d_sae // k)
    return max(batch, min(DEFAULT_DEAD_WINDOW, window))


_DEFAULT_SPARSITY = {"relu-l1": 5.0, "jumprelu": 1.0, "gated": 5.0}


class TrainConfigError(MonoscopeError):
    """A training setting is invalid; the message names the field, the value and the fix."""


def default_lr(arch: str, d_sae: int) -> float:
    """Learning rate when none is given. relu-l1: 5e-5 (Anthropic, April 2024 update). jumprelu: 7e-5
    (Gemma Scope). gated: relu-l1's. topk, batchtopk and matryoshka: 1.5e-3 / sqrt(d_sae / 2^14), 7.5x
    Gao et al.'s 2e-4 rule, which is tuned for runs of billions of tokens. Measured on SmolLM2 resid_post.15,
    16x, k=32, 1M tokens (held-out FVU, dead window 25k tokens): 2.7e-4 (Gao) 0.304; 1.07e-3 0.200;
    2e-3 (this rule) 0.184; 3e-3 0.179 but 4-20% of features dead."""
    if arch in ("relu-l1", "gated"):
        return 5e-5
    if arch == "jumprelu":
        return 7e-5
    return 1.5e-3 / math.sqrt(d_sae / 2**14)


def default_signum_lr(d_sae: int) -> float:
    """Learning rate of `--optimizer signum-sf` when none is given: sparsify's rule for its signum optimiser,
    5e-3 / sqrt(d_sae / 2^14) (each step moves every weight by ±lr, so the rate is larger than Adam's)."""
    return 5e-3 / math.sqrt(d_sae / 2**14)


@dataclass
class TrainConfig:
    """What one SAE training run does. Fields left None get per-architecture defaults when the
    input width is known (`resolved`)."""

    arch: Arch
    """SAE architecture: relu-l1 (Scaling Monosemanticity), topk (Gao et al. 2024), batchtopk
    (Bussmann et al. 2024), jumprelu (Rajamanoharan et al. 2024), matryoshka (BatchTopK whose nested
    prefixes each reconstruct; Bussmann et al. 2025) or gated (Rajamanoharan et al. 2024)."""

    tokens: int
    """Training tokens (activation rows); steps = tokens // batch_size. A store smaller than this
    is cycled in new shuffled epochs."""

    width: int | str = "16x"
    """Number of features: a count (9216), a multiple of d_model ('16x') or binary thousands ('16k')."""

    k: int | None = None
    """Active features per token: required for topk, batchtopk and matryoshka (e.g. 32), unused otherwise."""

    prefixes: tuple[float, ...] | None = None
    """matryoshka: nested prefix widths of the dictionary, each trained to reconstruct on its own:
    counts (1024,2048,4608,9216) or fractions of the width (0.0625,0.25,1); the last is the whole
    width. Default: 1/16, 1/8, 1/4, 1/2 and all of it."""

    sparsity_coef: float | None = None
    """λ: relu-l1's L1 coefficient on f_i·‖W_dec[i]‖ (default 5, the paper's value with
    E‖x‖² = d_model), gated's on ReLU(π_gate)_i·‖W_dec[i]‖ (default 5), or jumprelu's L0 coefficient
    (default 1; sweep it for the L0 you want). Unused by topk, batchtopk and matryoshka."""

    batch_size: int = 4096
    """Activation rows per optimiser step."""

    lr: float | None = None
    """Learning rate. Default with adam: 5e-5 relu-l1, 7e-5 jumprelu, 1.5e-3/sqrt(d_sae/16384) topk and batchtopk
    (`default_lr`); with signum-sf: 5e-3/sqrt(d_sae/16384), sparsify's rule (`default_signum_lr`)."""

    optimizer: Optim = "adam"
    """adam, or signum-sf: sparsify's default optimiser, schedule-free (Defazio et al. 2024) sign descent with
    momentum 0.95 (`monoscope.train.optim`); the saved SAE holds its averaged weights. topk, batchtopk and
    transcoder only; data parallel and feature sharded under torchrun too."""

    lr_decay_frac: float | None = None
    """The learning rate decays linearly to 0 over this last fraction of the steps. Default: 0.2 with adam (the
    paper's 20%), 0 with signum-sf (schedule-free needs no decay; sparsify has none)."""

    lr_warmup_frac: float = 0.0
    """The learning rate rises linearly from 0 over this first fraction of the steps. Off by default:
    on a 1M-token topk run at the default rate, 5% warm-up changed neither FVU nor dead features."""

    sparsity_warmup_frac: float = 0.05
    """λ rises linearly from 0 over this first fraction of the steps (paper: 5%)."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this (paper: 1); 0 disables clipping."""

    aux_coef: float = 1 / 32
    """topk/batchtopk: weight of the AuxK loss that revives dead latents (Gao et al.: 1/32)."""

    aux_rows: int | None = None
    """topk-style: AuxK on at most this many rows of each batch (every ⌈batch/N⌉-th row, an unbiased estimate of its
    mean); 0: every row. AuxK's products over the dead latents grow with the rows, and its term is 1/32 of the loss.
    Default: 512 for topk, batchtopk and matryoshka (`AUX_ROWS_ARCHS`), every row for transcoders and crosscoders
    (not measured with fewer). Measured on two corpora (`benchmarks/train_vs_peers.py --aux-rows --aux-rows-arch`,
    1M-token runs, batch 4,096, a CPU without AMX): topk at 256-1,024 rows gave the held-out FVU of every row within
    0.0003 at each quarter of the run, 7-21% faster (a resident step with 1,000 dead latents 33% faster); batchtopk
    at 512 rows the same FVU within 0.0007, 38-58% faster; matryoshka at 512 the same FVU within 0.0002, 9% faster."""

    dead_window: int | None = None
    """A feature is dead when it has not fired for this many tokens. Default: 10M (the paper), or
    1/40 of the run when that is shorter, so AuxK and resampling act early in short runs (a window
    as long as the run would only call a feature dead after training ended). Measured on a 1M-token
    topk run: window 200k -> 8.9% of features never fire on held-out rows, 25k -> 1.8%. For topk-style
    SAEs never below 64·F/k tokens (`DEAD_WINDOW_FIRINGS`): shorter, a feature firing at the mean rate k/F
    fires ~64 times per window, and a window of a few steps calls merely rare features dead; measured on
    two corpora (`benchmarks/dead_window_sweep.py`), runs of 200k and 500k tokens then trained at the same
    held-out FVU, 1-20% faster, with fewer features never active on held-out rows (200k: 12.3% -> 5.9%
    and 16.5% -> 9.2%)."""

    revive: Revive = "auto"
    """How dead features are revived: auxk (topk-style only), resample (Anthropic's resampling; not transcoders),
    none. auto: auxk for topk-style SAEs (topk, batchtopk, matryoshka, transcoder, crosscoder),
    resample for relu-l1, none for jumprelu and gated. `none` on a topk-style SAE skips AuxK, as
    sparsify's default (auxk_alpha=0) does: each step is cheaper, dead latents stay dead. With --optimizer signum-sf
    auto is none: on two corpora (40 steps, held-out) AuxK left 18-21% of features dead instead of 2%, for FVU
    0.001-0.003 lower (benchmarks/results/convergence_vs_sparsify.json)."""

    resample_at: tuple[float, ...] = (0.2, 0.4, 0.6)
    """Fractions of the run at which dead features are resampled (when revive is resample); all
    before the learning-rate decay so resampled features have time to train."""

    init_b_dec: InitBDec = "geometric_median"
    """How b_dec is set before step 0 from the first batch: geometric median, mean, or zero."""

    init_decoder_norm: float | None = None
    """Norm of the random decoder rows at initialisation; the encoder starts as their transpose, so for
    unit-norm-decoder SAEs (topk-style, jumprelu) this is the encoder's initial row norm in the scaled space
    (E‖x‖² = d_model). Default: 0.25 for topk and batchtopk (measured: benchmarks/results/convergence_vs_sparsify.json),
    0.1 for relu-l1 and gated, 1 for the others; 0.577 with --optimizer signum-sf, sparsify's. With
    --transcoder-init sparsify: the encoder's expected row norm (default 0.577); its decoder starts at zero."""

    transcoder_init: TranscoderInit | None = None
    """--arch transcoder: how it starts and which decoder constraint it trains under (default: sparsify for a
    transcoder, measured better at every point of the run in benchmarks/results/train_vs_peers_transcoder.json;
    sae for every other architecture, the only start they have). sae: as every topk-style SAE
    (random unit-norm decoder rows, encoder = their transpose; decoder rows renormalised after each step, the
    gradient parallel to them removed). sparsify: sparsify's transcoder recipe: encoder entries U(±a) (nn.Linear's
    init; expected row norm --init-decoder-norm, default 0.577), b_enc = -mean(input)·W_encᵀ on the first batch
    (centred pre-activations), W_dec = 0, b_dec from the first batch's targets by --init-b-dec (mean is
    sparsify's), and the decoder rows free (never renormalised, no gradient removed)."""

    dtype: DType = "auto"
    """Dtype of the SAE's large matmuls (master weights and Adam state stay float32). auto:
    bfloat16 on CPUs with AMX/AVX512-BF16 and on CUDA GPUs with bf16, float32 elsewhere."""

    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""

    seed: int = 0
    """Seeds the SAE initialisation, the data shuffle and the resampling draws."""

    checkpoint_every: int = 1000
    """Save a checkpoint every this many steps (0: only at the end and on SIGTERM/SIGINT)."""

    keep_checkpoints: int = 2
    """How many complete checkpoints to keep (the newest ones)."""

    log_every: int = 50
    """Steps between log lines (train_log.jsonl) and metric updates; metrics are averaged over them."""

    loss: Loss = "mse"
    """What the SAE minimises besides its sparsity and aux terms: mse (reconstruction), or end to end
    through the model with the reconstruction spliced in at the hook: e2e-kl (KL divergence to the clean
    next-token distribution) or e2e-ce (next-token cross-entropy). e2e-* need --model and a corpus, not
    a store (`monoscope.train.e2e`)."""

    ctx_len: int = 128
    """With --model: tokens per context of the corpus (end to end: --batch-size must be a multiple of it)."""

    skip_nonfinite: bool = False
    """Skip (and count) a batch whose activations or loss are not finite, instead of stopping."""

    progress: bool = True
    """Show a progress bar (a log line every few seconds when stderr is not a terminal)."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise TrainConfigError(
                f"--arch {self.arch!r} is not an SAE architecture: use one of {', '.join(ARCHITECTURES)}"
            )
        _int("tokens", self.tokens, 1, "a positive number of tokens such as 10M")
        _int("batch_size", self.batch_size, 1, "a positive number of rows such as 4096")
        if self.tokens < self.batch_size:
            raise TrainConfigError(
                f"--tokens {self.tokens} is less than one batch of {self.batch_size}: raise --tokens or lower "
                "--batch-size"
            )
        if isinstance(self.width, bool) or not isinstance(self.width, (int, str)):
            raise TrainConfigError(f"--width {self.width!r}: use a count such as 9216 or a multiple such as 16x")
        try:  # syntax only here; the exact count needs d_model (resolved)
            parse_width(self.width, 2**20)
        except MonoscopeError as e:
            raise TrainConfigError(f"--width: {e}") from None
        if self.arch in TOPK_STYLE:
            if self.k is None:
                raise TrainConfigError(f"--arch {self.arch} needs --k: give the active features per token, e.g. --k 32")
            _int("k", self.k, 1, "a positive count such as 32")
            if self.sparsity_coef is not None:
                raise TrainConfigError(
                    f"--l1 {self.sparsity_coef} has no meaning for --arch {self.arch} (its sparsity is --k): drop it"
                )
        else:
            if self.k is not None:
                raise TrainConfigError(f"--k {self.k} has no meaning for --arch {self.arch}: drop it, or use topk")
            if self.sparsity_coef is None:
                self.sparsity_coef = _DEFAULT_SPARSITY[self.arch]
            _float("sparsity_coef", self.sparsity_coef, 0.0, None, "a number >= 0 such as 5")
        if self.optimizer not in get_args(Optim):
            raise TrainConfigError(f"--optimizer {self.optimizer!r}: use one of {', '.join(get_args(Optim))}")
        if self.lr_decay_frac is None:
            self.lr_decay_frac = 0.0 if self.optimizer == "signum-sf" else 0.2
        if self.transcoder_init is None:
            self.transcoder_init = "sparsify" if self.arch == "transcoder" else "sae"
        if self.transcoder_init not in get_args(TranscoderInit):
            raise TrainConfigError(f"--transcoder-init {self.transcoder_init!r}: use one of "
                                   f"{', '.join(get_args(TranscoderInit))}")
        if self.transcoder_init == "sparsify":
            if self.arch != "transcoder":
                raise TrainConfigError(f"--transcoder-init sparsify only applies to --arch transcoder, not "
                                       f"{self.arch}: drop it, or train --arch transcoder")
            if self.init_decoder_norm is None:  # the encoder's expected row norm (the decoder starts at zero)
                self.init_decoder_norm = SIGNUM_INIT_NORM
        if self.optimizer == "signum-sf":
            if self.init_decoder_norm is None:
                self.init_decoder_norm = SIGNUM_INIT_NORM
            if self.arch not in SIGNUM_ARCHS:
                archs = f"{', '.join(SIGNUM_ARCHS[:-1])} or {SIGNUM_ARCHS[-1]}"
                raise TrainConfigError(f"--optimizer signum-sf is only supported for --arch {archs}, not {self.arch}: "
                                       "use --optimizer adam")
            if self.loss != "mse":
                raise TrainConfigError(f"--optimizer signum-sf is not supported with --loss {self.loss}: use "
                                       "--optimizer adam")
            if self.revive == "resample":
                raise TrainConfigError("--optimizer signum-sf is not supported with --revive resample: use --revive "
                                       "auxk or none, or --optimizer adam")
        if self.lr is not None:
            _float("lr", self.lr, 0.0, None, "a positive learning rate such as 3e-4", open_lo=True)
        _float("lr_decay_frac", self.lr_decay_frac, 0.0, 1.0, "a fraction from 0 to 1 (0.2 = the last 20%)")
        _float("lr_warmup_frac", self.lr_warmup_frac, 0.0, 1.0, "a fraction from 0 to 1 (e.g. 0.05)")
        _float("sparsity_warmup_frac", self.sparsity_warmup_frac, 0.0, 1.0, "a fraction from 0 to 1 (e.g. 0.05)")
        _float("grad_clip", self.grad_clip, 0.0, None, "a norm > 0 such as 1, or 0 to disable")
        _float("aux_coef", self.aux_coef, 0.0, None, "a weight >= 0 such as 0.03125")
        if self.aux_rows is None:
            self.aux_rows = AUX_ROWS_DEFAULT if self.arch in AUX_ROWS_ARCHS else 0
        _int("aux_rows", self.aux_rows, 0, "a number of rows >= 1 such as 512, or 0 for every row")
        if self.dead_window is not None:
            _int("dead_window", self.dead_window, 1, "a positive number of tokens such as 10M")
        if self.loss not in get_args(Loss):
            raise TrainConfigError(f"--loss {self.loss!r}: use one of {', '.join(get_args(Loss))}")
        _int("ctx_len", self.ctx_len, 2, "a context length in tokens such as 128")
        if self.revive not in get_args(Revive):
            raise TrainConfigError(f"--revive {self.revive!r}: use one of {', '.join(get_args(Revive))}")
        if self.revive == "resample" and self.arch == "transcoder":
            raise TrainConfigError("--revive resample is not supported for --arch transcoder (resampling points a dead "
                                   "feature's decoder row at an input, and a transcoder's decoder writes the target "
                                   "hook): use --revive auxk or none")
        if self.revive == "auxk" and self.arch not in TOPK_STYLE:
            raise TrainConfigError(
                f"--revive auxk needs a topk-style SAE, not --arch {self.arch}: use resample, none or auto"
            )
        if self.prefixes is not None:
            if self.arch != "matryoshka":
                raise TrainConfigError(
                    f"--prefixes has no meaning for --arch {self.arch}: drop it, or use --arch matryoshka"
                )
            if isinstance(self.prefixes, str):  # "1024,2048,9216" from Python, as the CLI takes it
                try:
                    self.prefixes = tuple(float(v) for v in self.prefixes.split(",") if v.strip())
                except ValueError:
                    raise TrainConfigError(f"--prefixes {self.prefixes!r}: give widths such as 1024,2048,4608,9216 "
                                           "or fractions such as 0.125,0.5,1") from None
            if not isinstance(self.prefixes, (list, tuple)) or not self.prefixes:
                raise TrainConfigError(f"--prefixes {self.prefixes!r}: give widths such as 1024,2048,4608,9216 or "
                                       "fractions such as 0.125,0.5,1")
            self.prefixes = tuple(self.prefixes)
        self.resample_at = tuple(self.resample_at)
        for f in self.resample_at:
            _float("resample_at", f, 0.0, 1.0, "fractions of the run between 0 and 1, e.g. 0.2,0.4,0.6", open_lo=True)
        if self.init_b_dec not in get_args(InitBDec):
            raise TrainConfigError(f"--init-b-dec {self.init_b_dec!r}: use one of {', '.join(get_args(InitBDec))}")
        if self.init_decoder_norm is not None:
            _float("init_decoder_norm", self.init_decoder_norm, 0.0, None, "a positive norm such as 1 or 0.5",
                   open_lo=True)
        if self.dtype not in get_args(DType):
            raise TrainConfigError(f"--dtype {self.dtype!r}: use one of {', '.join(get_args(DType))}")
        if not isinstance(self.device, str) or not self.device:
            raise TrainConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        _int("seed", self.seed, 0, "an integer >= 0")
        _int("checkpoint_every", self.checkpoint_every, 0, "a number of steps, or 0 for only at the end")
        _int("keep_checkpoints", self.keep_checkpoints, 1, "at least 1 (2 keeps one spare)")
        _int("log_every", self.log_every, 1, "a positive number of steps such as 50")

    # ---------------------------------------------------------------- derived values
    @property
    def steps(self) -> int:
        """Optimiser steps in the run."""
        return self.tokens // self.batch_size

    @property
    def revive_method(self) -> str:
        """`revive` with auto resolved: auxk, resample or none."""
        if self.revive != "auto":
            return self.revive
        if self.optimizer == "signum-sf":  # sparsify's auxk_alpha=0 (see the field)
            return "none"
        return "auxk" if self.arch in TOPK_STYLE else "resample" if self.arch == "relu-l1" else "none"

    def dead_window_tokens(self, d_sae: int) -> int:
        """`dead_window` with the default resolved for a dictionary of d_sae features (see the field)."""
        if self.dead_window is not None:
            return self.dead_window
        return dead_window_rule(self.tokens, self.batch_size, d_sae, self.k if self.arch in TOPK_STYLE else None)

    @property
    def resample_steps(self) -> tuple[int, ...]:
        """Steps after which dead features are resampled (empty unless revive is resample)."""
        if self.revive_method != "resample":
            return ()
        steps = {max(1, round(f * self.steps)) for f in self.resample_at}
        return tuple(sorted(s for s in steps if s < self.steps))

    def d_sae(self, d_in: int) -> int:
        """Feature count for inputs of width d_in."""
        return parse_width(self.width, d_in)

    def prefix_widths(self, d_in: int) -> list[int] | None:
        """matryoshka: `prefixes` as feature counts for inputs of width d_in (None: the default)."""
        if self.prefixes is None:
            return None
        from monoscope.sae.config import SAEConfigError, resolve_prefixes

        try:
            return resolve_prefixes(self.prefixes, self.d_sae(d_in))
        except SAEConfigError as e:
            raise TrainConfigError(str(e)) from None

    def learning_rate(self, d_in: int) -> float:
        """`lr`, or the architecture's (signum-sf: the optimiser's) default for this width."""
        if self.lr is not None:
            return self.lr
        if self.optimizer == "signum-sf":
            return default_signum_lr(self.d_sae(d_in))
        return default_lr(self.arch, self.d_sae(d_in))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (tuples become lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown training settings {unknown}: remove them (known: {sorted(known)})")
        return cls(**{**ABSENT_MEANS, **data})


AUX_ROWS_DEFAULT = 512
"""`TrainConfig.aux_rows` for the architectures in `AUX_ROWS_ARCHS` when not given (the sweeps in its docstring)."""

AUX_ROWS_ARCHS = ("topk", "batchtopk", "matryoshka")
"""The architectures whose AuxK runs on `AUX_ROWS_DEFAULT` rows unless told otherwise: those the sweeps measured."""

ABSENT_MEANS: dict[str, Any] = {"transcoder_init": "sae", "aux_rows": 0}
"""Fields whose default changed after runs were saved without them: their absence means this value (a transcoder
trained before `--transcoder-init` existed started as `sae`; AuxK ran on every row before `--aux-rows`)."""


def config_diff(saved: dict[str, Any], current: dict[str, Any], ignore: frozenset[str] = RUNTIME_FIELDS) -> list[str]:
    """Human-readable `field: saved -> current` for every field that differs (runtime ones ignored)."""
    out = []
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    for name in sorted(set(saved) | set(current)):
        if name in ignore:
            continue
        # a field added after the saved run was made: its absence means the default it then had
        a = saved.get(name, ABSENT_MEANS.get(name, defaults.get(name, "<absent>")))
        b = current.get(name, "<absent>")
        if a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source (the CLI's help text)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# ----------------------------------------------------------------------------- checks


def cli_flag(name: str) -> str:
    """The CLI option of a TrainConfig field (messages name what the user typed, not the field)."""
    return "--" + {"sparsity_coef": "l1"}.get(name, name.replace("_", "-"))


def _int(name: str, value: object, lo: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise TrainConfigError(f"{cli_flag(name)} {value!r}: use {fix}")


def _float(name: str, value: object, lo: float, hi: float | None, fix: str, open_lo: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        assert isinstance(value, (int, float))
        ok = (value > lo if open_lo else value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise TrainConfigError(f"{cli_flag(name)} {value!r}: use {fix}")
