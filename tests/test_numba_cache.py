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


def _input_kinds(vals: np.ndarray, ts: np.ndarray):
    """The same events as callers hand them over: dtypes, layouts and read-only buffers."""
    import pyarrow as pa

    n = len(ts)
    wide = np.repeat(vals, 2, axis=1)
    yield "float32 values, int32 timestamps", vals.astype(np.float32), ts.astype(np.int32), None
    yield "Fortran-order values", np.asfortranarray(vals), ts, None
    yield "strided views", wide[:, ::2], np.repeat(ts, 2)[::2], np.arange(1, n + 1, dtype=np.int32)
    yield ("read-only Arrow buffers", pa.array(vals.ravel()).to_numpy().reshape(vals.shape),
           pa.array(ts).to_numpy(), pa.array(np.arange(1, n + 1)).to_numpy())


def test_detector_inputs_of_every_kind_share_one_kernel_specialisation():
    # Each input kind the detect kernels saw would compile another specialisation of them
    # (a minute or more, cold, and one more cache entry); Detector.process converts at the
    # boundary instead, so every kind scores with the same compiled kernels and numbers.
    import streamrnn.kernels.detect as K
    from streamrnn import Detector, Model

    model = Model.random("gru", n_features=2, hidden=[8], seed=3)
    rng = np.random.default_rng(3)
    ids = [f"s{i % 4}" for i in range(64)]
    vals = rng.standard_normal((64, 2)).astype(np.float32).astype(np.float64)  # float32 loses nothing
    ts = 1_700_000_000_000 + 1000 * np.arange(64, dtype=np.int64)
    reference = Detector(model).process(ids, vals, ts, np.arange(1, 65))
    kernels = (K.detect_batch, K._detect_chunks_parallel)
    before = [list(k.signatures) for k in kernels]
    for kind, v, t, off in _input_kinds(vals, ts):
        assert not (kind.startswith("read-only") and v.flags.writeable)
        got = Detector(model).process(ids, v, t, off)
        np.testing.assert_array_equal(got.score, reference.score, err_msg=kind)
        np.testing.assert_array_equal(got.prediction, reference.prediction, err_msg=kind)
        assert [list(k.signatures) for k in kernels] == before, kind


def test_predict_inputs_of_every_kind_share_one_kernel_specialisation():
    import pyarrow as pa

    import streamrnn.kernels.stream as S
    from streamrnn import Model

    model = Model.random("lstm", n_features=2, hidden=[8], seed=4)
    x = np.random.default_rng(4).standard_normal((2, 30, 2)).astype(np.float32).astype(np.float64)
    reference = model.predict(x)
    kernels = (S.forward_sequences, S._forward_parallel)
    before = [list(k.signatures) for k in kernels]
    kinds = {
        "float32": x.astype(np.float32),
        "Fortran order": np.asfortranarray(x),
        "strided view": np.repeat(x, 2, axis=2)[..., ::2],
        "read-only Arrow buffer": pa.array(x.ravel()).to_numpy().reshape(x.shape),
    }
    for kind, arr in kinds.items():
        np.testing.assert_array_equal(model.predict(arr), reference, err_msg=kind)
        assert [list(k.signatures) for k in kernels] == before, kind


def test_an_unknown_numba_gets_the_threading_layer_started_at_import():
    # The load hook wraps a private Numba method; where its parameters are not the pinned
    # version's, streamrnn leaves it alone and starts the threading layer at import instead,
    # so a cached caller of a parallel kernel still finds it running.
    probe = textwrap.dedent('''
        from numba.core import compiler
        import numba.np.ufunc.parallel as par
        other = classmethod(lambda cls, payload: payload)
        compiler.CompileResult._rebuild = other
        assert not par._is_initialized
        import streamrnn.config  # noqa: F401
        assert compiler.CompileResult.__dict__["_rebuild"] is other, "wrapped a method it does not know"
        assert par._is_initialized, "threading layer not started"
        print("ok")
    ''')
    env = {**os.environ, "PYTHONPATH": str(_REPO)}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
