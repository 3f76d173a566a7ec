"""One recurrent step for a single stream row: matrix-vector products, every cell the engine has.

A stream stepped alone (one stream in a micro-batch, a single sequence through ``predict``,
the leftover row of a block) would otherwise run through ``cells.layer_step``'s register
tiles, built for blocks of 24 rows: its one row is packed, padded to a 4-row micro-tile
(3 wasted rows) and swept panel by panel, through calls that each incref and decref every
array they are handed. Here one inlined step per event runs matrix-vector products: the
weights, (K, G*H) with rows contiguous over output columns, are read straight from the
model's arrays (no second layout), the row's inputs straight from the event and state rows
(no packing); 64 columns at a time are summed in 8 vector registers, narrower products
(a GRU's 2H or H columns at H <= 32) in an L1 row, a head's few outputs each in a register.

Numbers: every output element is summed exactly as ``cells.block_product`` sums it (bias,
then the input terms in k order, then the recurrent terms in k order, one fused multiply-add
per term into one accumulator), and the gate updates are ``cells``' own functions. So a
stream's outputs are the same bits whether it was stepped alone or inside a block: they
never depend on batching or interleaving.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit

from streamrnn.config import jit_options
from streamrnn.kernels import cells
from streamrnn.kernels.activations import sigmoid32
from streamrnn.kernels.cells import GRU, LSTM, _stack_f32

_OPTS = jit_options()
# Everything a step calls is inlined into the step (Numba IR inlining): a call between
# jitted functions increfs and decrefs every array argument, atomic operations that drain
# the store buffer, and a step for one row is too short to hide dozens of them.
_INLINE = dict(_OPTS, inline="always")
_U = np.uint64


def _inlined(kernel):
    """``kernel`` of cells.py compiled from its own source, inlined into our steps: the very
    same operations, so the same bits, without a call per gate update."""
    # Not cached on its own (it never runs on its own): its cache entries would share cells'.
    return njit(**dict(_INLINE, cache=False))(kernel.py_func)


_all_zero = _inlined(cells._all_zero)
_gru_gates_after = _inlined(cells._gru_gates_after)
_gru_gates_before = _inlined(cells._gru_gates_before)
_lstm_gates = _inlined(cells._lstm_gates)
_lstm_gates_plain = _inlined(cells._lstm_gates_plain)
_rnn_gates = _inlined(cells._rnn_gates)


@njit(**_INLINE)
def _span64(acc, acc_col, bias, bcol, x, xo, nx, wx, h, ho, nh, wh, col):
    """64 output columns in registers, as 4 groups of 16 (the shape of ``cells._panel``'s
    tile, which LLVM vectorises into 8 vector accumulators; a flat 64-column loop is
    unrolled to scalars first and spills). One accumulator per column, summed in
    ``_panel``'s order; the columns are independent FMA chains that overlap."""
    t = carray(_stack_f32(64), (4, 16))
    for g in range(4):
        for j in range(16):
            t[g, j] = bias[_U(bcol + 16 * g + j)]
    for k in range(nx):
        v = x[_U(xo + k)]
        wk = wx[k]
        for j in range(16):
            t[0, j] += v * wk[_U(col + j)]
            t[1, j] += v * wk[_U(col + 16 + j)]
            t[2, j] += v * wk[_U(col + 32 + j)]
            t[3, j] += v * wk[_U(col + 48 + j)]
    for k in range(nh):
        v = h[_U(ho + k)]
        wk = wh[k]
        for j in range(16):
            t[0, j] += v * wk[_U(col + j)]
            t[1, j] += v * wk[_U(col + 16 + j)]
            t[2, j] += v * wk[_U(col + 32 + j)]
            t[3, j] += v * wk[_U(col + 48 + j)]
    for g in range(4):
        for j in range(16):
            acc[_U(acc_col + 16 * g + j)] = t[g, j]


@njit(**_INLINE)
def _axpy_cols(acc, acc_col, bias, bcol, x, xo, nx, wx, h, ho, nh, wh, col, ncols):
    """``ncols`` columns accumulated in acc itself, one vectorised row update per term
    (for widths below 64: the accumulators stay in L1, same order of terms)."""
    a = acc[_U(acc_col):_U(acc_col + ncols)]
    for j in range(ncols):
        a[j] = bias[_U(bcol + j)]
    for k in range(nx):
        v = x[_U(xo + k)]
        wk = wx[k, _U(col):_U(col + ncols)]
        for j in range(ncols):
            a[j] += v * wk[j]
    for k in range(nh):
        v = h[_U(ho + k)]
        wk = wh[k, _U(col):_U(col + ncols)]
        for j in range(ncols):
            a[j] += v * wk[j]


@njit(**_INLINE)
def _column(acc, acc_col, bias, bcol, x, xo, nx, wx, h, ho, nh, wh, col):
    """One output column in a register (a head with a few outputs, the last columns)."""
    s = bias[_U(bcol)]
    for k in range(nx):
        s += x[_U(xo + k)] * wx[k, _U(col)]
    for k in range(nh):
        s += h[_U(ho + k)] * wh[k, _U(col)]
    acc[_U(acc_col)] = s


@njit(**_INLINE)
def matvec(acc, acc_col, bias, bcol, x, xo, nx, wx, h, ho, nh, wh, col, ncols):
    """acc[acc_col:+ncols] = bias[bcol:+ncols] + x[xo:+nx] @ wx[:nx, col:+ncols]
    + h[ho:+nh] @ wh[:nh, col:+ncols] (nx or nh may be 0), summed as ``block_product`` sums."""
    j = 0
    while j + 64 <= ncols:
        _span64(acc, acc_col + j, bias, bcol + j, x, xo, nx, wx, h, ho, nh, wh, col + j)
        j += 64
    rest = ncols - j
    if rest >= 8:
        _axpy_cols(acc, acc_col + j, bias, bcol + j, x, xo, nx, wx, h, ho, nh, wh, col + j, rest)
    else:
        while j < ncols:
            _column(acc, acc_col + j, bias, bcol + j, x, xo, nx, wx, h, ho, nh, wh, col + j)
            j += 1


@njit(**_INLINE)
def layer_row(cell, reset_after, x, xo, nx, state, rows, off, hsz, wx, wh, b, bhn, peep, acc, accn, rh):
    """Advance one layer of the single row rows[0] in place: ``cells.layer_step`` with rn=1,
    its products as matrix-vector products (one call site each, to keep the code small).

    x[xo:xo+nx] is the layer input (the event row for the first layer, the state row for
    the layers above); acc (>= 1, G*H), accn (>= 1, H) and rh (>= H) are scratch.
    """
    row = state[rows[0]]
    a = acc[0]
    # The products over input and recurrent units: GRU r and z, all four LSTM gates, RNN.
    n_rec = 2 * hsz if cell == GRU else (4 * hsz if cell == LSTM else hsz)
    matvec(a, 0, b, 0, x, xo, nx, wx, row, off, hsz, wh, 0, n_rec)
    if cell == GRU:
        h2 = 2 * hsz
        matvec(a, h2, b, h2, x, xo, nx, wx, row, off, 0, wh, h2, hsz)  # n gate, input part
        hv = row
        ho = off
        if not reset_after:
            # Cho et al.: the n gate's recurrent product sees r * h instead of h.
            for k in range(hsz):
                rh[k] = sigmoid32(a[k]) * row[_U(off + k)]
            hv = rh
            ho = 0
        matvec(accn[0], 0, bhn, 0, x, xo, 0, wx, hv, ho, hsz, wh, h2, hsz)
        if reset_after:
            _gru_gates_after(1, state, rows, off, hsz, acc, accn)
        else:
            _gru_gates_before(1, state, rows, off, hsz, acc, accn)
    elif cell == LSTM:
        if _all_zero(peep):
            _lstm_gates_plain(1, state, rows, off, hsz, acc)
        else:
            _lstm_gates(1, state, rows, off, hsz, acc, peep)
    else:
        _rnn_gates(cell, 1, state, rows, off, hsz, acc)


@njit(**_INLINE)
def _step(x, xo, state, rows, pred, cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep,
          wo, bo, acc, accn, rh):
    """Step the stream of state row rows[0] on x[xo:xo+D] through every layer, then store the
    head's prediction in pred[rows[0]]."""
    row = state[rows[0]]
    src = x
    so = xo
    for layer in range(hidden.shape[0]):
        if layer > 0:
            src = row
            so = offsets[layer - 1]
        layer_row(cell, reset_after, src, so, wx[layer].shape[0], state, rows, offsets[layer],
                  hidden[layer], wx[layer], wh[layer], b[layer], bhn[layer], peep[layer], acc, accn, rh)
    top = hidden.shape[0] - 1
    matvec(pred[rows[0]], 0, bo, 0, row, offsets[top], hidden[top], wo, row, 0, 0, wo, 0, wo.shape[1])


#: What ``step_stream`` writes to ``out[e]``: the prediction stored before the step (score,
#: then step), the one the step made (a whole-sequence forward), or nothing (a block's row).
OUT_BEFORE, OUT_AFTER, OUT_NONE = 0, 1, 2


@njit(**_OPTS)
def step_stream(ev, rows, xs, xo, state, pred, out, mode, cell, reset_after, hidden, offsets,
                wx, wh, b, bhn, peep, wo, bo, acc, accn, rh):
    """Step the one stream of state row rows[0] on xs[e, xo:] for e in ev, in that order.

    ``mode`` says what out[e] receives (OUT_BEFORE, OUT_AFTER or OUT_NONE). The single entry
    point for every one-row step: ``_step`` is inlined once here, not once per caller (each
    inlined copy costs half a minute of cold compilation)."""
    s = rows[0]
    for i in range(ev.shape[0]):
        e = ev[i]
        if mode == OUT_BEFORE:
            for j in range(pred.shape[1]):
                out[e, j] = pred[s, j]
        _step(xs[e], xo, state, rows, pred, cell, reset_after, hidden, offsets, wx, wh, b, bhn,
              peep, wo, bo, acc, accn, rh)
        if mode == OUT_AFTER:
            for j in range(pred.shape[1]):
                out[e, j] = pred[s, j]
