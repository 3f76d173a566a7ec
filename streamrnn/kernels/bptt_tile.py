"""The trainer's matrix products in the 6 x 16 assembly tile (:mod:`streamrnn.kernels.microtile`).

``set_product`` computes ``out = bias + a @ wa + b @ wb`` for a block of rows: the forward
gate products (bias = the gate biases), and, with a zero bias, the products that start
from zero (gradients to h_{t-1} through W_hh, to a layer's input through W_ih, and the
weight gradients, whose output rows start at zero in every block's gradient row).

Numbers: each output is its bias, then the ``a`` terms in k order, then the ``b`` terms in
k order, one fused multiply-add each, in the assembly tile and in the Numba tiles
(:func:`streamrnn.kernels.tiles.gemm_acc` after writing the bias) alike: the same bits
whichever runs. The assembly takes float32 operands whose rows are contiguous and whole
16-column panels of 6-row tiles; everything else (float64 for the gradient tests, hosts
without AVX2/FMA, leftover rows and columns) runs in the Numba tiles.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streamrnn.config import jit_options
from streamrnn.kernels import microtile
from streamrnn.kernels.tiles import gemm_acc

_OPTS = jit_options()
_U = np.uint64  # unsigned indices: no negative-index wraparound in the copy loop


@njit(**_OPTS)
def _asm_ok(out, bias, a, wa, b, wb):
    """True when the assembly tile may read and write these arrays (float32, rows contiguous)."""
    return (out.itemsize == 4 and out.strides[1] == 4 and bias.strides[0] == 4
            and a.strides[1] == 4 and wa.strides[1] == 4
            and b.strides[1] == 4 and wb.strides[1] == 4)


@njit(**_OPTS)
def tile_rows(m):
    """Rows of ``m`` the 6-row assembly tiles take: the rest (0 to 5) go to 4-row Numba tiles,
    so 6k+2 rows leave 8 (two 4-row tiles) rather than 2 (two one-row strips)."""
    n6 = m // microtile.ROWS
    rest = m - n6 * microtile.ROWS
    if (rest == 2 or rest == 1) and n6 > 0:
        n6 -= 1
    return n6 * microtile.ROWS


@njit(**_OPTS)
def _set_numba(out, oi, oj, m, n, bias, boff, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb):
    for r in range(m):
        row = out[oi + r, oj:oj + n]
        for j in range(n):
            row[j] = bias[boff + j]
    gemm_acc(out, oi, oj, m, n, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb)


@njit(**_OPTS)
def _set_asm(out, oi, oj, m6, n16, bias, boff, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb):
    """Rows oi..oi+m6 (a multiple of 6), columns oj..oj+n16 (a multiple of 16) in assembly."""
    ldo = out.strides[0]
    lda = a.strides[0]
    ldb = b.strides[0]
    o0 = microtile.address(out) + oi * ldo + 4 * oj
    b0 = microtile.address(bias) + 4 * boff
    a0 = microtile.address(a) + ai * lda + 4 * ak
    bb0 = microtile.address(b) + bi * ldb + 4 * bk
    wa0 = microtile.address(wa) + wak * wa.strides[0] + 4 * waj
    wb0 = microtile.address(wb) + wbk * wb.strides[0] + 4 * wbj
    # Column panels outermost: a panel of the weights (k x 16) stays in cache for every row tile.
    for j in range(0, n16, microtile.COLS):
        for r in range(0, m6, microtile.ROWS):
            microtile.tile6x16(b0 + 4 * j, o0 + r * ldo + 4 * j, ldo, a0 + r * lda, lda,
                               wa0 + 4 * j, wa.strides[0], ka, bb0 + r * ldb, ldb,
                               wb0 + 4 * j, wb.strides[0], kb)


@njit(**_OPTS)
def set_product(out, oi, oj, m, n, bias, boff, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb):
    """out[oi:+m, oj:+n] = bias[boff:+n] + a[ai:+m, ak:+ka] @ wa[wak:+ka, waj:+n]
    + b[bi:+m, bk:+kb] @ wb[wbk:+kb, wbj:+n] (kb may be 0); ``a`` and ``b`` may be
    transposed views (then the Numba tiles run)."""
    if not (microtile.AVAILABLE and _asm_ok(out, bias, a, wa, b, wb)):
        _set_numba(out, oi, oj, m, n, bias, boff, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb)
        return
    m6 = tile_rows(m)
    n16 = n // microtile.COLS * microtile.COLS
    if m6 > 0 and n16 > 0:
        _set_asm(out, oi, oj, m6, n16, bias, boff, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb)
    else:
        m6 = 0
        n16 = 0
    if m6 < m:  # rows below the assembly tiles, every column
        _set_numba(out, oi + m6, oj, m - m6, n, bias, boff, a, ai + m6, ak, wa, wak, waj, ka,
                   b, bi + m6, bk, wb, wbk, wbj, kb)
    if n16 < n and m6 > 0:  # columns right of the last whole panel, the assembly tiles' rows
        _set_numba(out, oi, oj + n16, m6, n - n16, bias, boff + n16, a, ai, ak, wa, wak, waj + n16, ka,
                   b, bi, bk, wb, wbk, wbj + n16, kb)


@njit(**_OPTS)
def transpose_rows(dst, d0, src, s0, m, k):
    """dst[d0:d0+k, :m] = src[s0:s0+m, :k].T: a weight gradient's rows (the activations'
    columns) contiguous along the (step, window) index the product sums over."""
    for p in range(m):
        row = src[s0 + p]
        for j in range(k):
            dst[d0 + j, p] = row[j]


@njit(**_OPTS)
def _pack_panel(panel, b, bj, m):
    """panel[:m, :16] = b[:m, bj:bj+16]: the product reads one contiguous 64-byte row per k
    (rows of ``b`` itself are 1 KB apart for LSTM64, so a panel of them maps to a few L1
    sets and is read from L2)."""
    for p in range(m):
        for j in range(microtile.COLS):
            panel[_U(p), _U(j)] = b[_U(p), _U(bj + j)]


@njit(**_OPTS)
def gradient_product(out, oi, oj, k, n, zero, at, ai, b, bj, m, panel):
    """out[oi:+k, oj:+n] = at[ai:+k, :m] @ b[:m, bj:+n] (a weight gradient, ``at`` the
    activations transposed), in panels of 16 columns of ``b`` packed into ``panel`` (at least
    (m, 16)); ``zero`` holds at least n zeros."""
    j = 0
    if microtile.AVAILABLE and _asm_ok(out, zero, at, b, at, b):
        while j + microtile.COLS <= n:
            _pack_panel(panel, b, bj + j, m)
            set_product(out, oi, oj + j, k, microtile.COLS, zero, 0, at, ai, 0, panel, 0, 0, m,
                        at, ai, 0, panel, 0, 0, 0)
            j += microtile.COLS
    if j < n:
        set_product(out, oi, oj + j, k, n - j, zero, 0, at, ai, 0, b, 0, bj + j, m, at, ai, 0, b, 0, 0, 0)
