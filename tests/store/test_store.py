from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from monoscope.errors import MonoscopeError, StoreError
from monoscope.fileio import write_bytes_atomic
from monoscope.store import ActivationStore
from monoscope.store.writer import StoreWriter
from tests.store.helpers import D, T, make_store


def test_roundtrip_in_stored_order(tmp_path: Path) -> None:
    m = make_store(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s", expect_hook="resid_post.1", expect_d_model=D)
    ctxs = list(store.iter_contexts())
    assert len(ctxs) == m.n_contexts == 15
    toks = torch.stack([t for t, _ in ctxs]).flatten()
    assert torch.equal(toks, torch.arange(15 * T, dtype=torch.int32))
    for t, a in ctxs:  # the token id written into feature 0 comes back beside it
        assert torch.equal(a[:, 0].float(), t.float())
    assert store.n_rows == 15 * (T - 1)  # BOS rows excluded
    assert store.verify() == []


def test_normaliser_makes_mean_sq_norm_d_model(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    rows = torch.cat([store.read_shard(i).rows().double() for i in range(5)])
    c = store.normaliser
    assert abs(float((c * rows).pow(2).sum(-1).mean()) - D) < 1e-6


def test_flipped_byte_names_shard_and_digests(tmp_path: Path) -> None:
    m = make_store(tmp_path / "s")
    p = tmp_path / "s" / m.shards[2].file
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    store = ActivationStore.open(tmp_path / "s")
    problems = store.verify()
    assert len(problems) == 1
    assert m.shards[2].file in problems[0] and m.shards[2].sha256 in problems[0]
    import hashlib

    assert hashlib.sha256(bytes(data)).hexdigest() in problems[0]
    with pytest.raises(StoreError, match="corrupt"):
        store.read_shard(2)


def test_truncated_and_missing_shards(tmp_path: Path) -> None:
    m = make_store(tmp_path / "s")
    p = tmp_path / "s" / m.shards[0].file
    p.write_bytes(p.read_bytes()[:100])
    (tmp_path / "s" / m.shards[1].file).unlink()
    problems = ActivationStore.open(tmp_path / "s").verify()
    assert "truncated" in problems[0] and m.shards[0].file in problems[0]
    assert "missing" in problems[1] and m.shards[1].file in problems[1]


def test_expectations_mismatch(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    with pytest.raises(StoreError, match=r"holds hook resid_post\.1, not mlp_out\.3"):
        ActivationStore.open(tmp_path / "s", expect_hook="mlp_out.3")
    with pytest.raises(StoreError, match="captured from model tiny, not other"):
        ActivationStore.open(tmp_path / "s", expect_model="other")
    with pytest.raises(StoreError, match="d_model 8"):
        ActivationStore.open(tmp_path / "s", expect_d_model=576)
    assert ActivationStore.open(tmp_path / "s", expect_model="w" * 64).d_model == D


def test_incomplete_and_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        ActivationStore.open(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "progress.json").write_text("{}")
    with pytest.raises(StoreError, match="run the same monoscope capture command again"):
        ActivationStore.open(tmp_path / "half")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        ActivationStore.open(tmp_path / "junk")


def test_writer_refuses_other_store_and_foreign_files(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    with pytest.raises(StoreError, match="holds a different store"):
        StoreWriter(tmp_path / "s", "x" * 64)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        StoreWriter(tmp_path / "other", "x" * 64)
    assert StoreWriter(tmp_path / "s", "k" * 64).complete is not None


def test_writer_resume_drops_bad_shards(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    w = StoreWriter(folder, "k" * 64)
    for i in range(3):
        w.add_shard(torch.zeros(2, T, dtype=torch.int32), torch.full((2, T, D), float(i)),
                    torch.ones(2, T, dtype=torch.bool))
    p = folder / w.shards[1].file
    p.write_bytes(p.read_bytes()[:-1])
    (folder / ".tmp-leftover").write_bytes(b"half")
    w2 = StoreWriter(folder, "k" * 64)
    assert w2.shards == w.shards and w2.redo == {1}  # only the damaged shard is redone; the one after it stays
    assert w2.needs(1) and not w2.needs(0) and not w2.needs(2) and w2.needs(3)
    assert not (folder / ".tmp-leftover").exists()
    assert sorted(p.name for p in folder.glob("shard-*")) == [w.shards[0].file, w.shards[2].file]


def test_disk_full_is_one_clear_error_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import monoscope.fileio as fileio

    real = fileio.os.fdopen

    class Full:
        def __init__(self, f):  # type: ignore[no-untyped-def]
            self.f = f

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *a):  # type: ignore[no-untyped-def]
            self.f.close()

        def write(self, _data):  # type: ignore[no-untyped-def]
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    with pytest.raises(MonoscopeError, match=r"disk full while writing .*x\.bin: free some space"):
        write_bytes_atomic(tmp_path / "x.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def _all(batches, n):  # type: ignore[no-untyped-def]
    return [next(batches) for _ in range(n)]


def test_batches_shuffle_cover_and_are_deterministic(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    b1 = _all(store.batches(5, seed=1, shards_per_window=2), 9)  # one epoch = 45 rows
    b2 = _all(store.batches(5, seed=1, shards_per_window=2), 9)
    assert all(torch.equal(x.acts, y.acts) and torch.equal(x.rows, y.rows) for x, y in zip(b1, b2, strict=True))
    rows = torch.cat([b.rows for b in b1])
    assert sorted(rows.tolist()) == list(range(45))  # every row exactly once per epoch
    assert rows.tolist() != list(range(45))  # and shuffled
    b3 = _all(store.batches(5, seed=2, shards_per_window=2), 9)
    assert torch.cat([b.rows for b in b3]).tolist() != rows.tolist()
    # acts match the rows they claim (feature 0 holds the token id, located through the store)
    for b in b1[:2]:
        for r, a in zip(b.rows.tolist(), b.acts, strict=True):
            loc = store.locate(r)
            assert float(a[0]) == float(store.read_shard(int(loc.shard[6:11])).tokens.flatten()[
                (loc.context % 3) * T + loc.position])


@pytest.mark.parametrize("stop_after", [1, 4, 8, 9, 13])
def test_batch_cursor_resumes_exactly(tmp_path: Path, stop_after: int) -> None:
    make_store(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    full = _all(store.batches(7, seed=3, shards_per_window=2), 20)  # spans windows and epochs
    first = store.batches(7, seed=3, shards_per_window=2)
    _all(first, stop_after)
    state = first.state_dict()
    second = store.batches(7, seed=3, shards_per_window=2)
    second.load_state_dict(state)
    rest = _all(second, 20 - stop_after)
    for x, y in zip(full[stop_after:], rest, strict=True):
        assert torch.equal(x.rows, y.rows) and torch.equal(x.acts, y.acts)
    bad = store.batches(8, seed=3)
    with pytest.raises(MonoscopeError, match="batch size 7"):
        bad.load_state_dict(state)


def test_finite_epochs_and_too_small(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    store = ActivationStore.open(tmp_path / "s")
    assert len(list(store.batches(10, epochs=2))) == 9  # 90 rows, partial tail dropped
    with pytest.raises(StoreError, match="fewer than one batch"):
        store.batches(1000)


def test_shard_views_match_safetensors_and_a_foreign_file_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from monoscope.store.manifest import ShardInfo
    from monoscope.store.shard import read_shard

    m = make_store(tmp_path / "s")
    p = tmp_path / "s" / m.shards[1].file
    ref = st_load(p.read_bytes())
    shard = ActivationStore.open(tmp_path / "s").read_shard(1)
    assert torch.equal(shard.acts, ref["acts"]) and shard.acts.dtype == torch.bfloat16
    assert torch.equal(shard.tokens, ref["tokens"]) and torch.equal(shard.keep, ref["keep"].bool())
    # a valid safetensors file with the right checksum but not a shard's tensors
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(st_save({"weights": torch.ones(3)}))
    import hashlib

    info = ShardInfo(file=foreign.name, contexts=1, rows=1, bytes=foreign.stat().st_size,
                     sha256=hashlib.sha256(foreign.read_bytes()).hexdigest(), sum_sq=0.0)
    with pytest.raises(StoreError, match=r"^shard foreign.safetensors passed its checksum but cannot be parsed "
                                         r"\('tokens'\): it was written by another tool or version$"):
        read_shard(foreign, info)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    info = ShardInfo(file=garbage.name, contexts=1, rows=1, bytes=garbage.stat().st_size,
                     sha256=hashlib.sha256(garbage.read_bytes()).hexdigest(), sum_sq=0.0)
    with pytest.raises(StoreError, match=r"^shard garbage.safetensors passed its checksum but cannot be parsed"):
        read_shard(garbage, info)


def test_window_refuses_a_shard_whose_rows_differ_from_the_manifest(tmp_path: Path) -> None:
    import json

    m = make_store(tmp_path / "s")
    mp = tmp_path / "s" / "manifest.json"
    doc = json.loads(mp.read_text())
    doc["shards"][0]["rows"] += 1
    mp.write_text(json.dumps(doc))
    store = ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match=rf"^shard {m.shards[0].file} of .* holds {m.shards[0].rows} training rows "
                                         rf"where the manifest says {m.shards[0].rows + 1}: they do not match; "
                                         "recapture the store$"):
        next(iter(store.batches(4, shards_per_window=8)))


def test_default_window_fills_the_byte_budget_in_even_windows_and_a_cursor_keeps_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monoscope.store import reader

    m = make_store(tmp_path / "s", n_shards=20)
    store = ActivationStore.open(tmp_path / "s")
    assert store.batches(5).spw == 20  # the whole store fits the default budget: one window
    shard_bytes = m.shards[0].bytes
    monkeypatch.setattr(reader, "WINDOW_BYTES", 9 * shard_bytes)  # at most 9 shards: 20 -> 3 windows of 7, 7, 6
    b = store.batches(5, seed=4)
    assert (b.spw, b.windows_per_epoch) == (7, 3)
    monkeypatch.setattr(reader, "WINDOW_BYTES", shard_bytes)  # a tiny budget still mixes 8 shards' worth: 3 windows
    assert store.batches(5).spw == 7
    # the window is part of the cursor: resuming under another budget continues the saved run's batches
    full = _all(store.batches(5, seed=4, shards_per_window=9), 30)
    first = store.batches(5, seed=4, shards_per_window=9)
    _all(first, 11)
    state = first.state_dict()
    assert state["shards_per_window"] == 9
    second = store.batches(5, seed=4)
    second.load_state_dict(state)
    assert all(torch.equal(x.rows, y.rows) for x, y in zip(full[11:], _all(second, 19), strict=True))
    # a cursor from before the window was recorded resumes with the old fixed 8
    legacy = store.batches(5, seed=4)
    legacy.load_state_dict({k: v for k, v in store.batches(5, seed=4, shards_per_window=8).state_dict().items()
                            if k != "shards_per_window"})
    assert legacy.spw == 8
    assert torch.equal(next(legacy).rows, next(store.batches(5, seed=4, shards_per_window=8)).rows)


def test_reading_checks_the_fast_digest_and_an_older_store_s_sha256(tmp_path: Path) -> None:
    """A shard's manifest entry holds sha256 and xxh3-128; reading for training checks xxh3 (naming both of its
    digests), `verify` checks sha256 too; a store from before xxh3 is read through its sha256."""
    import json

    import xxhash

    m = make_store(tmp_path / "s")
    p = tmp_path / "s" / m.shards[1].file
    assert m.shards[1].xxh3 == xxhash.xxh3_128_hexdigest(p.read_bytes())
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x04
    p.write_bytes(bytes(data))
    store = ActivationStore.open(tmp_path / "s")
    want = (f"shard {m.shards[1].file} is corrupt: xxh3 {xxhash.xxh3_128_hexdigest(bytes(data))} but the manifest "
            f"expects {m.shards[1].xxh3}")
    with pytest.raises(StoreError) as e:
        store.read_shard(1)
    assert str(e.value) == want
    assert "sha256" in store.verify()[0]
    man = tmp_path / "s" / "manifest.json"
    rec = json.loads(man.read_text())
    for s in rec["shards"]:
        del s["xxh3"]
    man.write_text(json.dumps(rec))
    old = ActivationStore.open(tmp_path / "s")
    assert old.manifest.shards[1].xxh3 is None
    with pytest.raises(StoreError, match=f"shard {m.shards[1].file} is corrupt: sha256 "):
        old.read_shard(1)
    assert old.read_shard(0).rows().shape[0] == m.shards[0].rows
