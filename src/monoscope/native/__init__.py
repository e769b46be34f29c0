"""C kernels for the CPU's memory-bound hot paths, built on first use by the machine's C compiler and called
through ctypes. Every caller keeps its PyTorch fallback, which gives the same results: a machine without a compiler
is only slower.

Why C: on a CPU, a step that is not a matmul is bound by memory traffic and by aten's per-element costs. The row
top-k of a [B, F] pre-activation matrix is one read of it here, against several passes and ~1 ns per element in
aten (`monoscope.sae.topk._row_topk`).

The library is built with `-O3 -march=native` into `$MONOSCOPE_CACHE/native/<key>/` (default
`~/.cache/monoscope`), where the key hashes the source, the headers beside it, the compiler's version and the
CPU's flags, so a cache shared between machines never hands one a library built for another. The build writes to a
temporary name and renames it, so concurrent first uses are safe. `MONOSCOPE_NATIVE=0` turns the kernels off;
`CC` names the compiler (default `cc`). A failed build is reported once (a warning with the compiler's message) and
the fallback is used.
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
from typing import Any

import torch
from torch import Tensor

from monoscope.cache import cache_dir

NATIVE_ENV = "MONOSCOPE_NATIVE"
_HERE = Path(__file__).parent
_MIN_ROWS_PER_THREAD = 64
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
"""-ffp-contract=off: a multiply and an add stay two roundings, as in the PyTorch arithmetic a kernel reproduces;
-fno-math-errno: sqrtf may then be vectorised (it is exact either way)."""


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
    """The shared library of `source` in the cache, compiled if it is not there yet: with OpenMP (parallel.h says
    why), or without it where the compiler has none."""
    cc = os.environ.get("CC") or "cc"
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    headers = [h.read_bytes() for h in sorted(_HERE.glob("*.h"))]  # parallel.h, bf16.h: what a source includes
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, version.encode(), _cpu_flags().encode(),
                                      " ".join(_CFLAGS).encode()])).hexdigest()[:20]
    folder = cache_dir() / "native" / key
    lib = folder / (source.stem + ".so")
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=lib.name, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        for openmp in (["-fopenmp"], []):
            done = subprocess.run([cc, *_CFLAGS, *openmp, "-I", str(_HERE), "-o", tmp, str(source), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cc} exited with {done.returncode}: {done.stderr.strip()[-600:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES: dict[str, dict[str, tuple[Any, list[Any]]]] = {
    "row_topk": {name: (ctypes.c_int, [_P, _I64, _I64, _I64, _I64, _P, _P]) for name in ("row_topk_i16",
                                                                                          "row_topk_i32")},
    "adam_rows": {
        "grad_sumsq": (None, [_P, _P, _P, _P, _I64, _I64]),
        "sum_f64": (ctypes.c_double, [_P, _I64]),
        "adam_rows": (None, [_P, _P, _P, _P, _P, _F32, _I64, _I64, _F32, _F32, _F32, _F32, _F32, _F32, ctypes.c_int,
                             _P, _I64]),
    },
    "entry_dots": {"entry_dots_bf16": (None, [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _P])},
    "relu_topk": {"relu_topk_rows_bf16": (None, [_P, _I64, _I64, _I64])},
    "feature_rows": {"feature_rows_bf16": (None, [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _P])},
    "screen_topk": {
        "screen_vnni": (ctypes.c_int, []),
        "screen_block": (_I64, []),
        "screen_packed_bytes": (_I64, [_I64, _I64]),
        "screen_pack_w": (ctypes.c_int, [_P, _I64, _I64, _I64, ctypes.c_int, _P, _P, _P, _I64, _I64]),
        "screen_topk_bf16": (ctypes.c_int, [_P, _I64, _I64, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _P,
                                            _P]),
    },
}
"""Each C source (`<name>.c` beside this file) and its functions' (result, argument) types."""
_PARALLEL: dict[str, tuple[Any, list[Any]]] = {"set_threads": (None, [ctypes.c_int]),
                                               "built_with_openmp": (ctypes.c_int, [])}
"""What every library has from parallel.h."""


@functools.cache
def _lib(name: str) -> ctypes.CDLL | None:
    if not enabled():
        return None
    try:
        lib = ctypes.CDLL(str(_build(_HERE / f"{name}.c")))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"monoscope's C kernels are off, so CPU training runs slower ({e}); install a C compiler "
                      f"(e.g. gcc) or set {NATIVE_ENV}=0 to silence this", RuntimeWarning, stacklevel=2)
        return None
    for fname, (res, args) in {**_SIGNATURES[name], **_PARALLEL}.items():
        fn = getattr(lib, fname)
        fn.restype, fn.argtypes = res, args
    return lib


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="monoscope-native")


_forked = False


def _after_fork_in_child() -> None:
    """A forked child inherits the pool object and the OpenMP runtime's team, but not their threads, and would wait
    on them forever: it makes its own pool and leaves OpenMP alone (libgomp cannot run a parallel region after a
    fork; torch's own ops hang there too)."""
    global _forked
    _forked = True
    _pool.cache_clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _row_parts(n_rows: int) -> list[int]:
    parts = max(1, min(torch.get_num_threads(), n_rows // _MIN_ROWS_PER_THREAD))
    return [n_rows * i // parts for i in range(parts + 1)]


def _in_parts(lib: ctypes.CDLL, n_rows: int, run: Any) -> None:
    """run(lo, hi) over the rows split across threads (ctypes releases the GIL for each call): one call whose row loop
    runs on the OpenMP threads where the library has OpenMP (parallel.h), else a call per part on a thread pool."""
    bounds = _row_parts(n_rows)
    if lib.built_with_openmp() and not _forked:
        lib.set_threads(len(bounds) - 1)
        run(0, n_rows)
        return
    lib.set_threads(1)
    if len(bounds) == 2:
        run(0, n_rows)
    else:
        list(_pool(len(bounds) - 1).map(run, bounds[:-1], bounds[1:]))


def _rows_of(t: Tensor) -> tuple[int, int]:
    return (t.shape[0], t.shape[1]) if t.dim() == 2 else (1, t.numel())


def _f32_rows(*ts: Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                             and t.dim() in (1, 2)) for t in ts)



def row_topk(keys: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """The k largest entries of each row of a 2-D int16 or int32 CPU tensor whose rows are contiguous, as
    (values [B, k], column indices [B, k] int64), each row's entries in increasing column order; ties at the k-th
    value go to the lowest columns. None when the kernel is unavailable or the input is not of that kind."""
    if (keys.device.type != "cpu" or keys.dim() != 2 or keys.dtype not in (torch.int16, torch.int32)
            or keys.stride(1) != 1 or not 0 < k <= keys.shape[1]):
        return None
    lib = _lib("row_topk")
    if lib is None:
        return None
    fn = lib.row_topk_i16 if keys.dtype == torch.int16 else lib.row_topk_i32
    n_rows, n = keys.shape
    values = torch.empty(n_rows, k, dtype=keys.dtype)
    index = torch.empty(n_rows, k, dtype=torch.int64)
    if n_rows == 0:
        return values, index
    size, ld = keys.element_size(), keys.stride(0)
    codes: list[int] = []

    def run(lo: int, hi: int) -> None:
        codes.append(int(fn(keys.data_ptr() + lo * ld * size, hi - lo, n, ld, k,
                            values.data_ptr() + lo * k * size, index.data_ptr() + lo * k * 8)))

    _in_parts(lib, n_rows, run)
    if any(codes):
        raise MemoryError(f"the native row top-k could not allocate its buffers for rows of {n} entries")
    return values, index


def adam_available() -> bool:
    return _lib("adam_rows") is not None


def grad_sumsq(g: Tensor, w: Tensor | None = None) -> tuple[float, Tensor | None]:
    """(Σ of the squared gradient, coef) for a contiguous float32 CPU gradient g [rows, d] (or [n]): with the
    weight w, each row's component along w's row (coef[r] = <g_r, w_r> / |w_r|², returned [rows]) is taken out
    of the sum first, as `SAE.remove_parallel_grads_` takes it out of the gradient. Requires `adam_available()`."""
    lib = _lib("adam_rows")
    assert lib is not None and _f32_rows(g, w)
    n_rows, d = _rows_of(g)
    coef = torch.empty(n_rows, dtype=torch.float32) if w is not None else None
    rowsq = torch.empty(n_rows, dtype=torch.float64)

    def run(lo: int, hi: int) -> None:
        lib.grad_sumsq(g.data_ptr() + lo * d * 4, None if w is None else w.data_ptr() + lo * d * 4,
                       None if coef is None else coef.data_ptr() + lo * 4, rowsq.data_ptr() + lo * 8, hi - lo, d)

    _in_parts(lib, n_rows, run)
    return float(lib.sum_f64(rowsq.data_ptr(), n_rows)), coef


def adam_rows(p: Tensor, g: Tensor, m: Tensor, v: Tensor, coef: Tensor | None, clip: float, *, w1: float, b2: float,
              c2: float, bc2s: float, eps: float, neg_step: float, renorm: bool,
              bf16_out: Tensor | None = None) -> None:
    """One Adam step of p in place (m, v: its exp_avg and exp_avg_sq) with the gradient (g − coef[r]·p_r)·clip,
    each row rescaled to unit norm after when `renorm`. The float scalars are the ones torch's fused CPU Adam
    rounds to float (`monoscope.train.fused_step`). bf16_out: a bf16 [rows, ≥ d] tensor (rows contiguous, a row
    stride of its own) that receives p's updated rows as `.to(torch.bfloat16)` would round them. Requires
    `adam_available()`."""
    lib = _lib("adam_rows")
    assert lib is not None and _f32_rows(p, g, m, v, coef)
    n_rows, d = _rows_of(p)
    bf_ld = 0
    if bf16_out is not None:
        assert (bf16_out.dtype == torch.bfloat16 and bf16_out.device.type == "cpu" and bf16_out.dim() == 2
                and bf16_out.shape[0] == n_rows and bf16_out.shape[1] >= d and bf16_out.stride(1) == 1)
        bf_ld = bf16_out.stride(0)

    def run(lo: int, hi: int) -> None:
        off = lo * d * 4
        lib.adam_rows(p.data_ptr() + off, g.data_ptr() + off, m.data_ptr() + off, v.data_ptr() + off,
                      None if coef is None else coef.data_ptr() + lo * 4, clip, hi - lo, d,
                      w1, b2, c2, bc2s, eps, neg_step, int(renorm),
                      None if bf16_out is None else bf16_out.data_ptr() + lo * bf_ld * 2, bf_ld)

    _in_parts(lib, n_rows, run)


def entry_dots(g: Tensor, w: Tensor, idx: Tensor, offsets: Tensor) -> Tensor | None:
    """[nnz] float32 dot products <g[row_n], w[idx[n]]> (row r owns the entries offsets[r] .. offsets[r + 1] - 1),
    for contiguous bf16 CPU g [B, d] and w [F, d] and int64 idx and offsets. None when the kernel is unavailable or
    the inputs are not of that kind."""
    if not (g.device.type == w.device.type == "cpu" and g.dtype == w.dtype == torch.bfloat16 and g.dim() == w.dim() == 2
            and g.shape[1] == w.shape[1] and g.is_contiguous() and w.is_contiguous() and idx.dtype == offsets.dtype
            == torch.int64 and idx.is_contiguous() and offsets.is_contiguous() and offsets.numel() == g.shape[0]):
        return None
    lib = _lib("entry_dots")
    if lib is None:
        return None
    n_rows, d = g.shape
    nnz = idx.numel()
    out = torch.empty(nnz, dtype=torch.float32)
    if nnz == 0:
        return out

    def run(lo: int, hi: int) -> None:
        lib.entry_dots_bf16(g.data_ptr(), w.data_ptr(), idx.data_ptr(), offsets.data_ptr(), n_rows, nnz, lo, hi, d,
                            out.data_ptr())

    _in_parts(lib, n_rows, run)
    return out


def feature_rows(src: Tensor, v: Tensor, order: Tensor, rows: Tensor, offsets: Tensor) -> Tensor | None:
    """[F, d] float32: out[f] = Σ v[order[n]] · src[rows[n]] over the entries n of feature f (offsets[f] ..
    offsets[f + 1] − 1), for a contiguous bf16 CPU src [B, d], bf16 v [nnz] and int64 order, rows [nnz] and
    offsets [F]. None when the kernel is unavailable or the inputs are not of that kind."""
    if not (src.device.type == v.device.type == "cpu" and src.dtype == v.dtype == torch.bfloat16 and src.dim() == 2
            and src.is_contiguous() and v.is_contiguous() and v.dim() == 1
            and order.dtype == rows.dtype == offsets.dtype == torch.int64 and order.is_contiguous()
            and rows.is_contiguous() and offsets.is_contiguous() and order.numel() == rows.numel() == v.numel()):
        return None
    lib = _lib("feature_rows")
    if lib is None:
        return None
    n_feat, d, nnz = offsets.numel(), src.shape[1], rows.numel()
    out = torch.empty(n_feat, d, dtype=torch.float32)
    if n_feat == 0:
        return out

    def run(lo: int, hi: int) -> None:
        lib.feature_rows_bf16(src.data_ptr(), v.data_ptr(), order.data_ptr(), rows.data_ptr(), offsets.data_ptr(),
                              n_feat, nnz, lo, hi, d, out.data_ptr())

    _in_parts(lib, n_feat, run)
    return out


def relu_topk_rows(x: Tensor, k: int) -> bool:
    """In place: each row of a contiguous bf16 CPU matrix x [rows, n] ReLU'd and cut to its k largest entries (a
    row with at most k positive entries keeps them all; ties at the k-th value go to the lowest columns). False,
    with x untouched, when the kernel is unavailable or x is not of that kind."""
    if not (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 2 and x.is_contiguous() and k > 0
            and x.shape[1] < 2**21):
        return False
    lib = _lib("relu_topk")
    if lib is None:
        return False
    n_rows, n = x.shape

    def run(lo: int, hi: int) -> None:
        lib.relu_topk_rows_bf16(x.data_ptr() + lo * n * 2, hi - lo, n, k)

    _in_parts(lib, n_rows, run)
    return True


def screen_fast() -> bool:
    """Whether the int8 screen of `screen_topk` runs on AVX512-VNNI here (elsewhere it runs as plain C: right, and
    slower than the bf16 product it replaces)."""
    lib = _lib("screen_topk")
    return lib is not None and bool(lib.screen_vnni())


def screen_pack(w: Tensor, d: int, with_bias: bool) -> tuple[Tensor, Tensor, Tensor] | None:
    """The int8 weights of `screen_topk` from a bf16 CPU matrix w [F, ld] whose rows hold the d weights of a feature
    and, when `with_bias`, its bias at column d: (packed bytes, per-feature scales, biases float32; the last two
    padded with 0s to whole blocks of the layout's features). None when the kernel is unavailable or w is not of that
    kind."""
    if not (w.device.type == "cpu" and w.dtype == torch.bfloat16 and w.dim() == 2 and w.stride(1) == 1
            and 0 < d <= w.shape[1] - int(with_bias)):
        return None
    lib = _lib("screen_topk")
    if lib is None:
        return None
    n_feat, ld = w.shape[0], w.stride(0)
    block = int(lib.screen_block())
    n_blocks = -(-n_feat // block)
    packed = torch.empty(int(lib.screen_packed_bytes(n_feat, d)), dtype=torch.uint8)
    scale = torch.empty(n_blocks * block, dtype=torch.float32)  # padded to whole blocks
    bias = torch.empty(n_blocks * block, dtype=torch.float32)
    codes: list[int] = []

    def run(lo: int, hi: int) -> None:
        codes.append(int(lib.screen_pack_w(w.data_ptr(), n_feat, d, ld, int(with_bias), packed.data_ptr(),
                                           scale.data_ptr(), bias.data_ptr(), lo, hi)))

    _in_parts(lib, n_blocks, run)
    if any(codes):
        raise MemoryError(f"the native encoder screen could not allocate its buffers for rows of {d} weights")
    return packed, scale, bias


def screen_topk(x: Tensor, w: Tensor, screen: tuple[Tensor, Tensor, Tensor], d: int, k: int,
                m: int) -> tuple[Tensor, Tensor] | None:
    """Each row's k largest entries of x[:, :d_dot] · w[:, :d_dot]ᵀ (d_dot = w's row length less its padding: the
    common width of x and w), chosen among the m best of an int8 screen of the first d columns (`screen_pack` of
    w): (bf16 values as their int16 order view [B, k], feature indices [B, k] int64, in increasing order). x, w:
    bf16 CPU, rows contiguous. None when the kernel is unavailable or the inputs are not of that kind."""
    n_feat = w.shape[0]
    if not (x.device.type == w.device.type == "cpu" and x.dtype == w.dtype == torch.bfloat16 and x.dim() == w.dim()
            == 2 and x.stride(1) == w.stride(1) == 1 and x.shape[1] == w.shape[1] and 0 < k <= m <= n_feat
            and d <= x.shape[1]):
        return None
    lib = _lib("screen_topk")
    if lib is None:
        return None
    packed, scale, bias = screen
    n_rows, d_dot = x.shape
    values = torch.empty(n_rows, k, dtype=torch.int16)
    index = torch.empty(n_rows, k, dtype=torch.int64)
    codes: list[int] = []

    def run(lo: int, hi: int) -> None:
        codes.append(int(lib.screen_topk_bf16(x.data_ptr() + lo * x.stride(0) * 2, hi - lo, x.stride(0), d,
                                              packed.data_ptr(), scale.data_ptr(), bias.data_ptr(), w.data_ptr(),
                                              w.stride(0), d_dot, n_feat, m, k, values.data_ptr() + lo * k * 2,
                                              index.data_ptr() + lo * k * 8)))

    if n_rows:
        _in_parts(lib, n_rows, run)
    if any(codes):
        raise MemoryError(f"the native encoder screen could not allocate its buffers for {n_feat} features")
    return values, index
