"""Stores a rerun repairs: a rerun of capture checks every shard and redoes exactly the damaged ones, a lost or
damaged manifest is rebuilt from the recovery record, and a manifest of the wrong shape is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from monoscope.capture import capture
from monoscope.errors import StoreError
from monoscope.model import LoadedModel, load_model
from monoscope.store import ActivationStore
from tests.reliability import store_helpers
from tests.reliability.store_helpers import SMALL, SMALL_API, folder_bytes, one_line_error, run_cli

model_dir, corpus_file = store_helpers.model_dir, store_helpers.corpus_file  # fixtures

TOKENS = 300  # 19 contexts of 16 tokens: 10 shards of 2 contexts (the last holds 1)


@pytest.fixture(scope="module")
def lm(model_dir: Path) -> LoadedModel:
    """The saved tiny model loaded once, exactly as the CLI loads it (same identity, so the same store key)."""
    return load_model(str(model_dir), device="cpu", compute_dtype="fp32")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, lm: LoadedModel, corpus_file: Path) -> Path:
    """An uninterrupted capture."""
    ref = tmp_path_factory.mktemp("ref") / "ref"
    capture(ref, model=lm, corpus=str(corpus_file), tokens=TOKENS, **SMALL_API)
    return ref


@pytest.fixture
def pair(tmp_path: Path, reference: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """The reference store, a copy of it to damage, and the reference's bytes."""
    want = folder_bytes(reference)
    assert len([n for n in want if n.startswith("shard-")]) == 10 and "progress.json" in want
    shutil.copytree(reference, tmp_path / "s")
    return reference, tmp_path / "s", want


@pytest.fixture
def again(lm: LoadedModel, corpus_file: Path):  # type: ignore[no-untyped-def]
    """Capture again with the reference's arguments."""
    return lambda folder, **kw: capture(folder, model=lm, corpus=str(corpus_file), tokens=TOKENS, **SMALL_API, **kw)


def _flip(path: Path, at: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_advice_is_true_rerun_redoes_exactly_the_damaged_shards(pair, model_dir: Path,  # type: ignore[no-untyped-def]
                                                                        corpus_file: Path) -> None:
    _, s, want = pair
    (s / "shard-00003.safetensors").unlink()
    _flip(s / "shard-00007.safetensors")
    untouched = {p.name: p.stat().st_mtime_ns for p in s.glob("shard-*") if p.name != "shard-00007.safetensors"}

    v = run_cli("verify", s)
    assert v.returncode == 1
    assert "shard-00003.safetensors is missing" in v.stderr and "shard-00007.safetensors is corrupt" in v.stderr
    assert "run the same monoscope capture command again" in v.stderr

    r = run_cli("capture", "--out", s, "--model", model_dir, "--corpus", corpus_file, "--tokens", str(TOKENS), *SMALL)
    assert r.returncode == 0, r.stderr
    assert ("note: 2 of 10 shards in " in r.stderr
            and "(shard-00003.safetensors, shard-00007.safetensors): capturing them again" in r.stderr), r.stderr
    assert "already complete" not in r.stdout, r.stdout
    assert "repaired 2 damaged or missing shard(s); 64 tokens" in " ".join(r.stdout.split()), r.stdout
    assert folder_bytes(s) == want  # byte-identical to the uninterrupted run
    for name, mtime in untouched.items():  # the intact shards were checked, not rewritten
        if name != "shard-00003.safetensors":
            assert (s / name).stat().st_mtime_ns == mtime, name
    ok = run_cli("verify", s)
    assert ok.returncode == 0 and ok.stdout.startswith("OK 10 shards"), ok.stderr


def test_trust_sizes_checks_sizes_only(pair, again) -> None:  # type: ignore[no-untyped-def]
    _, s, want = pair
    _flip(s / "shard-00001.safetensors")  # same size: only the sha256 sees it
    res = again(s, trust_sizes=True)
    assert res.new_tokens == 0 and folder_bytes(s) != want
    p = s / "shard-00004.safetensors"
    p.write_bytes(p.read_bytes()[:-1])  # a size change is caught even when trusting sizes
    res = again(s, trust_sizes=True)
    assert res.new_tokens == 2 * 16 and folder_bytes(s) != want
    res = again(s)
    assert res.new_tokens == 2 * 16 and res.resumed_contexts == 17 and res.repaired_shards == 1
    assert folder_bytes(s) == want
    assert again(s).new_tokens == 0


def test_deleted_manifest_is_rebuilt_reusing_every_matching_shard(pair, again) -> None:  # type: ignore[no-untyped-def]
    _, s, want = pair
    (s / "manifest.json").unlink()
    res = again(s)
    assert res.new_tokens == 0 and res.resumed_contexts == 19
    assert folder_bytes(s) == want


@pytest.mark.parametrize("content, why", [
    ("{not json", "not valid JSON"),
    ("[]", "holds a JSON list, not a store manifest"),
    ("null", "holds a JSON null, not a store manifest"),
    ('{"format": "monoscope-store/1", "hook": "resid_post.1"}', "key 'model' is missing"),
    ('{"format": "monoscope-store/1", "model": [], "hook": 1}', "'model' is not an object"),
])
def test_damaged_manifest_is_one_line_error_then_rebuilt(pair, again,  # type: ignore[no-untyped-def]
                                                         content: str, why: str) -> None:
    _, s, want = pair
    (s / "manifest.json").write_text(content)
    with pytest.raises(StoreError, match=r"manifest\.json") as e:
        ActivationStore.open(s)
    assert why in str(e.value) and "\n" not in str(e.value)
    (s / "shard-00005.safetensors").unlink()
    res = again(s)
    assert res.new_tokens == 2 * 16  # only the missing shard is computed again
    assert folder_bytes(s) == want


def test_wrong_shape_manifest_via_cli_is_one_line(pair) -> None:  # type: ignore[no-untyped-def]
    _, s, _ = pair
    (s / "manifest.json").write_text("[1, 2]")
    one_line_error(run_cli("verify", s), "manifest.json holds a JSON list, not a store manifest",
                   "rerun the same monoscope capture command")


def test_manifest_listing_fewer_shards_is_reported_and_repaired(pair, again) -> None:  # type: ignore[no-untyped-def]
    _, s, want = pair
    m = json.loads((s / "manifest.json").read_text())
    m["shards"] = m["shards"][:8]
    (s / "manifest.json").write_text(json.dumps(m))
    v = run_cli("verify", s)
    assert v.returncode == 1, v.stderr
    assert "2 shard file(s) in" in v.stderr and "are not in its manifest (shard-00008.safetensors, " \
        "shard-00009.safetensors)" in v.stderr
    res = again(s)
    assert res.new_tokens == 0
    assert folder_bytes(s) == want


def test_damaged_manifest_without_recovery_record_says_overwrite(pair, again) -> None:  # type: ignore[no-untyped-def]
    _, s, _ = pair
    (s / "progress.json").unlink()  # a store written before the recovery record was kept
    (s / "manifest.json").write_text("null")
    with pytest.raises(StoreError, match=r"manifest.json is damaged .* and no progress.json is left to rebuild it "
                                         r"from: recapture with --overwrite"):
        again(s)
    res = again(s, overwrite=True)
    assert res.resumed_contexts == 0 and res.manifest.n_contexts == 19


def test_manifest_and_recovery_record_both_lost_say_recapture(pair, again, model_dir: Path,  # type: ignore[no-untyped-def]
                                                              corpus_file: Path) -> None:
    _, s, _ = pair
    (s / "progress.json").unlink()
    (s / "manifest.json").unlink()
    fix = (f"{s} holds 10 activation shard(s) but neither manifest.json nor progress.json (the store's records are "
           f"lost, so its shards cannot be checked or reused): recapture it with the monoscope capture command that "
           f"made it and --overwrite (--out {s}), or delete the folder")
    r = run_cli("capture", "--out", s, "--model", model_dir, "--corpus", corpus_file, "--tokens", str(TOKENS), *SMALL)
    assert one_line_error(r) == f"error: {fix}\n"
    v = run_cli("verify", s)  # a reader of the store says the same
    assert v.returncode == 2 and v.stderr == f"error: {fix}\n", v.stderr
    with pytest.raises(StoreError) as e:
        ActivationStore.open(s)
    assert str(e.value) == fix
    res = again(s, overwrite=True)  # the fix it names works
    assert res.resumed_contexts == 0 and res.manifest.n_contexts == 19
    empty = s.parent / "empty"
    empty.mkdir()
    with pytest.raises(StoreError) as e:
        ActivationStore.open(empty)
    assert str(e.value) == (f"{empty} is not an activation store (manifest.json is missing): capture one with "
                            f"monoscope capture --out {empty}, or pass a store's folder")
