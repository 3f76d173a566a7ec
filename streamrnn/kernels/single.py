"""One recurrent step for a single stream row: matrix-vector products, every cell the engine has.

A stream stepped alone (one stream in a micro-batch, a single sequence through ``predict``,
the leftover row of a block) would otherwise run through ``cells.layer_step``'s register
tiles, built for blocks of 24 rows: its one row is packed, padded to a 4-row micro-tile
(3 wasted rows) and swept panel by panel. Here one inlined step per event runs
matrix-vector products: the weights, (K, G*H) with rows contiguous over output columns, are
read straight from the model's arrays (no second layout), the row's inputs straight from
the event and state rows (no packing); every width the cells need (64, 32, 16 and 8
columns) is summed in vector registers, a head's last few outputs each in a register.

The step works on raw float32 pointers (``_data``, ``_item_data``, ``_at``), taken once per
call, not on array views: every view Numba makes (a state row, a layer's weights out of the
tuple, a weight row) increfs and decrefs its array, atomic operations that drain the store
buffer, in calls LLVM must assume touch any memory; there were ~15 pairs per event, about a
third of a short step's time.

Numbers: every output element is summed exactly as ``cells.block_product`` sums it (bias,
then the input terms in k order, then the recurrent terms in k order, one fused multiply-add
per term into one accumulator), and the gate updates are ``cells``' expressions term for
term. So a stream's outputs are the same bits whether it was stepped alone or inside a
block: they never depend on batching or interleaving.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from streamrnn.config import jit_options
from streamrnn.kernels.activations import relu32, sigmoid32, tanh32
from streamrnn.kernels.cells import GRU, LSTM, RNN_RELU

# The reference-counting flag always given (see cells): _step_block_w, compiled without it, calls step_stream.
_OPTS = dict(jit_options(), _nrt=True)
# Everything a step calls is inlined into the step (Numba IR inlining): a call between
# jitted functions costs a call and its argument handling per event.
_INLINE = dict(_OPTS, inline="always")
_F32P = types.CPointer(types.float32)
_ONE = np.float32(1.0)  # a bare 1 would promote the gate maths to float64
_ZERO = np.float32(0.0)


def _f32_rows(ty) -> bool:
    """A C-contiguous float32 array type: rows are ``shape[-1]`` elements apart."""
    return isinstance(ty, types.Array) and ty.dtype == types.float32 and ty.layout == "C"


@intrinsic
def _data(typingctx, arr):
    """Pointer to the first element of a C-contiguous float32 array (no reference taken:
    the caller keeps the array alive)."""
    if not _f32_rows(arr):
        return None

    def codegen(context, builder, signature, args):
        return context.make_array(signature.args[0])(context, builder, args[0]).data

    return _F32P(arr), codegen


@intrinsic
def _item_data(typingctx, tup, i):
    """``_data(tup[i])`` for a homogeneous tuple of arrays, without the reference that
    ``tup[i]`` takes."""
    if not (isinstance(tup, types.UniTuple) and _f32_rows(tup.dtype) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        # A chain of selects over the items' data pointers, not the tuple stored to memory
        # and indexed there: that store (9 words per array) ran per layer and event.
        tupty, ity = signature.args
        idx = context.cast(builder, args[1], ity, types.intp)
        ptr = None
        for j in reversed(range(tupty.count)):
            item = builder.extract_value(args[0], j)
            data = context.make_array(tupty.dtype)(context, builder, item).data
            hit = builder.icmp_signed("==", idx, ir.Constant(idx.type, j))
            ptr = data if ptr is None else builder.select(hit, data, ptr)
        return ptr

    return _F32P(tup, i), codegen


@intrinsic
def _at(typingctx, ptr, n):
    """ptr + n elements."""
    if not (isinstance(ptr, types.CPointer) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        idx = context.cast(builder, args[1], signature.args[1], types.intp)
        return builder.gep(args[0], [idx])

    return ptr(ptr, n), codegen


#: float32 lanes of one vector register (AVX2).
LANES = 8


def _emit_span(builder, groups, acc, bias, x, nx, wx, wxs, h, nh, wh, whs):
    """LLVM IR of ``_span``: ``groups`` vector accumulators (allocas that SROA turns into
    registers), each term acc + v * w on whole vectors. Plain fmul and fadd, which Numba gives
    the kernels' fast-math flags like its own: contracted to one FMA exactly where the
    Numba tiles' ``t += v * w`` is (on FMA hosts with contraction on), so the same bits."""
    f32 = ir.FloatType()
    vec = ir.VectorType(f32, LANES)
    i32 = ir.IntType(32)

    def vptr(base, offset):
        return builder.bitcast(builder.gep(base, [offset]), vec.as_pointer())

    def const(n):
        return ir.Constant(wxs.type, n)

    regs = [cgutils.alloca_once(builder, vec) for _ in range(groups)]
    for g, reg in enumerate(regs):
        builder.store(builder.load(vptr(bias, const(LANES * g)), align=4), reg)
    for src, n, w, ws in ((x, nx, wx, wxs), (h, nh, wh, whs)):
        with cgutils.for_range(builder, n) as loop:
            k = loop.index
            v = builder.load(builder.gep(src, [k]))
            splat = builder.shuffle_vector(builder.insert_element(ir.Constant(vec, ir.Undefined), v, ir.Constant(i32, 0)),
                                          ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))
            row = builder.mul(k, ws)
            for g, reg in enumerate(regs):
                wv = builder.load(vptr(w, builder.add(row, const(LANES * g))), align=4)
                builder.store(builder.fadd(builder.load(reg), builder.fmul(splat, wv)), reg)
    for g, reg in enumerate(regs):
        builder.store(builder.load(reg), vptr(acc, const(LANES * g)), align=4)


@intrinsic
def _span(typingctx, groups, acc, bias, x, nx, wx, wxs, h, nh, wh, whs):
    """acc[:c] = bias[:c] + x[:nx] @ wx[:nx, :c] + h[:nh] @ wh[:nh, :c] for c = LANES * groups
    (a literal) columns, over pointers (weights ``wxs``/``whs`` elements per row).

    The columns live in vector registers, written out as vectors in LLVM IR: LLVM's
    vectoriser, handed the same loops in Numba, unrolled them to scalars first and spilled.
    Each column starts from its bias and adds the input terms, then the recurrent terms, in
    k order, each term as the Numba tiles add it: ``cells.block_product``'s sums."""
    ptrs = (acc, bias, x, wx, h, wh)
    ints = (nx, wxs, nh, whs)
    if not (isinstance(groups, types.IntegerLiteral) and all(p == _F32P for p in ptrs)
            and all(isinstance(n, types.Integer) for n in ints)):
        return None

    def codegen(context, builder, signature, args):
        _, acc_, bias_, x_, nx_, wx_, wxs_, h_, nh_, wh_, whs_ = args
        tys = signature.args

        def intp(value, ty):
            return context.cast(builder, value, ty, types.intp)

        _emit_span(builder, groups.literal_value, acc_, bias_, x_, intp(nx_, tys[4]), wx_, intp(wxs_, tys[6]),
                   h_, intp(nh_, tys[8]), wh_, intp(whs_, tys[10]))
        return context.get_dummy_value()

    return types.void(groups, acc, bias, x, nx, wx, wxs, h, nh, wh, whs), codegen


@njit(**_INLINE)
def _column(acc, bias, x, nx, wx, wxs, h, nh, wh, whs):
    """One output column in a register (a head with a few outputs, the last columns)."""
    s = bias[0]
    for k in range(nx):
        s += x[k] * wx[k * wxs]
    for k in range(nh):
        s += h[k] * wh[k * whs]
    acc[0] = s


@njit(**_INLINE)
def matvec(acc, bias, x, nx, wx, wxs, h, nh, wh, whs, ncols):
    """acc[:ncols] = bias[:ncols] + x[:nx] @ wx[:nx, :ncols] + h[:nh] @ wh[:nh, :ncols] over
    pointers (weights ``wxs``/``whs`` elements per row; nx or nh may be 0), summed as
    ``block_product`` sums."""
    j = 0
    while j + 64 <= ncols:
        _span(8, _at(acc, j), _at(bias, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j), whs)
        j += 64
    if ncols - j >= 32:
        _span(4, _at(acc, j), _at(bias, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j), whs)
        j += 32
    if ncols - j >= 16:
        _span(2, _at(acc, j), _at(bias, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j), whs)
        j += 16
    if ncols - j >= 8:
        _span(1, _at(acc, j), _at(bias, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j), whs)
        j += 8
    while j < ncols:
        _column(_at(acc, j), _at(bias, j), x, nx, _at(wx, j), wxs, h, nh, _at(wh, j), whs)
        j += 1


# The gate updates: ``cells``' functions of the same names for one row, term for term.
# ``hrow`` points at the layer's h in the state row (an LSTM's c follows it).

@njit(**_INLINE)
def _gru_gates_after(hrow, hsz, acc, accn):
    """cells._gru_gates_after: the r and z gates first, in a loop of their own."""
    h2 = 2 * hsz
    for j in range(h2):
        acc[j] = sigmoid32(acc[j])
    for j in range(hsz):
        ng = tanh32(acc[h2 + j] + acc[j] * accn[j])
        zg = acc[hsz + j]
        h = hrow[j]
        hrow[j] = (_ONE - zg) * ng + zg * h


@njit(**_INLINE)
def _gru_gates_before(hrow, hsz, acc, accn):
    h2 = 2 * hsz
    for j in range(hsz):
        zg = sigmoid32(acc[hsz + j])
        ng = tanh32(acc[h2 + j] + accn[j])
        h = hrow[j]
        hrow[j] = (_ONE - zg) * ng + zg * h


@njit(**_INLINE)
def lstm_units(lo, hi, hsz, acc, hrow, peep):
    """LSTM update of units [lo, hi) (all of them here; a half in kernels.split): acc[g * H + j]
    holds gate g of unit j, hrow the layer's h then c (in place)."""
    for j in range(lo, hi):
        c = hrow[hsz + j]
        ig = sigmoid32(acc[j] + peep[j] * c)
        fg = sigmoid32(acc[hsz + j] + peep[hsz + j] * c)
        gg = tanh32(acc[2 * hsz + j])
        cn = fg * c + ig * gg
        og = sigmoid32(acc[3 * hsz + j] + peep[2 * hsz + j] * cn)
        hrow[hsz + j] = cn
        hrow[j] = og * tanh32(cn)


@njit(**_INLINE)
def lstm_units_plain(lo, hi, hsz, acc, hrow):
    """``lstm_units`` without peepholes. A loop of its own, not a branch in the one above: LLVM
    if-converts such a branch into code that rounds differently."""
    for j in range(lo, hi):
        c = hrow[hsz + j]
        ig = sigmoid32(acc[j])
        fg = sigmoid32(acc[hsz + j])
        gg = tanh32(acc[2 * hsz + j])
        cn = fg * c + ig * gg
        og = sigmoid32(acc[3 * hsz + j])
        hrow[hsz + j] = cn
        hrow[j] = og * tanh32(cn)


@njit(**_INLINE)
def _rnn_gates(cell, hrow, hsz, acc):
    for j in range(hsz):
        if cell == RNN_RELU:
            hrow[j] = relu32(acc[j])
        else:
            hrow[j] = tanh32(acc[j])


@njit(**_INLINE)
def _zeros(p, n):
    """True when p[:n] is all zero."""
    for j in range(n):
        if p[j] != _ZERO:
            return False
    return True


@njit(**_INLINE)
def _n_gates(cell):
    return 3 if cell == GRU else (4 if cell == LSTM else 1)


@njit(**_INLINE)
def _plain_layers(cell, hidden, peep):
    """Bit l set when layer l is an LSTM layer without peepholes (all zero): the gates skip them."""
    mask = 0
    if cell == LSTM:
        for layer in range(hidden.shape[0]):
            if _zeros(_item_data(peep, layer), 3 * hidden[layer]):
                mask |= 1 << layer
    return mask


@njit(**_INLINE)
def layer_row(cell, reset_after, plain, x, nx, hrow, hsz, wx, wh, b, bhn, peep, acc, accn, rh):
    """Advance one layer of one row in place: ``cells.layer_step`` with rn=1, its products
    (up to three, through one inlined ``matvec`` to keep the code small) as matrix-vector
    products.

    x[:nx] is the layer input (the event row for the first layer, the h of the layer below
    otherwise), hrow the layer's h in the state row; acc (G*H), accn (H) and rh (H) are
    scratch."""
    ws = _n_gates(cell) * hsz
    h2 = 2 * hsz
    n_prod = 3 if cell == GRU else 1
    for p in range(n_prod):
        # p 0: the products over input and recurrent units (GRU r and z, every LSTM gate, RNN);
        # p 1: the GRU n gate's input part; p 2: its recurrent part.
        out, bias, col, n_in, hv, n_h, ncols = acc, b, 0, nx, hrow, hsz, ws
        if cell == GRU:
            ncols = h2 if p == 0 else hsz
            if p == 1:
                out, bias, col, n_h = _at(acc, h2), _at(b, h2), h2, 0
            elif p == 2:
                out, bias, col, n_in = accn, bhn, h2, 0
                if not reset_after:
                    # Cho et al.: the n gate's recurrent product sees r * h instead of h.
                    for k in range(hsz):
                        rh[k] = sigmoid32(acc[k]) * hrow[k]
                    hv = rh
        matvec(out, bias, x, n_in, _at(wx, col), ws, hv, n_h, _at(wh, col), ws, ncols)
    if cell == GRU:
        if reset_after:
            _gru_gates_after(hrow, hsz, acc, accn)
        else:
            _gru_gates_before(hrow, hsz, acc, accn)
    elif cell == LSTM:
        if plain:
            lstm_units_plain(0, hsz, hsz, acc, hrow)
        else:
            lstm_units(0, hsz, hsz, acc, hrow, peep)
    else:
        _rnn_gates(cell, hrow, hsz, acc)


@njit(**_INLINE)
def _step(x, row, prow, cell, reset_after, plain, n_feat, hidden, offsets, wx, wh, b, bhn, peep,
          wo, wos, bo, n_out, acc, accn, rh):
    """Step the state row ``row`` on the event x[:n_feat] through every layer, then store the
    head's prediction at ``prow`` (all pointers)."""
    src = x
    n_in = n_feat
    for layer in range(hidden.shape[0]):
        if layer > 0:
            src = _at(row, offsets[layer - 1])
            n_in = hidden[layer - 1]
        layer_row(cell, reset_after, (plain >> layer) & 1, src, n_in, _at(row, offsets[layer]),
                  hidden[layer], _item_data(wx, layer), _item_data(wh, layer), _item_data(b, layer),
                  _item_data(bhn, layer), _item_data(peep, layer), acc, accn, rh)
    top = hidden.shape[0] - 1
    matvec(prow, _data(bo), _at(row, offsets[top]), hidden[top], wo, wos, row, 0, wo, wos, n_out)


#: What ``step_stream`` writes to ``out[e]``: the prediction stored before the step (score,
#: then step), the one the step made (a whole-sequence forward), or nothing (a block's row).
OUT_BEFORE, OUT_AFTER, OUT_NONE = 0, 1, 2


@njit(**_OPTS)
def step_stream(ev, rows, xs, xo, state, pred, out, mode, cell, reset_after, hidden, offsets,
                wx, wh, b, bhn, peep, wo, bo, acc, accn, rh):
    """Step the one stream of state row rows[0] on xs[e, xo:] for e in ev, in that order.

    ``mode`` says what out[e] receives (OUT_BEFORE, OUT_AFTER or OUT_NONE). The single entry
    point for every one-row step: ``_step`` is inlined once here, not once per caller (each
    inlined copy costs half a minute of cold compilation). acc, accn and rh are scratch of
    at least G*H, H and H floats (acc's and accn's first rows are used)."""
    s = rows[0]
    n_out = pred.shape[1]
    row = _at(_data(state), s * state.shape[1])
    prow = _at(_data(pred), s * n_out)
    xs0 = _data(xs)
    out0 = _data(out)
    plain = _plain_layers(cell, hidden, peep)
    n_feat = wx[0].shape[0]
    for i in range(ev.shape[0]):
        e = ev[i]
        if mode == OUT_BEFORE:
            for j in range(n_out):
                out0[e * out.shape[1] + j] = prow[j]
        _step(_at(xs0, e * xs.shape[1] + xo), row, prow, cell, reset_after, plain, n_feat, hidden,
              offsets, wx, wh, b, bhn, peep, _data(wo), wo.shape[1], bo, n_out, _data(acc), _data(accn),
              _data(rh))
        if mode == OUT_AFTER:
            for j in range(n_out):
                out0[e * out.shape[1] + j] = prow[j]
