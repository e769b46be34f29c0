"""A second corpus for the convergence sweeps: Python's pydoc topics and standard-library sources, as JSONL.

    python benchmarks/pydoc_corpus.py /tmp/pydoc/pystd.jsonl
    monoscope capture --model default --corpus /tmp/pydoc/pystd.jsonl --text-field text --tokens 200k \\
        --out /tmp/pydoc/acts

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


def documents() -> list[str]:
    from pydoc_data.topics import topics

    docs = [text for _, text in sorted(topics.items())]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(lib.glob("*.py")):
        text = path.read_text(errors="replace")
        if len(text) > 500:
            docs.append(text[:20000])
    random.Random(0).shuffle(docs)
    return docs


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/pydoc_corpus.py OUT.jsonl")
    docs = documents()
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    print(f"{len(docs)} documents, {sum(map(len, docs)):,} characters -> {out}")


if __name__ == "__main__":
    main()
