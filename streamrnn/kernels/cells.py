"""One recurrent step for a block of rows (streams), every cell the engine has.

Layout follows PyTorch: gate blocks stacked along the output axis, LSTM (i, f, g, o), GRU
(r, z, n). Weights arrive pre-transposed, ``wx`` (D_in, G*H) and ``wh`` (H, G*H), so the
innermost loop runs over contiguous output columns and vectorises.

Every output element is accumulated in one fixed order (bias, then input features, then
recurrent units, each in index order), whatever the number of rows in the block. That is
what makes a stream's numbers independent of how its events were batched or interleaved.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streamrnn.config import jit_options
from streamrnn.kernels.activations import relu32, sigmoid32, tanh32

RNN_TANH = 0
RNN_RELU = 1
LSTM = 2
GRU = 3

_OPTS = jit_options()
_ONE = np.float32(1.0)  # a bare 1 would promote the gate maths to float64


@njit(**_OPTS)
def _init_bias(acc, rn, b, ncols):
    for r in range(rn):
        for j in range(ncols):
            acc[r, j] = b[j]


@njit(**_OPTS)
def _accumulate_rows(acc, rn, src, rows, col0, w, ncols):
    """acc[r, :ncols] += src[rows[r], col0:col0+K] @ w[:, :ncols] for r < rn."""
    for k in range(w.shape[0]):
        for r in range(rn):
            v = src[rows[r], col0 + k]
            for j in range(ncols):
                acc[r, j] += v * w[k, j]


@njit(**_OPTS)
def _accumulate_gru_recurrent(acc, accn, rn, state, rows, off, wh, hsz):
    """Recurrent part of a GRU with the reset gate after the product (PyTorch)."""
    h2 = 2 * hsz
    for k in range(hsz):
        for r in range(rn):
            v = state[rows[r], off + k]
            for j in range(h2):
                acc[r, j] += v * wh[k, j]
            for j in range(hsz):
                accn[r, j] += v * wh[k, h2 + j]


@njit(**_OPTS)
def _accumulate_reset_hidden(accn, rn, rh, wh, hsz):
    """accn += (r * h) @ W_hn: the reset-before-product GRU (Cho et al., Keras reset_after=False)."""
    h2 = 2 * hsz
    for k in range(hsz):
        for r in range(rn):
            v = rh[r, k]
            for j in range(hsz):
                accn[r, j] += v * wh[k, h2 + j]


@njit(**_OPTS)
def layer_step(cell, reset_after, rn, src, src_rows, src_col, state, rows, off, hsz,
               wx, wh, b, bhn, peep, acc, accn, rh):
    """Advance one layer for ``rn`` rows in place.

    src[src_rows[r], src_col:src_col+D_in] is the layer input of row r (the events for the
    first layer, the state row of the layer below otherwise); state[rows[r], off:off+H] is
    h and, for LSTM, state[rows[r], off+H:off+2H] is c. acc, accn and rh are scratch.
    """
    if cell == GRU:
        h2 = 2 * hsz
        _init_bias(acc, rn, b, 3 * hsz)
        _accumulate_rows(acc, rn, src, src_rows, src_col, wx, 3 * hsz)
        _init_bias(accn, rn, bhn, hsz)
        if reset_after:
            _accumulate_gru_recurrent(acc, accn, rn, state, rows, off, wh, hsz)
        else:
            _accumulate_rows(acc, rn, state, rows, off, wh, h2)
            for r in range(rn):
                s = rows[r]
                for j in range(hsz):
                    rh[r, j] = sigmoid32(acc[r, j]) * state[s, off + j]
            _accumulate_reset_hidden(accn, rn, rh, wh, hsz)
        for r in range(rn):
            s = rows[r]
            for j in range(hsz):
                rg = sigmoid32(acc[r, j])
                zg = sigmoid32(acc[r, hsz + j])
                if reset_after:
                    ng = tanh32(acc[r, h2 + j] + rg * accn[r, j])
                else:
                    ng = tanh32(acc[r, h2 + j] + accn[r, j])
                h = state[s, off + j]
                state[s, off + j] = (_ONE - zg) * ng + zg * h
    elif cell == LSTM:
        g4 = 4 * hsz
        _init_bias(acc, rn, b, g4)
        _accumulate_rows(acc, rn, src, src_rows, src_col, wx, g4)
        _accumulate_rows(acc, rn, state, rows, off, wh, g4)
        offc = off + hsz
        for r in range(rn):
            s = rows[r]
            for j in range(hsz):
                c = state[s, offc + j]
                ig = sigmoid32(acc[r, j] + peep[0, j] * c)
                fg = sigmoid32(acc[r, hsz + j] + peep[1, j] * c)
                gg = tanh32(acc[r, 2 * hsz + j])
                cn = fg * c + ig * gg
                og = sigmoid32(acc[r, 3 * hsz + j] + peep[2, j] * cn)
                state[s, offc + j] = cn
                state[s, off + j] = og * tanh32(cn)
    else:
        _init_bias(acc, rn, b, hsz)
        _accumulate_rows(acc, rn, src, src_rows, src_col, wx, hsz)
        _accumulate_rows(acc, rn, state, rows, off, wh, hsz)
        for r in range(rn):
            s = rows[r]
            for j in range(hsz):
                if cell == RNN_RELU:
                    state[s, off + j] = relu32(acc[r, j])
                else:
                    state[s, off + j] = tanh32(acc[r, j])


@njit(**_OPTS)
def head_step(rn, state, rows, off, wo, bo, out, out_rows):
    """out[out_rows[r], :] = state[rows[r], off:off+H] @ wo + bo (the linear head)."""
    n_out = wo.shape[1]
    for r in range(rn):
        o = out_rows[r]
        for j in range(n_out):
            out[o, j] = bo[j]
    for k in range(wo.shape[0]):
        for r in range(rn):
            v = state[rows[r], off + k]
            o = out_rows[r]
            for j in range(n_out):
                out[o, j] += v * wo[k, j]
