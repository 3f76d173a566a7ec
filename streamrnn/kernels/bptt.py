"""Truncated backpropagation through time over windows, every cell the engine has.

All parameters live in one flat vector ``theta`` in PyTorch's layout (per layer ``w_ih``
(G*H, D_in), ``w_hh`` (G*H, H), ``b_ih``, ``b_hh``, optional ``peep`` (3, H); then the head
``W`` (O, H) and ``b`` (O,)), at the offsets :func:`param_layout` gives. The kernels work on
a copy with every matrix transposed (:func:`to_kernel_layout`), so forward products and
gradient outer products run over contiguous output columns and vectorise; products through
the transposed weights (gradients to inputs) use ``theta`` itself for the same reason. The
training step (:func:`train_step`) is handed both copies and refreshes both after its Adam
pass (blocked transposes of the weight matrices, a few microseconds).

A batch of windows is cut into blocks of ``BLOCK`` windows, independent of the thread count.
Each block runs forward (saving activations) and backward on one thread and writes its own
gradient row; rows are summed in block order afterwards, so the result is the same bit for
bit whatever the number of threads or their scheduling.

Kernels are dtype-generic: float32 windows and weights compile one specialization (the
training run), float64 another (the gradient tests). The float32 one uses the engine's
vectorisable activations (what scoring runs, so training fits the served function), the
float64 one the exact functions (checked against finite differences).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.core import types
from numba.extending import overload

from streamrnn.config import jit_options
from streamrnn.kernels.activations import tanh32
from streamrnn.kernels.adam import adam_update_both
from streamrnn.kernels.bptt_tile import gradient_product, padded_width, set_product, transpose_rows
from streamrnn.kernels.tiles import MR, gemm1_acc, gemm_acc

RNN_TANH = 0
RNN_RELU = 1
LSTM = 2
GRU = 3
GATES = {RNN_TANH: 1, RNN_RELU: 1, LSTM: 4, GRU: 3}

#: Windows per block: one thread steps them together, reusing each weight row it loads.
BLOCK = 16

_OPTS = jit_options()
_PAR_OPTS = jit_options(parallel=True)
_INL = dict(_OPTS, inline="always")
# float32 constants: a float32 kernel stays float32 (a bare 1 or 0.5 would promote it to
# float64) and a float64 one stays float64 (these values are exact in both).
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_HALF = np.float32(0.5)
_U = np.uint64  # unsigned indices: no negative-index wraparound in copy loops
_ZERO = np.float32(0.0)


@njit(**_INL)
def n_gates(cell):
    return 3 if cell == GRU else (4 if cell == LSTM else 1)


# --------------------------------------------------------------------------- layout
def param_layout(cell: int, hidden, d_in: int, n_out: int, peephole: bool):
    """Offsets of every tensor in the flat parameter vector.

    Returns (offs (L, 5) int64 for w_ih, w_hh, b_ih, b_hh, peep; head (2,) int64 for the
    head weight and bias; total size).
    """
    g = n_gates(cell)
    offs = np.zeros((len(hidden), 5), np.int64)
    pos, d = 0, int(d_in)
    for layer, h in enumerate(hidden):
        sizes = (g * h * d, g * h * h, g * h, g * h, 3 * h if peephole else 0)
        for k, size in enumerate(sizes):
            offs[layer, k] = pos
            pos += size
        d = int(h)
    head = np.array([pos, pos + n_out * d], np.int64)
    return offs, head, int(pos + n_out * d + n_out)


@njit(**_OPTS)
def _transpose_into(dst, src, off, rows, cols):
    """dst[off:] as (cols, rows) = transpose of src[off:] as (rows, cols), eight rows of src
    at a time: each store is 8 contiguous elements and the 8 source lines stay in L1 across
    the columns (one strided store per element ran about 3x slower)."""
    i0 = 0
    while i0 + 8 <= rows:
        for j in range(cols):
            d = off + j * rows + i0
            for q in range(8):
                dst[_U(d + q)] = src[_U(off + (i0 + q) * cols + j)]
        i0 += 8
    for i in range(i0, rows):
        for j in range(cols):
            dst[off + j * rows + i] = src[off + i * cols + j]


@njit(**_OPTS)
def _relayout(dst, src, g, hidden, d_in, n_out, offs, head, to_kernel):
    """dst = src with every weight matrix transposed (biases, peepholes as they are): from
    PyTorch layout to kernel layout if ``to_kernel``, else back."""
    for i in range(src.shape[0]):
        dst[i] = src[i]
    d = d_in
    for layer in range(hidden.shape[0]):
        h = hidden[layer]
        _transpose_matrix(dst, src, offs[layer, 0], g * h, d, to_kernel)
        _transpose_matrix(dst, src, offs[layer, 1], g * h, h, to_kernel)
        d = h
    _transpose_matrix(dst, src, head[0], n_out, d, to_kernel)


@njit(**_OPTS)
def _transpose_matrix(dst, src, off, rows, cols, to_kernel):
    """The matrix at ``off``, (rows, cols) in PyTorch layout, into the other layout."""
    if to_kernel:
        _transpose_into(dst, src, off, rows, cols)
    else:
        _transpose_into(dst, src, off, cols, rows)


@njit(**_OPTS)
def to_kernel_layout(theta, g, hidden, d_in, n_out, offs, head):
    """A copy of ``theta`` with every weight matrix transposed (biases, peepholes as they are)."""
    out = np.empty_like(theta)
    _relayout(out, theta, g, hidden, d_in, n_out, offs, head, True)
    return out


# ----------------------------------------------------------------------- activations
def _tanh(x):
    """tanh: the engine's vectorisable approximation for float32, exact for float64."""
    return np.tanh(x)


@overload(_tanh, inline="always", fastmath=_OPTS["fastmath"])
def _tanh_by_dtype(x):
    # Chosen at compile time from the type, so a float32 gate loop holds no libm call
    # (which would keep it from vectorising).
    if x == types.float32:
        return lambda x: tanh32(x)
    return lambda x: np.tanh(x)


@njit(**_INL)
def _sigmoid(x):
    return _HALF * _tanh(_HALF * x) + _HALF


# ------------------------------------------------------------------ small products
@njit(**_INL)
def _mat(vec, off, rows, cols):
    return vec[off:off + rows * cols].reshape((rows, cols))


# ------------------------------------------------------------------ forward, one step
@njit(**_OPTS)
def _act(dst, src, n, sig):
    """dst[:n] = sigmoid(src[:n]) if sig else tanh(src[:n]) (loops from 0: with a runtime
    start Numba's negative-index check stays in the loop and it does not vectorise)."""
    if sig:
        for j in range(n):
            dst[j] = _sigmoid(src[j])
    else:
        for j in range(n):
            dst[j] = _tanh(src[j])


@njit(**_OPTS)
def _lstm_gates(rc, h, r0, ro, work, gl, cl, hl, hnl):
    """LSTM without peepholes: the four gates of a row need no cell state, so they are taken
    in loops over one gate's columns, then the cell update. Every loop reads and writes few
    arrays: with more, LLVM's runtime overlap checks give up and the loop stays scalar (the
    fused loop of the peephole case costs about twice as much). Same operations, same order.
    """
    for r in range(rc):
        a = work[r0 + r]
        gr = gl[r0 + r]
        _act(gr[0:2 * h], a[0:2 * h], 2 * h, True)
        _act(gr[2 * h:3 * h], a[2 * h:3 * h], h, False)
        _act(gr[3 * h:4 * h], a[3 * h:4 * h], h, True)
    for r in range(rc):
        gi = gl[r0 + r, 0:h]
        gf = gl[r0 + r, h:2 * h]
        gg_ = gl[r0 + r, 2 * h:3 * h]
        cp = cl[r0 + r, 0:h]
        co = cl[ro + r, 0:h]
        for j in range(h):
            co[j] = gi[j] * gg_[j] + gf[j] * cp[j]
        tcr = hnl[r0 + r, 0:h]
        for j in range(h):
            tcr[j] = _tanh(co[j])
        go = gl[r0 + r, 3 * h:4 * h]
        ho = hl[ro + r, 0:h]
        for j in range(h):
            ho[j] = go[j] * tcr[j]


@njit(**_OPTS)
def _layer_forward(cell, reset_after, peephole, rc, h, r0, hl, cl, src, s0, k_in, wx, wh, bsum, bhh,
                   peep, gl, hnl, work, accn):
    """Step t of one layer for the block's ``rc`` rows (rows ``r0 = t * rc`` onwards).

    ``src`` rows s0+r0.. are the layer's inputs at step t. ``work`` rows r0.. receive the
    biases ``bsum`` (b_ih + b_hh; for GRU without the n gate's recurrent bias), the input
    product and the recurrent product, in that order, in one register tile; ``hl`` rows r0.. are h_{t-1} and rows
    r0+rc.. receive h_t (``cl`` likewise c for LSTM). Saved for the backward pass: ``gl`` the
    post-activation gates; ``hnl`` the recurrent n-gate product (GRU reset-after),
    r * h_{t-1} (GRU reset-before) or tanh(c_t) (LSTM).
    """
    g = n_gates(cell)
    gh = g * h
    ro = r0 + rc
    xr = s0 + r0
    if cell == GRU:
        h2 = 2 * h
        set_product(work, r0, 0, rc, h2, bsum, 0, src, xr, 0, wx, 0, 0, k_in, hl, r0, 0, wh, 0, 0, h)
        set_product(work, r0, h2, rc, h, bsum, h2, src, xr, 0, wx, 0, h2, k_in, hl, r0, 0, wh, 0, 0, 0)
        if reset_after:
            set_product(accn, 0, 0, rc, h, bhh, h2, hl, r0, 0, wh, 0, h2, h, hl, r0, 0, wh, 0, 0, 0)
        else:
            # Cho et al.: the n gate's recurrent product sees r * h_{t-1}.
            for r in range(rc):
                ar = work[r0 + r, 0:h]
                hp = hl[r0 + r, 0:h]
                rhr = hnl[r0 + r, 0:h]
                for j in range(h):
                    rhr[j] = _sigmoid(ar[j]) * hp[j]
            set_product(accn, 0, 0, rc, h, bhh, h2, hnl, r0, 0, wh, 0, h2, h, hnl, r0, 0, wh, 0, 0, 0)
        for r in range(rc):
            ar = work[r0 + r, 0:h]
            az = work[r0 + r, h:h2]
            an = work[r0 + r, h2:gh]
            gr = gl[r0 + r, 0:h]
            gz = gl[r0 + r, h:h2]
            gn = gl[r0 + r, h2:gh]
            n_rec = accn[r, 0:h]
            hp = hl[r0 + r, 0:h]
            ho = hl[ro + r, 0:h]
            for j in range(h):
                rg = _sigmoid(ar[j])
                zg = _sigmoid(az[j])
                if reset_after:
                    ng = _tanh(an[j] + rg * n_rec[j])
                else:
                    ng = _tanh(an[j] + n_rec[j])
                gr[j] = rg
                gz[j] = zg
                gn[j] = ng
                ho[j] = (_ONE - zg) * ng + zg * hp[j]
            if reset_after:
                hnr = hnl[r0 + r, 0:h]
                for j in range(h):
                    hnr[j] = n_rec[j]
    elif cell == LSTM and not peephole:
        set_product(work, r0, 0, rc, gh, bsum, 0, src, xr, 0, wx, 0, 0, k_in, hl, r0, 0, wh, 0, 0, h)
        _lstm_gates(rc, h, r0, ro, work, gl, cl, hl, hnl)
    elif cell == LSTM:
        set_product(work, r0, 0, rc, gh, bsum, 0, src, xr, 0, wx, 0, 0, k_in, hl, r0, 0, wh, 0, 0, h)
        pi = peep[0, 0:h]
        pf = peep[1, 0:h]
        po = peep[2, 0:h]
        for r in range(rc):
            ai = work[r0 + r, 0:h]
            af = work[r0 + r, h:2 * h]
            ag = work[r0 + r, 2 * h:3 * h]
            ao = work[r0 + r, 3 * h:gh]
            gi = gl[r0 + r, 0:h]
            gf = gl[r0 + r, h:2 * h]
            gg_ = gl[r0 + r, 2 * h:3 * h]
            go = gl[r0 + r, 3 * h:gh]
            cp = cl[r0 + r, 0:h]
            co = cl[ro + r, 0:h]
            ho = hl[ro + r, 0:h]
            tcr = hnl[r0 + r, 0:h]
            for j in range(h):
                c = cp[j]
                ig = _sigmoid(ai[j] + pi[j] * c)
                fg = _sigmoid(af[j] + pf[j] * c)
                gg = _tanh(ag[j])
                cn = fg * c + ig * gg
                og = _sigmoid(ao[j] + po[j] * cn)
                tc = _tanh(cn)
                gi[j] = ig
                gf[j] = fg
                gg_[j] = gg
                go[j] = og
                co[j] = cn
                tcr[j] = tc
                ho[j] = og * tc
    else:
        set_product(work, r0, 0, rc, h, bsum, 0, src, xr, 0, wx, 0, 0, k_in, hl, r0, 0, wh, 0, 0, h)
        for r in range(rc):
            a = work[r0 + r, 0:h]
            ho = hl[ro + r, 0:h]
            gs = gl[r0 + r, 0:h]
            for j in range(h):
                if cell == RNN_RELU:
                    v = max(a[j], _ZERO)
                else:
                    v = _tanh(a[j])
                ho[j] = v
                gs[j] = v


# ----------------------------------------------------------------- backward, one step
@njit(**_OPTS)
def _layer_backward(cell, reset_after, rc, h, r0, hl, cl, gl, hnl, peep, w_hh,
                    dh, dc, dcprev, dhprev, work, dhn, drh, zero):
    """Backward of step t of one layer for the block's ``rc`` rows (rows r0 = t * rc).

    ``dh`` (rc, H) is dL/dh_t (from above and from t+1), ``dc`` (rc, H) dL/dc_t (LSTM).
    Writes dL/dc_{t-1} to ``dcprev``, dL/dh_{t-1} to ``dhprev`` and the gradients of the
    gates' pre-activations to ``work`` rows r0.. (for GRU reset-after the recurrent n part,
    which differs, to ``dhn`` rows r0..): the weight and peephole gradients are taken from
    those later, for all steps at once. ``zero`` is a vector of at least H zeros.
    """
    g = n_gates(cell)
    gh = g * h
    if cell == GRU:
        h2 = 2 * h
        for r in range(rc):
            gr = gl[r0 + r, 0:h]
            gz = gl[r0 + r, h:h2]
            gn = gl[r0 + r, h2:gh]
            hp = hl[r0 + r, 0:h]
            hnr = hnl[r0 + r, 0:h]
            d = dh[r, 0:h]
            dxr = work[r0 + r, 0:h]
            dxz = work[r0 + r, h:h2]
            dxn = work[r0 + r, h2:gh]
            dhnr = dhn[r0 + r, 0:h]
            dp = dhprev[r, 0:h]
            for j in range(h):
                zg = gz[j]
                ng = gn[j]
                dan = d[j] * (_ONE - zg) * (_ONE - ng * ng)
                dxz[j] = d[j] * (hp[j] - ng) * zg * (_ONE - zg)
                dxn[j] = dan
                dp[j] = d[j] * zg
                if reset_after:
                    rg = gr[j]
                    dxr[j] = dan * hnr[j] * rg * (_ONE - rg)
                    dhnr[j] = dan * rg
        if reset_after:
            gemm_acc(dhprev, 0, 0, rc, h, work, r0, 0, w_hh, 0, 0, h2,
                     dhn, r0, 0, w_hh, h2, 0, h)
        else:
            # n = tanh(a_n + W_hn (r * h_prev) + b_hn): route through r * h_prev first.
            set_product(drh, 0, 0, rc, h, zero, 0, work, r0, h2, w_hh, h2, 0, h, work, r0, 0, w_hh, 0, 0, 0)
            for r in range(rc):
                gr = gl[r0 + r, 0:h]
                hp = hl[r0 + r, 0:h]
                dr_ = drh[r, 0:h]
                dxr = work[r0 + r, 0:h]
                dp = dhprev[r, 0:h]
                for j in range(h):
                    rg = gr[j]
                    dxr[j] = dr_[j] * hp[j] * rg * (_ONE - rg)
                    dp[j] += dr_[j] * rg
            gemm1_acc(dhprev, 0, 0, rc, h, work, r0, 0, w_hh, 0, 0, h2)
    elif cell == LSTM:
        # Few arrays per loop, none both read and written, so LLVM vectorises it (the
        # peephole gradients are taken after the time loop, from work and cl).
        pi = peep[0, 0:h]
        pf = peep[1, 0:h]
        po = peep[2, 0:h]
        for r in range(rc):
            gi = gl[r0 + r, 0:h]
            gf = gl[r0 + r, h:2 * h]
            gg_ = gl[r0 + r, 2 * h:3 * h]
            go = gl[r0 + r, 3 * h:gh]
            cp_ = cl[r0 + r, 0:h]
            tcr = hnl[r0 + r, 0:h]
            d = dh[r, 0:h]
            dcr = dc[r, 0:h]
            dcp = dcprev[r, 0:h]
            di = work[r0 + r, 0:h]
            df = work[r0 + r, h:2 * h]
            dg = work[r0 + r, 2 * h:3 * h]
            do = work[r0 + r, 3 * h:gh]
            for j in range(h):
                ig = gi[j]
                fg = gf[j]
                gg = gg_[j]
                og = go[j]
                cp = cp_[j]
                tc = tcr[j]
                dao = d[j] * tc * og * (_ONE - og)
                dct = dcr[j] + d[j] * og * (_ONE - tc * tc) + dao * po[j]
                dai = dct * gg * ig * (_ONE - ig)
                daf = dct * cp * fg * (_ONE - fg)
                dcp[j] = dct * fg + dai * pi[j] + daf * pf[j]
                di[j] = dai
                df[j] = daf
                dg[j] = dct * ig * (_ONE - gg * gg)
                do[j] = dao
        set_product(dhprev, 0, 0, rc, h, zero, 0, work, r0, 0, w_hh, 0, 0, gh, work, r0, 0, w_hh, 0, 0, 0)
    else:
        for r in range(rc):
            gs = gl[r0 + r, 0:h]
            d = dh[r, 0:h]
            dx = work[r0 + r, 0:h]
            for j in range(h):
                hv = gs[j]
                if cell == RNN_RELU:
                    da = d[j] if hv > _ZERO else d[j] * _ZERO
                else:
                    da = d[j] * (_ONE - hv * hv)
                dx[j] = da
        set_product(dhprev, 0, 0, rc, h, zero, 0, work, r0, 0, w_hh, 0, 0, h, work, r0, 0, w_hh, 0, 0, 0)


@njit(**_OPTS)
def _cache_friendly(w, spare):
    """``w`` (rows, cols), or a copy of it in ``spare``'s padded rows when a 16-column panel
    of ``w`` does not fit the L1 sets its rows fall in (8 ways each; rows a multiple of
    2^s lines apart use 64 / 2^s of the 64 sets). A forward step's product reads each panel
    once per 6-row tile: LSTM64's W_hh (rows 1 KB apart, 4 sets for 64 rows) was re-read
    from L2 by every tile of every step."""
    rows, cols = w.shape
    size = cols * w.itemsize
    if size % 64 != 0:
        return w
    lines = size // 64
    sets = 64
    while lines % 2 == 0 and sets > 1:
        lines //= 2
        sets //= 2
    if rows <= 8 * sets:
        return w
    for i in range(rows):
        d = spare[i]
        s = w[i]
        for j in range(cols):
            d[j] = s[j]
    return spare


# ------------------------------------------------------------------ the head's gradients
@njit(**_OPTS)
def _head_weight_grad(gwo, ht, rc, dout, m):
    """gwo[j, o] += the sum over rows p = 0, 1, ... of ht[rc + p, j] * dout[p, o]: one
    update per row, vectorised along j (as a column of dot products, the product tiles ran
    it as a few scalar chains: 17 -> 9 us for LSTM64's block). Same terms in the same order."""
    htop, n_out = gwo.shape
    acc = np.empty(htop, gwo.dtype)
    for o in range(n_out):
        for j in range(htop):
            acc[j] = gwo[j, o]
        for p in range(m):
            d = dout[p, o]
            row = ht[rc + p, 0:htop]
            for j in range(htop):
                acc[j] += row[j] * d
        for j in range(htop):
            gwo[j, o] = acc[j]


@njit(**_OPTS)
def _head_input_grad(dext, dout, wo, m, htop):
    """dext[p, :htop] = dout[p] @ wo, each element zero plus its terms in o order (as the
    product tiles on a zeroed array, without tiles of one inner term over a zeroed array)."""
    n_out = wo.shape[0]
    for p in range(m):
        row = dext[p, 0:htop]
        for j in range(htop):
            row[j] = 0
        for o in range(n_out):
            d = dout[p, o]
            w = wo[o, 0:htop]
            for j in range(htop):
                row[j] += d * w[j]


# --------------------------------------------------------------- one block of windows
@njit(**_OPTS)
def _block(theta, thetak, x, idx, lo, rn, cell, reset_after, peephole, hidden,
           n_out, gaussian, offs, head, scale, grow, want_grad, outs):
    """Forward (and backward if want_grad) of windows idx[lo:lo+rn]; returns their loss sum.

    Gradients of ``scale * loss`` are added to ``grow`` (kernel layout). If outs has rows,
    the head outputs of window idx[lo+r] go to outs[lo+r] (T, O).

    Every per-step array holds the block's rows for all steps, row ``t * rc + r`` for window
    r at step t (``rc``: rn rounded up to whole register tiles; the extra rows see zero input
    and get zero gradient). So the products that do not recur backward (the head, every
    weight gradient, gradients to a layer's input) run once per layer over all ``T * rc``
    rows; per step run x_t @ W_ih + h_{t-1} @ W_hh (one register tile) forward and
    dL/da_t @ W_hh backward.
    """
    dt = theta.dtype
    n_layers = hidden.shape[0]
    n_steps = x.shape[1] - 1
    d_in = x.shape[2]
    g = n_gates(cell)
    hmax = 1
    for layer in range(n_layers):
        hmax = max(hmax, hidden[layer])
    htop = hidden[n_layers - 1]
    rc = (rn + MR - 1) // MR * MR
    m = n_steps * rc
    hs = np.empty((n_layers, m + rc, hmax), dt)
    cs = np.empty((n_layers, m + rc if cell == LSTM else 1, hmax), dt)
    hs[:, 0:rc] = 0  # h_0 (every other row is written before it is read)
    cs[:, 0:min(rc, cs.shape[1])] = 0
    gates = np.empty((n_layers, m, g * hmax), dt)
    hn = np.empty((n_layers, m if cell != RNN_TANH and cell != RNN_RELU else 1, hmax), dt)
    # Gate gradients are a weight gradient's ``b`` operand: rows padded (see padded_width).
    work = np.empty((m, padded_width(g * hmax)), dt)
    accn = np.empty((rc, hmax), dt)
    nopeep = np.zeros((3, hmax), dt)
    bsum = np.empty(g * hmax, dt)
    src0 = np.zeros((m, d_in), dt)
    for t in range(n_steps):
        for r in range(rn):
            w = idx[lo + r]
            for d in range(d_in):
                src0[t * rc + r, d] = x[w, t, d]
    # ---- forward, layer by layer over the whole window
    wpad = padded_width(g * hmax)
    wxp = np.empty((max(d_in, hmax), wpad), dt)
    whp = np.empty((hmax, wpad), dt)
    for layer in range(n_layers):
        h = hidden[layer]
        k_in = d_in if layer == 0 else hidden[layer - 1]
        gh = g * h
        wx = _cache_friendly(_mat(thetak, offs[layer, 0], k_in, gh), wxp)
        wh = _cache_friendly(_mat(thetak, offs[layer, 1], h, gh), whp)
        bih = thetak[offs[layer, 2]:offs[layer, 2] + gh]
        bhh = thetak[offs[layer, 3]:offs[layer, 3] + gh]
        peep = _mat(thetak, offs[layer, 4], 3, h) if peephole else nopeep
        summed = 2 * h if cell == GRU else gh
        for j in range(summed):
            bsum[j] = bih[j] + bhh[j]
        for j in range(summed, gh):
            bsum[j] = bih[j]  # GRU: b_hn stays with the recurrent product (inside the reset)
        src = src0 if layer == 0 else hs[layer - 1]
        s0 = 0 if layer == 0 else rc
        for t in range(n_steps):
            _layer_forward(cell, reset_after, peephole, rc, h, t * rc, hs[layer], cs[layer], src, s0, k_in,
                           wx, wh, bsum, bhh, peep, gates[layer], hn[layer], work, accn)
    # ---- head, loss and the gradient reaching the top layer
    wot = _mat(thetak, head[0], htop, n_out)
    bo = thetak[head[1]:head[1] + n_out]
    wo = _mat(theta, head[0], n_out, htop)
    ht = hs[n_layers - 1]
    out = np.empty((m, n_out), dt)
    for p in range(m):
        for o in range(n_out):
            out[p, o] = bo[o]
    gemm1_acc(out, 0, 0, m, n_out, ht, rc, 0, wot, 0, 0, htop)
    dout = np.zeros((m, n_out), dt)
    n_feat = n_out // 2 if gaussian else n_out
    loss = 0.0
    for t in range(n_steps):
        for r in range(rn):
            w = idx[lo + r]
            p = t * rc + r
            for d in range(n_feat):
                e = out[p, d] - x[w, t + 1, d]
                if gaussian:
                    lv = out[p, n_feat + d]
                    iv = np.exp(-lv)
                    loss += _HALF * (lv + e * e * iv)
                    dout[p, d] = scale * e * iv
                    dout[p, n_feat + d] = scale * _HALF * (_ONE - e * e * iv)
                else:
                    loss += e * e
                    dout[p, d] = scale * _TWO * e
            if outs.shape[0] > 0:
                for o in range(n_out):
                    outs[lo + r, t, o] = out[p, o]
    if not want_grad:
        return loss
    for p in range(m):
        for o in range(n_out):
            grow[head[1] + o] += dout[p, o]
    _head_weight_grad(_mat(grow, head[0], htop, n_out), ht, rc, dout, m)
    dext = np.empty((m, hmax), dt)  # columns past htop are never read
    _head_input_grad(dext, dout, wo, m, htop)
    # ---- backward through time, top layer first
    dnext = np.zeros((m if n_layers > 1 else 1, hmax), dt)
    dh = np.empty((rc, hmax), dt)
    dhc = np.zeros((rc, hmax), dt)
    dcc = np.zeros((rc, hmax), dt)
    dcn = np.zeros((rc, hmax), dt)
    dhn = np.empty((m if cell == GRU else 1, padded_width(hmax)), dt)
    drh = np.empty((rc, hmax), dt)
    gnopeep = np.zeros((3, hmax), dt)
    zero = np.zeros(g * hmax + d_in, dt)
    kmax = max(d_in, hmax)
    # A layer's input above h_{t-1} (or GRU reset-before's r * h_{t-1}), transposed, rows 16
    # floats longer than m: rows a power of two bytes apart would share a few L1 sets.
    tact = np.empty((kmax + hmax + 1, m + 16), dt)  # + a row of ones (b_ih, see below)
    for layer in range(n_layers - 1, -1, -1):
        h = hidden[layer]
        k_in = d_in if layer == 0 else hidden[layer - 1]
        gh = g * h
        w_ih = _mat(theta, offs[layer, 0], gh, k_in)
        w_hh = _mat(theta, offs[layer, 1], gh, h)
        peep = _mat(thetak, offs[layer, 4], 3, h) if peephole else nopeep
        gbih = grow[offs[layer, 2]:offs[layer, 2] + gh]
        gbhh = grow[offs[layer, 3]:offs[layer, 3] + gh]
        gpeep = _mat(grow, offs[layer, 4], 3, h) if peephole else gnopeep
        hl = hs[layer]
        hnl = hn[layer]
        dhc[:] = 0
        dcc[:] = 0
        for t in range(n_steps - 1, -1, -1):
            r0 = t * rc
            for r in range(rc):
                de = dext[r0 + r, 0:h]
                dc_ = dhc[r, 0:h]
                dr_ = dh[r, 0:h]
                for j in range(h):
                    dr_[j] = de[j] + dc_[j]
            _layer_backward(cell, reset_after, rc, h, r0, hl, cs[layer], gates[layer], hnl, peep,
                            w_hh, dh, dcc, dcn, dhc, work, dhn, drh, zero)
            dcc, dcn = dcn, dcc
        # ---- weight gradients: one product over every (step, window) row of the block, with
        # the activations transposed so the rows of each product are contiguous along the
        # sum; each weight's part of this block's gradient row is written once (from zero).
        # In kernel layout W_ih's rows are followed by W_hh's, one (k_in + h, gh) matrix, so
        # with the input and h_{t-1} transposed one above the other in ``tact`` a single
        # product gives both (each panel of gate gradients read once, not once for each).
        src = src0 if layer == 0 else hs[layer - 1]
        s0 = 0 if layer == 0 else rc
        transpose_rows(tact, 0, src, s0, m, k_in)
        transpose_rows(tact, k_in, hl, 0, m, h)
        gw = _mat(grow, offs[layer, 0], k_in + h, gh)
        if cell == GRU:
            h2 = 2 * h
            gradient_product(gw, 0, 0, k_in + h, h2, zero, tact, 0, work, 0, m)
            gradient_product(gw, 0, h2, k_in, h, zero, tact, 0, work, h2, m)
            if reset_after:
                gradient_product(gw, k_in, h2, h, h, zero, tact, k_in, dhn, 0, m)
            else:
                transpose_rows(tact, k_in, hnl, 0, m, h)
                gradient_product(gw, k_in, h2, h, h, zero, tact, k_in, work, h2, m)
        else:
            # With a row of ones below h_{t-1} the product's next output row is b_ih's gradient
            # (in kernel layout b_ih follows W_hh): zero plus dL/da row by row, each term a
            # multiply-add by 1, exactly the sum a loop would take. For LSTM64 66 rows take as
            # many 6-row tiles as 65 did.
            for p in range(m):
                tact[k_in + h, p] = 1
            gwb = _mat(grow, offs[layer, 0], k_in + h + 1, gh)
            gradient_product(gwb, 0, 0, k_in + h + 1, gh, zero, tact, 0, work, 0, m)
        if peephole:
            # dL/dp_i = sum da_i * c_{t-1}, dL/dp_f = sum da_f * c_{t-1}, dL/dp_o = sum da_o * c_t
            cl = cs[layer]
            gpi = gpeep[0, 0:h]
            gpf = gpeep[1, 0:h]
            gpo = gpeep[2, 0:h]
            for p in range(m):
                cp_ = cl[p, 0:h]
                cn_ = cl[p + rc, 0:h]
                di = work[p, 0:h]
                df = work[p, h:2 * h]
                do = work[p, 3 * h:gh]
                for j in range(h):
                    gpi[j] += di[j] * cp_[j]
                    gpf[j] += df[j] * cp_[j]
                    gpo[j] += do[j] * cn_[j]
        if cell == GRU:
            for p in range(m):
                dx = work[p, 0:gh]
                for j in range(gh):
                    gbih[j] += dx[j]
        # b_hh gets the same sums as b_ih (both start at zero in this block's row), except
        # GRU reset-after's n part, which is summed from dhn.
        split = 2 * h if cell == GRU and reset_after else gh
        for j in range(split):
            gbhh[j] += gbih[j]
        if split < gh:
            gn = gbhh[split:gh]
            for p in range(m):
                dn = dhn[p, 0:h]
                for j in range(h):
                    gn[j] += dn[j]
        if layer > 0:
            set_product(dnext, 0, 0, m, k_in, zero, 0, work, 0, 0, w_ih, 0, 0, gh, work, 0, 0, w_ih, 0, 0, 0)
            dext, dnext = dnext, dext
    return loss


# ------------------------------------------------------------------ batch entry points
# Every entry point runs its blocks through the one parallel kernel _blocks: each compiled
# kernel links and re-optimises everything it calls, so a second parallel copy of _block
# (forward only, or a second fused gradient) would cost its whole compile again. The
# Python-level entry points (batch_grad, batch_forward) allocate and call the compiled
# pieces train_step uses, so they add no compile of their own.
@njit(**_OPTS)
def _zeros(shape, like):
    return np.zeros(shape, like.dtype)


@njit(**_OPTS)
def _fill_zero(row):
    for i in range(row.shape[0]):
        row[i] = 0


@njit(**_PAR_OPTS)
def _blocks(theta, thetak, x, idx, cell, reset_after, peephole, hidden, n_out, gaussian,
            offs, head, scale, rows, losses, want_grad, outs):
    """Each block of windows x[idx] writes its loss to losses[b] and, if ``want_grad``, its
    gradient of ``scale * loss`` (kernel layout) to rows[b]; head outputs go to ``outs``
    if it has rows (see :func:`_block`)."""
    n = idx.shape[0]
    n_blocks = (n + BLOCK - 1) // BLOCK
    for b in prange(n_blocks):
        lo = b * BLOCK
        rn = min(BLOCK, n - lo)
        row = rows[b]
        if want_grad:
            _fill_zero(row)
        losses[b] = _block(theta, thetak, x, idx, lo, rn, cell, reset_after, peephole,
                           hidden, n_out, gaussian, offs, head, scale, row, want_grad, outs)


#: Gradient elements summed over the blocks' rows at a time (their float64 sums stay in L1).
_CHUNK = 512


@njit(**_OPTS)
def _sum_rows(rows, n_blocks, gk, grad, g, hidden, d_in, n_out, offs, head):
    """grad = the sum over blocks 0, 1, 2, ... of rows[b] (float64), summed in kernel layout
    into ``gk`` (a chunk at a time, contiguous loops that vectorise), then turned into PyTorch
    layout; returns the sum of the squares.

    Serial on purpose: on a loaded machine every extra parallel region costs a barrier that
    waits for a preempted thread (milliseconds)."""
    total = grad.shape[0]
    for c0 in range(0, total, _CHUNK):
        n = min(_CHUNK, total - c0)
        gc = gk[c0:c0 + n]
        for i in range(n):
            gc[i] = 0.0
        for b in range(n_blocks):
            row = rows[b, c0:c0 + n]
            for i in range(n):
                gc[i] += row[i]
    _relayout(grad, gk, g, hidden, d_in, n_out, offs, head, False)
    return _sum_squares(grad)


@njit(**_OPTS)
def _sum_squares(v):
    """Sum of squares in 8 interleaved partial sums (a fixed order, in vector registers)."""
    acc = np.zeros(8)
    n8 = v.shape[0] // 8 * 8
    for i in range(0, n8, 8):
        for k in range(8):
            acc[k] += v[i + k] * v[i + k]
    s = 0.0
    for k in range(8):
        s += acc[k]
    for i in range(n8, v.shape[0]):
        s += v[i] * v[i]
    return s


def _loss_sum(losses):
    """The blocks' losses summed in block order (as train_step sums them)."""
    loss = 0.0
    for v in losses.tolist():
        loss += v
    return loss


def batch_grad(theta, x, idx, cell, reset_after, peephole, hidden, n_out, gaussian,
               offs, head, scale):
    """Loss sum and gradient of ``scale * loss`` (PyTorch layout, float64) over windows x[idx].

    x is (N, T+1, D): inputs x[:, :T], one-step-ahead targets x[:, 1:]. The loss is the
    squared error summed over windows, steps and features (or the Gaussian negative
    log-likelihood without its constant); ``scale`` is usually 1 / (len(idx) * T * D).
    """
    g = GATES[cell]
    theta = np.ascontiguousarray(theta)
    x = np.ascontiguousarray(x, theta.dtype)
    idx = np.ascontiguousarray(idx, np.int64)
    d_in = x.shape[2]
    total = theta.shape[0]
    thetak = to_kernel_layout(theta, g, hidden, d_in, n_out, offs, head)
    n_blocks = (idx.shape[0] + BLOCK - 1) // BLOCK
    rows = np.zeros((n_blocks, total), theta.dtype)
    losses = np.zeros(n_blocks)
    _blocks(theta, thetak, x, idx, cell, reset_after, peephole, hidden, n_out, gaussian,
            offs, head, float(scale), rows, losses, True, np.zeros((0, 1, 1), theta.dtype))
    grad = np.zeros(total)
    _sum_rows(rows, n_blocks, np.zeros(total), grad, g, hidden, d_in, n_out, offs, head)
    return _loss_sum(losses), grad


@njit(**_OPTS)
def train_step(theta, theta32, thetak, adam_m, adam_v, rows, losses, gk, grad, x, idx, cell,
               reset_after, peephole, hidden, n_out, gaussian, offs, head, scale, max_norm,
               beta1, beta2, eps, step, c2):
    """One optimiser step in one call: the gradient of ``scale * loss`` over x[idx] (as
    :func:`batch_grad`, bit for bit), its norm clipped to ``max_norm`` (if > 0) as
    ``torch.nn.utils.clip_grad_norm_`` does, then Adam (:func:`adam_update_both`) on the
    float64 master weights ``theta``, which also refreshes their float32 copies ``theta32``
    (PyTorch layout) and ``thetak`` (kernel layout).

    Returns (loss sum, gradient norm before clipping). ``rows``, ``losses``, ``gk`` and
    ``grad`` are the caller's scratch (at least (blocks, P), (blocks,), (P,), (P,)): nothing
    is allocated per step.
    """
    n_blocks = (idx.shape[0] + BLOCK - 1) // BLOCK
    _blocks(theta32, thetak, x, idx, cell, reset_after, peephole, hidden, n_out, gaussian,
            offs, head, scale, rows, losses, True, _zeros((0, 1, 1), theta32))
    g = n_gates(cell)
    d_in = x.shape[2]
    norm = np.sqrt(_sum_rows(rows, n_blocks, gk, grad, g, hidden, d_in, n_out, offs, head))
    loss = 0.0
    for b in range(n_blocks):
        loss += losses[b]
    factor = 1.0
    if max_norm > 0 and norm > max_norm:
        factor = max_norm / (norm + 1e-6)  # the same formula as torch.nn.utils.clip_grad_norm_
    adam_update_both(theta, grad, factor, adam_m, adam_v, beta1, beta2, eps, step, c2, theta32)
    _relayout(thetak, theta32, g, hidden, d_in, n_out, offs, head, True)
    return loss, norm


def batch_forward(theta, x, idx, cell, reset_after, peephole, hidden, n_out, gaussian,
                  offs, head, want_outputs):
    """Loss sum over windows x[idx] and, if want_outputs, their head outputs (n, T, O)."""
    g = GATES[cell]
    theta = np.ascontiguousarray(theta)
    x = np.ascontiguousarray(x, theta.dtype)
    idx = np.ascontiguousarray(idx, np.int64)
    thetak = to_kernel_layout(theta, g, hidden, x.shape[2], n_out, offs, head)
    n = idx.shape[0]
    n_blocks = (n + BLOCK - 1) // BLOCK
    losses = np.zeros(n_blocks)
    outs = np.zeros((n if want_outputs else 0, x.shape[1] - 1, n_out), theta.dtype)
    _blocks(theta, thetak, x, idx, cell, reset_after, peephole, hidden, n_out, gaussian,
            offs, head, 1.0, np.zeros((n_blocks, 0), theta.dtype), losses, False, outs)
    return _loss_sum(losses), outs
