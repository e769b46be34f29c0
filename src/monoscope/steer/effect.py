"""`steer_eval`: dose-response of one feature's steering, with controls and side effects, in numbers.

For each strength factor s (a multiple of the feature's max activation) and each condition

- `target`            the feature edited to s x its max activation (mode clamp by default, or add);
- `random_feature`    another feature of matched density (nearest density, seeded draw), s x its max;
- `random_direction`  a random raw-space direction with the norm of the target's decoder row, s x the
                      target's max (clamp and add both add it: its code is 0),

each neutral prompt (shipped, 24, split in two alternating halves) is continued greedily with the edit
(KV cache, every token steered), and measured:

- concept_act   mean code of the target feature over the continuation, read by the *unsteered*
                model (so it measures the text, not the intervention);
- concept_logp  mean per-token log-prob of the concept text(s) right after the prompt, under the
                steered model (likelihood-based; Pres et al. 2024);
- ppl           perplexity of the continuation under the unsteered model (fluency);
- kl            KL(unsteered || steered) of next-token distributions on the prompt itself (side effect);
- selectivity   change of the target's mean code vs the unsteered continuation, over the mean absolute
                change of every other feature's mean code;
- judge         optional: an LLM rates concept (0-2) and fluency (0-2); their harmonic mean (AxBench).

The factor is picked on the first half (highest concept_act with ppl at most 2x the unsteered ppl;
with a judge, the highest harmonic mean) and every number is reported on the second half, with
bootstrap 95% intervals over prompts. Partial results are saved after every (condition, factor), so a
killed run resumes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from monoscope.fileio import write_bytes_atomic
from monoscope.model.hooks import capture_at
from monoscope.steer.edits import Edit, SteerError
from monoscope.steer.intervene import steer
from monoscope.steer.target import Target

CONDITIONS = ("target", "random_feature", "random_direction")
METRICS = ("concept_act", "concept_logp", "ppl", "kl", "selectivity")
FORMAT = "monoscope-steer-eval/1"


def neutral_prompts() -> list[str]:
    """The shipped neutral prompts (package data)."""
    text = resources.files("monoscope.steer").joinpath("data/neutral_prompts.txt").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def parse_factors(text: str) -> list[float]:
    out = []
    for part in str(text).split(","):
        try:
            v = float(part)
        except ValueError:
            raise SteerError(f"--factors {text!r}: {part!r} is not a number; pass e.g. -10,-5,0,2,5,10") from None
        if not math.isfinite(v):
            raise SteerError(f"--factors {text!r}: {part!r} is not finite; pass finite numbers")
        out.append(v)
    if not out:
        raise SteerError("--factors is empty: pass e.g. -10,-5,0,2,5,10")
    return out


def matched_feature(densities: np.ndarray, feature: int, seed: int) -> int:
    """A random feature among the 10 whose density is nearest the target's (never the target, never dead)."""
    d = np.nan_to_num(densities, nan=0.0)
    cand = np.flatnonzero(d > 0)
    cand = cand[cand != feature]
    if len(cand) == 0:
        raise SteerError("no other live feature in the features database to serve as the random-feature control")
    near = cand[np.argsort(np.abs(d[cand] - d[feature]), kind="stable")[:10]]
    return int(np.random.default_rng(seed).choice(near))


@dataclass
class _Reader:
    """Forwards of the unsteered model that read the SAE codes at the hook on the way."""

    t: Target

    @torch.no_grad()
    def clean(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids [1, T] -> (log-probs [T, V], codes [T, F]) of the unsteered model."""
        with capture_at(self.t.lm.layout, self.t.hook, stop=False) as box, self.t.lm.autocast():
            logits = self.t.lm.model(input_ids=ids, use_cache=False).logits[0]
        codes = self.t.sae.encode_raw(box["acts"][0].float())
        return torch.log_softmax(logits.float(), -1), codes

    @torch.no_grad()
    def steered_logp(self, ids: Tensor, edits: list[Edit]) -> Tensor:
        with steer(self.t.lm, self.t.sae, edits, max_act=self.t.max_act), self.t.lm.autocast():
            logits = self.t.lm.model(input_ids=ids, use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), -1)

    @torch.no_grad()
    def generate(self, ids: Tensor, edits: list[Edit] | None, n: int) -> Tensor:
        tok = self.t.lm.tokenizer
        kw: dict[str, Any] = dict(max_new_tokens=n, do_sample=False, use_cache=True, temperature=None, top_k=None,
                                  top_p=None, attention_mask=torch.ones_like(ids),
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        with self.t.lm.autocast():
            if edits is None:
                out = self.t.lm.model.generate(ids, **kw)
            else:
                with steer(self.t.lm, self.t.sae, edits, prompt_len=ids.shape[1], max_act=self.t.max_act):
                    out = self.t.lm.model.generate(ids, **kw)
        return out[:, ids.shape[1]:]


def _judge_prompts(concept: str, text: str) -> tuple[str, str]:
    c = (f"Rate how much the following text is about, or mentions, the concept \"{concept}\".\n"
         "Answer with one digit: 0 = not at all, 1 = somewhat, 2 = clearly.\n\n"
         f"Text: {text}\n\nRating:")
    f = ("Rate the fluency of the following text (grammar, coherence; ignore its topic).\n"
         "Answer with one digit: 0 = broken or repetitive, 1 = somewhat fluent, 2 = fluent.\n\n"
         f"Text: {text}\n\nRating:")
    return c, f


def _digit(text: str | None) -> float:
    for ch in text or "":
        if ch in "012":
            return float(ch)
    return float("nan")


def bootstrap(values: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the mean over prompts resampled with replacement); NaNs dropped."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return (float("nan"),) * 3  # type: ignore[return-value]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def steer_eval(t: Target, feature: int, concepts: list[str], factors: list[float], *, mode: str = "clamp",
               max_new_tokens: int = 24, seed: int = 0, out_dir: Path, judge: Any = None, n_boot: int = 1000,
               prompts: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the dose-response (module docstring); writes steer_eval.json and steer_eval.png to `out_dir`."""
    d_sae = t.sae.cfg.d_sae
    if not 0 <= feature < d_sae:
        raise SteerError(f"feature {feature} is out of range: this SAE has features 0..{d_sae - 1}")
    if mode not in ("clamp", "add"):
        raise SteerError(f"--mode {mode!r}: use clamp or add")
    if t.max_acts is None or t.densities is None or t.max_act(feature) is None:
        raise SteerError("steer-eval needs the features database (max activations, densities): build it with "
                         "monoscope features SAE_DIR, or pass --db")
    concepts = [c for c in (c.strip() for c in concepts) if c]
    if not concepts:
        raise SteerError("no concept text: pass --concept TEXT or a --concept-file with one concept per line")
    prompts = prompts if prompts is not None else neutral_prompts()
    if len(prompts) < 4:
        raise SteerError(f"{len(prompts)} prompts: steer-eval needs at least 4 (two halves)")
    halves = {"select": list(range(0, len(prompts), 2)), "report": list(range(1, len(prompts), 2))}
    rival = matched_feature(t.densities, feature, seed)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(t.sae.cfg.d_in, generator=g)
    w = t.sae.W_dec[feature].detach().float().cpu() / t.sae.cfg.normaliser
    direction = (u / u.norm() * w.norm()).to(t.lm.device)
    fmax = float(t.max_act(feature))  # type: ignore[arg-type]
    rmax = t.max_act(rival) or fmax

    def edits_for(cond: str, s: float) -> list[Edit]:
        if cond == "target":
            return [Edit(feature, mode, s * fmax)]  # type: ignore[arg-type]
        if cond == "random_feature":
            return [Edit(rival, mode, s * rmax)]  # type: ignore[arg-type]
        return [Edit(-1, mode, s * fmax, direction=direction)]  # type: ignore[arg-type]

    out_dir.mkdir(parents=True, exist_ok=True)
    partial_path = out_dir / "partial.json"
    key = {"feature": feature, "concepts": concepts, "factors": factors, "mode": mode, "n": max_new_tokens,
           "seed": seed, "prompts": prompts, "sae": str(t.sae_dir), "judge": getattr(judge, "model_id", None)}
    partial: dict[str, Any] = {}
    if partial_path.is_file():
        saved = json.loads(partial_path.read_text())
        if saved.get("key") == key:
            partial = saved.get("done", {})

    def save() -> None:
        write_bytes_atomic(partial_path, json.dumps({"key": key, "done": partial}).encode())

    tok = t.lm.tokenizer
    reader = _Reader(t)
    ids = [t.encode(p) for p in prompts]
    concept_ids = [tok(c if c[:1].isspace() else " " + c, add_special_tokens=False, return_tensors="pt").input_ids
                   .to(t.lm.device) for c in concepts]
    # unsteered reference: continuation, its codes, clean log-probs of each prompt
    base: list[dict[str, Any]] = []
    for i, x in enumerate(ids):
        new = reader.generate(x, None, max_new_tokens)
        lp, codes = reader.clean(torch.cat([x, new], 1))
        P = x.shape[1]
        base.append({"mean_codes": codes[P:].mean(0), "prompt_lp": reader.clean(x)[0][1:],
                     "text": tok.decode(new[0], skip_special_tokens=True),
                     "ppl": float(torch.exp(-lp[P - 1:-1].gather(-1, new[0][:, None]).mean()))})
        if progress:
            print(f"\runsteered {i + 1}/{len(ids)}", end="", flush=True)
    rows: dict[str, dict[str, Any]] = partial
    total = len(CONDITIONS) * len(factors)
    for ci, cond in enumerate(CONDITIONS):
        for fi, s in enumerate(factors):
            k = f"{cond}@{s:g}"
            if k in rows:
                continue
            per: dict[str, list[float]] = {m: [] for m in METRICS}
            texts = []
            e = edits_for(cond, s)
            for i, x in enumerate(ids):
                P = x.shape[1]
                new = reader.generate(x, e, max_new_tokens)
                lp, codes = reader.clean(torch.cat([x, new], 1))
                mean_codes = codes[P:].mean(0)
                per["concept_act"].append(float(mean_codes[feature]))
                per["ppl"].append(float(torch.exp(-lp[P - 1:-1].gather(-1, new[0][:, None]).mean())))
                clp = []
                for cid in concept_ids:
                    full = torch.cat([x, cid], 1)
                    slp = reader.steered_logp(full, e)
                    clp.append(float(slp[P - 1:-1].gather(-1, cid[0][:, None]).mean()))
                per["concept_logp"].append(float(np.mean(clp)))
                slp = reader.steered_logp(x, e)[1:]
                blp = base[i]["prompt_lp"]
                per["kl"].append(float((blp.exp() * (blp - slp)).sum(-1).mean()))
                delta = mean_codes - base[i]["mean_codes"]
                others = torch.cat([delta[:feature], delta[feature + 1:]]).abs().mean()
                per["selectivity"].append(float(delta[feature] / others) if float(others) > 0 else float("nan"))
                texts.append(tok.decode(new[0], skip_special_tokens=True))
                if progress:
                    print(f"\r{cond} x{s:g} ({ci * len(factors) + fi + 1}/{total}) prompt {i + 1}/{len(ids)}   ",
                          end="", flush=True)
            row: dict[str, Any] = {"condition": cond, "factor": s, "per_prompt": per, "texts": texts,
                                   "edits": [ed.to_dict() for ed in e]}
            if judge is not None:
                row["judge"] = _judge(judge, concepts[0], [prompts[i] + tx for i, tx in enumerate(texts)])
            rows[k] = row
            save()
    if progress:
        print()
    return _summarise(t, feature, rival, concepts, factors, mode, prompts, halves, base, rows, key, out_dir,
                      n_boot, seed, judge is not None)


def _judge(llm: Any, concept: str, texts: list[str]) -> dict[str, list[float]]:
    from monoscope.interp.llm import ChatRequest

    reqs = []
    for tx in texts:
        c, f = _judge_prompts(concept, tx)
        reqs += [ChatRequest.user(c, max_tokens=4), ChatRequest.user(f, max_tokens=4)]
    res = llm.chat_many(reqs)
    conc = [_digit(r.text if r.ok else None) for r in res[0::2]]
    flu = [_digit(r.text if r.ok else None) for r in res[1::2]]
    hm = []
    for a, b in zip(conc, flu, strict=True):
        hm.append(float("nan") if math.isnan(a) or math.isnan(b) else 0.0 if a + b == 0 else 2 * a * b / (a + b))
    return {"concept": conc, "fluency": flu, "harmonic": hm}


def _summarise(t: Target, feature: int, rival: int, concepts: list[str], factors: list[float], mode: str,
               prompts: list[str], halves: dict[str, list[int]], base: list[dict[str, Any]],
               rows: dict[str, dict[str, Any]], key: dict[str, Any], out_dir: Path, n_boot: int, seed: int,
               judged: bool) -> dict[str, Any]:
    metrics = METRICS + (("judge_concept", "judge_fluency", "judge_harmonic") if judged else ())

    def values(row: dict[str, Any], m: str, idx: list[int]) -> np.ndarray:
        src = row["judge"][m.split("_", 1)[1]] if m.startswith("judge_") else row["per_prompt"][m]
        return np.array([src[i] for i in idx], dtype=float)

    base_ppl = np.array([b["ppl"] for b in base])
    dens = t.densities if t.densities is not None else np.full(t.sae.cfg.d_sae, np.nan)
    sel = halves["select"]
    # pick the factor on the select half (target condition only)
    best, best_score = None, -math.inf
    for s in factors:
        row = rows[f"target@{s:g}"]
        if judged:
            score = float(np.nanmean(values(row, "judge_harmonic", sel)))
        else:
            ok = np.nanmean(values(row, "ppl", sel)) <= 2 * float(base_ppl[sel].mean())
            score = float(np.nanmean(values(row, "concept_act", sel))) if ok else -math.inf
        if score > best_score:
            best, best_score = s, score
    rep = halves["report"]
    table = []
    for cond in CONDITIONS:
        for s in factors:
            row = rows[f"{cond}@{s:g}"]
            entry: dict[str, Any] = {"condition": cond, "factor": s}
            for m in metrics:
                mean, lo, hi = bootstrap(values(row, m, rep), n_boot, seed)
                entry[m] = {"mean": mean, "ci95": [lo, hi]}
            table.append(entry)
    unsteered = {"ppl": dict(zip(("mean", "lo", "hi"), bootstrap(base_ppl[rep], n_boot, seed), strict=True)),
                 "concept_act": dict(zip(("mean", "lo", "hi"), bootstrap(
                     np.array([float(base[i]["mean_codes"][feature]) for i in rep]), n_boot, seed), strict=True))}
    doc = {
        "format": FORMAT, "feature": feature, "label": t.label(feature), "max_act": t.max_act(feature),
        "concepts": concepts, "mode": mode, "factors": factors, "hook": str(t.hook), "model": t.lm.model_id,
        "sae": str(t.sae_dir),
        "controls": {"random_feature": rival, "random_feature_density": float(dens[rival]),
                     "target_density": float(dens[feature]),
                     "random_direction": "gaussian, norm of the target's decoder row"},
        "halves": {"select": [prompts[i] for i in sel], "report": [prompts[i] for i in rep]},
        "chosen_factor": best, "chosen_on": "select half: " + ("highest judge harmonic mean" if judged else
                                                               "highest concept_act with ppl <= 2x unsteered"),
        "unsteered": unsteered, "table": table,
        "samples": {k: {"texts": r["texts"], "per_prompt": r["per_prompt"], "edits": r["edits"],
                        **({"judge": r["judge"]} if "judge" in r else {})} for k, r in rows.items()},
        "unsteered_texts": [b["text"] for b in base], "key": key,
    }
    write_bytes_atomic(out_dir / "steer_eval.json", (json.dumps(doc, indent=1, allow_nan=True) + "\n").encode())
    _plot(doc, out_dir / "steer_eval.png")
    (out_dir / "partial.json").unlink(missing_ok=True)
    return doc


def _plot(doc: dict[str, Any], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("concept_act", "target feature activation (unsteered read)"),
              ("concept_logp", "concept log-prob per token"), ("ppl", "perplexity (unsteered model)"),
              ("kl", "KL(unsteered || steered) on prompts")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (m, title) in zip(axes.flat, panels, strict=True):
        for cond in CONDITIONS:
            rows = [r for r in doc["table"] if r["condition"] == cond]
            xs = [r["factor"] for r in rows]
            ys = [r[m]["mean"] for r in rows]
            lo = [r[m]["ci95"][0] for r in rows]
            hi = [r[m]["ci95"][1] for r in rows]
            ax.plot(xs, ys, marker="o", label=cond)
            ax.fill_between(xs, lo, hi, alpha=0.2)
        if doc["chosen_factor"] is not None:
            ax.axvline(doc["chosen_factor"], color="grey", ls=":", lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("factor x max activation")
        if m == "ppl":
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"feature {doc['feature']} {doc['label'][:40]!r}: {doc['mode']} (report half, 95% CI)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
