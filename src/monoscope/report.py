"""One-screen terminal summaries of what a stage produced."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from monoscope.capture import CaptureResult

console = Console()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TB"


def print_store_summary(res: CaptureResult) -> None:
    m = res.manifest
    t = Table(title=f"activation store {res.folder}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", f"{m.model['id']} ({m.model['family']}, {m.model['n_layers']} layers)")
    t.add_row("hook", f"{m.hook}  d_model {m.d_model}")
    t.add_row("contexts", f"{m.n_contexts:,} x {m.ctx_len} tokens = {m.n_tokens:,} tokens"
              + (f" (corpus ran out before {m.requested_tokens:,})" if m.n_tokens < m.requested_tokens else ""))
    pol = m.row_policy
    t.add_row("training rows", f"{m.n_rows:,} (BOS {'excluded' if pol.exclude_bos else 'kept'}; "
              f"norm > {pol.outlier_factor:g} x median {pol.median_norm:.1f} excluded)")
    t.add_row("shards", f"{len(m.shards)} ({_size(sum(s.bytes for s in m.shards))}, {m.dtype}, sha256 each)")
    t.add_row("normaliser", f"{m.normaliser:.5f}  (E|c x|^2 = d_model; mean |x|^2 = {m.mean_sq_norm:,.1f})")
    src = m.corpus.get("kind", "?")
    t.add_row("corpus", f"{src} {m.corpus.get('path', '')} sha256 {str(m.corpus.get('fingerprint'))[:16]}…"
              + (f", {m.corpus['replaced_bytes']} bytes replaced" if m.corpus.get("replaced_bytes") else ""))
    if res.new_tokens:
        how = f"resumed after {res.resumed_contexts:,} contexts; " if res.resumed_contexts else ""
        if res.repaired_shards:
            how = f"repaired {res.repaired_shards} damaged or missing shard(s); "
        t.add_row("this run", f"{how}{res.new_tokens:,} tokens in {res.seconds:,.1f} s = "
                  f"{res.tokens_per_s:,.0f} tokens/s ({m.capture['compute_dtype']} on {m.capture['device']})")
    else:
        t.add_row("this run", "already complete: nothing to do")
    console.print(t)
