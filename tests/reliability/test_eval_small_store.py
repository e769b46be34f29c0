"""`monoscope eval` without --tokens on a store smaller than the default evaluates every row and says so;
an explicit --tokens above the store's rows stays an error (the user asked for what the store cannot give)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monoscope.cli import main
from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.io import save_sae
from tests.reliability.helpers import monoscope
from tests.train.helpers import make_store


def test_default_tokens_use_every_row_of_a_small_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    make_store(store)  # 4 shards x 16 contexts x 16 kept rows = 1,024 training rows
    sae = build_sae(SAEConfig(arch="topk", d_in=32, d_sae=64, k=4, model="synthetic", hook="resid_post.1"), seed=0)
    save_sae(sae.eval(), tmp_path / "sae")
    proc = monoscope("eval", str(tmp_path / "sae"), "--acts", str(store), "--quiet")
    assert proc.returncode == 0, proc.stderr
    note = (f"note: store {store} holds 1,024 training rows, fewer than the default 100,000: evaluated all of them "
            "(--tokens N sets the count)")
    assert note in proc.stdout.splitlines()
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["store_rows"]["rows"] == 1024 and m["notes"] == [note.removeprefix("note: ")]
    assert main(["eval", str(tmp_path / "sae"), "--acts", str(store), "--tokens", "100k", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --tokens 100,000 is more than the 1,024 training rows in store "
                                               f"{store}: use --tokens 1,024 or less, or capture more")
