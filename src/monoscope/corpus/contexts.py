"""Tokenise a document stream into fixed-length, packed contexts that start with exactly one BOS.

Layout of every context (a numpy int32 array of `ctx_len` token ids):

    [bos] + the next ctx_len - 1 ids of   doc1 + [sep] + doc2 + [sep] + doc3 + ...

Documents are packed: one that does not fit continues in the next context, and a context may hold
several. BOS appears only at position 0 (a BOS between documents is a known way to corrupt SAE
training data): documents are tokenised without special tokens, special-token strings inside the text
are tokenised as plain text where the tokenizer allows it, and any BOS id a tokenizer still emits is
removed. The final partial context is dropped. The generator is lazy: it tokenises `batch_docs`
documents (at most ~`batch_chars` characters) at a time, so a caller that stops after N contexts
(`itertools.islice`) reads little more of the corpus than those N contexts need.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from monoscope.errors import CorpusError

if TYPE_CHECKING:  # the model stack sits above the corpus; only its type is needed here
    import torch

    from monoscope.corpus.base import Corpus
    from monoscope.model.load import LoadedModel


def _batches(documents: Iterable[str], batch_docs: int, batch_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in documents:
        if not doc:
            continue
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= batch_docs or chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _Encoder:
    """Batched encoding without special tokens, for HF tokenizers and raw `tokenizers.Tokenizer`s."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.raw = hasattr(tokenizer, "encode_batch") and not hasattr(tokenizer, "convert_tokens_to_ids")
        self.split_special = not self.raw  # try split_special_tokens=True once, drop it if refused

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.raw:
            return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        if self.split_special:
            try:
                out = self.tokenizer(
                    texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False
                )
                return list(out["input_ids"])
            except TypeError:
                self.split_special = False
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])


def iter_contexts(
    documents: Iterable[str],
    tokenizer: Any,
    ctx_len: int,
    bos_id: int,
    sep_id: int | None,
    batch_docs: int = 64,
    *,
    name: str = "corpus",
    batch_chars: int = 1 << 20,
) -> Iterator[np.ndarray]:
    """Yield packed contexts, each a fresh int32 array of shape [ctx_len] with `bos_id` at position 0 only.

    `tokenizer` is a Hugging Face tokenizer (called on a list of texts) or a `tokenizers.Tokenizer`.
    `sep_id` (e.g. the EOS id) follows every document; None packs documents back to back. `name` is how
    errors name the corpus. Raises CorpusError when the stream ends before the first context is full.
    """
    if ctx_len < 2:
        raise CorpusError(
            f"--ctx-len {ctx_len} is too small: a context needs the BOS and at least one token (>= 2)"
        )
    if batch_docs < 1:
        raise CorpusError(f"batch_docs {batch_docs} must be >= 1")
    if sep_id is not None and sep_id == bos_id:
        raise CorpusError(
            f"sep_id {sep_id} equals bos_id: a BOS between documents would corrupt the contexts; "
            "pass sep_id=None or another separator (e.g. the EOS id)"
        )
    return _contexts(documents, _Encoder(tokenizer), ctx_len, bos_id, sep_id, batch_docs, name, batch_chars)


def _contexts(
    documents: Iterable[str],
    encode: _Encoder,
    ctx_len: int,
    bos_id: int,
    sep_id: int | None,
    batch_docs: int,
    name: str,
    batch_chars: int,
) -> Iterator[np.ndarray]:
    body = ctx_len - 1  # corpus tokens per context, after the BOS
    sep = np.array([] if sep_id is None else [sep_id], dtype=np.int64)
    carry = np.empty(0, dtype=np.int64)  # tokens left over from the previous batch, < body of them
    n_docs = total = produced = 0
    for batch in _batches(documents, batch_docs, batch_chars):
        parts = [carry]
        for ids in encode(batch):
            arr = np.asarray(ids, dtype=np.int64)
            arr = arr[arr != bos_id]
            if arr.size:
                parts += [arr, sep]
        n_docs += len(batch)
        stream = np.concatenate(parts)
        total += stream.size - carry.size
        rows = stream.size // body
        if rows:
            block = np.empty((rows, ctx_len), dtype=np.int32)  # [rows, ctx_len]
            block[:, 0] = bos_id
            block[:, 1:] = stream[: rows * body].reshape(rows, body)
            produced += rows
            for row in block:
                yield row.copy()
        carry = stream[rows * body :]
    if produced:
        return
    if n_docs == 0:
        raise CorpusError(f"corpus {name} has no documents: pass a corpus with text in it")
    if total == 0:
        raise CorpusError(
            f"corpus {name} gave no tokens from {n_docs} documents: check the text field and the tokenizer"
        )
    raise CorpusError(
        f"corpus {name} has only {total} tokens, fewer than one context of {ctx_len} "
        f"(BOS + {body}): use a longer corpus or --ctx-len <= {total + 1}"
    )


def batched_contexts(lm: LoadedModel, corpus: Corpus, ctx_len: int, batch: int,
                     skip: int = 0) -> Iterator[torch.Tensor]:
    """Token ids [batch, ctx_len] int64 in the corpus's deterministic order, after the first `skip` contexts
    (tokenised, not returned); the last batch may be short. Every stage that feeds a model uses this, so
    capture, eval and the features pass see the same contexts."""
    import torch

    bos, sep = lm.special_ids()
    it = iter_contexts(corpus.documents(), lm.tokenizer, ctx_len, bos, sep, name=corpus.name)
    it = itertools.islice(it, skip, None)
    while chunk := list(itertools.islice(it, batch)):
        yield torch.from_numpy(np.stack(chunk)).to(torch.int64)
