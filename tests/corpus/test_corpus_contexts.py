"""Packing documents into contexts: one BOS at position 0, never between documents, lazy, deterministic."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest

from monoscope.corpus import CorpusError, iter_contexts
from tests.corpus.corpus_helpers import BOS, EOS, doc, word_id


def test_packs_documents_with_separator(tokenizer) -> None:
    docs = [doc(0, 1, 2), doc(3, 4), doc(5, 6, 7, 8, 9)]
    out = list(iter_contexts(docs, tokenizer, ctx_len=4, bos_id=BOS, sep_id=EOS))
    w = word_id
    stream = [w(0), w(1), w(2), EOS, w(3), w(4), EOS, w(5), w(6), w(7), w(8), w(9), EOS]  # 13 tokens
    assert [c.tolist() for c in out] == [[BOS, *stream[i : i + 3]] for i in range(0, 12, 3)]  # last 1 dropped
    assert all(c.dtype == np.int32 and c.shape == (4,) for c in out)


def test_no_separator_packs_back_to_back(tokenizer) -> None:
    out = list(iter_contexts([doc(0, 1), doc(2, 3)], tokenizer, ctx_len=5, bos_id=BOS, sep_id=None))
    assert [c.tolist() for c in out] == [[BOS, word_id(0), word_id(1), word_id(2), word_id(3)]]


class AlwaysBos:
    """A tokenizer that ignores add_special_tokens=False and puts BOS in front of every document."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts, **kwargs):
        kwargs["add_special_tokens"] = True
        return self.tokenizer(texts, **kwargs)


@pytest.mark.parametrize("wrap", [False, True])
def test_exactly_one_bos_at_position_zero(tokenizer, raw_tokenizer, wrap: bool) -> None:
    docs = [doc(*range(i, i + 7)) for i in range(40)] + ["w1 <s> w2 <s>"]  # literal BOS text too
    assert tokenizer(docs[:1])["input_ids"][0][0] == BOS  # this tokenizer would add one per document
    for tok in (AlwaysBos(tokenizer) if wrap else tokenizer, raw_tokenizer):
        out = np.stack(list(iter_contexts(docs, tok, ctx_len=16, bos_id=BOS, sep_id=EOS, batch_docs=3)))
        assert (out[:, 0] == BOS).all()
        assert not (out[:, 1:] == BOS).any()
        assert (out == EOS).sum() >= len(out)  # documents are short: separators in every context


def test_same_contexts_for_any_batch_size(tokenizer) -> None:
    docs = [doc(*range(i % 50, i % 50 + 1 + i % 9)) for i in range(300)]
    runs = [
        [c.tolist() for c in iter_contexts(docs, tokenizer, ctx_len=32, bos_id=BOS, sep_id=EOS, batch_docs=b)]
        for b in (1, 7, 64)
    ]
    assert runs[0] == runs[1] == runs[2]
    total = sum(1 + 1 + i % 9 for i in range(300))  # words + separator per document
    assert len(runs[0]) == total // 31


def test_long_document_continues_in_next_context(tokenizer) -> None:
    out = list(iter_contexts([doc(*range(100))], tokenizer, ctx_len=11, bos_id=BOS, sep_id=EOS))
    body = np.concatenate([c[1:] for c in out])
    assert body.tolist() == [word_id(i) for i in range(100)]  # 101 stream tokens -> 10 contexts
    assert len(out) == 10


def test_is_lazy(tokenizer) -> None:
    def docs() -> Iterator[str]:
        for i in range(10):
            yield doc(*range(i, i + 5))
        raise AssertionError("read past what the first contexts need")

    first = list(itertools.islice(iter_contexts(docs(), tokenizer, 4, BOS, EOS, batch_docs=2), 2))
    assert len(first) == 2


def test_too_short_names_corpus_and_fix(tokenizer) -> None:
    with pytest.raises(CorpusError, match=r"corpus tiny\.txt has only 7 tokens.*context of 128.*--ctx-len <= 8"):
        list(iter_contexts([doc(0, 1, 2), doc(3, 4)], tokenizer, 128, BOS, EOS, name="tiny.txt"))


def test_empty_inputs(tokenizer) -> None:
    with pytest.raises(CorpusError, match="no documents"):
        list(iter_contexts([], tokenizer, 8, BOS, EOS))
    with pytest.raises(CorpusError, match="no tokens"):
        list(iter_contexts(["   ", "\n"], tokenizer, 8, BOS, EOS))


def test_bad_arguments(tokenizer) -> None:
    with pytest.raises(CorpusError, match="sep_id 1 equals bos_id"):
        iter_contexts([doc(1)], tokenizer, 8, BOS, BOS)
    with pytest.raises(CorpusError, match="--ctx-len 1 is too small"):
        iter_contexts([doc(1)], tokenizer, 1, BOS, EOS)
