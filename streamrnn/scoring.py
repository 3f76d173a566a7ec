"""Scoring configuration, threshold calibration and the score scale.

Scores. Every method turns an event's one-step-ahead prediction error into the
probability ``p`` of an error at least this large under the stream's normal behaviour and
reports ``score = clip(-log10(p) / 10, 0, 1)``: 0.3 means p = 1e-3, 0.5 means p = 1e-5,
1.0 means p <= 1e-10 — the same on every stream, whatever its level or noise.

Methods (``ScoringConfig.method``), errors in the model's scaled units:

``normalised``
    e = RMS error over features; p = P(Z > (e - m) / s) with m, s the stream's
    exponentially weighted mean and standard deviation of past errors (``error_alpha``).
    Errors that stay too small are anomalous too (a stuck sensor): once the stream has
    ``2 / short_alpha`` scored events, p is the smaller of that and P(Z < (r - m) / s_r),
    r the recent mean error (EW with ``short_alpha``, including this event) and
    s_r = s * sqrt(a / (2 - a)) the spread of such a mean of independent errors.
``likelihood``
    Numenta's anomaly likelihood: the recent mean error (EW with ``short_alpha``) against
    the long-run distribution, p = P(Z > (recent - m) / s).
``gaussian``
    For models with the Gaussian head (outputs: means then log-variances): q = sum of
    squared standardised residuals, p = chi-squared tail of q with D degrees of freedom;
    ``error`` reports the Gaussian negative log-likelihood.
``mahalanobis``
    Multivariate: q = (r - m)^T C^-1 (r - m) with the stream's EW mean m and covariance C
    of the residual vectors r; p = chi-squared tail with D degrees of freedom. Each
    feature's term of q is its contribution (alerts name the top features).

Range term (``normalised`` only; ``range_alpha = 0`` turns it off). A slow
drift is followed by the network's state, so its one-step errors stay small; its values
leave the range the stream normally covers. Each stream keeps the range [lo, hi] of its
scaled values per feature: plain min/max over its first ``range_warmup`` learnt events, then
widened towards a learnt value outside it by ``range_alpha`` of the gap per event (a slow
change is absorbed gradually, a ramp outruns it). Values inside an alert episode, and for
``relearn_after`` events after one closes, join the range outright: an anomaly that was
flagged, and the level it leaves behind, are not flagged again for being out of range. Once
the range is set, a value b residual standard deviations beyond it (sd from the stream's EW
residual variance) gives p_range = 2 D P(Z > b): as unlikely as noise b sd beyond a
noiseless envelope (conservative, since the range already holds the noise's extremes),
Bonferroni over both sides and the D features; p is the smaller of that and the error's p.
The calibrated threshold applies to the combined score, so the target false-alert rate
holds for both together.

Bias and energy terms (``normalised`` only; ``bias_alpha = 0`` /
``energy_alpha = 0`` turn them off). Each residual is standardised by the stream's EW
residual mean and variance, z = (r - m_r) / s_r, winsorised to +-4. The bias term watches
b, the EW mean of z with weight ``bias_alpha`` (a drift the state lags behind leaves a small
error of one sign for many events): p_bias = 2 D P(Z > |b| / sqrt(a / (2 - a))), the spread
of such a mean of independent residuals. The energy term watches q, the EW mean of z^2 over
the features with weight ``energy_alpha`` (a variance burst, a cycle the network cannot
follow): p_energy = P(chi2_nu / nu > q), nu = D (2 - a) / a (Wilson-Hilferty). Both
average from a stream's 20th learnt event on and score once 2 / alpha events are averaged;
they are silent while a stream settles after an episode, and inside an episode and while
settling the residual mean and variance follow at the terms' rate, so that what an episode
leaves behind (an offset after a level shift) becomes the new normal instead of an alert.

Repeat term (``normalised`` and ``likelihood``; ``stuck_values = false`` turns it off). A
stuck sensor repeats its last value exactly, which the network may even predict well. Each
stream counts, among its learnt events, those whose values all equal the previous event's;
with c such repeats in n events its rate is (c + 1) / (n + 2) (Laplace), and the r-th
identical value in a row has p_repeat = rate^r: a stream that never repeats alerts after a
few, a quantised stream that often repeats only after many. It scores once a stream has 20
learnt events.

Streams without a scaler (models trained with a scaler per stream). The network of such a
model only ever saw each stream in its own units (its mean and standard deviation); the
global scaler, fitted on all streams pooled, puts a stream at level 50 in a fleet spanning
10-1000 far from anything it was trained on. A stream the model has no scaler for therefore
fits its own on its first ``fit_scaler_events`` events, as the trainer does (mean and
population standard deviation per feature; a zero scale becomes 1): those events are counted
(``scaler_fitting``) but neither scored nor applied, and the last of them is the stream's
first step. ``fit_scaler_events = 0`` gives such streams the global scaler instead.

Decisions: an episode opens when the score exceeds ``threshold`` (after ``warmup`` scored
events of the stream), and, with ``dynamic = true``, the smoothed error also exceeds the
stream's nonparametric dynamic threshold (Hundman et al. 2018, over a sliding window of
``dynamic_window`` smoothed errors); it closes after ``close_after`` consecutive scored
events below ``lower_threshold``. Inside an episode (``learn_during_alert = false``) the
anomalous points (score at or above ``lower_threshold``) are not learnt: the stream's state
steps on its own prediction instead and its error statistics stay as they were; points that
look normal again are learnt. After ``relearn_after`` events an episode is taken for a new
normal (a level shift) and everything is learnt again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from streamrnn.errors import StreamrnnError
from streamrnn.kernels import detect as K
from streamrnn.kernels.scoring import GAUSSIAN, LIKELIHOOD, MAHALANOBIS, NORMALISED

#: Method names and their kernel codes.
METHODS = {"normalised": NORMALISED, "gaussian": GAUSSIAN, "likelihood": LIKELIHOOD,
           "mahalanobis": MAHALANOBIS}
#: Threshold used when neither the config nor the model's calibration gives one:
#: p = 1e-6 under the stream's own error distribution.
DEFAULT_THRESHOLD = 0.6
#: Highest threshold calibration returns (scores saturate at 1).
MAX_CALIBRATED = 0.999
GAP_POLICIES = ("reset", "decay")
OUT_OF_ORDER_POLICIES = ("drop", "accept")
SAME_TIMESTAMP_POLICIES = ("drop", "apply")


class ScoringConfigError(StreamrnnError):
    """A bad ``[scoring]`` setting."""


@dataclass
class ScoringConfig:
    """How events are scored and when alerts open and close (TOML section ``[scoring]``).

    ``None`` fields are filled from the model by :meth:`resolve`: ``method`` from
    ``model.thresholds["method"]``, else "gaussian" for a Gaussian head, "mahalanobis"
    for several features, "normalised" otherwise; ``threshold`` from
    ``model.thresholds["threshold"]`` else :data:`DEFAULT_THRESHOLD`; ``lower_threshold``
    half the threshold.
    """

    method: str | None = None
    threshold: float | None = None
    lower_threshold: float | None = None
    close_after: int = 3
    warmup: int = 20
    dynamic: bool = False
    dynamic_window: int = 64
    dynamic_refresh: int = 8
    dynamic_z: tuple[float, float, float] = (2.0, 10.0, 0.5)  # lowest z, highest z, step
    learn_during_alert: bool = False
    relearn_after: int = 50  # events into an episode after which the stream learns again
    max_gap_ms: int | None = None
    gap_policy: str = "reset"
    out_of_order: str = "drop"
    # An event at its stream's last applied timestamp: "drop" (counted ``same_ts_dropped``;
    # (stream, ts) is one event, as training and replay merge it) or "apply" (a second step).
    same_timestamp: str = "drop"
    error_alpha: float = 0.01
    short_alpha: float = 0.2
    range_alpha: float = 0.01  # how fast the normal value range widens; 0 turns the range term off
    range_warmup: int = 100  # learnt events that set a stream's normal value range
    bias_alpha: float = 0.05  # EW weight of the recent mean signed residual; 0 turns the bias term off
    energy_alpha: float = 0.03  # EW weight of the recent mean squared residual; 0 turns the energy term off
    stuck_values: bool = True  # flag runs of identical values by the stream's own rate of repeats
    # Events on which a stream that a per-stream-scaled model has no scaler for fits its own
    # (0: it takes the model's global scaler).
    fit_scaler_events: int = 50
    drift_factor: float = 4.0
    prior_events: float = 10.0  # weight of the calibrated error statistics for a new stream

    @classmethod
    def from_dict(cls, d: dict | None) -> "ScoringConfig":
        """Build from a mapping (the ``[scoring]`` TOML table); unknown keys are an error."""
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ScoringConfigError(f"unknown [scoring] setting(s): {', '.join(unknown)}; "
                                     f"known: {', '.join(sorted(known))}")
        if "dynamic_z" in d:
            d["dynamic_z"] = tuple(d["dynamic_z"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def replace(self, **changes) -> "ScoringConfig":
        """A copy with some settings changed (validated; unknown names are an error)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ScoringConfigError(f"unknown scoring setting(s): {', '.join(unknown)}; "
                                     f"known: {', '.join(sorted(known))}")
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def bad(msg):
            raise ScoringConfigError(f"[scoring] {msg}")

        if self.method is not None and self.method not in METHODS:
            bad(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name in ("threshold", "lower_threshold"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                bad(f"{name} must be a score in [0, 1]; got {v!r}")
        if (self.threshold is not None and self.lower_threshold is not None
                and self.lower_threshold > self.threshold):
            bad(f"lower_threshold ({self.lower_threshold}) must not exceed threshold ({self.threshold})")
        for name, lo in (("close_after", 1), ("warmup", 0), ("dynamic_window", 2), ("dynamic_refresh", 1),
                         ("relearn_after", 0), ("range_warmup", 1), ("fit_scaler_events", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad(f"{name} must be an integer >= {lo}; got {v!r}")
        if self.max_gap_ms is not None and (isinstance(self.max_gap_ms, bool)
                                            or not isinstance(self.max_gap_ms, int) or self.max_gap_ms <= 0):
            bad(f"max_gap_ms must be a positive integer (milliseconds) or absent; got {self.max_gap_ms!r}")
        if self.gap_policy not in GAP_POLICIES:
            bad(f"gap_policy must be one of {', '.join(GAP_POLICIES)}; got {self.gap_policy!r}")
        if self.out_of_order not in OUT_OF_ORDER_POLICIES:
            bad(f"out_of_order must be one of {', '.join(OUT_OF_ORDER_POLICIES)}; got {self.out_of_order!r}")
        if self.same_timestamp not in SAME_TIMESTAMP_POLICIES:
            bad(f"same_timestamp must be one of {', '.join(SAME_TIMESTAMP_POLICIES)}; got {self.same_timestamp!r}")
        for name in ("error_alpha", "short_alpha"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 < v <= 1.0):
                bad(f"{name} must be in (0, 1]; got {v!r}")
        if isinstance(self.range_alpha, bool) or not (isinstance(self.range_alpha, (int, float))
                                                       and 0.0 <= self.range_alpha <= 1.0):
            bad(f"range_alpha must be in [0, 1] (0 turns the range term off); got {self.range_alpha!r}")
        for name in ("bias_alpha", "energy_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0.0 <= v <= 0.5):
                bad(f"{name} must be in [0, 0.5] (0 turns the term off); got {v!r}")
        if not (isinstance(self.drift_factor, (int, float)) and self.drift_factor > 0):
            bad(f"drift_factor must be positive; got {self.drift_factor!r}")
        if not (isinstance(self.prior_events, (int, float)) and self.prior_events >= 0):
            bad(f"prior_events must be >= 0; got {self.prior_events!r}")
        z = self.dynamic_z
        if (len(z) != 3 or not all(isinstance(v, (int, float)) for v in z)
                or not (0 < z[0] <= z[1] and z[2] > 0)):
            bad(f"dynamic_z must be [lowest, highest, step] with 0 < lowest <= highest, step > 0; got {z!r}")
        for name in ("dynamic", "learn_during_alert", "stuck_values"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be true or false; got {getattr(self, name)!r}")

    def resolve(self, model) -> "ResolvedScoring":
        """Fill the model-dependent defaults; returns the settings the kernel runs with."""
        cal = dict(getattr(model, "thresholds", None) or {})
        method = self.method or cal.get("method") or default_method(model)
        if method not in METHODS:
            raise ScoringConfigError(f"the model's calibration names an unknown scoring method {method!r}")
        if method == "gaussian" and not is_gaussian(model):
            raise ScoringConfigError("method 'gaussian' needs a model trained with the Gaussian head")
        threshold = self.threshold
        if threshold is None:
            same = cal.get("method", method) == method
            threshold = float(cal["threshold"]) if same and "threshold" in cal else DEFAULT_THRESHOLD
        lower = self.lower_threshold if self.lower_threshold is not None else 0.5 * threshold
        if lower > threshold:
            raise ScoringConfigError(f"lower_threshold ({lower}) must not exceed threshold ({threshold})")
        prior_ok = cal.get("method") == method and "error_mean" in cal and "error_var" in cal
        return ResolvedScoring(self, method, float(threshold), float(lower),
                               float(cal["error_mean"]) if prior_ok else 0.0,
                               float(cal["error_var"]) if prior_ok else 0.0,
                               float(self.prior_events) if prior_ok else 0.0)


@dataclass(frozen=True)
class ResolvedScoring:
    """A :class:`ScoringConfig` with the model's defaults filled in."""

    config: ScoringConfig
    method: str
    threshold: float
    lower_threshold: float
    prior_mean: float
    prior_var: float
    prior_n: float

    def kernel_params(self, has_offsets: bool) -> tuple[np.ndarray, np.ndarray]:
        """The float and int parameter vectors of :func:`streamrnn.kernels.detect.detect_batch`."""
        c = self.config
        fp = np.zeros(K.N_FPARAMS)
        fp[K.F_THRESHOLD] = self.threshold
        fp[K.F_LOWER] = self.lower_threshold
        fp[K.F_ALPHA] = c.error_alpha
        fp[K.F_SHORT_ALPHA] = c.short_alpha
        fp[K.F_MAX_GAP] = c.max_gap_ms or 0
        fp[K.F_DRIFT] = c.drift_factor
        fp[K.F_PRIOR_MEAN] = self.prior_mean
        fp[K.F_PRIOR_VAR] = self.prior_var
        fp[K.F_PRIOR_N] = self.prior_n
        fp[K.F_DYN_Z_LO], fp[K.F_DYN_Z_HI], fp[K.F_DYN_Z_STEP] = c.dynamic_z
        fp[K.F_EPS] = 1e-12
        fp[K.F_RANGE_ALPHA] = c.range_alpha
        fp[K.F_BIAS_ALPHA] = c.bias_alpha
        fp[K.F_ENERGY_ALPHA] = c.energy_alpha
        ip = np.zeros(K.N_IPARAMS, np.int64)
        ip[K.I_METHOD] = METHODS[self.method]
        ip[K.I_WARMUP] = c.warmup
        ip[K.I_CLOSE_AFTER] = c.close_after
        ip[K.I_LEARN] = int(c.learn_during_alert)
        ip[K.I_GAP_DECAY] = int(c.gap_policy == "decay")
        ip[K.I_ACCEPT_LATE] = int(c.out_of_order == "accept")
        ip[K.I_APPLY_SAME_TS] = int(c.same_timestamp == "apply")
        ip[K.I_HAS_OFFSETS] = int(has_offsets)
        ip[K.I_DYNAMIC] = int(c.dynamic)
        ip[K.I_DYN_REFRESH] = c.dynamic_refresh
        ip[K.I_RELEARN] = c.relearn_after
        ip[K.I_RANGE_WARMUP] = c.range_warmup
        ip[K.I_REPEATS] = int(c.stuck_values)
        ip[K.I_FIT_EVENTS] = c.fit_scaler_events
        return fp, ip


def is_gaussian(model) -> bool:
    """True for a model trained with the Gaussian head (means then log-variances)."""
    return getattr(model, "head", "linear") == "gaussian"


def default_method(model) -> str:
    if is_gaussian(model):
        return "gaussian"
    return "mahalanobis" if model.n_features > 1 else "normalised"


def tail_probability(score):
    """Inverse of the score scale: the tail probability a score stands for (10 ** (-10 s))."""
    return 10.0 ** (-10.0 * np.asarray(score, np.float64))


#: Threshold estimators for :func:`calibrate`.
CALIBRATIONS = ("pot", "quantile")
#: Peaks over threshold: the initial threshold is this quantile of the calibration scores.
POT_LEVEL = 0.98
#: Fewest excesses over the initial threshold for a tail fit (fewer: the empirical quantile).
POT_MIN_EXCESSES = 50


def _gpd_fit(excess: np.ndarray, n_censored: int = 0, cap: float = np.inf) -> tuple[float, float]:
    """Maximum-likelihood generalised Pareto fit (shape xi, scale sigma) of positive excesses.

    ``n_censored`` further excesses are only known to be at least ``cap`` (scores saturate at
    1, so an excess of ``1 - u`` may stand for anything larger); they enter through the
    survival function. The shape is kept in [-0.5, 1] (below -0.5 the MLE is irregular).
    """
    from scipy.optimize import minimize

    excess = np.asarray(excess, np.float64)
    mean = float(excess.mean()) if excess.size else float(cap)
    var = float(excess.var()) if excess.size > 1 else mean * mean

    def nll(params):
        xi, log_sigma = params
        sigma = np.exp(log_sigma)
        z = excess / sigma
        if abs(xi) < 1e-7:
            ll = -excess.size * log_sigma - z.sum()
            ll += n_censored * (-cap / sigma) if n_censored else 0.0
        else:
            t = 1.0 + xi * z
            if np.any(t <= 0):
                return np.inf
            ll = -excess.size * log_sigma - (1.0 + 1.0 / xi) * np.log(t).sum()
            if n_censored:
                tc = 1.0 + xi * cap / sigma
                if tc <= 0:
                    return np.inf
                ll += n_censored * (-np.log(tc) / xi)
        return -ll

    # Method-of-moments start, moved into the admissible region.
    xi0 = float(np.clip(0.5 * (1.0 - mean * mean / var) if var > 0 else 0.0, -0.4, 0.9))
    sigma0 = max(mean * (1.0 - xi0), 1e-12)
    best = None
    for start in ((xi0, np.log(sigma0)), (0.0, np.log(max(mean, 1e-12)))):
        res = minimize(nll, np.asarray(start), method="Nelder-Mead",
                       options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 4000})
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise StreamrnnError("generalised Pareto fit failed")
    xi, log_sigma = best.x
    return float(np.clip(xi, -0.5, 1.0)), float(np.exp(log_sigma))


class ScoreTail:
    """The largest finite scores of a stream of scores, in bounded memory.

    Keeps the ``capacity`` largest of the ``n`` finite scores offered (with their arrival
    positions) and the count ``n``: what :func:`estimate_threshold` needs, since the empirical
    ``1 - rate`` quantile and the peaks-over-threshold fit only look at the top few percent.
    Memory stays at about ``2 * capacity`` scores. Ties at the cut keep some of the equal
    scores; which ones changes no quantile and no set of excesses.
    """

    def __init__(self, capacity: int = 100_000):
        if capacity < 1:
            raise StreamrnnError(f"score tail capacity must be at least 1, not {capacity}")
        self.capacity = int(capacity)
        self.n = 0  # finite scores offered
        self._scores: list[np.ndarray] = []
        self._order: list[np.ndarray] = []
        self._held = 0

    def add(self, scores: np.ndarray) -> None:
        s = np.asarray(scores, np.float64)
        s = s[np.isfinite(s)]
        self._scores.append(s)
        self._order.append(self.n + np.arange(s.size, dtype=np.int64))
        self.n += int(s.size)
        self._held += int(s.size)
        if self._held > 2 * self.capacity:
            self._prune()

    def _prune(self) -> None:
        if not self._scores:
            self._scores, self._order = [np.empty(0)], [np.empty(0, np.int64)]
        s, o = np.concatenate(self._scores), np.concatenate(self._order)
        if s.size > self.capacity:
            # Fixed capacity: a score outside the top of a prefix is outside the top of the whole.
            top = np.argpartition(s, s.size - self.capacity)[s.size - self.capacity:]
            s, o = s[top], o[top]
        self._scores, self._order, self._held = [s], [o], int(s.size)

    def scores(self) -> np.ndarray:
        """The kept scores (the largest ``min(n, capacity)``) in the order they were offered."""
        self._prune()
        s, o = self._scores[0], self._order[0]
        return s[np.argsort(o, kind="stable")]


def _lerp(a: float, b: float, t: float) -> float:
    """NumPy's linear interpolation (np.quantile's ``linear`` method), bit for bit."""
    d = b - a
    return float(a + d * t) if t < 0.5 else float(b - d * (1.0 - t))


def _tail_quantile(top: np.ndarray, n: int, p: float, method: str) -> float | None:
    """``np.quantile`` of all ``n`` scores at ``p`` (``linear`` or ``higher``) from ``top``, the
    largest of them in ascending order; None when the quantile needs a score not in ``top``."""
    first = n - top.size  # rank of top[0] among all n scores
    vi = (n - 1) * np.float64(p)
    if method == "higher":
        i = int(np.ceil(vi))
        return float(top[i - first]) if i >= first else None
    if vi >= n - 1:
        return float(top[-1])
    j = int(np.floor(vi))
    if j < first:
        return None
    return _lerp(top[j - first], top[j + 1 - first], float(vi - j))


def estimate_threshold(scores: np.ndarray, target_false_alert_rate: float, calibration: str = "pot",
                       *, level: float = POT_LEVEL, min_excesses: int = POT_MIN_EXCESSES,
                       saturation: float = 1.0, n_scores: int | None = None) -> dict:
    """The score exceeded by a ``target_false_alert_rate`` fraction of events like ``scores``.

    ``scores`` are all the scores, or, with ``n_scores``, only the largest finite ones of
    ``n_scores`` in the order they came (as :class:`ScoreTail` keeps them): the result is the
    same as from all of them as long as they reach down to the ``level`` quantile; if they do
    not, the initial threshold u is the lowest of them and ``pot_level`` says which quantile
    that is.

    ``calibration="quantile"``: the empirical ``1 - rate`` quantile (``method="higher"``). With
    N scores and N * rate of order 1 that is one of the few highest scores, and it swings widely
    from one sample to the next.

    ``calibration="pot"`` (peaks over threshold, Siffer et al., KDD 2017 "SPOT"): the initial
    threshold u is the ``level`` quantile; the n_u excesses over it are fitted by a generalised
    Pareto distribution (maximum likelihood; scores at ``saturation`` are censored there) and
    the threshold is its quantile for the target rate: ``u + sigma / xi * ((rate * N / n_u) **
    -xi - 1)`` (``u + sigma * log(n_u / (rate * N))`` when xi = 0). Scores are -log10(p) / 10,
    a linear map of -log p, whose tail is exponential (xi = 0) for calibrated p-values, so the
    score domain is the right one for the fit. Falls back to the empirical quantile when the
    target quantile lies below u (rate >= 1 - level) or there are fewer than ``min_excesses``
    excesses.

    Returns ``{"threshold", "calibration", ...}``: ``calibration`` names the estimator used
    ("pot" or "quantile"), ``quantile_threshold`` the empirical quantile, and for "pot" also
    ``pot_level``, ``pot_initial`` (u), ``pot_excesses`` (n_u), ``pot_shape`` (xi) and
    ``pot_scale`` (sigma); ``pot_fallback`` says why a requested "pot" was not used. The
    threshold is not clamped here (:func:`calibrate` clamps it).
    """
    if calibration not in CALIBRATIONS:
        raise StreamrnnError(f"calibration must be one of {', '.join(CALIBRATIONS)}, not {calibration!r}")
    scores = np.asarray(scores, np.float64)
    scores = scores[np.isfinite(scores)]
    n = scores.size if n_scores is None else int(n_scores)
    if scores.size == 0 or n < scores.size:
        raise StreamrnnError("no finite scores to calibrate on" if scores.size == 0 else
                             f"{scores.size} tail scores but only {n} scores in all")
    top = np.sort(scores)
    q = float(target_false_alert_rate)
    empirical = _tail_quantile(top, n, 1.0 - q, "higher")
    if empirical is None:
        raise StreamrnnError(f"the target false-alert rate {q} needs the top {q * n:.0f} of {n} scores "
                             f"but only the top {top.size} were kept; keep more (tail_capacity)")
    out = {"threshold": empirical, "calibration": "quantile", "quantile_threshold": empirical}
    if calibration == "quantile":
        return out
    u = _tail_quantile(top, n, level, "linear")
    if u is None:  # the kept tail is shorter than the level asks for: start at its lowest score
        u, level = float(top[0]), (n - top.size) / (n - 1)
    excess = scores[scores > u] - u
    n_u = int(excess.size)
    tail_fraction = n_u / n
    if q >= tail_fraction:
        out["pot_fallback"] = "target rate not in the tail above the initial threshold"
        return out
    if n_u < min_excesses:
        out["pot_fallback"] = f"{n_u} excesses over the initial threshold (fewer than {min_excesses})"
        return out
    cap = saturation - u
    censored = excess >= cap
    try:
        xi, sigma = _gpd_fit(excess[~censored], int(censored.sum()), cap)
    except StreamrnnError:
        out["pot_fallback"] = "generalised Pareto fit failed"
        return out
    ratio = q / tail_fraction
    threshold = u + (sigma * -np.log(ratio) if abs(xi) < 1e-7 else sigma / xi * (ratio ** -xi - 1.0))
    if not np.isfinite(threshold):
        out["pot_fallback"] = "generalised Pareto quantile not finite"
        return out
    out.update({"threshold": float(threshold), "calibration": "pot", "pot_level": float(level),
                "pot_initial": u, "pot_excesses": n_u, "pot_shape": xi, "pot_scale": sigma})
    return out


def calibrate(model, batches: Iterable, *, target_false_alert_rate: float = 1e-3,
              config: ScoringConfig | None = None, calibration: str = "pot",
              tail_capacity: int = 100_000) -> dict:
    """Threshold and error statistics for ``model.thresholds``.

    Runs a fresh :class:`~streamrnn.detector.Detector` (alerts off, so every event is learnt)
    over ``batches`` of ``(stream_ids, values, timestamps, counts_mask)`` in time order. The
    threshold is estimated from the scores of the events with ``counts_mask`` True that are
    past the stream's warm-up (events before that are never alerted on) by
    :func:`estimate_threshold` for ``target_false_alert_rate`` false alerts per event:
    ``calibration="pot"`` (default) fits a generalised Pareto tail over the 98 % quantile,
    ``"quantile"`` takes the empirical ``1 - target_false_alert_rate`` quantile. The threshold
    is clamped to [1e-6, :data:`MAX_CALIBRATED`]. Returns ``{"method", "threshold",
    "target_false_alert_rate", "error_mean", "error_var", "events", "calibration",
    "quantile_threshold", ...}`` (the estimator's fields, see :func:`estimate_threshold`);
    ``error_mean``/``error_var`` (the streams' median error statistics, scaled units) give a
    new stream's scorer a prior so that it scores sensibly from its first events.

    Memory stays bounded however many events calibrate: only the ``tail_capacity`` largest
    scores are kept (:class:`ScoreTail`). That gives the same threshold as all of them up to
    ``tail_capacity / (1 - POT_LEVEL)`` (5M by default) events; beyond that the tail fit
    starts at the lowest kept score (a quantile above 98 %). The empirical quantile needs
    ``target_false_alert_rate`` of the events kept: more raises an error.
    """
    from streamrnn.detector import Detector

    if not 0.0 < target_false_alert_rate < 1.0:
        raise StreamrnnError(f"target_false_alert_rate must be in (0, 1); got {target_false_alert_rate}")
    if calibration not in CALIBRATIONS:
        raise StreamrnnError(f"calibration must be one of {', '.join(CALIBRATIONS)}, not {calibration!r}")
    cfg = (config or ScoringConfig())
    cal_model = _without_calibration(model)
    det = Detector(cal_model, config=cfg.replace(threshold=1.0, lower_threshold=1.0, dynamic=False,
                                                learn_during_alert=True, prior_events=0.0))
    warmup = cfg.warmup
    tail = ScoreTail(tail_capacity)
    for stream_ids, values, timestamps, counts_mask in batches:
        out = det.process(stream_ids, values, timestamps)
        mask = np.asarray(counts_mask, bool) & np.isfinite(out.score) & (out.rank >= warmup)
        tail.add(out.score[mask])
    if tail.n == 0:
        raise StreamrnnError("calibration saw no scored events past warm-up; give it more history")
    est = estimate_threshold(tail.scores(), target_false_alert_rate, calibration, n_scores=tail.n)
    threshold = est.pop("threshold")
    mean, var = det.error_statistics()
    # Scores saturate at 1 (p <= 1e-10): keep the threshold below so saturated events alert.
    return {"method": det.method, "threshold": min(max(threshold, 1e-6), MAX_CALIBRATED),
            "target_false_alert_rate": float(target_false_alert_rate),
            "error_mean": float(np.median(mean)) if mean.size else 0.0,
            "error_var": float(np.median(var)) if var.size else 0.0,
            "events": int(tail.n), **est}


def _without_calibration(model):
    """The same model with an empty ``thresholds`` (calibration must not read its own output)."""
    import copy

    clone = copy.copy(model)
    clone.thresholds = {"method": model.thresholds["method"]} if "method" in (model.thresholds or {}) else {}
    return clone


__all__ = ["METHODS", "DEFAULT_THRESHOLD", "ScoringConfig", "ScoringConfigError", "ResolvedScoring",
           "CALIBRATIONS", "ScoreTail", "calibrate", "estimate_threshold", "default_method", "is_gaussian", "tail_probability"]
