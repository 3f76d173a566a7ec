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


@njit(**dict(jit_options(), fastmath=False))
def adam_update_both(theta, grad, factor, m, v, beta1, beta2, eps, step, c2, theta32):
    """:func:`adam_update` with ``grad * factor`` (the clipped gradient), writing the updated
    weights' float32 copy to ``theta32`` too (the training step transposes it into the
    gradient kernels' layout), so no step converts the weights separately."""
    b1 = 1.0 - beta1
    b2 = 1.0 - beta2
    for i in range(theta.shape[0]):
        g = grad[i] * factor
        mi = m[i] * beta1 + b1 * g
        vi = v[i] * beta2 + b2 * g * g
        m[i] = mi
        v[i] = vi
        t = theta[i] - step * mi / (np.sqrt(vi / c2) + eps)
        theta[i] = t
        theta32[i] = np.float32(t)
