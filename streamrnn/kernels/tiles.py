"""Register-blocked small matrix products for the training kernels, any float dtype.

``gemm_acc(c, ci, cj, m, n, a, ai, ak, b, bk, bj, kk, a2, a2i, a2k, b2, b2k, b2j, kk2)`` adds

    c[ci+i, cj+j] += sum_k a[ai+i, ak+k] * b[bk+k, bj+j]  +  sum_k a2[a2i+i, a2k+k] * b2[b2k+k, b2j+j]

for i < m, j < n (``kk2`` may be 0). ``b`` rows must be contiguous (a C array); ``a`` may be a
C array or a transposed view (``x.T``, an F array): the products through the weights pass
activations as ``a`` and the gradient products pass the activations of every step and row
of a block transposed, so a weight gradient is one product with the (step, window) pairs as
its inner dimension instead of a rank-one update per window and step.

The work is cut into tiles of ``MR`` rows x ``NR`` columns accumulated in registers (a stack
array LLVM promotes, as in :mod:`streamrnn.kernels.cells`) with the k loop inside, so every
vector of ``b`` loaded serves ``MR`` rows and no accumulator goes through memory per k.
Rows left below the last whole tile run one-row strips, columns
left of the last whole panel one column at a time over four rows (both still in registers). Every output element is summed in one fixed
order (its old value, then ``a @ b`` in k order, then ``a2 @ b2`` in k order, one fused
multiply-add per term) whichever code path computes it, so results are reproducible.

Indices that add a runtime offset are cast to unsigned (``_U``): Numba then skips its
negative-index wraparound, which would otherwise turn contiguous loads into gathers.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from streamrnn.config import jit_options

#: Rows of a register tile (each broadcast value of ``a`` is used for NR columns).
MR = 4
#: Columns of a register tile: two AVX2 vectors of float32 (or four of float64).
NR = 16
#: Slice of a long inner dimension handled at a time (see gemm_acc).
KC = 128

_OPTS = jit_options()
_U = np.uint64


@intrinsic
def _stack_like(typingctx, arr, n):
    """Pointer to ``n`` (a literal) elements of ``arr``'s dtype on the caller's stack."""
    if not isinstance(n, types.IntegerLiteral) or not isinstance(arr, types.Array):
        return None
    size = n.literal_value
    dtype = arr.dtype

    def codegen(context, builder, signature, args):
        ty = context.get_data_type(dtype)
        buf = cgutils.alloca_once(builder, ir.ArrayType(ty, size))
        zero = ir.Constant(ir.IntType(32), 0)
        return builder.gep(buf, [zero, zero])

    return types.CPointer(dtype)(arr, n), codegen


@njit(**_OPTS)
def _tile(c, ci, cj, a, ai, ak, b, bk, bj, kk, a2, a2i, a2k, b2, b2k, b2j, kk2):
    """One MR x NR tile of :func:`gemm_acc`, in registers."""
    t = carray(_stack_like(c, 64), (4, 16))  # (MR, NR)
    for r in range(4):
        crow = c[_U(ci + r)]
        for j in range(16):
            t[r, j] = crow[_U(cj + j)]
    for k in range(kk):
        kc = _U(ak + k)
        v0 = a[_U(ai), kc]
        v1 = a[_U(ai + 1), kc]
        v2 = a[_U(ai + 2), kc]
        v3 = a[_U(ai + 3), kc]
        brow = b[_U(bk + k)]
        for j in range(16):
            w = brow[_U(bj + j)]
            t[0, j] += v0 * w
            t[1, j] += v1 * w
            t[2, j] += v2 * w
            t[3, j] += v3 * w
    for k in range(kk2):
        kc = _U(a2k + k)
        v0 = a2[_U(a2i), kc]
        v1 = a2[_U(a2i + 1), kc]
        v2 = a2[_U(a2i + 2), kc]
        v3 = a2[_U(a2i + 3), kc]
        brow = b2[_U(b2k + k)]
        for j in range(16):
            w = brow[_U(b2j + j)]
            t[0, j] += v0 * w
            t[1, j] += v1 * w
            t[2, j] += v2 * w
            t[3, j] += v3 * w
    for r in range(4):
        crow = c[_U(ci + r)]
        for j in range(16):
            crow[_U(cj + j)] = t[r, j]


@njit(**_OPTS)
def _row_strip(c, ci, cj, a, ai, ak, b, bk, bj, kk, a2, a2i, a2k, b2, b2k, b2j, kk2):
    """One row by NR columns (the rows left below the last whole tile), in registers."""
    t = carray(_stack_like(c, 16), (16,))  # (NR,)
    crow = c[_U(ci)]
    for j in range(16):
        t[j] = crow[_U(cj + j)]
    for k in range(kk):
        v = a[_U(ai), _U(ak + k)]
        brow = b[_U(bk + k)]
        for j in range(16):
            t[j] += v * brow[_U(bj + j)]
    for k in range(kk2):
        v = a2[_U(a2i), _U(a2k + k)]
        brow = b2[_U(b2k + k)]
        for j in range(16):
            t[j] += v * brow[_U(b2j + j)]
    for j in range(16):
        crow[_U(cj + j)] = t[j]


@njit(**_OPTS)
def _narrow(c, ci, cj, m, n, a, ai, ak, b, bk, bj, kk, a2, a2i, a2k, b2, b2k, b2j, kk2):
    """Fewer than NR columns (a head with one output, a hidden size not a multiple of NR):
    one column at a time, four rows at a time in scalar registers (independent chains)."""
    for j in range(n):
        cc = _U(cj + j)
        jb = _U(bj + j)
        jb2 = _U(b2j + j)
        i = 0
        while i + 4 <= m:
            r0 = _U(ci + i)
            s0 = c[r0, cc]
            s1 = c[r0 + 1, cc]
            s2 = c[r0 + 2, cc]
            s3 = c[r0 + 3, cc]
            ra = _U(ai + i)
            for k in range(kk):
                kc = _U(ak + k)
                w = b[_U(bk + k), jb]
                s0 += a[ra, kc] * w
                s1 += a[ra + 1, kc] * w
                s2 += a[ra + 2, kc] * w
                s3 += a[ra + 3, kc] * w
            ra = _U(a2i + i)
            for k in range(kk2):
                kc = _U(a2k + k)
                w = b2[_U(b2k + k), jb2]
                s0 += a2[ra, kc] * w
                s1 += a2[ra + 1, kc] * w
                s2 += a2[ra + 2, kc] * w
                s3 += a2[ra + 3, kc] * w
            c[r0, cc] = s0
            c[r0 + 1, cc] = s1
            c[r0 + 2, cc] = s2
            c[r0 + 3, cc] = s3
            i += 4
        while i < m:
            r0 = _U(ci + i)
            s0 = c[r0, cc]
            ra = _U(ai + i)
            for k in range(kk):
                s0 += a[ra, _U(ak + k)] * b[_U(bk + k), jb]
            ra = _U(a2i + i)
            for k in range(kk2):
                s0 += a2[ra, _U(a2k + k)] * b2[_U(b2k + k), jb2]
            c[r0, cc] = s0
            i += 1


@njit(**_OPTS)
def _gemm_panels(c, ci, cj, m, n, a, ai, ak, b, bk, bj, kk, a2, a2i, a2k, b2, b2k, b2j, kk2):
    # Column panels outermost: the panel of b (kk x NR) stays in L1 for every row tile.
    j = 0
    while j + NR <= n:
        i = 0
        while i + MR <= m:
            _tile(c, ci + i, cj + j, a, ai + i, ak, b, bk, bj + j, kk,
                  a2, a2i + i, a2k, b2, b2k, b2j + j, kk2)
            i += MR
        while i < m:
            _row_strip(c, ci + i, cj + j, a, ai + i, ak, b, bk, bj + j, kk,
                       a2, a2i + i, a2k, b2, b2k, b2j + j, kk2)
            i += 1
        j += NR
    if j < n:
        _narrow(c, ci, cj + j, m, n - j, a, ai, ak, b, bk, bj + j, kk,
                a2, a2i, a2k, b2, b2k, b2j + j, kk2)


@njit(**_OPTS)
def gemm_acc(c, ci, cj, m, n, a, ai, ak, b, bk, bj, kk, a2, a2i, a2k, b2, b2k, b2j, kk2):
    """c[ci:+m, cj:+n] += a[ai:+m, ak:+kk] @ b[bk:+kk, bj:+n] + a2[a2i:+m, a2k:+kk2] @ b2[b2k:+kk2, b2j:+n]."""
    if kk2 > 0 or kk <= KC:
        _gemm_panels(c, ci, cj, m, n, a, ai, ak, b, bk, bj, kk, a2, a2i, a2k, b2, b2k, b2j, kk2)
        return
    # A long inner dimension (a weight gradient summed over every step and window of a
    # block) in slices of KC, so the slices of a and b a panel reads stay in L1. Each
    # output still adds its terms in k order: the result is the same bit for bit.
    k0 = 0
    while k0 < kk:
        kn = min(KC, kk - k0)
        _gemm_panels(c, ci, cj, m, n, a, ai, ak + k0, b, bk + k0, bj, kn, a2, a2i, a2k, b2, b2k, b2j, 0)
        k0 += kn


@njit(**_OPTS)
def gemm1_acc(c, ci, cj, m, n, a, ai, ak, b, bk, bj, kk):
    """c[ci:+m, cj:+n] += a[ai:+m, ak:+kk] @ b[bk:+kk, bj:+n]."""
    gemm_acc(c, ci, cj, m, n, a, ai, ak, b, bk, bj, kk, a, ai, ak, b, bk, bj, 0)
