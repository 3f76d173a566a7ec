"""One recurrent step for a block of up to ``TILE_ROWS`` rows (streams), every cell the engine has.

Layout follows PyTorch: gate blocks stacked along the output axis, LSTM (i, f, g, o), GRU
(r, z, n). Weights arrive pre-transposed, ``wx`` (D_in, G*H) and ``wh`` (H, G*H), so a
weight row is contiguous over output columns.

The products run in a register-blocked micro-kernel: the inputs of the block's rows are
first packed into a small (TILE_ROWS, K) buffer, then each micro-tile of MR rows x PANEL
columns is accumulated in registers (a stack array LLVM promotes) with the k loop inside,
so every weight vector loaded is used for MR rows and no accumulator goes through memory
per k. Column panels are the outer loop and the block's micro-tiles the inner one, so a
panel of weights is fetched from L2 once per block and then served from L1.

Every output element is accumulated in one fixed order (bias, then input features, then
recurrent units, each in index order, one fused multiply-add per term), whatever the number
of rows in the block or the width of the tile that computes it. That is what makes a
stream's numbers independent of how its events were batched or interleaved.

Indices that add a runtime offset are cast to unsigned (``_U``): Numba skips its
negative-index wraparound for unsigned indices, and that select otherwise turns contiguous
vector loads into gathers.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from streamrnn.config import PANEL, jit_options
from streamrnn.kernels import microtile
from streamrnn.kernels.activations import relu32, sigmoid32, tanh32

RNN_TANH = 0
RNN_RELU = 1
LSTM = 2
GRU = 3

#: Rows of one register micro-tile: 4 x PANEL float32 accumulators are 8 vector registers,
#: plus 2 weight vectors and 4 broadcasts. (6 rows would use each weight load for more
#: FMAs, but LLVM hoists all 6 broadcasts and then spills accumulators: measured slower.)
MR = 4
#: Rows (streams) stepped together. The products run column panel by column panel over all
#: of the block's micro-tiles, so a panel of weights (K x PANEL) comes from L2 once per
#: block and from L1 for the other micro-tiles (an LSTM's recurrent weights at H=64 are
#: 64 kB, more than L1 holds). Measured on Zen 3 at H=64: +12% LSTM, +25% GRU events/s
#: over blocks of 4 rows, +50% GRU at H=32.
TILE_ROWS = 6 * MR
#: Output columns of one register tile: ``streamrnn.config.PANEL`` (32 with AVX-512, 16 with AVX2).
#: Width of the narrow tile used for the last columns (G*H not a multiple of PANEL).
NARROW = PANEL // 2
#: Heads with fewer outputs than this skip the packed product (a fixed number, not tied to
#: PANEL, so the tile width never chooses the code path).
HEAD_DIRECT = 8
#: A GRU's input-only product (the n gate's x part) with at most this many inputs runs
#: through ``input_rows`` (same numbers): at D=1 the tiles were ~5% of a GRU64 step.
FEW_INPUTS = 4
_PANEL_TILE = MR * PANEL  # stack floats of one tile (a literal for _stack_f32)
_NARROW_TILE = MR * NARROW

#: The reference-counting flag is always given: a jitted callee without it inherits its
#: first caller's, so its code would depend on which caller compiled first.
_OPTS = dict(jit_options(), _nrt=True)
#: Kernels that allocate nothing compile without reference counting: Numba otherwise
#: increments each array argument's count on entry and decrements it on exit (two atomic,
#: serialising instructions per array per call, pruned only in straight-line code), ~5 %
#: of an LSTM64 step at a dozen calls per block of rows. (carray needs it: _panel keeps it.)
_LEAF = dict(_OPTS, _nrt=False)
_ONE = np.float32(1.0)  # a bare 1 would promote the gate maths to float64
_ZERO = np.float32(0.0)
_U = np.uint64
#: Bytes of a cache line (prefetches cover a row one line apart).
LINE = 64


@intrinsic
def _stack_f32(typingctx, n):
    """Pointer to ``n`` (a literal) float32s on the stack of the calling function.

    A fixed-size stack array indexed with constants (after unrolling) is promoted to
    registers by LLVM; a heap array from np.empty never is.
    """
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value

    def codegen(context, builder, signature, args):
        arr = cgutils.alloca_once(builder, ir.ArrayType(ir.FloatType(), size))
        zero = ir.Constant(ir.IntType(32), 0)
        return builder.gep(arr, [zero, zero])

    return types.CPointer(types.float32)(n), codegen


@njit(**_OPTS)
def _panel(acc, r0, acc_col, bias, bcol, col, xp, nx, wx, hp, nh, wh):
    """acc[r0:+MR, acc_col:+PANEL] = bias[bcol:+PANEL] + xp[r0:+MR, :nx] @ wx[:nx, col:+PANEL]
    + hp[r0:+MR, :nh] @ wh[:nh, col:+PANEL], in registers."""
    t = carray(_stack_f32(_PANEL_TILE), (4, PANEL))  # (MR, PANEL)
    for r in range(4):
        for j in range(PANEL):
            t[r, j] = bias[_U(bcol + j)]
    x0 = xp[_U(r0)]
    x1 = xp[_U(r0 + 1)]
    x2 = xp[_U(r0 + 2)]
    x3 = xp[_U(r0 + 3)]
    for k in range(nx):
        v0 = x0[k]
        v1 = x1[k]
        v2 = x2[k]
        v3 = x3[k]
        for j in range(PANEL):
            w = wx[k, _U(col + j)]
            t[0, j] += v0 * w
            t[1, j] += v1 * w
            t[2, j] += v2 * w
            t[3, j] += v3 * w
    h0 = hp[_U(r0)]
    h1 = hp[_U(r0 + 1)]
    h2 = hp[_U(r0 + 2)]
    h3 = hp[_U(r0 + 3)]
    for k in range(nh):
        v0 = h0[k]
        v1 = h1[k]
        v2 = h2[k]
        v3 = h3[k]
        for j in range(PANEL):
            w = wh[k, _U(col + j)]
            t[0, j] += v0 * w
            t[1, j] += v1 * w
            t[2, j] += v2 * w
            t[3, j] += v3 * w
    for r in range(4):
        arow = acc[_U(r0 + r)]
        for j in range(PANEL):
            arow[_U(acc_col + j)] = t[r, j]


@njit(**_OPTS)
def _panel_narrow(acc, r0, acc_col, bias, bcol, col, width, xp, nx, wx, hp, nh, wh):
    """As ``_panel`` for ``width`` <= NARROW columns (the tail of a row of gates, a small head)."""
    t = carray(_stack_f32(_NARROW_TILE), (4, NARROW))  # (MR, NARROW)
    for r in range(4):
        for j in range(width):
            t[r, j] = bias[_U(bcol + j)]
    x0 = xp[_U(r0)]
    x1 = xp[_U(r0 + 1)]
    x2 = xp[_U(r0 + 2)]
    x3 = xp[_U(r0 + 3)]
    for k in range(nx):
        v0 = x0[k]
        v1 = x1[k]
        v2 = x2[k]
        v3 = x3[k]
        for j in range(width):
            w = wx[k, _U(col + j)]
            t[0, j] += v0 * w
            t[1, j] += v1 * w
            t[2, j] += v2 * w
            t[3, j] += v3 * w
    h0 = hp[_U(r0)]
    h1 = hp[_U(r0 + 1)]
    h2 = hp[_U(r0 + 2)]
    h3 = hp[_U(r0 + 3)]
    for k in range(nh):
        v0 = h0[k]
        v1 = h1[k]
        v2 = h2[k]
        v3 = h3[k]
        for j in range(width):
            w = wh[k, _U(col + j)]
            t[0, j] += v0 * w
            t[1, j] += v1 * w
            t[2, j] += v2 * w
            t[3, j] += v3 * w
    for r in range(4):
        arow = acc[_U(r0 + r)]
        for j in range(width):
            arow[_U(acc_col + j)] = t[r, j]


@intrinsic
def _prefetch(typingctx, arr, i, k):
    """Hint the CPU to fetch the cache line of arr[i, k] (a 2-D array) for reading and writing."""
    if (not isinstance(arr, types.Array) or arr.ndim != 2 or not isinstance(i, types.Integer)
            or not isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aryty, ity, kty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = [context.cast(builder, args[1], ity, types.intp), context.cast(builder, args[2], kty, types.intp)]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # rw=1 (the row is written back), locality=3 (keep in all levels), data cache.
        builder.call(fn, [ptr, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, i, k), codegen


@njit(**_LEAF)
def prefetch_row(a, r):
    """Prefetch every cache line of row r of a 2-D float32 array."""
    n = a.shape[1]
    per_line = LINE // 4
    for k in range(0, n, per_line):
        _prefetch(a, r, k)
    _prefetch(a, r, n - 1)


@njit(**_LEAF)
def prefetch_ahead(state, ahead, n_ahead, r):
    """Prefetch state row ahead[r] if r < n_ahead. The gate loops call it once per row, so
    the next block's rows (scattered over a table larger than the caches) are requested a
    row at a time while this block computes. Issued all at once before the block (~10 lines
    a row), the prefetches held 3 % of an LSTM64 step's samples (perf, 100k streams) and the
    rows' loads in pack_rows 5-8 %; spread out, the loads 2-3 % while the prefetches hold
    5-7 % (this core seems to retire a prefetch only when its line arrives): +1-4 % net."""
    if r < n_ahead:
        prefetch_row(state, ahead[r])


@njit(**_LEAF)
def padded_rows(rn):
    """Rows actually computed for ``rn`` live rows: whole micro-tiles."""
    return (rn + MR - 1) // MR * MR


@njit(**_LEAF)
def _narrow_panels(acc, acc_col, bias, bcol, col, j, ncols, n_mt, xp, nx, wx, hp, nh, wh):
    """Columns j..ncols-1 (fewer than PANEL) of every micro-tile, NARROW at a time."""
    while j < ncols:
        width = min(NARROW, ncols - j)
        for m in range(n_mt):
            _panel_narrow(acc, m * MR, acc_col + j, bias, bcol + j, col + j, width, xp, nx, wx, hp, nh, wh)
        j += width


@njit(**_LEAF)
def block_product_numba(acc, acc_col, bias, bcol, col, ncols, rn, xp, nx, wx, hp, nh, wh):
    """``block_product`` with the Numba tiles only (any host)."""
    n_mt = (rn + MR - 1) // MR
    j = 0
    while j + PANEL <= ncols:
        for m in range(n_mt):
            _panel(acc, m * MR, acc_col + j, bias, bcol + j, col + j, xp, nx, wx, hp, nh, wh)
        j += PANEL
    _narrow_panels(acc, acc_col, bias, bcol, col, j, ncols, n_mt, xp, nx, wx, hp, nh, wh)


@njit(**_LEAF)
def _float32_rows(a):
    """Float32 with contiguous rows: what the assembly tile reads and writes."""
    return a.itemsize == 4 and a.strides[a.ndim - 1] == 4


@njit(**_LEAF)
def micro_rows(padded):
    """Rows of ``padded`` (a multiple of MR) that the 6-row assembly tiles take: the rest
    (0 or 4, or 8 where 6 would leave 2) go to 4-row tiles."""
    n6 = padded // microtile.ROWS
    if padded - n6 * microtile.ROWS == 2 and n6 > 0:
        n6 -= 1
    return n6 * microtile.ROWS


@njit(**_LEAF)
def block_product_micro(acc, acc_col, bias, bcol, col, ncols, rn, xp, nx, wx, hp, nh, wh):
    """``block_product`` with whole panels in 6 x PANEL assembly tiles (microtile.py), the
    rows they leave in 4-row Numba tiles, every output summed in the same order."""
    if not (_float32_rows(acc) and _float32_rows(bias) and _float32_rows(xp) and _float32_rows(wx)
            and _float32_rows(hp) and _float32_rows(wh)):
        block_product_numba(acc, acc_col, bias, bcol, col, ncols, rn, xp, nx, wx, hp, nh, wh)
        return
    padded = padded_rows(rn)
    r6 = micro_rows(padded)
    ldo = acc.strides[0]
    ldx = xp.strides[0]
    ldh = hp.strides[0]
    out0 = microtile.address(acc) + 4 * acc_col
    b0 = microtile.address(bias) + 4 * bcol
    x0 = microtile.address(xp)
    h0 = microtile.address(hp)
    wx0 = microtile.address(wx) + 4 * col
    wh0 = microtile.address(wh) + 4 * col
    j = 0
    while j + PANEL <= ncols:
        for r0 in range(0, r6, microtile.ROWS):
            microtile.tile6x16(b0 + 4 * j, out0 + r0 * ldo + 4 * j, ldo, x0 + r0 * ldx, ldx,
                               wx0 + 4 * j, wx.strides[0], nx, h0 + r0 * ldh, ldh,
                               wh0 + 4 * j, wh.strides[0], nh)
        for r0 in range(r6, padded, MR):
            _panel(acc, r0, acc_col + j, bias, bcol + j, col + j, xp, nx, wx, hp, nh, wh)
        j += PANEL
    if ncols - j >= microtile.HALF:
        for r0 in range(0, r6, microtile.ROWS):
            microtile.tile6x8(b0 + 4 * j, out0 + r0 * ldo + 4 * j, ldo, x0 + r0 * ldx, ldx,
                              wx0 + 4 * j, wx.strides[0], nx, h0 + r0 * ldh, ldh,
                              wh0 + 4 * j, wh.strides[0], nh)
        for r0 in range(r6, padded, MR):
            _panel_narrow(acc, r0, acc_col + j, bias, bcol + j, col + j, microtile.HALF,
                          xp, nx, wx, hp, nh, wh)
        j += microtile.HALF
    _narrow_panels(acc, acc_col, bias, bcol, col, j, ncols, padded // MR, xp, nx, wx, hp, nh, wh)


#: acc[:rn, acc_col:+ncols] = bias[bcol:+ncols] + xp[:rn, :nx] @ wx[:nx, col:+ncols]
#: + hp[:rn, :nh] @ wh[:nh, col:+ncols] for the block's packed rows (nx or nh may be 0).
#: Rows up to ``padded_rows(rn)`` are computed (their packed inputs must be finite).
#: The assembly tiles where the host runs them; the same bits either way.
block_product = block_product_micro if microtile.AVAILABLE else block_product_numba


@njit(**_LEAF)
def input_rows(acc, acc_col, bias, bcol, rn, xp, nx, wx, col, ncols):
    """acc[:rn, acc_col:+ncols] = bias[bcol:+ncols] + xp[:rn, :nx] @ wx[:nx, col:+ncols], row
    by row through memory: the same terms in the same order as ``block_product``, for a
    product with a few inputs, where the register tiles' per-call setup costs more than
    the multiply-adds."""
    for r in range(rn):
        a = acc[r]
        for j in range(ncols):
            a[_U(acc_col + j)] = bias[_U(bcol + j)]
        for k in range(nx):
            v = xp[r, k]
            wk = wx[k]
            for j in range(ncols):
                a[_U(acc_col + j)] += v * wk[_U(col + j)]


@njit(**_LEAF)
def pack_rows(dst, src, rows, rn, col, n):
    """dst[r, :n] = src[rows[r], col:col+n]; rows rn..padded_rows(rn)-1 are zero (computed,
    unused). Row-major, so each row is one contiguous (vectorised) copy; the micro-tiles
    read their MR rows through MR pointers."""
    for r in range(rn):
        s = rows[r]
        for k in range(n):
            dst[_U(r), _U(k)] = src[s, _U(col + k)]
    for r in range(rn, padded_rows(rn)):
        for k in range(n):
            dst[_U(r), _U(k)] = _ZERO


@njit(**_LEAF)
def _sigmoid_cols(rn, acc, ncols):
    """acc[:rn, :ncols] = sigmoid(acc[:rn, :ncols]) in place."""
    for r in range(rn):
        for j in range(ncols):
            acc[_U(r), _U(j)] = sigmoid32(acc[_U(r), _U(j)])


@njit(**_LEAF)
def _gru_gates_after(rn, state, rows, off, hsz, acc, accn, ahead, n_ahead):
    """GRU update with the reset gate applied after the recurrent product (PyTorch, Keras
    default): n = tanh(x_n + r * (h W_hn + b_hn)), accn holding the bracket.

    The r and z gates go first in a loop of their own: one unit's r -> n -> h chain is
    ~100 cycles of dependent FMAs and divisions, longer than the out-of-order window
    covers, so in one fused loop the core waited on it; short loops overlap many units."""
    h2 = 2 * hsz
    _sigmoid_cols(rn, acc, h2)
    for r in range(rn):
        prefetch_ahead(state, ahead, n_ahead, r)
        s = rows[r]
        for j in range(hsz):
            ng = tanh32(acc[r, _U(h2 + j)] + acc[r, j] * accn[r, j])
            zg = acc[r, _U(hsz + j)]
            h = state[s, _U(off + j)]
            state[s, _U(off + j)] = (_ONE - zg) * ng + zg * h


@njit(**_LEAF)
def _gru_gates_before(rn, state, rows, off, hsz, acc, accn, ahead, n_ahead):
    """GRU update with the reset gate applied before the recurrent product (Cho et al.):
    accn already holds (r * h) W_hn + b_hn."""
    h2 = 2 * hsz
    for r in range(rn):
        prefetch_ahead(state, ahead, n_ahead, r)
        s = rows[r]
        for j in range(hsz):
            zg = sigmoid32(acc[r, _U(hsz + j)])
            ng = tanh32(acc[r, _U(h2 + j)] + accn[r, j])
            h = state[s, _U(off + j)]
            state[s, _U(off + j)] = (_ONE - zg) * ng + zg * h


@njit(**_LEAF)
def _lstm_gates(rn, state, rows, off, hsz, acc, peep, ahead, n_ahead):
    offc = off + hsz
    for r in range(rn):
        prefetch_ahead(state, ahead, n_ahead, r)
        s = rows[r]
        for j in range(hsz):
            c = state[s, _U(offc + j)]
            ig = sigmoid32(acc[r, j] + peep[0, j] * c)
            fg = sigmoid32(acc[r, _U(hsz + j)] + peep[1, j] * c)
            gg = tanh32(acc[r, _U(2 * hsz + j)])
            cn = fg * c + ig * gg
            og = sigmoid32(acc[r, _U(3 * hsz + j)] + peep[2, j] * cn)
            state[s, _U(offc + j)] = cn
            state[s, _U(off + j)] = og * tanh32(cn)


@njit(**_LEAF)
def _lstm_gates_plain(rn, state, rows, off, hsz, acc, ahead, n_ahead):
    """``_lstm_gates`` without peepholes: the same numbers (adding 0 * c changes nothing) with
    three fewer loads and FMAs per unit, in a loop that then fits the vector registers."""
    offc = off + hsz
    for r in range(rn):
        prefetch_ahead(state, ahead, n_ahead, r)
        s = rows[r]
        for j in range(hsz):
            c = state[s, _U(offc + j)]
            ig = sigmoid32(acc[r, j])
            fg = sigmoid32(acc[r, _U(hsz + j)])
            gg = tanh32(acc[r, _U(2 * hsz + j)])
            cn = fg * c + ig * gg
            og = sigmoid32(acc[r, _U(3 * hsz + j)])
            state[s, _U(offc + j)] = cn
            state[s, _U(off + j)] = og * tanh32(cn)


@njit(**_OPTS)
def _all_zero(a):
    # Counted without an early exit, so the loop vectorises: it runs for every block, and
    # the scalar loop with a branch per element was ~0.6% of an LSTM64 step.
    nonzero = 0
    for v in a.ravel():
        nonzero += v != _ZERO
    return nonzero == 0


@njit(**_LEAF)
def _rnn_gates(cell, rn, state, rows, off, hsz, acc, ahead, n_ahead):
    for r in range(rn):
        prefetch_ahead(state, ahead, n_ahead, r)
        s = rows[r]
        for j in range(hsz):
            if cell == RNN_RELU:
                state[s, _U(off + j)] = relu32(acc[r, j])
            else:
                state[s, _U(off + j)] = tanh32(acc[r, j])


@njit(**_LEAF)
def layer_step(cell, reset_after, rn, src, src_rows, src_col, n_in, state, rows, off, hsz,
               wx, wh, b, bhn, peep, xp, hp, acc, accn, ahead, n_ahead):
    """Advance one layer for ``rn`` <= TILE_ROWS rows in place.

    src[src_rows[r], src_col:src_col+n_in] is the layer input of row r (the events for the
    first layer, the state row of the layer below otherwise); state[rows[r], off:off+H] is
    h and, for LSTM, state[rows[r], off+H:off+2H] is c. xp (TILE_ROWS, >= n_in),
    hp (TILE_ROWS, >= H), acc (TILE_ROWS, >= G*H) and accn (TILE_ROWS, >= H) are scratch.
    The state rows ahead[:n_ahead] (the next block's) are prefetched, one per row stepped.
    """
    pack_rows(xp, src, src_rows, rn, src_col, n_in)
    pack_rows(hp, state, rows, rn, off, hsz)
    if cell == GRU:
        h2 = 2 * hsz
        block_product(acc, 0, b, 0, 0, h2, rn, xp, n_in, wx, hp, hsz, wh)
        if n_in <= FEW_INPUTS:
            input_rows(acc, h2, b, h2, rn, xp, n_in, wx, h2, hsz)
        else:
            block_product(acc, h2, b, h2, h2, hsz, rn, xp, n_in, wx, hp, 0, wh)
        if not reset_after:
            # Cho et al.: the n gate's recurrent product sees r * h instead of h.
            for r in range(padded_rows(rn)):
                for k in range(hsz):
                    hp[r, k] = sigmoid32(acc[r, k]) * hp[r, k]
        block_product(accn, 0, bhn, 0, h2, hsz, rn, xp, 0, wx, hp, hsz, wh)
        # One loop per variant: with the choice inside, LLVM vectorised both arms with
        # masked loads and reloaded the activation constants every iteration.
        if reset_after:
            _gru_gates_after(rn, state, rows, off, hsz, acc, accn, ahead, n_ahead)
        else:
            _gru_gates_before(rn, state, rows, off, hsz, acc, accn, ahead, n_ahead)
    elif cell == LSTM:
        block_product(acc, 0, b, 0, 0, 4 * hsz, rn, xp, n_in, wx, hp, hsz, wh)
        if _all_zero(peep):
            _lstm_gates_plain(rn, state, rows, off, hsz, acc, ahead, n_ahead)
        else:
            _lstm_gates(rn, state, rows, off, hsz, acc, peep, ahead, n_ahead)
    else:
        block_product(acc, 0, b, 0, 0, hsz, rn, xp, n_in, wx, hp, hsz, wh)
        _rnn_gates(cell, rn, state, rows, off, hsz, acc, ahead, n_ahead)


@njit(**_LEAF)
def _head_rows8(r, state, rows, off, hsz, wo, bo, out, out_rows):
    """Head outputs of rows r..r+7 straight from their state rows: eight independent FMA
    chains per output column (FMA latency 4 x 2 pipes: four chains left the pipes half
    idle), each summed as block_product sums it (bias, then k order)."""
    ra = rows[r]
    rb = rows[r + 1]
    rc = rows[r + 2]
    rd = rows[r + 3]
    re = rows[r + 4]
    rf = rows[r + 5]
    rg = rows[r + 6]
    rh = rows[r + 7]
    for j in range(wo.shape[1]):
        s0 = bo[j]
        s1 = s0
        s2 = s0
        s3 = s0
        s4 = s0
        s5 = s0
        s6 = s0
        s7 = s0
        for k in range(hsz):
            w = wo[k, j]
            kk = _U(off + k)
            s0 += state[ra, kk] * w
            s1 += state[rb, kk] * w
            s2 += state[rc, kk] * w
            s3 += state[rd, kk] * w
            s4 += state[re, kk] * w
            s5 += state[rf, kk] * w
            s6 += state[rg, kk] * w
            s7 += state[rh, kk] * w
        out[out_rows[r], j] = s0
        out[out_rows[r + 1], j] = s1
        out[out_rows[r + 2], j] = s2
        out[out_rows[r + 3], j] = s3
        out[out_rows[r + 4], j] = s4
        out[out_rows[r + 5], j] = s5
        out[out_rows[r + 6], j] = s6
        out[out_rows[r + 7], j] = s7


@njit(**_LEAF)
def _head_rows4(r, state, rows, off, hsz, wo, bo, out, out_rows):
    """As ``_head_rows8`` for rows r..r+3."""
    ra = rows[r]
    rb = rows[r + 1]
    rc = rows[r + 2]
    rd = rows[r + 3]
    for j in range(wo.shape[1]):
        s0 = bo[j]
        s1 = s0
        s2 = s0
        s3 = s0
        for k in range(hsz):
            w = wo[k, j]
            kk = _U(off + k)
            s0 += state[ra, kk] * w
            s1 += state[rb, kk] * w
            s2 += state[rc, kk] * w
            s3 += state[rd, kk] * w
        out[out_rows[r], j] = s0
        out[out_rows[r + 1], j] = s1
        out[out_rows[r + 2], j] = s2
        out[out_rows[r + 3], j] = s3


@njit(**_LEAF)
def head_step(rn, state, rows, off, hsz, wo, bo, out, out_rows, hp, acc):
    """out[out_rows[r], :] = state[rows[r], off:off+H] @ wo + bo (the linear head)."""
    n_out = wo.shape[1]
    if n_out < HEAD_DIRECT:
        # A few outputs (one per feature): packing the rows and a mostly empty register
        # tile cost more than the products; read the state rows directly (3-9% of the
        # whole step at H=64 with one output).
        r = 0
        while r + 8 <= rn:
            _head_rows8(r, state, rows, off, hsz, wo, bo, out, out_rows)
            r += 8
        while r + 4 <= rn:
            _head_rows4(r, state, rows, off, hsz, wo, bo, out, out_rows)
            r += 4
        while r < rn:
            src = rows[r]
            for j in range(n_out):
                s0 = bo[j]
                for k in range(hsz):
                    s0 += state[src, _U(off + k)] * wo[k, j]
                out[out_rows[r], j] = s0
            r += 1
        return
    pack_rows(hp, state, rows, rn, off, hsz)
    block_product(acc, 0, bo, 0, 0, n_out, rn, hp, hsz, wo, hp, 0, wo)
    for r in range(rn):
        o = out[out_rows[r]]
        for j in range(n_out):
            o[j] = acc[r, j]
