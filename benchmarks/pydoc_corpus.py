"""A second corpus for the convergence sweeps: Python's pydoc topics and standard-library sources, as JSONL.

    python benchmarks/pydoc_corpus.py /tmp/pydoc/pystd.jsonl
    monoscope capture --model default --corpus /tmp/pydoc/pystd.jsonl --text-field text --tokens 200k \\
        --out /tmp/pydoc/acts

`--packages` adds the modules of the standard library's packages (not their tests, idlelib or lib2to3),
about 1.9M tokens in all, enough for the 1M-token runs; without it the corpus holds about 0.8M.

One document per `pydoc_data.topics` entry (the language reference `help()` shows) and per top-level
standard-library module longer than 500 characters (its first 20,000), shuffled with a fixed seed, so the
store's last shards (held out by the sweeps) hold other documents than its first ones.
"""

from __future__ import annotations

import json
import random
import sys
import sysconfig
from pathlib import Path

SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"}


def documents(packages: bool = False) -> list[str]:
    from pydoc_data.topics import topics

    docs = [text for _, text in sorted(topics.items())]
    lib = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(lib.glob("*.py"))
    if packages:
        paths += sorted(p for p in lib.rglob("*.py") if p.parent != lib and not any(
            part in SKIP_DIRS or part.startswith("test") for part in p.relative_to(lib).parts[:-1]))
    for path in paths:
        text = path.read_text(errors="replace")
        if len(text) > 500:
            docs.append(text[:20000])
    random.Random(0).shuffle(docs)
    return docs


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--packages"]
    if len(args) != 1:
        raise SystemExit("usage: python benchmarks/pydoc_corpus.py [--packages] OUT.jsonl")
    docs = documents(packages="--packages" in sys.argv[1:])
    out = Path(args[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    print(f"{len(docs)} documents, {sum(map(len, docs)):,} characters -> {out}")


if __name__ == "__main__":
    main()
