"""A small on-disk cache for values that are slow to derive and fully determined by a key.

Lives in `$MONOSCOPE_CACHE` (default `~/.cache/monoscope`). Everything in it can be deleted at any
time; it only saves recomputation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from monoscope.fileio import write_json_atomic


def cache_dir() -> Path:
    return Path(os.environ.get("MONOSCOPE_CACHE") or Path.home() / ".cache" / "monoscope")


def key_of(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cached_value(namespace: str, key: str) -> Any | None:
    try:
        return json.loads((cache_dir() / namespace / f"{key}.json").read_text())["value"]
    except (OSError, ValueError, KeyError):
        return None


def store_value(namespace: str, key: str, value: Any) -> None:
    """Best effort: a read-only or full disk only costs the recomputation next time."""
    folder = cache_dir() / namespace
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f"{key}.json", {"value": value})
    except Exception:  # the cache must never break the command it serves
        pass
