"""Slow, obviously correct float64 references for every network the engine runs.

Written from the published equations (PyTorch's nn.LSTM/nn.GRU/nn.RNN docs; Cho et al. 2014
for the reset-before GRU; Gers & Schmidhuber 2000 for peepholes), independent of the kernels.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def cell_step(cell, layer, x, h, c, *, reset_after=True, peephole=False, nonlinearity="tanh"):
    w_ih, w_hh = layer["w_ih"].astype(np.float64), layer["w_hh"].astype(np.float64)
    b_ih, b_hh = layer["b_ih"].astype(np.float64), layer["b_hh"].astype(np.float64)
    hs = w_hh.shape[1]
    if cell == "rnn":
        a = w_ih @ x + b_ih + w_hh @ h + b_hh
        return (np.maximum(a, 0) if nonlinearity == "relu" else np.tanh(a)), c
    if cell == "lstm":
        a = w_ih @ x + b_ih + w_hh @ h + b_hh
        p = layer["peep"].astype(np.float64) if peephole else np.zeros((3, hs))
        i = sigmoid(a[:hs] + p[0] * c)
        f = sigmoid(a[hs:2 * hs] + p[1] * c)
        g = np.tanh(a[2 * hs:3 * hs])
        c_new = f * c + i * g
        o = sigmoid(a[3 * hs:] + p[2] * c_new)
        return o * np.tanh(c_new), c_new
    gx = w_ih @ x + b_ih
    gh = w_hh @ h + b_hh
    r = sigmoid(gx[:hs] + gh[:hs])
    z = sigmoid(gx[hs:2 * hs] + gh[hs:2 * hs])
    if reset_after:
        n = np.tanh(gx[2 * hs:] + r * gh[2 * hs:])
    else:
        n = np.tanh(gx[2 * hs:] + w_hh[2 * hs:] @ (r * h) + b_hh[2 * hs:])
    return (1 - z) * n + z * h, c


def forward(model, x):
    """(T, D) raw-unit input -> (T, D) one-step-ahead predictions in raw units (float64)."""
    xs = (np.asarray(x, np.float64) - model.scaler_mean) / model.scaler_scale
    hs = [np.zeros(h) for h in model.hidden]
    cs = [np.zeros(h) for h in model.hidden]
    out = []
    for t in range(xs.shape[0]):
        inp = xs[t]
        for li, layer in enumerate(model.layers):
            hs[li], cs[li] = cell_step(model.cell, layer, inp, hs[li], cs[li],
                                       reset_after=model.reset_after, peephole=model.peephole,
                                       nonlinearity=model.nonlinearity)
            inp = hs[li]
        y = model.head_weight.astype(np.float64) @ inp + model.head_bias
        out.append(y * model.scaler_scale + model.scaler_mean)
    return np.array(out)
