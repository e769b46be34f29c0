"""Token text for people and for LLM prompts: a window of token ids decoded from the tokens' bytes, and
whitespace made visible. Used by `monoscope show` and by the prompts of `monoscope explain`.

    vocab = Vocab(db.vocab(), db.vocab_bytes())
    texts, acts, pos = vocab.window(ids, acts, position)    # one string per shown token
    visible(" the\\n")                                        # ' the⏎'

Why bytes. A byte-level tokenizer splits a character of several UTF-8 bytes (CJK, Cyrillic in some
vocabularies, emoji) across tokens; decoding each token alone gives U+FFFD for every piece. The
features pass stores every token's bytes (`vocab.bytes`), and a window is decoded jointly:

Rule. The window's bytes are fed token by token to an incremental UTF-8 decoder, so a character is
given to the token that completes it (the token holding its last byte); a token that only starts a
character gets no text of its own. Such empty tokens are then folded into the next token that has text:
its activation becomes the larger of the two (a character is as active as its most active byte), and
the window's maximum moves with it. Bytes that cannot complete a character (a window cut inside one,
an invalid sequence) become U+FFFD on the token where the decoder gives up. A database without token
bytes (written before they were stored) falls back to each token's own text. A token listed on its own
(cheap labels, logit effects) whose bytes are not whole characters is written by its bytes, `<0xE6>`,
rather than as U+FFFD (`vocab_texts`).
"""

from __future__ import annotations

import codecs
import functools
import json
import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

CONTROL = {"\n": "⏎", "\r": "↵", "\t": "⇥", "\f": "␌", "\v": "␋", "\x00": "␀"}
"""Whitespace and control characters shown as symbols, so one window stays on one line."""


def visible(text: str, *, standalone: bool = False) -> str:
    """Token text on one line with its whitespace visible: newline ⏎, tab ⇥, other controls as symbols.

    A token of two or more spaces and nothing else (indentation) shows them as "·" so it is not lost;
    other spaces in running text stay spaces (a lone " " token reads as the space it is). `standalone`
    (a token listed on its own, e.g. a logit) shows every space as "·": " the" and "the" differ.
    """
    out = []
    for ch in text:
        if ch in CONTROL:
            out.append(CONTROL[ch])
        elif unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            out.append(chr(0x2400 + ord(ch)) if ord(ch) < 0x20 else "�")
        else:
            out.append(ch)
    s = "".join(out)
    if standalone or (len(s) > 1 and not s.strip(" ")):
        s = s.replace(" ", "·")
    return s


def token_text(vocab: Sequence[str], tok: Any) -> str:
    """A token given as an id (looked up in the vocab) or already as text (JSON lists store either)."""
    if isinstance(tok, bool):  # JSON true/false: not a token
        return str(tok)
    if isinstance(tok, int | np.integer):
        i = int(tok)
        return vocab[i] if 0 <= i < len(vocab) else f"<{i}>"
    return str(tok)


def decode_tokens(pieces: Sequence[bytes]) -> list[str]:
    """One string per token from the tokens' bytes, decoded jointly (module doc: the rule)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = [dec.decode(b) for b in pieces]
    tail = dec.decode(b"", final=True)  # an unfinished character at the end of the window
    if tail and out:
        out[-1] += tail
    return out


def fold_empty(texts: Sequence[str], acts: Sequence[float], position: int) -> tuple[list[str], list[float], int]:
    """Drop tokens without text, giving their activation (max) and the window's maximum to the next token
    with text (the previous one at the end of the window)."""
    keep = [i for i, t in enumerate(texts) if t]
    if len(keep) == len(texts) or not keep:
        return list(texts), [float(a) for a in acts], position
    out_t: list[str] = []
    out_a: list[float] = []
    pos = 0
    pending: list[int] = []
    for i, t in enumerate(texts):
        pending.append(i)
        if not t:
            continue
        out_t.append(t)
        out_a.append(max(float(acts[j]) for j in pending))
        if position in pending:
            pos = len(out_t) - 1
        pending = []
    if pending:  # empty tokens at the end: onto the last token with text
        out_a[-1] = max([out_a[-1], *(float(acts[j]) for j in pending)])
        if position in pending:
            pos = len(out_t) - 1
    return out_t, out_a, pos


class Vocab:
    """A tokenizer's vocabulary as the feature database stores it: text per token, bytes when known."""

    def __init__(self, texts: Sequence[str], token_bytes: Sequence[bytes] | None = None) -> None:
        self.texts = list(texts)
        self.bytes = None if token_bytes is None or len(token_bytes) != len(texts) else list(token_bytes)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]

    @functools.cached_property
    def whole(self) -> list[str | None]:
        """Each token's text when its bytes are complete UTF-8 on their own (None when not): most tokens."""
        out: list[str | None] = []
        for b in self.bytes or []:
            try:
                out.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(None)
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """One string per id (negative or unknown ids: "<id>"), characters split across tokens joined."""
        ids = [int(i) for i in ids]
        if self.bytes is None:
            return [token_text(self.texts, i) for i in ids]
        whole = self.whole
        try:  # fast path: every token is whole UTF-8 on its own, so joint decoding changes nothing
            out = [whole[i] for i in ids]
            if None not in out and min(ids, default=0) >= 0:
                return out  # type: ignore[return-value]
        except IndexError:
            pass
        n = len(self.bytes)
        out: list[str] = []
        run: list[bytes] = []
        for i in ids:  # an unknown id interrupts the byte stream
            if 0 <= i < n:
                run.append(self.bytes[i])
                continue
            out += decode_tokens(run)
            run = []
            out.append(f"<{i}>")
        return out + decode_tokens(run)

    def window(self, ids: Sequence[int] | np.ndarray, acts: Sequence[float] | np.ndarray,
               position: int) -> tuple[list[str], list[float], int]:
        """(texts, acts, position) of a window to show: decoded jointly, tokens without text folded."""
        texts = self.decode(ids)
        a = [float(acts[i]) if i < len(acts) else 0.0 for i in range(len(texts))]
        return fold_empty(texts, a, min(max(int(position), 0), max(len(texts) - 1, 0)))


# ---------------------------------------------------------------------------------------------- from a tokenizer
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character each byte is written as -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _decoder_kinds(tokenizer: Any) -> set[str]:
    """The decoder types of a fast tokenizer (ByteLevel, Metaspace, ByteFallback, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    try:
        dec = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return set()
    kinds = set()
    stack = [dec]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            kinds.add(str(d.get("type")))
            stack += d.get("decoders") or []
    return kinds


def vocab_bytes(tokenizer: Any) -> list[bytes]:
    """The bytes each token id of a Hugging Face tokenizer stands for: byte-level BPE (GPT-2, Llama 3,
    SmolLM) through its byte alphabet, SentencePiece byte-fallback tokens `<0xNN>` as that byte, "▁" as a
    space; special tokens and anything else as the UTF-8 of the token's text."""
    n = len(tokenizer)
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    kinds = _decoder_kinds(tokenizer)
    table = _byte_decoder()
    out: list[bytes] = []
    for i, t in enumerate(toks):
        t = "" if t is None else str(t)
        if i in special or i in added:
            out.append(tokenizer.convert_tokens_to_string([t]).encode("utf-8"))
        elif "ByteLevel" in kinds and all(c in table for c in t):
            out.append(bytes(table[c] for c in t))
        elif m := _BYTE_TOKEN.match(t):
            out.append(bytes([int(m.group(1), 16)]))
        elif "Metaspace" in kinds or "▁" in t:
            out.append(t.replace("▁", " ").encode("utf-8"))
        else:
            out.append(tokenizer.convert_tokens_to_string([t]).encode("utf-8"))
    return out


def byte_text(b: bytes) -> str:
    """Bytes as text, any byte that is not part of a whole UTF-8 character written <0xNN> (the notation of
    SentencePiece's byte tokens): how a token holding part of a character is listed on its own (labels,
    logit effects), where U+FFFD would hide which bytes it holds."""
    s = b.decode("utf-8", errors="surrogateescape")
    return "".join(f"<0x{ord(c) - 0xDC00:02X}>" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in s)


def vocab_texts(tokenizer: Any, token_bytes: Sequence[bytes]) -> list[str]:
    """Each token's text as the tokenizer writes it, or `byte_text` of its bytes when those are not whole
    UTF-8 characters (the tokenizer would write U+FFFD)."""
    toks = tokenizer.convert_ids_to_tokens(list(range(len(token_bytes))))
    out = []
    for t, b in zip(toks, token_bytes, strict=True):
        try:
            b.decode("utf-8")
            out.append(tokenizer.convert_tokens_to_string([t]))
        except UnicodeDecodeError:
            out.append(byte_text(b))
    return out

