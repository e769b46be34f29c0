"""C kernels for the CPU's memory-bound hot paths, built on first use by the machine's C compiler and called
through ctypes. Every caller keeps its PyTorch fallback, which gives the same results: a machine without a compiler
is only slower.

Why C: on a CPU, a step that is not a matmul is bound by memory traffic and by aten's per-element costs. The row
top-k of a [B, F] pre-activation matrix is one read of it here, against several passes and ~1 ns per element in
aten (`monoscope.sae.topk._row_topk`).

The library is built with `-O3 -march=native` into `$MONOSCOPE_CACHE/native/<key>/` (default
`~/.cache/monoscope`), where the key hashes the source, the compiler's version and the CPU's flags, so a cache
shared between machines never hands one a library built for another. The build writes to a temporary name and
renames it, so concurrent first uses are safe. `MONOSCOPE_NATIVE=0` turns the kernels off; `CC` names the
compiler (default `cc`). A failed build is reported once (a warning with the compiler's message) and the
fallback is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from monoscope.cache import cache_dir

NATIVE_ENV = "MONOSCOPE_NATIVE"
_SOURCE = Path(__file__).with_name("row_topk.c")
_MIN_ROWS_PER_THREAD = 64


def enabled() -> bool:
    return os.environ.get(NATIVE_ENV, "").strip() != "0"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(source: Path) -> Path:
    """The shared library of `source` in the cache, compiled if it is not there yet."""
    cc = os.environ.get("CC") or "cc"
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    key = hashlib.sha256(b"\0".join([source.read_bytes(), version.encode(), _cpu_flags().encode()])).hexdigest()[:20]
    folder = cache_dir() / "native" / key
    lib = folder / (source.stem + ".so")
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=lib.name, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", "-o", tmp, str(source)],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} exited with {done.returncode}: {done.stderr.strip()[-600:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _row_topk_lib() -> ctypes.CDLL | None:
    if not enabled():
        return None
    try:
        lib = ctypes.CDLL(str(_build(_SOURCE)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"monoscope's C kernels are off, so CPU training runs slower ({e}); install a C compiler "
                      f"(e.g. gcc) or set {NATIVE_ENV}=0 to silence this", RuntimeWarning, stacklevel=2)
        return None
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_void_p, ctypes.c_void_p]
    for name in ("row_topk_i16", "row_topk_i32"):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, args
    return lib


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="monoscope-native")


# a forked child inherits the pool object but not its threads, and would wait on them forever: it makes its own
os.register_at_fork(after_in_child=_pool.cache_clear)


def row_topk(keys: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """The k largest entries of each row of a 2-D int16 or int32 CPU tensor whose rows are contiguous, as
    (values [B, k], column indices [B, k] int64), each row's entries in increasing column order; ties at the k-th
    value go to the lowest columns. None when the kernel is unavailable or the input is not of that kind."""
    if (keys.device.type != "cpu" or keys.dim() != 2 or keys.dtype not in (torch.int16, torch.int32)
            or keys.stride(1) != 1 or not 0 < k <= keys.shape[1]):
        return None
    lib = _row_topk_lib()
    if lib is None:
        return None
    fn = lib.row_topk_i16 if keys.dtype == torch.int16 else lib.row_topk_i32
    n_rows, n = keys.shape
    values = torch.empty(n_rows, k, dtype=keys.dtype)
    index = torch.empty(n_rows, k, dtype=torch.int64)
    if n_rows == 0:
        return values, index
    size, ld = keys.element_size(), keys.stride(0)
    parts = max(1, min(torch.get_num_threads(), n_rows // _MIN_ROWS_PER_THREAD))
    bounds = [n_rows * i // parts for i in range(parts + 1)]

    def run(lo: int, hi: int) -> int:  # ctypes releases the GIL for the call: the parts run in parallel
        return int(fn(keys.data_ptr() + lo * ld * size, hi - lo, n, ld, k,
                      values.data_ptr() + lo * k * size, index.data_ptr() + lo * k * 8))

    if parts == 1:
        codes = [run(0, n_rows)]
    else:
        codes = list(_pool(parts).map(run, bounds[:-1], bounds[1:]))
    if any(codes):
        raise MemoryError(f"the native row top-k could not allocate its buffers for rows of {n} entries")
    return values, index
