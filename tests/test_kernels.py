"""The recurrent kernels against PyTorch and a float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit
from scipy.special import expit

from streamrnn import Model
from streamrnn.kernels.activations import sigmoid32, tanh32
from tests import naive

TOL = 1e-5


@njit
def _apply(fn_code, x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = tanh32(x[i]) if fn_code == 0 else sigmoid32(x[i])
    return out


def test_activations_on_dense_grid_within_5e7_of_exact():
    x = np.concatenate([np.linspace(-30, 30, 200_001), [0.0, 1e-8, -1e-8, 1e4, -1e4]]).astype(np.float32)
    x64 = x.astype(np.float64)
    assert np.abs(_apply(0, x) - np.tanh(x64)).max() < 5e-7
    assert np.abs(_apply(1, x) - expit(x64)).max() < 5e-7


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
