"""Vectorisable float32 activations.

There is no SVML on the target machines, so ``np.tanh``/``np.exp`` inside a loop are scalar
calls that stop LLVM from vectorising the gate loops. These use only multiply, add, divide and
min/max, so they vectorise; they stay within 5e-7 (a few float32 ulp) of the exact functions (tested), well
inside the 1e-5 parity the engine promises against PyTorch.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streamrnn.config import jit_options

_OPTS = dict(jit_options(), inline="always")

# Rational minimax approximation of tanh on [-c, c] (the one Eigen uses for float);
# beyond c, tanh(x) rounds to +-1 in float32.
_CLAMP = np.float32(7.90531110763549805)
_A1 = np.float32(4.89352455891786e-03)
_A3 = np.float32(6.37261928875436e-04)
_A5 = np.float32(1.48572235717979e-05)
_A7 = np.float32(5.12229709037114e-08)
_A9 = np.float32(-8.60467152213735e-11)
_A11 = np.float32(2.00018790482477e-13)
_A13 = np.float32(-2.76076847742355e-16)
_B0 = np.float32(4.89352518554385e-03)
_B2 = np.float32(2.26843463243900e-03)
_B4 = np.float32(1.18534705686654e-04)
_B6 = np.float32(1.19825839466702e-06)
_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)


@njit(**_OPTS)
def tanh32(x):
    """tanh for a float32 scalar, branch-free so loops over it vectorise."""
    x = min(max(x, -_CLAMP), _CLAMP)
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    p = x * p
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return p / q


@njit(**_OPTS)
def sigmoid32(x):
    """Logistic function via the identity sigmoid(x) = (1 + tanh(x / 2)) / 2."""
    return _HALF * tanh32(_HALF * x) + _HALF


@njit(**_OPTS)
def relu32(x):
    return max(x, _ZERO)
