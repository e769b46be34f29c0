"""The default corpus: English prose, Python code and ~100 other languages, built offline from pip packages.

Three streams are interleaved by estimated tokens (weighted fair queueing: the next document comes
from the stream furthest behind its share), so that any prefix holds about

- 45% English prose: `pydoc_data.topics`, standard-library docstrings, docstrings of some of monoscope's
  dependencies (`PROSE_PACKAGES`), installed packages' long descriptions (`*.dist-info/METADATA`);
- 25% code: standard-library `.py` sources;
- 30% other languages: Django's translation catalogues (msgstr texts, every non-English locale, taken in
  turn) and Babel's CLDR names (territories, languages, scripts, currencies, units, months, ... per locale).

Why tokens, not characters: an English-centric tokenizer spends ~1.75 tokens on a non-ASCII character
and ~0.27 on an ASCII one, so a 30% share of *characters* in other scripts became 57% of SmolLM2's
tokens. `approx_tokens` (fitted on this corpus with SmolLM2's tokenizer, within ~10% per stream) keeps
the shares close to what the model actually reads. The shares hold until the prose runs out (at about
half of the ~9M SmolLM2 tokens); after that come code and other languages, and at the end other
languages alone. Inside each stream the sub-sources are interleaved the same way, with equal shares.
Repeated documents (identical text) are kept once. The stream depends only on the Python version and
the installed versions that `describe()` records.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from monoscope import cache
from monoscope.corpus import sources
from monoscope.corpus.base import Corpus, Document

MIX = {"prose": 0.45, "code": 0.25, "languages": 0.30}
"""Share of (estimated) tokens of each stream in any prefix, while all streams last."""
PROSE_PACKAGES: dict[str, tuple[str, ...] | None] = {
    "numpy": None,
    "django": None,
    "torch": ("", "nn", "optim", "autograd", "distributions", "utils"),
    "transformers": ("", "generation", "pipelines", "utils", "integrations"),
    "accelerate": None,
    "babel": None,
    "pyarrow": None,
    "rich": None,
    "tqdm": None,
}
"""Packages (monoscope's dependencies) whose docstrings join the prose -> the first-level subpackages
read ("" = top-level modules; None = all). torch and transformers are limited to their best-documented
parts: all of them would add ~9 MB but ~15 s of parsing to every full pass."""
EXCLUDED_METADATA = ("monoscope",)
"""Our own README changes with every edit: keeping it out keeps the corpus stable across our versions."""
VERSION = 1
"""Bumped whenever the way documents are built changes, so manifests can tell corpora apart."""


def approx_tokens(text: str) -> float:
    """Tokens an English-centric byte-level BPE (SmolLM2's) spends on `text`, within ~10%: ASCII characters
    cost ~0.27 each, others ~1.75 (measured on this corpus)."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return 0.27 * ascii_chars + 1.75 * (len(text) - ascii_chars)


def interleave(streams: Sequence[tuple[float, Iterator[Document]]]) -> Iterator[Document]:
    """Merge streams so that each gets its weight's share of (estimated) tokens in every prefix.

    The next document always comes from the live stream with the fewest tokens per unit of weight
    (ties: the earlier stream); an exhausted stream drops out and the others share its place.
    """
    weights = [w for w, _ in streams]
    iterators = [it for _, it in streams]
    emitted = [0.0] * len(streams)
    live = [i for i, w in enumerate(weights) if w > 0]
    while live:
        i = min(live, key=lambda j: (emitted[j] / weights[j], j))
        doc = next(iterators[i], None)
        if doc is None:
            live.remove(i)
            continue
        emitted[i] += approx_tokens(doc.text)
        yield doc


def _lazy(make: Callable[[], Iterator[Document]]) -> Iterator[Document]:
    """Defer building a sub-stream (parsing its files) until its first document is asked for."""
    yield from make()


def _equal(parts: list[Iterator[Document]]) -> Iterator[Document]:
    return interleave([(1.0, part) for part in parts])


def _cldr_stream() -> Iterator[Document]:
    # Locale after locale (not in turn): Babel keeps every locale it loads in memory.
    for locale in sources.cldr_locales():
        yield from sources.cldr(locale)


def _prose() -> Iterator[Document]:
    parts = [_lazy(sources.pydoc_topics), _lazy(sources.stdlib_docstrings)]
    parts += [
        _lazy(lambda n=name, p=sub: sources.package_docstrings(n, p)) for name, sub in PROSE_PACKAGES.items()
    ]
    parts.append(_lazy(lambda: sources.package_metadata(EXCLUDED_METADATA)))
    return _equal(parts)


def _languages() -> Iterator[Document]:
    django = _equal(
        [
            _lazy(lambda loc=loc, files=files: sources.django_po(loc, files))
            for loc, files in sources.django_locales().items()
        ]
    )
    return _equal([django, _lazy(_cldr_stream)])


def category(source: str) -> str:
    """The stream ("prose", "code" or "languages") a default-corpus source label belongs to."""
    if source == "stdlib-code":
        return "code"
    if source.startswith(("django-po:", "cldr:")):
        return "languages"
    return "prose"


class DefaultCorpus(Corpus):
    """The corpus used when the user brings none (`open_corpus("default")`)."""

    name = "default"

    def __init__(self) -> None:
        super().__init__()
        self._fingerprint: str | None = None

    def _records(self) -> Iterator[Document]:
        seen: set[bytes] = set()
        mixed = interleave(
            [
                (MIX["prose"], _lazy(_prose)),
                (MIX["code"], _lazy(sources.stdlib_code)),
                (MIX["languages"], _lazy(_languages)),
            ]
        )
        for doc in mixed:
            key = hashlib.sha1(doc.text.encode("utf-8", "surrogatepass")).digest()
            if key not in seen:
                seen.add(key)
                yield doc

    def fingerprint(self) -> str:
        """sha256 of the whole document stream (each text length-prefixed).

        Generating the stream takes ~8 s, so the digest is cached on disk under a key made of
        everything the stream depends on (`describe()`: versions, sources, locales) and the stdlib path.
        """
        if self._fingerprint is None:
            key = cache.key_of({"describe": self.describe(), "stdlib": sysconfig.get_paths()["stdlib"]})
            self._fingerprint = cache.cached_value("default-corpus-fingerprint", key) or self._compute_fingerprint()
            cache.store_value("default-corpus-fingerprint", key, self._fingerprint)
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(f"monoscope-default-corpus-v{VERSION}\n".encode())
        for text in self.documents():
            data = text.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        import babel.core

        python = platform.python_version()
        prose_packages = {name: sources.version(name) for name in PROSE_PACKAGES}
        metadata = {d.metadata["Name"]: d.version for d in sources.metadata_distributions(EXCLUDED_METADATA)}
        return {
            "kind": "default",
            "path": "default",
            "version": VERSION,
            "mix": {"unit": "approx_tokens", **MIX},
            "versions": {
                "python": python,
                "django": sources.version("django"),
                "babel": sources.version("babel"),
                "cldr": babel.core.get_cldr_version(),
                **{k: v for k, v in prose_packages.items() if k not in ("django", "babel")},
            },
            "sources": {
                "pydoc_data.topics": {"category": "prose", "python": python},
                "stdlib-docstrings": {"category": "prose", "python": python},
                "pkg-docstrings": {
                    "category": "prose",
                    "packages": prose_packages,
                    "subpackages": {k: list(v) for k, v in PROSE_PACKAGES.items() if v is not None},
                },
                "pkg-metadata": {"category": "prose", "distributions": metadata},
                "stdlib-code": {
                    "category": "code",
                    "python": python,
                    "max_file_bytes": sources.MAX_SOURCE_BYTES,
                },
                "django-po": {
                    "category": "languages",
                    "django": sources.version("django"),
                    "locales": sorted(sources.django_locales()),
                },
                "cldr": {
                    "category": "languages",
                    "babel": sources.version("babel"),
                    "cldr": babel.core.get_cldr_version(),
                    "locales": sources.cldr_locales(),
                },
            },
        }
