"""The compiled CPU kernel for SRU's recurrence (sru_kernel.c): built on first use, cached on disk.

The kernel is plain C (no PyTorch headers), so building it takes well under a second with the
system's C compiler. It is built the first time a float32 CPU recurrence runs, never at import,
into ``$CONDCOMP_CACHE`` (default ``~/.cache/condcomp``) under a name that hashes the source, the
compiler flags and this CPU's instruction-set flags, so a stale or foreign build is never loaded.
The write is atomic (a temporary file renamed into place), so concurrent processes are safe.

When there is no compiler, the build fails, or ``CONDCOMP_NATIVE=0`` is set, ``kernel()`` returns
None and the PyTorch path in sru_recurrence.py runs instead (it is also the reference the kernel
is tested against).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("sru_kernel.c")
# -ffast-math lets the compiler use its vectorised expf (libmvec); without it the sigmoid stays
# scalar and the kernel is several times slower. The kernel never relies on inf/NaN comparisons.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared"]
LIBS = ["-lmvec", "-lm"]

_state: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get("CONDCOMP_CACHE", Path.home() / ".cache" / "condcomp"))


def library_path() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + LIBS).encode() + _cpu_flags().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    return cache_dir() / f"sru_kernel-{key}.so"


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE), *LIBS], check=True, capture_output=True, text=True,
                       timeout=60)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{compiler} failed: {e.stderr.strip()[:500]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("CONDCOMP_NATIVE", "1") == "0":
        return None
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"SRU's compiled kernel is unavailable ({e}); using the PyTorch path", stacklevel=3)
        return None
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    common = [i64, i64, i64, ptr, i64, i64, i64, cint, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64]
    lib.sru_forward.argtypes = [*common, ptr, ptr, cint]
    lib.sru_backward.argtypes = [*common, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, cint]
    lib.sru_forward.restype = lib.sru_backward.restype = cint
    return lib


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first call; None when it cannot be had."""
    if "lib" not in _state:
        _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def applies(u: torch.Tensor) -> bool:
    """Whether the kernel can run this recurrence: u float32 or bfloat16 on the CPU, outside tracing."""
    return (u.device.type == "cpu" and u.dtype in (torch.float32, torch.bfloat16) and not torch.jit.is_tracing()
            and type(u) is torch.Tensor)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _operands(u, xs, v, b, c0, real):
    """Layout the kernel needs: u float32 or bfloat16 and everything else float32, channel stride 1
    everywhere, v/b/c0 contiguous, the mask dense uint8."""
    if u.stride(-1) != 1:
        u = u.contiguous()
    xs = xs.float()
    if xs.stride(-1) != 1:
        xs = xs.contiguous()
    v, b, c0 = (a.float().contiguous() for a in (v, b, c0))
    mask = None
    if real is not None:
        mask = real.expand(xs.shape).to(torch.uint8).contiguous()
    return u, xs, v, b, c0, mask


def _args(u, xs, v, b, c0, mask):
    t, batch, _, d = u.shape
    return [t, batch, d, u.data_ptr(), u.stride(0), u.stride(1), u.stride(2), int(u.dtype == torch.bfloat16),
            xs.data_ptr(), xs.stride(0),
            xs.stride(1), v.data_ptr(), b.data_ptr(), c0.data_ptr(), _ptr(mask),
            0 if mask is None else mask.stride(0), 0 if mask is None else mask.stride(1)]


def forward(u, xs, v, b, c0, real):
    """h, cells [T, batch, d] (float32). Shapes as in sru_recurrence."""
    lib = kernel()
    u, xs, v, b, c0, mask = _operands(u, xs, v, b, c0, real)
    h, cells = torch.empty(xs.shape), torch.empty(xs.shape)
    if lib.sru_forward(*_args(u, xs, v, b, c0, mask), h.data_ptr(), cells.data_ptr(), torch.get_num_threads()):
        raise MemoryError("SRU kernel: out of memory for its per-thread state")
    return h, cells


def backward(u, xs, v, b, c0, real, cells, grad_h, grad_c_last):
    """du [T, batch, 3, d] (u's dtype), d_xs [T, batch, d], dv [2, d], db [2, d], dc0 [batch, d] (float32)."""
    lib = kernel()
    u, xs, v, b, c0, mask = _operands(u, xs, v, b, c0, real)
    t, batch, _, d = u.shape
    grad_h = grad_h.float().contiguous()
    grad_c_last = None if grad_c_last is None else grad_c_last.float().contiguous()
    du, d_xs = torch.empty(t, batch, 3, d, dtype=u.dtype), torch.empty(t, batch, d)
    dc0, dv_rows, db_rows = torch.empty(batch, d), torch.empty(batch, 2, d), torch.empty(batch, 2, d)
    if lib.sru_backward(*_args(u, xs, v, b, c0, mask), cells.data_ptr(), grad_h.data_ptr(), _ptr(grad_c_last),
                        du.data_ptr(), d_xs.data_ptr(), dc0.data_ptr(), dv_rows.data_ptr(), db_rows.data_ptr(),
                        torch.get_num_threads()):
        raise MemoryError("SRU kernel: out of memory for its per-thread state")
    return du, d_xs, dv_rows.sum(0), db_rows.sum(0), dc0
