"""Scorers against direct NumPy/SciPy computations, the score scale, decisions (warm-up,
hysteresis, dynamic threshold), the [scoring] config and calibration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from streamrnn import Model
from streamrnn.detector import Detector
from streamrnn.kernels.scoring import chi2_mean_sf, chi2_sf, cholesky_solve, dynamic_threshold, normal_sf, score_from_tail
from streamrnn import scoring
from streamrnn.scoring import (DEFAULT_THRESHOLD, MAX_CALIBRATED, ScoringConfig, ScoringConfigError, calibrate,
                               estimate_threshold, tail_probability)

EPS = 1e-12


def _score(p):
    with np.errstate(divide="ignore"):
        return np.clip(-np.log10(p) / 10.0, 0.0, 1.0)


def _zero_model(n_features=1, gaussian_logvar=None):
    """A model that always predicts 0 (and log-variance ``gaussian_logvar`` per feature):
    the prediction error is the input itself, so scores can be computed by hand."""
    base = Model.random("gru", n_features=n_features, hidden=[8], seed=0)
    n_out = n_features * (2 if gaussian_logvar is not None else 1)
    bias = np.zeros(n_out)
    if gaussian_logvar is not None:
        bias[n_features:] = gaussian_logvar
    return Model(cell="gru", layers=base.layers, head_weight=np.zeros((n_out, 8)), head_bias=bias,
                 head="gaussian" if gaussian_logvar is not None else "linear")


def _stream(det, x, t0=0, sid="a"):
    x = np.asarray(x, np.float64)
    x = x[:, None] if x.ndim == 1 else x
    return det.process([sid] * len(x), x, t0 + 1000 * np.arange(len(x), dtype=np.int64))


# ---------------------------------------------------------------- maths kernels
def test_tail_functions_match_scipy():
    for z in (-3.0, 0.0, 0.7, 4.0, 9.0, 30.0):
        assert normal_sf(z) == pytest.approx(stats.norm.sf(z), rel=1e-12, abs=1e-300)
    for k in range(1, 7):
        for q in (0.0, 0.1, 1.0, 5.5, 20.0, 80.0):
            assert chi2_sf(q, k) == pytest.approx(stats.chi2.sf(q, k), rel=1e-10, abs=1e-300), (q, k)
    for p in (1.0, 0.5, 1e-3, 1e-5, 1e-10, 1e-20, 0.0):
        assert score_from_tail(p) == pytest.approx(float(_score(p)))
    assert score_from_tail(1e-5) == pytest.approx(0.5)
    np.testing.assert_allclose(tail_probability([0.0, 0.5, 1.0]), [1.0, 1e-5, 1e-10])


def test_cholesky_solve_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    cov = a @ a.T
    v = rng.normal(size=4)
    out = np.empty(4)
    assert cholesky_solve(cov, v, 1e-9, np.zeros((4, 4)), out)
    np.testing.assert_allclose(out, np.linalg.solve(cov + 1e-9 * np.eye(4), v), rtol=1e-8)
    assert not cholesky_solve(-np.eye(2), np.ones(2), 0.0, np.zeros((2, 2)), np.empty(2))


def _hundman(window, zs):
    """Hundman et al.'s threshold selection written directly over NumPy arrays."""
    mu, sd = window.mean(), window.std()
    best, best_eps = -1.0, np.inf
    for z in zs:
        eps = mu + z * sd
        above = window > eps
        if not 0 < above.sum() < len(window):
            continue
        below = window[~above]
        runs = int(np.sum(above & ~np.r_[False, above[:-1]]))
        gain = ((mu - below.mean()) / mu + (sd - below.std()) / sd) / (above.sum() + runs ** 2)
        if gain > best:
            best, best_eps = gain, eps
    return best_eps


def test_dynamic_threshold_matches_direct_computation():
    rng = np.random.default_rng(1)
    zs = np.arange(2.0, 10.0 + 1e-9, 0.5)
    for trial in range(20):
        w = np.abs(rng.normal(1.0, 0.2, 64))
        if trial % 2:
            w[rng.integers(0, 60):][:rng.integers(1, 5)] += rng.uniform(1, 5)
        assert dynamic_threshold(w, 64, 2.0, 10.0, 0.5) == pytest.approx(_hundman(w, zs), rel=1e-12)
    assert dynamic_threshold(np.ones(8), 8, 2.0, 10.0, 0.5) == np.inf


# ---------------------------------------------------------------- scorers vs NumPy
def _reference_stats(errors, alpha, short_alpha):
    """Per event: mean, var, short mean of the errors *before* it (NaN-free), and count."""
    mu = var = short = 0.0
    out = []
    for k, e in enumerate(errors):
        out.append((mu, var, short, k))
        a = max(alpha, 1.0 / (k + 1))
        sa = max(short_alpha, 1.0 / (k + 1))
        short = (1 - sa) * short + sa * e
        if k * short_alpha >= 2.0:
            e = np.clip(e, mu - 2 * np.sqrt(var), mu + 4 * np.sqrt(var))
        d = e - mu
        mu, var = mu + a * d, (1 - a) * (var + a * d * d)
    return out


@pytest.mark.parametrize("method", ["normalised", "likelihood"])
def test_univariate_scorers_match_numpy(method):
    model = Model.random("gru", n_features=1, hidden=[8], seed=3)
    rng = np.random.default_rng(4)
    x = np.sin(np.arange(120) / 5.0) + rng.normal(0, 0.1, 120)
    det = Detector(model, method=method, threshold=1.0, error_alpha=0.05, short_alpha=0.3, bias_alpha=0.0,
                   energy_alpha=0.0)
    out = _stream(det, x)
    pred = model.predict(x[:, None].astype(np.float32))[:-1, 0].astype(np.float64)
    err = np.abs(x[1:].astype(np.float32).astype(np.float64) - pred)
    expected = [np.nan]
    for e, (mu, var, short, k) in zip(err, _reference_stats(err, 0.05, 0.3)):
        if k == 0:
            expected.append(np.nan)
            continue
        sa = max(0.3, 1.0 / (k + 1))
        recent = (1 - sa) * short + sa * e
        sd = np.sqrt(var + EPS)
        if method == "likelihood":
            p = stats.norm.sf((recent - mu) / sd)
        else:
            p = stats.norm.sf((e - mu) / sd)
            if k * 0.3 >= 2.0:
                p = min(p, stats.norm.cdf((recent - mu) / (sd * np.sqrt(0.3 / 1.7))))
        expected.append(float(_score(p)))
    np.testing.assert_allclose(out.error[1:], err, rtol=1e-12)
    np.testing.assert_allclose(out.score, expected, rtol=1e-6, atol=1e-9)
    assert np.all((out.score[2:] >= 0) & (out.score[2:] <= 1))


def test_gaussian_scorer_matches_numpy():
    logvar = np.array([np.log(0.25), np.log(4.0)])
    model = _zero_model(2, gaussian_logvar=logvar)
    assert Detector(model).method == "gaussian"
    x = np.random.default_rng(5).normal(0, 1, (40, 2))
    out = _stream(Detector(model, threshold=1.0), x)
    xs = x.astype(np.float32).astype(np.float64)[1:]
    var = np.exp(logvar.astype(np.float32).astype(np.float64))
    q = (xs ** 2 / var).sum(axis=1)
    nll = 0.5 * (np.log(2 * np.pi) + np.log(var) + xs ** 2 / var).sum(axis=1)
    np.testing.assert_allclose(out.error[1:], nll, rtol=1e-6)
    np.testing.assert_allclose(out.score[1:], _score(stats.chi2.sf(q, 2)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out.prediction[1:], 0.0)


def test_mahalanobis_scorer_matches_numpy_and_names_top_feature():
    model = _zero_model(3)
    model.feature_names = ["cpu", "mem", "disk"]
    assert Detector(model).method == "mahalanobis"
    rng = np.random.default_rng(6)
    mix = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.1, 0.2, 0.3]])
    x = rng.normal(0, 1, (80, 3)) @ mix.T
    det = Detector(model, threshold=1.0, error_alpha=0.05)
    out = _stream(det, x)
    r = x.astype(np.float32).astype(np.float64)[1:]
    m, c = np.zeros(3), np.zeros((3, 3))
    expected = [np.nan]
    for k, v in enumerate(r):
        if k == 0:
            expected.append(np.nan)
        else:
            dv = v - m
            q = dv @ np.linalg.solve(c + EPS * np.eye(3), dv)
            expected.append(float(_score(stats.chi2.sf(q, 3))))
        a = max(0.05, 1.0 / (k + 1))
        dv = v - m
        c = (1 - a) * (c + a * np.outer(dv, dv))
        m = m + a * dv
    np.testing.assert_allclose(out.score[3:], expected[3:], rtol=1e-5, atol=1e-8)
    # An excursion of "mem" alone (correlated with cpu in normal times) opens an alert naming it.
    det2 = Detector(model, threshold=0.5, warmup=10)
    _stream(det2, x)
    bad = np.array([[0.0, 6.0, 0.0]])
    res = det2.process(["a"], bad, [10 ** 6])
    assert res.alert[0] and res.alerts[0].kind == "open"
    assert res.alerts[0].top_features[0] == "mem"


# ---------------------------------------------------------------- decisions
def _hand_detector(**options):
    # Zero model, normalised scorer: error = |x|. Base noise alternates 1.0 / 1.2. The hand-made
    # sequences repeat values exactly (1.0, 1.0, 1.0 as quiet events), which the repeat term
    # would flag as a stuck sensor: off here, it is tested on its own.
    cfg = dict(threshold=0.5, lower_threshold=0.25, close_after=3, warmup=5, error_alpha=0.1, stuck_values=False)
    cfg.update(options)
    return Detector(_zero_model(1), **cfg)


def test_hysteresis_opens_once_and_closes_after_k_quiet_events():
    base = [1.0, 1.2] * 10
    x = base + [9.0, 1.1, 8.0, 1.1, 1.0, 1.1, 1.0] + base
    det = _hand_detector()
    out = _stream(det, x)
    n = len(base)
    scores = out.score
    assert scores[n] > 0.5 and scores[n + 1] < 0.25 and scores[n + 2] > 0.5
    # Opens at the spike; the second spike keeps it open (quiet count restarts); closes on
    # the third quiet event after it. The closing event is outside the episode.
    expected = np.zeros(len(x), bool)
    expected[n:n + 5] = True
    assert out.alert.tolist() == expected.tolist()
    assert [(a.kind, a.ts) for a in out.alerts] == [("open", 1000 * n), ("close", 1000 * (n + 5))]
    assert out.alerts[0].alert_id == out.alerts[1].alert_id == f"a:{1000 * n}"
    assert out.alerts[0].values == {"value": 9.0} and out.alerts[0].predicted == {"value": 0.0}
    assert out.alerts[0].threshold == 0.5 and out.alerts[0].model.name == "model"
    assert det.counters["alerts_opened"] == det.counters["alerts_closed"] == 1


def test_no_alert_during_warmup():
    x = [1.0, 1.2, 1.0, 9.0] + [1.0, 1.2] * 20 + [9.0, 1.0, 1.0, 1.0]
    out = _stream(_hand_detector(warmup=5), x)
    assert out.score[3] > 0.5 and not out.alert[3]  # rank 2 < warmup
    assert out.alert[44] and out.rank[44] == 43
    assert [a.kind for a in out.alerts] == ["open", "close"]
    out0 = _stream(_hand_detector(warmup=0), x)
    assert out0.alert[3]


def test_normalised_scorer_flags_errors_that_stay_too_small():
    rng = np.random.default_rng(9)
    x = np.r_[np.abs(rng.normal(1.0, 0.3, 60)), np.full(15, 1e-3)]  # then a stuck sensor
    out = _stream(Detector(_zero_model(1), threshold=0.4, warmup=10, error_alpha=0.05), x)
    assert not out.alert[:60].any()
    assert out.alert[60:].any() and out.alerts[0].ts >= 60_000


def test_error_statistics_freeze_inside_episode_unless_learning():
    x = [1.0, 1.2] * 10 + [1.7, 1.7, 1.7, 1.7]
    frozen = _stream(_hand_detector(close_after=10), x)
    learning = _stream(_hand_detector(close_after=10, learn_during_alert=True), x)
    assert frozen.alert[-4:].all() and learning.alert[-4:].all()
    # Frozen statistics keep judging 1.7 as unusual as at first; learnt ones move towards it.
    assert frozen.score[-1] == pytest.approx(frozen.score[-3])
    assert learning.score[-1] < learning.score[-3]


def test_relearn_after_long_episode_accepts_new_normal():
    x = [1.0, 1.2] * 10 + [9.0, 9.2] * 40
    out = _stream(_hand_detector(relearn_after=10, close_after=3), x)
    assert out.alert[20]
    assert not out.alert[-1] and [a.kind for a in out.alerts] == ["open", "close"]


def test_dynamic_threshold_suppresses_alerts_in_noisy_windows():
    rng = np.random.default_rng(8)
    x = np.abs(rng.normal(1.0, 0.3, 400))
    static = _stream(Detector(_zero_model(1), threshold=0.3, warmup=10), x)
    dynamic = _stream(Detector(_zero_model(1), threshold=0.3, warmup=10, dynamic=True,
                               dynamic_window=32), x)
    assert dynamic.alert.sum() < static.alert.sum()
    y = x.copy()
    y[300] = 40.0
    spiked = _stream(Detector(_zero_model(1), threshold=0.3, warmup=10, dynamic=True,
                              dynamic_window=32), y)
    assert spiked.alert[300]


# ---------------------------------------------------------------- config
def test_config_from_dict_rejects_unknown_and_bad_values():
    cfg = ScoringConfig.from_dict({"method": "likelihood", "threshold": 0.4, "max_gap_ms": 60000,
                                   "gap_policy": "decay", "dynamic_z": [2, 6, 1]})
    assert cfg.method == "likelihood" and cfg.dynamic_z == (2, 6, 1)
    with pytest.raises(ScoringConfigError, match="unknown \\[scoring\\] setting.*treshold"):
        ScoringConfig.from_dict({"treshold": 0.5})
    for bad in ({"method": "zscore"}, {"threshold": 4.0}, {"warmup": -1}, {"gap_policy": "skip"},
                {"out_of_order": "keep"}, {"same_timestamp": "first"}, {"error_alpha": 0.0}, {"max_gap_ms": 0},
                {"threshold": 0.2, "lower_threshold": 0.3}, {"dynamic": "yes"}):
        with pytest.raises(ScoringConfigError, match=r"\[scoring\]"):
            ScoringConfig.from_dict(bad)
    with pytest.raises(ScoringConfigError, match="unknown scoring setting"):
        Detector(_zero_model(1), thresold=0.5)
    with pytest.raises(ScoringConfigError, match="Gaussian head"):
        Detector(_zero_model(1), method="gaussian")


def test_defaults_come_from_model_calibration():
    model = _zero_model(1)
    assert Detector(model).threshold == DEFAULT_THRESHOLD
    model.thresholds = {"method": "likelihood", "threshold": 0.42}
    det = Detector(model)
    assert det.method == "likelihood" and det.threshold == 0.42 and det.lower_threshold == 0.21
    assert Detector(model, method="normalised").threshold == DEFAULT_THRESHOLD
    assert Detector(model, threshold=0.7).threshold == 0.7


def test_calibrate_threshold_is_the_target_quantile_and_is_read_back():
    model = Model.random("gru", n_features=1, hidden=[8], seed=11)
    rng = np.random.default_rng(12)
    n_streams, length = 20, 60
    x = np.sin(np.arange(length)[None, :] / 4.0 + rng.uniform(0, 6, (n_streams, 1)))
    x = x + rng.normal(0, 0.1, x.shape)
    ids = [f"s{i}" for i in range(n_streams)] * length
    vals = x.T.reshape(-1, 1)
    ts = np.repeat(np.arange(length, dtype=np.int64) * 1000, n_streams)
    mask = np.ones(len(ids), bool)
    mask[::7] = False
    batches = [(ids[a:a + 300], vals[a:a + 300], ts[a:a + 300], mask[a:a + 300]) for a in range(0, len(ids), 300)]
    cal = calibrate(model, batches, target_false_alert_rate=0.02, config=ScoringConfig(warmup=5),
                    calibration="quantile")
    ref = Detector(model, threshold=1.0, warmup=5).process(ids, vals, ts)
    counted = ref.score[mask & (ref.rank >= 5)]
    assert cal["events"] == counted.size
    assert cal["threshold"] == pytest.approx(np.quantile(counted, 0.98, method="higher"))
    assert cal["calibration"] == "quantile" and cal["quantile_threshold"] == cal["threshold"]
    # POT's default: a 2 % rate is not in the tail above the 98 % quantile, so it falls back
    pot = calibrate(model, batches, target_false_alert_rate=0.02, config=ScoringConfig(warmup=5))
    assert pot["calibration"] == "quantile" and "pot_fallback" in pot and pot["threshold"] == cal["threshold"]
    assert 0.01 <= np.mean(counted > cal["threshold"]) <= 0.02
    assert cal["method"] == "normalised" and cal["error_mean"] > 0 and cal["error_var"] > 0
    model.thresholds = cal
    det = Detector(model, warmup=5)
    assert det.threshold == cal["threshold"]
    # The calibrated prior lets a new stream score from its first scored event.
    first = _stream(det, x[0, :3], sid="new")
    assert np.isfinite(first.score[1])


def test_scores_are_comparable_across_streams_of_any_scale():
    rng = np.random.default_rng(13)
    x = np.abs(rng.normal(1.0, 0.3, 200))
    x[150] = 4.0
    det = Detector(_zero_model(1), threshold=0.5, warmup=10, error_alpha=0.05)
    small = _stream(det, x, sid="small")
    big = _stream(det, 1000.0 * x, sid="big")
    np.testing.assert_allclose(small.score, big.score, rtol=1e-4, atol=1e-6)
    assert [a.ts for a in small.alerts] == [a.ts for a in big.alerts] and small.alerts


def test_alert_records_round_trip_through_arrow_and_json():
    from streamrnn.alerts import alerts_from_arrow, alerts_to_arrow, decode_alert, encode_alert

    x = [1.0, 1.2] * 10 + [9.0, 1.1, 1.0, 1.1]
    alerts = _stream(_hand_detector(), x).alerts
    assert [a.kind for a in alerts] == ["open", "close"]
    assert alerts_from_arrow(alerts_to_arrow(alerts)) == alerts
    assert [decode_alert(encode_alert(a)) for a in alerts] == alerts


# ---------------------------------------------------------------- normal value range term
def _persistence_model(eps=0.01):
    """A one-unit RNN that predicts the last value (tanh(eps x) / eps: within 1 % of x for
    |x| < 0.17 / eps): its errors are the first differences, so a slow ramp hides in them
    and only the range term can see it."""
    layer = {"w_ih": np.array([[eps]]), "w_hh": np.zeros((1, 1)), "b_ih": np.zeros(1), "b_hh": np.zeros(1)}
    return Model(cell="rnn", layers=[layer], head_weight=np.array([[1.0 / eps]]), head_bias=np.zeros(1))


def _wilson_hilferty_sf(m, nu):
    """P(chi2_nu / nu > m) by the cube-root normal approximation."""
    v = 2.0 / (9.0 * nu)
    return stats.norm.sf((np.cbrt(m) - (1.0 - v)) / np.sqrt(v))


def _reference_range_scores(x, pred, alpha, sa, ra, warm, ba=0.0, ea=0.0, start=20, repeats=False):
    """The normalised scorer with its range, bias, energy and repeat terms, written directly
    over scalars (no alerts, every event learnt): the expected score of every event given the
    model's predictions."""
    k, mu, var, short, vm, cov = 0, 0.0, 0.0, 0.0, 0.0, 0.0
    bias, energy = 0.0, 0.0
    run, n_rep = 0, 0
    lo, hi = np.inf, -np.inf
    out = [np.nan]
    xs = np.asarray(x, np.float32).astype(np.float64)
    for t in range(1, len(xs)):
        v = xs[t]
        r = v - pred[t - 1]
        err = abs(r)
        ssa = max(sa, 1.0 / (k + 1))
        run = run + 1 if xs[t] == xs[t - 1] else 0
        if k == 0:
            out.append(np.nan)
        else:
            sd = np.sqrt(var + EPS)
            p = stats.norm.sf((err - mu) / sd)
            if k * sa >= 2.0:
                p = min(p, stats.norm.cdf(((1 - ssa) * short + ssa * err - mu) / (sd * np.sqrt(sa / (2 - sa)))))
            beyond = max(v - hi, lo - v)
            if k >= warm and beyond > 0:
                p = min(p, 2.0 * stats.norm.sf(beyond / np.sqrt(cov + EPS)))
            z = np.clip((r - vm) / np.sqrt(cov + EPS), -4.0, 4.0)
            if ba > 0 and (k - start) * ba >= 2.0:
                b = (1 - ba) * bias + ba * z
                p = min(p, 2.0 * stats.norm.sf(abs(b) / np.sqrt(ba / (2 - ba))))
            if ea > 0 and (k - start) * ea >= 2.0:
                p = min(p, _wilson_hilferty_sf((1 - ea) * energy + ea * z * z, (2 - ea) / ea))
            if repeats and run > 0 and k >= start:
                p = min(p, ((n_rep + 1) / (k + 2)) ** run)
            out.append(float(_score(p)))
        n_rep += run > 0
        if k >= start:
            z = np.clip((r - vm) / np.sqrt(cov + EPS), -4.0, 4.0)
            bb, ee = max(ba, 1.0 / (k - start + 1)), max(ea, 1.0 / (k - start + 1))
            bias, energy = (1 - bb) * bias + bb * z, (1 - ee) * energy + ee * z * z
        if k < warm:
            lo, hi = min(lo, v), max(hi, v)
        elif v > hi:
            hi += ra * (v - hi)
        elif v < lo:
            lo += ra * (v - lo)
        a = max(alpha, 1.0 / (k + 1))
        if k * sa >= 2.0:
            s0 = np.sqrt(var)
            err = min(max(err, mu - 2 * s0), mu + 4 * s0)
        short = (1 - ssa) * short + ssa * abs(r)
        d = err - mu
        mu, var = mu + a * d, (1 - a) * (var + a * d * d)
        dr = r - vm
        cov, vm = (1 - a) * (cov + a * dr * dr), vm + a * dr
        k += 1
    return np.array(out)


def _slow_ramp(seed=11, n_flat=300, n_ramp=150, height=15.0):
    x = np.random.default_rng(seed).normal(0.0, 1.0, n_flat + n_ramp)
    x[n_flat:] += np.linspace(0.0, height, n_ramp)
    return x


def test_range_term_matches_numpy():
    model = _persistence_model()
    x = _slow_ramp()
    pred = model.predict(x[:, None].astype(np.float32))[:, 0].astype(np.float64)
    cfg = dict(threshold=1.0, error_alpha=0.02, short_alpha=0.25, bias_alpha=0.0, energy_alpha=0.0)
    out = _stream(Detector(model, range_alpha=0.05, range_warmup=60, **cfg), x)
    expected = _reference_range_scores(x, pred, 0.02, 0.25, 0.05, 60)
    np.testing.assert_allclose(out.score, expected, rtol=1e-6, atol=1e-9)
    # The range term decides many scores (else this test would not test it).
    plain = _stream(Detector(model, range_alpha=0.0, **cfg), x)
    assert np.sum(out.score > plain.score + 0.05) >= 20


def _burst_then_bias(seed=17):
    """Noise, then 80 events of noise 1.8x as large, then noise again, then 80 events of a
    ramp (a persistent bias in a persistence model's errors), each too small for the point
    scorer at threshold 0.8."""
    x = np.random.default_rng(seed).normal(0.0, 1.0, 700)
    x[300:380] *= 1.8
    x[500:580] += np.cumsum(np.full(80, 1.0))
    x[580:] += 80.0
    return x


@pytest.mark.parametrize("terms", [dict(bias_alpha=0.05, energy_alpha=0.0), dict(bias_alpha=0.0, energy_alpha=0.03),
                                   dict(bias_alpha=0.04, energy_alpha=0.02)])
def test_bias_and_energy_terms_match_numpy(terms):
    model = _persistence_model()
    x = _burst_then_bias()
    pred = model.predict(x[:, None].astype(np.float32))[:, 0].astype(np.float64)
    cfg = dict(threshold=1.0, error_alpha=0.02, short_alpha=0.25, range_alpha=0.05, range_warmup=60)
    out = _stream(Detector(model, **cfg, **terms), x)
    expected = _reference_range_scores(x, pred, 0.02, 0.25, 0.05, 60, terms["bias_alpha"], terms["energy_alpha"])
    np.testing.assert_allclose(out.score, expected, rtol=1e-6, atol=1e-9)
    # The new terms decide many scores, where they should (else this test would not test them).
    plain = _stream(Detector(model, **cfg, bias_alpha=0.0, energy_alpha=0.0), x).score
    raised = out.score > plain + 0.05
    if terms["energy_alpha"]:
        assert raised[300:390].sum() >= 20
    if terms["bias_alpha"]:
        assert raised[500:590].sum() >= 20


def _noise_with_stuck_values(seed=19, quantum=None):
    """Noise (rounded to ``quantum`` if given) with two single repeats and a stuck run of 15."""
    x = np.random.default_rng(seed).normal(0.0, 1.0, 500)
    if quantum:
        x = np.round(x / quantum) * quantum
    x[100], x[200] = x[99], x[199]
    x[300:315] = x[299]
    return x


def test_repeat_term_matches_numpy():
    model = _persistence_model()
    x = _noise_with_stuck_values()
    pred = model.predict(x[:, None].astype(np.float32))[:, 0].astype(np.float64)
    cfg = dict(threshold=1.0, error_alpha=0.02, short_alpha=0.25, range_alpha=0.0, bias_alpha=0.0, energy_alpha=0.0)
    out = _stream(Detector(model, **cfg), x)
    expected = _reference_range_scores(x, pred, 0.02, 0.25, 0.0, 60, repeats=True)
    np.testing.assert_allclose(out.score, expected, rtol=1e-6, atol=1e-9)
    plain = _stream(Detector(model, stuck_values=False, **cfg), x).score
    raised = np.flatnonzero(out.score > plain + 0.05)
    assert set(range(302, 315)) <= set(raised.tolist()) and raised.min() >= 300


def test_repeat_term_flags_a_stuck_sensor_early_but_not_a_quantised_stream():
    model = _persistence_model()
    cfg = dict(threshold=0.8, warmup=20, range_alpha=0.0)
    opened = [a.ts // 1000 for a in _stream(Detector(model, **cfg), _noise_with_stuck_values()).alerts
              if a.kind == "open"]
    assert opened and 300 < opened[0] <= 305
    assert not any(300 < o <= 305 for o in (a.ts // 1000 for a in _stream(
        Detector(model, stuck_values=False, **cfg), _noise_with_stuck_values()).alerts))
    # Values on a coarse grid repeat often: the stream's own rate of repeats makes a run of a
    # few ordinary repeats unremarkable.
    coarse = _noise_with_stuck_values(quantum=0.5)
    coarse[300:315] = np.round(np.random.default_rng(20).normal(0.0, 1.0, 15) / 0.5) * 0.5
    assert not _stream(Detector(model, **cfg), coarse).alerts


def test_chi2_mean_tail_is_close_to_scipy():
    for nu in (10.0, 39.0, 66.0, 99.0):
        for m in (0.5, 1.0, 1.5, 2.0, 2.5):
            exact = stats.chi2.sf(m * nu, nu)
            if exact < 1e-9:
                continue
            approx = chi2_mean_sf(m, nu)
            assert np.isclose(approx, _wilson_hilferty_sf(m, nu), rtol=1e-9)
            # within a factor 1.5 of the exact tail: a score error under 0.02
            assert exact / 1.5 < approx < exact * 1.5, (nu, m, approx, exact)
    assert chi2_mean_sf(0.0, 20.0) == 1.0


def test_bias_and_energy_terms_alert_on_what_the_point_scorer_misses_not_on_noise():
    model = _persistence_model()
    cfg = dict(threshold=0.8, warmup=20, range_alpha=0.0)
    x = _burst_then_bias()
    assert not _stream(Detector(model, bias_alpha=0.0, energy_alpha=0.0, **cfg), x).alerts
    opened = [a.ts // 1000 for a in _stream(Detector(model, **cfg), x).alerts if a.kind == "open"]
    assert any(300 <= o < 380 for o in opened) and any(500 <= o < 580 for o in opened)
    assert all(300 <= o < 380 or 500 <= o < 580 for o in opened), opened
    for seed in (12, 13):
        noise = np.random.default_rng(seed).normal(0.0, 1.0, 3000)
        assert not _stream(Detector(model, **cfg), noise).alerts


def test_bias_and_energy_state_survives_snapshot_and_restore():
    model = _persistence_model()
    x = _burst_then_bias()
    straight = _stream(Detector(model, threshold=0.5), x)
    first = Detector(model, threshold=0.5)
    a = _stream(first, x[:340])
    restored = Detector.restore(model, first.snapshot(), threshold=0.5)
    b = _stream(restored, x[340:], t0=340_000)
    np.testing.assert_array_equal(np.r_[a.score, b.score], straight.score)
    np.testing.assert_array_equal(np.r_[a.alert, b.alert], straight.alert)
    assert straight.alert[300:380].any()


def test_bias_and_energy_settings_are_validated():
    for bad in (dict(bias_alpha=-0.1), dict(energy_alpha=0.9), dict(bias_alpha=True), dict(energy_alpha="x")):
        with pytest.raises(ScoringConfigError, match="_alpha"):
            ScoringConfig(**bad).validate()
    with pytest.raises(ScoringConfigError, match="stuck_values"):
        ScoringConfig(stuck_values=1).validate()
    ScoringConfig(bias_alpha=0.0, energy_alpha=0.0).validate()


def test_range_term_alerts_on_slow_ramp_not_on_stationary_noise():
    model = _persistence_model()
    cfg = dict(threshold=0.5, warmup=20)
    ramp = _slow_ramp(seed=14)
    # The ramp's first differences (the errors) move 0.1 sd: the point scorer never alerts,
    # the range term opens an episode once the ramp is far enough beyond the normal range.
    assert not _stream(Detector(model, range_alpha=0.0, **cfg), ramp).alert.any()
    out = _stream(Detector(model, **cfg), ramp)
    opened = [a.ts // 1000 for a in out.alerts if a.kind == "open"]
    assert len(opened) == 1 and 300 < opened[0] < 450
    # Stationary noise: the range term never raises a score by much, nor adds an alert.
    for seed in (12, 13):
        noise = np.random.default_rng(seed).normal(0.0, 1.0, 3000)
        with_range = _stream(Detector(model, **cfg), noise)
        without = _stream(Detector(model, range_alpha=0.0, **cfg), noise)
        assert np.nanmax(with_range.score - without.score) < 0.1
        assert with_range.alert.tolist() == without.alert.tolist()
    assert not _stream(Detector(model, **cfg), np.random.default_rng(12).normal(0.0, 1.0, 3000)).alert.any()


def test_range_state_survives_snapshot_and_restore():
    model = _persistence_model()
    x = _slow_ramp(seed=14)
    straight = _stream(Detector(model, threshold=0.5), x)
    first = Detector(model, threshold=0.5)
    a = _stream(first, x[:350])
    restored = Detector.restore(model, first.snapshot(), threshold=0.5)
    assert np.all(np.isfinite(restored.table.column("x_hi")[:1]))
    b = _stream(restored, x[350:], t0=350_000)
    np.testing.assert_array_equal(np.r_[a.score, b.score], straight.score)
    np.testing.assert_array_equal(np.r_[a.alert, b.alert], straight.alert)
    assert straight.alert.any()


def test_range_settings_are_validated():
    for bad in (dict(range_alpha=1.5), dict(range_alpha=True), dict(range_warmup=0)):
        with pytest.raises(ScoringConfigError, match="range_"):
            ScoringConfig(**bad).validate()
    ScoringConfig(range_alpha=0.0).validate()


def test_range_absorbs_flagged_values_and_does_not_reopen():
    model = _persistence_model()
    x = _slow_ramp(seed=14)
    x = np.r_[x, 15.0 + np.random.default_rng(15).normal(0.0, 1.0, 200)]  # the level reached stays
    out = _stream(Detector(model, threshold=0.5, relearn_after=30), x)
    # One short episode: the value that opened it joins the range (an anomaly flagged is not
    # flagged again for being out of range), so the ramp's next values are only a little
    # beyond it and the episode closes; the settling period after it and the slow widening
    # keep the rest of the ramp and the plateau from reopening it.
    assert [a.kind for a in out.alerts] == ["open", "close"]
    opened, closed = out.alerts[0].ts // 1000, out.alerts[1].ts // 1000
    assert 300 < opened < 450 and opened < closed <= opened + 10
    # Without the range term the ramp is never flagged.
    assert not _stream(Detector(model, threshold=0.5, relearn_after=30, range_alpha=0.0), x).alerts


def test_range_settles_on_the_level_after_a_short_episode():
    model = _persistence_model()
    t = np.arange(500)
    x = 3.0 * np.sin(2 * np.pi * t / 40) + np.random.default_rng(16).normal(0.0, 0.3, 500)
    x[300:] += 4.0  # a level shift: the point scorer flags its first event, a short episode

    def episodes(**kw):
        out = _stream(Detector(model, threshold=0.5, **kw), x)
        return [a.ts // 1000 for a in out.alerts if a.kind == "open"]

    # For relearn_after events after the episode closes the stream's values join its range,
    # so the next cycle peaks at the new level do not reopen it: the range term adds nothing.
    assert 300 in episodes() and episodes() == episodes(range_alpha=0.0)
    # With a settling period shorter than a cycle, the first peak at the new level is out of
    # range and opens a second episode.
    assert any(310 < o < 345 for o in episodes(relearn_after=5))


# --- threshold estimation: peaks over threshold (generalised Pareto tail) vs empirical quantile ---

def test_pot_threshold_hits_the_true_quantile_of_a_known_tail_with_less_spread():
    # Scores with a generalised Pareto tail of known shape and scale (xi = 0 is exponential,
    # the tail of -log p for calibrated p-values); the true (1 - rate) quantile from SciPy.
    rate, n, reps = 1e-4, 18_900, 60
    rng = np.random.default_rng(21)
    for xi, sigma in ((0.0, 0.05), (0.1, 0.04), (-0.1, 0.06)):
        dist = stats.genpareto(xi, loc=0.0, scale=sigma)
        true = float(dist.ppf(1.0 - rate))
        pot, emp = [], []
        for _ in range(reps):
            est = estimate_threshold(dist.rvs(size=n, random_state=rng), rate)
            assert est["calibration"] == "pot" and est["pot_excesses"] == pytest.approx(0.02 * n, abs=2)
            pot.append(est["threshold"])
            emp.append(est["quantile_threshold"])
        pot, emp = np.array(pot), np.array(emp)
        assert abs(np.median(pot) - true) < 0.05 * true, (xi, np.median(pot), true)
        assert np.sqrt(np.mean((pot - true) ** 2)) < 0.8 * np.sqrt(np.mean((emp - true) ** 2)), xi
        assert np.std(pot) < 0.8 * np.std(emp), xi


def test_pot_fit_agrees_with_scipy_maximum_likelihood():
    rng = np.random.default_rng(22)
    scores = stats.genpareto(0.15, scale=0.05).rvs(size=20_000, random_state=rng)
    est = estimate_threshold(scores, 1e-4)
    u = np.quantile(scores, 0.98)
    excess = scores[scores > u] - u
    xi, _, sigma = stats.genpareto.fit(excess, floc=0.0)
    assert est["pot_initial"] == pytest.approx(u) and est["pot_excesses"] == excess.size
    assert est["pot_shape"] == pytest.approx(xi, abs=2e-3)
    assert est["pot_scale"] == pytest.approx(sigma, rel=2e-3)
    ref = u + sigma / xi * ((1e-4 * scores.size / excess.size) ** -xi - 1.0)
    assert est["threshold"] == pytest.approx(ref, rel=1e-3)


def test_pot_censors_saturated_scores():
    # Scores clipped at a saturation level below the target quantile: the clipped values are
    # only known to be at least that high, and the fit must treat them so.
    rng = np.random.default_rng(23)
    rate, sigma, sat = 1e-3, 0.1, 0.62
    true = sigma * np.log(1.0 / rate)  # 0.69, above the saturation
    got = []
    for _ in range(20):
        s = np.minimum(rng.exponential(sigma, 20_000), sat)
        est = estimate_threshold(s, rate, saturation=sat)
        assert est["calibration"] == "pot"
        got.append(est["threshold"])
        assert est["quantile_threshold"] == sat  # the empirical quantile cannot see past it
    assert abs(np.median(got) - true) < 0.03


def test_pot_falls_back_to_the_empirical_quantile():
    rng = np.random.default_rng(24)
    few = rng.exponential(0.05, 1000)  # 20 excesses over the 98 % quantile: too few to fit
    est = estimate_threshold(few, 1e-4)
    assert est["calibration"] == "quantile" and "fewer than 50" in est["pot_fallback"]
    assert est["threshold"] == np.quantile(few, 1 - 1e-4, method="higher") == few.max()
    est = estimate_threshold(rng.exponential(0.05, 50_000), 0.05)  # target below the initial threshold
    assert est["calibration"] == "quantile" and "pot_fallback" in est
    assert estimate_threshold(few, 1e-4, "quantile") == {"threshold": few.max(), "calibration": "quantile",
                                                         "quantile_threshold": few.max()}
    with pytest.raises(Exception, match="calibration must be one of"):
        estimate_threshold(few, 1e-4, "spot")


def _fed_in_chunks(scores: np.ndarray, capacity: int, seed: int) -> scoring.ScoreTail:
    tail = scoring.ScoreTail(capacity)
    cuts = np.sort(np.random.default_rng(seed).integers(0, scores.size, 40))
    for part in np.split(scores, cuts):
        tail.add(part)
    return tail


@pytest.mark.parametrize("n, rate, quantised", [(20_000, 1e-4, False), (60_001, 1e-3, False),
                                                (50_000, 1e-4, True), (3_000, 1e-2, False)])
def test_threshold_from_the_kept_tail_equals_the_one_from_all_scores(n, rate, quantised):
    # A tail long enough for the 98 % quantile gives the same dict, bit for bit, as all scores,
    # and both match NumPy's quantiles over all scores.
    rng = np.random.default_rng(n)
    scores = stats.genpareto(0.1, scale=0.05).rvs(size=n, random_state=rng)
    if quantised:  # many ties, also at the tail's cut
        scores = np.round(scores, 2)
    scores[rng.integers(0, n, 5)] = np.nan  # not scores: skipped by both
    finite = scores[np.isfinite(scores)]
    capacity = int(0.02 * n) + 2
    tail = _fed_in_chunks(scores, capacity, seed=n)
    assert tail.n == finite.size and len(tail.scores()) == capacity
    assert tail._held <= 2 * capacity
    assert np.array_equal(np.sort(tail.scores()), np.sort(finite)[-capacity:])
    for method in ("pot", "quantile"):
        got = estimate_threshold(tail.scores(), rate, method, n_scores=tail.n)
        assert got == estimate_threshold(scores, rate, method)
        assert got["quantile_threshold"] == np.quantile(finite, 1 - rate, method="higher")
    got = estimate_threshold(tail.scores(), rate, n_scores=tail.n)
    if got["calibration"] == "pot":
        assert got["pot_initial"] == np.quantile(finite, 0.98)
        assert got["pot_excesses"] == int(np.sum(finite > np.quantile(finite, 0.98)))


def test_a_short_tail_raises_the_initial_threshold_or_says_what_is_missing():
    rng = np.random.default_rng(31)
    scores = rng.exponential(0.05, 100_000)
    tail = _fed_in_chunks(scores, 500, seed=1)  # the top 0.5 %, not the top 2 %
    est = estimate_threshold(tail.scores(), 1e-4, n_scores=tail.n)
    lowest = np.sort(scores)[-500]
    assert est["calibration"] == "pot" and est["pot_initial"] == lowest
    assert est["pot_level"] == pytest.approx(0.995, abs=1e-4) and est["pot_excesses"] == 499
    true = 0.05 * np.log(1e4)  # exponential tail: the quantile is known
    assert abs(est["threshold"] - true) < 0.1 * true
    with pytest.raises(Exception, match="only the top 500 were kept"):
        estimate_threshold(tail.scores(), 1e-2, n_scores=tail.n)


@pytest.mark.parametrize("estimate, clamped", [(5.0, MAX_CALIBRATED), (-0.3, 1e-6), (0.4, 0.4)])
def test_calibrate_clamps_the_estimated_threshold(monkeypatch, estimate, clamped):
    model = Model.random("gru", n_features=1, hidden=[4], seed=3)
    x = np.sin(np.arange(80) / 3.0)
    ids, ts = ["a"] * 80, np.arange(80, dtype=np.int64) * 1000
    seen = {}

    def fake(scores, rate, calibration, n_scores):
        seen["n"], seen["calibration"] = n_scores, calibration
        return {"threshold": estimate, "calibration": "pot", "quantile_threshold": float(np.max(scores))}

    monkeypatch.setattr(scoring, "estimate_threshold", fake)
    cal = calibrate(model, [(ids, x[:, None], ts, np.ones(80, bool))], target_false_alert_rate=1e-3,
                    config=ScoringConfig(warmup=5))
    assert cal["threshold"] == clamped and cal["calibration"] == "pot"
    assert seen == {"n": cal["events"], "calibration": "pot"} and cal["events"] == 80 - 1 - 5
