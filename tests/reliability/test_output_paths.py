"""Every command that writes checks its output folder before any heavy work (a model load, a store, an LLM):
a path below a regular file or on a read-only file system is one line naming the path, and an OSError or an
out-of-memory that reaches `main()` is one line naming the path or the option to lower, never a traceback."""

from __future__ import annotations

import argparse
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from monoscope.cli import main
from monoscope.fatal import describe
from tests.interp.test_scorers import build_db
from tests.reliability.helpers import monoscope, one_line_error


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "plain.txt"
    f.write_text("not a folder\n")
    return f


def _commands(out: Path, sae: Path) -> dict[str, list[str]]:
    """Each writing command with `out` as its output; every input is missing, so only an output check that
    comes first can produce an error about `out`."""
    missing = str(out.parent / "missing")
    return {
        "capture": ["capture", "--out", str(out), "--model", missing, "--tokens", "1k"],
        "train": ["train", missing, "--arch", "topk", "--k", "4", "--tokens", "1k", "--out", str(out)],
        "eval": ["eval", missing, "--acts", missing, "--out", str(out)],
        "features": ["features", str(sae)],
        "convert": ["convert", missing, "--to", "saelens", "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["capture", "train"])
def test_out_below_a_file_is_refused_before_the_model_or_store_loads(a_file: Path, command: str) -> None:
    out = a_file / "run"
    err = one_line_error(monoscope(*_commands(out, a_file / "sae")[command]))
    assert err == (f"error: --out {out} cannot be created: {a_file} is a file, not a folder: choose a path that is "
                   "not below a file")


@pytest.mark.parametrize("command", ["eval", "features", "convert"])
def test_out_below_a_file_in_process(a_file: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = a_file / "run"
    assert main(_commands(out, a_file / "sae")[command]) == 2
    err = capsys.readouterr().err.strip()
    if command == "features":  # features writes the database beside the SAE folder (runs/x/sae -> runs/x/features)
        out = a_file / "features"
        assert err == (f"error: feature database folder {out} cannot be created: {a_file} is a file, not a folder: "
                       "choose a path that is not below a file")
    else:
        assert err == (f"error: --out {out} cannot be created: {a_file} is a file, not a folder: choose a path "
                       "that is not below a file")


def test_out_that_is_a_file(a_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(a_file.parent / "missing"), "--to", "saelens", "--out", str(a_file)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {a_file} is a file, not a folder: give a folder path "
                                               "(or remove the file)")


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs holding a feature database (root can write through chmod, not through a ro mount);
    skipped where mounting is not allowed."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN): the read-only file-system case cannot be set up")
    try:
        build_db(mnt / "run" / "features" / "features.db").close()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_file_system(read_only: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = read_only / "new"
    err = one_line_error(monoscope(*_commands(out, read_only / "sae")["capture"]))
    assert err == f"error: --out {out}: cannot write in {read_only} (read-only file system): choose a writable folder"
    for command in ("train", "eval", "convert"):
        assert main(_commands(out, read_only / "sae")[command]) == 2
        assert capsys.readouterr().err.strip() == err, command
    db_dir = read_only / "run" / "features"  # explain writes into the database in place
    assert main(["explain", str(read_only / "run" / "sae"), "--llm", "openai:m", "--endpoint", "http://127.0.0.1:9",
                 "--features", "0,"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: feature database folder {db_dir}: cannot write in {db_dir} "
                                               "(read-only file system): choose a writable folder")


def test_out_of_memory_names_the_option_to_lower(tmp_path: Path) -> None:
    from tests.train.helpers import make_store

    make_store(tmp_path / "store")  # d_model 32: 3e8 x 32 features need terabytes
    proc = monoscope("train", str(tmp_path / "store"), "--arch", "topk", "--k", "4", "--tokens", "1k",
                     "--batch-size", "64", "--width", "300000000x", "--out", str(tmp_path / "sae"), "--quiet")
    err = one_line_error(proc)
    assert err.startswith("error: monoscope train ran out of memory (an allocation of ")
    assert err.endswith("GiB failed): lower --batch-size (now 64) or --width (now 300000000x), or use a machine with "
                        "more memory")


def test_os_errors_reaching_main_name_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import monoscope.interop.cli as convert_cli

    def full_disk(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "conv" / "cfg.json"))

    monkeypatch.setattr(convert_cli, "convert_sae", full_disk)
    assert main(["convert", str(tmp_path / "x"), "--to", "saelens", "--out", str(tmp_path / "conv")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: No space left on device: {tmp_path / 'conv' / 'cfg.json'}: "
                                               "free some space there and run the same command again")
    ns = argparse.Namespace(command="eval", batch_contexts=8)
    assert describe(MemoryError(), ns) == ("monoscope eval ran out of memory: lower --batch-contexts (now 8) or "
                                           "--tokens, or use a machine with more memory")
    assert describe(RuntimeError("shape mismatch"), ns) is None  # a bug keeps its traceback
    import torch

    cuda_oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity")
    train_ns = argparse.Namespace(command="train", batch_size=4096, width="16x")
    assert describe(cuda_oom, train_ns) == ("monoscope train ran out of memory (an allocation of 2.00 GiB failed): "
                                            "lower --batch-size (now 4096) or --width (now 16x), or use a machine "
                                            "with more memory")
