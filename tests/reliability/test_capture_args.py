"""Arguments in the capture path: nonsense counts, a --model that is not a model, an empty --model, a binary file
as a corpus. Each is a real `monoscope capture` process; they run side by side to keep the file quick."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from monoscope.errors import MonoscopeError
from monoscope.model import resolve_source
from monoscope.units import parse_count
from tests.reliability import store_helpers
from tests.reliability.store_helpers import ENV, SMALL, cli, one_line_error, write_corpus

model_dir = store_helpers.model_dir  # fixture


def _run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess[str]]:
    procs = {k: subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in commands.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[k] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def test_parse_count_refuses_non_finite_values() -> None:
    assert [parse_count(t) for t in ("2M", "50k", "1e3", "1_000", 7)] == [2_000_000, 50_000, 1000, 1000, 7]
    for text in ("nan", "inf", "-inf", "Infinity", "nank"):
        with pytest.raises(MonoscopeError, match=rf"^--tokens {text} is not a finite count: use a number like"):
            parse_count(text, "--tokens")
    with pytest.raises(MonoscopeError, match=r"^cannot read 'lots' as a count"):
        parse_count("lots")


def test_model_file_that_is_not_a_model_says_what_it_is(tmp_path: Path) -> None:
    cases = {
        "notes.txt": (b"hello\n", "is a text file, not a model"),
        "cfg.json": (b'{"a": 1}', "is a text file (JSON), not a model"),
        "config.json": (b'{"a": 1}', "is a model config (pass the folder that holds it), not a model"),
        "blob.bin": (b"\x00\x01\x02" * 10, "is a PyTorch checkpoint or zip archive"),
        "noext": (b"\x00\xff" * 10, "is a binary file of 20 bytes, not a model"),
        "model-gguf": (b"GGUF\x03\x00\x00\x00", "is a GGUF file without the .gguf extension (rename it"),
        "empty": (b"", "is an empty file, not a model"),
    }
    for name, (data, want) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MonoscopeError, match=r"^--model ") as e:
            resolve_source(str(tmp_path / name))
        assert want in str(e.value) and "does not exist" not in str(e.value), str(e.value)
        assert "a .gguf file, a folder saved with save_pretrained" in str(e.value)
    save_file({"w": __import__("torch").zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MonoscopeError, match=r"is a safetensors weights file \(pass the folder that holds it"):
        resolve_source(str(tmp_path / "model.safetensors"))
    for empty in ("", "  "):
        with pytest.raises(MonoscopeError, match=r"^--model is empty: pass 'default'"):
            resolve_source(empty)


def test_capture_cli_arguments(tmp_path: Path, model_dir: Path) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes((i * 7919 + 13) % 256 for i in range(20_000)))  # deterministic noise, 20 KB
    (tmp_path / "notes.txt").write_text("not a model\n")

    def capture(name: str, *args: str | Path) -> list[str]:
        return cli("capture", "--out", tmp_path / name, *SMALL, *map(str, args))

    res = _run_all({
        "nan": capture("o1", "--model", model_dir, "--corpus", corpus, "--tokens", "nan"),
        "inf": capture("o2", "--model", model_dir, "--corpus", corpus, "--tokens", "inf"),
        "file": capture("o3", "--model", tmp_path / "notes.txt", "--corpus", corpus, "--tokens", "64"),
        "empty": capture("o4", "--model", "", "--corpus", corpus, "--tokens", "64"),
        "binary": capture("o5", "--model", model_dir, "--corpus", binary, "--tokens", "64"),
        "strict": capture("o6", "--model", model_dir, "--corpus", binary, "--tokens", "64", "--strict-utf8"),
        "below": cli("capture", "--out", tmp_path / "notes.txt" / "store", *SMALL, "--model", str(model_dir),
                     "--corpus", str(corpus), "--tokens", "64"),
    })
    one_line_error(res["nan"], "error: --tokens nan is not a finite count")
    one_line_error(res["inf"], "error: --tokens inf is not a finite count")
    one_line_error(res["file"], f"--model '{tmp_path / 'notes.txt'}' is a text file, not a model")
    one_line_error(res["empty"], "error: --model is empty: pass 'default', a Hugging Face id")
    one_line_error(res["below"], f"error: --out {tmp_path / 'notes.txt' / 'store'} cannot be created: "
                   f"{tmp_path / 'notes.txt'} is a file, not a folder: choose a path that is not below a file")
    for name in ("o1", "o2", "o3", "o4", "o6"):
        assert not (tmp_path / name).exists(), name  # refused before anything was written

    b = res["binary"]
    assert b.returncode == 0, b.stderr
    assert f"warning: {binary}: " in b.stderr and "are not UTF-8 and were replaced with U+FFFD; is it a binary " \
        "file? Re-encode it as UTF-8, or pass --strict-utf8 to refuse such input" in b.stderr
    assert b.stderr.count("warning:") == 1  # once, although capture reads the corpus more than once
    one_line_error(res["strict"], f"error: {binary} line 1: invalid UTF-8", "drop --strict-utf8")
    assert "strict_utf8" not in res["strict"].stderr


def test_transformers_warnings_are_not_muted(tmp_path: Path, model_dir: Path) -> None:
    """A checkpoint missing a weight must still show transformers' "newly initialized" warning."""
    from safetensors.torch import load_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in model_dir.iterdir():
        if p.suffix != ".safetensors":
            (broken / p.name).write_bytes(p.read_bytes())
    state = load_file(str(model_dir / "model.safetensors"))
    state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    code = "import sys; from monoscope.model import load_model; load_model(sys.argv[1], device='cpu')"
    proc = subprocess.run([sys.executable, "-c", code, str(broken)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "model.layers.0.mlp.up_proj.weight" in proc.stderr, proc.stderr
