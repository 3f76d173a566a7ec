"""Truncated backpropagation through time over windows, every cell the engine has.

All parameters live in one flat vector ``theta`` in PyTorch's layout (per layer ``w_ih``
(G*H, D_in), ``w_hh`` (G*H, H), ``b_ih``, ``b_hh``, optional ``peep`` (3, H); then the head
``W`` (O, H) and ``b`` (O,)), at the offsets :func:`param_layout` gives. The kernels work on
a copy with every matrix transposed (:func:`to_kernel_layout`), so forward products and
gradient outer products run over contiguous output columns and vectorise; products through
the transposed weights (gradients to inputs) use ``theta`` itself for the same reason.

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
    """dst[off:] as (cols, rows) = transpose of src[off:] as (rows, cols)."""
    for i in range(rows):
        for j in range(cols):
            dst[off + j * rows + i] = src[off + i * cols + j]


@njit(**_OPTS)
def to_kernel_layout(theta, g, hidden, d_in, n_out, offs, head):
    """A copy of ``theta`` with every weight matrix transposed (biases, peepholes as they are)."""
    out = theta.copy()
    d = d_in
    for layer in range(hidden.shape[0]):
        h = hidden[layer]
        _transpose_into(out, theta, offs[layer, 0], g * h, d)
        _transpose_into(out, theta, offs[layer, 1], g * h, h)
        d = h
    _transpose_into(out, theta, head[0], n_out, d)
    return out


@njit(**_OPTS)
def from_kernel_layout_add(dst, src, g, hidden, d_in, n_out, offs, head, total):
    """dst += src with src's weight matrices transposed back to PyTorch layout."""
    for i in range(total):
        dst[i] += src[i]
    d = d_in
    for layer in range(hidden.shape[0]):
        h = hidden[layer]
        _untranspose_add(dst, src, offs[layer, 0], g * h, d)
        _untranspose_add(dst, src, offs[layer, 1], g * h, h)
        d = h
    _untranspose_add(dst, src, head[0], n_out, d)


@njit(**_OPTS)
def _untranspose_add(dst, src, off, rows, cols):
    # Undo the plain add above for this matrix, then add it transposed.
    for i in range(rows * cols):
        dst[off + i] -= src[off + i]
    for i in range(rows):
        for j in range(cols):
            dst[off + i * cols + j] += src[off + j * rows + i]


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


@njit(**_OPTS)
def _matacc(acc, a0, rn, src, w, w0, ncols):
    """acc[r, a0:a0+ncols] += src[r, :K] @ w[:, w0:w0+ncols] (w transposed layout (K, *))."""
    # Row views keep every inner index a plain loop counter, so the loops vectorise
    # (an offset index would need a negative-index check per element).
    for k in range(w.shape[0]):
        wk = w[k, w0:w0 + ncols]
        for r in range(rn):
            v = src[r, k]
            out = acc[r, a0:a0 + ncols]
            for j in range(ncols):
                out[j] += v * wk[j]


@njit(**_OPTS)
def _outer_acc(gw, g0, rn, src, d, d0, ncols):
    """gw[k, g0+j] += sum_r src[r, k] * d[r, d0+j] (gradient of a transposed weight)."""
    for k in range(gw.shape[0]):
        gk = gw[k, g0:g0 + ncols]
        for r in range(rn):
            v = src[r, k]
            dr = d[r, d0:d0 + ncols]
            for j in range(ncols):
                gk[j] += v * dr[j]


@njit(**_OPTS)
def _back_acc(out, rn, d, d0, w, w0, nrows):
    """out[r, :K] += d[r, d0:d0+nrows] @ w[w0:w0+nrows, :] (w in PyTorch layout (GH, K))."""
    # j outermost: each weight row is loaded once for all rows, and the rn output rows are
    # independent update chains (r outermost would chain every update through one row).
    ncols = w.shape[1]
    for j in range(nrows):
        wj = w[w0 + j]
        for r in range(rn):
            v = d[r, d0 + j]
            o = out[r, 0:ncols]
            for k in range(ncols):
                o[k] += v * wj[k]


# ------------------------------------------------------------------ forward, one step
@njit(**_OPTS)
def _layer_forward(cell, reset_after, rn, h, src, hprev, cprev, wx, wh, bih, bhh, peep,
                   gates, hn, hout, cout, acc, accn, rh):
    """One step of one layer for rn windows; saves what the backward pass needs.

    src (R, D_in) input, hprev/cprev (R, H) previous state; writes hout/cout (R, H), gates
    (R, G*H) post-activation gates and hn (R, H): for GRU the recurrent n-gate product, for
    LSTM tanh(c_t).
    """
    g = n_gates(cell)
    gh = g * h
    summed = 2 * h if cell == GRU else gh
    for r in range(rn):
        a = acc[r, 0:summed]
        for j in range(summed):
            a[j] = bih[j] + bhh[j]
    if cell == GRU:
        # the n gate's recurrent bias stays with the recurrent product (inside the reset)
        for r in range(rn):
            an = acc[r, 2 * h:gh]
            bi = bih[2 * h:gh]
            bh = bhh[2 * h:gh]
            n_rec = accn[r, 0:h]
            for j in range(h):
                an[j] = bi[j]
                n_rec[j] = bh[j]
    _matacc(acc, 0, rn, src, wx, 0, gh)
    if cell == GRU:
        h2 = 2 * h
        _matacc(acc, 0, rn, hprev, wh, 0, h2)
        if not reset_after:
            for r in range(rn):
                ar = acc[r, 0:h]
                gr = gates[r, 0:h]
                hp = hprev[r, 0:h]
                rhr = rh[r, 0:h]
                for j in range(h):
                    rg = _sigmoid(ar[j])
                    gr[j] = rg
                    rhr[j] = rg * hp[j]
            _matacc(accn, 0, rn, rh, wh, h2, h)
        else:
            _matacc(accn, 0, rn, hprev, wh, h2, h)
        for r in range(rn):
            ar = acc[r, 0:h]
            az = acc[r, h:h2]
            an = acc[r, h2:gh]
            gr = gates[r, 0:h]
            gz = gates[r, h:h2]
            gn = gates[r, h2:gh]
            n_rec = accn[r, 0:h]
            hnr = hn[r, 0:h]
            hp = hprev[r, 0:h]
            ho = hout[r, 0:h]
            for j in range(h):
                zg = _sigmoid(az[j])
                if reset_after:
                    rg = _sigmoid(ar[j])
                    ng = _tanh(an[j] + rg * n_rec[j])
                    gr[j] = rg
                else:
                    ng = _tanh(an[j] + n_rec[j])
                gz[j] = zg
                gn[j] = ng
                hnr[j] = n_rec[j]
                ho[j] = (_ONE - zg) * ng + zg * hp[j]
    elif cell == LSTM:
        _matacc(acc, 0, rn, hprev, wh, 0, gh)
        for r in range(rn):
            ai = acc[r, 0:h]
            af = acc[r, h:2 * h]
            ag = acc[r, 2 * h:3 * h]
            ao = acc[r, 3 * h:gh]
            gi = gates[r, 0:h]
            gf = gates[r, h:2 * h]
            gg_ = gates[r, 2 * h:3 * h]
            go = gates[r, 3 * h:gh]
            pi = peep[0, 0:h]
            pf = peep[1, 0:h]
            po = peep[2, 0:h]
            cp = cprev[r, 0:h]
            co = cout[r, 0:h]
            ho = hout[r, 0:h]
            tcr = hn[r, 0:h]
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
        _matacc(acc, 0, rn, hprev, wh, 0, h)
        for r in range(rn):
            a = acc[r, 0:h]
            ho = hout[r, 0:h]
            gs = gates[r, 0:h]
            for j in range(h):
                if cell == RNN_RELU:
                    v = max(a[j], _ZERO)
                else:
                    v = _tanh(a[j])
                ho[j] = v
                gs[j] = v


# ----------------------------------------------------------------- backward, one step
@njit(**_OPTS)
def _layer_backward(cell, reset_after, rn, h, src, hprev, cprev, cnow, gates, hn, peep,
                    w_ih, w_hh, gwx, gwh, gbih, gbhh, gpeep,
                    dh, dc, dsrc, want_dsrc, dhprev, dcprev, dxa, dha, drh):
    """Backward of one step of one layer for rn windows.

    dh (R, H) is dL/dh_t (from above and from t+1), dc (R, H) dL/dc_t carried (LSTM).
    Accumulates parameter gradients (transposed layout), writes dL/dh_{t-1} to dhprev,
    dL/dc_{t-1} to dcprev and, if want_dsrc, adds dL/dinput to dsrc.
    """
    g = n_gates(cell)
    gh = g * h
    if cell == GRU:
        h2 = 2 * h
        for r in range(rn):
            gr = gates[r, 0:h]
            gz = gates[r, h:h2]
            gn = gates[r, h2:gh]
            hp = hprev[r, 0:h]
            hnr = hn[r, 0:h]
            d = dh[r, 0:h]
            dxr = dxa[r, 0:h]
            dxz = dxa[r, h:h2]
            dxn = dxa[r, h2:gh]
            dhn = dha[r, h2:gh]
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
                    dhn[j] = dan * rg
                else:
                    dhn[j] = dan
        if not reset_after:
            # n = tanh(a_n + W_hn (r * h_prev) + b_hn): route through r * h_prev first.
            for r in range(rn):
                dr_ = drh[r, 0:h]
                for j in range(h):
                    dr_[j] = 0
            _back_acc(drh, rn, dxa, h2, w_hh, h2, h)
            for r in range(rn):
                gr = gates[r, 0:h]
                hp = hprev[r, 0:h]
                dr_ = drh[r, 0:h]
                dxr = dxa[r, 0:h]
                dp = dhprev[r, 0:h]
                for j in range(h):
                    rg = gr[j]
                    dxr[j] = dr_[j] * hp[j] * rg * (_ONE - rg)
                    dp[j] += dr_[j] * rg
                    dr_[j] = rg * hp[j]  # r * h_prev, the input of W_hn
        for r in range(rn):
            src_ = dxa[r, 0:h2]
            dst = dha[r, 0:h2]
            for j in range(h2):
                dst[j] = src_[j]
    elif cell == LSTM:
        for r in range(rn):
            gi = gates[r, 0:h]
            gf = gates[r, h:2 * h]
            gg_ = gates[r, 2 * h:3 * h]
            go = gates[r, 3 * h:gh]
            pi = peep[0, 0:h]
            pf = peep[1, 0:h]
            po = peep[2, 0:h]
            gpi = gpeep[0, 0:h]
            gpf = gpeep[1, 0:h]
            gpo = gpeep[2, 0:h]
            cn_ = cnow[r, 0:h]
            cp_ = cprev[r, 0:h]
            tcr = hn[r, 0:h]
            d = dh[r, 0:h]
            dcr = dc[r, 0:h]
            dcp = dcprev[r, 0:h]
            di = dxa[r, 0:h]
            df = dxa[r, h:2 * h]
            dg = dxa[r, 2 * h:3 * h]
            do = dxa[r, 3 * h:gh]
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
                gpi[j] += dai * cp
                gpf[j] += daf * cp
                gpo[j] += dao * cn_[j]
                di[j] = dai
                df[j] = daf
                dg[j] = dct * ig * (_ONE - gg * gg)
                do[j] = dao
            src_ = dxa[r, 0:gh]
            dst = dha[r, 0:gh]
            dp = dhprev[r, 0:h]
            for j in range(gh):
                dst[j] = src_[j]
            for j in range(h):
                dp[j] = 0
    else:
        for r in range(rn):
            gs = gates[r, 0:h]
            d = dh[r, 0:h]
            dx = dxa[r, 0:h]
            dhr = dha[r, 0:h]
            dp = dhprev[r, 0:h]
            for j in range(h):
                hv = gs[j]
                if cell == RNN_RELU:
                    da = d[j] if hv > _ZERO else d[j] * _ZERO
                else:
                    da = d[j] * (_ONE - hv * hv)
                dx[j] = da
                dhr[j] = da
                dp[j] = 0
    # Parameter gradients and gradients to the step's inputs.
    for r in range(rn):
        dx = dxa[r, 0:gh]
        dhr = dha[r, 0:gh]
        for j in range(gh):
            gbih[j] += dx[j]
            gbhh[j] += dhr[j]
    _outer_acc(gwx, 0, rn, src, dxa, 0, gh)
    if cell == GRU and not reset_after:
        _outer_acc(gwh, 0, rn, hprev, dha, 0, 2 * h)
        _outer_acc(gwh, 2 * h, rn, drh, dha, 2 * h, h)
        _back_acc(dhprev, rn, dha, 0, w_hh, 0, 2 * h)
    else:
        _outer_acc(gwh, 0, rn, hprev, dha, 0, gh)
        _back_acc(dhprev, rn, dha, 0, w_hh, 0, gh)
    if want_dsrc:
        _back_acc(dsrc, rn, dxa, 0, w_ih, 0, gh)


# --------------------------------------------------------------- one block of windows
@njit(**_OPTS)
def _block(theta, thetak, x, idx, lo, rn, cell, reset_after, peephole, hidden,
           n_out, gaussian, offs, head, scale, grow, want_grad, outs):
    """Forward (and backward if want_grad) of windows idx[lo:lo+rn]; returns their loss sum.

    Gradients of ``scale * loss`` are added to ``grow`` (kernel layout). If outs has rows,
    the head outputs of window idx[lo+r] go to outs[lo+r] (T, O).
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
    hs = np.zeros((n_layers, n_steps + 1, BLOCK, hmax), dt)
    cs = np.zeros((n_layers, n_steps + 1, BLOCK, hmax), dt)
    gates = np.zeros((n_layers, n_steps, BLOCK, g * hmax), dt)
    hn = np.zeros((n_layers, n_steps, BLOCK, hmax), dt)
    src0 = np.zeros((n_steps, BLOCK, d_in), dt)
    acc = np.zeros((BLOCK, g * hmax), dt)
    accn = np.zeros((BLOCK, hmax), dt)
    rh = np.zeros((BLOCK, hmax), dt)
    nopeep = np.zeros((3, hmax), dt)
    for t in range(n_steps):
        for r in range(rn):
            for d in range(d_in):
                src0[t, r, d] = x[idx[lo + r], t, d]
    # ---- forward, layer by layer over the whole window
    for layer in range(n_layers):
        h = hidden[layer]
        k_in = d_in if layer == 0 else hidden[layer - 1]
        gh = g * h
        wx = _mat(thetak, offs[layer, 0], k_in, gh)
        wh = _mat(thetak, offs[layer, 1], h, gh)
        bih = thetak[offs[layer, 2]:offs[layer, 2] + gh]
        bhh = thetak[offs[layer, 3]:offs[layer, 3] + gh]
        peep = _mat(thetak, offs[layer, 4], 3, h) if peephole else nopeep
        for t in range(n_steps):
            src = src0[t] if layer == 0 else hs[layer - 1, t + 1]
            _layer_forward(cell, reset_after, rn, h, src, hs[layer, t], cs[layer, t],
                           wx, wh, bih, bhh, peep, gates[layer, t], hn[layer, t],
                           hs[layer, t + 1], cs[layer, t + 1], acc, accn, rh)
    # ---- head, loss and the gradient reaching the top layer
    wot = _mat(thetak, head[0], htop, n_out)
    bo = thetak[head[1]:head[1] + n_out]
    wo = _mat(theta, head[0], n_out, htop)
    out = np.zeros((BLOCK, n_out), dt)
    dout = np.zeros((BLOCK, n_out), dt)
    dext = np.zeros((n_steps, BLOCK, hmax), dt)
    n_feat = n_out // 2 if gaussian else n_out
    loss = 0.0
    for t in range(n_steps):
        for r in range(rn):
            for o in range(n_out):
                out[r, o] = bo[o]
        _matacc(out, 0, rn, hs[n_layers - 1, t + 1], wot, 0, n_out)
        for r in range(rn):
            w = idx[lo + r]
            for d in range(n_feat):
                e = out[r, d] - x[w, t + 1, d]
                if gaussian:
                    lv = out[r, n_feat + d]
                    iv = np.exp(-lv)
                    loss += _HALF * (lv + e * e * iv)
                    dout[r, d] = scale * e * iv
                    dout[r, n_feat + d] = scale * _HALF * (_ONE - e * e * iv)
                else:
                    loss += e * e
                    dout[r, d] = scale * _TWO * e
            if outs.shape[0] > 0:
                for o in range(n_out):
                    outs[lo + r, t, o] = out[r, o]
        if want_grad:
            for r in range(rn):
                for o in range(n_out):
                    grow[head[1] + o] += dout[r, o]
            gwo = _mat(grow, head[0], htop, n_out)
            _outer_acc(gwo, 0, rn, hs[n_layers - 1, t + 1], dout, 0, n_out)
            _back_acc(dext[t], rn, dout, 0, wo, 0, n_out)
    if not want_grad:
        return loss
    # ---- backward through time, top layer first
    dnext = np.zeros((n_steps, BLOCK, hmax), dt)
    dsrc0 = np.zeros((BLOCK, d_in), dt)
    dh = np.zeros((BLOCK, hmax), dt)
    dhc = np.zeros((BLOCK, hmax), dt)
    dcc = np.zeros((BLOCK, hmax), dt)
    dxa = np.zeros((BLOCK, g * hmax), dt)
    dha = np.zeros((BLOCK, g * hmax), dt)
    gnopeep = np.zeros((3, hmax), dt)
    for layer in range(n_layers - 1, -1, -1):
        h = hidden[layer]
        k_in = d_in if layer == 0 else hidden[layer - 1]
        gh = g * h
        w_ih = _mat(theta, offs[layer, 0], gh, k_in)
        w_hh = _mat(theta, offs[layer, 1], gh, h)
        peep = _mat(thetak, offs[layer, 4], 3, h) if peephole else nopeep
        gwx = _mat(grow, offs[layer, 0], k_in, gh)
        gwh = _mat(grow, offs[layer, 1], h, gh)
        gbih = grow[offs[layer, 2]:offs[layer, 2] + gh]
        gbhh = grow[offs[layer, 3]:offs[layer, 3] + gh]
        gpeep = _mat(grow, offs[layer, 4], 3, h) if peephole else gnopeep
        dhc[:] = 0
        dcc[:] = 0
        if layer > 0:
            dnext[:] = 0
        for t in range(n_steps - 1, -1, -1):
            for r in range(rn):
                for j in range(h):
                    dh[r, j] = dext[t, r, j] + dhc[r, j]
            src = src0[t] if layer == 0 else hs[layer - 1, t + 1]
            dsrc = dsrc0 if layer == 0 else dnext[t]
            _layer_backward(cell, reset_after, rn, h, src, hs[layer, t], cs[layer, t],
                            cs[layer, t + 1], gates[layer, t], hn[layer, t], peep,
                            w_ih, w_hh, gwx, gwh, gbih, gbhh, gpeep,
                            dh, dcc, dsrc, layer > 0, dhc, dcc, dxa, dha, rh)
        if layer > 0:
            dext, dnext = dnext, dext
    return loss


# ------------------------------------------------------------------ batch entry points
@njit(**_PAR_OPTS)
def batch_grad(theta, x, idx, cell, reset_after, peephole, hidden, n_out, gaussian,
               offs, head, scale):
    """Loss sum and gradient of ``scale * loss`` (PyTorch layout, float64) over windows x[idx].

    x is (N, T+1, D): inputs x[:, :T], one-step-ahead targets x[:, 1:]. The loss is the
    squared error summed over windows, steps and features (or the Gaussian negative
    log-likelihood without its constant); ``scale`` is usually 1 / (len(idx) * T * D).
    """
    g = n_gates(cell)
    d_in = x.shape[2]
    thetak = to_kernel_layout(theta, g, hidden, d_in, n_out, offs, head)
    n = idx.shape[0]
    n_blocks = (n + BLOCK - 1) // BLOCK
    total = theta.shape[0]
    rows = np.zeros((n_blocks, total), theta.dtype)
    losses = np.zeros(n_blocks)
    no_outs = np.zeros((0, 1, 1), theta.dtype)
    for b in prange(n_blocks):
        lo = b * BLOCK
        rn = min(BLOCK, n - lo)
        losses[b] = _block(theta, thetak, x, idx, lo, rn, cell, reset_after, peephole,
                           hidden, n_out, gaussian, offs, head, scale, rows[b], True, no_outs)
    # Fixed-order reduction: block 0, 1, 2, ... whatever thread ran which block.
    summed = np.zeros(total)
    loss = 0.0
    for b in range(n_blocks):
        loss += losses[b]
        for i in range(total):
            summed[i] += rows[b, i]
    grad = np.zeros(total)
    from_kernel_layout_add(grad, summed, g, hidden, d_in, n_out, offs, head, total)
    return loss, grad


@njit(**_PAR_OPTS)
def batch_forward(theta, x, idx, cell, reset_after, peephole, hidden, n_out, gaussian,
                  offs, head, want_outputs):
    """Loss sum over windows x[idx] and, if want_outputs, their head outputs (n, T, O)."""
    g = n_gates(cell)
    d_in = x.shape[2]
    thetak = to_kernel_layout(theta, g, hidden, d_in, n_out, offs, head)
    n = idx.shape[0]
    n_blocks = (n + BLOCK - 1) // BLOCK
    losses = np.zeros(n_blocks)
    outs = np.zeros((n if want_outputs else 0, x.shape[1] - 1, n_out), theta.dtype)
    dummy = np.zeros(0, theta.dtype)
    for b in prange(n_blocks):
        lo = b * BLOCK
        rn = min(BLOCK, n - lo)
        losses[b] = _block(theta, thetak, x, idx, lo, rn, cell, reset_after, peephole,
                           hidden, n_out, gaussian, offs, head, 1.0, dummy, False, outs)
    loss = 0.0
    for b in range(n_blocks):
        loss += losses[b]
    return loss, outs
