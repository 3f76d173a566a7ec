"""The trainer's matrix products in the 6 x 16 assembly tile (:mod:`streamrnn.kernels.microtile`).

``set_product`` computes ``out = bias + a @ wa + b @ wb`` for a block of rows: the forward
gate products (bias = the gate biases), and, with a zero bias, the products that start
from zero (gradients to h_{t-1} through W_hh, to a layer's input through W_ih, and the
weight gradients, whose output rows start at zero in every block's gradient row).

Numbers: each output is its bias, then the ``a`` terms in k order, then the ``b`` terms in
k order, one fused multiply-add each, in the assembly tile and in the Numba tiles
(:func:`streamrnn.kernels.tiles.gemm_acc` after writing the bias) alike: the same bits
whichever runs. The assembly takes float32 operands whose rows are contiguous, at least 6
rows and whole 16-column panels; everything else (float64 for the gradient tests, hosts
without AVX2/FMA, fewer than 6 rows, columns right of the last panel) runs in the Numba tiles.
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
def _set_numba(out, oi, oj, m, n, bias, boff, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb):
    for r in range(m):
        row = out[oi + r, oj:oj + n]
        for j in range(n):
            row[j] = bias[boff + j]
    gemm_acc(out, oi, oj, m, n, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb)


@njit(**_OPTS)
def _set_asm(out, oi, oj, m, n16, bias, boff, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb):
    """Rows oi..oi+m (m >= 6), columns oj..oj+n16 (a multiple of 16) in assembly. When m is
    not a multiple of 6 the last tile is the one ending at row m, over rows an earlier tile
    already wrote: it writes them again with the same bits (the same terms in the same order),
    cheaper than Numba tiles for the rest (a 65-row weight gradient: 263 -> 211 us)."""
    ldo = out.strides[0]
    lda = a.strides[0]
    ldb = b.strides[0]
    o0 = microtile.address(out) + oi * ldo + 4 * oj
    b0 = microtile.address(bias) + 4 * boff
    a0 = microtile.address(a) + ai * lda + 4 * ak
    bb0 = microtile.address(b) + bi * ldb + 4 * bk
    wa0 = microtile.address(wa) + wak * wa.strides[0] + 4 * waj
    wb0 = microtile.address(wb) + wbk * wb.strides[0] + 4 * wbj
    last = m - microtile.ROWS
    # Column panels outermost: a panel of the weights (k x 16) stays in cache for every row tile.
    for j in range(0, n16, microtile.COLS):
        r = 0
        while r < m:
            r = min(r, last)
            microtile.tile6x16(b0 + 4 * j, o0 + r * ldo + 4 * j, ldo, a0 + r * lda, lda,
                               wa0 + 4 * j, wa.strides[0], ka, bb0 + r * ldb, ldb,
                               wb0 + 4 * j, wb.strides[0], kb)
            r += microtile.ROWS


@njit(**_OPTS)
def set_product(out, oi, oj, m, n, bias, boff, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb):
    """out[oi:+m, oj:+n] = bias[boff:+n] + a[ai:+m, ak:+ka] @ wa[wak:+ka, waj:+n]
    + b[bi:+m, bk:+kb] @ wb[wbk:+kb, wbj:+n] (kb may be 0); ``a`` and ``b`` may be
    transposed views (then the Numba tiles run). ``out`` must not overlap the operands."""
    n16 = n // microtile.COLS * microtile.COLS
    if not (microtile.AVAILABLE and _asm_ok(out, bias, a, wa, b, wb)) or m < microtile.ROWS or n16 == 0:
        _set_numba(out, oi, oj, m, n, bias, boff, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb)
        return
    _set_asm(out, oi, oj, m, n16, bias, boff, a, ai, ak, wa, wak, waj, ka, b, bi, bk, wb, wbk, wbj, kb)
    if n16 < n:  # columns right of the last whole panel
        _set_numba(out, oi, oj + n16, m, n - n16, bias, boff + n16, a, ai, ak, wa, wak, waj + n16, ka,
                   b, bi, bk, wb, wbk, wbj + n16, kb)


@njit(**_OPTS)
def transpose_rows(dst, d0, src, s0, m, k):
    """dst[d0:d0+k, :m] = src[s0:s0+m, :k].T: a weight gradient's rows (the activations'
    columns) contiguous along the (step, window) index the product sums over. Eight rows of
    ``src`` at a time, so each store is 8 contiguous floats and the 8 source lines stay in
    L1 across k (one strided store per element ran 3x slower: 512 x 64, 32 -> 11 us)."""
    p0 = 0
    while p0 + 8 <= m:
        for j in range(k):
            drow = dst[d0 + j]
            for q in range(8):
                drow[_U(p0 + q)] = src[_U(s0 + p0 + q), _U(j)]
        p0 += 8
    for p in range(p0, m):
        row = src[s0 + p]
        for j in range(k):
            dst[d0 + j, p] = row[j]


@njit(**_OPTS)
def padded_width(n):
    """Row length (elements) for an (m, n) float32 array that is the ``b`` operand of a weight
    gradient (gate gradients, read 16 columns at a time down all m rows): an odd number of
    64-byte lines, so consecutive rows fall in different L1 sets (rows a power of two bytes
    apart, 1 KB for LSTM64, share a few sets and are read from L2)."""
    lines = (n + 15) // 16 + 1
    return 16 * (lines + 1 - lines % 2)


@njit(**_OPTS)
def gradient_product(out, oi, oj, k, n, zero, at, ai, b, bj, m):
    """out[oi:+k, oj:+n] = at[ai:+k, :m] @ b[:m, bj:+n] (a weight gradient, ``at`` the
    activations transposed; ``b``'s rows :func:`padded_width` long); ``zero`` holds at least
    n zeros."""
    set_product(out, oi, oj, k, n, zero, 0, at, ai, 0, b, 0, bj, m, at, ai, 0, b, 0, 0, 0)
