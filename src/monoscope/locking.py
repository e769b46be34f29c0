"""One writer per output folder: capture, train, features and explain hold an exclusive lock on theirs.

    with FolderLock(out, "capture"):      # a second process on `out` gets a one-line LockError naming us
        ...

The lock is `fcntl.flock` on `<folder>/.lock`, held through an open file descriptor: the kernel
releases it when the process ends, however it ends (a SIGKILL, an out-of-memory kill), so a killed
run never blocks the next one. The file also records who holds it (pid, host, command, start time)
for the refusal message. A lock file left by a dead process is taken over (with a note on stderr);
one whose recorded process is dead on this host but whose flock is still held (a child that inherited
the descriptor) is replaced. Locks are re-entrant within one process, so `monoscope run` and nested
API calls never lock themselves out.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import inspect
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from monoscope.errors import MonoscopeError

try:
    import fcntl
except ImportError:  # not POSIX: the recorded pid alone decides
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
_F = TypeVar("_F", bound=Callable[..., Any])


class LockError(MonoscopeError):
    """Another process is writing the same output folder."""


def _command() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("cli.py", "__main__.py", "monoscope"):
        argv = ["monoscope", *argv[1:]]
    return " ".join(argv).replace("\n", " ")[:300] or "python"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict[str, Any]) -> str:
    """`pid 123 on host, started 2026-01-01T12:00:00Z: monoscope capture ...` (what is known of it)."""
    if not info:
        return "an unknown process (its lock file is empty)"
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}: "
            f"{info.get('command', '?')}")


def _stale(info: dict[str, Any]) -> bool:
    """The recorded holder ran on this host and is gone."""
    pid = info.get("pid")
    return isinstance(pid, int) and info.get("host") == socket.gethostname() and not _pid_alive(pid)


class FolderLock:
    """An exclusive, process-wide lock on `folder` (created if missing; removed again at release when the
    lock was all that was put in it)."""

    _held: ClassVar[dict[str, tuple[FolderLock, int]]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, folder: str | os.PathLike[str], what: str = "") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.took_over: dict[str, Any] | None = None  # the stale holder this lock replaced, if any
        self._fd: int | None = None
        self._created_folder = False

    # ---- acquisition ------------------------------------------------------------------------------
    def _key(self) -> str:
        return os.path.realpath(self.folder)

    def _open_locked(self) -> int | None:
        """An fd holding the flock on the current lock file, or None when another process holds it."""
        for _ in range(5):  # the holder may unlink the file between our open and our flock: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    return None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no flock here: pid alone
                    return self._pid_only()
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
        return None

    def _pid_only(self) -> int | None:
        info = _read_info(self.path)
        if info and info.get("pid") != os.getpid() and not _stale(info) and info.get("host") == socket.gethostname():
            return None
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self) -> FolderLock:
        key = self._key()
        with self._guard:
            held = self._held.get(key)
            if held is not None:  # this process already holds it (re-entrant)
                self._held[key] = (held[0], held[1] + 1)
                return self
        if self.folder.exists() and not self.folder.is_dir():
            raise MonoscopeError(f"{self.folder} is a file: pass a folder")
        if not self.folder.exists():
            try:
                self.folder.mkdir(parents=True)
                self._created_folder = True
            except FileExistsError:
                pass
            except OSError as e:
                raise MonoscopeError(f"cannot create output folder {self.folder} ({e.strerror or e}): choose a "
                                     "writable path that is not below a file") from e
        try:
            fd = self._open_locked()
            if fd is None:
                info = _read_info(self.path)
                if _stale(info):  # its process is gone; a child inherited the descriptor: replace the file
                    self.path.unlink(missing_ok=True)
                    fd = self._open_locked()
                if fd is None:
                    self._cleanup_folder()
                    raise LockError(f"{self.folder} is in use by another monoscope process ({describe_holder(info)}): "
                                    "wait for it to finish or stop it; one writer per folder")
        except OSError as e:
            self._cleanup_folder()
            raise MonoscopeError(f"cannot lock {self.path}: {e.strerror or e}") from e
        previous = _read_info(self.path)
        if previous and previous.get("pid") != os.getpid():
            self.took_over = previous
            print(f"note: {self.folder} was locked by a process that is no longer running "
                  f"({describe_holder(previous)}); taking over", file=sys.stderr)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(), "what": self.what,
                "started": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        with self._guard:
            self._held[key] = (self, 1)
        return self

    # ---- release ---------------------------------------------------------------------------------
    def release(self) -> None:
        key = self._key()
        with self._guard:
            held = self._held.get(key)
            if held is None:
                return
            owner, count = held
            if count > 1:
                self._held[key] = (owner, count - 1)
                return
            del self._held[key]
        owner._unlock()

    def _unlock(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it, so no one locks a file that is about to vanish
        os.close(self._fd)  # releases the flock
        self._fd = None
        self._cleanup_folder()

    def _cleanup_folder(self) -> None:
        if self._created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty: a folder the command wrote into stays

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def folder_locks(folders: Iterable[str | os.PathLike[str]], what: str = "") -> Iterator[None]:
    """Lock several folders (deduplicated, in a fixed order so two processes never deadlock)."""
    unique = sorted({os.path.realpath(f): Path(f) for f in folders}.items())
    with contextlib.ExitStack() as stack:
        for _, folder in unique:
            if folder.exists() and not folder.is_dir():
                continue  # not a folder: the command itself says so in its own words
            stack.enter_context(FolderLock(folder, what))
        yield


def locks_folders(folders: Callable[[dict[str, Any]], Iterable[str | os.PathLike[str]]],
                  what: str = "") -> Callable[[_F], _F]:
    """Decorator: hold the locks of `folders(arguments)` (the call's arguments by name, defaults filled in)
    for the whole call."""

    def wrap(fn: _F) -> _F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            with folder_locks(folders(bound.arguments), what or fn.__name__):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
