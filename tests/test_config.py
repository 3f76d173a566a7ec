"""Compile-option settings read from the environment at import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _panel_in_subprocess(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STREAMRNN_PANEL": value}
    code = "import streamrnn.config as c; print(c.PANEL)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("value", ["16", "32"])
def test_panel_override_is_taken(value):
    done = _panel_in_subprocess(value)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == value


@pytest.mark.parametrize("value", ["abc", "24", ""])
def test_bad_panel_warns_and_keeps_the_host_width(value):
    # A tuning knob must never stop the library from importing: it warns and uses the default.
    default = subprocess.run([sys.executable, "-c", "import streamrnn.config as c; print(c._panel_width())"],
                             env={k: v for k, v in os.environ.items() if k != "STREAMRNN_PANEL"},
                             capture_output=True, text=True, check=True).stdout.strip()
    done = _panel_in_subprocess(value)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == default
    assert "STREAMRNN_PANEL must be 16 or 32" in done.stderr


def _kernel_pair(module: str):
    """A callee whose __module__ is ``module`` and a caller passing it literal constants."""
    from numba import njit

    def callee(a, b):
        return a + b

    callee.__module__ = module
    callee = njit(callee)

    @njit
    def caller(x):
        return callee(x, 0) + callee(x, 1) + callee(x, x)

    return caller, callee


def test_calls_between_package_kernels_compile_once_per_plain_argument_type():
    # Numba compiles a callee once per literal argument at a jitted call site; within
    # streamrnn that multiplied whole step kernels (minutes of cold compilation), so calls
    # to the package's kernels are typed by plain types: one specialisation serves all.
    import streamrnn.config  # noqa: F401  (installs the rule)
    from numba import types

    caller, callee = _kernel_pair("streamrnn.kernels.probe")
    assert caller(3) == 3 + 4 + 6
    assert callee.signatures == [(types.int64, types.int64)]
    # Outside the package Numba's own rule stands (literal specialisations).
    caller, callee = _kernel_pair("elsewhere")
    assert caller(3) == 13
    assert len(callee.signatures) == 3


def test_kernel_weight_tuples_have_one_type_for_every_depth_up_to_four():
    # A tuple's length is part of its Numba type: the per-layer weights are padded so that
    # models of 1 to 4 layers share one compiled step; deeper ones keep their own length.
    import numba

    from streamrnn import Model
    from streamrnn.model import LAYER_SLOTS

    def kernel_types(hidden):
        return [numba.typeof(a) for a in Model.random(cell="lstm", n_features=2, hidden=hidden).packed.kernel_args()]

    assert LAYER_SLOTS == 4
    assert kernel_types([8]) == kernel_types([8, 5, 7, 3]) == kernel_types([16, 16])
    deep = Model.random(cell="gru", n_features=2, hidden=[4] * 5).packed
    assert [len(t) for t in deep.kernel_args()[4:9]] == [5] * 5
    assert all(w is p for w, p in zip(deep.wx, deep.kernel_args()[4]))


def test_on_first_compile_fires_once_and_only_for_a_compile():
    from numba import njit

    from streamrnn.compiling import on_first_compile

    @njit(cache=False)
    def add(a, b):
        return a + b

    calls = []
    with on_first_compile(lambda: calls.append(1)):
        pass
    assert calls == []
    with on_first_compile(lambda: calls.append(1)):
        add(1, 2)
        add(1.0, 2.0)  # a second compile in the same block says nothing more
    assert calls == [1]
    with on_first_compile(lambda: calls.append(2)):
        add(3, 4)  # compiled already: nothing to say
    assert calls == [1]
