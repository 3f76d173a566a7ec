"""Streaming and whole-sequence forward passes built on ``cells.layer_step``.

A micro-batch interleaves events of many streams. It is cut into *waves*: wave k holds the
k-th event of every stream present, so within a wave every stream appears at most once and
rows can be stepped in parallel, while waves run in order and keep each stream's events in
arrival order. A whole-sequence forward over B sequences is the same thing with one wave per
time step, so both share one row kernel and give identical numbers.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from streamrnn.config import ROW_BLOCK, jit_options
from streamrnn.kernels.cells import head_step, layer_step

_OPTS = jit_options()
_PAR_OPTS = jit_options(parallel=True)

#: Waves smaller than this run on the calling thread: starting a parallel region costs
#: more than stepping a few streams.
SERIAL_WAVE = 64


@njit(**_OPTS)
def _step_rows(lo, hi, ev, sl, xs, state, pred, prev_out,
               cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo,
               acc, accn, rh, ev_blk, sl_blk):
    """Step rows lo..hi of a wave in blocks of ROW_BLOCK, with caller-owned scratch."""
    n_layers = hidden.shape[0]
    top = offsets[n_layers - 1]
    n_out = wo.shape[1]
    for r0 in range(lo, hi, ROW_BLOCK):
        rn = min(ROW_BLOCK, hi - r0)
        for r in range(rn):
            ev_blk[r] = ev[r0 + r]
            sl_blk[r] = sl[r0 + r]
        for r in range(rn):
            e = ev_blk[r]
            s = sl_blk[r]
            for j in range(n_out):
                prev_out[e, j] = pred[s, j]
        layer_step(cell, reset_after, rn, xs, ev_blk, 0, state, sl_blk, offsets[0], hidden[0],
                   wx[0], wh[0], b[0], bhn[0], peep[0], acc, accn, rh)
        for layer in range(1, n_layers):
            layer_step(cell, reset_after, rn, state, sl_blk, offsets[layer - 1], state, sl_blk,
                       offsets[layer], hidden[layer], wx[layer], wh[layer], b[layer],
                       bhn[layer], peep[layer], acc, accn, rh)
        head_step(rn, state, sl_blk, top, wo, bo, pred, sl_blk)


@njit(**_OPTS)
def _scratch(hidden):
    hmax = 0
    for h in hidden:
        hmax = max(hmax, h)
    acc = np.empty((ROW_BLOCK, 4 * hmax), np.float32)
    accn = np.empty((ROW_BLOCK, hmax), np.float32)
    rh = np.empty((ROW_BLOCK, hmax), np.float32)
    return acc, accn, rh, np.empty(ROW_BLOCK, np.int64), np.empty(ROW_BLOCK, np.int64)


@njit(**_PAR_OPTS)
def _step_wave_parallel(n, n_threads, ev, sl, xs, state, pred, prev_out,
                        cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo):
    # A few chunks per thread balance the load; each chunk owns its scratch, and rows of
    # one wave are distinct streams, so chunks never write the same state row.
    # (n_threads comes from the caller: numba.get_num_threads() here would stop caching.)
    n_chunks = min(n_threads * 4, (n + ROW_BLOCK - 1) // ROW_BLOCK)
    per = (n + n_chunks - 1) // n_chunks
    per = (per + ROW_BLOCK - 1) // ROW_BLOCK * ROW_BLOCK
    for c in prange(n_chunks):
        lo = c * per
        hi = min(n, lo + per)
        if lo < hi:
            acc, accn, rh, ev_blk, sl_blk = _scratch(hidden)
            _step_rows(lo, hi, ev, sl, xs, state, pred, prev_out, cell, reset_after, hidden,
                       offsets, wx, wh, b, bhn, peep, wo, bo, acc, accn, rh, ev_blk, sl_blk)


@njit(**_OPTS)
def _step_wave(n, n_threads, ev, sl, xs, state, pred, prev_out,
               cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo):
    if n < SERIAL_WAVE:
        acc, accn, rh, ev_blk, sl_blk = _scratch(hidden)
        _step_rows(0, n, ev, sl, xs, state, pred, prev_out, cell, reset_after, hidden,
                   offsets, wx, wh, b, bhn, peep, wo, bo, acc, accn, rh, ev_blk, sl_blk)
    else:
        _step_wave_parallel(n, n_threads, ev, sl, xs, state, pred, prev_out, cell, reset_after, hidden,
                            offsets, wx, wh, b, bhn, peep, wo, bo)


@njit(**_OPTS)
def plan_waves(slots, scratch):
    """Order events into waves: returns (order, starts).

    order[starts[k]:starts[k+1]] are the indices of each stream's k-th event in the batch, in
    arrival order. ``scratch`` is an int32 array over all slots, zero on entry and on exit.
    """
    n = slots.shape[0]
    rank = np.empty(n, np.int64)
    n_waves = 0
    for e in range(n):
        s = slots[e]
        k = scratch[s]
        rank[e] = k
        scratch[s] = k + 1
        n_waves = max(n_waves, k + 1)
    for e in range(n):
        scratch[slots[e]] = 0
    starts = np.zeros(n_waves + 1, np.int64)
    for e in range(n):
        starts[rank[e] + 1] += 1
    for k in range(n_waves):
        starts[k + 1] += starts[k]
    fill = starts[:-1].copy()
    order = np.empty(n, np.int64)
    for e in range(n):
        k = rank[e]
        order[fill[k]] = e
        fill[k] += 1
    return order, starts


@njit(**_OPTS)
def step_events(slots, xs, state, pred, prev_out, scratch, n_threads,
                cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo):
    """Score-then-step a micro-batch of events from interleaved streams.

    For event e of stream slot s = slots[e]: prev_out[e] = pred[s] (the prediction stored
    for it, NaN for a stream's first event), then the state of s steps on xs[e] and pred[s]
    becomes the prediction for that stream's next event.
    """
    order, starts = plan_waves(slots, scratch)
    ev_slots = np.empty(order.shape[0], np.int64)
    for i in range(order.shape[0]):
        ev_slots[i] = slots[order[i]]
    for k in range(starts.shape[0] - 1):
        lo = starts[k]
        hi = starts[k + 1]
        _step_wave(hi - lo, n_threads, order[lo:hi], ev_slots[lo:hi], xs, state, pred, prev_out,
                   cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo)


@njit(**_OPTS)
def forward_sequences(x, state, n_threads, cell, reset_after, hidden, offsets,
                      wx, wh, b, bhn, peep, wo, bo):
    """Run B sequences (B, T, D) from ``state`` (B, F), updated in place.

    Returns (B, T, O): output t is the head's prediction after stepping on x[:, t].
    """
    n_seq, n_steps, n_feat = x.shape
    n_out = wo.shape[1]
    out = np.empty((n_seq, n_steps, n_out), np.float32)
    pred = np.empty((n_seq, n_out), np.float32)
    prev = np.empty((n_seq, n_out), np.float32)
    xs = np.empty((n_seq, n_feat), np.float32)
    rows = np.arange(n_seq)
    for t in range(n_steps):
        for i in range(n_seq):
            for d in range(n_feat):
                xs[i, d] = x[i, t, d]
        _step_wave(n_seq, n_threads, rows, rows, xs, state, pred, prev,
                   cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo)
        for i in range(n_seq):
            for j in range(n_out):
                out[i, t, j] = pred[i, j]
    return out
