"""`SAEConfig`: everything needed to rebuild an SAE, checked on construction; `parse_width`.

The config is what `cfg.json` stores (see `io.py`), so every field is a plain JSON value. Fields that
only make sense for some architectures are `None` for the others; setting one where it has no
meaning is an error rather than something silently ignored, because a mis-set `k` on a ReLU SAE is
almost always a confusion about which SAE is being built.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from monoscope.errors import MonoscopeError

Arch = Literal["relu-l1", "topk", "batchtopk", "jumprelu", "matryoshka", "gated", "transcoder", "crosscoder"]
ARCHITECTURES: tuple[str, ...] = get_args(Arch)
TOPK_STYLE: tuple[str, ...] = ("topk", "batchtopk", "matryoshka", "transcoder", "crosscoder")
MULTI_HOOK: tuple[str, ...] = ("transcoder", "crosscoder")
"""Architectures trained on a store of several hooks captured in one pass (`capture --hook a,b`)."""
THRESHOLD_STYLE: tuple[str, ...] = ("batchtopk", "matryoshka")
"""Architectures that select by batch top-k in training and by one global threshold θ at inference."""
DEFAULT_PREFIX_FRACTIONS: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
"""Matryoshka prefixes when none are given: each twice the previous one, the last the whole dictionary."""

DType = Literal["float32", "bfloat16"]
ComputeDType = Literal["auto", "float32", "bfloat16"]
EncoderScreen = Literal["auto", "int8", "off"]

# Per-architecture defaults for fields left as None (resolved in __post_init__).
# topk and batchtopk: 0.25, below sparsify's held-out FVU at 25/50/100% of 1M-token runs on two corpora where 1.0
# was behind at 25% (benchmarks/results/convergence_vs_sparsify.json).
_DEFAULT_DECODER_NORM = {"relu-l1": 0.1, "topk": 0.25, "batchtopk": 0.25, "jumprelu": 1.0, "matryoshka": 1.0,
                         "gated": 0.1, "transcoder": 1.0, "crosscoder": 1.0}
_DEFAULT_B_DEC_TO_INPUT = {"relu-l1": False, "topk": True, "batchtopk": True, "jumprelu": False,
                           "matryoshka": True, "gated": True, "transcoder": False, "crosscoder": True}
_OPTIONAL_FIELDS = ("target_hook", "target_normaliser", "hook_normalisers")
"""Fields written to cfg.json only when set, so the files of the other architectures keep their bytes."""


class SAEConfigError(MonoscopeError):
    """An SAE configuration value is invalid; the message names the field, the value and the fix."""


@dataclass
class SAEConfig:
    """Shape, architecture and provenance-relevant settings of one sparse autoencoder.

    Conventions used throughout `monoscope.sae`: parameters are `W_enc` [d_sae, d_in] (rows are
    encoder directions, the `nn.Linear` layout), `b_enc` [d_sae], `W_dec` [d_sae, d_in] (rows are
    decoder directions) and `b_dec` [d_in]. The SAE works in the *scaled* space `c·x_raw` where
    `c = normaliser`; use the `*_raw` methods of the SAE for raw activations.
    """

    arch: Arch
    """Architecture: `relu-l1` (Anthropic's recipe), `topk` (Gao et al. 2024), `batchtopk`
    (Bussmann et al. 2024), `jumprelu` (Rajamanoharan et al. 2024), `matryoshka` (BatchTopK with
    nested prefixes each trained to reconstruct; Bussmann et al. 2025, Nabeshima 2024), `gated`
    (Rajamanoharan et al. 2024), `transcoder` (TopK; reads `hook`, reconstructs `target_hook`) or `crosscoder`
    (acausal TopK crosscoder over the hooks of `hook`, comma-separated). Never guessed on load."""

    d_in: int
    """Width of the activations the SAE reads (the model's d_model at the hook)."""

    d_sae: int
    """Number of features (latents). `parse_width("16x", d_in)` turns a multiple into a count."""

    k: int | None = None
    """Active features per token for `topk`; average active features per token for `batchtopk`
    (k·B are kept over a batch of B). Required for those two, must be None for the others."""

    k_aux: int | None = None
    """AuxK: how many dead latents (top pre-activations among them) reconstruct the residual.
    `topk`/`batchtopk` only; None means d_in // 2, as in Gao et al. and sparsify."""

    aux_coef: float = 1 / 32
    """Weight of the AuxK loss in the total (Gao et al. use 1/32). Only read by topk-style SAEs."""

    aux_rows: int = 0
    """AuxK on at most this many rows of a batch (every ⌈B/aux_rows⌉-th row, an unbiased estimate of the mean over
    the batch); 0: every row. Why: AuxK's products scale with the rows, and its term, ~1/32 of the loss, needs
    fewer rows than the reconstruction does. topk-style only."""

    normaliser: float = 1.0
    """Input scale c, estimated by the caller so that E‖c·x_raw‖² = d_in. Training and `forward`
    happen on c·x_raw; the `*_raw` methods fold c in and out."""

    hook: str | None = None
    """Hook point the activations come from (e.g. `resid_post.15`); checked by `check_compatible`."""

    model: str | None = None
    """Model id (HF id, local folder or GGUF file) the activations come from."""

    dtype: DType = "float32"
    """Parameter dtype (and the dtype of the saved weights). Keep float32 for training (master
    copies); bfloat16 halves memory and disk for inference. JumpReLU's log-threshold and
    BatchTopK's threshold are always float32."""

    compute_dtype: ComputeDType = "auto"
    """Dtype of the large matmuls. `auto` = bfloat16 on CUDA GPUs with bf16 and on CPUs with
    AVX512-BF16/AMX (3-6x faster there), float32 elsewhere. Losses are always computed in float32.
    JumpReLU computes its pre-activations in float32 regardless, because bf16 rounding (≈0.4%) is
    coarser than the STE bandwidth and would leave the threshold without a usable gradient."""

    init_decoder_norm: float | None = None
    """L2 norm of each decoder row at initialisation (the encoder starts as their transpose, so for unit-norm
    decoders it is the encoder's initial row norm). None: 0.1 for relu-l1 and gated (Anthropic, April 2024
    update), 0.25 for topk and batchtopk (measured against sparsify, `_DEFAULT_DECODER_NORM`), 1.0 for the
    others."""

    b_dec_to_input: bool | None = None
    """Subtract b_dec from the input before encoding (x − b_dec). None: True for topk/batchtopk
    (Gao et al., Bussmann et al., sparsify), False for relu-l1 and jumprelu (their papers)."""

    jumprelu_bandwidth: float = 0.001
    """JumpReLU: width ε of the rectangle kernel of the straight-through estimators (paper: 0.001,
    in the scaled space where E‖x‖² = d_in)."""

    jumprelu_init_threshold: float = 0.001
    """JumpReLU: initial threshold θ of every feature (paper: 0.001)."""

    prefixes: list[int] | None = None
    """Matryoshka: the nested prefix widths, strictly increasing, the last equal to d_sae (SAELens's
    `matryoshka_widths`); features [0, prefixes[m]) alone are trained to reconstruct the input, for
    every m. None: d_sae/16, /8, /4, /2, d_sae. Must be None for the other architectures."""

    threshold: float | None = None
    """BatchTopK and Matryoshka: the global inference threshold (running mean of the smallest kept activation;
    None until training has seen a batch). `save_sae` writes the trained value here. Must be None
    for the other architectures (JumpReLU's per-feature thresholds live in the weights file)."""

    threshold_ema: float = 0.01
    """BatchTopK: weight of each training batch's smallest kept activation in the running
    threshold θ ← (1 − w)·θ + w·min (Bussmann et al. use 0.01)."""

    target_hook: str | None = None
    """Transcoder: the hook it reconstructs (e.g. `mlp_out.3`) from `hook` (e.g. `mlp_in.3`). None otherwise."""

    target_normaliser: float | None = None
    """Transcoder: scale c_out of the target (E‖c_out·y_raw‖² = d_in), as `normaliser` is of the input."""

    hook_normalisers: list[float] | None = None
    """Crosscoder: one input scale per hook of `hook` (d_in = hooks × layer width; each layer's block of the
    input is scaled by its own c_l, so no layer dominates the loss by its norm). None otherwise."""

    sparse_kernels: bool = True
    """Use the sparse encoder-backward and sparse decoder, which touch only the active rows of
    W_enc/W_dec. topk/batchtopk always qualify; relu-l1 and jumprelu switch per batch, taking the
    sparse path when at most `sparse_max_density` of the codes are non-zero (once training has
    made them sparse). False: always dense (a reference, and slower)."""

    sparse_max_density: float = 0.05
    """relu-l1/jumprelu: largest fraction of non-zero codes (jumprelu: plus codes within the STE
    window) for which a batch takes the sparse path. Measured on one AMX core at d_in=576,
    d_sae=9216, B=4096: sparse wins below ~6% (relu-l1) and ~12% (jumprelu)."""

    encoder_screen: EncoderScreen = "auto"
    """topk and the transcoder and crosscoder built on it, in bf16 on a CPU: how each row's top k is found. `int8`:
    an int8 product ranks the features (`monoscope.native.screen_topk`), the best 2k are computed exactly in bf16
    and the top k of those kept, instead of the whole bf16 product (AVX512-VNNI runs int8 at twice bf16's rate;
    on 4,096 held-out rows of a trained 16x SAE the chosen features were the bf16 product's in every row).
    `off`: the whole product. `auto`: int8 where the CPU has AVX512-VNNI and no AMX (whose bf16 product is faster
    still), for batches of at least 256 rows and 2,048 features."""

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, ARCHITECTURES, hint=_arch_hint(self.arch))
        _check_int("d_in", self.d_in, 1, None)
        _check_int("d_sae", self.d_sae, 1, None)
        topk_style = self.arch in TOPK_STYLE
        if topk_style:
            if self.k is None:
                raise SAEConfigError(
                    f"SAEConfig.k is required for arch {self.arch!r}: give the number of active features "
                    f"per token, e.g. k=32 (1 to d_sae={self.d_sae})"
                )
            _check_int("k", self.k, 1, self.d_sae, f"for arch {self.arch!r} with d_sae={self.d_sae}")
            if self.k_aux is None:
                self.k_aux = max(1, min(self.d_in // 2, self.d_sae))
            _check_int("k_aux", self.k_aux, 1, self.d_sae, f"with d_sae={self.d_sae}")
        else:
            for name in ("k", "k_aux"):
                if getattr(self, name) is not None:
                    raise SAEConfigError(
                        f"SAEConfig.{name}={getattr(self, name)!r} has no meaning for arch {self.arch!r}: "
                        f"leave it None, or use arch 'topk' or 'batchtopk'"
                    )
        _check_float("aux_coef", self.aux_coef, lo=0.0)
        _check_int("aux_rows", self.aux_rows, 0, None, "(0: every row)")
        _check_float("normaliser", self.normaliser, lo=0.0, lo_open=True)
        for name in ("hook", "model"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise SAEConfigError(f"SAEConfig.{name}={value!r} must be a non-empty string or None")
        _check_choice("dtype", self.dtype, get_args(DType))
        _check_choice("compute_dtype", self.compute_dtype, get_args(ComputeDType))
        _check_choice("encoder_screen", self.encoder_screen, get_args(EncoderScreen))
        if self.init_decoder_norm is None:
            self.init_decoder_norm = _DEFAULT_DECODER_NORM[self.arch]
        _check_float("init_decoder_norm", self.init_decoder_norm, lo=0.0, lo_open=True)
        if self.b_dec_to_input is None:
            self.b_dec_to_input = _DEFAULT_B_DEC_TO_INPUT[self.arch]
        if not isinstance(self.b_dec_to_input, bool):
            raise SAEConfigError(f"SAEConfig.b_dec_to_input={self.b_dec_to_input!r} must be true, false or None")
        _check_float("jumprelu_bandwidth", self.jumprelu_bandwidth, lo=0.0, lo_open=True)
        _check_float("jumprelu_init_threshold", self.jumprelu_init_threshold, lo=0.0, lo_open=True)
        if self.arch == "matryoshka":
            if self.prefixes is None:
                self.prefixes = default_prefixes(self.d_sae)
            self.prefixes = check_prefixes(self.prefixes, self.d_sae, "SAEConfig.prefixes")
        elif self.prefixes is not None:
            raise SAEConfigError(
                f"SAEConfig.prefixes={self.prefixes!r} has no meaning for arch {self.arch!r}: leave it None, "
                "or use arch 'matryoshka'"
            )
        if self.threshold is not None:
            if self.arch not in THRESHOLD_STYLE:
                raise SAEConfigError(
                    f"SAEConfig.threshold={self.threshold!r} only applies to arch 'batchtopk' or 'matryoshka', not "
                    f"{self.arch!r}: leave it None"
                )
            _check_float("threshold", self.threshold, lo=0.0)
        _check_float("threshold_ema", self.threshold_ema, lo=0.0, lo_open=True, hi=1.0)
        self._check_multi_hook()
        _check_float("sparse_max_density", self.sparse_max_density, lo=0.0, hi=1.0)
        if not isinstance(self.sparse_kernels, bool):
            raise SAEConfigError(f"SAEConfig.sparse_kernels={self.sparse_kernels!r} must be true or false")

    def _check_multi_hook(self) -> None:
        """Transcoder: target hook and scale given; crosscoder: one scale per hook, equal widths per hook."""
        given = {n: getattr(self, n) for n in _OPTIONAL_FIELDS if getattr(self, n) is not None}
        wanted = {"transcoder": ("target_hook", "target_normaliser"), "crosscoder": ("hook_normalisers",)}
        need = wanted.get(self.arch, ())
        if self.arch == "transcoder" and self.hook is None:  # e.g. imported without its hookpoint: neither known
            need = ("target_normaliser",)
        for name in given:
            if name not in wanted.get(self.arch, ()):
                raise SAEConfigError(f"SAEConfig.{name}={given[name]!r} has no meaning for arch {self.arch!r}: "
                                     "leave it None")
        for name in need:
            if name not in given:
                raise SAEConfigError(f"SAEConfig.{name} is required for arch {self.arch!r}: train it with monoscope "
                                     "train on a store captured with --hook A,B")
        if self.arch == "transcoder":
            if self.target_hook is not None and (not isinstance(self.target_hook, str) or not self.target_hook.strip()):
                raise SAEConfigError(f"SAEConfig.target_hook={self.target_hook!r} must be a hook name, e.g. mlp_out.3")
            _check_float("target_normaliser", self.target_normaliser, lo=0.0, lo_open=True)
            if self.b_dec_to_input:
                raise SAEConfigError("SAEConfig.b_dec_to_input=True has no meaning for a transcoder (b_dec lives in "
                                     "the target's space, not the input's): leave it None")
        if self.arch == "crosscoder":
            scales = self.hook_normalisers
            if not isinstance(scales, list) or len(scales) < 2:
                raise SAEConfigError(f"SAEConfig.hook_normalisers={scales!r} must list one scale per hook (at least 2)")
            for c in scales:
                _check_float("hook_normalisers[]", c, lo=0.0, lo_open=True)
            hooks = (self.hook or "").split(",") if self.hook else None
            if hooks is not None and len(hooks) != len(scales):
                raise SAEConfigError(f"SAEConfig.hook={self.hook!r} names {len(hooks)} hooks but hook_normalisers has "
                                     f"{len(scales)} scales: give one scale per hook")
            if self.d_in % len(scales):
                raise SAEConfigError(
                    f"crosscoder widths do not match: d_in={self.d_in} is not {len(scales)} hooks of one width; every "
                    "hook a crosscoder reads must have the same width (capture hooks of one model's residual stream)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (what `cfg.json` stores; the transcoder/crosscoder fields only
        when set)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _OPTIONAL_FIELDS or getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> SAEConfig:
        """Build from a dict such as `to_dict()`'s; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SAEConfigError(
                f"{source}: unknown SAE config keys {unknown}: remove them (known keys: {sorted(known)})"
            )
        if "arch" not in data or data["arch"] in (None, ""):
            raise SAEConfigError(
                f"{source}: the SAE architecture is missing: it must name one of {list(ARCHITECTURES)}; "
                "monoscope never guesses it"
            )
        for name in ("d_in", "d_sae"):
            if name not in data:
                raise SAEConfigError(f"{source}: {name} is missing: it must be a positive integer")
        return cls(**data)


def parse_width(width: int | str, d_in: int) -> int:
    """Number of SAE features from a count (`9216`, `"9216"`), a multiple of d_in (`"16x"`,
    `"1.5x"`), or thousands in binary units as SAE names use them (`"16k"` = 16384).

    >>> parse_width("16x", 576)
    9216
    """
    _check_int("d_in", d_in, 1, None)
    what = f"width {width!r}"
    fix = "use a positive count such as 9216, a multiple of d_in such as '16x', or '16k' (=16384)"
    if isinstance(width, bool):
        raise MonoscopeError(f"{what} is not a width: {fix}")
    if isinstance(width, int):
        n = width
    elif isinstance(width, str):
        s = width.strip().lower().replace("_", "")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([xk]?)", s)
        if not m:
            raise MonoscopeError(f"{what} is not understood: {fix}")
        number, unit = float(m.group(1)), m.group(2)
        if unit == "x":
            exact = number * d_in
            n = round(exact)
            if abs(exact - n) > 1e-9:
                raise MonoscopeError(
                    f"{what} with d_in={d_in} gives {exact:g} features, not a whole number: "
                    f"use a multiple that gives an integer, or a count"
                )
        elif unit == "k":
            exact = number * 1024
            n = round(exact)
            if abs(exact - n) > 1e-9:
                raise MonoscopeError(f"{what} gives {exact:g} features, not a whole number: {fix}")
        else:
            if not number.is_integer():
                raise MonoscopeError(f"{what} is a fraction: a count must be whole; {fix}")
            n = int(number)
    else:
        raise MonoscopeError(f"{what} has type {type(width).__name__}: {fix}")
    if n < 1:
        raise MonoscopeError(f"{what} gives {n} features: {fix}")
    return n


def default_prefixes(d_sae: int) -> list[int]:
    """`DEFAULT_PREFIX_FRACTIONS` of d_sae as counts (duplicates and zeros of tiny widths dropped)."""
    out: list[int] = []
    for f in DEFAULT_PREFIX_FRACTIONS:
        n = max(1, round(f * d_sae))
        if not out or n > out[-1]:
            out.append(n)
    out[-1] = d_sae
    return out


def resolve_prefixes(values: list[float] | tuple[float, ...], d_sae: int, flag: str = "--prefixes") -> list[int]:
    """Prefix widths from counts (`1024,2048,4608`) or, when every value is at most 1, fractions of
    the width (`0.125,0.5,1`); checked by `check_prefixes`."""
    vals = list(values)
    if vals and all(not isinstance(v, bool) and isinstance(v, (int, float)) and 0 < v <= 1 for v in vals) \
            and not all(float(v).is_integer() for v in vals):
        counts = [round(float(v) * d_sae) for v in vals]
        return check_prefixes(counts, d_sae, flag, given=vals)
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
            raise SAEConfigError(
                f"{flag} {','.join(f'{x:g}' for x in vals)}: {v!r} is neither a whole count nor a fraction; give "
                f"counts such as {','.join(str(n) for n in default_prefixes(d_sae))} or fractions such as 0.125,0.5,1"
            )
    return check_prefixes([int(v) for v in vals], d_sae, flag, given=vals)


def check_prefixes(prefixes: object, d_sae: int, flag: str, given: object = None) -> list[int]:
    """Prefix widths must be whole, strictly increasing and end at d_sae (the whole dictionary)."""
    shown = given if given is not None else prefixes
    text = ",".join(f"{v:g}" for v in shown) if isinstance(shown, (list, tuple)) and all(  # type: ignore[union-attr]
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in shown) else repr(shown)
    example = ",".join(str(n) for n in default_prefixes(d_sae))
    if not isinstance(prefixes, (list, tuple)) or not prefixes or any(
            isinstance(v, bool) or not isinstance(v, int) for v in prefixes):
        raise SAEConfigError(
            f"{flag} {text}: give a list of whole prefix widths ending at d_sae={d_sae}, e.g. {example}"
        )
    out = [int(v) for v in prefixes]
    if out[0] < 1 or any(b <= a for a, b in itertools.pairwise(out)):
        raise SAEConfigError(
            f"{flag} {text} (= {out}) must be strictly increasing widths from 1 up: nested prefixes grow, "
            f"e.g. {example}"
        )
    if out[-1] != d_sae:
        fix = f"append {d_sae}" if out[-1] < d_sae else f"keep every prefix within the {d_sae} features"
        raise SAEConfigError(
            f"{flag} {text} (= {out}) must end at the width d_sae={d_sae} (the last prefix is the whole dictionary; "
            f"the groups between prefixes sum to the width): {fix}, e.g. {example}"
        )
    return out


# ----------------------------------------------------------------------------- checks


def _arch_hint(value: object) -> str:
    if isinstance(value, str):
        v = value.strip().lower().replace("_", "-")
        aliases = {
            "relu": "relu-l1",
            "standard": "relu-l1",
            "l1": "relu-l1",
            "relu-l1": "relu-l1",
            "top-k": "topk",
            "batch-topk": "batchtopk",
            "batch-top-k": "batchtopk",
            "jump-relu": "jumprelu",
            "matryoshka-batchtopk": "matryoshka",
            "gated-sae": "gated",
        }
        if v in aliases and aliases[v] != value:
            return f" (did you mean {aliases[v]!r}?)"
    return ""


def _check_choice(name: str, value: object, choices: tuple[str, ...], hint: str = "") -> None:
    if value not in choices:
        raise SAEConfigError(f"SAEConfig.{name}={value!r} is not one of {list(choices)}{hint}")


def _check_int(name: str, value: object, lo: int, hi: int | None, ctx: str = "") -> None:
    ctx = f" {ctx}" if ctx else ""
    rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise SAEConfigError(f"SAEConfig.{name}={value!r} must be an integer {rng}{ctx}")
    if value < lo or (hi is not None and value > hi):
        raise SAEConfigError(f"SAEConfig.{name}={value} is out of range{ctx}: use an integer {rng}")


def _check_float(
    name: str, value: object, *, lo: float | None = None, lo_open: bool = False, hi: float | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SAEConfigError(f"SAEConfig.{name}={value!r} must be a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise SAEConfigError(f"SAEConfig.{name}={value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise SAEConfigError(f"SAEConfig.{name}={value!r} must be <= {hi}")
