"""User corpora, streamed from disk: `.txt`, `.jsonl`, `.parquet`, Arrow dataset folders, folders of files.

Nothing is loaded whole: text files are read line by line, parquet in record batches, Arrow files as
IPC streams (what `datasets.save_to_disk` writes) through a memory map. Formats:

- `.txt`: a blank (or whitespace-only) line ends a document; the lines of a document keep their newlines.
  A document is held in memory while it is read, so a huge file without blank lines costs its size.
- `.jsonl` / `.ndjson`: one JSON object per line; its `text_field` string is the document.
- `.parquet`: the `text_field` column, read in batches of rows.
- `.arrow`: the `text_field` column of an Arrow IPC stream (or file).
- A Hugging Face dataset folder (`state.json` / `dataset_info.json` beside `*.arrow`): its arrow files
  in the order `state.json` lists them. A `DatasetDict` folder (`dataset_dict.json`) reads its `train`
  split; pass a split's subfolder to read another.
- Any other folder: every `.txt`/`.jsonl`/`.ndjson`/`.parquet`/`.arrow` file below it, in sorted order.

Empty documents (and null values) are skipped. Bytes that are not UTF-8 become U+FFFD and are counted
in `Corpus.replacements`, or raise a `CorpusError` naming file and line when `strict_utf8` is set.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from monoscope.corpus.base import Corpus, Document
from monoscope.errors import CorpusError

SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
"""File suffix -> reader."""

_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATES = re.compile("[\ud800-\udfff]")
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
_FORMATS_HINT = (
    "use a .txt, .jsonl, .parquet or .arrow file, a Hugging Face dataset folder (save_to_disk), "
    "a folder of such files, or 'default'"
)
_MAX_LISTED_FILES = 1000


class Utf8Decoder:
    """Decodes bytes as UTF-8, replacing (and counting) or rejecting bad bytes."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.replacements = 0
        self.bytes_read = 0  # bytes passed to decode(), to tell a few bad bytes from a binary file

    def decode(self, raw: bytes, where: Callable[[], str]) -> str:
        """Decode `raw`; `where()` names the place (file and line) for the strict error."""
        self.bytes_read += len(raw)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as first:
            if self.strict:
                bad = raw[first.start : first.end].hex(" ")
                raise CorpusError(
                    f"{where()}: invalid UTF-8 (bytes {bad} at byte {first.start}): re-encode the file as "
                    "UTF-8, or drop --strict-utf8 to replace bad bytes with U+FFFD"
                ) from None
        # Same output as errors="replace" (one U+FFFD per bad sequence), counting the bytes replaced.
        parts: list[str] = []
        pos = 0
        while True:
            try:
                parts.append(raw[pos:].decode("utf-8"))
                break
            except UnicodeDecodeError as err:
                parts.append(raw[pos : pos + err.start].decode("utf-8"))
                parts.append("\ufffd")
                self.replacements += err.end - err.start
                pos += err.end
        return "".join(parts)

    def fix_surrogates(self, text: str) -> str:
        """Replace lone surrogates (from JSON `\\ud800` escapes), which tokenizers cannot encode."""
        fixed, n = _SURROGATES.subn("\ufffd", text)
        if n and self.strict:
            raise CorpusError("lone UTF-16 surrogate in a JSON string: fix the data or drop --strict-utf8")
        self.replacements += n
        return fixed


def _text_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its end-of-line bytes), BOM stripped from line 1."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            yield lineno, raw.rstrip(b"\r\n")


def read_txt(path: Path, decoder: Utf8Decoder) -> Iterator[Document]:
    """Documents of a text file: blocks of lines separated by blank lines."""
    lines: list[str] = []
    start = 0
    for lineno, raw in _text_lines(path):
        line = decoder.decode(raw, lambda n=lineno: f"{path} line {n}")
        if line.strip():
            if not lines:
                start = lineno
            lines.append(line)
        elif lines:
            yield Document("\n".join(lines), f"{path}:{start}")
            lines = []
    if lines:
        yield Document("\n".join(lines), f"{path}:{start}")


def read_jsonl(path: Path, field: str, decoder: Utf8Decoder) -> Iterator[Document]:
    """Documents of a JSON Lines file: the `field` string of each object."""
    for lineno, raw in _text_lines(path):
        if not raw.strip():
            continue
        record = _json_record(path, lineno, raw, decoder)
        if field not in record:
            fields = ", ".join(repr(k) for k in list(record)[:20]) or "none"
            raise CorpusError(
                f"{path} line {lineno} has no field {field!r} (fields: {fields}): pass --text-field naming "
                "the text field"
            )
        value = record[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise CorpusError(
                f"{path} line {lineno}: field {field!r} is a {type(value).__name__}, not a string: "
                "pass --text-field naming a text field"
            )
        if _SURROGATE_ESCAPE.search(raw):
            try:
                value = decoder.fix_surrogates(value)
            except CorpusError as err:
                raise CorpusError(f"{path} line {lineno}: {err}") from None
        if value:
            yield Document(value, f"{path}:{lineno}")


def _json_record(path: Path, lineno: int, raw: bytes, decoder: Utf8Decoder) -> dict[str, Any]:
    text = decoder.decode(raw, lambda: f"{path} line {lineno}")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorpusError(
            f"{path} line {lineno} is not valid JSON ({err.msg} at column {err.colno}): "
            "fix the line; a .jsonl file holds one JSON object per line"
        ) from None
    if not isinstance(record, dict):
        raise CorpusError(
            f"{path} line {lineno} is a JSON {type(record).__name__}, not an object: "
            'a .jsonl corpus holds one object per line, e.g. {"text": "..."}'
        )
    return record


def _check_column(path: Path, schema: pa.Schema, field: str) -> None:
    text_columns = [f.name for f in schema if any(is_text(f.type) for is_text in _TEXT_TYPES)]
    if field not in schema.names:
        listed = ", ".join(repr(n) for n in text_columns[:20]) or "none"
        raise CorpusError(
            f"{path} has no column {field!r} (text columns: {listed}): "
            "pass --text-field naming the text column"
        )
    kind = schema.field(field).type
    if not any(is_text(kind) for is_text in _TEXT_TYPES):
        listed = ", ".join(repr(n) for n in text_columns[:20]) or "none"
        raise CorpusError(
            f"{path} column {field!r} holds {kind}, not text (text columns: {listed}): "
            "pass --text-field naming a text column"
        )


def _batch_documents(
    path: Path, column: pa.Array, first_row: int, decoder: Utf8Decoder
) -> Iterator[Document]:
    # Decode ourselves (via binary) so that bad bytes are counted or reported like in text files.
    values = column.cast(pa.large_binary()).to_pylist()
    for offset, raw in enumerate(values):
        if not raw:
            continue
        row = first_row + offset
        text = decoder.decode(raw, lambda r=row: f"{path} row {r}")
        yield Document(text, f"{path}#{row}")


def read_parquet(path: Path, field: str, decoder: Utf8Decoder, batch_rows: int = 1024) -> Iterator[Document]:
    """Documents of a parquet file: the `field` column, `batch_rows` rows at a time."""
    with pq.ParquetFile(path) as pf:
        _check_column(path, pf.schema_arrow, field)
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[field]):
            yield from _batch_documents(path, batch.column(0), row, decoder)
            row += batch.num_rows


def _open_arrow(path: Path, source: pa.MemoryMappedFile) -> Iterator[pa.RecordBatch]:
    try:
        return iter(pa.ipc.open_stream(source))
    except pa.ArrowInvalid:
        pass
    source.seek(0)
    try:
        reader = pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        raise CorpusError(f"{path} is not an Arrow IPC stream or file: {_FORMATS_HINT}") from None
    return (reader.get_batch(i) for i in range(reader.num_record_batches))


def arrow_schema(path: Path) -> pa.Schema:
    """The schema of an Arrow IPC stream or file, read without reading its data."""
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).schema
        except pa.ArrowInvalid:
            pass
        source.seek(0)
        try:
            return pa.ipc.open_file(source).schema
        except pa.ArrowInvalid:
            raise CorpusError(f"{path} is not an Arrow IPC stream or file: {_FORMATS_HINT}") from None


def read_arrow(path: Path, field: str, decoder: Utf8Decoder) -> Iterator[Document]:
    """Documents of an Arrow IPC stream (as `datasets.save_to_disk` writes) or file: the `field` column."""
    with pa.memory_map(str(path)) as source:
        batches = _open_arrow(path, source)
        row = 0
        for batch in batches:
            if row == 0:
                _check_column(path, batch.schema, field)
            yield from _batch_documents(path, batch.column(field), row, decoder)
            row += batch.num_rows


@dataclass(frozen=True)
class Layout:
    """What a corpus path turned out to be: its kind and its files in reading order."""

    kind: str
    """"txt", "jsonl", "parquet", "arrow", "hf-dataset" or "folder"."""
    root: Path
    files: list[Path]
    split: str | None = None
    """The split read from a DatasetDict folder."""


def _hf_arrow_files(folder: Path) -> list[Path]:
    state = folder / "state.json"
    if state.is_file():
        try:
            listed = json.loads(state.read_text("utf-8")).get("_data_files", [])
            names = [entry["filename"] for entry in listed]
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
            raise CorpusError(
                f"{state} is not a valid datasets state file: save the dataset again with save_to_disk"
            ) from None
        if names:
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CorpusError(
                    f"dataset folder {folder} lists {missing[0]} in state.json but it is missing: "
                    "copy the whole folder or save the dataset again"
                )
            return [folder / n for n in names]
    return sorted(folder.glob("*.arrow"))


def detect_layout(path: Path) -> Layout:
    """Decide how to read `path`; raise a CorpusError for a missing path or an unknown format."""
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist: {_FORMATS_HINT}")
    if path.is_file():
        kind = SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise CorpusError(
                f"unknown corpus format {path.suffix or '(no suffix)'!r} for {path}: {_FORMATS_HINT}"
            )
        return Layout(kind, path, [path])
    if not path.is_dir():
        raise CorpusError(f"corpus path {path} is neither a file nor a folder: {_FORMATS_HINT}")
    if (path / "dataset_dict.json").is_file():
        try:
            splits = list(json.loads((path / "dataset_dict.json").read_text("utf-8"))["splits"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CorpusError(f"{path / 'dataset_dict.json'} is not valid: save the dataset again") from None
        if "train" not in splits and len(splits) != 1:
            raise CorpusError(
                f"dataset folder {path} has splits {splits} and no 'train': pass one split's folder, "
                f"e.g. {path / splits[0]}"
            )
        split = "train" if "train" in splits else splits[0]
        inner = detect_layout(path / split)
        return Layout(inner.kind, path, inner.files, split)
    if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        files = _hf_arrow_files(path)
        if not files:
            raise CorpusError(
                f"dataset folder {path} holds no .arrow files: save the dataset again with save_to_disk"
            )
        return Layout("hf-dataset", path, files)
    files = sorted(
        (
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        seen = sorted(p.name for p in path.iterdir())[:5]
        found = ", ".join(seen) if seen else "nothing"
        raise CorpusError(f"folder {path} holds no corpus files (found: {found}): {_FORMATS_HINT}")
    return Layout("folder", path, files)


REPLACED_WARN_FRACTION = 0.01  # more than 1% of a file's bytes replaced: it is probably not text
_WATCH_MIN_BYTES = 4096  # judge a file once this much of it has been read (or at its end)


class _ReplacementWatch:
    """Warns once per file when more than `REPLACED_WARN_FRACTION` of the bytes read from it were not UTF-8."""

    def __init__(self, file: Path, decoder: Utf8Decoder, warned: set[Path]) -> None:
        self.file, self.decoder, self.warned = file, decoder, warned
        self.start_bytes, self.start_replaced = decoder.bytes_read, decoder.replacements

    def check(self, *, final: bool) -> None:
        if self.file in self.warned:  # once per file, however often the corpus is read
            return
        read = self.decoder.bytes_read - self.start_bytes
        replaced = self.decoder.replacements - self.start_replaced
        if read and (final or read >= _WATCH_MIN_BYTES) and replaced > REPLACED_WARN_FRACTION * read:
            self.warned.add(self.file)
            print(f"warning: {self.file}: {replaced:,} of the first {read:,} bytes ({replaced / read:.0%}) are not "
                  "UTF-8 and were replaced with U+FFFD; is it a binary file? Re-encode it as UTF-8, or pass "
                  "--strict-utf8 to refuse such input", file=sys.stderr)


class FileCorpus(Corpus):
    """A user corpus on disk, streamed document by document."""

    def __init__(self, path: Path, *, text_field: str = "text", strict_utf8: bool = False) -> None:
        super().__init__()
        self.path = path
        self.name = str(path)
        self.text_field = text_field
        self.strict_utf8 = strict_utf8
        self.layout = detect_layout(path)
        self._fingerprint: tuple[list[tuple[Path, int, int]], str] | None = None
        self._warned: set[Path] = set()  # files already reported as mostly not UTF-8
        self._check_fields()

    def _check_fields(self) -> None:
        """Fail on a missing text field now, before any heavy work, for every columnar file."""
        for file in self.layout.files:
            kind = SUFFIXES[file.suffix.lower()]
            if kind == "parquet":
                try:
                    schema = pq.read_schema(file)
                except (pa.ArrowInvalid, OSError) as err:
                    raise CorpusError(
                        f"{file} is not a readable parquet file ({err}): {_FORMATS_HINT}"
                    ) from None
                _check_column(file, schema, self.text_field)
            elif kind == "arrow":
                _check_column(file, arrow_schema(file), self.text_field)
            elif kind == "jsonl":
                self._check_first_jsonl(file)

    def _check_first_jsonl(self, file: Path) -> None:
        decoder = Utf8Decoder(strict=False)
        for lineno, raw in _text_lines(file):
            if raw.strip():
                record = _json_record(file, lineno, raw, decoder)
                if self.text_field not in record:
                    fields = ", ".join(repr(k) for k in list(record)[:20]) or "none"
                    raise CorpusError(
                        f"{file} line {lineno} has no field {self.text_field!r} (fields: {fields}): "
                        "pass --text-field naming the text field"
                    )
                return

    def _records(self) -> Iterator[Document]:
        decoder = Utf8Decoder(self.strict_utf8)
        try:
            for file in self.layout.files:
                watch = _ReplacementWatch(file, decoder, self._warned)
                for doc in self._file_records(file, decoder):
                    watch.check(final=False)
                    yield doc
                watch.check(final=True)
        finally:
            self.replacements = decoder.replacements

    def _file_records(self, file: Path, decoder: Utf8Decoder) -> Iterator[Document]:
        kind = SUFFIXES[file.suffix.lower()]
        if kind == "txt":
            docs = read_txt(file, decoder)
        elif kind == "jsonl":
            docs = read_jsonl(file, self.text_field, decoder)
        elif kind == "parquet":
            docs = read_parquet(file, self.text_field, decoder)
        else:
            docs = read_arrow(file, self.text_field, decoder)
        for doc in docs:
            self.replacements = decoder.replacements
            yield doc

    def _empty_error(self) -> CorpusError:
        what = "text" if self.layout.kind == "txt" else f"non-empty {self.text_field!r} values"
        return CorpusError(
            f"corpus {self.name} holds no documents (no {what}): add text or pass another corpus"
        )

    def fingerprint(self) -> str:
        """sha256 of the reading settings and every file's name, size and bytes, in reading order.

        Remembered while no file's size or modification time changes, so asking twice reads once.
        """
        stats = [(f, f.stat().st_size, f.stat().st_mtime_ns) for f in self.layout.files]
        if self._fingerprint is not None and self._fingerprint[0] == stats:
            return self._fingerprint[1]
        h = hashlib.sha256()
        settings = {"kind": self.layout.kind, "split": self.layout.split}
        if self.layout.kind != "txt":
            settings["text_field"] = self.text_field
        h.update(json.dumps(settings, sort_keys=True).encode())
        for file in self.layout.files:
            rel = file.name if file == self.layout.root else file.relative_to(self.layout.root).as_posix()
            h.update(f"\n{rel}\n{file.stat().st_size}\n".encode())
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        self._fingerprint = (stats, h.hexdigest())
        return self._fingerprint[1]

    def describe(self) -> dict[str, Any]:
        root = self.layout.root
        files = [f.name if f == root else f.relative_to(root).as_posix() for f in self.layout.files]
        info: dict[str, Any] = {
            "kind": self.layout.kind,
            "path": str(root.resolve()),
            "n_files": len(files),
            "files": files[:_MAX_LISTED_FILES],
            "strict_utf8": self.strict_utf8,
        }
        if len(files) > _MAX_LISTED_FILES:
            info["files_truncated"] = True
        if self.layout.kind == "txt" or all(f.suffix.lower() == ".txt" for f in self.layout.files):
            info["document_boundary"] = "blank line"
        else:
            info["text_field"] = self.text_field
        if self.layout.split is not None:
            info["split"] = self.layout.split
        return info
