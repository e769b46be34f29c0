"""Concept packs: labelled texts for finding a concept's features by contrast (`monoscope search --pack`).

A pack is a jsonl file, one object per line with the fields
    text     the text (non-empty)
    label    1 = shows the concept (positive), 0 = a matched benign text without it (negative)
    concept  what the positives show, e.g. "sycophancy"
    source   where the item comes from (package, version and file, or "monoscope hand-written")
    license  the item's licence (upstream licence noted where the data was derived)
Shipped packs live in `monoscope/search/packs/NAME.jsonl`; `packs/index.json` records each one's version,
sha256 and counts (scripts/build_packs.py regenerates both from their sources). A user's pack is any
jsonl file with the same fields; every problem is a one-line error naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monoscope.search.text import SearchError

PACK_DIR = Path(__file__).with_name("packs")
INDEX = "index.json"
FIELDS = ("text", "label", "concept", "source", "license")
MIN_PER_SIDE = 40
"""Shipped packs hold at least this many positive and negative texts (a user's pack may hold fewer)."""


@dataclass
class PackItem:
    text: str
    label: int
    concept: str
    source: str
    license: str
    line: int


@dataclass
class Pack:
    name: str
    version: str
    path: Path
    items: list[PackItem]

    @property
    def concept(self) -> str:
        return ", ".join(sorted({i.concept for i in self.items if i.label == 1}))

    def texts(self, label: int) -> tuple[list[str], list[str]]:
        """(texts, names 'FILE line N') of one side."""
        sel = [i for i in self.items if i.label == label]
        return [i.text for i in sel], [f"{self.path} line {i.line}" for i in sel]

    @property
    def n_pos(self) -> int:
        return sum(i.label == 1 for i in self.items)

    @property
    def n_neg(self) -> int:
        return sum(i.label == 0 for i in self.items)


def _index() -> dict[str, Any]:
    p = PACK_DIR / INDEX
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def list_packs() -> list[dict[str, Any]]:
    """The shipped packs: name, version, concept, counts, sources, sha256."""
    return [{"name": k, **v} for k, v in sorted(_index().get("packs", {}).items())]


def read_pack_file(path: str | Path) -> list[PackItem]:
    """Parse and validate a pack file (any problem: one line naming the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"pack {path} does not exist: pass a shipped pack name ({', '.join(_names()) or 'none'}) "
                          "or a .jsonl file with fields text,label,concept,source,license")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SearchError(f"{path} line {n} is not JSON ({e.msg}): write one object per line") from None
        if not isinstance(obj, dict):
            raise SearchError(f"{path} line {n} is not a JSON object: write {{\"text\": ..., \"label\": 1, ...}}")
        missing = [f for f in FIELDS if f not in obj]
        if missing:
            raise SearchError(f"{path} line {n} lacks {', '.join(missing)}: every item needs "
                              f"{', '.join(FIELDS)}")
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise SearchError(f"{path} line {n} has an empty text: give the text the model should read")
        if obj["label"] not in (0, 1) or isinstance(obj["label"], bool):
            raise SearchError(f"{path} line {n} has label {obj['label']!r}: use 1 (shows the concept) or 0 "
                              "(matched benign text)")
        for f in ("concept", "source", "license"):
            if not isinstance(obj[f], str) or not obj[f].strip():
                raise SearchError(f"{path} line {n} has an empty {f}: say what it is (e.g. license "
                                  "'CC-BY-4.0', source 'hand-written')")
        items.append(PackItem(obj["text"], int(obj["label"]), obj["concept"], obj["source"], obj["license"], n))
    if not items:
        raise SearchError(f"{path} holds no items: add lines like {{\"text\": ..., \"label\": 1, \"concept\": ..., "
                          "\"source\": ..., \"license\": ...}}")
    pos = sum(i.label == 1 for i in items)
    if pos == 0 or pos == len(items):
        side, other = ("positive (label 1)", "negative (label 0)") if pos else ("negative (label 0)",
                                                                                  "positive (label 1)")
        last = items[-1].line
        raise SearchError(f"{path} is one-sided: all {len(items)} items up to line {last} are {side}; add "
                          f"{other} texts to contrast them with")
    return items


def _names() -> list[str]:
    return sorted(_index().get("packs", {}))


def load_pack(name_or_path: str | Path) -> Pack:
    """A shipped pack by name, or a user's pack file (validated)."""
    s = str(name_or_path)
    info = _index().get("packs", {}).get(s)
    if info is not None:
        path = PACK_DIR / info["file"]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != info["sha256"]:
            raise SearchError(f"shipped pack {path} does not match its index (sha256 {digest[:12]}, expected "
                              f"{info['sha256'][:12]}): reinstall monoscope or rerun scripts/build_packs.py")
        return Pack(s, str(info["version"]), path, read_pack_file(path))
    p = Path(s)
    if p.suffix != ".jsonl" and not p.exists():
        raise SearchError(f"--pack {s!r} is neither a shipped pack ({', '.join(_names()) or 'none'}) nor a file: "
                          "pass a name from --list-packs or a .jsonl path")
    return Pack(p.stem, "user", p, read_pack_file(p))


def contrast_pack(searcher: Any, pack: Pack, *, top: int = 20, direction: str = "pos", alpha: float = 0.05) -> Any:
    """`contrast` of a pack's positives against its negatives; texts the tokenizer cannot reproduce (a script it
    does not know) are counted in a note naming the first one's file and line."""
    from monoscope.search import multilingual
    from monoscope.search.contrast import contrast

    pos, pn = pack.texts(1)
    neg, nn = pack.texts(0)
    res = contrast(searcher, pos, neg, pos_names=pn, neg_names=nn, top=top, direction=direction, alpha=alpha)
    bad = [i for i in pack.items if multilingual._mangled(searcher, i.text)]
    if bad:
        res.notes.append(f"{pack.path} line {bad[0].line}: the tokenizer does not reproduce this text ({len(bad)} of "
                         f"{len(pack.items)} items): activations on text it cannot read may mean little")
    return res
