"""The one line `monoscope` prints for a failure no stage turned into a `MonoscopeError`: a file-system error
(naming the path) or running out of memory (naming the option to lower), instead of a traceback.

Any other exception is a bug and keeps its traceback (`describe` returns None for it).
"""

from __future__ import annotations

import argparse
import errno
import re

OOM_OPTIONS: dict[str, tuple[str, ...]] = {
    "capture": ("--batch-contexts",),
    "run": ("--batch-contexts", "--width"),
    "train": ("--batch-size", "--width"),
    "eval": ("--batch-contexts", "--tokens"),
    "features": ("--batch-contexts",),
    "explain": ("--concurrency",),
}
"""Per subcommand: the options whose values set its peak memory, the first one first."""

_OOM_TEXT = ("out of memory", "DefaultCPUAllocator: can't allocate", "CUDA error: out of memory")


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, torch.OutOfMemoryError (CUDA and MPS), or the RuntimeError of a failed CPU allocation."""
    if isinstance(e, MemoryError):
        return True
    if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        return True
    return isinstance(e, RuntimeError) and any(t in str(e) for t in _OOM_TEXT)


def describe(e: BaseException, args: argparse.Namespace | None = None) -> str | None:
    """The one-line message for `e` raised by a subcommand, or None when it is not an OSError or out-of-memory."""
    command = str(getattr(args, "command", "") or "")
    if is_out_of_memory(e):
        return _oom_message(e, command, args)
    if isinstance(e, OSError):
        return _os_message(e)
    return None


def _oom_message(e: BaseException, command: str, args: argparse.Namespace | None) -> str:
    detail = ""
    m = re.search(r"tried to allocate (\d+) bytes", str(e))
    if m:
        detail = f" (an allocation of {int(m.group(1)) / 2**30:.1f} GiB failed)"
    else:
        m = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", str(e))
        if m:
            detail = f" (an allocation of {m.group(1)} failed)"
    opts = OOM_OPTIONS.get(command, ())
    named = []
    for opt in opts:
        value = getattr(args, opt.lstrip("-").replace("-", "_"), None) if args is not None else None
        named.append(f"{opt} (now {value})" if value is not None else opt)
    fix = f"lower {' or '.join(named)}" if named else "free memory (close other programs)"
    where = f"monoscope {command}" if command else "monoscope"
    return f"{where} ran out of memory{detail}: {fix}, or use a machine with more memory"


def _os_message(e: OSError) -> str:
    path = e.filename if e.filename is not None else None
    what = (e.strerror or str(e) or type(e).__name__).rstrip(".")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there and run the same command again"
    elif e.errno == errno.EROFS:
        fix = "choose a folder on a writable file system (--out)"
    elif e.errno in (errno.EACCES, errno.EPERM):
        fix = "check the permissions, or choose another folder"
    elif e.errno == errno.ENOENT:
        fix = "check the path"
    elif e.errno in (errno.ENOTDIR, errno.EISDIR):
        fix = "a file and a folder are swapped in that path: check it"
    else:
        fix = "check the path and the disk, then run the same command again"
    if path is not None:
        other = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
        return f"{what}: {path}{other}: {fix}"
    return f"{what} ({type(e).__name__}): {fix}"
