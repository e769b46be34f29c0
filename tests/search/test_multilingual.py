"""Multilingual search: a feature planted on one concept in 6 'languages' is found; dense and sparse ones are not."""

from __future__ import annotations

import json

import pytest

from monoscope.cli import main
from monoscope.errors import MonoscopeError
from monoscope.search.multilingual import LANGUAGES, Concept, multilingual_search, parallel_concepts
from monoscope.search.text import Searcher
from tests.search.conftest import DENSE, DOG, FOX, Planted

LANGS = ["l1", "l2", "l3", "l4", "l5", "l6"]


@pytest.fixture(scope="module")
def searcher(planted: Planted) -> Searcher:
    s = Searcher.open(planted.sae, device="cpu", compute_dtype="fp32")
    yield s
    s.close()


def _concepts() -> list[Concept]:
    frames = ["the {} sleeps", "my {} runs", "a {} barks", "one {} here", "the lazy {}", "and the {}"]
    dog = Concept("dog", {lang: f.format("dog") for lang, f in zip(LANGS, frames, strict=True)})
    # fox appears in only 3 languages (the others say 'cat'): under --min-languages 5
    fox = Concept("fox", {lang: f.format("fox" if i < 3 else "cat") for i, (lang, f) in
                          enumerate(zip(LANGS, frames, strict=True))})
    cat = Concept("cat", {lang: f.format("cat") for lang, f in zip(LANGS, frames, strict=True)})
    return [dog, fox, cat]


def test_planted_concept_feature_found_in_every_language(searcher: Searcher) -> None:
    res = multilingual_search(searcher, concepts=_concepts(), min_languages=5)
    assert res.languages == LANGS and res.concepts == ["dog", "fox", "cat"]
    assert [h.feature for h in res.hits] == [DOG]  # DENSE fires on everything (not selective), FOX in 3 languages
    h = res.hits[0]
    assert h.concept == "dog" and h.n_languages == 6 and h.consistency == 1.0 and h.mean_rel == 0.5
    assert h.length_corr == 0.0  # the dog, fox and cat texts of a language have the same length
    # chance: DOG lands on one shuffled concept in >= 5 of 6 languages in 3 of 20 seeded shuffles (p = 0.053 each)
    assert res.n_found == 1 and res.null_mean == 0.15
    assert h.chance == 0.0  # never all 6 languages in the 20 shuffles
    assert [h.chance for h in multilingual_search(searcher, concepts=_concepts(), min_languages=5, n_null=0).hits] == [
        None]
    assert res.notes == ["by chance (concepts shuffled within each language, 20 times): 0.15 features on average "
                         "reach >= 5 languages, against 1 found"]
    assert [(e.language, e.fires, e.rel) for e in h.evidence] == [(lang, True, 0.5) for lang in LANGS]
    low = multilingual_search(searcher, concepts=_concepts(), min_languages=3)
    assert [(h.feature, h.concept, h.n_languages) for h in low.hits] == [(DOG, "dog", 6), (FOX, "fox", 3)]
    assert DENSE not in [h.feature for h in low.hits]


def test_concepts_are_compared_within_their_group(searcher: Searcher) -> None:
    frames = ["the {} sleeps", "my {} runs", "a {} barks", "one {} here", "the lazy {}", "and the {}"]

    def concept(name: str, word: str, group: str) -> Concept:
        return Concept(name, {lang: f.format(word) for lang, f in zip(LANGS, frames, strict=True)}, group=group)

    # DOG fires on both 'animal' concepts: against the other animal it is not selective, so it is no hit;
    # FOX fires on 'fox' and not on 'cat', the other concept of its group
    grouped = [concept("dog a", "dog", "animal"), concept("dog b", "dog", "animal"), concept("cat", "cat", "other"),
               concept("fox", "fox", "other")]
    hits = multilingual_search(searcher, concepts=grouped, min_languages=5).hits
    assert [(h.feature, h.concept) for h in hits] == [(FOX, "fox")]
    ungrouped = [Concept(c.name, c.texts) for c in grouped]  # one group: dog a/b beat the mean of the other three
    hits = multilingual_search(searcher, concepts=ungrouped, min_languages=5).hits
    assert [(h.feature, h.concept) for h in hits] == [(FOX, "fox"), (DOG, "dog a")]


def test_length_driven_features_are_left_out(searcher: Searcher) -> None:
    cs = _concepts()
    for lang in LANGS:  # the dog texts are the longest in every language: DOG now follows length
        cs[0].texts[lang] += " and runs far away from the house"
    res = multilingual_search(searcher, concepts=cs, min_languages=5)
    assert res.hits == []
    assert res.notes[0] == ("1 features that fire for one concept in >= 5 languages left out: their activation "
                            "follows the text's length (|Spearman| > 0.5; e.g. #5, 0.86)")
    kept = multilingual_search(searcher, concepts=cs, min_languages=5, max_length_corr=1.0)
    assert [h.feature for h in kept.hits] == [DOG] and kept.hits[0].length_corr == pytest.approx(0.86, abs=0.005)


def test_length_correlation_matches_scipy() -> None:
    import numpy as np
    from scipy.stats import spearmanr

    from monoscope.search.multilingual import length_correlation

    rng = np.random.default_rng(0)
    acts = np.round(rng.random((30, 4)), 1)
    acts[:, 3] = 0.0
    lengths = rng.integers(2, 9, 30).astype(float)
    got = length_correlation(acts, lengths)
    for j in range(3):
        assert got[j] == pytest.approx(spearmanr(acts[:, j], lengths).statistic, abs=1e-12)
    assert got[3] == 0.0


def test_cldr_parallel_names_cover_ten_languages() -> None:
    cs = parallel_concepts()
    assert len(LANGUAGES) >= 10 and all(set(c.texts) == set(LANGUAGES) for c in cs)
    france = next(c for c in cs if c.name == "country France")
    assert france.texts["de"] == "Frankreich" and france.texts["ja"] == "フランス" and france.texts["ru"] == "Франция"
    assert len(cs) == 57  # 16 countries, 14 cities, 10 languages, 5 months, 4 weekdays (CLDR), 8 Django messages
    london = next(c for c in cs if c.name == "city London")
    assert london.group == "city" and london.source.endswith("CLDR exemplar cities")
    # CLDR lists a city only where the name differs from the zone's; the fallback is the English name ("London" in de)
    assert [london.texts[k] for k in ("en", "de", "fr", "it", "ru", "ja", "zh", "ar")] == \
           ["London", "London", "Londres", "Londra", "Лондон", "ロンドン", "伦敦", "لندن"]
    cities = parallel_concepts(groups=("city",))
    assert len(cities) == 14 and all(c.group == "city" and set(c.texts) == set(LANGUAGES) for c in cities)
    # a concept of >= 10 languages beyond the countries: more than half the cities are written differently in
    # >= 5 languages, so a feature that fires on the English spelling alone cannot count as multilingual
    assert sum(len(set(c.texts.values())) >= 5 for c in cities) >= 10
    assert [c.group for c in parallel_concepts(groups=("month", "message"))].count("message") == 8
    with pytest.raises(MonoscopeError, match=r"^--groups 'cites' is not a group of parallel concepts: use some of "
                                             r"country,city,language,month,weekday,message$"):
        parallel_concepts(groups=("cites",))
    msg = next(c for c in cs if c.name == "message 'This field is required.'")
    assert msg.texts["de"] == "Dieses Feld ist zwingend erforderlich." and msg.texts["en"] == "This field is required."
    assert msg.source.startswith("Django ")


def test_mangled_detection() -> None:
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from monoscope.search.multilingual import _mangled

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "the": 1, "dog": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    fake = SimpleNamespace(lm=SimpleNamespace(tokenizer=tok))
    assert not _mangled(fake, "the dog")  # type: ignore[arg-type]
    assert _mangled(fake, "le chien")  # type: ignore[arg-type]


def test_mangled_languages_are_left_out_with_a_note(searcher: Searcher, monkeypatch: pytest.MonkeyPatch) -> None:
    import monoscope.search.multilingual as ml

    cs = _concepts()
    for c in cs:
        c.texts["zz"] = "zz: " + c.texts["l1"]
    monkeypatch.setattr(ml, "_mangled", lambda s, text: text.startswith("zz:"))
    res = multilingual_search(searcher, concepts=cs, min_languages=5)
    assert res.languages == LANGS and [h.feature for h in res.hits] == [DOG]
    assert res.notes[0] == "language zz left out: the tokenizer does not reproduce 'zz: the dog sleeps' (3 of 3 texts)"
    with pytest.raises(MonoscopeError, match=r"only 6 languages \(l1, l2, l3, l4, l5, l6\) survive tokenization, "
                                             r"fewer than --min-languages 7"):
        multilingual_search(searcher, concepts=cs, min_languages=7)


def test_cli_multilingual_on_cldr(planted: Planted, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(planted.sae), "--multilingual", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["languages"]) >= 10 and len(out["concepts"]) == 57
    # the planted features fire on ' fox'/' dog' only, which no CLDR name contains: nothing qualifies
    assert out["hits"] == []


def test_cli_multilingual_groups(planted: Planted, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(planted.sae), "--multilingual", "--groups", "city,country", "--json", "--device",
                 "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["concepts"]) == 30 and out["concepts"][0] == "country France" and "city London" in out["concepts"]
    assert main(["search", str(planted.sae), "--multilingual", "--groups", "town"]) == 2
    assert capsys.readouterr().err.startswith("error: --groups 'town' is not a group of parallel concepts: use some of")
    assert main(["search", str(planted.sae), "the dog", "--groups", "city"]) == 2
    assert capsys.readouterr().err == "error: --groups goes with --multilingual: add it, or drop --groups\n"
