"""Shared fixtures: tiny models and a tokenizer built in the test, seeded, no downloads."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from monoscope.devices import CPU_BF16_ENV
from monoscope.model import LoadedModel, from_module

# Tests never read or write the user's cache; subprocesses inherit this.
_CACHE = tempfile.mkdtemp(prefix="monoscope-test-cache-")
_PID = os.getpid()
os.environ["MONOSCOPE_CACHE"] = _CACHE
# `auto` computes in float32 on every CPU here (subprocesses inherit it): the golden values and the exact
# distributed-equals-one-process checks then hold on CPUs with AMX (where auto means bf16) and without; the bf16
# paths are tested where a test asks for bf16 by name.
os.environ[CPU_BF16_ENV] = "0"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The test cache goes with the session: it holds a dequantised copy of the default GGUF (1.6 GB), and
    every run used to leave one behind in the temp folder."""
    if os.getpid() == _PID:
        shutil.rmtree(_CACHE, ignore_errors=True)

TRAIN_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b):\n    return a + b",
    "le renard brun saute par dessus le chien paresseux",
    "der schnelle braune fuchs springt über den faulen hund",
    "sparse autoencoders learn interpretable features from activations",
] * 20


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<|endoftext|>",
                                   unk_token="<unk>")


def make_llama(vocab: int, layers: int = 4, d: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(tokenizer: PreTrainedTokenizerFast) -> LoadedModel:
    return from_module(make_llama(len(tokenizer)), tokenizer, name="tiny-llama")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The tests' tensors are tiny: with two intra-op threads on a busy 2-core machine each op waits
    for a descheduled thread (~10 ms), one thread is ~40x faster. Results are checked against runs
    made the same way (children get OMP_NUM_THREADS=1 too). Folders opt in with an autouse fixture."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def features_run(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A tiny run for the features pass (one per test module): a 4-layer Llama saved to disk, a store at
    resid_post.1 (1,024 tokens, 16-token contexts) and two TopK SAEs (4x in sae/, 2x in sae-2x/)."""
    from monoscope.capture import capture
    from monoscope.train import train

    root = tmp_path_factory.mktemp("feat")
    model = root / "model"
    make_llama(len(tokenizer), seed=5).save_pretrained(model)
    tokenizer.save_pretrained(model)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} number {i}"}) + "\n" for i, t in enumerate(TRAIN_TEXT * 4)))
    capture(root / "acts", model=str(model), corpus=str(corpus), hook="resid_post.1", tokens=1024, ctx_len=16,
            batch_contexts=8, contexts_per_shard=16, compute_dtype="fp32", progress=False)
    for name, width in (("sae", "4x"), ("sae-2x", "2x")):
        train(root / name, store=root / "acts", arch="topk", k=4, width=width, tokens=4096, batch_size=256,
              progress=False)
    return root
