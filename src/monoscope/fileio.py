"""Atomic, checksummed file writes shared by every stage that must never leave half a file behind.

Every write goes to a temporary name in the target's folder, is flushed and fsynced, then renamed
over the target (a rename within one file system is atomic). A full disk becomes a one-line error
that names the file and the fix, and the temporary file is removed so nothing half-written remains.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from monoscope.errors import MonoscopeError

TMP_PREFIX = ".tmp-"


def _disk_error(path: Path, e: OSError) -> MonoscopeError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return MonoscopeError(
            f"disk full while writing {path}: free some space in {path.parent} and run the same command "
            "again (it resumes; nothing already written is lost)"
        )
    return MonoscopeError(f"cannot write {path}: {e.strerror or e}")


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes | memoryview) -> str:
    """Write `data` to `path` atomically; returns its sha256 hex digest."""
    path = Path(path)
    digest = hashlib.sha256(data).hexdigest()
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise _disk_error(path, e) from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    return digest


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> str:
    """JSON with sorted keys and a trailing newline, so identical content gives identical bytes.

    Only valid JSON is written: a NaN or infinity (which `json` would write as a bare `NaN`, which no
    other JSON reader accepts) is an error naming the key; callers with metrics that may be undefined
    turn them into null first (`nonfinite_to_null`)."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as e:
        bad = next(iter(nonfinite_to_null(obj)[1]), "?")
        raise MonoscopeError(f"refusing to write {path}: {bad} is not a finite number ({e})") from e
    return write_bytes_atomic(path, (text + "\n").encode())


def nonfinite_to_null(obj: Any, where: str = "") -> tuple[Any, dict[str, str]]:
    """`obj` with every NaN/inf float replaced by None, and {dotted key: 'nan' | 'inf' | '-inf'} of what was
    replaced, so a JSON file can record why a value is null instead of holding a bare NaN."""
    replaced: dict[str, str] = {}

    def clean(x: Any, key: str) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            replaced[key or "<root>"] = str(x)
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(x)]
        return x

    return clean(obj, where), replaced


def check_output_dir(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Refuse, before any heavy work (loading a model, reading a store), an output folder that cannot be
    written: a path that is or lies below a regular file, or whose nearest existing folder is read-only
    (a read-only mount, no permission) or full. `what` names the option in the message. Creates nothing;
    returns the path."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise MonoscopeError(f"{what} {p} is a file, not a folder: give a folder path (or remove the file)")
    probe = p
    while not probe.exists():  # the nearest existing ancestor is where the folder would be created
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise MonoscopeError(f"{what} {p} cannot be created: {probe} is a file, not a folder: choose a path "
                             "that is not below a file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + "write-check-", dir=probe)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            why = "the disk is full"
        elif e.errno == errno.EROFS:
            why = "read-only file system"
        else:
            why = (e.strerror or str(e)).lower()
        raise MonoscopeError(f"{what} {p}: cannot write in {probe} ({why}): choose a writable folder") from e
    os.close(fd)
    _remove_quietly(tmp)
    return p


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise MonoscopeError(f"{what} {path} is missing") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MonoscopeError(f"{what} {path} is corrupt (not valid JSON: {e}); restore or recreate it") from e


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file written by another library (e.g. safetensors) before it is renamed into place."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make renames inside `folder` durable (POSIX); a no-op elsewhere."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(folder: str | os.PathLike[str]) -> int:
    """Delete leftovers of writes that a kill interrupted; returns how many were removed."""
    n = 0
    for p in Path(folder).glob(TMP_PREFIX + "*"):
        _remove_quietly(p)
        n += 1
    return n


def _remove_quietly(p: str | os.PathLike[str]) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
