"""Detector: a micro-batch of events in, scored events and alert records out.

One engine for every driver: replay, the Kafka daemon and the tests all call
:meth:`Detector.process`. One Numba pass per batch (:mod:`streamrnn.kernels.detect`)
scores each event against its stream's stored one-step-ahead prediction, decides, and
steps the network; every per-stream quantity (network state, scaler, error statistics,
hysteresis) lives in a :class:`~streamrnn.state.StreamTable` column, so snapshots carry it
and results do not depend on how events are batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
import pyarrow as pa

from streamrnn.alerts import Alert, ModelRef, alert_id
from streamrnn.errors import StreamrnnError
from streamrnn.kernels import detect as K
from streamrnn.model import Model
from streamrnn.scoring import ScoringConfig
from streamrnn.state import Column, StreamTable

#: Keys of :attr:`Detector.counters`:
#:
#: - ``events``: events passed to :meth:`Detector.process`;
#: - ``scored``: events that got a score (applied and with a prediction);
#: - ``missing``: events with a NaN/inf/missing value (not applied; the state is untouched);
#: - ``late_dropped``: events older than their stream's last applied event (policy "drop");
#: - ``same_ts_dropped``: events at their stream's last applied timestamp (``same_timestamp``
#:   "drop"): the first value of an instant stands;
#: - ``replay_skipped``: events whose offset the stream had already applied;
#: - ``gap_resets``: events after a gap longer than ``max_gap_ms`` (state reset or decayed);
#: - ``cold_starts``: first events of new streams (no prediction yet, not scored);
#: - ``scale_drift``: times a stream's inputs moved outside the training range (RMS over
#:   ``drift_factor`` scaler units); see :meth:`Detector.drifted_streams`;
#: - ``alerts_opened`` / ``alerts_closed``: alert episodes opened and closed;
#: - ``scaler_fitting``: events a stream spent fitting its own scaler (not scored).
COUNTERS = ("events", "scored", "missing", "late_dropped", "replay_skipped", "gap_resets",
            "cold_starts", "scale_drift", "alerts_opened", "alerts_closed", "scaler_fitting",
            "same_ts_dropped")
_COUNTER_INDEX = {name: i for i, name in enumerate(COUNTERS[1:])}
_TS_NONE = np.iinfo(np.int64).min
#: Alerts name at most this many contributing features.
TOP_FEATURES = 3
#: The StreamTable columns detect_batch takes, in its argument order.
_KERNEL_COLUMNS = ("state", "pred", "x_mean", "x_scale", "last_ts", "last_offset", "err_mean", "err_var",
                   "err_short", "err_vm", "err_cov", "n_scored", "warm", "in_alert", "below", "alert_len",
                   "open_ts", "drift_m", "drifted", "dyn_buf", "dyn_eps", "x_lo", "x_hi", "err_bias",
                   "err_energy", "x_last", "rep")


@dataclass
class ScoredBatch:
    """Scores for a micro-batch, one row per input event, in input order."""

    stream_ids: list[str] | np.ndarray | pa.Array
    timestamps: np.ndarray  # (E,) int64 epoch ms
    values: np.ndarray  # (E, D) raw units as given (a time-delta model's dt: derived, NaN if not applied)
    prediction: np.ndarray  # (E, D) the prediction stored for this event, raw units (NaN: none)
    error: np.ndarray  # (E,) error in scaled units (RMS; Gaussian NLL for "gaussian"); NaN: not scored
    score: np.ndarray  # (E,) in [0, 1], comparable across streams; NaN: not scored
    alert: np.ndarray  # (E,) bool: the stream is inside an open alert episode at this event
    feature_names: list[str] = field(default_factory=list)
    applied: np.ndarray | None = None  # (E,) bool: the event reached the stream's state
    alerts: list[Alert] = field(default_factory=list)  # open/close records, in event order
    rank: np.ndarray | None = None  # (E,) scored events of the stream since its (re)start before this one; -1: not scored
    evicted: list[str] = field(default_factory=list)  # streams this batch evicted from the table (max_streams)

    def __len__(self) -> int:
        return int(self.score.shape[0])

    def to_arrow(self) -> pa.Table:
        """One row per event: stream, ts, the features, pred_<feature>, error, score, alert."""
        ids = self.stream_ids
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        cols = {"stream": ids.cast(pa.string()) if isinstance(ids, pa.Array) else pa.array(ids, pa.string()),
                "ts": pa.array(self.timestamps, pa.timestamp("ms", tz="UTC"))}
        for j, name in enumerate(self.feature_names):
            cols[name] = pa.array(self.values[:, j])
        for j, name in enumerate(self.feature_names):
            cols[f"pred_{name}"] = pa.array(self.prediction[:, j])
        cols["error"] = pa.array(self.error)
        cols["score"] = pa.array(self.score)
        cols["alert"] = pa.array(self.alert)
        return pa.table(cols)


#: Per-stream columns added after the first release, and the value the streams of an older
#: snapshot get: a snapshot without them is upgraded on restore instead of refused. The
#: value range of a restored stream was never learnt, so it is set to cover everything
#: (the range term stays off for that stream, as it was when the snapshot was written);
#: its bias and energy averages start at their expected values under normal behaviour, and
#: its rate of repeated values is learnt afresh.
ADDED_COLUMNS = {"x_lo": -np.inf, "x_hi": np.inf, "err_bias": 0.0, "err_energy": 1.0, "x_last": np.nan,
                 "rep": 0.0, "x_fit": np.nan}


#: The feature ``streamrnn train --time-delta`` adds (seconds since the stream's previous event).
TIME_DELTA_FEATURE = "dt"


def time_delta_column(model) -> int | None:
    """The index of the feature the Detector derives from the timestamps, or None.

    A model trained with ``--time-delta`` records ``hyper_parameters.time_delta`` and has
    :data:`TIME_DELTA_FEATURE` as its last feature (the trainer appends it). A model that
    records the option without that last feature is refused: its inputs cannot be built.
    A feature merely named "dt" in a model without the option is an ordinary input.
    """
    training = getattr(model, "training", None)
    hyper = training.get("hyper_parameters") if isinstance(training, dict) else None
    if not (isinstance(hyper, dict) and hyper.get("time_delta")):
        return None
    names = list(model.feature_names)
    if not names or names[-1] != TIME_DELTA_FEATURE:
        raise StreamrnnError(f"the model was trained with --time-delta but its last feature is "
                             f"{names[-1] if names else None!r}, not {TIME_DELTA_FEATURE!r}; "
                             f"its feature names were changed after training")
    return len(names) - 1


def input_features(model) -> list[str]:
    """The features a caller supplies: the model's, without the one the Detector derives."""
    names = list(model.feature_names)
    return names if time_delta_column(model) is None else names[:-1]


def describe_inputs(model) -> dict:
    """What a caller of replay, the daemon or :meth:`Detector.process` supplies for ``model``,
    and what the Detector derives (``streamrnn inspect`` prints it)."""
    out: dict = {"input_features": input_features(model)}
    if time_delta_column(model) is not None:
        out["derived_features"] = {TIME_DELTA_FEATURE: (
            "seconds since the stream's previous event (--time-delta): derived from the timestamps by "
            "replay, the daemon and Detector.process, not supplied (a given one is replaced)")}
    return out


def _training_gap_default(model, config: ScoringConfig) -> ScoringConfig:
    """A time-delta model scores with its training ``max_gap_ms`` unless one is set: its dt
    is 0 after the gaps the trainer split at, and it never saw a larger dt."""
    if config.max_gap_ms is not None or time_delta_column(model) is None:
        return config
    gap = model.training["hyper_parameters"].get("max_gap_ms")
    return config.replace(max_gap_ms=int(gap)) if gap else config


def _kernel_array(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` as the one array type detect_batch is compiled for: C-contiguous, writable, dtype.
    A read-only input (Arrow's zero-copy views, memmaps) would compile a second
    specialisation of the detect kernels (a minute or more, cold); it is copied instead."""
    a = np.ascontiguousarray(a, dtype)
    return a if a.flags.writeable else a.copy()


class Detector:
    """Score events from many interleaved streams against one-step-ahead predictions.

    Parameters
    ----------
    model : Model
        Optional attributes used when present: ``head == "gaussian"`` (outputs are means
        then log-variances), ``stream_scaler`` with ``scaler_for(ids) -> (mean, scale)``
        (per-stream scalers, copied into the stream's columns when it is first seen),
        ``thresholds`` (calibration, see :func:`streamrnn.scoring.calibrate`).
    config : ScoringConfig, optional
        Scoring and decision settings; ``**config_overrides`` change single fields
        (``Detector(model, threshold=0.5, warmup=10)``).
    max_streams, idle_timeout_ms : int, optional
        Bounds of the stream table (LRU eviction; :meth:`evict_idle`).
    table : StreamTable, optional
        Existing state (from :meth:`restore`).

    Examples
    --------
    >>> import numpy as np
    >>> det = Detector(Model.random("gru", n_features=1, hidden=[8]))
    >>> out = det.process(["a", "b", "a"], np.array([[1.0], [2.0], [1.5]]), np.array([0, 0, 1000]))
    >>> bool(np.isnan(out.prediction[0, 0])), bool(np.isfinite(out.prediction[2, 0]))
    (True, True)
    """

    def __init__(self, model: Model, *, config: ScoringConfig | None = None,
                 max_streams: int | None = None, idle_timeout_ms: int | None = None,
                 table: StreamTable | None = None, **config_overrides) -> None:
        if config is not None and not isinstance(config, ScoringConfig):
            raise StreamrnnError(f"config must be a ScoringConfig, got {type(config).__name__}")
        config = config or ScoringConfig()
        if config_overrides:
            config = config.replace(**config_overrides)
        else:
            config.validate()
        self._dt_col = time_delta_column(model)
        config = _training_gap_default(model, config)
        self.model = model
        self.config = config
        self.resolved = config.resolve(model)
        self.table = table if table is not None else StreamTable(
            self.columns_for(model, config), max_streams=max_streams, idle_timeout_ms=idle_timeout_ms)
        self._check_table(self.table)
        self._scratch = np.zeros(0, np.int32)
        self._counters = np.zeros(K.N_COUNTERS, np.int64)
        self._events = 0
        self._model_ref = ModelRef(str(model.name), str(model.version))
        self._stream_scaler = getattr(model, "stream_scaler", None) is not None
        self._params_cache: dict = {}
        # Streams fit their own scalers only under a per-stream-scaled model (the table then
        # has the x_fit column); otherwise the kernel gets an empty stand-in it never reads.
        self._fits = "x_fit" in self.table.columns
        self._no_fit = np.empty((0, 1 + 2 * model.n_features))
        self._kargs: tuple | None = None

    @property
    def method(self) -> str:
        return self.resolved.method

    @property
    def threshold(self) -> float:
        return self.resolved.threshold

    @property
    def lower_threshold(self) -> float:
        return self.resolved.lower_threshold

    @property
    def counters(self) -> dict[str, int]:
        """Event counts since this detector was created; keys in :data:`COUNTERS`."""
        return {"events": self._events, **dict(zip(COUNTERS[1:], (int(c) for c in self._counters)))}

    def count(self, name: str) -> int:
        """``counters[name]`` without building the dict (the daemon reads one per call)."""
        if name == "events":
            return self._events
        try:
            return int(self._counters[_COUNTER_INDEX[name]])
        except KeyError:
            raise StreamrnnError(f"no counter {name!r}; the counters are {list(COUNTERS)}") from None

    @staticmethod
    def columns_for(model: Model, config: ScoringConfig | None = None) -> dict[str, Column]:
        """The per-stream columns a detector keeps for ``model`` (and ``config``'s dynamic window)."""
        d = model.n_features
        window = config.dynamic_window if config is not None and config.dynamic else 1
        cols = {
            "state": Column((model.packed.state_width,), np.float32, 0.0),
            "pred": Column((model.n_outputs,), np.float32, np.nan),
            "x_mean": Column((d,), np.float64, np.asarray(model.scaler_mean, np.float64)),
            "x_scale": Column((d,), np.float64, np.asarray(model.scaler_scale, np.float64)),
            "last_ts": Column((), np.int64, _TS_NONE),
            "err_mean": Column((), np.float64, 0.0),
            "err_var": Column((), np.float64, 0.0),
            "err_short": Column((), np.float64, 0.0),
            "err_vm": Column((d,), np.float64, 0.0),
            "err_cov": Column((d, d), np.float64, 0.0),
            "n_scored": Column((), np.int64, 0),
            "warm": Column((), np.int64, 0),
            "in_alert": Column((), np.int8, 0),
            "below": Column((), np.int32, 0),
            "alert_len": Column((), np.int32, 0),
            "open_ts": Column((), np.int64, _TS_NONE),
            "drift_m": Column((d,), np.float64, 0.0),
            "drifted": Column((), np.int8, 0),
            "dyn_buf": Column((window,), np.float32, 0.0),
            "dyn_eps": Column((), np.float64, np.inf),
            "x_lo": Column((d,), np.float64, np.inf),
            "x_hi": Column((d,), np.float64, -np.inf),
            "err_bias": Column((d,), np.float64, 0.0),
            "err_energy": Column((), np.float64, 0.0),
            "x_last": Column((d,), np.float64, np.nan),
            "rep": Column((3,), np.float64, 0.0),
        }
        if getattr(model, "stream_scaler", None) is not None:
            # A stream fitting its own scaler (a per-stream-scaled model that has none for it):
            # events so far, then the running means and sums of squared deviations per
            # feature; NaN when it is not fitting one. Other models never fit one.
            cols["x_fit"] = Column((1 + 2 * d,), np.float64, np.nan)
        return cols

    def _check_table(self, table: StreamTable) -> None:
        want = self.columns_for(self.model, self.config)
        have = table.columns
        for name, spec in want.items():
            got = have.get(name)
            if got is None and name in ADDED_COLUMNS:
                table.add_column(name, spec, existing=ADDED_COLUMNS[name])
                continue
            if got is None or got.shape != spec.shape or got.dtype != spec.dtype:
                raise StreamrnnError(
                    f"the stream table's column {name!r} ({got!r}) does not match this model and "
                    f"scoring config ({spec!r}); was the snapshot written for another model or "
                    f"dynamic_window?")

    # ---------------------------------------------------------------- processing
    def process(self, stream_ids, values, timestamps, offsets=None) -> ScoredBatch:
        """Score then apply a micro-batch.

        ``stream_ids`` (E,) str (list, NumPy or Arrow), ``values`` (E, D) or (E,) when
        D == 1 in raw units (NaN = missing), ``timestamps`` (E,) epoch milliseconds,
        ``offsets`` (E,) int64 input offsets, optional: an event whose offset is not above
        its stream's last applied offset is skipped (it was applied before a restart).
        Each stream's events are applied in the order given; streams may interleave. An event
        at its stream's last applied timestamp is not applied (``same_ts_dropped``; the
        config's ``same_timestamp = "apply"`` steps on it): training and replay make one
        event of a (stream, ts), and live the first value stands.

        A model trained with ``--time-delta`` (:func:`time_delta_column`) takes the other
        features, (E, D-1) (:func:`input_features`), and the Detector derives its last feature
        "dt" per event as training's ``data._with_dt`` does: seconds since the stream's previous
        applied event (the int64 ms difference / 1000.0 in float64, then the model's scaler).
        dt is 0 at a stream's first event, after a gap longer than ``max_gap_ms`` (under either
        gap policy: training starts every segment it splits at dt 0) and for a late event the
        config accepts. Such a model's ``max_gap_ms`` defaults to its training one; a different
        one moves where dt restarts at 0 (larger: the network sees dt values training never
        had). An (E, D) array is accepted too, and its dt column is replaced by the derived
        value. The result's ``values`` carry the derived dt (NaN for events not applied).
        """
        x, ts, off = self._validate(stream_ids, values, timestamps, offsets)
        n, d = x.shape
        assigned = self.table.assign(stream_ids, ts)
        slots = assigned.slots
        if self._stream_scaler and assigned.new.any():
            self._copy_stream_scalers(stream_ids, slots, assigned.new)
        t = self.table
        cap = t.column("state").shape[0]
        if self._scratch.shape[0] < cap:
            self._scratch = np.zeros(cap, np.int32)
        pred = np.empty((n, d), np.float32)
        error, score = np.empty(n), np.empty(n)
        rank = np.empty(n, np.int64)
        alert, applied = np.empty(n, np.bool_), np.empty(n, np.bool_)
        code = np.empty(n, np.int8)
        open_ts = np.empty(n, np.int64)
        contrib = np.empty((n, d), np.float32)
        fp, ip = self._kernel_params(off.shape[0] > 0)
        cols = t.column_arrays(_KERNEL_COLUMNS)
        fit = t.column("x_fit") if self._fits else self._no_fit
        K.detect_batch(slots, x, ts, off, fp, ip, numba.get_num_threads(), self._scratch, *cols, fit,
                       pred, error, score, rank, alert, applied, code, open_ts, contrib,
                       self._counters, *self._kernel_args())
        self._events += n
        alerts = self._alert_records(stream_ids, ts, x, pred, score, code, open_ts, contrib)
        return ScoredBatch(stream_ids, ts, x, pred, error, score, alert, list(self.model.feature_names),
                           applied, alerts, rank, assigned.evicted)

    # Per-batch constants, cached: the daemon calls process() per partition and poll with a
    # few dozen events, where building them again was a fifth of the call.
    def _kernel_params(self, has_offsets: bool) -> tuple[np.ndarray, np.ndarray]:
        cached = self._params_cache.get(has_offsets)
        if cached is None or cached[0] is not self.resolved:
            fp, ip = self.resolved.kernel_params(has_offsets)
            if not self._fits:
                ip[K.I_FIT_EVENTS] = 0
            ip[K.I_DERIVE_DT] = self._dt_col is not None
            cached = self._params_cache[has_offsets] = (self.resolved, (fp, ip))
        return cached[1]

    def _kernel_args(self) -> tuple:
        if self._kargs is None or self._kargs[0] is not self.model:
            self._kargs = (self.model, self.model.packed.kernel_args())
        return self._kargs[1]

    def _copy_stream_scalers(self, stream_ids, slots, new) -> None:
        idx = np.flatnonzero(new)
        ids = _ids_at(stream_ids, idx)
        mean, scale = self.model.scaler_for(ids)
        mean = np.asarray(mean, np.float64).reshape(len(idx), -1)
        scale = np.asarray(scale, np.float64).reshape(len(idx), -1)
        if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise StreamrnnError("the model's per-stream scaler gave a non-finite mean or a non-positive scale")
        self.table.column("x_mean")[slots[idx]] = mean
        self.table.column("x_scale")[slots[idx]] = scale
        knows = getattr(self.model, "knows_stream", None)
        if self.config.fit_scaler_events > 0 and knows is not None:
            # The global scaler fits no stream of a per-stream-scaled model: a stream the model
            # has no scaler for learns its own from its first events (the kernel's _fit_scaler).
            unseen = slots[idx[~np.asarray(knows(ids), bool)]]
            self.table.column("x_fit")[unseen] = 0.0

    def _alert_records(self, stream_ids, ts, x, pred, score, code, open_ts, contrib) -> list[Alert]:
        """Alert objects for the few events that opened or closed an episode."""
        hits = np.flatnonzero(code)
        if hits.size == 0:
            return []
        names = list(self.model.feature_names)
        ids = _ids_at(stream_ids, hits)
        # Gather and convert per column once: per-alert NumPy calls dominated busy batches.
        if contrib.shape[1] == 1:  # one feature: it is the top one (the sort costs more than the rest)
            top = [[0]] * hits.size
        else:
            top = np.argsort(-contrib[hits], axis=1, kind="stable")[:, :TOP_FEATURES].tolist()
        values = x[hits].tolist()
        predicted = pred[hits].astype(np.float64).tolist()
        kinds = ["open" if c == K.OPENED else "close" for c in code[hits].tolist()]
        threshold = self.threshold
        return [Alert(alert_id=alert_id(sid, o), stream=sid, ts=t, kind=k, score=sc, threshold=threshold,
                      values=dict(zip(names, v)), predicted=dict(zip(names, p)),
                      top_features=[names[j] for j in tf], model=self._model_ref)
                for sid, o, t, k, sc, v, p, tf in zip(ids, open_ts[hits].tolist(), ts[hits].tolist(), kinds,
                                                      score[hits].tolist(), values, predicted, top)]

    def _validate(self, stream_ids, values, timestamps, offsets):
        x = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=np.float64)
        d = self.model.n_features
        given = d if self._dt_col is None else d - 1
        if x.ndim == 1 and given == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] not in (given, d):
            raise StreamrnnError(f"values must have shape (events, {given}); got {x.shape}{self._dt_note()}")
        if x.dtype.kind not in "biufc":  # dtype kinds, not np.issubdtype: this runs per batch
            raise StreamrnnError(f"values must be numeric, not {x.dtype}")
        x = _kernel_array(x, np.float64) if self._dt_col is None else self._with_dt_slot(x)
        ts = np.asarray(timestamps)
        if ts.shape != (x.shape[0],) or len(stream_ids) != x.shape[0]:
            raise StreamrnnError(f"stream_ids ({len(stream_ids)}), values ({x.shape[0]}) and "
                                 f"timestamps ({ts.shape[0] if ts.ndim else 0}) must have one entry per event")
        if ts.dtype.kind == "M":
            ts = ts.astype("datetime64[ms]").astype(np.int64)
        elif ts.dtype.kind not in "iu" and ts.size:
            raise StreamrnnError(f"timestamps must be integer epoch milliseconds, not {ts.dtype}")
        ts = _kernel_array(ts, np.int64)
        if offsets is None:
            off = np.empty(0, np.int64)
        else:
            off = np.asarray(offsets)
            if off.shape != (x.shape[0],) or not (off.dtype.kind in "iu" or off.size == 0):
                raise StreamrnnError(f"offsets must be one integer per event; got shape {off.shape}, dtype {off.dtype}")
            off = _kernel_array(off, np.int64)
        return x, ts, off

    def _with_dt_slot(self, x: np.ndarray) -> np.ndarray:
        """A fresh (E, D) array of the given features and a NaN dt column the kernel fills.
        A dt column the caller gave is replaced: the model learnt the trainer's dt."""
        full = np.empty((x.shape[0], self.model.n_features))
        full[:, :self._dt_col] = x[:, :self._dt_col]
        full[:, self._dt_col] = np.nan
        return full

    def _dt_note(self) -> str:
        if self._dt_col is None:
            return ""
        return (f" (the features {input_features(self.model)}; the model's {TIME_DELTA_FEATURE!r} is derived "
                f"from the timestamps, and a given {TIME_DELTA_FEATURE!r} column is accepted and replaced)")

    # ---------------------------------------------------------------- state
    def drifted_streams(self) -> list[str]:
        """Streams whose recent inputs lie outside the training range (see ``drift_factor``)."""
        ids = self.table.ids()
        if not ids:
            return []
        flags = self.table.column("drifted")[self.table.lookup(ids)]
        return [i for i, f in zip(ids, flags) if f]

    def open_alerts(self) -> dict[str, str]:
        """Streams inside an open episode -> its alert id."""
        ids = self.table.ids()
        if not ids:
            return {}
        slots = self.table.lookup(ids)
        inside = self.table.column("in_alert")[slots] != 0
        open_ts = self.table.column("open_ts")[slots]
        return {i: alert_id(i, int(o)) for i, f, o in zip(ids, inside, open_ts) if f}

    def error_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Running error mean and variance (scaled units) of the streams that have scored events."""
        ids = self.table.ids()
        if not ids:
            return np.empty(0), np.empty(0)
        slots = self.table.lookup(ids)
        slots = slots[self.table.column("n_scored")[slots] > 0]
        return self.table.column("err_mean")[slots].copy(), self.table.column("err_var")[slots].copy()

    def evict_idle(self, now_ms: int) -> list[str]:
        return self.table.evict_idle(now_ms)

    def snapshot(self) -> bytes:
        """The per-stream state (network, scaler, scorer and hysteresis) as Arrow IPC bytes."""
        return self.table.snapshot()

    @classmethod
    def restore(cls, model: Model, data: bytes, **options) -> "Detector":
        """A detector that continues exactly where the one that wrote ``data`` stopped.

        ``options`` are the constructor's (give the same scoring config as the writer).
        """
        # Limits default to the snapshot's own settings (``...``); pass a value to override.
        table = StreamTable.restore(data, max_streams=options.pop("max_streams", ...),
                                    idle_timeout_ms=options.pop("idle_timeout_ms", ...))
        return cls(model, table=table, **options)


def _ids_at(stream_ids, idx: np.ndarray) -> list[str]:
    """The ids at positions ``idx`` as Python strs, whatever container they came in."""
    if isinstance(stream_ids, (pa.Array, pa.ChunkedArray)):
        return stream_ids.take(pa.array(idx, pa.int64())).to_pylist()
    if isinstance(stream_ids, np.ndarray):
        return [str(s) for s in stream_ids[idx]]
    return [str(stream_ids[i]) for i in idx.tolist()]


__all__ = ["COUNTERS", "Detector", "ScoredBatch", "TIME_DELTA_FEATURE", "describe_inputs", "input_features",
           "time_delta_column"]
