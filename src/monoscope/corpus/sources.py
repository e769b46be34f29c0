"""The pieces of the default corpus: text that pip (and the Python install) put on every machine.

Each function yields `Document`s in a fixed order, so the same installed versions give the same stream.
Source files are parsed (`ast`), never imported. Lists of files are ordered by a hash of their path, so
that any prefix samples the whole library instead of its alphabetically first corner.
"""

from __future__ import annotations

import ast
import gc
import hashlib
import importlib.metadata
import importlib.util
import io
import re
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from monoscope.corpus.base import Document
from monoscope.corpus.po import read_po

MAX_SOURCE_BYTES = 200_000
"""Larger source files (generated tables, giant test data) are left out of code and docstrings."""
GROUP_TARGET = 2048
"""Tiny items (catalogue messages, CLDR names) are grouped into documents of about this many characters..."""
GROUP_LIMIT = 4096
"""...and at most this many (unless one item alone is longer)."""
MIN_DOCSTRING = 30
"""Shorter docstrings ("Return x.") add little prose."""

_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}
_SKIP_PACKAGE_DIRS = {"test", "tests", "testing", "__pycache__"}


def _hash_order(paths: Iterable[Path], root: Path) -> list[Path]:
    """Paths ordered by the sha256 of their root-relative name: stable, and well spread."""
    return sorted(paths, key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).digest())


def stdlib_root() -> Path:
    """The folder of the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _read_source(path: Path) -> str | None:
    raw = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None


def _is_generated(text: str) -> bool:
    # Character-map codecs (encodings/cp1252.py, ...) are 256-entry tables written by gencodec.py.
    return "Python Character Mapping Codec" in text[:300]


def stdlib_files() -> list[Path]:
    """Standard-library `.py` files that are hand-written library code (no tests, no machine config)."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_STDLIB_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        if rel.name.startswith("_sysconfigdata") or path.stat().st_size > MAX_SOURCE_BYTES:
            continue  # _sysconfigdata holds this machine's build paths: not the same on every machine
        files.append(path)
    return _hash_order(files, root)


def stdlib_code() -> Iterator[Document]:
    """Source code of the standard library, one document per file."""
    for path in stdlib_files():
        text = _read_source(path)
        if text and text.strip() and not _is_generated(text):
            yield Document(text, "stdlib-code")


_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


def _docstrings(text: str) -> list[str]:
    """Docstrings of the module, its classes and functions, in source order.

    Only statement bodies are walked (not expressions): about twice as fast as `ast.walk`.
    """
    paused = gc.isenabled()
    gc.disable()  # parsing allocates millions of nodes: collecting meanwhile costs ~15% and frees nothing
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    finally:
        if paused:
            gc.enable()
    found = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING:
                found.append(doc)
        for name in _BODIES:
            children = getattr(node, name, None)
            if isinstance(children, list):
                stack.extend(c for c in reversed(children) if isinstance(c, ast.AST))
    return found


def _module_docstrings(files: Iterable[Path], source: str) -> Iterator[Document]:
    """One document per module: its docstrings (module, classes, functions), each once per source."""
    seen: set[bytes] = set()
    for path in files:
        text = _read_source(path)
        if not text or _is_generated(text):
            continue
        kept = []
        for doc in _docstrings(text):
            key = hashlib.sha1(doc.encode("utf-8", "replace")).digest()
            if key not in seen:
                seen.add(key)
                kept.append(doc)
        if kept:
            yield Document("\n\n".join(kept), source)


def stdlib_docstrings() -> Iterator[Document]:
    """English prose: the docstrings of the standard library."""
    return _module_docstrings(stdlib_files(), "stdlib-docstrings")


def package_root(name: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_docstrings(name: str, parts: tuple[str, ...] | None = None) -> Iterator[Document]:
    """English prose: the docstrings of an installed package (tests left out).

    `parts` limits it to some first-level subpackages ("" = the top-level modules), for packages whose
    whole source is too slow to parse.
    """
    root = package_root(name)
    if root is None:
        return iter(())
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if _SKIP_PACKAGE_DIRS.intersection(rel[:-1]) or path.stat().st_size > MAX_SOURCE_BYTES:
            continue
        if parts is None or (rel[0] if len(rel) > 1 else "") in parts:
            files.append(path)
    return _module_docstrings(_hash_order(files, root), f"pkg-docstrings:{name}")


def pydoc_topics() -> Iterator[Document]:
    """English prose: the language reference topics that `help()` shows (`pydoc_data.topics`)."""
    from pydoc_data.topics import topics  # stdlib data, a dict of strings

    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield Document(text, "pydoc_data.topics")


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirement_names(dist: importlib.metadata.Distribution) -> list[str]:
    """Names of a distribution's unconditional requirements (extras are not followed)."""
    names = []
    for req in dist.requires or []:
        if "extra ==" in req:
            continue
        m = re.match(r"[A-Za-z0-9._-]+", req.strip())
        if m:
            names.append(m.group(0))
    return names


def metadata_distributions(
    exclude: Iterable[str] = (), root: str = "monoscope"
) -> list[importlib.metadata.Distribution]:
    """`root`'s installed dependency closure, one per name, sorted by name.

    Only what monoscope itself needs is read, so installing an unrelated package (a test extra, a
    peer tool) never changes the default corpus or its fingerprint.
    """
    skip = {_normalise(n) for n in exclude}
    chosen: dict[str, importlib.metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = _normalise(todo.pop())
        if name in chosen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        chosen[name] = dist
        todo.extend(_requirement_names(dist))
    return [chosen[k] for k in sorted(chosen) if k not in skip]


def _long_description(dist: importlib.metadata.Distribution) -> str:
    meta = dist.metadata
    body = meta.get_payload() if hasattr(meta, "get_payload") else None  # type: ignore[attr-defined]
    if isinstance(body, str) and body.strip():
        return body.strip()
    legacy = meta.get("Description") or ""
    if legacy and legacy != "UNKNOWN":
        # Metadata 1.x folds the description into a header, continuation lines start with 8 spaces and "|".
        lines = [
            line[8:].removeprefix("|") if line.startswith(" " * 8) else line for line in legacy.splitlines()
        ]
        return "\n".join(lines).strip()
    return ""


def package_metadata(exclude: Iterable[str] = ()) -> Iterator[Document]:
    """English prose: installed packages' long descriptions (their READMEs), sorted by package name."""
    for dist in metadata_distributions(exclude):
        text = _long_description(dist)
        if text:
            yield Document(text, "pkg-metadata")


def group_lines(lines: Iterable[str], source: str) -> Iterator[Document]:
    """Join short lines into documents of about GROUP_TARGET characters (at most GROUP_LIMIT)."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) + 1 > GROUP_LIMIT:
            yield Document("\n".join(chunk), source)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line) + 1
        if size >= GROUP_TARGET:
            yield Document("\n".join(chunk), source)
            chunk, size = [], 0
    if chunk:
        yield Document("\n".join(chunk), source)


def django_locales() -> dict[str, list[Path]]:
    """Non-English Django locales -> their `django.po`/`djangojs.po` catalogues (core first, then apps)."""
    root = package_root("django")
    if root is None:
        return {}
    by_locale: dict[str, list[Path]] = {}
    for base in [root / "conf" / "locale", *sorted((root / "contrib").glob("*/locale"))]:
        for po in sorted(base.glob("*/LC_MESSAGES/*.po")):
            locale = po.parent.parent.name
            if locale.split("_")[0] != "en":
                by_locale.setdefault(locale, []).append(po)
    return dict(sorted(by_locale.items()))


def django_po(locale: str, files: list[Path]) -> Iterator[Document]:
    """One language: the translated messages (msgstr) of Django's catalogues, fuzzy ones left out."""

    def messages() -> Iterator[str]:
        seen: set[str] = set()
        for path in files:
            for entry in read_po(path):
                if entry.msgid == "" or entry.fuzzy:
                    continue  # the header, and unreviewed machine guesses
                for text in entry.translated:
                    text = text.strip()
                    if text and text not in seen:
                        seen.add(text)
                        yield text

    return group_lines(messages(), f"django-po:{locale}")


def cldr_locales() -> list[str]:
    """Babel's CLDR locales with their own names (language or language_Script, not regions), not English."""
    import babel.localedata
    from babel import Locale

    chosen = []
    for ident in sorted(babel.localedata.locale_identifiers()):
        if ident == "root" or ident.split("_")[0] == "en":
            continue
        if Locale.parse(ident).territory is None:
            chosen.append(ident)
    return chosen


def _cldr_tables(loc: Any) -> list[dict[Any, str]]:
    """Name tables of a babel Locale, each {key: name in that language}."""
    wide = [loc.months, loc.days, loc.quarters]
    tables = [loc.territories, loc.languages, loc.scripts, loc.currencies, loc.variants]
    tables += [t.get("format", {}).get("wide", {}) for t in wide]
    tables.append({k: v.get("long", "") for k, v in loc.unit_display_names.items()})
    for kind in ("generic", "standard", "daylight"):
        tables.append({k: v.get("long", {}).get(kind, "") for k, v in loc.meta_zones.items()})
    return tables


def cldr(locale: str) -> Iterator[Document]:
    """One locale's CLDR names in its language: territories, languages, scripts, currencies, variants,
    months, days, quarters, units and time-zone names (cities are left out: mostly English fallbacks)."""
    from babel import Locale

    def names() -> Iterator[str]:
        seen: set[str] = set()
        for table in _cldr_tables(Locale.parse(locale)):
            for key in sorted(table, key=str):
                name = str(table[key]).strip()
                if name and name not in seen:
                    seen.add(name)
                    yield name

    return group_lines(names(), f"cldr:{locale}")


def version(distribution: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
