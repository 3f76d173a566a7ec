"""The recurrent kernels against PyTorch and a float64 NumPy reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit
from scipy.special import expit

from streamrnn import Model
from streamrnn.kernels import cells, microtile
from streamrnn.kernels.activations import sigmoid32, tanh32
from streamrnn.kernels.stream import PAD_MIN, forward_sequences, padded_weights, scratch_pool, step_events
from tests import naive
from tests.stream_support import step_in_batches

TOL = 1e-5


@njit
def _apply(fn_code, x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = tanh32(x[i]) if fn_code == 0 else sigmoid32(x[i])
    return out


# The kernels evaluate the activations with fused multiply-adds (fastmath "contract"), callers
# compiled without fastmath (such as _apply) without: two roundings of the same polynomials.
_apply_fused = njit(fastmath={"contract"})(_apply.py_func)


@pytest.mark.parametrize("apply", [_apply, _apply_fused], ids=["plain", "fused"])
def test_activations_on_dense_grid_within_5e7_of_exact(apply):
    x = np.concatenate([np.linspace(-30, 30, 200_001), [0.0, 1e-8, -1e-8, 1e4, -1e4]]).astype(np.float32)
    x64 = x.astype(np.float64)
    assert np.abs(apply(0, x) - np.tanh(x64)).max() < 5e-7
    assert np.abs(apply(1, x) - expit(x64)).max() < 5e-7


def _torch_pair(kind, n_layers, d, h, batch_first, seed):
    torch.manual_seed(seed)
    rnn = getattr(torch.nn, kind)(d, h, num_layers=n_layers, batch_first=batch_first)
    head = torch.nn.Linear(h, d)
    return rnn, head


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("d,h", [(1, 8), (5, 32), (1, 32), (5, 8)])
def test_predict_matches_torch_within_1e5(kind, n_layers, d, h):
    rnn, head = _torch_pair(kind, n_layers, d, h, batch_first=True, seed=n_layers * 100 + h + d)
    model = Model.from_torch(rnn, head)
    x = (np.random.default_rng(h + d).standard_normal((3, 50, d)) * 2).astype(np.float32)
    with torch.no_grad():
        ref = head(rnn(torch.from_numpy(x))[0]).numpy()
    np.testing.assert_allclose(model.predict(x), ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(model.predict(x[1]), ref[1], atol=TOL, rtol=0)


def test_predict_matches_torch_with_sequence_first_layout_and_relu_rnn():
    torch.manual_seed(3)
    rnn = torch.nn.RNN(2, 16, num_layers=2, nonlinearity="relu")  # batch_first=False
    head = torch.nn.Linear(16, 2)
    model = Model.from_torch(rnn, head)
    x = np.random.default_rng(0).standard_normal((40, 4, 2)).astype(np.float32)  # (T, B, D)
    with torch.no_grad():
        ref = head(rnn(torch.from_numpy(x))[0]).numpy()
    np.testing.assert_allclose(model.predict(x.transpose(1, 0, 2)), ref.transpose(1, 0, 2), atol=TOL)


@pytest.mark.parametrize("options", [
    {"cell": "gru", "reset_after": False},
    {"cell": "gru", "reset_after": True},
    {"cell": "lstm", "peephole": True},
    {"cell": "lstm"},
    {"cell": "rnn"},
])
@pytest.mark.parametrize("hidden", [[8], [16, 8], [8, 8, 8]])
def test_predict_matches_naive_reference_for_variants(options, hidden):
    opts = dict(options)
    model = Model.random(n_features=3, hidden=hidden, seed=len(hidden), **opts)
    x = np.random.default_rng(1).standard_normal((60, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), naive.forward(model, x), atol=TOL)


def test_predict_with_scaler_works_in_raw_units():
    model = Model.random("gru", n_features=2, hidden=[8], seed=4,
                         scaler_mean=[100.0, -3.0], scaler_scale=[10.0, 0.5])
    x = np.random.default_rng(2).normal([100, -3], [10, 0.5], (30, 2))
    np.testing.assert_allclose(model.predict(x), naive.forward(model, x), rtol=1e-5, atol=1e-4)


def test_reset_before_and_after_gru_differ_on_same_weights():
    a = Model.random("gru", n_features=1, hidden=[8], seed=5, reset_after=True)
    b = Model.random("gru", n_features=1, hidden=[8], seed=5, reset_after=False)
    x = np.random.default_rng(3).standard_normal((20, 1)).astype(np.float32)
    assert not np.allclose(a.predict(x), b.predict(x), atol=1e-4)


def test_batched_predict_equals_each_sequence_alone_bit_for_bit():
    model = Model.random("lstm", n_features=2, hidden=[16, 16], seed=6)
    x = np.random.default_rng(4).standard_normal((70, 25, 2)).astype(np.float32)
    batched = model.predict(x)
    for i in (0, 33, 69):
        assert np.array_equal(batched[i], model.predict(x[i]))


def test_predict_with_wrong_shape_raises_clear_error():
    model = Model.random("gru", n_features=2, hidden=[8])
    with pytest.raises(ValueError, match=r"\(T, 2\)"):
        model.predict(np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="numeric"):
        model.predict(np.array([["a", "b"]]))


def test_random_model_is_reproducible_by_seed():
    a = Model.random("lstm", n_features=2, hidden=[8], seed=11)
    b = Model.random("lstm", n_features=2, hidden=[8], seed=11)
    c = Model.random("lstm", n_features=2, hidden=[8], seed=12)
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a._named_arrays(), b._named_arrays()))
    assert not np.array_equal(a.head_weight, c.head_weight)


def test_from_torch_rejects_bidirectional_and_wrong_head():
    with pytest.raises(ValueError, match="bidirectional"):
        Model.from_torch(torch.nn.GRU(1, 4, bidirectional=True), torch.nn.Linear(8, 1))
    with pytest.raises(ValueError, match="next input"):
        Model.from_torch(torch.nn.GRU(2, 4), torch.nn.Linear(4, 3))


# ------------------------------------------------------------------ register-tiled kernels
# Sizes whose gate columns (G*H) end in a partial tile: 32-column panels plus 16-wide and
# narrower tails, so every tile shape the micro-kernel has is exercised.
TILE_MODELS = [
    {"cell": "gru", "hidden": [11], "n_features": 1},                       # 33 = 32 + 1
    {"cell": "gru", "hidden": [24], "n_features": 3, "reset_after": False},  # 72 = 2x32 + 8
    {"cell": "lstm", "hidden": [12], "n_features": 2, "peephole": True},     # 48 = 32 + 16
    {"cell": "lstm", "hidden": [8, 20], "n_features": 1},
    {"cell": "rnn", "hidden": [40], "n_features": 3},                        # 40 = 32 + 8
    {"cell": "rnn", "hidden": [5], "n_features": 2, "nonlinearity": "relu"},
]
_TILE_CACHE: dict = {}


def _tile_model(i):
    if i not in _TILE_CACHE:
        _TILE_CACHE[i] = Model.random(seed=20 + i, **TILE_MODELS[i])
    return _TILE_CACHE[i]


@pytest.mark.parametrize("nx,nh,ncols", [(1, 64, 256), (3, 11, 33), (0, 24, 72), (5, 0, 15), (2, 7, 48),
                                         (0, 64, 8), (3, 9, 27)])
def test_block_product_matches_float64_and_ignores_row_slot(nx, nh, ncols):
    rng = np.random.default_rng(nx * 100 + nh + ncols)
    wx = rng.standard_normal((max(nx, 1), ncols + 5), dtype=np.float32)
    wh = rng.standard_normal((max(nh, 1), ncols + 5), dtype=np.float32)
    bias = rng.standard_normal(ncols + 3, dtype=np.float32)
    xp = rng.standard_normal((cells.TILE_ROWS, max(nx, 1)), dtype=np.float32)
    hp = rng.standard_normal((cells.TILE_ROWS, max(nh, 1)), dtype=np.float32)
    acc = np.zeros((cells.TILE_ROWS, ncols + 2), np.float32)
    # Offsets in the weights (col 4), the bias (bcol 3) and the output (acc_col 2).
    cells.block_product(acc, 2, bias, 3, 4, ncols, cells.TILE_ROWS, xp, nx, wx, hp, nh, wh)
    ref = (bias[3:3 + ncols].astype(np.float64)
           + xp[:, :nx].astype(np.float64) @ wx[:nx, 4:4 + ncols]
           + hp[:, :nh].astype(np.float64) @ wh[:nh, 4:4 + ncols])
    np.testing.assert_allclose(acc[:, 2:], ref, rtol=1e-5, atol=1e-5)
    # The same row in every slot of the tile, beside different neighbours: identical bits.
    for slot in range(cells.TILE_ROWS):
        xq = rng.standard_normal(xp.shape, dtype=np.float32)
        hq = rng.standard_normal(hp.shape, dtype=np.float32)
        xq[slot], hq[slot] = xp[0], hp[0]
        out = np.zeros_like(acc)
        cells.block_product(out, 2, bias, 3, 4, ncols, cells.TILE_ROWS, xq, nx, wx, hq, nh, wh)
        assert np.array_equal(out[slot], acc[0])
    # A partial block computes whole micro-tiles only and leaves the rows past them alone.
    rn = cells.MR + 1
    part = np.full_like(acc, -7.0)
    cells.block_product(part, 2, bias, 3, 4, ncols, rn, xp, nx, wx, hp, nh, wh)
    assert np.array_equal(part[:rn, 2:], acc[:rn, 2:])
    assert (part[cells.padded_rows(rn):] == -7.0).all()


@pytest.mark.skipif(not microtile.AVAILABLE, reason="the assembly tile needs x86-64 AVX2/FMA and 16-column panels")
def test_assembly_tiles_give_the_bits_of_the_numba_tiles():
    # block_product runs 6-row assembly tiles where the host has them: every block size
    # (the 6-row tiles and the 4-row tiles left over), offsets, narrow tails, nx or nh of 0
    # must give the bits of the Numba-only product, and leave rows past the padding alone.
    assert cells.block_product is cells.block_product_micro
    rng = np.random.default_rng(5)
    for rn in range(1, cells.TILE_ROWS + 1):
        # 8 columns (a head of 8 outputs) and 24, 27 (a panel, then 8 more) take the 8-column tile.
        for nx, nh, ncols in [(1, 64, 256), (8, 64, 192), (0, 33, 40), (3, 0, 16), (2, 5, 70),
                              (0, 64, 8), (4, 7, 24), (2, 3, 27)]:
            col, bcol, acc_col = (int(v) for v in rng.integers(0, 5, 3))
            wx = rng.standard_normal((max(nx, 1), ncols + col + 3), dtype=np.float32)
            wh = rng.standard_normal((max(nh, 1), ncols + col + 1), dtype=np.float32)
            bias = rng.standard_normal(ncols + bcol, dtype=np.float32)
            xp = rng.standard_normal((cells.TILE_ROWS, max(nx, 1) + 2), dtype=np.float32)
            hp = rng.standard_normal((cells.TILE_ROWS, max(nh, 1)), dtype=np.float32)
            asm = np.full((cells.TILE_ROWS, ncols + acc_col + 2), -7.0, np.float32)
            ref = asm.copy()
            cells.block_product_micro(asm, acc_col, bias, bcol, col, ncols, rn, xp, nx, wx, hp, nh, wh)
            cells.block_product_numba(ref, acc_col, bias, bcol, col, ncols, rn, xp, nx, wx, hp, nh, wh)
            assert np.array_equal(asm, ref), (rn, nx, nh, ncols)
            assert (asm[cells.padded_rows(rn):] == -7.0).all()
            assert (asm[:, :acc_col] == -7.0).all() and (asm[:, acc_col + ncols:] == -7.0).all()


def test_micro_rows_split_padded_blocks_into_6_and_4_row_tiles():
    for padded in range(0, cells.TILE_ROWS + 1, cells.MR):
        r6 = cells.micro_rows(padded)
        assert r6 % 6 == 0 and (padded - r6) % cells.MR == 0 and padded - r6 <= 8
        assert padded - r6 < 6 or padded - r6 == 8


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("h", [24, 40])
def test_predict_matches_torch_at_partial_tiles(kind, h):
    rnn, head = _torch_pair(kind, 2, 3, h, batch_first=True, seed=h)
    model = Model.from_torch(rnn, head)
    x = np.random.default_rng(h).standard_normal((5, 30, 3)).astype(np.float32)
    with torch.no_grad():
        ref = head(rnn(torch.from_numpy(x))[0]).numpy()
    np.testing.assert_allclose(model.predict(x), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("i", range(len(TILE_MODELS)))
def test_tile_models_match_naive_reference(i):
    model = _tile_model(i)
    x = np.random.default_rng(i).standard_normal((25, model.n_features)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), naive.forward(model, x), atol=TOL)


@pytest.mark.parametrize("i", range(len(TILE_MODELS)))
def test_parallel_waves_equal_each_sequence_alone_bit_for_bit(i):
    # 150 sequences: the parallel wave path (chunks of tiles on all threads, a partial last
    # tile); each alone: one row in a tile of 4, on the calling thread.
    model = _tile_model(i)
    x = np.random.default_rng(i).standard_normal((150, 6, model.n_features)).astype(np.float32)
    batched = model.predict(x)
    for b in (0, 1, 77, 149):
        assert np.array_equal(batched[b], model.predict(x[b]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(i=st.integers(0, len(TILE_MODELS) - 1), n_streams=st.integers(1, 9), length=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1), n_cuts=st.integers(0, 12))
def test_step_events_any_interleaving_and_batching_equals_forward_bit_for_bit(i, n_streams, length, seed,
                                                                                n_cuts):
    model = _tile_model(i)
    rng = np.random.default_rng(seed)
    d = model.n_features
    seqs = rng.standard_normal((n_streams, length, d)).astype(np.float32)
    slots, xs = _events_of(seqs, rng)
    cuts = sorted(rng.integers(0, slots.shape[0], n_cuts))
    prev, pred = step_in_batches(model, slots, xs, [0, *cuts, slots.shape[0]], n_streams)
    p = model.packed
    state = np.zeros((n_streams, p.state_width), np.float32)
    ref = forward_sequences(seqs, state, 2, *p.kernel_args())  # (B, T, O), network units
    for s in range(n_streams):
        got = prev[slots == s]
        assert np.isnan(got[0]).all()
        assert np.array_equal(got[1:], ref[s, :-1])
        assert np.array_equal(pred[s], ref[s, -1])


@pytest.mark.parametrize("i", [0, 1, 2])
def test_step_events_split_across_threads_equals_forward_bit_for_bit(i):
    # 150 streams of uneven lengths: the batch is split by stream into parallel chunks
    # (n_threads=2), and also run on one thread; both equal each stream's forward alone.
    model = _tile_model(i)
    rng = np.random.default_rng(40 + i)
    lengths = rng.integers(1, 6, 150)
    seqs = [rng.standard_normal((n, model.n_features)).astype(np.float32) for n in lengths]
    slots = np.repeat(np.arange(150, dtype=np.int64), lengths)
    rng.shuffle(slots)
    pos = np.zeros(150, np.int64)
    xs = np.empty((slots.shape[0], model.n_features), np.float32)
    for e, s in enumerate(slots):
        xs[e] = seqs[s][pos[s]]
        pos[s] += 1
    p = model.packed
    outs = []
    for n_threads in (2, 1):
        state = np.zeros((150, p.state_width), np.float32)
        pred = np.full((150, model.n_outputs), np.nan, np.float32)
        prev = np.empty((slots.shape[0], model.n_outputs), np.float32)
        step_events(slots, xs, state, pred, prev, np.zeros(150, np.int32), n_threads, *p.kernel_args())
        outs.append(prev)
    assert np.array_equal(outs[0], outs[1], equal_nan=True)
    for s in (0, 1, 74, 149):
        ref = forward_sequences(seqs[s][None], np.zeros((1, p.state_width), np.float32), 1, *p.kernel_args())[0]
        got = outs[0][slots == s]
        assert np.isnan(got[0]).all() and np.array_equal(got[1:], ref[:-1])


def test_step_events_any_chunk_count_same_bits_and_scratch_left_zero():
    # 400 streams, 1-4 events each: every chunk count step_events picks (1 thread: one
    # list; 2, 3, 5 threads: 8, 12 and 17 chunks, the last bounded by the 17 blocks of 24
    # streams) gives the same bits, and the slot scratch is all zero again afterwards.
    model = _tile_model(1)
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 5, 400)
    slots = np.repeat(np.arange(400, dtype=np.int64), lengths)
    rng.shuffle(slots)
    xs = rng.standard_normal((slots.shape[0], model.n_features)).astype(np.float32)
    p = model.packed
    outs = []
    for n_threads in (1, 2, 3, 5):
        state = np.zeros((400, p.state_width), np.float32)
        pred = np.full((400, model.n_outputs), np.nan, np.float32)
        prev = np.empty((slots.shape[0], model.n_outputs), np.float32)
        scratch = np.zeros(400, np.int32)
        step_events(slots, xs, state, pred, prev, scratch, n_threads, *p.kernel_args())
        assert not scratch.any()
        outs.append((prev, state))
    for prev, state in outs[1:]:
        assert np.array_equal(prev, outs[0][0], equal_nan=True)
        assert np.array_equal(state, outs[0][1])
    first = np.unique(slots, return_index=True)[1]
    assert np.isnan(outs[0][0][first]).all() and not np.isnan(np.delete(outs[0][0], first, 0)).any()


def _events_of(seqs, rng):
    """Every stream's events interleaved at random, each stream's in order: (slots, xs)."""
    n_streams, length, d = seqs.shape
    slots = np.repeat(np.arange(n_streams, dtype=np.int64), length)
    rng.shuffle(slots)
    pos = np.zeros(n_streams, np.int64)
    xs = np.empty((slots.shape[0], d), np.float32)
    for e, s in enumerate(slots):
        xs[e] = seqs[s, pos[s]]
        pos[s] += 1
    return slots, xs


def test_step_events_on_padded_weight_copies_equals_forward_bit_for_bit():
    # LSTM64's weight rows are 1 KB apart (4 of the 64 L1 sets): a batch of PAD_MIN events
    # or more steps on copies with rows an odd number of lines long, both layers (the
    # second layer's wx is 64 rows too). The whole-sequence forward reads the weights in
    # place: the same bits. D=8: the head's 8 outputs take the 8-column tile.
    model = Model.random("lstm", n_features=8, hidden=[64, 64], seed=3)
    args = model.packed.kernel_args()
    wxp, whp = padded_weights(args[4], args[5], args[2], PAD_MIN)
    assert whp.shape == (2, 64, 272) and wxp.shape == (2, 64, 272)
    assert np.array_equal(wxp[0, :8, :256], args[4][0]) and np.array_equal(whp[1, :, :256], args[5][1])
    assert padded_weights(args[4], args[5], args[2], PAD_MIN - 1)[1].shape[0] == 0
    gru = Model.random("gru", n_features=8, hidden=[64], seed=3).packed.kernel_args()
    assert padded_weights(gru[4], gru[5], gru[2], PAD_MIN)[1].shape[0] == 0  # rows 768 B apart: 16 sets

    rng = np.random.default_rng(9)
    n_streams, length = 200, 6
    seqs = rng.standard_normal((n_streams, length, 8)).astype(np.float32)
    slots, xs = _events_of(seqs, rng)
    assert slots.shape[0] >= PAD_MIN
    width = model.packed.state_width
    state = np.zeros((n_streams, width), np.float32)
    pred = np.full((n_streams, 8), np.nan, np.float32)
    prev = np.empty((slots.shape[0], 8), np.float32)
    step_events(slots, xs, state, pred, prev, np.zeros(n_streams, np.int32), 2, *args)
    ref = forward_sequences(seqs, np.zeros((n_streams, width), np.float32), 2, *args)
    for s in range(n_streams):
        got = prev[slots == s]
        assert np.isnan(got[0]).all()
        assert np.array_equal(got[1:], ref[s, :-1])
        assert np.array_equal(pred[s], ref[s, -1])
    np.testing.assert_allclose(ref[7], naive.forward(model, seqs[7]), atol=TOL)


def test_scratch_pool_sizes_cover_inputs_wider_than_hidden():
    hidden = np.array([8, 4], np.int64)
    xp, hp, acc, accn, blk = scratch_pool(3, hidden, 20, 30)
    assert xp.shape == (3, cells.TILE_ROWS, 20) and hp.shape == (3, cells.TILE_ROWS, 8)
    assert acc.shape == (3, cells.TILE_ROWS, 32) and accn.shape == (3, cells.TILE_ROWS, 8)
    assert blk.shape == (3, 3, cells.TILE_ROWS)
    model = Model.random("lstm", n_features=20, hidden=[4], seed=3)
    x = np.random.default_rng(5).standard_normal((40, 20)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), naive.forward(model, x), atol=TOL)


# ------------------------------------------------------------------------ on-disk cache
_CACHE_PROBE = """
import numpy as np
from streamrnn.kernels import cells, microtile
dst = np.empty((4, 3), np.float32)  # (padded rows, n)
cells.pack_rows(dst, np.arange(12, dtype=np.float32).reshape(4, 3), np.array([1, 2]), 2, 0, 3)
assert np.array_equal(dst[0], [3, 4, 5]) and not dst[2:].any()
st = cells.pack_rows.stats
print(sum(st.cache_hits.values()), sum(st.cache_misses.values()), bool(cells.pack_rows.targetoptions["fastmath"]))
"""


def test_kernel_cache_keeps_option_sets_apart_and_tracks_every_kernel_file(tmp_path):
    # A private copy of the package, so a kernel file can be edited and the cache is fresh.
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "streamrnn", tmp_path / "streamrnn",
                    ignore=shutil.ignore_patterns("__pycache__"))

    def probe(**env):
        full = {k: v for k, v in os.environ.items() if not k.startswith("STREAMRNN_")}
        full.update(PYTHONPATH=str(tmp_path), NUMBA_CACHE_DIR=str(tmp_path / "cache"), **env)
        out = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=full, cwd=tmp_path,
                             capture_output=True, text=True, check=True)
        hits, misses, fastmath = out.stdout.split()
        return int(hits), int(misses), fastmath == "True"

    assert probe() == (0, 1, True)  # compiled and saved
    assert probe() == (1, 0, True)  # loaded
    # Other options: compiled with them, not the default build loaded from disk.
    assert probe(STREAMRNN_FASTMATH="0") == (0, 1, False)
    assert probe(STREAMRNN_FASTMATH="0") == (1, 0, False)
    assert probe() == (1, 0, True)  # the default build is still there
    # A kernel file cells.py does not use (scoring.py) edited: still valid.
    with open(tmp_path / "streamrnn" / "kernels" / "scoring.py", "a") as fh:
        fh.write("\n# edited\n")
    assert probe() == (1, 0, True)
    # pack_rows lives in cells.py, but kernels inline the functions they call: a file it
    # uses (activations.py) edited must invalidate it.
    with open(tmp_path / "streamrnn" / "kernels" / "activations.py", "a") as fh:
        fh.write("\n# edited\n")
    assert probe() == (0, 1, True)


def test_module_dependencies_follow_imported_kernels():
    from streamrnn.config import module_dependencies
    deps = module_dependencies("streamrnn.kernels.stream")
    assert {"streamrnn.kernels.stream", "streamrnn.kernels.cells", "streamrnn.kernels.activations",
            "streamrnn.config"} <= set(deps)
    assert "streamrnn.kernels.scoring" not in deps


_PANEL_PROBE = """
import sys
import numpy as np
from streamrnn import Model
from streamrnn.config import PANEL
from streamrnn.kernels import cells, microtile
x = np.random.default_rng(3).standard_normal((5, 30, 3)).astype(np.float32)
outs = [Model.random(cell, n_features=3, hidden=[40, 24], seed=1).predict(x) for cell in ("gru", "lstm", "rnn")]
np.save(sys.argv[1], np.stack(outs))
print(PANEL, cells.NARROW)
"""


@pytest.mark.slow
@pytest.mark.parametrize("panel", ["16", "32"])
def test_tile_width_never_changes_results(tmp_path, panel):
    # The tile width follows the host's vector registers (STREAMRNN_PANEL overrides it); both
    # widths, with their narrow tails (hidden 40 and 24 are not multiples of 32 or 16), must
    # give the same bits as this process's build.
    env = {k: v for k, v in os.environ.items() if k != "STREAMRNN_PANEL"}
    out = subprocess.run([sys.executable, "-c", _PANEL_PROBE, str(tmp_path / "p.npy")],
                         env={**env, "STREAMRNN_PANEL": panel}, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [panel, str(int(panel) // 2)]
    x = np.random.default_rng(3).standard_normal((5, 30, 3)).astype(np.float32)
    here = np.stack([Model.random(cell, n_features=3, hidden=[40, 24], seed=1).predict(x)
                     for cell in ("gru", "lstm", "rnn")])
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), here)


def test_lstm_gates_without_peepholes_give_the_same_bits():
    # Models without peepholes take a loop with no peephole terms; with zero peepholes the
    # general loop must produce exactly the same state.
    rng = np.random.default_rng(7)
    rn, h = 5, 40
    acc = (3 * rng.standard_normal((cells.TILE_ROWS, 4 * h))).astype(np.float32)
    state = rng.standard_normal((9, 2 * h + 3), dtype=np.float32)
    rows = np.array([8, 2, 5, 0, 3], np.int64)
    before = state.copy()
    plain = state.copy()
    ahead = np.array([1, 4, 6], np.int64)  # rows prefetched meanwhile: read, not written
    cells._lstm_gates(rn, state, rows, 3, h, acc, np.zeros((3, h), np.float32), ahead, 3)
    cells._lstm_gates_plain(rn, plain, rows, 3, h, acc, ahead, 3)
    assert np.array_equal(state, plain)
    assert not np.array_equal(state[rows], before[rows])  # the rows did step
    assert np.array_equal(np.delete(state, rows, 0), np.delete(before, rows, 0))


@pytest.mark.parametrize("nx", [1, 3, cells.FEW_INPUTS])
def test_input_rows_give_the_bits_of_block_product(nx):
    # The GRU's input-only product takes input_rows for a few inputs; the numbers must not
    # depend on which of the two computed them.
    rng = np.random.default_rng(nx)
    rn, ncols, col, width = 7, 40, 24, 80
    xp = rng.standard_normal((cells.TILE_ROWS, nx), dtype=np.float32)
    wx = rng.standard_normal((nx, width), dtype=np.float32)
    bias = rng.standard_normal(width, dtype=np.float32)
    tiled = np.zeros((cells.TILE_ROWS, 3 * ncols), np.float32)
    rows = np.zeros_like(tiled)
    cells.block_product(tiled, ncols, bias, col, col, ncols, rn, xp, nx, wx, xp, 0, wx)
    cells.input_rows(rows, ncols, bias, col, rn, xp, nx, wx, col, ncols)
    assert np.array_equal(rows[:rn], tiled[:rn])
    exact = bias[col:col + ncols] + xp[:rn].astype(np.float64) @ wx[:, col:col + ncols]
    np.testing.assert_allclose(rows[:rn, ncols:2 * ncols], exact, rtol=1e-5, atol=1e-5)
    assert not rows[:rn, :ncols].any() and not rows[:rn, 2 * ncols:].any()  # nothing else written


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_gate_loops_against_float64_reference(reset_after):
    rng = np.random.default_rng(11)
    rn, h, off = 6, 40, 3
    acc = (3 * rng.standard_normal((cells.TILE_ROWS, 4 * h))).astype(np.float32)
    accn = (3 * rng.standard_normal((cells.TILE_ROWS, h))).astype(np.float32)
    state = rng.standard_normal((9, h + 5), dtype=np.float32)
    rows = np.array([8, 2, 5, 0, 3, 7], np.int64)
    a64, n64 = acc[:rn].astype(np.float64), accn[:rn].astype(np.float64)
    h_old = state[rows, off:off + h].astype(np.float64)
    r_g, z_g = expit(a64[:, :h]), expit(a64[:, h:2 * h])
    n_g = np.tanh(a64[:, 2 * h:3 * h] + (r_g * n64 if reset_after else n64))
    expected = (1 - z_g) * n_g + z_g * h_old
    before = state.copy()
    ahead = np.array([1, 4, 6], np.int64)  # rows prefetched meanwhile: read, not written
    if reset_after:
        cells._gru_gates_after(rn, state, rows, off, h, acc.copy(), accn, ahead, 3)
    else:
        cells._gru_gates_before(rn, state, rows, off, h, acc.copy(), accn, ahead, 3)
    np.testing.assert_allclose(state[rows, off:off + h], expected, rtol=0, atol=2e-6)
    untouched = np.ones(state.shape, bool)
    untouched[rows, off:off + h] = False
    assert np.array_equal(state[untouched], before[untouched])
