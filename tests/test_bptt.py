"""BPTT kernels: gradients against central finite differences and PyTorch autograd (float64),
the training forward against the served forward, and thread-count independence."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from streamrnn import Model
from streamrnn.train import Net

VARIANTS = {
    "rnn-tanh": dict(cell="rnn", hidden=[4]),
    "rnn-relu": dict(cell="rnn", hidden=[4], nonlinearity="relu"),
    "lstm": dict(cell="lstm", hidden=[3]),
    "lstm-peephole": dict(cell="lstm", hidden=[3], peephole=True),
    "gru-reset-after": dict(cell="gru", hidden=[3], reset_after=True),
    "gru-reset-before": dict(cell="gru", hidden=[3], reset_after=False),
    "gru-2-layers": dict(cell="gru", hidden=[3, 4]),
    "lstm-peephole-2-layers": dict(cell="lstm", hidden=[4, 3], peephole=True),
    "rnn-2-layers-gaussian": dict(cell="rnn", hidden=[3, 2], head="gaussian"),
    "gru-before-gaussian": dict(cell="gru", hidden=[4], reset_after=False, head="gaussian"),
    "lstm-gaussian": dict(cell="lstm", hidden=[3], head="gaussian"),
}
N_WINDOWS, WINDOW, N_FEATURES = 5, 6, 2


def setup(name: str, seed: int = 3):
    spec = dict(VARIANTS[name])
    hidden = spec.pop("hidden")
    model = Model.random(n_features=N_FEATURES, hidden=hidden, seed=seed, **spec)
    net = Net.of(model)
    rng = np.random.default_rng(seed)
    windows = rng.normal(size=(N_WINDOWS, WINDOW + 1, N_FEATURES))
    return model, net, windows


def mean_loss(net: Net, theta: np.ndarray, windows: np.ndarray) -> float:
    return net.forward(theta, windows)[0] / (N_WINDOWS * WINDOW * N_FEATURES)


# ------------------------------------------------------------- PyTorch reference (float64)
def torch_loss(net: Net, theta: np.ndarray, windows: np.ndarray):
    """The same loss written step by step with torch ops; returns (loss, leaf tensors)."""
    layers_np, w_np, b_np = net.tensors(theta)
    layers = [{k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in l.items()}
              for l in layers_np]
    head_w = torch.tensor(w_np, dtype=torch.float64, requires_grad=True)
    head_b = torch.tensor(b_np, dtype=torch.float64, requires_grad=True)
    x = torch.tensor(windows[:, :-1])
    y = torch.tensor(windows[:, 1:])
    seq = x
    for p in layers:
        h = torch.zeros(x.shape[0], p["w_hh"].shape[1], dtype=torch.float64)
        c = torch.zeros_like(h)
        outs = []
        for t in range(seq.shape[1]):
            h, c = torch_step(net, p, seq[:, t], h, c)
            outs.append(h)
        seq = torch.stack(outs, 1)
    out = seq @ head_w.T + head_b
    d = N_FEATURES
    if net.head == "gaussian":
        mu, lv = out[..., :d], out[..., d:]
        loss = (0.5 * (lv + (mu - y) ** 2 * torch.exp(-lv))).mean()
    else:
        loss = ((out - y) ** 2).mean()
    return loss, layers, head_w, head_b


def torch_step(net, p, x, h, c):
    a_x = x @ p["w_ih"].T + p["b_ih"]
    a_h = h @ p["w_hh"].T + p["b_hh"]
    if net.cell == "rnn":
        a = a_x + a_h
        return (torch.relu(a) if net.nonlinearity == "relu" else torch.tanh(a)), c
    if net.cell == "gru":
        hs = h.shape[1]
        r = torch.sigmoid(a_x[:, :hs] + a_h[:, :hs])
        z = torch.sigmoid(a_x[:, hs:2 * hs] + a_h[:, hs:2 * hs])
        if net.reset_after:
            n = torch.tanh(a_x[:, 2 * hs:] + r * a_h[:, 2 * hs:])
        else:
            n = torch.tanh(a_x[:, 2 * hs:] + (r * h) @ p["w_hh"][2 * hs:].T + p["b_hh"][2 * hs:])
        return (1 - z) * n + z * h, c
    hs = h.shape[1]
    a = a_x + a_h
    peep = p.get("peep")
    pi, pf, po = (peep[0], peep[1], peep[2]) if peep is not None else (0, 0, 0)
    i = torch.sigmoid(a[:, :hs] + pi * c)
    f = torch.sigmoid(a[:, hs:2 * hs] + pf * c)
    g = torch.tanh(a[:, 2 * hs:3 * hs])
    c = f * c + i * g
    o = torch.sigmoid(a[:, 3 * hs:] + po * c)
    return o * torch.tanh(c), c


def torch_grad(net: Net, theta: np.ndarray, windows: np.ndarray) -> np.ndarray:
    loss, layers, head_w, head_b = torch_loss(net, theta, windows)
    loss.backward()
    grad = np.zeros_like(theta)
    g_layers, g_w, g_b = net.tensors(grad)
    for gl, tl in zip(g_layers, layers):
        for k in gl:
            gl[k][...] = tl[k].grad.numpy()
    g_w[...] = head_w.grad.numpy()
    g_b[...] = head_b.grad.numpy()
    return grad


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


# -------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradient_equals_finite_differences_and_torch(name):
    model, net, windows = setup(name)
    theta = net.theta(model, np.float64)
    loss_sum, grad = net.grad(theta, windows)
    eps = 1e-6
    fd = np.empty_like(theta)
    for i in range(theta.size):
        up, down = theta.copy(), theta.copy()
        up[i] += eps
        down[i] -= eps
        fd[i] = (mean_loss(net, up, windows) - mean_loss(net, down, windows)) / (2 * eps)
    ref = torch_grad(net, theta, windows)
    assert rel_err(grad, fd) < 1e-4
    assert rel_err(grad, ref) < 1e-4
    # element-wise too, so a small tensor's error cannot hide in a large norm
    np.testing.assert_allclose(grad, ref, rtol=1e-6, atol=1e-9)
    torch_value = torch_loss(net, theta, windows)[0].item()
    assert loss_sum / (N_WINDOWS * WINDOW * N_FEATURES) == pytest.approx(torch_value, rel=1e-12)


@pytest.mark.parametrize("name", ["lstm-peephole-2-layers", "gru-reset-before", "rnn-relu",
                                  "gru-before-gaussian"])
def test_training_forward_equals_served_forward(name):
    model, net, windows = setup(name)
    x = windows.astype(np.float32)
    _, outs = net.forward(net.theta(model, np.float32), x, outputs=True)
    served = model.predict(x[:, :-1])  # identity scaler: raw units are network units
    np.testing.assert_allclose(outs[..., :N_FEATURES], served, rtol=0, atol=1e-5)
    if model.head == "gaussian":
        _, var = model.predict_distribution(x[:, :-1])
        np.testing.assert_allclose(np.exp(outs[..., N_FEATURES:].astype(np.float64)), var, rtol=1e-5)


def test_gradient_does_not_depend_on_thread_count():
    model, net, _ = setup("lstm-peephole-2-layers")
    rng = np.random.default_rng(0)
    windows = rng.normal(size=(37, WINDOW + 1, N_FEATURES)).astype(np.float32)
    theta = net.theta(model, np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for n in sorted({1, before}):
            numba.set_num_threads(n)
            results.append(net.grad(theta, windows))
    finally:
        numba.set_num_threads(before)
    loss0, grad0 = results[0]
    for loss, grad in results[1:]:
        assert loss == loss0
        assert np.array_equal(grad, grad0)
    # float32 kernel agrees with the float64 one to float32 accuracy
    _, grad64 = net.grad(theta.astype(np.float64), windows.astype(np.float64))
    assert rel_err(grad0, grad64) < 1e-4


def test_batch_gradient_is_mean_of_window_gradients():
    model, net, windows = setup("gru-2-layers")
    theta = net.theta(model, np.float64)
    _, full = net.grad(theta, windows)
    parts = [net.grad(theta, windows, idx=[i])[1] for i in range(N_WINDOWS)]
    np.testing.assert_allclose(full, np.mean(parts, axis=0), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name,clip", [("lstm-peephole-2-layers", None), ("gru-reset-before", 0.05),
                                       ("lstm", 0.05), ("rnn-2-layers-gaussian", None)])
def test_fused_step_equals_gradient_clip_and_adam(name, clip):
    """Stepper (gradient, clipping and Adam in one call, weights kept in both layouts) against
    the separate calls: Net.grad on the float32 weights, clip_grad_norm, Adam.step."""
    from streamrnn.optim import Adam, clip_grad_norm
    from streamrnn.train import Stepper

    model, net, _ = setup(name)
    rng = np.random.default_rng(1)
    windows = rng.normal(size=(50, WINDOW + 1, N_FEATURES)).astype(np.float32)
    ref = net.theta(model, np.float64)
    theta = ref.copy()
    ref_adam, adam = Adam(ref.size), Adam(theta.size)
    stepper = Stepper(net, theta, adam, batch_size=37)
    for s in range(4):
        idx = rng.permutation(50)[:37 - 9 * (s % 2)]
        loss, grad = net.grad(ref.astype(np.float32), windows, idx)
        clip_grad_norm(grad, clip)
        ref_adam.step(ref, grad, 1e-2)
        assert stepper.step(windows, idx, 1e-2, clip) == loss
    if clip is None:  # the same operations in the same order
        assert np.array_equal(theta, ref)
    else:  # the norm is summed in another order: the clipping factor may differ in its last bit
        np.testing.assert_allclose(theta, ref, rtol=1e-12, atol=1e-15)
    assert np.array_equal(adam.m, ref_adam.m) or clip is not None
    assert np.array_equal(stepper.theta32, theta.astype(np.float32))
    assert np.array_equal(stepper.thetak, net.kernel_layout(stepper.theta32))
    with pytest.raises(ValueError, match="windows in a step"):
        stepper.step(windows, np.arange(49), 1e-2, clip)


# ------------------------------------------------------- products in the assembly tile
PRODUCT_SHAPES = [(m, n, ka, kb) for m in (1, 6, 8, 12, 16, 19) for n in (16, 40, 64)
                  for ka, kb in ((1, 64), (7, 0), (33, 17))]


@pytest.mark.parametrize("m,n,ka,kb", PRODUCT_SHAPES)
def test_set_product_equals_float64_reference_and_numba_tiles(m, n, ka, kb):
    """bias + a @ wa + b @ wb on operand blocks at offsets: close to float64, and the same bits
    as the Numba tiles alone (the assembly tile sums each output in the same order)."""
    from streamrnn.kernels.bptt_tile import _set_numba, set_product

    rng = np.random.default_rng(m * 1000 + n * 10 + ka)
    f = np.float32
    a, b = rng.normal(size=(m + 3, ka + 2)).astype(f), rng.normal(size=(m + 5, kb + 1)).astype(f)
    wa, wb = rng.normal(size=(ka + 4, n + 3)).astype(f), rng.normal(size=(kb + 2, n + 5)).astype(f)
    bias = rng.normal(size=n + 2).astype(f)
    args = (2, bias, 1, a, 3, 2, wa, 4, 3, ka, b, 5, 1, wb, 2, 5, kb)
    out = np.full((m + 4, n + 3), 7.0, f)
    set_product(out, 2, 1, m, n, *args[1:])
    ref = (bias[1:1 + n].astype(np.float64) + a[3:3 + m, 2:2 + ka].astype(np.float64) @ wa[4:4 + ka, 3:3 + n]
           + b[5:5 + m, 1:1 + kb].astype(np.float64) @ wb[2:2 + kb, 5:5 + n])
    np.testing.assert_allclose(out[2:2 + m, 1:1 + n], ref, rtol=1e-5, atol=1e-5)
    outside = np.ones_like(out, bool)
    outside[2:2 + m, 1:1 + n] = False
    assert np.all(out[outside] == 7.0)  # nothing written outside the block
    numba_only = np.full_like(out, 7.0)
    _set_numba(numba_only, 2, 1, m, n, *args[1:])
    np.testing.assert_array_equal(out, numba_only)


@pytest.mark.parametrize("k,n", [(1, 64), (6, 16), (64, 256), (20, 40), (65, 256)])
def test_weight_gradient_product_equals_float64_reference_and_numba_tiles(k, n):
    """A weight gradient at[ai:+k, :m] @ g[:m, col:+n] into rows oi.. of the output, with the
    gate gradients' rows padded as the trainer pads them."""
    from streamrnn.kernels.bptt_tile import _set_numba, gradient_product, padded_width, transpose_rows

    rng = np.random.default_rng(k + n)
    f, m, col, ai, oi = np.float32, 97, 3, 2, 1
    acts = rng.normal(size=(m + 2, k)).astype(f)
    g = np.full((m, padded_width(n + col)), 9.0, f)
    g[:, :n + col] = rng.normal(size=(m, n + col))
    at = np.full((k + ai + 1, m + 16), 5.0, f)
    transpose_rows(at, ai, acts, 2, m, k)
    np.testing.assert_array_equal(at[ai:ai + k, :m], acts[2:].T)
    assert np.all(at[:ai] == 5.0) and np.all(at[ai + k:] == 5.0) and np.all(at[:, m:] == 5.0)
    zero = np.zeros(n, f)
    out = np.zeros((k + oi + 2, n + 5), f)
    gradient_product(out, oi, 5, k, n, zero, at, ai, g, col, m)
    ref = acts[2:].T.astype(np.float64) @ g[:, col:n + col]
    np.testing.assert_allclose(out[oi:oi + k, 5:], ref, rtol=1e-5, atol=2e-5)
    outside = np.ones_like(out, bool)
    outside[oi:oi + k, 5:] = False
    assert np.all(out[outside] == 0)
    numba_only = np.zeros_like(out)
    _set_numba(numba_only, oi, 5, k, n, zero, 0, acts.T, 0, 2, g, 0, col, m, acts.T, 0, 0, g, 0, 0, 0)
    np.testing.assert_array_equal(out, numba_only)

def test_padded_rows_are_an_odd_number_of_cache_lines():
    """Rows of gate gradients hold their n columns and are an odd number of 64-byte lines
    long, so no two of 64 consecutive rows share an L1 set."""
    from streamrnn.kernels.bptt_tile import padded_width

    for n in range(1, 600):
        w = padded_width(n)
        assert n < w <= n + 47 and w % 16 == 0 and (w // 16) % 2 == 1, (n, w)


def test_product_kernels_compile_for_plain_argument_types():
    """Constants at call sites (offsets 0, want_grad True) do not make the product kernels
    compile a specialisation per combination of literals (each a whole compile of the tiles;
    streamrnn.config types calls between the package's kernels with plain argument types)."""
    from numba.core import types

    from streamrnn.kernels import bptt, bptt_tile, tiles
    from streamrnn.train import Stepper
    from streamrnn.optim import Adam

    model, net, windows = setup("gru-reset-before")
    net.grad(net.theta(model, np.float32), windows.astype(np.float32))
    theta = net.theta(model, np.float64)
    Stepper(net, theta, Adam(theta.size), 8).step(windows.astype(np.float32), np.arange(5), 1e-3, 1.0)
    kernels = [bptt._blocks, bptt_tile.set_product, bptt_tile._set_numba, bptt_tile.gradient_product,
               tiles.gemm_acc, tiles._gemm_panels, tiles._tile]
    for kernel in kernels:
        signatures = _compiled_signatures(kernel)
        assert signatures, kernel
        for sig in signatures:
            assert not any(isinstance(t, types.Literal) for t in sig), (kernel, sig)
    float32 = [s for s in _compiled_signatures(bptt_tile.set_product) if s[0].dtype == types.float32]
    assert len(float32) == 1


def _compiled_signatures(kernel):
    """Signatures compiled in this process or stored in the kernel's on-disk cache: a kernel
    loaded from the cache compiles nothing it calls, so with a warm cache the callees'
    specialisations are only in their cache indexes."""
    found = set(kernel.signatures)
    if kernel._cache is not None and hasattr(kernel._cache, "_cache_file"):
        found.update(key[0] for key in kernel._cache._cache_file._load_index())
    return found
