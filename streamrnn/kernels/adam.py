"""The Adam update as one Numba pass over the parameters (the state lives in optim.Adam)."""

from __future__ import annotations

import numpy as np
from numba import njit

from streamrnn.config import jit_options


@njit(**dict(jit_options(), fastmath=False))  # strict IEEE: no fused multiply-adds
def adam_update(theta, grad, m, v, beta1, beta2, eps, step, c2):
    """theta -= step * m / (sqrt(v / c2) + eps) after m, v take in grad; strict IEEE, the
    same operations as ``torch.optim.Adam`` (``step`` is lr / (1 - beta1^t), ``c2`` 1 - beta2^t)."""
    b1 = 1.0 - beta1
    b2 = 1.0 - beta2
    for i in range(theta.shape[0]):
        g = grad[i]
        mi = m[i] * beta1 + b1 * g
        vi = v[i] * beta2 + b2 * g * g
        m[i] = mi
        v[i] = vi
        theta[i] -= step * mi / (np.sqrt(vi / c2) + eps)
