"""Scoring maths shared by the fused detect kernel: tail probabilities and the [0, 1] score.

Every scorer turns an event's prediction error into the probability ``p`` of an error at
least this large under the stream's normal behaviour, then maps it to a score with
:func:`score_from_tail` (``-log10(p) / 10`` clipped to [0, 1], Numenta's log-likelihood
convention): 0.5 means p = 1e-5 and 1.0 means p <= 1e-10 on any stream, so one threshold
fits all streams and all methods.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from streamrnn.config import jit_options

_OPTS = jit_options()

#: Scorer codes used by the kernels (the names live in streamrnn.scoring.METHODS).
NORMALISED, GAUSSIAN, LIKELIHOOD, MAHALANOBIS = 0, 1, 2, 3
#: -log10 of the tail probability that maps to score 1.
LOG10_SPAN = 10.0
_SQRT2 = math.sqrt(2.0)
_SQRT_PI = math.sqrt(math.pi)


@njit(**_OPTS)
def score_from_tail(p):
    """[0, 1] score of a tail probability: -log10(p) / 10, clipped."""
    if not p > 0.0:
        return 1.0 if p == 0.0 else np.nan
    s = -math.log10(p) / LOG10_SPAN
    return min(max(s, 0.0), 1.0)


@njit(**_OPTS)
def normal_sf(z):
    """Upper tail of the standard normal, P(Z > z)."""
    return 0.5 * math.erfc(z / _SQRT2)


@njit(**_OPTS)
def chi2_sf(q, k):
    """Upper tail of the chi-squared distribution with integer ``k`` degrees of freedom.

    Closed forms: even k sums the Poisson terms; odd k adds them to the normal tail.
    """
    if q <= 0.0:
        return 1.0
    h = 0.5 * q
    if k % 2 == 0:
        term = math.exp(-h)
        total = term
        for i in range(1, k // 2):
            term *= h / i
            total += term
        return min(total, 1.0)
    total = math.erfc(math.sqrt(h))
    term = math.exp(-h) * math.sqrt(h) / (0.5 * _SQRT_PI)  # e^-h h^(1/2) / Gamma(3/2)
    for i in range(1, (k + 1) // 2):
        total += term
        term *= h / (i + 0.5)
    return min(total, 1.0)


@njit(**_OPTS)
def chi2_mean_sf(m, nu):
    """P(chi2_nu / nu > m) for any real ``nu`` > 0, by the Wilson-Hilferty cube-root normal
    approximation (conservative; within a factor 1.5 of the exact tail down to 1e-9 for nu >= 10,
    a score error below 0.02)."""
    if not m > 0.0:
        return 1.0
    v = 2.0 / (9.0 * nu)
    return normal_sf((m ** (1.0 / 3.0) - (1.0 - v)) / math.sqrt(v))


@njit(**_OPTS)
def cholesky_solve(cov, v, eps, chol, out):
    """Solve (cov + eps I) out = v for a small symmetric positive semi-definite ``cov``.

    ``chol`` is (D, D) scratch. Returns False when the matrix is not positive definite.
    """
    d = v.shape[0]
    for i in range(d):
        for j in range(i + 1):
            acc = cov[i, j] + (eps if i == j else 0.0)
            for m in range(j):
                acc -= chol[i, m] * chol[j, m]
            if i == j:
                if not acc > 0.0:
                    return False
                chol[i, i] = math.sqrt(acc)
            else:
                chol[i, j] = acc / chol[j, j]
    for i in range(d):  # forward: L y = v
        acc = v[i]
        for m in range(i):
            acc -= chol[i, m] * out[m]
        out[i] = acc / chol[i, i]
    for i in range(d - 1, -1, -1):  # backward: L^T out = y
        acc = out[i]
        for m in range(i + 1, d):
            acc -= chol[m, i] * out[m]
        out[i] = acc / chol[i, i]
    return True


@njit(**_OPTS)
def dynamic_threshold(window, n, z_lo, z_hi, z_step):
    """Nonparametric dynamic threshold (Hundman et al., KDD 2018) over ``window[:n]``.

    Candidates eps = mean + z * std for z in [z_lo, z_hi]; picks the one whose removal of the
    values above it lowers the mean and standard deviation most relative to how many values
    (and contiguous runs, squared) lie above it. Returns +inf when no candidate helps.
    """
    if n < 2:
        return np.inf
    mu = 0.0
    for i in range(n):
        mu += window[i]
    mu /= n
    var = 0.0
    for i in range(n):
        var += (window[i] - mu) ** 2
    sd = math.sqrt(var / n)
    if not (sd > 0.0 and mu > 0.0):
        return np.inf
    best = -1.0
    best_eps = np.inf
    z = z_lo
    while z <= z_hi + 1e-9:
        eps = mu + z * sd
        n_below = 0
        s_below = 0.0
        n_above = 0
        n_runs = 0
        prev_above = False
        for i in range(n):
            w = window[i]
            if w > eps:
                n_above += 1
                if not prev_above:
                    n_runs += 1
                prev_above = True
            else:
                n_below += 1
                s_below += w
                prev_above = False
        if 0 < n_above < n:
            mb = s_below / n_below
            vb = 0.0
            for i in range(n):
                if window[i] <= eps:
                    vb += (window[i] - mb) ** 2
            sb = math.sqrt(vb / n_below)
            gain = ((mu - mb) / mu + (sd - sb) / sd) / (n_above + n_runs * n_runs)
            if gain > best:
                best = gain
                best_eps = eps
        z += z_step
    return best_eps
