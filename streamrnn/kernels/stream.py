"""Streaming and whole-sequence forward passes built on ``cells.layer_step``.

A micro-batch interleaves events of many streams. It is first ordered into *waves*: wave k
holds the k-th event of every stream present, in arrival order. Walking that order, runs of
up to ``TILE_ROWS`` consecutive events of distinct streams are stepped together as one tile
(each is its stream's next event, so every stream still sees its events in arrival order).

For parallelism the streams, not the waves, are split: each chunk owns the streams with
``slot % n_chunks == c`` and walks their events wave by wave, so a whole micro-batch is one
parallel region with no barrier between waves (on a busy machine a barrier per wave is
where the time goes). A whole-sequence forward over B sequences is the same with one wave
per time step. Each output element is computed by the same code in the same order however
the events were batched, chunked or tiled, so all give identical numbers.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from streamrnn.config import jit_options
from streamrnn.kernels.cells import LINE, TILE_ROWS, head_step, layer_step, prefetch_row
from streamrnn.kernels.single import OUT_AFTER, OUT_BEFORE, OUT_NONE, step_stream
from streamrnn.kernels.split import step_stream_run

# The reference-counting flag always given, as in cells.
_OPTS = dict(jit_options(), _nrt=True)
_PAR_OPTS = dict(jit_options(parallel=True), _nrt=True)
#: The per-block loop and step allocate nothing: compiled without reference counting (see cells).
_LEAF = dict(_OPTS, _nrt=False)

#: Batches with fewer distinct streams than this run on the calling thread: starting a
#: parallel region costs more than stepping a few streams.
SERIAL_WAVE = 64
#: Chunks per thread the streams are split into (balances the load).
CHUNKS_PER_THREAD = 4
#: Batches with at least this many events step on padded copies of the weights
#: (``padded_weights``: an LSTM64's are ~70 KB to copy).
PAD_MIN = 1024


@njit(**_OPTS)
def scratch_pool(n_chunks, hidden, n_in, n_out):
    """Scratch for ``n_chunks`` concurrent row blocks, allocated once per kernel call.

    Returns (xp, hp, acc, accn, blk): packed layer inputs (C, TILE_ROWS, K), packed hidden
    states (C, TILE_ROWS, H), gate accumulators (C, TILE_ROWS, G) and (C, TILE_ROWS, H), and
    the block's event and slot indices and the next block's slots (C, 3, TILE_ROWS).
    """
    hmax = 1
    for h in hidden:
        hmax = max(hmax, h)
    kmax = max(n_in, hmax)
    gmax = max(4 * hmax, n_out)
    return (np.empty((n_chunks, TILE_ROWS, kmax), np.float32),
            np.empty((n_chunks, TILE_ROWS, hmax), np.float32),
            np.empty((n_chunks, TILE_ROWS, gmax), np.float32),
            np.empty((n_chunks, TILE_ROWS, hmax), np.float32),
            np.empty((n_chunks, 3, TILE_ROWS), np.int64))


@njit(**_OPTS)
def _needs_padding(wx, wh, hidden):
    """Whether some layer's weight rows fall in so few L1 sets that a 16-column panel of
    them (its input and recurrent rows, read by every 6-row tile) does not fit their 8 ways
    each: rows a multiple of 2^s lines apart use 64 / 2^s of the 64 sets. LSTM64: rows 1 KB
    apart, 4 sets for 65+ rows, so every tile re-read the panel from L2."""
    for layer in range(hidden.shape[0]):
        size = wh[layer].shape[1] * 4
        if size % LINE != 0:
            continue
        lines = size // LINE
        sets = 64
        while lines % 2 == 0 and sets > 1:
            lines //= 2
            sets //= 2
        if wx[layer].shape[0] + wh[layer].shape[0] > 8 * sets:
            return True
    return False


@njit(**_OPTS)
def no_pad():
    """The empty weight copies: the tiles read the weights as they are."""
    return np.empty((0, 0, 0), np.float32)


@njit(**_OPTS)
def padded_weights(wx, wh, hidden, n_events):
    """Copies of every layer's wx and wh, rows an odd number of cache lines long (so rows
    fall in all L1 sets), as (L, rows, width) arrays for ``_step_block_w``; empty when the
    weights fit the L1 sets as they are or the batch is too short to repay the copy.
    The same products in the same order: the same bits."""
    n_layers = hidden.shape[0]
    if n_events < PAD_MIN or not _needs_padding(wx, wh, hidden):
        return no_pad(), no_pad()
    nx = 1
    nh = 1
    cols = 1
    for layer in range(n_layers):
        nx = max(nx, wx[layer].shape[0])
        nh = max(nh, wh[layer].shape[0])
        cols = max(cols, wh[layer].shape[1])
    lines = (cols * 4 + LINE - 1) // LINE
    width = (lines + 1 - lines % 2) * (LINE // 4)
    wxp = np.zeros((n_layers, nx, width), np.float32)
    whp = np.zeros((n_layers, nh, width), np.float32)
    for layer in range(n_layers):
        _copy_rows(wxp[layer], wx[layer])
        _copy_rows(whp[layer], wh[layer])
    return wxp, whp


@njit(**_OPTS)
def _copy_rows(dst, src):
    """dst[:rows, :cols] = src (plain loops: a slice assignment compiles Numba's broadcasting)."""
    for i in range(src.shape[0]):
        d = dst[i]
        s = src[i]
        for j in range(s.shape[0]):
            d[j] = s[j]


@njit(**_OPTS)
def _step_block(rn, src, src_col, src_rows, state, rows, pred,
                cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo, xp, hp, acc, accn):
    """``_step_block_w`` with the weights as they are."""
    _step_block_w(rn, src, src_col, src_rows, state, rows, pred, cell, reset_after, hidden, offsets,
                  wx, wh, b, bhn, peep, wo, bo, no_pad(), no_pad(), xp, hp, acc, accn, rows, 0)


@njit(**_LEAF)
def _step_block_w(rn, src, src_col, src_rows, state, rows, pred,
                  cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo, wxp, whp,
                  xp, hp, acc, accn, ahead, n_ahead):
    """Step ``rn`` <= TILE_ROWS distinct streams (state rows ``rows``) on their inputs
    src[src_rows[r], src_col:], then store the head's prediction in pred[rows[r]]. The
    tiles read the layers' weights from ``padded_weights``' copies wxp, whp unless empty.
    State rows ahead[:n_ahead] are prefetched meanwhile.

    A lone row takes the matrix-vector path (``single.step_stream``: same sums, same bits)
    instead of register tiles padded to 4 rows."""
    if rn == 1:
        for r in range(n_ahead):
            prefetch_row(state, ahead[r])
        step_stream(src_rows[:1], rows, src, src_col, state, pred, pred, OUT_NONE, cell, reset_after,
                    hidden, offsets, wx, wh, b, bhn, peep, wo, bo, acc, accn, hp[0])
        return
    n_layers = hidden.shape[0]
    padded = whp.shape[0] > 0
    for layer in range(n_layers):
        wxl = wxp[layer] if padded else wx[layer]
        whl = whp[layer] if padded else wh[layer]
        if layer == 0:
            layer_step(cell, reset_after, rn, src, src_rows, src_col, wx[0].shape[0], state, rows,
                       offsets[0], hidden[0], wxl, whl, b[0], bhn[0], peep[0], xp, hp, acc, accn,
                       ahead, n_ahead)
        else:
            layer_step(cell, reset_after, rn, state, rows, offsets[layer - 1], hidden[layer - 1],
                       state, rows, offsets[layer], hidden[layer], wxl, whl, b[layer],
                       bhn[layer], peep[layer], xp, hp, acc, accn, ahead, 0)
    head_step(rn, state, rows, offsets[n_layers - 1], hidden[n_layers - 1], wo, bo, pred, rows, hp, acc)


@njit(**_LEAF)
def _step_list(lo, hi, ev, sl, xs, state, pred, prev_out,
               cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo, wxp, whp,
               xp, hp, acc, accn, blk):
    """Score-then-step events ev[lo:hi] of slots sl[lo:hi], a list in which each stream's
    events are in arrival order, with one chunk's scratch.

    Runs of up to TILE_ROWS consecutive events of distinct streams form a tile: each is its
    stream's next event, since the stream's earlier ones came earlier in the list.
    """
    n_out = wo.shape[1]
    ev_blk = blk[0]
    sl_blk = blk[1]
    ahead = blk[2]
    i = lo
    while i < hi:
        rn = 0
        while i < hi and rn < TILE_ROWS:
            s = sl[i]
            fresh = True
            for r in range(rn):
                fresh = fresh and sl_blk[r] != s
            if not fresh:
                break
            ev_blk[rn] = ev[i]
            sl_blk[rn] = s
            rn += 1
            i += 1
        # The next block's streams are (most likely) the next TILE_ROWS in the list: their
        # state rows, scattered over a table too large for the caches when there are many
        # streams, are fetched while this block computes (the gate loops request them a row
        # at a time); their predictions, a line or two each, now.
        n_ahead = min(hi, i + TILE_ROWS) - i
        for q in range(n_ahead):
            ahead[q] = sl[i + q]
            prefetch_row(pred, ahead[q])
        for r in range(rn):
            e = ev_blk[r]
            s = sl_blk[r]
            for j in range(n_out):
                prev_out[e, j] = pred[s, j]
        _step_block_w(rn, xs, 0, ev_blk, state, sl_blk, pred, cell, reset_after, hidden, offsets,
                      wx, wh, b, bhn, peep, wo, bo, wxp, whp, xp, hp, acc, accn, ahead, n_ahead)


@intrinsic
def _claim(typingctx, counter):
    """Atomically counter[0] += 1, returning the value before: the next chunk for the
    calling thread."""
    if not (isinstance(counter, types.Array) and counter.ndim == 1 and counter.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", ary.data, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counter), codegen


@njit(**_PAR_OPTS)
def _step_chunks_parallel(starts, ev, sl, xs, state, pred, prev_out,
                          cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo, wxp, whp,
                          xp, hp, acc, accn, blk):
    # Chunks own disjoint sets of streams, so they never write the same state or pred row.
    # Threads claim chunks one at a time: with another process on a core, the thread
    # sharing it takes fewer chunks instead of the whole batch waiting for its static share
    # (Numba's prange splits iterations into equal parts per thread). Iteration w is a
    # worker with scratch slice w; workers that start after the chunks ran out do nothing.
    n_chunks = starts.shape[0] - 1
    counter = np.zeros(1, np.int64)
    for w in prange(n_chunks):
        c = _claim(counter)
        while c < n_chunks:
            _step_list(starts[c], starts[c + 1], ev, sl, xs, state, pred, prev_out, cell, reset_after,
                       hidden, offsets, wx, wh, b, bhn, peep, wo, bo, wxp, whp,
                       xp[w], hp[w], acc[w], accn[w], blk[w])
            c = _claim(counter)


@njit(**_OPTS)
def _split_by_stream(order, ev_slots, n_chunks):
    """Stable partition of the wave order by chunk (slot % n_chunks): (events, slots, starts)."""
    n = order.shape[0]
    starts = np.zeros(n_chunks + 1, np.int64)
    for i in range(n):
        starts[ev_slots[i] % n_chunks + 1] += 1
    for c in range(n_chunks):
        starts[c + 1] += starts[c]
    fill = starts[:-1].copy()
    ev = np.empty(n, np.int64)
    sl = np.empty(n, np.int64)
    for i in range(n):
        c = ev_slots[i] % n_chunks
        ev[fill[c]] = order[i]
        sl[fill[c]] = ev_slots[i]
        fill[c] += 1
    return ev, sl, starts


@njit(**_OPTS)
def _n_chunks(n_threads, n_streams):
    if n_threads <= 1 or n_streams < SERIAL_WAVE:
        return 1
    return min(n_threads * CHUNKS_PER_THREAD, (n_streams + TILE_ROWS - 1) // TILE_ROWS)


@njit(**_OPTS)
def _tile_ranges(n, n_chunks):
    """Bounds of n_chunks contiguous ranges over n rows, each a multiple of TILE_ROWS long."""
    per = (n + n_chunks - 1) // n_chunks
    per = (per + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS
    starts = np.empty(n_chunks + 1, np.int64)
    for c in range(n_chunks + 1):
        starts[c] = min(n, c * per)
    return starts


@njit(**_OPTS)
def step_wave_scratch(n, ev, sl, xs, state, pred, prev_out,
                      cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo,
                      xp, hp, acc, accn, blk):
    """One wave (``n`` rows of distinct streams) with a pool from ``scratch_pool``: its
    first dimension is the number of chunks the rows are split into (1: serial)."""
    n_chunks = 1 if n < SERIAL_WAVE else min(xp.shape[0], (n + TILE_ROWS - 1) // TILE_ROWS)
    if n_chunks <= 1:
        _step_list(0, n, ev, sl, xs, state, pred, prev_out, cell, reset_after, hidden,
                   offsets, wx, wh, b, bhn, peep, wo, bo, no_pad(), no_pad(),
                   xp[0], hp[0], acc[0], accn[0], blk[0])
        return
    starts = _tile_ranges(n, n_chunks)
    _step_chunks_parallel(starts, ev, sl, xs, state, pred, prev_out, cell, reset_after, hidden,
                          offsets, wx, wh, b, bhn, peep, wo, bo, no_pad(), no_pad(),
                          xp, hp, acc, accn, blk)


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
    n = order.shape[0]
    if n == 0:
        return
    ev_slots = np.empty(n, np.int64)
    for i in range(n):
        ev_slots[i] = slots[order[i]]
    n_streams = starts[1] - starts[0]  # wave 0 has every stream once
    n_chunks = _n_chunks(n_threads, n_streams)
    xp, hp, acc, accn, blk = scratch_pool(n_chunks, hidden, wx[0].shape[0], wo.shape[1])
    wxp, whp = padded_weights(wx, wh, hidden, n if n_streams > 1 else 0)
    if n_streams == 1:
        # One stream: its events in order through the single-row step (the same bits as
        # in a block), with no blocks to form.
        step_stream_run(order, ev_slots[:1], xs, 0, state, pred, prev_out, OUT_BEFORE, n_threads, cell,
                        reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo, acc[0], accn[0], hp[0, 0])
    elif n_chunks == 1:
        _step_list(0, n, order, ev_slots, xs, state, pred, prev_out, cell, reset_after, hidden,
                   offsets, wx, wh, b, bhn, peep, wo, bo, wxp, whp, xp[0], hp[0], acc[0], accn[0], blk[0])
    else:
        ev, sl, cstarts = _split_by_stream(order, ev_slots, n_chunks)
        _step_chunks_parallel(cstarts, ev, sl, xs, state, pred, prev_out, cell, reset_after, hidden,
                              offsets, wx, wh, b, bhn, peep, wo, bo, wxp, whp, xp, hp, acc, accn, blk)


@njit(**_OPTS)
def _forward_chunk(lo, hi, x2, n_steps, state, pred, out,
                   cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo, xp, hp, acc, accn, blk):
    """Sequences lo..hi through all time steps; x2 is (B, T*D), out (B, T, O)."""
    n_feat = wx[0].shape[0]
    n_out = wo.shape[1]
    rows = blk[0]
    for t in range(n_steps):
        for r0 in range(lo, hi, TILE_ROWS):
            rn = min(TILE_ROWS, hi - r0)
            for r in range(rn):
                rows[r] = r0 + r
            _step_block(rn, x2, t * n_feat, rows, state, rows, pred, cell, reset_after, hidden, offsets,
                        wx, wh, b, bhn, peep, wo, bo, xp, hp, acc, accn)
            for r in range(rn):
                for j in range(n_out):
                    out[r0 + r, t, j] = pred[r0 + r, j]


@njit(**_PAR_OPTS)
def _forward_parallel(starts, x2, n_steps, state, pred, out,
                      cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo, xp, hp, acc, accn, blk):
    for c in prange(starts.shape[0] - 1):
        _forward_chunk(starts[c], starts[c + 1], x2, n_steps, state, pred, out, cell, reset_after,
                       hidden, offsets, wx, wh, b, bhn, peep, wo, bo, xp[c], hp[c], acc[c], accn[c], blk[c])


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
    x2 = np.ascontiguousarray(x).reshape(n_seq, n_steps * n_feat)
    n_chunks = _n_chunks(n_threads, n_seq)
    xp, hp, acc, accn, blk = scratch_pool(n_chunks, hidden, n_feat, n_out)
    starts = _tile_ranges(n_seq, n_chunks)
    if n_seq == 1:
        # One sequence: its steps through the single-row step (the same bits as in a block).
        rows = np.zeros(1, np.int64)
        step_stream_run(np.arange(n_steps), rows, x2.reshape(n_steps, n_feat), 0, state, pred, out[0],
                        OUT_AFTER, n_threads, cell, reset_after, hidden, offsets, wx, wh, b, bhn, peep, wo, bo,
                        acc[0], accn[0], hp[0, 0])
    elif n_chunks == 1:
        _forward_chunk(0, n_seq, x2, n_steps, state, pred, out, cell, reset_after, hidden, offsets,
                       wx, wh, b, bhn, peep, wo, bo, xp[0], hp[0], acc[0], accn[0], blk[0])
    else:
        _forward_parallel(starts, x2, n_steps, state, pred, out, cell, reset_after, hidden, offsets,
                          wx, wh, b, bhn, peep, wo, bo, xp, hp, acc, accn, blk)
    return out
