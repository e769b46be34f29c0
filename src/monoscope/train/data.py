"""Where training batches come from: an activation store on disk, or a model streamed on the fly.

Both give a `BatchSource` (shuffled, exact cursor), the input normaliser, a description of the
data that a resumed run must match (`identity`), and a way to name a row in error messages.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monoscope.fileio import sha256_file
from monoscope.store import ActivationStore
from monoscope.train.trainer import BatchSource


@dataclass
class TrainData:
    batches: BatchSource
    d_model: int
    identity: dict[str, Any]
    """What the data is (store manifest digest, or model + corpus + hook); a resume must match it."""
    describe_row: Callable[[int], str]
    """Row id -> 'shard-00012.safetensors context 1490 position 17' (or what a stream can say)."""
    hook: str | None
    model: str | None
    n_rows: int | None
    """Training rows in a store (None when streamed)."""
    get_normaliser: Callable[[], float | None]
    """c with E‖c·x‖² = d_model (a stream knows it once its first chunk is computed)."""
    hooks: list[str] | None = None
    """The hooks a row holds side by side (a store captured with `--hook a,b`); None: one hook."""
    hook_normalisers: list[float] | None = None
    """Per hook of `hooks`, c_h with E‖c_h·x_h‖² = d_model."""


def store_data(folder: str | os.PathLike[str], batch_size: int, seed: int) -> TrainData:
    """Batches from an activation store, shuffled with `seed`, cycling through epochs."""
    store = ActivationStore.open(folder)
    m = store.manifest

    def describe(row: int) -> str:
        try:
            loc = store.locate(row)
        except Exception as e:  # a damaged shard must not hide the original error
            return f"row {row} (cannot be located: {e})"
        return f"{loc.shard} context {loc.context} position {loc.position}"

    identity = {
        "kind": "store",
        "path": str(Path(folder).resolve()),
        "manifest_sha256": sha256_file(Path(folder) / "manifest.json"),
        "model": m.model.get("id"),
        "hook": m.hook,
        "d_model": m.d_model,
        "n_rows": store.n_rows,
    }
    return TrainData(
        batches=store.batches(batch_size, seed=seed),
        d_model=store.d_model,
        identity=identity,
        describe_row=describe,
        hook=m.hook,
        model=m.model.get("id"),
        n_rows=store.n_rows,
        get_normaliser=lambda: store.normaliser,
        hooks=m.hooks if len(m.hooks) > 1 else None,
        hook_normalisers=m.hook_normalisers if len(m.hooks) > 1 else None,
    )


def stream_data(model: str, corpus: str, hook: str | None, batch_size: int, seed: int, device: str,
                text_field: str = "text", ctx_len: int = 128) -> TrainData:
    """Batches computed from `model` over `corpus` as training goes (no store on disk)."""
    from monoscope.corpus import open_corpus
    from monoscope.model import load_model
    from monoscope.stream import stream_batches

    corp = open_corpus(corpus, text_field=text_field)
    lm = load_model(model, device=device)
    batches = stream_batches(lm, corp, hook, batch_size, seed=seed, ctx_len=ctx_len)
    ident = {k: v for k, v in lm.identity().items() if k != "spec"}
    identity = {"kind": "stream", "model": ident, "corpus": corp.fingerprint(), "hook": str(batches.hook),
                "d_model": lm.d_model}
    return TrainData(
        batches=batches,
        d_model=lm.d_model,
        identity=identity,
        describe_row=lambda row: f"streamed row {row} (context {row // batches.ctx_len}, "
                                 f"position {row % batches.ctx_len} of the corpus)",
        hook=str(batches.hook),
        model=model,
        n_rows=None,
        get_normaliser=lambda: batches.normaliser,
    )


def e2e_data(model: str, corpus: str, hook: str | None, batch_size: int, ctx_len: int, device: str,
             text_field: str = "text") -> TrainData:
    """Whole contexts of `corpus` run through `model`, for end-to-end training (`train.e2e`)."""
    from monoscope.corpus import open_corpus
    from monoscope.model import load_model
    from monoscope.train.e2e import ContextBatches

    corp = open_corpus(corpus, text_field=text_field)
    lm = load_model(model, device=device)
    batches = ContextBatches(lm, corp, lm.hook(hook), batch_size, ctx_len)
    ident = {k: v for k, v in lm.identity().items() if k != "spec"}
    identity = {"kind": "e2e", "model": ident, "corpus": corp.fingerprint(), "hook": str(batches.hook),
                "d_model": lm.d_model, "ctx_len": ctx_len}
    return TrainData(
        batches=batches,
        d_model=lm.d_model,
        identity=identity,
        describe_row=lambda row: f"corpus token {row} (context {row // ctx_len}, position {row % ctx_len})",
        hook=str(batches.hook),
        model=model,
        n_rows=None,
        get_normaliser=lambda: batches.normaliser,
    )
