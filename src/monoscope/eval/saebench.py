"""SAEBench-compatible metrics on data that ships offline: feature absorption, sparse probing and TPP.

Definitions and defaults follow SAEBench 0.6.0 (`sae_bench.evals.absorption`, `sae_bench.evals.sparse_probing`,
`sae_bench.evals.scr_and_tpp`);
every place where monoscope differs is listed in `DIFFERENCES` (written into the metric JSON and
docs/saebench.md), so a number here is never silently compared with a different definition.

Absorption (first-letter task; lower is better): ICL prompts "{word} has the first letter:" over the
alphabetic tokens of the model's own vocabulary; a logistic probe on the residual per letter (ground truth),
k-sparse probes on SAE latents (an L1 probe ranks the latents, k = 1..10, feature splits found by an F1 jump
of 0.03), then for every test word the ground-truth probe gets right: the fraction of the probe projection
carried by other probe-aligned latents instead of the letter's own (absorption fraction), and whether one
such latent carries it alone while the letter's latents are silent (full absorption).

Sparse probing (higher is better): binary tasks built from the concept packs, Django's translation
catalogues (language of a message) and the standard library (code vs its docstrings); mean-pooled activations,
a logistic probe on the full residual vs on the k = 1, 2, 5 SAE latents with the largest class mean difference.

Targeted probe perturbation (higher is better): on the multi-class offline datasets (language of Django's messages,
concept pack by pack), one residual probe per class (SAEBench's torch trainer); for each class the n latents with the
largest effect on its probe are zero-ablated with the SAE's error kept, and the metric is the drop of that class's
probe accuracy minus the mean drop of the other classes' probes, for n = 2 .. 500.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from monoscope.errors import MonoscopeError

LETTERS = "abcdefghijklmnopqrstuvwxyz"
EPS = 1e-6  # SAEBench's EPS for "a latent fired"

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
    "scr": "Spurious correlation removal needs texts that each carry two binary attributes with all four combinations "
           "well populated, so that a probe is trained on a fully correlated subset (SAEBench: every professor male, "
           "every nurse female, in bias_in_bios; category x rating in Amazon reviews, 1,000 train texts per "
           "combination) and the latents of the spurious attribute are ablated. The offline data carries one label "
           "per text (concept packs: concept or not; language; code or docstring). The one offline candidate with "
           "two attributes, Django's catalogues (language x the catalogue a message is from, e.g. core vs "
           "contrib.admin: 104 to 138 messages per combination for de/fr), is about 10x smaller than SAEBench's "
           "sets and untested as a probe target, so SCR is not computed.",
}


def _first_letter(word: str) -> str:
    chars = [c for c in word.strip() if c.isalpha()]
    return chars[0].lower()


def alpha_tokens(tokenizer: Any) -> list[str]:
    """Vocabulary entries made of ASCII letters only, optionally with one leading space (SAEBench's
    `get_alpha_tokens`), as decoded strings, sorted and deduplicated."""
    allowed = set(LETTERS + LETTERS.upper())
    out = set()
    for tok in tokenizer.get_vocab():
        word = tokenizer.convert_tokens_to_string([tok])
        w = word[1:] if word.startswith(" ") else word
        if w and all(c in allowed for c in w):
            out.add(word)
    return sorted(out)


def icl_prompt(word: str, examples: Sequence[str], rng: random.Random, template: str, n_icl: int) -> str:
    """SAEBench's `create_icl_prompt` with the first-letter formatter and a separator before the first example."""
    pool = [e for e in examples if e != word]
    icl = rng.sample(pool, min(n_icl, len(pool)))
    lines = [template.format(word=e) + " " + _first_letter(e).upper() for e in icl]
    return "\n" + "\n".join(lines) + "\n" + template.format(word=word)


# ---------------------------------------------------------------------------------------------- probes
class _Probe(nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, n)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def train_multi_probe(x: Tensor, y: Tensor, *, epochs: int = 50, lr: float = 1e-2, end_lr: float = 1e-5,
                      weight_decay: float = 1e-4, l1: float = 0.0, batch_size: int = 4096, seed: int = 0,
                      map_x: Callable[[Tensor], Tensor] | None = None, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """SAEBench's `train_multi_probe`: one-vs-rest logistic probes trained together (BCE with pos_weight
    = negatives/positives per class, Adam, exponential decay lr → end_lr over the epochs, optional L1 on
    the weights averaged over probes). Returns (weights [n, dim], biases [n])."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    yf = y.float()
    pos = yf.sum(0).clamp_min(1)
    pos_weight = (yf.shape[0] - yf.sum(0)) / pos
    probe = _Probe(dim if dim is not None else x.shape[1], y.shape[1])
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for s in range(0, x.shape[0], batch_size):
            idx = perm[s:s + batch_size]
            xb = x[idx] if map_x is None else map_x(x[idx])
            opt.zero_grad()
            loss = loss_fn(probe(xb), yf[idx])
            if l1:
                loss = loss + l1 * probe.fc.weight.abs().sum(dim=-1).mean()
            loss.backward()
            opt.step()
        sched.step()
    return probe.fc.weight.detach().clone(), probe.fc.bias.detach().clone()


def _sk_probe(x: np.ndarray, y: np.ndarray, **kw: Any) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(**kw).fit(x, y)


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float(np.sum(y & pred))
    fp = float(np.sum(~y & pred))
    fn = float(np.sum(y & ~pred))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


# ---------------------------------------------------------------------------------------------- encoding
_KEEP = [False]
_RESID_MEMO: dict[tuple[Any, ...], list[Tensor]] = {}
"""Residual rows per text, keyed by (model, hook, texts, positions, ctx_len): several SAEs on one model and hook
(`saebench_many`) run the model once."""


def _resid_rows(lm: Any, hp: Any, texts: Sequence[str], *, ctx_len: int, batch: int,
                positions: Sequence[int] | None) -> list[Tensor]:
    """Per text: the residual row at `positions[i]` (negative: from the end), or its rows after BOS."""
    import hashlib

    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key = (id(lm.model), str(hp), digest, tuple(positions) if positions is not None else None, ctx_len)
    if key in _RESID_MEMO:
        return _RESID_MEMO[key]
    tok = lm.tokenizer
    bos = lm.special_ids()[0]
    ids = [([bos] + tok(t, add_special_tokens=False)["input_ids"])[:ctx_len] for t in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    rows: list[Tensor | None] = [None] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # length-sorted batches, less padding
    for s in range(0, len(order), batch):
        sel = order[s:s + batch]
        T = max(len(ids[i]) for i in sel)
        x = torch.full((len(sel), T), pad, dtype=torch.long)
        for r, i in enumerate(sel):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
        acts = lm.acts(hp, x).cpu()  # [B, T, d]; right padding leaves a causal model's earlier rows unchanged
        for r, i in enumerate(sel):
            n = len(ids[i])
            if positions is not None:
                p = positions[i] if positions[i] >= 0 else n + positions[i]
                rows[i] = acts[r, p:p + 1].clone()
            else:
                rows[i] = acts[r, 1:n].clone() if n > 1 else acts[r, :1].clone()
    out = [r for r in rows if r is not None]
    if not _KEEP[0]:
        _RESID_MEMO.clear()  # one entry outside `saebench_many`: bounded memory
    _RESID_MEMO[key] = out
    return out


def _encode_tokens(lm: Any, sae: Any, hp: Any, texts: Sequence[str], *, ctx_len: int, batch: int,
                   positions: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise (BOS + text, cut to ctx_len), run to the hook, and return per text either the activation at
    `positions[i]` or the mean over its tokens after BOS: (residual [N, d] float32, SAE codes [N, F] float32)."""
    dev = next(sae.parameters()).device
    res, codes = [], []
    with torch.inference_mode():
        for rows in _resid_rows(lm, hp, texts, ctx_len=ctx_len, batch=batch, positions=positions):
            res.append(rows.mean(0).numpy())
            codes.append(sae.encode_raw(rows.to(dev)).float().mean(0).cpu().numpy())
    return np.stack(res).astype(np.float32), np.stack(codes).astype(np.float32)


# ---------------------------------------------------------------------------------------------- absorption
@dataclass
class AbsorptionConfig:
    """SAEBench's `AbsorptionEvalConfig` defaults, plus `max_words` (see DIFFERENCES)."""

    prompt_template: str = "{word} has the first letter:"
    max_icl_examples: int = 10
    max_words: int = 2000
    train_fraction: float = 0.8
    max_k_value: int = 10
    f1_jump_threshold: float = 0.03
    k_sparse_probe_l1_decay: float = 0.01
    k_sparse_probe_batch_size: int = 4096
    k_sparse_probe_num_epochs: int = 50
    probe_epochs: int = 50
    probe_lr: float = 1e-2
    probe_weight_decay: float = 1e-4
    min_gt_probe_f1: float = 0.6
    min_feats_for_eval: int = 20
    full_absorption_probe_cos_threshold: float = 0.025
    absorption_fraction_probe_cos_threshold: float = 0.1
    probe_projection_proportion_threshold: float = 0.4
    absorption_fraction_max_absorbing_latents: int = 3
    topk_feats: int = 10
    seed: int = 42
    batch: int = 16


def word_absorption(acts: np.ndarray, x_proj: float, contrib: np.ndarray, cos: np.ndarray, main: Sequence[int],
                    cfg: AbsorptionConfig) -> tuple[float, bool]:
    """SAEBench's per-word absorption fraction and full-absorption flag (FeatureAbsorptionCalculator).

    acts: the word's latent activations [F]; x_proj: the residual's projection on the unit probe direction;
    contrib: each latent's projection on the probe direction [F]; cos: cos(decoder row, probe) [F];
    main: the letter's split latents."""
    main = list(main)
    main_proj = float(contrib[main].sum()) if main else 0.0
    mask = np.ones(contrib.shape[0], dtype=bool)
    mask[main] = False
    mask &= cos >= cfg.absorption_fraction_probe_cos_threshold
    mask &= contrib > 0
    cand = np.sort(contrib[mask])[::-1][:cfg.absorption_fraction_max_absorbing_latents]
    absorbers = float(cand.sum())
    proportion = absorbers / x_proj if x_proj != 0 else math.copysign(math.inf, absorbers) if absorbers else 0.0
    if main_proj >= x_proj or proportion < cfg.probe_projection_proportion_threshold:
        frac = 0.0
    elif main_proj <= 0.0:
        frac = 1.0
    else:
        absorbed = min(absorbers, x_proj - main_proj)
        frac = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    top = int(np.argsort(-contrib, kind="stable")[0])
    full = (all(acts[m] < EPS for m in main) and cos[top] >= cfg.full_absorption_probe_cos_threshold
            and x_proj >= 0 and x_proj != 0
            and contrib[top] / x_proj >= cfg.probe_projection_proportion_threshold)
    return frac, bool(full)


def feature_splits(f1_by_k: Sequence[float], feats_by_k: Sequence[Sequence[int]], threshold: float) -> list[int]:
    """SAEBench's `add_feature_splits_to_metrics_df` for one letter: grow k while F1 jumps by > threshold."""
    prev = -100.0
    chosen: list[int] = []
    for f1, feats in zip(f1_by_k, feats_by_k, strict=True):
        if f1 > prev + threshold:
            prev, chosen = f1, list(feats)
        else:
            break
    return chosen


def absorption(lm: Any, sae: Any, hook: Any, cfg: AbsorptionConfig | None = None) -> dict[str, Any]:
    """The first-letter absorption metrics of `sae` at `hook` of `lm` (see the module docstring)."""
    cfg = cfg or AbsorptionConfig()
    rng = random.Random(cfg.seed)
    vocab = alpha_tokens(lm.tokenizer)
    if len(vocab) < 2 * len(LETTERS):
        raise MonoscopeError(f"the tokenizer of {lm.model_id} has {len(vocab)} alphabetic tokens: the first-letter "
                             "absorption task needs a vocabulary of words (at least 52)")
    words = list(vocab)
    rng.shuffle(words)
    words = words[:cfg.max_words]
    suffix = cfg.prompt_template.split("{word}", 1)[1]
    suf_ids = lm.tokenizer(suffix, add_special_tokens=False)["input_ids"]
    prompts, kept, positions = [], [], []
    skipped = 0
    for w in words:
        p = icl_prompt(w, vocab, rng, cfg.prompt_template, cfg.max_icl_examples)
        ids = lm.tokenizer(p, add_special_tokens=False)["input_ids"]
        if not suf_ids or ids[-len(suf_ids):] != suf_ids:
            skipped += 1
            continue
        prompts.append(p)
        kept.append(w)
        positions.append(-len(suf_ids) - 1)
    x, f = _encode_tokens(lm, sae, hook, prompts, ctx_len=10_000, batch=cfg.batch, positions=positions)
    y = np.array([LETTERS.index(_first_letter(w)) for w in kept])
    n_train = int(len(kept) * cfg.train_fraction)
    xt, ft, yt = torch.from_numpy(x), torch.from_numpy(f), torch.from_numpy(y)
    onehot = torch.nn.functional.one_hot(yt[:n_train], len(LETTERS))
    pw, pb = train_multi_probe(xt[:n_train], onehot, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                               weight_decay=cfg.probe_weight_decay, seed=cfg.seed)
    lw, _ = train_multi_probe(ft[:n_train], onehot, epochs=cfg.k_sparse_probe_num_epochs, lr=1e-2,
                              weight_decay=1e-6, l1=cfg.k_sparse_probe_l1_decay,
                              batch_size=cfg.k_sparse_probe_batch_size, seed=cfg.seed)
    probe_scores = (xt[n_train:] @ pw.T + pb).numpy()
    f_tr, f_te, y_tr, y_te = f[:n_train], f[n_train:], y[:n_train], y[n_train:]
    dirs = (pw / pw.norm(dim=1, keepdim=True)).numpy()
    W = sae.W_dec.detach().float().cpu().numpy()
    dnorm = np.linalg.norm(W, axis=1)
    cos_all = (W / np.maximum(dnorm, 1e-12)[:, None]) @ dirs.T  # [F, 26]
    c = float(sae.cfg.normaliser)
    per_letter: list[dict[str, Any]] = []
    for li, letter in enumerate(LETTERS):
        yl = y_te == li
        if yl.sum() == 0 or (y_tr == li).sum() == 0:
            per_letter.append({"letter": letter, "f1_probe": None, "evaluated": False,
                               "reason": "no words with this letter in train or test"})
            continue
        f1_probe = _f1(yl, probe_scores[:, li] > 0)
        f1s, feats_k = [], []
        for k in range(1, cfg.max_k_value + 1):
            feats = torch.from_numpy(lw[li].numpy()).topk(k).indices.tolist()
            sk = _sk_probe(f_tr[:, feats], (y_tr == li).astype(np.int64), max_iter=500, class_weight="balanced")
            pred = sk.decision_function(f_te[:, feats]) > 0
            f1s.append(_f1(yl, pred))
            feats_k.append(feats)
        split = feature_splits(f1s, feats_k, cfg.f1_jump_threshold)
        tp = np.where(yl & (probe_scores[:, li] > 0))[0]
        cos = cos_all[:, li]
        fracs, fulls = [], []
        for i in tp:
            contrib = f_te[i] * dnorm * cos / c
            frac, full = word_absorption(f_te[i], float(x[n_train + i] @ dirs[li]), contrib, cos, split, cfg)
            fracs.append(frac)
            fulls.append(full)
        n_tp = len(tp)
        per_letter.append({
            "letter": letter, "f1_probe": f1_probe, "f1_sparse_sae": f1s, "split_feats": split,
            "num_split_features": len(split) - 1, "num_probe_true_positives": n_tp,
            "mean_absorption_fraction": (sum(fracs) / n_tp) if n_tp else None,
            "full_absorption_rate": (sum(fulls) / n_tp) if n_tp else None,
            "num_full_absorption": int(sum(fulls)),
            "evaluated": bool(f1_probe > cfg.min_gt_probe_f1 and n_tp > 0)})
    ev = [r for r in per_letter if r["evaluated"]]
    result: dict[str, Any] = {
        "lower_is_better": ["mean_absorption_fraction_score", "mean_full_absorption_score"],
        "words": len(kept), "words_skipped_position": skipped, "train_words": n_train,
        "test_words": len(kept) - n_train, "letters_evaluated": len(ev), "config": asdict(cfg),
        "per_letter": per_letter}
    if len(ev) < cfg.min_feats_for_eval:
        result.update(mean_absorption_fraction_score=None, mean_full_absorption_score=None,
                      mean_num_split_features=None,
                      reason=f"only {len(ev)} letters have a ground-truth probe with F1 > {cfg.min_gt_probe_f1} "
                             f"(SAEBench requires {cfg.min_feats_for_eval})")
        return result
    fr = [r["mean_absorption_fraction"] for r in ev]
    fu = [r["full_absorption_rate"] for r in ev]
    result.update(mean_absorption_fraction_score=float(np.mean(fr)), mean_full_absorption_score=float(np.mean(fu)),
                  mean_num_split_features=float(np.mean([r["num_split_features"] for r in ev])),
                  std_dev_absorption_fraction_score=float(np.std(fr, ddof=1)) if len(fr) > 1 else None,
                  std_dev_full_absorption_score=float(np.std(fu, ddof=1)) if len(fu) > 1 else None)
    return result


# ---------------------------------------------------------------------------------------------- sparse probing
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


# ---------------------------------------------------------------------------------------------- TPP
@dataclass
class TPPConfig:
    """SAEBench's `ScrAndTppEvalConfig` defaults for TPP (n values, probe trainer, context 128), plus the offline
    data sizes (see DIFFERENCES)."""

    n_values: list[int] = field(default_factory=lambda: [2, 5, 10, 20, 50, 100, 500])
    context_length: int = 128
    max_per_class: int = 150
    train_fraction: float = 0.8
    probe_epochs: int = 20
    probe_lr: float = 1e-3
    probe_batch_size: int = 16
    probe_l1_penalty: float = 1e-3
    early_stopping_patience: int = 20
    languages: list[str] = field(default_factory=lambda: ["de", "fr", "es", "ru", "ja"])
    packs: list[str] | None = None
    min_classes: int = 3
    min_per_class: int = 10
    seed: int = 42
    batch: int = 16


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
            w, b, _ = train_tpp_probe(xt[tr_idx], ytr, xt[te_idx], yte, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                                      batch_size=cfg.probe_batch_size, l1_penalty=cfg.probe_l1_penalty,
                                      patience=cfg.early_stopping_patience, seed=cfg.seed + i)
            probes[cls] = (w, b)
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


FAMILIES = ("absorption", "probing", "tpp")
"""The metric families `--saebench-metrics` chooses from (JSON keys absorption, sparse_probing, tpp)."""


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
                     families: Sequence[str] = FAMILIES) -> dict[str, Any]:
    """The metric families (all three by default) in one JSON-able dict, with the list of differences from
    SAEBench."""
    from threadpoolctl import threadpool_limits

    families = check_families(families)
    keep = _KEEP[0]
    _KEEP[0] = True  # sparse probing and TPP share the language texts: one model pass
    try:
        with threadpool_limits(1):  # scikit-learn's small L-BFGS fits are ~3x faster on one BLAS thread
            return _metrics(lm, sae, hook, absorption_cfg, probing_cfg, tpp_cfg, families)
    finally:
        _KEEP[0] = keep
        if not keep:
            _RESID_MEMO.clear()


def _metrics(lm: Any, sae: Any, hook: Any, absorption_cfg: AbsorptionConfig | None,
             probing_cfg: ProbingConfig | None, tpp_cfg: TPPConfig | None, families: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"format": "monoscope-saebench/1", "reference": "SAEBench 0.6.0 (sae_bench.evals)",
                           "families": families}
    if "absorption" in families:
        out["absorption"] = absorption(lm, sae, hook, absorption_cfg)
    if "probing" in families:
        out["sparse_probing"] = sparse_probing(lm, sae, hook, probing_cfg)
    if "tpp" in families:
        out["tpp"] = tpp(lm, sae, hook, tpp_cfg)
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
                               families=families)
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
    tp = metrics.get("tpp")
    if tp is not None:
        for k in tp["higher_is_better"]:
            print(f"{k + ' (higher is better)':<40} {tp['mean'][k]:.4f}")
        skipped = ", ".join(s["name"] for s in tp["skipped_datasets"])
        label = f"TPP datasets (skipped: {skipped})" if skipped else "TPP datasets"
        print(f"{label:<40}{', '.join(tp['datasets']) or 'none'}")
        if tp.get("reason"):
            print(f"note: TPP not computed: {tp['reason']}")
    print(f"results: {path}")


def saebench_many(lm: Any, saes: dict[str, Any], hook: Any, *, absorption_cfg: AbsorptionConfig | None = None,
                  probing_cfg: ProbingConfig | None = None,
                  tpp_cfg: TPPConfig | None = None) -> dict[str, dict[str, Any]]:
    """`saebench_metrics` for several SAEs on one model and hook, running the model once per text (the residual
    rows are kept for the duration of the call). Each SAE's numbers equal a run of its own."""
    _KEEP[0] = True
    try:
        out = {}
        for name, sae in saes.items():
            torch.manual_seed(0)
            out[name] = saebench_metrics(lm, sae, hook, absorption_cfg=absorption_cfg, probing_cfg=probing_cfg,
                                         tpp_cfg=tpp_cfg)
        return out
    finally:
        _KEEP[0] = False
        _RESID_MEMO.clear()
