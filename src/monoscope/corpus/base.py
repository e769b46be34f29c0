"""The corpus interface: a re-iterable stream of documents with a content hash and a description."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, NamedTuple

from monoscope.errors import CorpusError


class Document(NamedTuple):
    """One document and where it came from."""

    text: str
    """The document's text, never empty."""
    source: str
    """Its origin: a source label for the default corpus ("stdlib-code", "django-po:de", ...), a file
    path (with a line or row) for user corpora."""


class Corpus(ABC):
    """A stream of documents that can be read again from the start, hashed and described.

    Subclasses implement `_records`; the base class counts documents so that an empty corpus is an
    error where it is found rather than a silent zero-token capture later.
    """

    name: str
    """How messages name this corpus (a path, or "default")."""

    def __init__(self) -> None:
        self.replacements = 0
        """Bytes that were not valid UTF-8 and became U+FFFD, counted over the current (or last) pass."""

    @abstractmethod
    def _records(self) -> Iterator[Document]:
        """Yield the documents, from the beginning, each call."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A sha256 hex digest that changes whenever the documents would change."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable description for manifests: kind, path(s), sources and versions."""

    def _empty_error(self) -> CorpusError:
        return CorpusError(f"corpus {self.name} holds no documents: add text to it or pass another corpus")

    def records(self) -> Iterator[Document]:
        """Yield every document with its source, from the beginning (each call starts a new pass)."""
        self.replacements = 0
        count = 0
        for record in self._records():
            count += 1
            yield record
        if count == 0:
            raise self._empty_error()

    def documents(self) -> Iterator[str]:
        """Yield every document's text, from the beginning (each call starts a new pass)."""
        for record in self.records():
            yield record.text
