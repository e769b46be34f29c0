"""Token text decoded from token bytes: characters a byte-level tokenizer splits across tokens (CJK, Cyrillic,
emoji) come out whole, in dashboards and in LLM prompts, never as U+FFFD pieces."""

from __future__ import annotations

import pytest

from monoscope.features.tokens import (
    Vocab,
    byte_text,
    decode_tokens,
    fold_empty,
    token_text,
    visible,
    vocab_bytes,
    vocab_texts,
)
from monoscope.interp.prompts import Context, Evidence, format_explain_evidence
from tests.conftest import make_tokenizer

TEXTS = ["日本語のテキスト", "Привет, мир", "emoji 🙂🚀 end", "mixed: über 中文 ok"]


def _vocab(tok) -> Vocab:  # type: ignore[no-untyped-def]
    texts = [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
    return Vocab(texts, vocab_bytes(tok))


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return make_tokenizer()  # GPT-2 style byte-level BPE, trained in the test on mostly ASCII text


def test_byte_level_windows_decode_whole_characters(tok) -> None:  # type: ignore[no-untyped-def]
    vocab = _vocab(tok)
    for s in TEXTS:
        ids = tok(s)["input_ids"]
        per_token = [vocab.texts[i] for i in ids]
        assert "\ufffd" in "".join(per_token)  # the old token-by-token text: pieces of characters
        decoded = vocab.decode(ids)
        assert len(decoded) == len(ids) and "".join(decoded) == s  # one string per token, joined exactly
    # the rule: a character belongs to the token holding its last byte; the tokens before it get ""
    ids = tok("日")["input_ids"]
    assert len(ids) == 3 and vocab.decode(ids) == ["", "", "日"]


def test_fold_moves_activation_and_maximum_to_the_completing_token(tok) -> None:  # type: ignore[no-untyped-def]
    vocab = _vocab(tok)
    ids = tok("a日b")["input_ids"]
    assert vocab.decode(ids) == ["a", "", "", "日", "b"]
    texts, acts, pos = vocab.window(ids, [0.0, 5.0, 1.0, 2.0, 0.5], 1)  # the maximum is on the first byte of 日
    assert (texts, acts, pos) == (["a", "日", "b"], [0.0, 5.0, 0.5], 1)
    assert fold_empty(["x", ""], [1.0, 3.0], 1) == (["x"], [3.0], 0)  # trailing empties fold backwards
    # a window cut inside a character: the orphan bytes are U+FFFD on the token where decoding gives up
    assert decode_tokens([b"\xe6\x97", b"\xa5a"]) == ["", "日a"]
    assert decode_tokens([b"\xe6\x97", b"a", b"\xe6"]) == ["", "\ufffda", "\ufffd"]  # cut, then unfinished
    assert decode_tokens([b"\x97\xa5", b"ok"]) == ["\ufffd\ufffd", "ok"]


def test_prompt_evidence_shows_whole_characters(tok) -> None:  # type: ignore[no-untyped-def]
    vocab = _vocab(tok)
    ids = tok("Привет 🙂 日本")["input_ids"]
    acts = [0.0] * len(ids)
    acts[-1] = 3.0  # the last byte of 本
    texts, folded, pos = vocab.window(ids, acts, len(ids) - 1)
    ctx = Context(tuple(texts), tuple(folded), 0, "top", 0, 3.0, pos)
    text = format_explain_evidence(Evidence(0, 3.0, [ctx]))
    assert "\ufffd" not in text and "Привет 🙂 日<<本>>" in text and '"本" 10' in text


def test_a_token_holding_part_of_a_character_is_listed_by_its_bytes(tok) -> None:  # type: ignore[no-untyped-def]
    assert byte_text(b" \xe6\x97\xa5\xe6\x97") == " 日<0xE6><0x97>" and byte_text(b"ok") == "ok"
    texts = vocab_texts(tok, vocab_bytes(tok))
    ids = tok("日")["input_ids"]
    assert [texts[i] for i in ids] == ["<0xE6>", "<0x97>", "<0xA5>"]  # not three U+FFFD
    ids = tok("the quick fox")["input_ids"]
    assert "".join(texts[i] for i in ids) == "the quick fox"  # whole characters: the tokenizer's own text


def test_without_bytes_falls_back_to_token_text() -> None:
    v = Vocab(["a", "b"])  # a database written before token bytes were stored
    assert v.bytes is None and v.decode([1, 0, 7]) == ["b", "a", "<7>"]
    assert Vocab(["a", "b"], [b"a", b"b"]).decode([0, -1, 1]) == ["a", "<-1>", "b"]
    assert token_text(["x"], 0) == "x" and token_text(["x"], 5) == "<5>" and token_text(["x"], " y") == " y"
    assert visible("a\nb\t") == "a⏎b⇥"


@pytest.mark.integration
def test_smollm2_tokenizer_from_the_default_gguf() -> None:
    from transformers import AutoTokenizer

    from monoscope.model.load import default_gguf_path

    path = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    vocab = _vocab(tok)
    assert len(vocab.bytes or []) == len(tok)
    for s in [*TEXTS, "ここは日本です。Москва — столица. 👍🏽 family: 👨‍👩‍👧"]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert "".join(vocab.decode(ids)) == s
    split = [s for s in TEXTS if "\ufffd" in "".join(vocab.texts[i] for i in tok(s, add_special_tokens=False)
                                                      ["input_ids"])]
    assert split  # SmolLM2 does split some of these characters across tokens
