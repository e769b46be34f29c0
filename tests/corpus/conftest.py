"""Fixtures for the corpus tests."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from tests.corpus.corpus_helpers import make_raw_tokenizer, make_tokenizer


@pytest.fixture(scope="session")
def raw_tokenizer() -> Tokenizer:
    return make_raw_tokenizer()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()
