"""Features that respond to one concept across languages (the paper's multilingual features).

    res = multilingual_search(searcher, min_languages=5)
    for h in res.hits: print(h.feature, h.concept, h.n_languages, [(e.language, e.rel) for e in h.evidence])

Parallel text comes from Babel's CLDR data (installed with monoscope, offline): the names of countries,
cities (CLDR's exemplar cities of time zones: "London", "Londres", "Londra", "Лондон", "ロンドン", ...),
languages, months and weekdays in 14 languages ("France", "Frankreich", "Francia", "フランス", ...), and
from Django's translation catalogues: whole sentences ("This field is required.", "Dieses Feld ist
zwingend erforderlich.", ...) translated into every one of those languages. For each
text the model reads, every feature's largest activation is taken relative to the feature's maximum in the
database. A feature *fires for concept c in language l* when that relative activation is at least `min_rel`
and at least `selectivity` times its mean over the other concepts of its group (countries, languages, months,
weekdays, sentences) in the same language, so a feature that fires on every country name, every sentence
or every text does not count. Per (feature, concept):
- n_languages: languages where it fires for c; consistency = n_languages / languages read;
- the evidence per language (text, relative activation, fires or not).
A feature whose activation follows the text's length (|Spearman| between its per-text activation and the
token count, over every text read, above `max_length_corr`) is left out with a count in the notes: a
concept whose names are long in every language (Portuguese) would otherwise collect features that fire
on late positions. (A real concept feature fires on 1 of 35 concepts, which bounds its correlation with
length to about 0.3 even when its concept is the longest.)
Chance level: the same count with each language's concepts shuffled (`n_null` times) says how many
features would qualify by accident; compare it with `n_found` before trusting a list.
A language whose names the tokenizer cannot reproduce (decode(encode(text)) != text, e.g. unknown script
mapped to <unk>) is left out with a note rather than read as garbage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from monoscope.search.text import Searcher, SearchError

LANGUAGES = ("en", "fr", "de", "es", "it", "pt", "nl", "pl", "ru", "tr", "sv", "ja", "zh", "ar")
COUNTRIES = ("FR", "DE", "JP", "US", "CN", "IT", "ES", "RU", "BR", "IN", "GB", "EG", "MX", "GR", "TR", "SE")
LANGUAGE_NAMES = ("fr", "de", "ja", "en", "es", "it", "ru", "zh", "ar", "pt")
CITY_ZONES = ("Europe/London", "Europe/Rome", "Europe/Moscow", "Asia/Tokyo", "Europe/Vienna", "America/New_York",
              "Europe/Athens", "Europe/Warsaw", "Europe/Lisbon", "Africa/Cairo", "Europe/Copenhagen", "Europe/Brussels",
              "Europe/Prague", "Asia/Shanghai")
"""Time zones whose CLDR exemplar city is a well-known city with its own name in most of LANGUAGES."""
GROUPS = ("country", "city", "language", "month", "weekday", "message")


@dataclass
class Concept:
    name: str
    texts: dict[str, str]
    """language -> the concept's text in that language."""
    source: str = ""
    group: str = ""
    """Concepts of one group (countries, months, sentences) are compared with each other: a feature that fires
    on every country name is not a France feature."""


@dataclass
class LanguageEvidence:
    language: str
    text: str
    act: float
    rel: float
    fires: bool


@dataclass
class MultilingualHit:
    feature: int
    concept: str
    n_languages: int
    consistency: float
    length_corr: float
    """Spearman correlation of the feature's per-text activation with the text's token count."""
    mean_rel: float
    """Mean relative activation over the languages where it fires."""
    label: str
    evidence: list[LanguageEvidence] = field(default_factory=list)
    chance: float | None = None
    """Mean number of features reaching at least this many languages when each language's concepts are
    shuffled: well under 1 means a list this long is unlikely by accident."""


@dataclass
class MultilingualResult:
    languages: list[str]
    concepts: list[str]
    min_languages: int
    hits: list[MultilingualHit]
    notes: list[str]
    n_found: int = 0
    """Features that qualify (hits holds the top of them)."""
    null_mean: float | None = None
    """Mean number that qualify when each language's concepts are shuffled (chance level)."""

    def to_dict(self) -> dict[str, Any]:
        return {"languages": self.languages, "concepts": self.concepts, "min_languages": self.min_languages,
                "n_found": self.n_found, "null_mean": self.null_mean, "notes": self.notes,
                "hits": [asdict(h) for h in self.hits]}


def parallel_concepts(languages: tuple[str, ...] = LANGUAGES, groups: tuple[str, ...] | None = None) -> list[Concept]:
    """Country, city, language, month and weekday names in every language, from Babel's CLDR data, and Django's
    form messages; `groups` keeps only those groups (see GROUPS)."""
    import babel
    from babel import Locale
    from babel.dates import get_timezone_location

    if groups is not None:
        bad = [g for g in groups if g not in GROUPS]
        if bad:
            raise SearchError(f"--groups {bad[0]!r} is not a group of parallel concepts: use some of "
                              f"{','.join(GROUPS)}")

    src = f"Babel {babel.__version__} CLDR"
    locs = {lang: Locale.parse(lang) for lang in languages}
    en = Locale("en")
    out = []
    for c in COUNTRIES:
        out.append(Concept(f"country {en.territories[c]}", {k: loc.territories[c] for k, loc in locs.items()}, src,
                           "country"))
    for z in CITY_ZONES:  # the exemplar city, or (CLDR's own fallback) the zone's English city name
        out.append(Concept(f"city {get_timezone_location(z, locale='en', return_city=True)}",
                           {k: get_timezone_location(z, locale=k, return_city=True) for k in locs},
                           f"{src} exemplar cities", "city"))
    for c in LANGUAGE_NAMES:
        out.append(Concept(f"language {en.languages[c]}", {k: loc.languages[c] for k, loc in locs.items()}, src,
                           "language"))
    for m in (1, 3, 6, 9, 12):
        out.append(Concept(f"month {en.months['format']['wide'][m]}",
                           {k: loc.months["format"]["wide"][m] for k, loc in locs.items()}, src, "month"))
    for d in (0, 2, 4, 6):
        out.append(Concept(f"weekday {en.days['format']['wide'][d]}",
                           {k: loc.days["format"]["wide"][d] for k, loc in locs.items()}, src, "weekday"))
    out += django_concepts(languages) if groups is None or "message" in groups else []
    return [c for c in out if groups is None or c.group in groups]


DJANGO_MESSAGES = ("This field is required.", "Enter a valid email address.", "Enter a valid URL.",
                   "Enter a valid date.", "Enter a whole number.", "The submitted file is empty.",
                   "Enter a valid time.", "Enter a number.")
_DJANGO_LOCALE = {"zh": "zh_Hans"}


def django_concepts(languages: tuple[str, ...] = LANGUAGES,
                    messages: tuple[str, ...] = DJANGO_MESSAGES) -> list[Concept]:
    """Django's form messages in every language (msgid for English); a message missing in any language is
    skipped. Empty when Django is not installed."""
    try:
        import django
    except ImportError:
        return []
    from pathlib import Path

    from monoscope.corpus.po import read_po

    root = Path(django.__file__).parent / "conf" / "locale"
    table: dict[str, dict[str, str]] = {m: {} for m in messages}
    for lang in languages:
        if lang == "en":
            for m in messages:
                table[m]["en"] = m
            continue
        path = root / _DJANGO_LOCALE.get(lang, lang) / "LC_MESSAGES" / "django.po"
        if not path.is_file():
            continue
        for e in read_po(path):
            if e.msgid in table and e.msgctxt is None and not e.fuzzy and e.translated:
                table[e.msgid][lang] = e.translated[0]
    src = f"Django {django.__version__} conf/locale/*/LC_MESSAGES/django.po"
    return [Concept(f"message {m!r}", t, src, "message") for m, t in table.items() if set(t) == set(languages)]


def _mangled(searcher: Searcher, text: str) -> bool:
    tok = searcher.lm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    unk = getattr(tok, "unk_token_id", None)
    return (unk is not None and unk in ids) or tok.decode(ids).strip() != text.strip()


def multilingual_search(searcher: Searcher, *, concepts: list[Concept] | None = None, min_languages: int = 5,
                        min_rel: float = 0.1, selectivity: float = 2.0, top: int = 20,
                        prefix: str = "- ", max_length_corr: float = 0.5, n_null: int = 20) -> MultilingualResult:
    """Features that fire selectively for one concept in at least `min_languages` languages (module docstring).
    Each text is read after `prefix` (language-neutral), so the concept's first token is not the one right
    after BOS, where residual norms are extreme."""
    if min_languages < 1:
        raise SearchError(f"--min-languages {min_languages}: pass 1 or more")
    if top <= 0:
        raise SearchError(f"--top {top}: pass a positive number of features to list")
    concepts = concepts if concepts is not None else parallel_concepts()
    if len(concepts) < 2:
        raise SearchError(f"multilingual search needs at least 2 concepts to compare, got {len(concepts)}")
    langs = sorted({lang for c in concepts for lang in c.texts}, key=lambda x: (x != "en", x))
    notes = []
    kept = []
    for lang in langs:
        bad = [c.texts[lang] for c in concepts if lang in c.texts and _mangled(searcher, c.texts[lang])]
        if bad:
            notes.append(f"language {lang} left out: the tokenizer does not reproduce {bad[0]!r} "
                         f"({len(bad)} of {len(concepts)} texts)")
        else:
            kept.append(lang)
    if len(kept) < min_languages:
        raise SearchError(f"only {len(kept)} languages ({', '.join(kept)}) survive tokenization, fewer than "
                          f"--min-languages {min_languages}: lower it or use a model whose tokenizer reads them")
    cells = [(ci, li) for ci, c in enumerate(concepts) for li, lang in enumerate(kept) if lang in c.texts]
    texts = [prefix + concepts[ci].texts[kept[li]] for ci, li in cells]
    names = [f"concept {concepts[ci].name!r} in {kept[li]}" for ci, li in cells]
    acts = searcher.max_acts(texts, names)
    lengths = np.array([len(x) for x in searcher.tokenize(texts, names)], dtype=np.float64)
    lcorr = length_correlation(acts, lengths)
    C, L, F = len(concepts), len(kept), acts.shape[1]
    A = np.full((C, L, F), np.nan, dtype=np.float64)
    for (ci, li), a in zip(cells, acts, strict=True):
        A[ci, li] = a
    m = searcher.max_act
    scale = np.where(m > 0, m, np.nanmax(np.where(np.isnan(A), 0.0, A), axis=(0, 1)))  # unseen: the max here
    with np.errstate(divide="ignore", invalid="ignore"):
        R = np.where(scale > 0, A / np.where(scale > 0, scale, 1.0), 0.0)  # [C, L, F]
    present = ~np.isnan(A)
    Rz = np.where(present, R, 0.0)
    names_g = sorted({c.group for c in concepts})
    groups = np.array([names_g.index(c.group) for c in concepts])
    fires = _fires(Rz, present, groups, min_rel, selectivity)
    n_lang = fires.sum(1)  # [C, F]
    best_c = n_lang.argmax(0)  # each feature's best concept
    best_n = n_lang[best_c, np.arange(F)]
    with np.errstate(invalid="ignore"):
        mean_rel = np.where(fires, Rz, 0.0).sum(1) / np.maximum(n_lang, 1)  # [C, F]
    cand = np.flatnonzero(best_n >= min_languages)
    by_length = cand[np.abs(lcorr[cand]) > max_length_corr]
    if len(by_length):
        notes.append(f"{len(by_length)} features that fire for one concept in >= {min_languages} languages left out: "
                     f"their activation follows the text's length (|Spearman| > {max_length_corr}; e.g. "
                     f"#{int(by_length[0])}, {lcorr[by_length[0]]:.2f})")
        cand = cand[np.abs(lcorr[cand]) <= max_length_corr]
    order = cand[np.lexsort((cand, -mean_rel[best_c[cand], cand], -best_n[cand]))][:top]
    labels = searcher.labels(order.tolist())
    hits = []
    for f in order.tolist():
        c = int(best_c[f])
        ev = [LanguageEvidence(lang, concepts[c].texts[lang], float(A[c, li, f]), round(float(Rz[c, li, f]), 4),
                               bool(fires[c, li, f])) for li, lang in enumerate(kept) if present[c, li, f]]
        n = int(best_n[f])
        hits.append(MultilingualHit(f, concepts[c].name, n, round(n / L, 4), round(float(lcorr[f]), 4),
                                    round(float(mean_rel[c, f]), 4), labels.get(f, ""), ev))
    ok_len = np.abs(lcorr) <= max_length_corr
    null_best = []
    rng = np.random.default_rng(0)
    for _ in range(n_null):  # concepts shuffled within each language: what chance alone lists
        perm = np.stack([_group_permutation(groups, rng) for _ in range(L)], axis=1)  # [C, L]
        Rp, Pp = Rz[perm, np.arange(L)[None, :]], present[perm, np.arange(L)[None, :]]
        null_best.append(np.where(ok_len, _fires(Rp, Pp, groups, min_rel, selectivity).sum(1).max(0), 0))  # [F]
    null = [int((b >= min_languages).sum()) for b in null_best]
    null_mean = float(np.mean(null)) if null else None
    for h in hits:
        h.chance = round(float(np.mean([(b >= h.n_languages).sum() for b in null_best])), 4) if null_best else None
    if null:
        notes.append(f"by chance (concepts shuffled within each language, {n_null} times): {null_mean:.2f} features "
                     f"on average reach >= {min_languages} languages, against {len(cand)} found")
    return MultilingualResult(kept, [c.name for c in concepts], min_languages, hits, notes, len(cand), null_mean)


def _fires(Rz: np.ndarray, present: np.ndarray, groups: np.ndarray, min_rel: float,
           selectivity: float) -> np.ndarray:
    """[C, L, F] bool: relative activation >= min_rel and >= selectivity x the mean over the other concepts of
    the same group in the same language (all other concepts for a group of one)."""
    others = np.zeros_like(Rz)
    for g in np.unique(groups):
        idx = groups == g if (groups == g).sum() > 1 else np.ones(len(groups), dtype=bool)
        n = present[idx].sum(0)  # [L, F]
        tot = Rz[idx].sum(0, keepdims=True)
        rows = np.flatnonzero(groups == g)
        others[rows] = (tot - Rz[rows]) / np.maximum(n[None] - 1, 1)
    return present & (Rz >= min_rel) & (Rz >= selectivity * others) & (Rz > others)


def _group_permutation(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation of concept indices that only swaps concepts of the same group."""
    perm = np.arange(len(groups))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        perm[idx] = rng.permutation(idx)
    return perm


def length_correlation(acts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[F] Spearman correlation between each column of acts [N, F] and lengths [N] (0 for a constant column)."""
    from scipy.stats import rankdata

    ra = rankdata(acts, axis=0)
    rl = rankdata(lengths)
    ra = ra - ra.mean(0)
    rl = rl - rl.mean()
    den = np.sqrt((ra * ra).sum(0) * (rl * rl).sum())
    return np.divide(rl @ ra, den, out=np.zeros(acts.shape[1]), where=den > 0)
