"""The main job as an API: capture -> train (two widths) -> eval -> features -> explain, in one run folder.

    from monoscope.pipeline import RunConfig, run
    res = run(RunConfig(out="runs/x", model="HuggingFaceTB/SmolLM2-135M", tokens="1M"))
    res.eval.lm.ce_recovered, res.folder.features_db, [s.reused for s in res.stages]

`monoscope run` is a thin wrapper over `run`. Every stage resumes after a kill, and a rerun with the same
config is a no-op stage by stage (capture: the store is complete; train: the SAE is finished; eval: the
same weights, store and request were evaluated; features: the database is complete for this pass).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from monoscope.capture import CaptureResult
from monoscope.errors import MonoscopeError
from monoscope.runfolder import RunFolder
from monoscope.sae.config import ARCHITECTURES, TOPK_STYLE
from monoscope.units import parse_count

COMPUTE_DTYPES = ("auto", "fp32", "bf16")
STORE_DTYPES = ("bfloat16", "float16", "float32")
ARCHS = ARCHITECTURES
_TRAIN_DTYPE = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}


class RunConfigError(MonoscopeError):
    """A `monoscope run` setting is invalid; the message names the option, the value and the fix."""


@dataclass
class RunConfig:
    """Every setting of `monoscope run`; each field is the CLI option of the same name (`--train-tokens`).
    Checked on construction, before any stage starts."""

    out: Path | str = "runs/default"
    """Run folder; its layout (acts/, sae/, sae-<small_width>/, eval/, features/) is `monoscope.runfolder`."""

    model: str = "default"
    """Hugging Face id, local folder, .gguf file, or 'default' (SmolLM2-135M-Instruct GGUF). Capture loads it;
    eval and features find it again in the store's manifest."""

    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N: every stage (capture, train, eval, features)."""

    compute_dtype: str = "auto"
    """Forward precision of every stage: auto = bf16 where fast (AMX/AVX512-BF16 CPU, CUDA), else fp32; fp32 or
    bf16 force it. Reaches capture, eval and features (model forward) and train (the SAE's matmuls)."""

    corpus: str = "default"
    """'default' (offline mix of prose, code, 100+ languages), .txt, .jsonl, .parquet, or a local Hugging Face
    dataset folder. Capture reads it; eval (held-out text) and features read the store's corpus."""

    text_field: str = "text"
    """Text field of .jsonl / column of .parquet."""

    strict_utf8: bool = False
    """Reject non-UTF-8 bytes in the corpus instead of replacing them."""

    hook: str | None = None
    """Hook point, e.g. resid_post.15 (default: resid_post at the middle layer)."""

    tokens: int | str = "1M"
    """Tokens to capture into the store: 500000, 500k, 2M."""

    ctx_len: int = 128
    """Tokens per context, BOS included."""

    dtype: str = "bfloat16"
    """Storage dtype of the activation store: bfloat16, float16 or float32."""

    batch_contexts: int = 32
    """Contexts per forward pass of capture and of the features pass."""

    contexts_per_shard: int = 128
    """Contexts per shard file of the store (a multiple of batch_contexts)."""

    keep_bos: bool = False
    """Let training see position 0 (the BOS) too."""

    outlier_factor: float = 10.0
    """Exclude rows with norm > this x the median from training (0: keep all)."""

    overwrite: bool = False
    """Replace a different store already in OUT/acts (capture only: later stages redo what no longer matches)."""

    arch: str = "topk"
    """SAE architecture of both SAEs: relu-l1, topk, batchtopk or jumprelu."""

    k: int = 32
    """Active features per token (topk, batchtopk); unused by relu-l1 and jumprelu."""

    width: int | str = "16x"
    """Features of the main SAE: a count or a multiple of d_model."""

    small_width: int | str = "4x"
    """Features of the second SAE (for feature splitting); it lives in OUT/sae-<small_width>."""

    train_tokens: int | str = "2M"
    """Training tokens of each SAE (several passes over a small store)."""

    train_batch_size: int = 4096
    """Activation rows per optimiser step of each SAE (the store must hold at least this many training rows)."""

    seed: int = 0
    """Seeds each SAE's initialisation and data shuffle."""

    eval_tokens: int | str = "50k"
    """Store rows and held-out tokens to evaluate the main SAE on."""

    features_tokens: int | str = "500k"
    """Tokens read for the feature databases of both SAEs."""

    feature_map: bool = True
    """Draw the feature map (UMAP) in the features stage."""

    explain_features: int = 2
    """Features the last stage explains with an LLM (0 skips the stage)."""

    explain_llm: str = "local:small"
    """LLM for the explain stage: local:small (the strongest installed local model up to Qwen2.5-Coder-0.5B, to
    stay in the run's time budget; `monoscope explain` then gives better explanations with local:default),
    local:NAME, local:PATH.gguf, or openai:MODEL with explain_endpoint."""

    explain_endpoint: str | None = None
    """OpenAI-compatible server for explain_llm openai:MODEL."""

    explain_scorers: str = "embedding,detection"
    """Scorers for the explain stage (default embedding,detection: bounded time on CPU)."""

    audit: bool = True
    """Audit the main SAE with concept packs as the last stage (OUT/audit/report.html and report.json, see
    `monoscope audit`) and end the run with its findings summary (CLI: --no-audit skips it)."""

    audit_packs: str = "all"
    """Concept packs the audit stage reads: all, or names / .jsonl files separated by commas."""

    audit_steer_top: int = 0
    """Candidates per pack whose steering effect the audit measures (0: skipped, said in the report; steering is
    CPU-expensive, `monoscope audit --steer-top N` measures it later)."""

    audit_attribution_texts: int = 8
    """Positives (and as many negatives) per pack whose log-likelihood the audit attributes to features (its
    attribution route; one forward and backward pass each; 0 skips the route)."""

    progress: bool = True
    """Progress display (CLI: --quiet turns it off)."""

    def __post_init__(self) -> None:
        if isinstance(self.out, str) and not self.out.strip():  # Path("") would silently mean "."
            raise RunConfigError(f"--out {self.out!r}: give a run folder such as runs/default")
        self.out = Path(self.out)
        if not isinstance(self.model, str) or not self.model.strip():
            raise RunConfigError(f"--model {self.model!r}: give a Hugging Face id, a folder, a .gguf file or 'default'")
        if not isinstance(self.device, str) or not self.device.strip():
            _fail("device", self.device, "auto, cpu, cuda or cuda:N")
        if isinstance(self.hook, str) and "," in self.hook:
            raise RunConfigError(f"--hook {self.hook}: monoscope run trains SAEs on one hook; capture several hooks "
                                 "with monoscope capture and train a transcoder or crosscoder with monoscope train")
        _choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _choice("dtype", self.dtype, STORE_DTYPES)
        _choice("arch", self.arch, ARCHS)
        for name in ("tokens", "train_tokens", "eval_tokens", "features_tokens"):
            _count(name, getattr(self, name))
        _int("ctx_len", self.ctx_len, 2, "at least 2 (BOS plus one token), e.g. 128")
        _int("batch_contexts", self.batch_contexts, 1, "a positive count such as 32")
        _int("contexts_per_shard", self.contexts_per_shard, 1, "a positive count such as 128")
        if self.contexts_per_shard % self.batch_contexts:
            raise RunConfigError(f"--contexts-per-shard {self.contexts_per_shard} must be a multiple of "
                                 f"--batch-contexts {self.batch_contexts}")
        if isinstance(self.outlier_factor, bool) or not isinstance(self.outlier_factor, (int, float)) \
                or not self.outlier_factor >= 0 or self.outlier_factor == float("inf"):
            _fail("outlier_factor", self.outlier_factor, "a factor >= 0 such as 10 (0 keeps every row)")
        _int("k", self.k, 1, "a positive count such as 32")
        from monoscope.sae.config import parse_width

        for name in ("width", "small_width"):
            try:  # syntax only: the count needs d_model
                parse_width(getattr(self, name), 2**20)
            except MonoscopeError:
                _fail(name, getattr(self, name), "a count such as 9216 or a multiple of d_model such as 16x")
        if str(self.width) == str(self.small_width):
            raise RunConfigError(f"--small-width {self.small_width} equals --width: give the second SAE a different "
                                 "width (e.g. --width 16x --small-width 4x) so feature splitting compares two sizes")
        _int("train_batch_size", self.train_batch_size, 1, "a positive number of rows such as 4096")
        if parse_count(self.train_tokens) < self.train_batch_size:  # type: ignore[arg-type]
            raise RunConfigError(f"--train-tokens {self.train_tokens} is less than one batch of --train-batch-size "
                                 f"{self.train_batch_size}: raise --train-tokens or lower --train-batch-size")
        _int("seed", self.seed, 0, "an integer >= 0")
        _int("explain_features", self.explain_features, 0, "a count >= 0 (0 skips the explain stage)")
        _int("audit_steer_top", self.audit_steer_top, 0, "a count >= 0 (0 skips steering in the audit)")
        _int("audit_attribution_texts", self.audit_attribution_texts, 0,
             "a count >= 0 (0 skips the audit's attribution route)")
        if not isinstance(self.audit_packs, str) or not self.audit_packs.strip(" ,"):
            _fail("audit_packs", self.audit_packs, "all, or pack names separated by commas (monoscope search "
                  "--list-packs)")
        if self.explain_llm.startswith("openai:") and self.explain_features and not self.explain_endpoint:
            raise RunConfigError(f"--explain-llm {self.explain_llm} needs --explain-endpoint URL (an OpenAI-compatible "
                                 "server), or use local:default")

    @property
    def folder(self) -> RunFolder:
        """Where each stage writes (`monoscope.runfolder`)."""
        return RunFolder(Path(self.out), str(self.small_width))


@dataclass
class Stage:
    """What one stage did: `reused` is True when it found its output complete and did nothing."""

    name: str
    """capture, train, train-small, eval, features, explain or audit."""
    outputs: list[Path]
    reused: bool
    seconds: float
    result: Any
    """The stage's own result (CaptureResult, TrainResult, EvalResult, FeaturesResult, ExplainResult)."""


@dataclass
class RunResult:
    """The artefacts of a run and what every stage did."""

    config: RunConfig
    folder: RunFolder
    stages: list[Stage] = field(default_factory=list)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in this run (stages: {', '.join(s.name for s in self.stages)})")

    @property
    def capture(self) -> CaptureResult:
        return self.stage("capture").result  # type: ignore[no-any-return]

    @property
    def eval(self) -> Any:
        """The EvalResult of the main SAE."""
        return self.stage("eval").result

    @property
    def features(self) -> Any:
        """The FeaturesResult of both SAEs."""
        return self.stage("features").result

    @property
    def audit(self) -> Any:
        """The AuditResult of the audit stage (None when it was skipped)."""
        return next((s.result for s in self.stages if s.name == "audit"), None)

    @property
    def explained(self) -> bool:
        return any(s.name == "explain" for s in self.stages)


def run(config: RunConfig, *, command: str | None = None, echo: bool = True) -> RunResult:
    """Run every stage of `config` in order, each resuming (or reusing) what its folder holds.

    command: recorded in the SAEs' provenance (default: this process's argv). echo: print the stage lines
    (stderr) and each stage's summary (stdout), as `monoscope run` shows them.
    """
    from monoscope.eval import evaluate
    from monoscope.features.build import build_features
    from monoscope.fileio import check_output_dir
    from monoscope.train import train

    cfg, f = config, config.folder
    check_output_dir(f.root)  # a run folder below a file or on a read-only disk: one line before any model loads
    res = RunResult(cfg, f)
    say: Callable[[str], None] = (lambda msg: print(msg, file=sys.stderr, flush=True)) if echo else (lambda _m: None)
    show = _summaries() if echo else None

    say(f"monoscope run [1/7] capture: {cfg.model} -> {f.acts}")
    t0 = time.perf_counter()
    cap = _capture(cfg, f.acts)
    res.stages.append(Stage("capture", [f.acts], cap.new_tokens == 0 and cap.seconds == 0.0,
                            time.perf_counter() - t0, cap))
    if show:
        show["capture"](cap)

    k = cfg.k if cfg.arch in TOPK_STYLE else None
    for i, (name, folder, width) in enumerate((("train", f.sae, cfg.width), ("train-small", f.small_sae,
                                                                              cfg.small_width))):
        say(f"monoscope run [{2 + i}/7] train: {cfg.arch} k={cfg.k} width {width} on {cfg.train_tokens} tokens "
            f"-> {folder}")
        t0 = time.perf_counter()
        tr = train(folder, store=f.acts, arch=cfg.arch, k=k, width=width, tokens=parse_count(cfg.train_tokens),
                   batch_size=cfg.train_batch_size, seed=cfg.seed, device=cfg.device,
                   dtype=_TRAIN_DTYPE[cfg.compute_dtype], resume=True, progress=cfg.progress,
                   command=command if command is not None else " ".join(sys.argv))
        res.stages.append(Stage(name, [folder], tr.already_complete, time.perf_counter() - t0, tr))
        if show:
            show["train"](tr)

    say(f"monoscope run [4/7] eval: {cfg.eval_tokens} store rows and held-out tokens, LM loss spliced -> {f.eval}")
    t0 = time.perf_counter()
    ev = evaluate(f.sae, acts=f.acts, lm=True, tokens=cfg.eval_tokens, out=f.eval, device=cfg.device,
                  compute_dtype=cfg.compute_dtype, progress=cfg.progress, reuse=True)
    res.stages.append(Stage("eval", [f.eval], ev.reused, time.perf_counter() - t0, ev))
    if show:
        show["eval"](ev)

    say(f"monoscope run [5/7] features: {cfg.features_tokens} tokens through both SAEs -> {f.features}")
    t0 = time.perf_counter()
    fr = build_features(f.sae, also=[f.small_sae], tokens=cfg.features_tokens, batch_contexts=cfg.batch_contexts,
                        device=cfg.device, compute_dtype=cfg.compute_dtype, feature_map=cfg.feature_map,
                        progress=cfg.progress)
    res.stages.append(Stage("features", list(fr.dbs), fr.new_tokens == 0 and fr.seconds == 0.0,
                            time.perf_counter() - t0, fr))
    if show:
        show["features"](fr)

    if cfg.explain_features > 0:
        from monoscope.interp.explain import check_explained, explain_features

        say(f"monoscope run [6/7] explain: {cfg.explain_features} features with {cfg.explain_llm} "
            f"(scorers {cfg.explain_scorers}) -> {f.features_db}")
        t0 = time.perf_counter()
        ex = explain_features(f.sae, cfg.explain_llm, endpoint=cfg.explain_endpoint, features=cfg.explain_features,
                              scorers=cfg.explain_scorers, progress=cfg.progress, max_concurrency=2)
        reused = not ex.explanations and not ex.explain_failures and ex.explanations_reused > 0
        res.stages.append(Stage("explain", [f.features_db], reused, time.perf_counter() - t0, ex))
        if echo:
            from monoscope.interp.cli import print_explain_summary

            print_explain_summary(ex, sae_dir=str(f.sae))
        check_explained(ex)  # every LLM request failed: an error (exit 2) naming the last failure, not a quiet 0

    if cfg.audit:
        from monoscope.search.audit import audit, findings_lines

        say(f"monoscope run [7/7] audit: concept packs {cfg.audit_packs} on {f.sae} -> {f.audit}"
            + ("" if cfg.audit_steer_top else " (steering skipped: --audit-steer-top 0)"))
        t0 = time.perf_counter()
        au = audit(f.sae, packs=cfg.audit_packs, out=f.audit, device=cfg.device, compute_dtype=cfg.compute_dtype,
                   steer_top=cfg.audit_steer_top,
                   attribution_texts=cfg.audit_attribution_texts, progress=cfg.progress)
        res.stages.append(Stage("audit", [f.audit], au.reused, time.perf_counter() - t0, au))
        if echo:
            print("\n".join(findings_lines(au)) + f"\n  report: {f.audit / 'report.html'}")
    return res


def _capture(cfg: RunConfig, out: Path) -> CaptureResult:
    from monoscope.capture import capture

    return capture(out, model=cfg.model, corpus=cfg.corpus, hook=cfg.hook, tokens=cfg.tokens, ctx_len=cfg.ctx_len,
                   dtype=cfg.dtype, batch_contexts=cfg.batch_contexts, contexts_per_shard=cfg.contexts_per_shard,
                   exclude_bos=not cfg.keep_bos, outlier_factor=cfg.outlier_factor, device=cfg.device,
                   compute_dtype=cfg.compute_dtype, text_field=cfg.text_field, strict_utf8=cfg.strict_utf8,
                   overwrite=cfg.overwrite, progress=cfg.progress)


def _summaries() -> dict[str, Callable[[Any], None]]:
    """The one-screen summary each stage's own command prints."""
    from monoscope.eval.cli import print_eval_summary
    from monoscope.features.cli import print_features_summary
    from monoscope.report import print_store_summary
    from monoscope.train.cli import print_train_summary

    return {"capture": print_store_summary, "train": print_train_summary, "eval": print_eval_summary,
            "features": print_features_summary}


def config_fields() -> list[str]:
    """RunConfig's field names, in order (the CLI maps one option to each)."""
    return [f.name for f in fields(RunConfig)]


# ----------------------------------------------------------------------------- checks


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fail(name: str, value: object, fix: str) -> None:
    raise RunConfigError(f"{_flag(name)} {value!r}: use {fix}")


def _choice(name: str, value: object, choices: tuple[str, ...] | None) -> None:
    if not isinstance(value, str) or (choices is not None and value not in choices):
        _fail(name, value, f"one of {', '.join(choices or ())}")


def _int(name: str, value: object, lo: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        _fail(name, value, fix)


def _count(name: str, value: object) -> None:
    try:
        n = parse_count(value)  # type: ignore[arg-type]
    except (MonoscopeError, ValueError, OverflowError, TypeError):
        n = 0
    if n < 1:
        _fail(name, value, "a positive number of tokens such as 500000, 500k or 2M")
