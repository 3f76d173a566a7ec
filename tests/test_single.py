"""The single-row step (streamrnn.kernels.single): a stream stepped alone.

Against a float64 NumPy reference for every cell and variant, and bit for bit against the
block (register tile) path, since a stream's outputs must not depend on whether it
happened to be alone in a micro-batch.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from streamrnn import Model
from streamrnn.config import jit_options
from streamrnn.kernels import cells, single
from streamrnn.kernels.stream import forward_sequences
from tests import naive
from tests.stream_support import step_in_batches

TOL = 1e-5

VARIANTS = [
    {"cell": "gru", "reset_after": True},
    {"cell": "gru", "reset_after": False},
    {"cell": "lstm"},
    {"cell": "lstm", "peephole": True},
    {"cell": "rnn"},
    {"cell": "rnn", "nonlinearity": "relu"},
]
# Layer sizes and feature counts that reach every product shape: 64-column register spans
# (LSTM16, GRU32, LSTM20 = 64 + 16), narrower spans (GRU16's 32 and 16 columns, GRU20's
# 32 + 8, a head of 8), single columns (H=5: 5 n-gate columns; D=1 and D=3 heads).
SHAPES = [([16], 1), ([32], 8), ([20, 5], 3), ([5, 16, 32], 2)]


# matvec is inlined, so it compiles with its caller's options: the kernels' (FMA contraction).
# Not cached: Numba would key the cached wrapper by this file alone and reuse it after an
# edit of the matvec it inlines.
@njit(**dict(jit_options(), cache=False))
def _matvec(acc, bias, x, nx, wx, h, nh, wh, col, ncols):
    at, data = single._at, single._data
    single.matvec(at(data(acc), 1), at(data(bias), 2), at(data(x), 1), nx, at(data(wx), col), wx.shape[1],
                  at(data(h), 3), nh, at(data(wh), col), wh.shape[1], ncols)


# Every register span alone and together (64, 32, 16, 8 columns) and single columns after them.
@pytest.mark.parametrize("ncols", [1, 5, 8, 13, 16, 40, 56, 64, 77, 127, 131])
@pytest.mark.parametrize("nx,nh", [(3, 9), (0, 16), (6, 0), (1, 33)])
def test_matvec_equals_a_one_row_block_product_bit_for_bit_and_float64(ncols, nx, nh):
    rng = np.random.default_rng(ncols * 100 + nx * 10 + nh)
    col = 3
    wx = rng.standard_normal((max(nx, 1), col + ncols + 2)).astype(np.float32)
    wh = rng.standard_normal((max(nh, 1), col + ncols + 2)).astype(np.float32)
    bias = rng.standard_normal(ncols + 2).astype(np.float32)
    x = rng.standard_normal(nx + 1).astype(np.float32)
    h = rng.standard_normal(nh + 3).astype(np.float32)
    acc = np.full(ncols + 1, np.nan, np.float32)
    _matvec(acc, bias, x, nx, wx, h, nh, wh, col, ncols)

    ref = (bias[2:2 + ncols].astype(np.float64)
           + x[1:1 + nx].astype(np.float64) @ wx[:nx, col:col + ncols]
           + h[3:3 + nh].astype(np.float64) @ wh[:nh, col:col + ncols])
    np.testing.assert_allclose(acc[1:], ref, rtol=1e-5, atol=1e-5)

    # The tile path on one row (padded to a micro-tile) sums in the same order: same bits.
    xp = np.zeros((cells.TILE_ROWS, max(nx, 1)), np.float32)
    hp = np.zeros((cells.TILE_ROWS, max(nh, 1)), np.float32)
    xp[0, :nx] = x[1:1 + nx]
    hp[0, :nh] = h[3:3 + nh]
    tile = np.zeros((cells.TILE_ROWS, ncols), np.float32)
    cells.block_product(tile, 0, bias, 2, col, ncols, 1, xp, nx, wx, hp, nh, wh)
    assert np.array_equal(acc[1:], tile[0])


@pytest.mark.parametrize("options", VARIANTS)
@pytest.mark.parametrize("hidden,d", SHAPES)
def test_single_sequence_matches_float64_reference(options, hidden, d):
    model = Model.random(n_features=d, hidden=hidden, seed=len(hidden) * 10 + d, **options)
    x = (np.random.default_rng(d).standard_normal((60, d)) * 2).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), naive.forward(model, x), atol=TOL, rtol=0)


@pytest.mark.parametrize("options", VARIANTS)
@pytest.mark.parametrize("hidden,d", SHAPES)
def test_stream_alone_and_mixed_with_others_give_the_same_bits(options, hidden, d):
    model = Model.random(n_features=d, hidden=hidden, seed=7, **options)
    rng = np.random.default_rng(len(hidden) + d)
    n_other, length = 30, 40
    xs_alone = rng.standard_normal((length, d)).astype(np.float32)
    # Stream 0 alone: every micro-batch holds one stream (the single-row path).
    alone, _ = step_in_batches(model, np.zeros(length, np.int64), xs_alone, [0, 17, 18, length], 1)

    # Stream 0 among 30 others (blocks of many rows), then its last events alone in the
    # batch's last waves (blocks of one row inside a multi-stream batch).
    slots = np.concatenate([np.repeat(np.arange(n_other + 1), 25), np.zeros(length - 25, np.int64)])
    head = slots[: (n_other + 1) * 25]
    rng.shuffle(head)
    xs = rng.standard_normal((slots.shape[0], d)).astype(np.float32)
    mine = np.flatnonzero(slots == 0)
    xs[mine] = xs_alone
    mixed, _ = step_in_batches(model, slots, xs, [0, 300, slots.shape[0]], n_other + 1)
    assert np.array_equal(alone, mixed[mine], equal_nan=True)
    assert np.isnan(alone[0]).all() and np.isfinite(alone[1:]).all()

    # And both equal the whole-sequence forward (one sequence alone, and inside a batch).
    fwd_alone = _forward(model, xs_alone[None])[0]
    assert np.array_equal(alone[1:], fwd_alone[:-1])
    others = rng.standard_normal((5, length, d)).astype(np.float32)
    assert np.array_equal(_forward(model, np.concatenate([xs_alone[None], others]))[0], fwd_alone)


def _forward(model, x):
    state = np.zeros((x.shape[0], model.packed.state_width), np.float32)
    return forward_sequences(x, state, 2, *model.packed.kernel_args())
