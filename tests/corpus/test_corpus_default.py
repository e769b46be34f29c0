"""The default corpus: offline, deterministic, mixed in every prefix, with sources and versions recorded."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

from monoscope.corpus import open_corpus
from monoscope.corpus.base import Document
from monoscope.corpus.default import MIX, category, interleave
from monoscope.corpus.sources import group_lines


def head(n: int) -> list[Document]:
    return list(itertools.islice(open_corpus("default").records(), n))


def test_prefix_is_deterministic_and_mixed() -> None:
    first, second = head(300), head(300)
    assert first == second
    top = first[:200]
    kinds = {category(d.source) for d in top}
    assert kinds == {"prose", "code", "languages"}
    languages = {d.source.split(":")[1].split("_")[0] for d in top if category(d.source) == "languages"}
    assert len(languages) >= 5, languages
    assert {"pydoc_data.topics", "stdlib-docstrings", "stdlib-code", "pkg-metadata"} <= {d.source for d in top}
    assert any(d.source.startswith("django-po:") for d in top) and any(d.source.startswith("cldr:") for d in top)
    assert all(d.text.strip() for d in first)
    assert len({d.text for d in first}) == len(first)  # repeats are dropped


def test_full_fingerprint_is_stable_across_processes() -> None:
    """Another process (another hash seed) builds the same full stream; both run at once to save time."""
    code = "from monoscope.corpus import open_corpus; print(open_corpus('default')._compute_fingerprint())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    start = time.perf_counter()
    corpus = open_corpus("default")
    digest = corpus._compute_fingerprint()  # not the disk cache: the stream itself
    seconds = time.perf_counter() - start
    out, _ = other.communicate(timeout=300)
    assert other.returncode == 0
    assert out.strip() == digest and len(digest) == 64
    assert corpus.fingerprint() == digest  # cached value agrees
    print(f"default corpus fingerprint: {seconds:.1f} s")


def test_describe_records_sources_and_versions() -> None:
    info = open_corpus("default").describe()
    json.dumps(info)
    assert info["kind"] == "default" and info["path"] == "default"
    assert info["mix"]["prose"] == MIX["prose"]
    for key in ("python", "django", "babel", "cldr"):
        assert info["versions"][key]
    assert set(info["sources"]) >= {"pydoc_data.topics", "stdlib-code", "django-po", "cldr", "pkg-metadata"}
    assert len(info["sources"]["django-po"]["locales"]) >= 50
    assert "monoscope" not in info["sources"]["pkg-metadata"]["distributions"]


def test_interleave_keeps_shares() -> None:
    a = (Document("a" * 100, "a") for _ in range(1000))
    b = (Document("b" * 100, "b") for _ in range(1000))
    mixed = list(itertools.islice(interleave([(0.75, a), (0.25, b)]), 400))
    assert sum(d.source == "a" for d in mixed) == 300
    rest = list(interleave([(1.0, iter([Document("x", "x")])), (1.0, iter([Document("y", "y")] * 3))]))
    assert [d.source for d in rest] == ["x", "y", "y", "y"]  # an exhausted stream drops out


def test_group_lines_sizes() -> None:
    lines = [f"name {i:04d}" for i in range(2000)]  # 10 characters each
    groups = list(group_lines(lines, "cldr:xx"))
    assert "\n".join(g.text for g in groups) == "\n".join(lines)
    assert all(1000 <= len(g.text) <= 4096 for g in groups[:-1])
