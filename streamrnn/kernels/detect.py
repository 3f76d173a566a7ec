"""One fused pass per micro-batch: gate, scale, score, decide, substitute, step.

The batch is cut into waves (``plan_waves``: wave k holds every stream's k-th event) and,
as in ``kernels.stream.step_events``, split by stream: chunk c owns the streams with
``slot % n_chunks == c`` and walks their events wave by wave, all chunks in one parallel
region (no barrier per wave). Within a chunk, runs of up to TILE_ROWS events of distinct
streams form a tile: each event is first handled against its stream's columns (duplicate
offsets, missing values, late events, events at the stream's last timestamp, gaps, the
per-stream scaler, the score, warm-up and hysteresis, the learn-during-alert substitution),
then the tile's applied rows step together. Every per-stream quantity lives in a
StreamTable column and is updated in the stream's event order by the same code, so results
do not depend on how a stream's events are split into batches, chunks or tiles, or
interleaved with others.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from streamrnn.config import jit_options
from streamrnn.kernels.cells import TILE_ROWS
from streamrnn.kernels.scoring import (GAUSSIAN, LIKELIHOOD, MAHALANOBIS, chi2_mean_sf, chi2_sf,
                                       cholesky_solve, dynamic_threshold, normal_sf, score_from_tail)
from streamrnn.kernels.stream import _n_chunks, _split_by_stream, _step_block, plan_waves, scratch_pool

_OPTS = jit_options()
_PAR_OPTS = jit_options(parallel=True)
_TS_NONE = np.iinfo(np.int64).min

# Indices into the float parameter vector.
F_THRESHOLD, F_LOWER, F_ALPHA, F_SHORT_ALPHA, F_MAX_GAP, F_DRIFT, F_PRIOR_MEAN, F_PRIOR_VAR, \
    F_PRIOR_N, F_DYN_Z_LO, F_DYN_Z_HI, F_DYN_Z_STEP, F_EPS, F_RANGE_ALPHA, F_BIAS_ALPHA, \
    F_ENERGY_ALPHA = range(16)
N_FPARAMS = 16
# Indices into the integer parameter vector.
I_METHOD, I_WARMUP, I_CLOSE_AFTER, I_LEARN, I_GAP_DECAY, I_ACCEPT_LATE, I_HAS_OFFSETS, \
    I_DYNAMIC, I_DYN_REFRESH, I_RELEARN, I_RANGE_WARMUP, I_REPEATS, I_FIT_EVENTS, I_DERIVE_DT, \
    I_APPLY_SAME_TS = range(15)
N_IPARAMS = 15
# Columns of the per-stream ``rep`` state: the current run of repeated values, and the
# repeats and comparisons among learnt events (the stream's own rate of repeats).
R_RUN, R_COUNT, R_N = range(3)
# Indices into the counters vector (names in streamrnn.detector.COUNTERS, same order).
C_SCORED, C_MISSING, C_LATE, C_REPLAY, C_GAP, C_COLD, C_DRIFT, C_OPENED, C_CLOSED, C_FITTING, \
    C_SAME_TS = range(11)
N_COUNTERS = 11
#: Error statistics are updated with errors clipped to mean - CLIP_LOW sd .. mean + CLIP_HIGH sd.
CLIP_LOW, CLIP_HIGH = 2.0, 4.0
#: Events a stream's input statistics need before scale drift is judged.
DRIFT_MIN_EVENTS = 20
#: Learnt events before the bias and energy terms start averaging standardised residuals
#: (the residual variance they divide by is a plain mean of this many events by then).
WINDOW_START = 20
# Per-event codes in ``out_code``.
OPENED, CLOSED = 1, 2


@njit(**{**_OPTS, "fastmath": False})
def _seconds(ms):
    """``ms / 1000.0`` rounded as NumPy divides: the kernels' fastmath ("arcp") would multiply
    by the rounded reciprocal instead, a bit off training's dt for some gaps. Not inlined, so
    the division keeps strict flags."""
    return np.float64(ms) / 1000.0


# The per-event helpers are inlined into the event loop (inline="always", measured ~15%
# faster): a call costs an atomic reference count per array passed, more than its work.
@njit(inline="always", **_OPTS)
def _raw_prediction(e, s, pred, x_mean, x_scale, out_pred):
    for d in range(out_pred.shape[1]):
        out_pred[e, d] = np.float32(np.float64(pred[s, d]) * x_scale[s, d] + x_mean[s, d])


@njit(inline="always", **_OPTS)
def _fit_scaler(e, s, x, n_feat, n_fit, x_fit, x_mean, x_scale):
    """Add raw event e to stream s's own scaler fit (x_fit[s] = count, means, sums of squared
    deviations: Welford's update); after ``n_fit`` events set its scaler as the trainer's
    z-score would (population sd; a zero scale becomes 1) and end the fit. True while it fits."""
    k = x_fit[s, 0] + 1.0
    x_fit[s, 0] = k
    for d in range(n_feat):
        delta = x[e, d] - x_fit[s, 1 + d]
        x_fit[s, 1 + d] += delta / k
        x_fit[s, 1 + n_feat + d] += delta * (x[e, d] - x_fit[s, 1 + d])
    if k < n_fit:
        return True
    for d in range(n_feat):
        sd = math.sqrt(x_fit[s, 1 + n_feat + d] / k)
        x_mean[s, d] = x_fit[s, 1 + d]
        x_scale[s, d] = sd if np.isfinite(sd) and sd > 0.0 else 1.0
    x_fit[s, :] = np.nan  # the fit is over
    return False


@njit(inline="always", **_OPTS)
def _track_drift(e, s, xs, alpha, factor, n_seen, drift_m, drifted):
    """EW mean square of the scaled inputs xs[e]; a stream whose typical magnitude leaves
    the training range (``factor`` scaler units) is flagged once (returns 1), and unflagged
    when it comes back under half of that."""
    d_n = xs.shape[1]
    a = max(alpha, 1.0 / (n_seen + 1))
    ms = 0.0
    for d in range(d_n):
        v = np.float64(xs[e, d])
        drift_m[s, d] = (1.0 - a) * drift_m[s, d] + a * v * v
        ms += drift_m[s, d]
    rms = math.sqrt(ms / d_n)
    if drifted[s] == 0 and n_seen >= DRIFT_MIN_EVENTS and rms > factor:
        drifted[s] = 1
        return 1
    if drifted[s] != 0 and rms < 0.5 * factor:
        drifted[s] = 0
    return 0


@njit(inline="always", **_OPTS)
def _score_event(e, s, xs, pred, fp, method, n_feat, err_mean, err_var, err_short, err_vm,
                 err_cov, n_scored, resid, solve, chol, out_error, out_contrib, x_lo, x_hi, range_warmup,
                 err_bias, err_energy, settling):
    """Error, tail probability and smoothed error of event e (scaled units).

    Reads the stream's statistics as they were before the event: an anomaly must not
    dampen its own score. Returns (p, smoothed error); p is NaN when no statistics exist yet.
    """
    sq = 0.0
    for d in range(n_feat):
        r = np.float64(xs[e, d]) - np.float64(pred[s, d])
        resid[d] = r
        sq += r * r
        out_contrib[e, d] = r * r
    err = math.sqrt(sq / n_feat)
    out_error[e] = err
    # Short-term mean of the error including this event: the likelihood scorer's "recent
    # error" and the dynamic threshold's smoothed error (same formula as _update_stats).
    sa = max(fp[F_SHORT_ALPHA], 1.0 / (n_scored[s] + 1.0))
    short = (1.0 - sa) * err_short[s] + sa * err
    if method == GAUSSIAN:
        q = 0.0
        nll = 0.0
        for d in range(n_feat):
            lv = np.float64(pred[s, n_feat + d])
            z2 = resid[d] * resid[d] * math.exp(-lv)
            out_contrib[e, d] = z2
            q += z2
            nll += 0.5 * (math.log(2.0 * math.pi) + lv + z2)
        out_error[e] = nll
        return chi2_sf(q, n_feat), short
    if method == MAHALANOBIS:
        if n_scored[s] == 0:
            return np.nan, short
        for d in range(n_feat):
            resid[d] -= err_vm[s, d]
        if not cholesky_solve(err_cov[s], resid, fp[F_EPS], chol, solve):
            return np.nan, short
        q = 0.0
        for d in range(n_feat):
            c = resid[d] * solve[d]
            out_contrib[e, d] = max(c, 0.0)
            q += c
        return chi2_sf(q, n_feat), short
    mu, var = err_mean[s], err_var[s]
    if n_scored[s] == 0:
        if fp[F_PRIOR_N] <= 0:
            return np.nan, short
        mu, var = fp[F_PRIOR_MEAN], fp[F_PRIOR_VAR]
    sd = math.sqrt(var + fp[F_EPS])
    if method == LIKELIHOOD:
        return normal_sf((short - mu) / sd), short
    p = normal_sf((err - mu) / sd)
    if n_scored[s] * fp[F_SHORT_ALPHA] >= 2.0:
        # Too quiet is anomalous too (a stuck sensor): the recent mean error far below the
        # long-run mean, against the spread of an EW mean of independent errors.
        a = fp[F_SHORT_ALPHA]
        p = min(p, normal_sf((mu - short) / (sd * math.sqrt(a / (2.0 - a)))))
    if fp[F_RANGE_ALPHA] > 0.0 and n_scored[s] >= range_warmup:
        # Outside the normal range (a drift the state follows, so its errors stay small): a
        # value e residual sd beyond the stream's learnt range of scaled values is as
        # unlikely as noise e sd beyond the noiseless envelope, P(Z > e); Bonferroni over
        # both sides and the features.
        for d in range(n_feat):
            v = np.float64(xs[e, d])
            beyond = max(v - x_hi[s, d], x_lo[s, d] - v)
            if beyond > 0.0 and x_lo[s, d] <= x_hi[s, d]:  # (no range yet: lo = inf, hi = -inf)
                z = beyond / math.sqrt(err_cov[s, d, d] + fp[F_EPS])
                p = min(p, 2.0 * n_feat * normal_sf(z))
    n_w = n_scored[s] - WINDOW_START
    ba, ea = fp[F_BIAS_ALPHA], fp[F_ENERGY_ALPHA]
    # Silent while the stream settles after an episode: its residual statistics are catching
    # up with what the episode left behind (a new level, a new noise scale).
    if not settling and (ba > 0.0 and n_w * ba >= 2.0) or (ea > 0.0 and n_w * ea >= 2.0):
        energy = 0.0
        for d in range(n_feat):
            z = _std_resid(resid[d], s, d, err_vm, err_cov, fp[F_EPS])
            if ba > 0.0 and n_w * ba >= 2.0:
                # Persistent bias (a drift the state lags behind): the recent EW mean of the
                # signed standardised residual against the spread of such a mean of
                # independent residuals; both signs, Bonferroni over the features.
                b = (1.0 - ba) * err_bias[s, d] + ba * z
                p = min(p, 2.0 * n_feat * normal_sf(abs(b) / math.sqrt(ba / (2.0 - ba))))
            energy += z * z
        if ea > 0.0 and n_w * ea >= 2.0:
            # Too much energy (a variance burst, a cycle the network cannot follow): the recent
            # EW mean of squared standardised residuals, a chi-squared / nu with nu = D (2 - a) / a
            # effective degrees of freedom for independent residuals.
            en = (1.0 - ea) * err_energy[s] + ea * energy / n_feat
            p = min(p, chi2_mean_sf(en, n_feat * (2.0 - ea) / ea))
    return p, short


@njit(inline="always", **_OPTS)
def _std_resid(r, s, d, err_vm, err_cov, eps):
    """Residual r of feature d standardised by the stream's EW residual mean and variance,
    winsorised to +-CLIP_HIGH (one outlier must not carry a window's average)."""
    z = (r - err_vm[s, d]) / math.sqrt(err_cov[s, d, d] + eps)
    return min(max(z, -CLIP_HIGH), CLIP_HIGH)


@njit(inline="always", **_OPTS)
def _repeat_run(e, s, xs, n_feat, x_last, rep):
    """Length of the run of events up to e whose values all equal the previous event's."""
    same = True
    for d in range(n_feat):
        same = same and xs[e, d] == x_last[s, d]
        x_last[s, d] = xs[e, d]
    run = rep[s, R_RUN] + 1.0 if same else 0.0
    rep[s, R_RUN] = run
    return run


@njit(inline="always", **_OPTS)
def _widen_range(e, s, xs, n_feat, x_lo, x_hi):
    """Make event e's scaled values part of the stream's normal range."""
    for d in range(n_feat):
        v = np.float64(xs[e, d])
        x_lo[s, d] = min(x_lo[s, d], v)
        x_hi[s, d] = max(x_hi[s, d], v)


@njit(inline="always", **_OPTS)
def _update_stats(e, s, xs, pred, fp, n_feat, err_mean, err_var, err_short, err_vm, err_cov,
                  n_scored, resid, x_lo, x_hi, range_warmup, absorb, err_bias, err_energy, fast):
    """Fold event e's error into the stream's exponentially weighted statistics."""
    k = n_scored[s]
    ra = fp[F_RANGE_ALPHA]
    if ra > 0.0:
        # The normal range of the scaled values: plain min/max over the first range_warmup
        # learnt events (and over the points inside an episode, ``absorb``), then widened
        # towards values outside it by F_RANGE_ALPHA of the gap per event (a slow change is
        # absorbed gradually; a ramp outruns it).
        for d in range(n_feat):
            v = np.float64(xs[e, d])
            if k < range_warmup or absorb:
                x_lo[s, d] = min(x_lo[s, d], v)
                x_hi[s, d] = max(x_hi[s, d], v)
            elif v > x_hi[s, d]:
                x_hi[s, d] += ra * (v - x_hi[s, d])
            elif v < x_lo[s, d]:
                x_lo[s, d] += ra * (v - x_lo[s, d])
    if k == 0 and fp[F_PRIOR_N] > 0:
        err_mean[s] = fp[F_PRIOR_MEAN]
        err_var[s] = fp[F_PRIOR_VAR]
    # Early on, average plainly so the statistics settle faster than 1/alpha events; a
    # calibrated prior counts as F_PRIOR_N events already seen.
    a = max(fp[F_ALPHA], 1.0 / (k + 1.0 + fp[F_PRIOR_N]))
    err = 0.0
    for d in range(n_feat):
        r = np.float64(xs[e, d]) - np.float64(pred[s, d])
        resid[d] = r
        err += r * r
    err = math.sqrt(err / n_feat)
    n_w = k - WINDOW_START
    if n_w >= 0:
        # Against the residual statistics before this event, as the score reads them; plain
        # averages until the EW weights take over.
        ba = max(fp[F_BIAS_ALPHA], 1.0 / (n_w + 1.0))
        ea = max(fp[F_ENERGY_ALPHA], 1.0 / (n_w + 1.0))
        energy = 0.0
        for d in range(n_feat):
            z = _std_resid(resid[d], s, d, err_vm, err_cov, fp[F_EPS])
            err_bias[s, d] = (1.0 - ba) * err_bias[s, d] + ba * z
            energy += z * z
        err_energy[s] = (1.0 - ea) * err_energy[s] + ea * energy / n_feat
    sa = max(fp[F_SHORT_ALPHA], 1.0 / (k + 1.0))
    err_short[s] = (1.0 - sa) * err_short[s] + sa * err
    if k * fp[F_SHORT_ALPHA] >= 2.0:
        # Winsorise once the statistics have settled, so that outliers below the alert
        # threshold (or a stuck sensor's tiny errors) do not blow up the variance.
        sd = math.sqrt(err_var[s])
        err = min(max(err, err_mean[s] - CLIP_LOW * sd), err_mean[s] + CLIP_HIGH * sd)
    delta = err - err_mean[s]
    err_mean[s] += a * delta
    err_var[s] = (1.0 - a) * (err_var[s] + a * delta * delta)
    if absorb:
        # Inside an episode and while settling after it, the residual mean and covariance
        # follow at ``fast`` (the bias and energy terms' rate): what the episode leaves behind
        # (an offset the network keeps after a level shift) becomes the new normal.
        a = max(a, fast)
    for d in range(n_feat):
        resid[d] -= err_vm[s, d]
    for i in range(n_feat):
        for j in range(n_feat):
            err_cov[s, i, j] = (1.0 - a) * (err_cov[s, i, j] + a * resid[i] * resid[j])
    for d in range(n_feat):
        err_vm[s, d] += a * resid[d]
    n_scored[s] = k + 1


@njit(inline="always", **_OPTS)
def _dynamic_ok(s, smoothed, fp, ip, warm, dyn_buf, dyn_eps, ordered):
    """Push the smoothed error into the stream's window; True when it is above the
    window's dynamic threshold (refreshed every I_DYN_REFRESH events once the window is full)."""
    w = dyn_buf.shape[1]
    n = warm[s]
    dyn_buf[s, n % w] = smoothed
    if n + 1 < w:
        return True
    if (n + 1) % ip[I_DYN_REFRESH] == 0 or not np.isfinite(dyn_eps[s]):
        start = (n + 1) % w
        for i in range(w):
            ordered[i] = dyn_buf[s, (start + i) % w]
        dyn_eps[s] = dynamic_threshold(ordered, w, fp[F_DYN_Z_LO], fp[F_DYN_Z_HI], fp[F_DYN_Z_STEP])
    return smoothed > dyn_eps[s]


@njit(**_OPTS)
def _detect_list(lo, hi, ev, sl, x, ts, offsets, fp, ip, xs, state, pred, x_mean, x_scale, last_ts,
                 last_offset, err_mean, err_var, err_short, err_vm, err_cov, n_scored, warm, in_alert,
                 below, alert_len, open_ts, drift_m, drifted, dyn_buf, dyn_eps, x_lo, x_hi,
                 err_bias, err_energy, x_last, rep, x_fit,
                 out_pred, out_error, out_score, out_rank, out_alert, out_applied, out_code,
                 out_open_ts, out_contrib, cnt, resid, solve, chol, ordered,
                 cell, reset_after, hidden, offs, wx, wh, b, bhn, peep, wo, bo, xp, hp, acc, accn, blk):
    """Events ev[lo:hi] of slots sl[lo:hi] (each stream's events in arrival order) with one
    chunk's scratch: tiles of up to TILE_ROWS consecutive events of distinct streams are
    prepared one by one, then their applied rows step together."""
    n_feat = x.shape[1]
    thr = fp[F_THRESHOLD]
    lower = fp[F_LOWER]
    fast = 0.0
    repeats = False
    if ip[I_METHOD] != MAHALANOBIS and ip[I_METHOD] != GAUSSIAN:
        fast = max(fp[F_BIAS_ALPHA], fp[F_ENERGY_ALPHA])
        repeats = ip[I_REPEATS] != 0
    max_gap = fp[F_MAX_GAP]
    # A time-delta model's last feature is derived here (the caller leaves it NaN): it is
    # neither checked as missing nor taken from the input.
    dt_col = n_feat - 1 if ip[I_DERIVE_DT] != 0 else n_feat
    n_fit = ip[I_FIT_EVENTS]  # 0: no stream fits a scaler, and x_fit may have no rows
    app_ev = blk[0]
    app_sl = blk[1]
    i = lo
    while i < hi:
        first = i
        while i < hi and i - first < TILE_ROWS:
            fresh = True
            for j in range(first, i):
                fresh = fresh and sl[j] != sl[i]
            if not fresh:
                break
            i += 1
        n_app = 0
        for j in range(first, i):
            # Everything event e of stream s does before its step: checks, scaling, score,
            # decision, substitution (written inline: a call per event passing the ~40
            # arrays costs more than the work, in reference counting).
            e = ev[j]
            s = sl[j]
            out_applied[e] = False
            out_code[e] = 0
            out_score[e] = np.nan
            out_error[e] = np.nan
            out_rank[e] = -1
            _raw_prediction(e, s, pred, x_mean, x_scale, out_pred)
            out_alert[e] = in_alert[s] != 0
            if ip[I_HAS_OFFSETS] != 0:
                if offsets[e] <= last_offset[s]:
                    cnt[C_REPLAY] += 1
                    continue
                last_offset[s] = offsets[e]
            finite = True
            for d in range(dt_col):
                if not np.isfinite(x[e, d]):
                    finite = False
            if not finite:
                cnt[C_MISSING] += 1
                continue
            prev_ts = last_ts[s]
            if prev_ts != _TS_NONE and ts[e] < prev_ts and ip[I_ACCEPT_LATE] == 0:
                cnt[C_LATE] += 1
                continue
            if ts[e] == prev_ts and ip[I_APPLY_SAME_TS] == 0:
                # (stream, ts) is one event, as in training and replay: the first applied
                # value of an instant stands (live, a later one cannot be waited for).
                cnt[C_SAME_TS] += 1
                continue
            scoreable = np.isfinite(pred[s, 0])
            if dt_col < n_feat:
                # Seconds since the stream's previous applied event, as data._with_dt computes
                # it (int64 ms difference / 1000.0 in float64); 0 at a start, after a gap
                # (below) and for a late event.
                x[e, dt_col] = _seconds(max(ts[e] - prev_ts, 0)) if prev_ts != _TS_NONE else 0.0
            if prev_ts == _TS_NONE:
                cnt[C_COLD] += 1
            elif max_gap > 0 and ts[e] - prev_ts > max_gap:
                cnt[C_GAP] += 1
                if dt_col < n_feat:
                    x[e, dt_col] = 0.0  # a segment start, as training splits at its max_gap_ms
                warm[s] = 0
                scoreable = False
                if ip[I_GAP_DECAY] != 0:
                    f = np.float32(0.5 ** ((ts[e] - prev_ts) / max_gap))
                    for q in range(state.shape[1]):
                        state[s, q] *= f
                else:
                    state[s, :] = 0.0
                    pred[s, :] = np.nan
                    for d in range(n_feat):
                        out_pred[e, d] = np.nan
            last_ts[s] = max(prev_ts, ts[e])
            if n_fit > 0 and x_fit[s, 0] >= 0.0 and _fit_scaler(e, s, x, n_feat, n_fit, x_fit, x_mean, x_scale):
                # A stream the model has no scaler for learns its own from its first events;
                # the event after the fit is its first step, as a new stream's first event is.
                cnt[C_FITTING] += 1
                continue
            for d in range(n_feat):
                xs[e, d] = np.float32((x[e, d] - x_mean[s, d]) / x_scale[s, d])
            cnt[C_DRIFT] += _track_drift(e, s, xs, fp[F_ALPHA], fp[F_DRIFT], n_scored[s], drift_m, drifted)
            run = 0.0
            if repeats:
                run = _repeat_run(e, s, xs, n_feat, x_last, rep)
            out_applied[e] = True
            app_ev[n_app] = e
            app_sl[n_app] = s
            n_app += 1
            if not scoreable:
                continue
            p, smoothed = _score_event(e, s, xs, pred, fp, ip[I_METHOD], n_feat, err_mean, err_var,
                                       err_short, err_vm, err_cov, n_scored, resid, solve, chol,
                                       out_error, out_contrib, x_lo, x_hi, ip[I_RANGE_WARMUP],
                                       err_bias, err_energy, in_alert[s] == 0 and alert_len[s] < 0)
            if repeats and run > 0.0 and rep[s, R_N] >= WINDOW_START and np.isfinite(p):
                # A run of identical values (a stuck sensor): as likely as ``run`` repeats in a
                # row at the stream's own rate of repeats (Laplace-smoothed, so a stream that
                # never repeated needs a few in a row, a quantised one many).
                p = min(p, ((rep[s, R_COUNT] + 1.0) / (rep[s, R_N] + 2.0)) ** run)
            score = score_from_tail(p)
            if np.isfinite(score):
                cnt[C_SCORED] += 1
            out_score[e] = score
            out_rank[e] = warm[s]
            dyn_ok = True
            if ip[I_DYNAMIC] != 0:
                dyn_ok = _dynamic_ok(s, smoothed, fp, ip, warm, dyn_buf, dyn_eps, ordered)
            if in_alert[s] == 0:
                if warm[s] >= ip[I_WARMUP] and score > thr and dyn_ok:
                    in_alert[s] = 1
                    below[s] = 0
                    alert_len[s] = 0
                    open_ts[s] = ts[e]
                    out_code[e] = OPENED
                    out_open_ts[e] = ts[e]
                    cnt[C_OPENED] += 1
            elif score < lower or not np.isfinite(score):
                below[s] += 1
                if below[s] >= ip[I_CLOSE_AFTER]:
                    in_alert[s] = 0
                    # Counts up from -I_RELEARN while the stream settles after the episode.
                    alert_len[s] = -ip[I_RELEARN]
                    out_code[e] = CLOSED
                    out_open_ts[e] = open_ts[s]
                    cnt[C_CLOSED] += 1
            else:
                below[s] = 0
            out_alert[e] = in_alert[s] != 0
            warm[s] += 1
            if in_alert[s] != 0:
                alert_len[s] += 1
            settling = in_alert[s] == 0 and alert_len[s] < 0
            if settling:
                alert_len[s] += 1
            if (in_alert[s] != 0 and ip[I_LEARN] == 0 and alert_len[s] <= ip[I_RELEARN]
                    and not score < lower):
                # Inside an episode the stream learns its anomalous points (score at or above the
                # lower threshold) neither into its state nor into its error statistics: it steps
                # on its own prediction. Points that look normal again are learnt, so the state
                # follows the series while the episode waits to close. An episode longer than
                # I_RELEARN events is a new normal (a level shift): learn again. The point's value
                # joins the normal range all the same (an anomaly flagged is not flagged again
                # for being out of range).
                if fp[F_RANGE_ALPHA] > 0.0:
                    _widen_range(e, s, xs, n_feat, x_lo, x_hi)
                for d in range(n_feat):
                    xs[e, d] = pred[s, d]
            else:
                if repeats:
                    rep[s, R_COUNT] += 1.0 if run > 0.0 else 0.0
                    rep[s, R_N] += 1.0
                _update_stats(e, s, xs, pred, fp, n_feat, err_mean, err_var, err_short, err_vm,
                              err_cov, n_scored, resid, x_lo, x_hi, ip[I_RANGE_WARMUP],
                              in_alert[s] != 0 or settling, err_bias, err_energy, fast)
        if n_app:
            _step_block(n_app, xs, 0, app_ev, state, app_sl, pred, cell, reset_after, hidden, offs,
                        wx, wh, b, bhn, peep, wo, bo, xp, hp, acc, accn)


@njit(**_PAR_OPTS)
def _detect_chunks_parallel(starts, ev, sl, x, ts, offsets, fp, ip, xs, state, pred, x_mean, x_scale,
                            last_ts, last_offset, err_mean, err_var, err_short, err_vm, err_cov, n_scored,
                            warm, in_alert, below, alert_len, open_ts, drift_m, drifted, dyn_buf, dyn_eps,
                            x_lo, x_hi, err_bias, err_energy, x_last, rep, x_fit, out_pred, out_error, out_score,
                            out_rank, out_alert, out_applied, out_code, out_open_ts, out_contrib, cnt, resid, solve,
                            chol, ordered,
                            cell, reset_after, hidden, offs, wx, wh, b, bhn, peep, wo, bo,
                            xp, hp, acc, accn, blk):
    # Chunks own disjoint sets of streams, so they never write the same per-stream column
    # row; each has its own counters row and scratch.
    for c in prange(starts.shape[0] - 1):
        _detect_list(starts[c], starts[c + 1], ev, sl, x, ts, offsets, fp, ip, xs, state, pred, x_mean,
                     x_scale, last_ts, last_offset, err_mean, err_var, err_short, err_vm, err_cov,
                     n_scored, warm, in_alert, below, alert_len, open_ts, drift_m, drifted, dyn_buf,
                     dyn_eps, x_lo, x_hi, err_bias, err_energy, x_last, rep, x_fit, out_pred, out_error, out_score,
                     out_rank, out_alert, out_applied, out_code, out_open_ts, out_contrib, cnt[c], resid[c],
                     solve[c], chol[c], ordered[c],
                     cell, reset_after, hidden, offs, wx, wh, b, bhn, peep, wo, bo,
                     xp[c], hp[c], acc[c], accn[c], blk[c])


@njit(**_OPTS)
def detect_batch(slots, x, ts, offsets, fp, ip, n_threads, scratch,
                 state, pred, x_mean, x_scale, last_ts, last_offset, err_mean, err_var, err_short,
                 err_vm, err_cov, n_scored, warm, in_alert, below, alert_len, open_ts, drift_m, drifted,
                 dyn_buf, dyn_eps, x_lo, x_hi, err_bias, err_energy, x_last, rep, x_fit,
                 out_pred, out_error, out_score, out_rank, out_alert, out_applied, out_code,
                 out_open_ts, out_contrib, counters,
                 cell, reset_after, hidden, offs, wx, wh, b, bhn, peep, wo, bo):
    """Score and apply a micro-batch of raw events ``x`` (E, D) float64 of streams ``slots``.

    ``offsets`` is empty or one int64 per event. Outputs are per event, in input order:
    ``out_pred`` raw-unit prediction, ``out_error``, ``out_score`` (NaN when not scored),
    ``out_rank`` (the stream's scored events since its (re)start before this one, -1 when
    not scored),
    ``out_alert`` (inside an open episode), ``out_applied``, ``out_code`` (OPENED/CLOSED/0),
    ``out_open_ts`` (episode's opening ts where out_code != 0), ``out_contrib`` (per-feature
    share of the score where out_code != 0). ``counters`` accumulates C_* counts.
    ``scratch`` is an int32 array over all slots, zero on entry and on exit.
    """
    n_ev, n_feat = x.shape
    if n_ev == 0:
        return
    order, starts = plan_waves(slots, scratch)
    ev_slots = np.empty(n_ev, np.int64)
    for i in range(n_ev):
        ev_slots[i] = slots[order[i]]
    n_chunks = _n_chunks(n_threads, starts[1] - starts[0])  # wave 0 has every stream once
    xs = np.empty((n_ev, n_feat), np.float32)
    cnt = np.zeros((n_chunks, N_COUNTERS), np.int64)
    resid = np.empty((n_chunks, n_feat))
    solve = np.empty((n_chunks, n_feat))
    chol = np.zeros((n_chunks, n_feat, n_feat))
    ordered = np.empty((n_chunks, dyn_buf.shape[1]))
    xp, hp, acc, accn, blk = scratch_pool(n_chunks, hidden, wx[0].shape[0], wo.shape[1])
    if n_chunks == 1:
        _detect_list(0, n_ev, order, ev_slots, x, ts, offsets, fp, ip, xs, state, pred, x_mean, x_scale,
                     last_ts, last_offset, err_mean, err_var, err_short, err_vm, err_cov, n_scored, warm,
                     in_alert, below, alert_len, open_ts, drift_m, drifted, dyn_buf, dyn_eps, x_lo, x_hi,
                     err_bias, err_energy, x_last, rep, x_fit, out_pred, out_error, out_score, out_rank, out_alert,
                     out_applied, out_code, out_open_ts, out_contrib, cnt[0], resid[0], solve[0], chol[0], ordered[0],
                     cell, reset_after, hidden, offs, wx, wh, b, bhn, peep, wo, bo,
                     xp[0], hp[0], acc[0], accn[0], blk[0])
    else:
        ev, sl, cstarts = _split_by_stream(order, ev_slots, n_chunks)
        _detect_chunks_parallel(cstarts, ev, sl, x, ts, offsets, fp, ip, xs, state, pred, x_mean, x_scale,
                                last_ts, last_offset, err_mean, err_var, err_short, err_vm, err_cov,
                                n_scored, warm, in_alert, below, alert_len, open_ts, drift_m, drifted,
                                dyn_buf, dyn_eps, x_lo, x_hi, err_bias, err_energy, x_last, rep, x_fit, out_pred,
                                out_error, out_score, out_rank, out_alert, out_applied, out_code, out_open_ts,
                                out_contrib, cnt, resid, solve,
                                chol, ordered, cell, reset_after, hidden, offs, wx, wh, b, bhn, peep, wo, bo,
                                xp, hp, acc, accn, blk)
    for c in range(n_chunks):
        for k in range(N_COUNTERS):
            counters[k] += cnt[c, k]
