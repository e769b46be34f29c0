"""SAEBench-compatible metrics on data that ships offline: feature absorption, sparse probing, TPP and SCR.

Definitions and defaults follow SAEBench 0.6.0 (`sae_bench.evals.absorption`, `sae_bench.evals.sparse_probing`,
`sae_bench.evals.scr_and_tpp`);
every place where monoscope differs is listed in `DIFFERENCES` (written into the metric JSON and
docs/saebench.md), so a number here is never silently compared with a different definition.

One module per family, each with its definition in its docstring: `first_letter` (absorption, lower is better),
`probing` (sparse probing, higher is better), `probe_perturbation` (TPP, higher is better), `spurious_correlation`
(SCR, higher is better); `common` holds what they share (residual rows through the model, encoding, probe helpers).
This module holds `DIFFERENCES` and the entry points (`saebench_metrics`, `run_saebench`, `saebench_many`,
`print_saebench_summary`) and re-exports the families' public names. (The family modules are not named `absorption`,
`tpp` and `scr`: those are the functions re-exported here, and a submodule of the same name would be shadowed by
them.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from monoscope.errors import MonoscopeError
from monoscope.eval.saebench.common import _KEEP, _RESID_MEMO, EPS
from monoscope.eval.saebench.first_letter import (
    LETTERS,
    AbsorptionConfig,
    absorption,
    alpha_tokens,
    feature_splits,
    icl_prompt,
    train_multi_probe,
    word_absorption,
)
from monoscope.eval.saebench.probe_perturbation import (
    TPPConfig,
    ablate_pooled,
    binary_task,
    node_effects,
    probe_accuracy,
    top_n_latents,
    tpp,
    tpp_datasets,
    tpp_metric,
    tpp_split,
    tpp_task,
    train_tpp_probe,
)
from monoscope.eval.saebench.probing import (
    Dataset,
    ProbingConfig,
    language_dataset,
    offline_datasets,
    probe_task,
    sparse_probing,
)
from monoscope.eval.saebench.spurious_correlation import (
    PAIRED,
    ROLES,
    SAEBENCH_KEYS,
    TEMPLATES,
    SCRConfig,
    SCRDataset,
    place_names,
    scr,
    scr_accuracies,
    scr_dataset,
    scr_datasets,
    scr_effects,
    scr_metric,
    scr_task,
)

__all__ = [
    "DIFFERENCES", "EPS", "FAMILIES", "LETTERS", "PAIRED", "ROLES", "SAEBENCH_KEYS", "TEMPLATES", "AbsorptionConfig",
    "Dataset", "MonoscopeError", "ProbingConfig", "SCRConfig", "SCRDataset", "TPPConfig", "ablate_pooled",
    "absorption", "alpha_tokens", "binary_task", "check_families", "feature_splits", "icl_prompt", "language_dataset",
    "node_effects",
    "offline_datasets", "place_names", "print_saebench_summary", "probe_accuracy", "probe_task", "run_saebench",
    "saebench_many", "saebench_metrics", "scr", "scr_accuracies", "scr_dataset", "scr_datasets", "scr_effects",
    "scr_metric", "scr_task", "sparse_probing", "top_n_latents", "tpp", "tpp_datasets", "tpp_metric", "tpp_split",
    "tpp_task", "train_multi_probe", "train_tpp_probe", "word_absorption",
]

DIFFERENCES: dict[str, str] = {
    "absorption.words": "SAEBench uses every alphabetic vocabulary token; monoscope samples `max_words` of them "
                        "(seeded) to bound CPU time. Same filter (ASCII letters, optional leading space).",
    "absorption.position": "SAEBench reads the word at a fixed position (-6 for its template and tokenizers); "
                           "monoscope computes the word's last token from the tokenized template suffix and "
                           "skips a word whose prompt does not end with that suffix (count recorded).",
    "absorption.padding": "SAEBench runs prompts of equal length; monoscope right-pads a batch (causal model: "
                          "earlier positions are unchanged) and reads each prompt's own position.",
    "absorption.projection": "SAEBench's latent probe projection is f_i·cos(d_i, p) (unit-norm decoder, no input "
                             "scaling assumed); monoscope uses the latent's exact raw-space contribution "
                             "f_i·‖d_i‖·cos(d_i, p)/c (c = the SAE's input normaliser). Identical for unit-norm "
                             "decoders with c = 1.",
    "absorption.split": "SAEBench builds train/test prompts with a random ICL sample per word from Python's "
                        "global `random`; monoscope seeds one `random.Random(seed)` for the split and the "
                        "ICL examples.",
    "sparse_probing.datasets": "SAEBench uses bias_in_bios, Amazon reviews, GitHub code, Europarl and AG News "
                               "from the Hugging Face Hub; monoscope builds tasks from data that ships offline: "
                               "the concept packs (positives vs negatives), Django's .po catalogues (language of "
                               "a message, one-vs-rest) and the standard library (code vs docstrings). Scores are "
                               "comparable across SAEs of one model, not with SAEBench's published numbers.",
    "sparse_probing.sizes": "SAEBench uses 4,000 train / 1,000 test texts per task; monoscope uses what the "
                            "offline data holds (capped at `max_per_class` per class, 80/20 split).",
    "sparse_probing.llm_probe": "SAEBench trains the full-residual probe with its own torch trainer; monoscope "
                                "uses scikit-learn's LogisticRegression (L2, C=1, max_iter=1000), as SAEBench "
                                "does for the k-latent probes.",
    "tpp.datasets": "SAEBench runs TPP on 5 classes each of bias_in_bios (professions) and Amazon reviews "
                    "(product categories) from the Hugging Face Hub; monoscope on the multi-class data that ships "
                    "offline: `language` (Django's messages in de, es, fr, ja, ru) and `concepts` (the positive "
                    "texts of each concept pack, labelled by pack); a class with fewer than 10 texts is dropped and a "
                    "dataset with fewer than 3 classes skipped (recorded). "
                    "Comparable across SAEs of one model, not with SAEBench's published numbers.",
    "tpp.sizes": "SAEBench uses 2,000 train / 500 test texts per class (a probe's balanced binary set: 4,000 / "
                 "1,000), classes of equal size; monoscope uses "
                 "what the offline data holds, at most `max_per_class` per class (default 150; ja has 80 messages), "
                 "80/20 per class. With unequal classes a probe's positives are cut to the negatives available "
                 "(SAEBench's `prepare_probe_data` would stop).",
    "tpp.negatives": "SAEBench draws each probe's negatives with torch's global generator, and draws the test "
                     "negatives again at every evaluation (clean and each ablation); monoscope draws each probe's "
                     "train and test sets once (numpy, seeded per class) and evaluates every ablation on the same "
                     "test set, so a change in accuracy is the ablation's alone.",
    "tpp.probe_seed": "SAEBench's probe trainer (`train_probe_gpu`: nn.Linear init, AdamW lr 1e-3, batch 16, 20 "
                      "epochs, L1 1e-3, best test-accuracy epoch) is followed step for step, but each class's probe "
                      "starts from its own generator seeded seed + class index instead of one global stream.",
    "tpp.ablation": "SAEBench splices per token (x̂(f with the latents zeroed) + (x − x̂(f))) and mean-pools; monoscope "
                    "computes x − Σ f_j·d_j on the mean-pooled x and f, the same number because the decoder is "
                    "affine. SAEBench's pooled sum also includes its zeroed BOS/padding positions, where the splice "
                    "adds −Σ f_j(0)·d_j for ablated latents that fire on a zero vector; monoscope pools real tokens "
                    "only.",
    "tpp.effects": "SAEBench's latent effect is the clamped class mean difference × probe·W_dec[j] (sae-lens decoders "
                   "are in raw space); monoscope divides by the SAE's input normaliser c (raw-space decoder row), a "
                   "positive factor that does not change which latents are chosen.",
    "tpp.n_values": "SAEBench asserts n ≤ d_sae for n in 2, 5, 10, 20, 50, 100, 500; monoscope skips the n above d_sae "
                    "(listed in `n_values_skipped`).",
    "scr.datasets": "SAEBench pairs bias_in_bios professions (professor/nurse, architect/journalist, "
                    "surgeon/psychologist, attorney/teacher) with gender, and Amazon review categories (4 pairs) with "
                    "rating 1 vs 5, from the Hugging Face Hub: 8 runs. monoscope builds the two attributes from data "
                    "that ships offline: the intended one is a place name's kind (country or territory vs city, "
                    "Babel's CLDR territory names and time-zone exemplar cities), the spurious one the subject's "
                    "gender (5 English sentence frames that differ only in He/She, his/her), each diagonal biased "
                    "once (he-country/she-city and he-city/she-country): 2 runs. The texts are one-sentence "
                    "templates, not biographies. Language (frames in en, fr, de, es) can be the spurious attribute "
                    "too (`SCRConfig.pairs`), but is spread over every token: on SmolLM2-135M ablating 500 latents "
                    "left a language probe at 0.995 and SCR near 0, so it is not a default. Comparable across SAEs of "
                    "one model, not with SAEBench's published numbers.",
    "scr.sizes": "SAEBench uses 1,000 train / 250 test texts per quadrant (each of its six keys 2,000 / 500) and "
                 "asserts its biased quadrants hold more than 2x that; monoscope uses 100 train / 50 test per quadrant "
                 "(keys of 200 / 100; `train_per_quadrant`, `test_per_quadrant`), what CLDR's 257 territories "
                 "give: places are split between train and test by CLDR code (a place is in one split in every "
                 "frame set), 171 countries to train, so a country quadrant's 200 train texts name 171 distinct "
                 "countries (the rest a second time in another frame; counts in `distinct_names_per_quadrant`). "
                 "Test is 1/3 rather than 1/5 of the texts so a test accuracy moves in steps of 0.01.",
    "scr.probe_seed": "SAEBench's probe trainer is followed step for step (as tpp.probe_seed), but each probe starts "
                      "from its own generator seeded seed + its index (spurious 0, intended 1, biased 2), the same in "
                      "every run, and trains on its positives then negatives in order (SAEBench first shuffles the "
                      "set with torch's global generator; the trainer shuffles every epoch either way).",
    "scr.ablations": "SAEBench also ablates the biased probe's own top-n latents and evaluates every probe then; "
                     "those accuracies do not enter the metric, and monoscope ablates only the spurious and intended "
                     "probes' latents.",
    "scr.ablation": "As tpp.ablation: x − Σ f_j·d_j on the pooled x and f over real tokens.",
    "scr.effects": "SAEBench's SCR effect |class mean difference × probe·W_dec[j]| (no clamp) with W_dec[j]/c, the "
                   "raw-space row of a normalised SAE (a positive factor: the same latents chosen).",
    "scr.n_values": "As tpp.n_values: the n above d_sae are skipped (listed in `n_values_skipped`).",
}


FAMILIES = ("absorption", "probing", "tpp", "scr")
"""The metric families `--saebench-metrics` chooses from (JSON keys absorption, sparse_probing, tpp, scr)."""


def check_families(families: Sequence[str]) -> list[str]:
    """The families in FAMILIES order, or a one-line error naming the unknown one."""
    for f in families:
        if f not in FAMILIES:
            raise MonoscopeError(f"--saebench-metrics: unknown metric family {f!r} (choose from "
                                 f"{', '.join(FAMILIES)}, comma-separated)")
    if not families:
        raise MonoscopeError(f"--saebench-metrics: name at least one of {', '.join(FAMILIES)}")
    return [f for f in FAMILIES if f in families]


def saebench_metrics(lm: Any, sae: Any, hook: Any, *, absorption_cfg: AbsorptionConfig | None = None,
                     probing_cfg: ProbingConfig | None = None, tpp_cfg: TPPConfig | None = None,
                     scr_cfg: SCRConfig | None = None, families: Sequence[str] = FAMILIES) -> dict[str, Any]:
    """The metric families (all four by default) in one JSON-able dict, with the list of differences from
    SAEBench."""
    from threadpoolctl import threadpool_limits

    families = check_families(families)
    keep = _KEEP[0]
    _KEEP[0] = True  # sparse probing and TPP share the language texts: one model pass
    try:
        with threadpool_limits(1):  # scikit-learn's small L-BFGS fits are ~3x faster on one BLAS thread
            return _metrics(lm, sae, hook, absorption_cfg, probing_cfg, tpp_cfg, scr_cfg, families)
    finally:
        _KEEP[0] = keep
        if not keep:
            _RESID_MEMO.clear()


def _metrics(lm: Any, sae: Any, hook: Any, absorption_cfg: AbsorptionConfig | None,
             probing_cfg: ProbingConfig | None, tpp_cfg: TPPConfig | None, scr_cfg: SCRConfig | None,
             families: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"format": "monoscope-saebench/1", "reference": "SAEBench 0.6.0 (sae_bench.evals)",
                           "families": families}
    if "absorption" in families:
        out["absorption"] = absorption(lm, sae, hook, absorption_cfg)
    if "probing" in families:
        out["sparse_probing"] = sparse_probing(lm, sae, hook, probing_cfg)
    if "tpp" in families:
        out["tpp"] = tpp(lm, sae, hook, tpp_cfg)
    if "scr" in families:
        out["scr"] = scr(lm, sae, hook, scr_cfg)
    out["differences_from_saebench"] = DIFFERENCES
    return out


def run_saebench(sae_dir: str | Any, *, out: str | Any | None = None, model: str | None = None,
                 device: str = "auto", max_words: int | None = None, max_per_class: int | None = None,
                 packs: list[str] | None = None, families: Sequence[str] = FAMILIES) -> tuple[Any, dict[str, Any]]:
    """Open the SAE and its model, compute the metric families, write `OUT/saebench.json` (atomic).
    Returns (path, metrics)."""
    families = check_families(families)  # before loading the model
    from pathlib import Path

    from monoscope.eval.run import default_out
    from monoscope.fileio import nonfinite_to_null, write_json_atomic
    from monoscope.sae.io import weights_sha256
    from monoscope.steer.target import open_target

    t = open_target(sae_dir, model=model, device=device, compute_dtype="fp32")
    a_cfg = AbsorptionConfig() if max_words is None else AbsorptionConfig(max_words=max_words)
    p_cfg = ProbingConfig(packs=packs)
    t_cfg = TPPConfig(packs=packs)
    if max_per_class is not None:
        p_cfg.max_per_class = t_cfg.max_per_class = max_per_class
    torch.manual_seed(0)
    metrics = saebench_metrics(t.lm, t.sae, t.hook, absorption_cfg=a_cfg, probing_cfg=p_cfg, tpp_cfg=t_cfg,
                               scr_cfg=SCRConfig(), families=families)
    metrics["sae"] = {"path": str(sae_dir), "weights_sha256": weights_sha256(sae_dir), "arch": t.sae.cfg.arch,
                      "d_sae": t.sae.cfg.d_sae, "hook": str(t.hook), "model": t.lm.model_id}
    folder = Path(out) if out is not None else default_out(Path(sae_dir))
    folder.mkdir(parents=True, exist_ok=True)
    clean, _ = nonfinite_to_null(metrics)
    path = folder / "saebench.json"
    write_json_atomic(path, clean)
    return path, metrics


def print_saebench_summary(metrics: dict[str, Any], path: Any) -> None:
    """The headline numbers, each with its direction."""
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    a = metrics.get("absorption")
    if a is not None:
        print(f"absorption fraction (lower is better)   {fmt(a['mean_absorption_fraction_score'])}")
        print(f"full absorption (lower is better)       {fmt(a['mean_full_absorption_score'])}")
        print(f"letters evaluated / words               {a['letters_evaluated']} / {a['words']}")
        if a.get("reason"):
            print(f"note: {a['reason']}")
    if "sparse_probing" in metrics:
        for k, v in metrics["sparse_probing"]["mean"].items():
            print(f"{k + ' (higher is better)':<40}{v:.4f}")
    for key, name in (("tpp", "TPP"), ("scr", "SCR")):
        fam = metrics.get(key)
        if fam is None:
            continue
        for k in fam["higher_is_better"]:
            print(f"{k + ' (higher is better)':<40} {fam['mean'][k]:.4f}")
        skipped = ", ".join(s["name"] for s in fam["skipped_datasets"])
        label = f"{name} datasets (skipped: {skipped})" if skipped else f"{name} datasets"
        print(f"{label:<40}{', '.join(fam['datasets']) or 'none'}")
        if fam.get("reason"):
            print(f"note: {name} not computed: {fam['reason']}")
    print(f"results: {path}")


def saebench_many(lm: Any, saes: dict[str, Any], hook: Any, *, absorption_cfg: AbsorptionConfig | None = None,
                  probing_cfg: ProbingConfig | None = None, tpp_cfg: TPPConfig | None = None,
                  scr_cfg: SCRConfig | None = None) -> dict[str, dict[str, Any]]:
    """`saebench_metrics` for several SAEs on one model and hook, running the model once per text (the residual
    rows are kept for the duration of the call). Each SAE's numbers equal a run of its own."""
    _KEEP[0] = True
    try:
        out = {}
        for name, sae in saes.items():
            torch.manual_seed(0)
            out[name] = saebench_metrics(lm, sae, hook, absorption_cfg=absorption_cfg, probing_cfg=probing_cfg,
                                         tpp_cfg=tpp_cfg, scr_cfg=scr_cfg)
        return out
    finally:
        _KEEP[0] = False
        _RESID_MEMO.clear()
