"""Sparse probing (higher is better): binary tasks built from the concept packs, Django's translation
catalogues (language of a message) and the standard library (code vs its docstrings); mean-pooled activations,
a logistic probe on the full residual vs on the k = 1, 2, 5 SAE latents with the largest class mean difference.

Follows SAEBench 0.6.0's `sae_bench.evals.sparse_probing`; the differences are in `DIFFERENCES` (the package's).
`Dataset` and `language_dataset` serve TPP too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from monoscope.errors import MonoscopeError
from monoscope.eval.saebench.common import _encode_tokens, _sk_probe


@dataclass
class ProbingConfig:
    """SAEBench's `SparseProbingEvalConfig` defaults (k = 1, 2, 5; context 128), plus offline data sizes."""

    k_values: list[int] = field(default_factory=lambda: [1, 2, 5])
    context_length: int = 128
    max_per_class: int = 150
    train_fraction: float = 0.8
    languages: list[str] = field(default_factory=lambda: ["de", "fr", "es", "ru", "ja"])
    packs: list[str] | None = None
    seed: int = 42
    batch: int = 16


@dataclass
class Dataset:
    name: str
    texts: list[str]
    labels: list[str]
    source: str


def language_dataset(languages: Sequence[str], max_per_class: int, rng: random.Random) -> Dataset | None:
    """Django's translated messages (20+ characters, not fuzzy), at most `max_per_class` per language, labelled by
    language; None without Django or with fewer than two languages."""
    try:
        import django
    except ImportError:
        return None
    from pathlib import Path

    from monoscope.corpus.po import read_po

    root = Path(django.__file__).parent / "conf" / "locale"
    texts: list[str] = []
    labels: list[str] = []
    for lang in languages:
        path = root / lang / "LC_MESSAGES" / "django.po"
        if not path.is_file():
            continue
        msgs = sorted({t for e in read_po(path) if not e.fuzzy for t in e.translated if len(t) >= 20})
        rng.shuffle(msgs)
        texts += msgs[:max_per_class]
        labels += [lang] * len(msgs[:max_per_class])
    if len(set(labels)) < 2:
        return None
    return Dataset("language", texts, labels, f"Django {django.__version__} conf/locale/*/django.po")


def offline_datasets(cfg: ProbingConfig) -> list[Dataset]:
    """The probing datasets: one per concept pack, the language of Django's messages, stdlib code vs docstrings."""
    from monoscope.search.packs import _names, load_pack

    rng = random.Random(cfg.seed)
    out: list[Dataset] = []
    for name in (cfg.packs if cfg.packs is not None else _names()):
        p = load_pack(name)
        out.append(Dataset(f"pack:{name}", [i.text for i in p.items], [str(i.label) for i in p.items],
                           f"monoscope concept pack {name} v{p.version}"))
    lang = language_dataset(cfg.languages, cfg.max_per_class, rng)
    if lang is not None:
        out.append(lang)
    from monoscope.corpus.sources import _docstrings, _read_source, stdlib_files

    code, prose = [], []
    for path in stdlib_files()[:200]:
        text = _read_source(path)
        if not text:
            continue
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", '"', "'"))]
        if len(lines) >= 12:
            code.append("\n".join(lines[len(lines) // 2:len(lines) // 2 + 12]))
        prose += [d for d in _docstrings(text) if len(d) >= 80][:2]
    rng.shuffle(code)
    rng.shuffle(prose)
    n = min(len(code), len(prose), cfg.max_per_class)
    if n >= 10:
        out.append(Dataset("code", code[:n] + prose[:n], ["code"] * n + ["docstring"] * n,
                           "Python standard library sources"))
    return out


def probe_task(x_tr: np.ndarray, x_te: np.ndarray, f_tr: np.ndarray, f_te: np.ndarray, y_tr: np.ndarray,
               y_te: np.ndarray, k_values: Sequence[int]) -> dict[str, Any]:
    """One binary task (labels 1/0): test accuracy of a logistic probe on the residual x, on all latents f, and on
    the k latents with the largest |mean(pos) − mean(neg)| over the train split, as SAEBench's
    `get_top_k_mean_diff_mask` + `train_sklearn_probe` (tests/eval/test_saebench.py runs both on the same data)."""
    llm = _sk_probe(x_tr, y_tr, max_iter=1000)
    row: dict[str, Any] = {"llm_test_accuracy": float((llm.predict(x_te) == y_te).mean())}
    diff = np.abs(f_tr[y_tr == 1].mean(0) - f_tr[y_tr == 0].mean(0))
    order = np.argsort(-diff, kind="stable")
    for k in k_values:
        feats = order[:k]
        sk = _sk_probe(f_tr[:, feats], y_tr, max_iter=1000)
        row[f"sae_top_{k}_test_accuracy"] = float((sk.predict(f_te[:, feats]) == y_te).mean())
        row[f"sae_top_{k}_features"] = [int(i) for i in feats]
    sk = _sk_probe(f_tr, y_tr, max_iter=1000)
    row["sae_test_accuracy"] = float((sk.predict(f_te) == y_te).mean())
    return row


def sparse_probing(lm: Any, sae: Any, hook: Any, cfg: ProbingConfig | None = None,
                   datasets: list[Dataset] | None = None) -> dict[str, Any]:
    """Test accuracy of a full-residual probe and of k-latent probes (latents by class mean difference), one
    binary one-vs-rest task per class of each dataset, balanced by subsampling the rest."""
    cfg = cfg or ProbingConfig()
    datasets = datasets if datasets is not None else offline_datasets(cfg)
    tasks: list[dict[str, Any]] = []
    for ds in datasets:
        x, f = _encode_tokens(lm, sae, hook, ds.texts, ctx_len=cfg.context_length, batch=cfg.batch)
        labels = np.array(ds.labels)
        classes = sorted(set(ds.labels))
        for cls in (classes if len(classes) > 2 else classes[-1:]):
            rng = np.random.default_rng(cfg.seed)
            pos = np.where(labels == cls)[0]
            neg = np.where(labels != cls)[0]
            n = min(len(pos), len(neg))
            pos, neg = rng.permutation(pos)[:n], rng.permutation(neg)[:n]
            idx = np.concatenate([pos, neg])
            yb = np.concatenate([np.ones(n, np.int64), np.zeros(n, np.int64)])
            perm = rng.permutation(len(idx))
            idx, yb = idx[perm], yb[perm]
            ntr = int(len(idx) * cfg.train_fraction)
            tr, te = idx[:ntr], idx[ntr:]
            ytr, yte = yb[:ntr], yb[ntr:]
            if len(set(ytr.tolist())) < 2 or len(te) == 0:
                continue
            row: dict[str, Any] = {"dataset": ds.name, "class": cls, "train": int(ntr), "test": len(te)}
            row.update(probe_task(x[tr], x[te], f[tr], f[te], ytr, yte, cfg.k_values))
            tasks.append(row)
    if not tasks:
        raise MonoscopeError("no sparse-probing task could be built from the offline data (concept packs, Django "
                             "catalogues, standard library): check that monoscope's packs are installed")
    keys = ["llm_test_accuracy", "sae_test_accuracy"] + [f"sae_top_{k}_test_accuracy" for k in cfg.k_values]
    return {"higher_is_better": keys, "mean": {k: float(np.mean([t[k] for t in tasks])) for k in keys},
            "tasks": tasks, "datasets": [{"name": d.name, "texts": len(d.texts), "source": d.source}
                                         for d in datasets], "config": asdict(cfg)}

