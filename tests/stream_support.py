"""Driving the streaming kernel in tests: one stream table, micro-batch after micro-batch."""

from __future__ import annotations

import numpy as np

from streamrnn.kernels.stream import step_events


def step_in_batches(model, slots, xs, bounds, n_slots):
    """``step_events`` over the consecutive micro-batches slots[a:b], xs[a:b] for a, b in
    successive ``bounds`` (empty ones skipped), all on one table of ``n_slots`` streams.

    Returns (prev, pred): every event's prev_out and the table's final predictions."""
    p = model.packed
    state = np.zeros((n_slots, p.state_width), np.float32)
    pred = np.full((n_slots, model.n_outputs), np.nan, np.float32)
    scratch = np.zeros(n_slots, np.int32)
    prev = np.empty((slots.shape[0], model.n_outputs), np.float32)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a < b:
            step_events(slots[a:b], xs[a:b], state, pred, prev[a:b], scratch, 2, *p.kernel_args())
    return prev, pred
