"""Per-event error and running-statistics score, in arrival order.

Kept separate from the network step: the model predicts, this scores, the caller decides.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from streamrnn.config import jit_options


@njit(**jit_options())
def normalised_error_scores(slots, xs, prev, err_mean, err_var, n_scored, alpha, eps,
                            out_error, out_score, out_rank):
    """Score each event against its stream's stored prediction.

    error = root mean square of (x - prediction) over features, in the model's scaled units,
    so every feature and stream is on one scale. score = (error - mean) / std, using the
    stream's exponentially weighted mean and variance of past errors *before* this event
    (an anomaly must not dampen its own score), which are then updated. Events with no
    stored prediction (a stream's first) get NaN error and score. Runs sequentially over
    events so each stream's statistics see its events in arrival order. out_rank[e] is the
    number of the stream's events scored before e (for warm-up), -1 when e is not scored.
    """
    n_feat = xs.shape[1]
    for e in range(slots.shape[0]):
        s = slots[e]
        sq = 0.0
        for d in range(n_feat):
            diff = np.float64(xs[e, d]) - np.float64(prev[e, d])
            sq += diff * diff
        err = np.sqrt(sq / n_feat)
        out_error[e] = err
        if not np.isfinite(err):
            out_score[e] = np.nan
            out_rank[e] = -1
            continue
        k = n_scored[s]
        out_rank[e] = k
        mu = np.float64(err_mean[s])
        var = np.float64(err_var[s])
        if k == 0:
            out_score[e] = np.nan
            mu = err
            var = 0.0
        else:
            out_score[e] = (err - mu) / np.sqrt(var + eps)
            # Early on, average plainly so the statistics settle faster than 1/alpha events.
            a = max(alpha, 1.0 / (k + 1))
            delta = err - mu
            mu += a * delta
            var = (1.0 - a) * (var + a * delta * delta)
        err_mean[s] = mu
        err_var[s] = var
        n_scored[s] = k + 1
