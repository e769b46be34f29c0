"""Spurious correlation removal (SCR, higher is better): texts that carry two binary attributes, the intended one
(the kind of place a sentence names: a country or a city, from Babel's CLDR data) and a spurious one (by default
the subject's gender, "He ..." vs "She ...", as bias_in_bios's; or the sentence's language); a probe trained where
the two coincide (every country named by "he", every city by "she") learns both. The n latents with the largest
effect on a probe of the spurious attribute alone are zero-ablated (the SAE's error kept), and the score is the
share of the biased probe's gap to an unbiased probe of the intended attribute that the ablation closes, on data
balanced in the spurious attribute, for n = 2 .. 500.

Follows SAEBench 0.6.0's `sae_bench.evals.scr_and_tpp` with `perform_scr=True` (its `get_spurious_corr_data`,
`PAIRED_CLASS_KEYS`, `prepare_probe_data`, `get_effects_per_class_precomputed_acts`, `get_scr_probe_test_accuracy`
and `get_scr_plotting_dict`); the differences are in `DIFFERENCES` (the package's). SAEBench's six data keys are
named here by role: `spurious` / `spurious_neg` (its "male / female" / "female_data_only"), `intended` /
`intended_neg` ("professor / nurse" / "nurse_data_only"), `biased` / `biased_neg` ("male_professor / female_nurse"
/ "female_nurse_data_only").
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from monoscope.eval.saebench.common import _encode_tokens
from monoscope.eval.saebench.probe_perturbation import (
    ScrAndTppSettings,
    ablate_pooled,
    probe_accuracy,
    top_n_latents,
)

ROLES = ("spurious", "intended", "biased")
"""The three probes, in SAEBench's `PAIRED_CLASS_KEYS` order."""
PAIRED = {"spurious": "spurious_neg", "intended": "intended_neg", "biased": "biased_neg"}
"""SAEBench's `PAIRED_CLASS_KEYS`: each probe's positive data key and its negative one."""
SAEBENCH_KEYS = {"spurious": "male / female", "spurious_neg": "female_data_only", "intended": "professor / nurse",
                 "intended_neg": "nurse_data_only", "biased": "male_professor / female_nurse",
                 "biased_neg": "female_nurse_data_only"}
"""Each role's name in SAEBench (bias_in_bios: the spurious attribute is gender, the intended one profession)."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("I read an article about {} yesterday.", "Next on our list of places: {}.",
           "My favourite place on the map is {}.", "The answer to the quiz question was {}.",
           "She wrote {} on the whiteboard."),
    "fr": ("Hier, j'ai lu un article intitulé « {} ».", "Prochain lieu sur notre liste : {}.",
           "Mon endroit préféré sur la carte : {}.", "La réponse à la question du quiz était : {}.",
           "Elle a écrit « {} » au tableau."),
    "de": ("Gestern habe ich einen Artikel mit dem Titel „{}“ gelesen.", "Nächster Ort auf unserer Liste: {}.",
           "Mein Lieblingsort auf der Landkarte: {}.", "Die Antwort auf die Quizfrage lautete: {}.",
           "Sie schrieb „{}“ an die Tafel."),
    "es": ("Ayer leí un artículo titulado «{}».", "Siguiente lugar de nuestra lista: {}.",
           "Mi lugar favorito en el mapa: {}.", "La respuesta a la pregunta del concurso fue: {}.",
           "Ella escribió «{}» en la pizarra."),
    "he": ("He read an article about {} yesterday.", "He says his favourite place on the map is {}.",
           "He wrote {} on the whiteboard.", "He told us the answer to the quiz question was {}.",
           "He has been talking about {} all week."),
    "she": ("She read an article about {} yesterday.", "She says her favourite place on the map is {}.",
            "She wrote {} on the whiteboard.", "She told us the answer to the quiz question was {}.",
            "She has been talking about {} all week."),
}
"""Five sentence frames per value of the spurious attribute: per language (en, fr, de, es), frames that fit any
place name without an article or case ending (a colon or quotes where the language would need one), so the place's
kind is in the name alone and no one frame marks a quadrant; and "he" / "she", English frames that differ in the
pronoun alone (the subject's gender, as in SAEBench's bias_in_bios), the names in English."""
NAME_LANGUAGE = {"he": "en", "she": "en"}
"""The language of the place names a TEMPLATES key takes (its own key otherwise)."""

GROUPS = ("country", "city")
_NOT_PLACES = {"EU", "EZ", "UN", "QO", "XA", "XB", "ZZ"}
"""CLDR territory codes that are not a country or territory (unions, pseudo-locales, unknown)."""


@dataclass
class SCRConfig(ScrAndTppSettings):
    """SAEBench's `ScrAndTppEvalConfig` defaults for SCR (n values, probe trainer, context 128), plus the offline data:
    `pairs` of [intended positive, intended negative, spurious positive, spurious negative] (the biased probe's
    positives are intended-positive texts in the spurious-positive language; each pair one run, averaged like
    SAEBench's column-1 pairs) and the texts per quadrant (see DIFFERENCES)."""

    pairs: list[list[str]] = field(default_factory=lambda: [["country", "city", "he", "she"],
                                                            ["city", "country", "he", "she"]])
    train_per_quadrant: int = 100
    test_per_quadrant: int = 50


@dataclass
class SCRDataset:
    """One SCR run's texts: SAEBench's six keys (by role, see the module) for train and for test."""

    name: str
    train: dict[str, list[str]]
    test: dict[str, list[str]]
    source: str
    info: dict[str, Any]


@functools.lru_cache(maxsize=1)
def place_names() -> dict[str, dict[str, dict[str, str]]]:
    """group ("country", "city") -> CLDR code -> language (TEMPLATES') -> name, from Babel's CLDR data: territory
    names (two-letter codes, unions and pseudo-codes left out) and the exemplar cities of time zones (CLDR's own
    rule: the locale's city name, its metazone's, else the zone id's last part; Antarctic stations and Etc zones left
    out). A city whose name in any of the languages is also a territory name there (Singapore, Djibouti) is left
    out, so no name is in both groups."""
    from babel import Locale
    from babel.core import get_global

    langs = sorted({NAME_LANGUAGE.get(k, k) for k in TEMPLATES})
    locs = {lang: Locale.parse(lang) for lang in langs}
    countries = {c: {lang: loc.territories[c] for lang, loc in locs.items()}
                 for c in sorted(locs["en"].territories)
                 if len(c) == 2 and c.isalpha() and c not in _NOT_PLACES
                 and all(c in loc.territories for loc in locs.values())}
    taken = {lang: {n[lang] for n in countries.values()} for lang in langs}
    meta = get_global("meta_zones")
    cities = {}
    for z in sorted(get_global("zone_territories")):
        if "/" not in z or z.startswith(("Etc/", "Antarctica/", "Arctic/")):
            continue
        names = {}
        for lang, loc in locs.items():
            name = loc.time_zones.get(z, {}).get("city") or loc.meta_zones.get(meta.get(z), {}).get("city")
            names[lang] = name or z.rpartition("/")[2].replace("_", " ")
        if all(names[lang] not in taken[lang] for lang in langs):
            cities[z] = names
    return {"country": countries, "city": cities}


def _quadrant(names: list[str], templates: tuple[str, ...], rng: random.Random) -> list[str]:
    """Texts naming each of `names` once (in a seeded order, each with its own random frame) before any twice, and
    so on: every name × frame once in all."""
    order = rng.sample(names, len(names))
    start = {n: rng.randrange(len(templates)) for n in order}
    return [templates[(start[n] + r) % len(templates)].format(n) for r in range(len(templates)) for n in order]


def scr_dataset(intended: tuple[str, str], spurious: tuple[str, str], train_per_quadrant: int,
                test_per_quadrant: int, seed: int) -> SCRDataset:
    """SAEBench's `get_spurious_corr_data` on place names: the intended attribute the group (`intended` = (positive,
    negative) of GROUPS), the spurious one the sentence frames' (`spurious`, keys of TEMPLATES: he/she or languages).
    The codes of each group
    are split (seeded) between train and test in the ratio of the two sizes, so a place is in one split in every
    language; each quadrant lists its split's names in its language, each name in every frame (`_quadrant`). With
    m per quadrant, as SAEBench: spurious = m (intended+, spurious+) + m (intended−, spurious+), spurious_neg the
    same in spurious−, intended / intended_neg likewise, biased = 2m (intended+, spurious+), biased_neg = 2m
    (intended−, spurious−), each shuffled with `np.random.default_rng(seed)` in SAEBench's order. Raises ValueError
    when a quadrant holds too few texts."""
    import babel

    for g in intended:
        if g not in GROUPS:
            raise ValueError(f"SCR: unknown place group {g!r} (choose from {', '.join(GROUPS)})")
    for lang in spurious:
        if lang not in TEMPLATES:
            raise ValueError(f"SCR: no sentence frames for {lang!r} (have {', '.join(TEMPLATES)})")
    if intended[0] == intended[1] or spurious[0] == spurious[1]:
        raise ValueError(f"SCR: the two values of an attribute must differ, got {intended} and {spurious}")
    places = place_names()
    frac = train_per_quadrant / (train_per_quadrant + test_per_quadrant)
    split_codes: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for g in intended:
        codes = random.Random(f"{seed}:{g}:split").sample(sorted(places[g]), len(places[g]))
        cut = round(len(codes) * frac)
        split_codes["train"][g], split_codes["test"][g] = codes[:cut], codes[cut:]
    (ip, ineg), (sp, sneg) = intended, spurious
    out: dict[str, dict[str, list[str]]] = {}
    names_used: dict[str, dict[str, int]] = {}
    for split, m in (("train", train_per_quadrant), ("test", test_per_quadrant)):
        q = {}
        for g in intended:
            for lang in spurious:
                names = [places[g][c][NAME_LANGUAGE.get(lang, lang)] for c in split_codes[split][g]]
                q[g, lang] = _quadrant(names, TEMPLATES[lang], random.Random(f"{seed}:{g}:{lang}:{split}"))
        need = {(ip, sp): 2 * m, (ineg, sp): m, (ip, sneg): m, (ineg, sneg): 2 * m}
        for (g, lang), n in need.items():
            if len(q[g, lang]) < n:
                raise ValueError(f"SCR: {len(q[g, lang])} {split} texts of {lang} {g} names, {n} needed "
                                 f"({m} per quadrant)")
        names_used[split] = {f"{lang}_{g}": min(n, len(split_codes[split][g])) for (g, lang), n in need.items()}
        pos_pos, pos_neg, neg_pos, neg_neg = q[ip, sp], q[ineg, sp], q[ip, sneg], q[ineg, sneg]  # SAEBench's names
        keys = {"spurious": pos_pos[:m] + pos_neg[:m], "spurious_neg": neg_pos[:m] + neg_neg[:m],
                "intended": pos_pos[:m] + neg_pos[:m], "intended_neg": pos_neg[:m] + neg_neg[:m],
                "biased": pos_pos[:2 * m], "biased_neg": neg_neg[:2 * m]}
        rng = np.random.default_rng(seed)
        for k in keys.values():  # SAEBench's shuffle order: combined_pos, combined_neg, pos_combined, ...
            rng.shuffle(k)  # type: ignore[arg-type]
        out[split] = keys
    info = {"intended": list(intended), "spurious": list(spurious),
            "roles": {"spurious": f"{sp} / {sneg}", "intended": f"{ip} / {ineg}",
                      "biased": f"{sp}_{ip} / {sneg}_{ineg}"},
            "train_per_quadrant": train_per_quadrant, "test_per_quadrant": test_per_quadrant,
            "distinct_names_per_quadrant": names_used, "frames_per_value": len(TEMPLATES[sp]),
            "place_names": {g: len(places[g]) for g in intended}}
    source = (f"Babel {babel.__version__} CLDR data (Unicode License v3; Babel BSD-3-Clause): territory names and "
              f"time-zone exemplar cities, each in one of {len(TEMPLATES[sp])} sentence frames for {sp} and for {sneg} "
              "written for monoscope (monoscope.eval.saebench.spurious_correlation.TEMPLATES)")
    return SCRDataset(f"{ip}_{ineg}_{sp}_{sneg}", out["train"], out["test"], source, info)


def scr_datasets(cfg: SCRConfig) -> tuple[list[SCRDataset], list[dict[str, str]]]:
    """One dataset per `cfg.pairs` entry; one whose quadrants are too small is skipped (name and reason)."""
    out, skipped = [], []
    for ip, ineg, sp, sneg in cfg.pairs:
        try:
            out.append(scr_dataset((ip, ineg), (sp, sneg), cfg.train_per_quadrant, cfg.test_per_quadrant, cfg.seed))
        except ValueError as e:
            skipped.append({"name": f"{ip}_{ineg}_{sp}_{sneg}", "reason": str(e)})
    return out, skipped


def scr_effects(f: Tensor, y: Tensor, w: Tensor, w_dec_raw: Tensor) -> Tensor:
    """SAEBench's SCR latent effects on a probe: |(mean pooled code of its positives − of its negatives) × (probe
    weight · the latent's raw-space decoder row)| (no clamp, unlike TPP). [F]"""
    return ((f[y == 1].mean(0) - f[y == 0].mean(0)) * (w_dec_raw @ w)).abs()


def _binary(data: dict[str, Tensor], role: str) -> tuple[Tensor, Tensor]:
    """SAEBench's `prepare_probe_data` with perform_scr: the role's rows (label 1) and its paired key's (label 0)."""
    pos, neg = data[role], data[PAIRED[role]]
    return torch.cat([pos, neg]), torch.cat([torch.ones(len(pos), dtype=torch.long),
                                             torch.zeros(len(neg), dtype=torch.long)])


def scr_accuracies(probes: dict[str, tuple[Tensor, Tensor]], x: dict[str, Tensor]) -> dict[str, float]:
    """SAEBench's `get_probe_test_accuracy` with perform_scr: each probe on its own test data (key = role), then every
    probe on the others' data ("{probe} probe on {data} data"). `x`: pooled rows per data key."""
    out = {}
    data = {r: _binary(x, r) for r in ROLES}
    for r in ROLES:
        out[r] = probe_accuracy(*probes[r], *data[r])
    for d in ROLES:
        for p in ROLES:
            if p != d:
                out[f"{p} probe on {d} data"] = probe_accuracy(*probes[p], *data[d])
    return out


def scr_metric(clean: dict[str, float], ablated: dict[str, dict[int, dict[str, float]]]) -> dict[str, float]:
    """SAEBench's `get_scr_plotting_dict`. Direction 1: the spurious probe's top-n latents ablated, the biased probe
    on the intended data; direction 2: the intended probe's latents ablated, the biased probe on the spurious data.
    Per direction and n: (changed − original) / (clean − original), 0 when clean − original < 0.001, where original is
    the biased probe's clean accuracy on that data and clean the accuracy of that data's own probe.
    `scr_metric_threshold_{n}` is direction 1's score when the biased probe is less accurate on the intended data
    than on the spurious data (it learned the spurious attribute more), direction 2's when more, and absent when
    equal (as there)."""
    results: dict[str, float] = {}
    dir1_acc = clean["biased probe on intended data"]
    dir2_acc = clean["biased probe on spurious data"]
    for d, ablated_probe, data in ((1, "spurious", "intended"), (2, "intended", "spurious")):
        for n in ablated[ablated_probe]:
            clean_acc = clean[data]
            original = clean[f"biased probe on {data} data"]
            changed = ablated[ablated_probe][n][f"biased probe on {data} data"]
            score = 0.0 if clean_acc - original < 0.001 else (changed - original) / (clean_acc - original)
            results[f"scr_dir{d}_threshold_{n}"] = score
            if (d == 1 and dir1_acc < dir2_acc) or (d == 2 and dir1_acc > dir2_acc):
                results[f"scr_metric_threshold_{n}"] = score
    return results


def scr_task(train: dict[str, tuple[np.ndarray, np.ndarray]], test: dict[str, tuple[np.ndarray, np.ndarray]],
             w_dec_raw: Tensor, cfg: SCRConfig, probes: dict[str, tuple[Tensor, Tensor]] | None = None
             ) -> dict[str, Any]:
    """SCR on one dataset from pooled residuals and SAE codes per data key (`train[key] = (x [n, d], f [n, F])`):
    the three probes on the residual (SAEBench's trainer, probe i seeded seed + i; `probes` given: those (weight,
    bias) instead), the spurious and intended probes' top-n latents by effect (train set), every probe's test
    accuracy with them ablated, and the metric (`scr_metric`)."""
    xtr = {k: torch.from_numpy(v[0]) for k, v in train.items()}
    ftr = {k: torch.from_numpy(v[1]) for k, v in train.items()}
    xte = {k: torch.from_numpy(v[0]) for k, v in test.items()}
    fte = {k: torch.from_numpy(v[1]) for k, v in test.items()}
    probes = dict(probes) if probes is not None else {}
    for i, r in enumerate(ROLES):
        if r not in probes:
            probes[r] = cfg.train_probe(*_binary(xtr, r), *_binary(xte, r), i)
    effects = {}
    for r in ("spurious", "intended"):
        f, y = _binary(ftr, r)
        effects[r] = scr_effects(f, y, probes[r][0], w_dec_raw)
    clean = scr_accuracies(probes, xte)
    d_sae = w_dec_raw.shape[0]
    n_values = [n for n in cfg.n_values if n <= d_sae]
    ablated: dict[str, dict[int, dict[str, float]]] = {}
    latents: dict[str, dict[int, list[int]]] = {}
    for r in ("spurious", "intended"):
        ablated[r], latents[r] = {}, {}
        for n in n_values:
            sel = top_n_latents(effects[r], n)
            latents[r][n] = sel.tolist()
            ablated[r][n] = scr_accuracies(probes, {k: ablate_pooled(xte[k], fte[k], sel, w_dec_raw) for k in xte})
    results = scr_metric(clean, ablated)
    direction = (1 if clean["biased probe on intended data"] < clean["biased probe on spurious data"] else
                 2 if clean["biased probe on intended data"] > clean["biased probe on spurious data"] else None)
    return {"train_texts": {k: len(v[0]) for k, v in train.items()},
            "test_texts": {k: len(v[0]) for k, v in test.items()},
            "n_values": n_values, "n_values_skipped": [n for n in cfg.n_values if n > d_sae],
            "direction": direction, "results": results, "clean_accuracy": clean,
            "ablated_accuracy": {r: {str(n): a for n, a in v.items()} for r, v in ablated.items()},
            "ablated_latents": {r: {str(n): ls[:20] for n, ls in v.items()} for r, v in latents.items()}}


def _by_n(key: str) -> tuple[int, str]:
    return int(key.rsplit("_", 1)[1]), key


def scr(lm: Any, sae: Any, hook: Any, cfg: SCRConfig | None = None,
        datasets: list[SCRDataset] | None = None) -> dict[str, Any]:
    """Spurious correlation removal on the offline place-name datasets, averaged over datasets as SAEBench's
    `average_results_dictionaries` (a key over the runs that have it); higher is better."""
    cfg = cfg or SCRConfig()
    skipped: list[dict[str, str]] = []
    if datasets is None:
        datasets, skipped = scr_datasets(cfg)
    if not datasets:
        return {"higher_is_better": [], "mean": {}, "datasets": {}, "skipped_datasets": skipped, "config": asdict(cfg),
                "reason": "no SCR dataset: every pair's quadrants are too small for "
                          f"{cfg.train_per_quadrant} train / {cfg.test_per_quadrant} test texts"}
    w_dec_raw = sae.W_dec.detach().float().cpu() / float(sae.cfg.normaliser)
    per_ds = {}
    for ds in datasets:
        texts = sorted({t for split in (ds.train, ds.test) for v in split.values() for t in v})
        x, f = _encode_tokens(lm, sae, hook, texts, ctx_len=cfg.context_length, batch=cfg.batch)
        row = {t: i for i, t in enumerate(texts)}
        train = {k: (x[[row[t] for t in v]], f[[row[t] for t in v]]) for k, v in ds.train.items()}
        test = {k: (x[[row[t] for t in v]], f[[row[t] for t in v]]) for k, v in ds.test.items()}
        per_ds[ds.name] = scr_task(train, test, w_dec_raw, cfg)
    keys: dict[str, list[float]] = {}
    for r in per_ds.values():
        for k, v in r["results"].items():
            keys.setdefault(k, []).append(v)
    mean = {k: float(np.mean(v)) for k, v in keys.items()}
    return {"higher_is_better": sorted((k for k in mean if k.startswith("scr_metric_")), key=_by_n),
            "mean": mean,
            "datasets": {d.name: {"source": d.source, **d.info, **per_ds[d.name]} for d in datasets},
            "skipped_datasets": skipped, "config": asdict(cfg)}
