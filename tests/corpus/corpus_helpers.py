"""Shared by the corpus tests: a tiny word-level vocabulary ("w0".."w199") with BOS/EOS/UNK."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS, UNK = 1, 2, 0


def word_id(i: int) -> int:
    """Id of the word "w{i}"."""
    return i + 3


def doc(*words: int) -> str:
    """A document made of the given words, e.g. doc(0, 1) == "w0 w1"."""
    return " ".join(f"w{i}" for i in words)


def make_raw_tokenizer() -> Tokenizer:
    """A `tokenizers.Tokenizer` whose post-processor adds BOS, as Llama-style tokenizers do."""
    vocab = {"<unk>": UNK, "<s>": BOS, "</s>": EOS, **{f"w{i}": word_id(i) for i in range(200)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return tok


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The same, wrapped as a Hugging Face fast tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_object=make_raw_tokenizer(), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
