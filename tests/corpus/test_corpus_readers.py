"""User corpora: every format streamed from tmp_path, bad bytes, missing fields, errors that name the fix."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from monoscope.corpus import Corpus, CorpusError, FileCorpus, open_corpus
from monoscope.corpus.readers import Utf8Decoder

DATA = Path(__file__).parent / "data"


def docs(corpus: Corpus) -> list[str]:
    return list(corpus.documents())


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_arrow_stream(path: Path, table: pa.Table, batch_rows: int = 2) -> None:
    """What `datasets.save_to_disk` writes: an Arrow IPC *stream* (not the file format)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)


# --- txt --------------------------------------------------------------------------------------------


def test_txt_blank_lines_separate_documents(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfFirst line\r\nstill first\r\n\r\n  \n\nsecond\n\n\nthird\n")
    corpus = open_corpus(str(path))
    assert docs(corpus) == ["First line\nstill first", "second", "third"]
    assert docs(corpus) == docs(corpus)  # re-iterable
    assert [r.source for r in corpus.records()] == [f"{path}:1", f"{path}:6", f"{path}:9"]
    info = corpus.describe()
    assert info["kind"] == "txt" and info["document_boundary"] == "blank line"
    json.dumps(info)


def test_non_utf8_is_replaced_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"ok\ncaf\xe9 \xff\xfe!\n")
    corpus = open_corpus(path)
    assert docs(corpus) == ["ok\ncaf\ufffd \ufffd\ufffd!"]
    assert corpus.replacements == 3
    assert docs(corpus) and corpus.replacements == 3  # counted per pass, not accumulated


def test_strict_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"ok\n\ncaf\xe9\n")
    corpus = open_corpus(path, strict_utf8=True)
    with pytest.raises(CorpusError, match=rf"{path} line 3: invalid UTF-8 \(bytes e9.*drop --strict-utf8"):
        docs(corpus)


def test_empty_corpus(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n\n")
    with pytest.raises(CorpusError, match=rf"corpus {path} holds no documents"):
        docs(open_corpus(path))


# --- jsonl ------------------------------------------------------------------------------------------


def test_jsonl_reads_text_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": None}, {"text": ""}, {"text": "ü\nb"}])
    with path.open("a") as f:
        f.write("\n")  # blank lines are skipped
        f.write(json.dumps({"text": "c", "body": "x"}) + "\n")
    assert docs(open_corpus(path)) == ["a", "ü\nb", "c"]
    other = write_jsonl(tmp_path / "e.jsonl", [{"content": "x", "id": 1}, {"content": "y"}])
    corpus = open_corpus(other, text_field="content")
    assert docs(corpus) == ["x", "y"]
    assert corpus.describe()["text_field"] == "content"


def test_jsonl_missing_field_names_file_line_and_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "x", "id": 1}])
    with pytest.raises(
        CorpusError, match=rf"{path} line 1 has no field 'text' \(fields: 'content', 'id'\).*--text-field"
    ):
        open_corpus(path)  # checked before any heavy work
    later = write_jsonl(tmp_path / "l.jsonl", [{"text": "x"}, {"text": "y"}, {"body": "z"}])
    corpus = open_corpus(later)
    with pytest.raises(CorpusError, match=rf"{later} line 3 has no field 'text' \(fields: 'body'\)"):
        docs(corpus)


def test_jsonl_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(CorpusError, match=rf"{path} line 2 is not valid JSON"):
        docs(open_corpus(path))
    path.write_text('{"text": "a"}\n["a list"]\n')
    with pytest.raises(CorpusError, match=rf"{path} line 2 is a JSON list, not an object"):
        docs(open_corpus(path))
    path.write_text('{"text": 3}\n')
    with pytest.raises(CorpusError, match=rf"{path} line 1: field 'text' is a int, not a string"):
        docs(open_corpus(path))


def test_jsonl_bad_bytes_and_lone_surrogates(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a\xffb"}\n{"text": "x\\ud800y"}\n')
    corpus = open_corpus(path)
    assert docs(corpus) == ["a\ufffdb", "x\ufffdy"]
    assert corpus.replacements == 2
    with pytest.raises(CorpusError, match=rf"{path} line 1: invalid UTF-8"):
        docs(open_corpus(path, strict_utf8=True))


# --- parquet ----------------------------------------------------------------------------------------


def test_parquet_reads_column_in_batches(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    texts = [f"doc {i}" for i in range(2500)]
    texts[7] = None
    pq.write_table(pa.table({"id": list(range(2500)), "text": texts}), path, row_group_size=600)
    corpus = open_corpus(path)
    got = docs(corpus)
    assert got == [t for t in texts if t]
    assert [r.source for r in corpus.records()][8] == f"{path}#9"
    assert corpus.describe()["kind"] == "parquet"


def test_parquet_missing_or_non_text_column(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), path)
    with pytest.raises(CorpusError, match=rf"{path} has no column 'text' \(text columns: 'body'\).*--text-field"):
        open_corpus(path)
    with pytest.raises(CorpusError, match=rf"{path} column 'id' holds int64, not text"):
        open_corpus(path, text_field="id")


def test_parquet_binary_column_with_bad_bytes(tmp_path: Path) -> None:
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"fine", b"bad \xff"], pa.binary())}), path)
    corpus = open_corpus(path)
    assert docs(corpus) == ["fine", "bad \ufffd"] and corpus.replacements == 1
    with pytest.raises(CorpusError, match=rf"{path} row 1: invalid UTF-8"):
        docs(open_corpus(path, strict_utf8=True))


# --- Arrow / Hugging Face dataset folders ----------------------------------------------------------


def test_hf_dataset_folder_from_pyarrow(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    write_arrow_stream(folder / names[0], pa.table({"text": ["a", "b", "c"], "n": [1, 2, 3]}))
    write_arrow_stream(folder / names[1], pa.table({"text": ["d", None, "e"], "n": [4, 5, 6]}))
    # state.json decides the order (here the reverse of sorted order)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in reversed(names)]}))
    (folder / "dataset_info.json").write_text("{}")
    corpus = open_corpus(folder)
    assert docs(corpus) == ["d", "e", "a", "b", "c"]
    assert corpus.describe()["kind"] == "hf-dataset"
    with pytest.raises(CorpusError, match="has no column 'body'"):
        open_corpus(folder, text_field="body")


def test_real_datasets_save_to_disk_folder() -> None:
    """A DatasetDict written by `datasets` 5.2 `save_to_disk` (committed under data/): read without it."""
    corpus = open_corpus(DATA / "hf_datasetdict")
    assert docs(corpus) == ["The cat sat on the mat.", "Der Hund schläft.", "猫が座った。"]
    assert corpus.describe()["split"] == "train"
    assert docs(open_corpus(DATA / "hf_datasetdict" / "test")) == ["held out"]


def test_datasets_package_round_trip(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(50)]})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    assert docs(open_corpus(tmp_path / "ds")) == [f"row {i}" for i in range(50)]


def test_dataset_dict_without_train_split(tmp_path: Path) -> None:
    shutil.copytree(DATA / "hf_datasetdict", tmp_path / "dd")
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "validation"]}))
    with pytest.raises(CorpusError, match=r"has splits \['test', 'validation'\] and no 'train': pass one split"):
        open_corpus(tmp_path / "dd")


def test_folder_of_files_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two\n\nthree")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    pq.write_table(pa.table({"text": ["four"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.txt").write_text("ignored")
    corpus = open_corpus(tmp_path)
    assert docs(corpus) == ["one", "two", "three", "four"]
    assert corpus.describe()["files"] == ["a.jsonl", "b/2.txt", "c.parquet"]


# --- errors and fingerprints ------------------------------------------------------------------------


def test_missing_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=rf"corpus path {tmp_path / 'nope.txt'} does not exist: use a .txt"):
        open_corpus(tmp_path / "nope.txt")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=rf"unknown corpus format '.csv' for {tmp_path / 'd.csv'}: use a .txt"):
        open_corpus(tmp_path / "d.csv")
    with pytest.raises(CorpusError, match=r"holds no corpus files \(found: d.csv\)"):
        open_corpus(tmp_path)
    with pytest.raises(CorpusError, match=r"--corpus is empty: pass 'default' or a path"):
        open_corpus("")


def test_fingerprint_follows_content(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "t2": "b"}])
    first = open_corpus(path).fingerprint()
    assert first == FileCorpus(path).fingerprint()
    assert len(first) == 64
    assert open_corpus(path, text_field="t2").fingerprint() != first
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(path, copy / "d.jsonl")
    assert open_corpus(copy / "d.jsonl").fingerprint() == first  # content, not location
    write_jsonl(path, [{"text": "A", "t2": "b"}])
    assert open_corpus(path).fingerprint() != first
    same = open_corpus(path)
    before = same.fingerprint()
    write_jsonl(path, [{"text": "longer", "t2": "b"}])
    assert same.fingerprint() != before  # remembered only while the file is unchanged


def test_arrow_file_format_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "f.arrow"
    table = pa.table({"text": ["x", "y"]})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert docs(open_corpus(path)) == ["x", "y"]
    bad = tmp_path / "g.arrow"
    bad.write_bytes(b"not arrow at all")
    with pytest.raises(CorpusError, match=rf"{bad} is not an Arrow IPC stream or file"):
        open_corpus(bad)


def test_decoder_matches_python_replace() -> None:
    rng = random.Random(0)
    for _ in range(500):
        raw = bytes(rng.choice([0x41, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0xFF, 0x80]) for _ in range(12))
        decoder = Utf8Decoder(strict=False)
        assert decoder.decode(raw, lambda: "x") == raw.decode("utf-8", errors="replace")
        assert (decoder.replacements == 0) == (raw.decode("utf-8", errors="replace") == raw.decode("utf-8", "ignore"))
