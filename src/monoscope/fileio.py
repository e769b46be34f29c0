"""Atomic, checksummed file writes shared by every stage that must never leave half a file behind.

Every write goes to a temporary name in the target's folder, is flushed and fsynced, then renamed
over the target (a rename within one file system is atomic). A full disk becomes a one-line error
that names the file and the fix, and the temporary file is removed so nothing half-written remains.
"""

from __future__ import annotations

import errno
import hashlib
import json
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
    """JSON with sorted keys and a trailing newline, so identical content gives identical bytes."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
