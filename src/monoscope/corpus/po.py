"""A small gettext `.po` parser, so the default corpus can read Django's catalogues without a dependency.

It understands what GNU gettext writes: `msgctxt`, `msgid`, `msgid_plural`, `msgstr`, `msgstr[N]`,
strings continued on following lines, C escapes, `#, fuzzy` flags and obsolete `#~` entries (skipped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from monoscope.errors import CorpusError

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)", re.DOTALL)
_KEYWORD_RE = re.compile(r"^(msgctxt|msgid_plural|msgid|msgstr(?:\[(\d+)\])?)\s+(\".*\")\s*$")


@dataclass
class PoEntry:
    """One message of a catalogue: the English `msgid` and its translations (one per plural form)."""

    msgid: str = ""
    msgid_plural: str | None = None
    msgctxt: str | None = None
    msgstr: list[str] = field(default_factory=list)
    fuzzy: bool = False

    @property
    def translated(self) -> list[str]:
        """The non-empty translations, plural forms deduplicated in order."""
        return list(dict.fromkeys(s for s in self.msgstr if s))


def _unescape(body: str) -> str:
    def one(m: re.Match[str]) -> str:
        esc = m.group(1)
        if esc[0] == "x":
            return chr(int(esc[1:], 16))
        if esc[0] in "01234567":
            return chr(int(esc, 8))
        return _ESCAPES.get(esc, esc)

    return _ESCAPE_RE.sub(one, body) if "\\" in body else body


def _string(literal: str, path: Path | str, lineno: int) -> str:
    if len(literal) < 2 or not (literal.startswith('"') and literal.endswith('"')):
        raise CorpusError(
            f"{path} line {lineno}: expected a quoted string, got {literal[:40]!r}: fix the .po file"
        )
    return _unescape(literal[1:-1])


def parse_po(text: str, path: Path | str = "<po>") -> list[PoEntry]:
    """Parse the text of a `.po` file into entries, header (empty msgid) included."""
    entries: list[PoEntry] = []
    entry = PoEntry()
    started = False  # the current entry has a keyword line
    fuzzy_flag = False
    target: tuple[str, int] | None = None  # which field a continuation line extends

    def finish() -> None:
        nonlocal entry, started, target
        if started:
            entries.append(entry)
        entry, started, target = PoEntry(), False, None

    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            finish()
            continue
        if line.startswith("#"):
            if started and target is not None and target[0] == "msgstr":
                finish()  # a comment after msgstr begins the next entry
            if line.startswith("#,") and "fuzzy" in line:
                fuzzy_flag = True
            continue
        if line.startswith('"'):
            if target is None:
                raise CorpusError(
                    f"{path} line {lineno}: string without a keyword before it: fix the .po file"
                )
            value = _string(line, path, lineno)
            name, index = target
            if name == "msgstr":
                entry.msgstr[index] += value
            else:
                setattr(entry, name, (getattr(entry, name) or "") + value)
            continue
        m = _KEYWORD_RE.match(line)
        if m is None:
            raise CorpusError(f"{path} line {lineno}: unrecognised line {line[:40]!r}: fix the .po file")
        keyword, index_text, literal = m.group(1), m.group(2), m.group(3)
        value = _string(literal, path, lineno)
        if keyword in ("msgctxt", "msgid") and started and target is not None and target[0] == "msgstr":
            finish()
        if not started:
            entry.fuzzy, fuzzy_flag = fuzzy_flag, False
            started = True
        if keyword.startswith("msgstr"):
            index = int(index_text) if index_text is not None else 0
            while len(entry.msgstr) <= index:
                entry.msgstr.append("")
            entry.msgstr[index] = value
            target = ("msgstr", index)
        else:
            setattr(entry, keyword, value)
            target = (keyword, 0)
    finish()
    return entries


def read_po(path: Path) -> list[PoEntry]:
    """Read and parse a UTF-8 `.po` file (bad bytes become U+FFFD: the catalogue is data, not input)."""
    return parse_po(path.read_bytes().decode("utf-8", errors="replace"), path)
