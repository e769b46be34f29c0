"""First-letter absorption (lower is better): ICL prompts "{word} has the first letter:" over the
alphabetic tokens of the model's own vocabulary; a logistic probe on the residual per letter (ground truth),
k-sparse probes on SAE latents (an L1 probe ranks the latents, k = 1..10, feature splits found by an F1 jump
of 0.03), then for every test word the ground-truth probe gets right: the fraction of the probe projection
carried by other probe-aligned latents instead of the letter's own (absorption fraction), and whether one
such latent carries it alone while the letter's latents are silent (full absorption).

Follows SAEBench 0.6.0's `sae_bench.evals.absorption`; the differences are in `DIFFERENCES` (the package's).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from monoscope.errors import MonoscopeError
from monoscope.eval.saebench.common import EPS, _encode_tokens, _f1, _sk_probe

LETTERS = "abcdefghijklmnopqrstuvwxyz"


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

