"""One stream's run with its hidden units split between two threads (streamrnn.kernels.split).

Bit for bit against the one-thread path (single.step_stream) for every cell and variant,
stacked layers and odd sizes (unequal halves), in whatever mode the run ended up (both
workers, one from the start, worker 0 alone after a slow stretch); against the float64
reference and PyTorch; the fallbacks when the partner never comes (one Numba thread) or is
preempted (CPU hogs on both cores); and the call sites in kernels.stream.
"""

from __future__ import annotations

import threading
import time

import numba
import numpy as np
import pytest
import torch
from numba import njit

from streamrnn import Model
from streamrnn.kernels import split
from streamrnn.kernels.single import OUT_AFTER, OUT_BEFORE, step_stream
from streamrnn.kernels.stream import forward_sequences, step_events
from tests import naive
from tests.test_single import VARIANTS  # every cell and variant, as the one-thread tests



@pytest.fixture(autouse=True)
def _all_numba_threads():
    """Every Numba thread for this module's tests: the number is per calling thread and
    sticks, and tests run earlier in the session (a daemon, a training run) may leave it 1."""
    before = numba.get_num_threads()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    yield
    numba.set_num_threads(before)


# Even and odd halves (33: 16 + 17 units), vector groups and single columns, 1-3 layers, 1-9
# features (a head of one vector and more).
SHAPES = [([64], 1), ([33], 3), ([40, 17], 2), ([33, 64, 9], 1), ([17, 64], 8), ([64], 9)]
#: Handshake bound for the tests: long enough that a busy partner still joins (a run that
#: pairs is what most tests want), short enough not to matter when it does not.
JOIN = 50_000_000
#: Paired for the whole run whatever happens (the paired code itself under test).
STRICT = -1


@pytest.fixture(autouse=True)
def _splitting_on():
    """Splitting can be switched off (split.enable); these tests want it on."""
    was = split._HEALTH[4]
    split.enable(True)
    yield
    split._HEALTH[4] = was


def test_splitting_can_be_switched_off():
    split._HEALTH[0] = 0
    split.enable(False)
    assert not split.split_worth(10_000, 2, *_weights("lstm", [64]))
    split.enable(True)
    assert split.split_worth(10_000, 2, *_weights("lstm", [64]))


def _inputs(model, length, seed):
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((length, model.n_features)).astype(np.float32)
    # A state row in the middle of a table, with a non-zero starting state and prediction.
    state = np.zeros((3, model.packed.state_width), np.float32)
    state[1] = rng.standard_normal(model.packed.state_width).astype(np.float32) * 0.3
    pred = np.full((3, model.n_outputs), np.nan, np.float32)
    pred[1] = rng.standard_normal(model.n_outputs).astype(np.float32)
    return xs, state, pred


def _one_thread(model, xs, state, pred, mode):
    state, pred = state.copy(), pred.copy()
    out = np.full((xs.shape[0], model.n_outputs), np.nan, np.float32)
    step_stream(np.arange(xs.shape[0]), np.array([1]), xs, 0, state, pred, out, mode, *model.packed.kernel_args(),
                *_scratch(model))
    return state, pred, out


def _scratch(model):
    """step_stream's scratch as kernels.stream passes it (the same specialisation)."""
    hmax = max(model.hidden)
    return np.empty((1, 4 * hmax), np.float32), np.empty((1, hmax), np.float32), np.empty(hmax, np.float32)


@pytest.mark.parametrize("options,hidden", [({"cell": "lstm"}, [64]), ({"cell": "lstm", "peephole": True}, [40, 17]),
                                            ({"cell": "gru", "reset_after": False}, [33, 64])])
def test_worker_0_going_on_alone_mid_run_keeps_the_bits(options, hidden):
    """Worker 0 takes over every unit after event 50 (as when pairing stops paying): it holds
    only its own units' c and gets worker 1's when it leaves; forced here, so the hand-over
    is checked every time, not only when a busy machine happens to stop a run."""
    model = Model.random(n_features=3, hidden=hidden, seed=7, **options)
    xs, state, pred = _inputs(model, 150, 7)
    for mode in (OUT_BEFORE, OUT_AFTER):
        want = _one_thread(model, xs, state, pred, mode)
        split._HEALTH[5] = 50
        try:
            got, info = _split(model, xs, state, pred, mode, join=JOIN)
        finally:
            split._HEALTH[5] = 0
        _assert_same_bits(got, want)
        if info[0] == 1:  # paired (else the partner never came: one thread stepped the run)
            assert info[1] > 0


def _split(model, xs, state, pred, mode, join=STRICT):
    # STRICT with one Numba thread would wait for ever: prange runs the two workers in turn.
    assert join >= 0 or numba.get_num_threads() >= 2, "forced pairing needs two Numba threads"
    state, pred = state.copy(), pred.copy()
    out = np.full((xs.shape[0], model.n_outputs), np.nan, np.float32)
    info = np.zeros(4, np.int64)
    split.step_stream_split(np.arange(xs.shape[0]), np.array([1]), xs, 0, state, pred, out, mode, info, join,
                            *model.packed.kernel_args(), *_scratch(model))
    return (state, pred, out), info


def _assert_same_bits(a, b):
    for x, y in zip(a, b):
        assert np.array_equal(x, y, equal_nan=True)


@pytest.mark.parametrize("options", VARIANTS)
@pytest.mark.parametrize("hidden,d", SHAPES)
def test_split_run_equals_one_thread_bit_for_bit(options, hidden, d):
    model = Model.random(n_features=d, hidden=hidden, seed=len(hidden) + d, **options)
    xs, state, pred = _inputs(model, 150, d)
    for mode in (OUT_BEFORE, OUT_AFTER):
        want = _one_thread(model, xs, state, pred, mode)
        got, info = _split(model, xs, state, pred, mode)
        _assert_same_bits(got, want)
        assert info[0] == 1 and info[1] == 0  # paired to the end
        # As the call sites run it: whatever mode the run ends in, the same bits.
        got, info = _split(model, xs, state, pred, mode, join=JOIN)
        _assert_same_bits(got, want)
    # Every row but the stepped one is untouched.
    assert np.array_equal(got[0][[0, 2]], state[[0, 2]])


def test_runs_as_the_call_sites_take_them_give_the_same_bits_paired_or_not():
    """As step_events takes a run (bounded handshake, back-off): whether the partner joins,
    leaves half-way or never comes (another process may hold the second core), the same
    bits. That the paired path itself is exact is forced and asserted above (join=-1)."""
    model = Model.random(n_features=1, hidden=[64], seed=1, cell="lstm")
    xs, state, pred = _inputs(model, 400, 0)
    want = _one_thread(model, xs, state, pred, OUT_BEFORE)
    for _ in range(20):
        got, _info = _split(model, xs, state, pred, OUT_BEFORE, join=JOIN)
        _assert_same_bits(got, want)


@pytest.mark.parametrize("options", VARIANTS)
def test_split_run_matches_float64_reference(options):
    model = Model.random(n_features=2, hidden=[33, 20], seed=5, **options)
    x = (np.random.default_rng(1).standard_normal((80, 2)) * 2).astype(np.float32)
    scaled = ((x - model.scaler_mean) / model.scaler_scale).astype(np.float32)
    state = np.zeros((1, model.packed.state_width), np.float32)
    pred = np.zeros((1, 2), np.float32)
    out = np.empty((80, 2), np.float32)
    split.step_stream_split(np.arange(80), np.zeros(1, np.int64), scaled, 0, state, pred, out, OUT_AFTER,
                            np.zeros(4, np.int64), JOIN, *model.packed.kernel_args(), *_scratch(model))
    np.testing.assert_allclose(out * model.scaler_scale + model.scaler_mean, naive.forward(model, x),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_split_run_matches_pytorch(kind):
    torch.manual_seed(0)
    rnn = getattr(torch.nn, kind)(3, 48, num_layers=2)
    head = torch.nn.Linear(48, 3)
    model = Model.from_torch(rnn, head)
    x = np.random.default_rng(2).standard_normal((120, 3)).astype(np.float32)
    with torch.no_grad():
        seq, _ = rnn(torch.from_numpy(x)[:, None])
        want = head(seq[:, 0]).numpy()
    state = np.zeros((1, model.packed.state_width), np.float32)
    out = np.empty((120, 3), np.float32)
    split.step_stream_split(np.arange(120), np.zeros(1, np.int64), x, 0, state, np.zeros((1, 3), np.float32), out,
                            OUT_AFTER, np.zeros(4, np.int64), JOIN, *model.packed.kernel_args(), *_scratch(model))
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)


def test_one_numba_thread_runs_alone_after_the_bounded_wait():
    """With one thread Numba runs the two workers one after the other: the first waits
    join_cycles for a partner that cannot come, claims the run and steps it alone; the
    second sees that and leaves (no deadlock)."""
    model = Model.random(n_features=1, hidden=[64], seed=2, cell="gru")
    xs, state, pred = _inputs(model, 300, 3)
    want = _one_thread(model, xs, state, pred, OUT_BEFORE)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        got, info = _split(model, xs, state, pred, OUT_BEFORE, join=200_000)
    finally:
        numba.set_num_threads(before)
    _assert_same_bits(got, want)
    assert info[0] == 2  # alone from the start



@njit(nogil=True, cache=False)
def _spin(seconds_of_work):
    """A CPU hog that does not hold the GIL."""
    s = 0.0
    for i in range(int(seconds_of_work * 3e8)):
        s += i * 1e-9
    return s


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_busy_cores_still_give_the_same_bits(cell):
    """Two hog threads share the cores with the workers: a worker is preempted between
    barriers (the partner yields, then worker 0 goes on alone). Runs finish, same bits."""
    model = Model.random(n_features=1, hidden=[64, 32], seed=4, cell=cell)
    xs, state, pred = _inputs(model, 3000, 4)
    want = _one_thread(model, xs, state, pred, OUT_BEFORE)
    _spin(0.0)
    hogs = [threading.Thread(target=_spin, args=(3.0,)) for _ in range(2)]
    for hog in hogs:
        hog.start()
    modes = set()
    try:
        for _ in range(8):
            got, info = _split(model, xs, state, pred, OUT_BEFORE, join=JOIN)
            _assert_same_bits(got, want)
            modes.add((int(info[0]), bool(info[1])))
    finally:
        for hog in hogs:
            hog.join()
    assert modes <= {(1, False), (1, True), (2, False)}


def _weights(cell, hidden, d=1):
    args = Model.random(n_features=d, hidden=hidden, seed=0, cell=cell).packed.kernel_args()
    return args[2], args[4], args[5]  # hidden, wx, wh


def test_split_worth_takes_long_runs_of_big_layers_with_two_threads():
    split._HEALTH[0] = 0  # no back-off from earlier runs
    assert split.split_worth(split.MIN_EVENTS, 2, *_weights("lstm", [64]))
    assert split.split_worth(split.MIN_EVENTS, 2, *_weights("gru", [64]))
    assert not split.split_worth(split.MIN_EVENTS - 1, 2, *_weights("lstm", [64]))
    assert not split.split_worth(10_000, 1, *_weights("lstm", [64]))
    # Small layers: a step is too short for a barrier per layer.
    assert not split.split_worth(10_000, 2, *_weights("lstm", [32]))
    assert not split.split_worth(10_000, 2, *_weights("gru", [64, 8]))
    assert split.split_worth(10_000, 2, *_weights("gru", [64, 64]))


def _alone(join):
    """One run with one Numba thread (the partner cannot come); returns split_worth after it."""
    model = Model.random(n_features=1, hidden=[64], seed=2, cell="gru")
    xs, state, pred = _inputs(model, 100, 3)
    split._HEALTH[0] = 0
    split._HEALTH[1] = 0
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        _, info = _split(model, xs, state, pred, OUT_BEFORE, join=join)
    finally:
        numba.set_num_threads(before)
    assert info[0] == 2
    return split.split_worth(10_000, 2, *_weights("lstm", [64]))


def test_a_costly_run_that_did_not_pay_pauses_splitting():
    # The handshake waited 4x CHEAP_FAILURE for nothing: back off.
    assert not _alone(4 * split.CHEAP_FAILURE)
    assert split._HEALTH[1] >= split.BACKOFF_MIN
    split._HEALTH[0] = 0


def test_a_cheap_failure_tries_again_next_run():
    # A partner that was merely asleep costs a short wait: no back-off, or a pool that
    # idles between runs would never be split again.
    assert _alone(1000)
    assert split._HEALTH[1] == 0


@pytest.mark.parametrize("options", [{"cell": "lstm"}, {"cell": "gru", "reset_after": False}])
def test_call_sites_split_long_single_stream_runs_with_the_same_bits(options):
    """kernels.stream's one-stream micro-batch and one-sequence forward take the split for a
    long run with two threads (when no back-off is in force) and give the one-thread bits."""
    model = Model.random(n_features=2, hidden=[72, 65], seed=6, **options)
    args = model.packed.kernel_args()
    rng = np.random.default_rng(7)
    xs = rng.standard_normal((500, 2)).astype(np.float32)
    slots = np.zeros(500, np.int64)
    results = []
    for threads in (1, 2):
        split._HEALTH[0] = 0
        runs = split.split_counts()[0]
        state = np.zeros((1, model.packed.state_width), np.float32)
        pred = np.full((1, 2), np.nan, np.float32)
        prev = np.empty((500, 2), np.float32)
        step_events(slots, xs, state, pred, prev, np.zeros(1, np.int32), threads, *args)
        split._HEALTH[0] = 0
        fwd = forward_sequences(xs[None], np.zeros((1, model.packed.state_width), np.float32), threads, *args)
        assert split.split_counts()[0] - runs == (2 if threads == 2 else 0)
        results.append((state, pred, prev, fwd))
    _assert_same_bits(results[0], results[1])
    assert np.array_equal(results[0][2][1:], results[0][3][0, :-1])
