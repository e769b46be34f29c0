"""`train_log.jsonl`: one JSON object per log step, appended and flushed as training goes.

Each line: step, tokens, loss, mse, sparsity, aux, fvu, l0, grad_norm (means over the interval),
dead_frac, lr, sparsity_coef, skipped, resampled, tokens_per_s (batchtopk: threshold). A resumed
run first drops the lines written after its checkpoint's step (a kill can leave some), so the log
reads as one run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from monoscope.fileio import write_bytes_atomic

LOG_NAME = "train_log.jsonl"


class JsonlLog:
    """Appends records to `path`; `start(step)` keeps only lines with step <= `step`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def start(self, step: int) -> None:
        """Begin (step 0: an empty log) or continue after a checkpoint of `step`."""
        kept: list[str] = []
        if step > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: it and anything after are dropped
                if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                    kept.append(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.path, "".join(line + "\n" for line in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, allow_nan=True) + "\n")
            fh.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
