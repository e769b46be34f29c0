"""Corpora: the offline default mix, user files (txt, jsonl, parquet, HF dataset folders), packed contexts.

corpus = open_corpus("default")            # or "my.jsonl", "data/", text_field="content"
contexts = iter_contexts(corpus.documents(), tokenizer, ctx_len=128, bos_id=bos, sep_id=eos,
                         name=corpus.name)
corpus.fingerprint(), corpus.describe(), corpus.replacements   # for the store manifest
"""

from __future__ import annotations

from pathlib import Path

from monoscope.corpus.base import Corpus, Document
from monoscope.corpus.contexts import iter_contexts
from monoscope.corpus.default import DefaultCorpus
from monoscope.corpus.readers import FileCorpus
from monoscope.errors import CorpusError

__all__ = ["Corpus", "CorpusError", "DefaultCorpus", "Document", "FileCorpus", "iter_contexts", "open_corpus"]


def open_corpus(spec: str | Path, *, text_field: str = "text", strict_utf8: bool = False) -> Corpus:
    """Open `spec` ("default" or a path; write "./default" for a folder of that name) and check it can be
    read: path, format and text field.

    Reading is deferred to `documents()`; a missing path, an unknown format or a missing text
    field/column fails here, before any heavy work.
    """
    if isinstance(spec, str) and spec == "default":
        return DefaultCorpus()
    if not str(spec).strip():
        raise CorpusError(
            "--corpus is empty: pass 'default' or a path to a .txt/.jsonl/.parquet file or folder"
        )
    if not text_field:
        raise CorpusError("--text-field is empty: pass the name of the field or column holding the text")
    return FileCorpus(Path(spec).expanduser(), text_field=text_field, strict_utf8=strict_utf8)
