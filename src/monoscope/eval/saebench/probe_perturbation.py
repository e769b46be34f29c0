"""Targeted probe perturbation (higher is better): on the multi-class offline datasets (language of Django's messages,
concept pack by pack), one residual probe per class (SAEBench's torch trainer); for each class the n latents with the
largest effect on its probe are zero-ablated with the SAE's error kept, and the metric is the drop of that class's
probe accuracy minus the mean drop of the other classes' probes, for n = 2 .. 500.

Follows SAEBench 0.6.0's `sae_bench.evals.scr_and_tpp`; the differences are in `DIFFERENCES` (the package's).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from monoscope.eval.saebench.common import _encode_tokens
from monoscope.eval.saebench.probing import Dataset, language_dataset


@dataclass
class ScrAndTppSettings:
    """What TPP and SCR share of SAEBench's `ScrAndTppEvalConfig`: the n values, the context, the probe trainer's
    settings and the seed."""

    n_values: list[int] = field(default_factory=lambda: [2, 5, 10, 20, 50, 100, 500])
    context_length: int = 128
    probe_epochs: int = 20
    probe_lr: float = 1e-3
    probe_batch_size: int = 16
    probe_l1_penalty: float = 1e-3
    early_stopping_patience: int = 20
    seed: int = 42
    batch: int = 16

    def train_probe(self, x_tr: Tensor, y_tr: Tensor, x_te: Tensor, y_te: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """The i-th probe of a task (`train_tpp_probe` with these settings, seeded seed + i) -> (weight, bias)."""
        w, b, _ = train_tpp_probe(x_tr, y_tr, x_te, y_te, epochs=self.probe_epochs, lr=self.probe_lr,
                                  batch_size=self.probe_batch_size, l1_penalty=self.probe_l1_penalty,
                                  patience=self.early_stopping_patience, seed=self.seed + i)
        return w, b


@dataclass
class TPPConfig(ScrAndTppSettings):
    """SAEBench's `ScrAndTppEvalConfig` defaults for TPP, plus the offline data sizes (see DIFFERENCES)."""

    max_per_class: int = 150
    train_fraction: float = 0.8
    languages: list[str] = field(default_factory=lambda: ["de", "fr", "es", "ru", "ja"])
    packs: list[str] | None = None
    min_classes: int = 3
    min_per_class: int = 10


def tpp_datasets(cfg: TPPConfig) -> tuple[list[Dataset], list[dict[str, str]]]:
    """The multi-class offline datasets: the language of Django's messages and `concepts` (the positive texts of
    each concept pack, labelled by pack). Returns (datasets, skipped: name and reason)."""
    from monoscope.search.packs import _names, load_pack

    out: list[Dataset] = []
    skipped: list[dict[str, str]] = []
    lang = language_dataset(cfg.languages, cfg.max_per_class, random.Random(cfg.seed))
    if lang is None:
        skipped.append({"name": "language", "reason": "Django's catalogues are not installed (pip install django)"})
    else:
        out.append(lang)
    texts: list[str] = []
    labels: list[str] = []
    versions = []
    for name in (cfg.packs if cfg.packs is not None else _names()):
        p = load_pack(name)
        pos = [i.text for i in p.items if i.label == 1][:cfg.max_per_class]
        texts += pos
        labels += [name] * len(pos)
        versions.append(f"{name} v{p.version}")
    out.append(Dataset("concepts", texts, labels, "monoscope concept packs (positives): " + ", ".join(versions)))
    kept = []
    for ds in out:
        small = {c for c in set(ds.labels) if ds.labels.count(c) < cfg.min_per_class}
        if small:
            keep = [i for i, c in enumerate(ds.labels) if c not in small]
            ds = Dataset(ds.name, [ds.texts[i] for i in keep], [ds.labels[i] for i in keep], ds.source)
        n = len(set(ds.labels))
        if n < cfg.min_classes:
            skipped.append({"name": ds.name, "reason": f"{n} classes; TPP needs at least {cfg.min_classes}"})
        else:
            kept.append(ds)
    return kept, skipped


def tpp_split(labels: Sequence[str], train_fraction: float, seed: int) -> tuple[dict[str, np.ndarray],
                                                                               dict[str, np.ndarray]]:
    """Per class, the train and test indices: the class's texts shuffled (seeded), the first `train_fraction` to
    train."""
    lab = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for c in sorted(set(labels)):
        idx = rng.permutation(np.where(lab == c)[0])
        cut = int(len(idx) * train_fraction)
        train[c], test[c] = idx[:cut], idx[cut:]
    return train, test


def binary_task(idx_by_class: dict[str, np.ndarray], cls: str, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """SAEBench's `prepare_probe_data` for TPP: every text of `cls` (label 1) against as many others (label 0),
    ceil(n / (classes − 1)) drawn from each other class, then n of those at random. Where the other classes are too
    small to give n (unequal classes; SAEBench's are equal and it would stop), the positives are cut to the
    negatives' count. Returns (indices, labels)."""
    pos = idx_by_class[cls]
    others = [c for c in idx_by_class if c != cls]
    per = math.ceil(len(pos) / len(others))
    neg = np.concatenate([rng.permutation(idx_by_class[c])[:per] for c in others])
    neg = rng.permutation(neg)[:len(pos)]
    pos = pos[:len(neg)]
    return np.concatenate([pos, neg]), np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])


def train_tpp_probe(x_tr: Tensor, y_tr: Tensor, x_te: Tensor, y_te: Tensor, *, epochs: int = 20, lr: float = 1e-3,
                    batch_size: int = 16, l1_penalty: float | None = 1e-3, patience: int = 20,
                    seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """SAEBench's `train_probe_gpu`: a linear probe (nn.Linear init), AdamW (lr, default weight decay 0.01), BCE +
    l1·Σ|w|, shuffled batches; the epoch with the best test accuracy is kept (as SAEBench; patience = epochs by
    default, so every epoch runs). Random numbers come from one generator seeded `seed`, in the order SAEBench
    draws them from torch's global one. Returns (weight [d], bias [], best test accuracy)."""
    g = torch.Generator().manual_seed(seed)
    d = x_tr.shape[1]
    with torch.inference_mode(False), torch.enable_grad():
        x_tr, y_tr, x_te, y_te = x_tr.clone(), y_tr.clone(), x_te.clone(), y_te.clone()
        w = torch.empty(1, d)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        bound = 1 / math.sqrt(d)
        b = torch.empty(1).uniform_(-bound, bound, generator=g)
        w.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.AdamW([w, b], lr=lr)
        loss_fn = nn.BCEWithLogitsLoss()
        best, best_wb, waited = 0.0, (w.detach().clone(), b.detach().clone()), 0
        for _ in range(epochs):
            perm = torch.randperm(len(x_tr), generator=g)
            for s in range(0, len(x_tr), batch_size):
                idx = perm[s:s + batch_size]
                loss = loss_fn((x_tr[idx] @ w.T + b).squeeze(-1), y_tr[idx].float())
                if l1_penalty is not None:
                    loss = loss + l1_penalty * w.abs().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            acc = probe_accuracy(w.detach()[0], b.detach()[0], x_te, y_te)
            if acc > best:
                best, best_wb, waited = acc, (w.detach().clone(), b.detach().clone()), 0
            else:
                waited += 1
            if waited >= patience:
                break
    return best_wb[0][0], best_wb[1][0], best


def probe_accuracy(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> float:
    """SAEBench's `test_probe_gpu`: the fraction of texts where (logit > 0) equals the label."""
    return float((((x @ w + b) > 0).long() == y).float().mean())


def node_effects(f_tr: Tensor, y_tr: Tensor, w: Tensor, w_dec_raw: Tensor) -> Tensor:
    """SAEBench's TPP latent effects on a class's probe: (mean pooled code of the class − of the others, clamped
    at 0) × (probe weight · the latent's raw-space decoder row). [F]"""
    diff = (f_tr[y_tr == 1].mean(0) - f_tr[y_tr == 0].mean(0)).clamp_min(0.0)
    return diff * (w_dec_raw @ w)


def top_n_latents(effects: Tensor, n: int) -> Tensor:
    """SAEBench's `select_top_n_features`: the k = min(n, number of non-zero effects) largest effects. As there,
    a zero effect ranks above a negative one, so with negative effects present some zero-effect latents are
    chosen too."""
    k = min(n, int((effects != 0).sum()))
    return torch.topk(effects, k).indices if k else torch.zeros(0, dtype=torch.long)


def ablate_pooled(x: Tensor, f: Tensor, latents: Tensor, w_dec_raw: Tensor) -> Tensor:
    """Mean-pooled residuals with `latents` zero-ablated and the SAE's error kept: per token x̂(f with the latents
    zeroed) + (x − x̂(f)) = x − Σ_latents f_j·d_j (d_j the raw-space decoder row); the decoder is affine, so the
    token mean of that is the same expression on the pooled x and f."""
    return x - f[:, latents] @ w_dec_raw[latents]


def tpp_metric(clean: dict[str, float], ablated: dict[str, dict[int, dict[str, float]]]) -> tuple[
        dict[str, float], dict[str, dict[str, float]]]:
    """SAEBench's `create_tpp_plotting_dict`: for ablated class i and n, intended = clean_i − ablated_i,
    unintended = the mean over j ≠ i of clean_j − ablated_j, total = intended − unintended; averaged over classes.
    Returns (means, per class)."""
    per_class: dict[str, dict[str, float]] = {}
    for cls in clean:
        row: dict[str, float] = {}
        for n, accs in ablated[cls].items():
            intended = clean[cls] - accs[cls]
            others = [clean[o] - accs[o] for o in clean if o != cls]
            unintended = sum(others) / len(others)
            row[f"tpp_threshold_{n}_total_metric"] = intended - unintended
            row[f"tpp_threshold_{n}_intended_diff_only"] = intended
            row[f"tpp_threshold_{n}_unintended_diff_only"] = unintended
        per_class[cls] = row
    keys = next(iter(per_class.values())).keys()
    return {k: sum(r[k] for r in per_class.values()) / len(per_class) for k in keys}, per_class


def tpp_task(x: np.ndarray, f: np.ndarray, labels: Sequence[str], w_dec_raw: Tensor, cfg: TPPConfig,
             probes: dict[str, tuple[Tensor, Tensor]] | None = None) -> dict[str, Any]:
    """TPP on one multi-class dataset from pooled residuals x [N, d] and pooled SAE codes f [N, F]: one probe per
    class on the residual (`probes` given: those (weight, bias) instead), each class's top-n latents by effect on
    its probe, every probe's test accuracy with them ablated, and the metric (`tpp_metric`). Class i's binary
    train/test sets are drawn with `np.random.default_rng([seed, i, 0 or 1])`."""
    train, test = tpp_split(labels, cfg.train_fraction, cfg.seed)
    classes = sorted(train)
    xt, ft = torch.from_numpy(x), torch.from_numpy(f)
    probes = dict(probes) if probes is not None else {}
    tests, clean, effects = {}, {}, {}
    for i, cls in enumerate(classes):
        tr_idx, tr_y = binary_task(train, cls, np.random.default_rng([cfg.seed, i, 0]))
        te_idx, te_y = binary_task(test, cls, np.random.default_rng([cfg.seed, i, 1]))
        ytr, yte = torch.from_numpy(tr_y), torch.from_numpy(te_y)
        if cls not in probes:
            probes[cls] = cfg.train_probe(xt[tr_idx], ytr, xt[te_idx], yte, i)
        w, b = probes[cls]
        tests[cls] = (torch.from_numpy(te_idx), yte)
        clean[cls] = probe_accuracy(w, b, xt[te_idx], yte)
        effects[cls] = node_effects(ft[tr_idx], ytr, w, w_dec_raw)
    n_values = [n for n in cfg.n_values if n <= f.shape[1]]
    ablated: dict[str, dict[int, dict[str, float]]] = {}
    latents: dict[str, dict[int, list[int]]] = {}
    for cls in classes:
        ablated[cls], latents[cls] = {}, {}
        for n in n_values:
            sel = top_n_latents(effects[cls], n)
            latents[cls][n] = sel.tolist()
            accs = {}
            for other in classes:
                idx, y = tests[other]
                accs[other] = probe_accuracy(*probes[other], ablate_pooled(xt[idx], ft[idx], sel, w_dec_raw), y)
            ablated[cls][n] = accs
    mean, per_class = tpp_metric(clean, ablated)
    return {"classes": classes, "train_per_class": {c: len(train[c]) for c in classes},
            "test_per_class": {c: len(test[c]) for c in classes},
            "n_values": n_values, "n_values_skipped": [n for n in cfg.n_values if n > f.shape[1]],
            "mean": mean, "per_class": per_class, "clean_accuracy": clean,
            "ablated_accuracy": {c: {str(n): a for n, a in v.items()} for c, v in ablated.items()},
            "ablated_latents": {c: {str(n): ls[:20] for n, ls in v.items()} for c, v in latents.items()}}


def tpp(lm: Any, sae: Any, hook: Any, cfg: TPPConfig | None = None,
        datasets: list[Dataset] | None = None) -> dict[str, Any]:
    """Targeted probe perturbation on the multi-class offline datasets, averaged over datasets (SAEBench's
    `average_results_dictionaries`); higher is better."""
    cfg = cfg or TPPConfig()
    skipped: list[dict[str, str]] = []
    if datasets is None:
        datasets, skipped = tpp_datasets(cfg)
    if not datasets:
        return {"higher_is_better": [], "mean": {}, "datasets": {}, "skipped_datasets": skipped, "config": asdict(cfg),
                "reason": f"no offline dataset with at least {cfg.min_classes} classes of {cfg.min_per_class}+ texts "
                          "(install django for its translation catalogues, or use more concept packs)"}
    w_dec_raw = sae.W_dec.detach().float().cpu() / float(sae.cfg.normaliser)
    per_ds = {}
    for ds in datasets:
        x, f = _encode_tokens(lm, sae, hook, ds.texts, ctx_len=cfg.context_length, batch=cfg.batch)
        per_ds[ds.name] = tpp_task(x, f, ds.labels, w_dec_raw, cfg)
    keys = next(iter(per_ds.values()))["mean"].keys()
    mean = {k: float(np.mean([r["mean"][k] for r in per_ds.values()])) for k in keys}
    return {"higher_is_better": [k for k in mean if k.endswith("_total_metric")], "mean": mean,
            "datasets": {d.name: {"texts": len(d.texts), "source": d.source, **per_ds[d.name]} for d in datasets},
            "skipped_datasets": skipped, "config": asdict(cfg)}
