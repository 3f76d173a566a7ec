"""Numba compilation options, in one place (kernels never hard-code them).

Every option can be overridden by an environment variable before import, e.g.
``STREAMRNN_FASTMATH=0`` to compile strict IEEE kernels while debugging.
"""

from __future__ import annotations

import os


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in {"0", "false", "no", "off", ""}


#: Fast-math flags for the kernels. "contract" lets LLVM fuse multiply-add (FMA) and the
#: others drop NaN/inf/signed-zero bookkeeping. "reassoc" is left out on purpose: it would let
#: the compiler reorder sums differently in differently shaped loops, and then a stream's
#: result could depend on how its events were batched.
FASTMATH: set[str] | bool = (
    {"contract", "arcp", "nsz", "afn"} if _flag("STREAMRNN_FASTMATH", True) else False
)

#: Parallelise over streams with ``prange``.
PARALLEL: bool = _flag("STREAMRNN_PARALLEL", True)

#: Keep compiled kernels on disk (NUMBA_CACHE_DIR decides where).
CACHE: bool = _flag("STREAMRNN_CACHE", True)

#: NumPy error model: no per-division zero checks, so inner loops vectorise.
ERROR_MODEL: str = "numpy"

#: Rows processed together by one thread in the step kernels: each weight row loaded
#: from cache is reused for this many streams.
ROW_BLOCK: int = int(os.environ.get("STREAMRNN_ROW_BLOCK", "4"))


def jit_options(parallel: bool = False) -> dict:
    """Keyword arguments for ``numba.njit`` used by every kernel."""
    return {
        "cache": CACHE,
        "fastmath": FASTMATH,
        "error_model": ERROR_MODEL,
        "parallel": PARALLEL and parallel,
        "nogil": True,
    }
