"""Numba's on-disk cache across processes: a cached kernel that reaches a parallel region
must start the threading layer when it loads, however its callee got into the cache.

Each case runs three fresh processes on one temporary cache: the first compiles a parallel
kernel, the second compiles a plain kernel calling it (so the callee comes from the cache),
the third loads that caller from the cache and runs it before any other parallel code. With
plain Numba 0.68 the third one segfaults (numba#8578): streamrnn's kernels are all plain
callers of parallel ones (step_events, detect_batch, train_step, ...).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

_REPO = Path(__file__).resolve().parents[1]

_KERNELS = '''
from numba import njit, prange

@njit(parallel=True, cache=True)
def inner(a, out):
    for i in prange(a.shape[0]):
        out[i] = a[i] * 2.0 + 1.0
    return out

@njit(cache=True)
def outer(a, out):
    return inner(a, out)
'''

# argv: kernel to run (inner/outer), "streamrnn" to import streamrnn.config first.
_RUN = '''
import sys
import numpy as np
if sys.argv[2] == "streamrnn":
    import streamrnn.config  # noqa: F401
import numba.np.ufunc.parallel as par
import kernels_probe
assert not par._is_initialized, "the threading layer started before the kernel ran"
a = np.arange(7, dtype=np.float64)
out = getattr(kernels_probe, sys.argv[1])(a, np.empty(7))
print(" ".join(repr(float(v)) for v in out))
'''


def _run(tmp_path: Path, kernel: str, with_streamrnn: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(_REPO)])}
    return subprocess.run([sys.executable, str(tmp_path / "run.py"), kernel, "streamrnn" if with_streamrnn else "-"],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "streamrnn_in",
    [
        # The cache written by plain Numba (the caller recorded no reload action): the
        # library's code names the threading layer, so streamrnn starts it on load.
        (False, False, True),
        # Written with streamrnn loaded: the caller records the action itself, so even a
        # process without streamrnn's fix loads it safely.
        (True, True, False),
    ],
    ids=["cache-from-plain-numba", "cache-from-streamrnn"],
)
def test_cached_caller_of_a_parallel_kernel_starts_the_threading_layer(tmp_path, streamrnn_in):
    (tmp_path / "kernels_probe.py").write_text(textwrap.dedent(_KERNELS))
    (tmp_path / "run.py").write_text(textwrap.dedent(_RUN))
    expected = " ".join(repr(float(v)) for v in np.arange(7.0) * 2.0 + 1.0)
    for kernel, with_streamrnn in zip(["inner", "outer", "outer"], streamrnn_in):
        done = _run(tmp_path, kernel, with_streamrnn)
        assert done.returncode == 0, f"{kernel} (streamrnn={with_streamrnn}) exited {done.returncode}: {done.stderr}"
        assert done.stdout.strip() == expected
    # The third process loaded the caller from the cache rather than compiling it again.
    assert len(list((tmp_path / "cache").rglob("kernels_probe.outer-*.nbc"))) == 1
