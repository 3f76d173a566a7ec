"""Detector: a micro-batch of events in, scored events out.

One engine for every driver: replay, the Kafka daemon and the tests all call
:meth:`Detector.process`. The network predicts (kernels.stream), the scorer scores
(kernels.scoring), and the threshold decides; per-stream state lives in a StreamTable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
import pyarrow as pa

from streamrnn.errors import StreamrnnError
from streamrnn.kernels.scoring import normalised_error_scores
from streamrnn.kernels.stream import step_events
from streamrnn.model import Model
from streamrnn.state import Column, StreamTable


@dataclass
class ScoredBatch:
    """Scores for a micro-batch, one row per input event, in input order."""

    stream_ids: list[str] | np.ndarray
    timestamps: np.ndarray  # (E,) int64 epoch ms
    values: np.ndarray  # (E, D) raw units as given
    prediction: np.ndarray  # (E, D) the prediction stored for this event (NaN: none yet)
    error: np.ndarray  # (E,) RMS of the scaled prediction error
    score: np.ndarray  # (E,) error normalised by the stream's running error statistics
    alert: np.ndarray  # (E,) bool
    feature_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.score.shape[0])

    def to_arrow(self) -> pa.Table:
        """One row per event: stream, ts, the features, pred_<feature>, error, score, alert."""
        cols = {"stream": pa.array(self.stream_ids, pa.string()),
                "ts": pa.array(self.timestamps, pa.timestamp("ms", tz="UTC"))}
        for j, name in enumerate(self.feature_names):
            cols[name] = pa.array(self.values[:, j])
        for j, name in enumerate(self.feature_names):
            cols[f"pred_{name}"] = pa.array(self.prediction[:, j])
        cols["error"] = pa.array(self.error)
        cols["score"] = pa.array(self.score)
        cols["alert"] = pa.array(self.alert)
        return pa.table(cols)


class Detector:
    """Score events from many interleaved streams against one-step-ahead predictions.

    Parameters
    ----------
    model : Model
    max_streams : int, optional
        Bound on streams held; the least recently seen is evicted to admit a new one.
    idle_timeout_ms : int, optional
        Streams not seen for this long are dropped by :meth:`evict_idle`.
    threshold : float
        Score above which an event alerts (default 6 standard deviations).
    warmup : int
        No alerts during a stream's first ``warmup`` scored events.
    error_alpha : float
        Weight of the newest error in the running mean/variance (about 1/alpha events of memory).

    Examples
    --------
    >>> import numpy as np
    >>> det = Detector(Model.random("gru", n_features=1, hidden=[8]))
    >>> out = det.process(["a", "b", "a"], np.array([[1.0], [2.0], [1.5]]), np.array([0, 0, 1000]))
    >>> bool(np.isnan(out.prediction[0, 0])), bool(np.isfinite(out.prediction[2, 0]))
    (True, True)
    """

    def __init__(self, model: Model, *, max_streams: int | None = None,
                 idle_timeout_ms: int | None = None, threshold: float = 6.0, warmup: int = 10,
                 error_alpha: float = 0.01, table: StreamTable | None = None) -> None:
        if not 0 < error_alpha <= 1:
            raise StreamrnnError(f"error_alpha must be in (0, 1], got {error_alpha}")
        self.model = model
        self.threshold = float(threshold)
        self.warmup = int(warmup)
        self.error_alpha = float(error_alpha)
        self.table = table if table is not None else StreamTable(
            self.columns_for(model), max_streams=max_streams, idle_timeout_ms=idle_timeout_ms)
        self._check_table(self.table)
        self._scratch = np.zeros(0, np.int32)
        self.events_seen = 0
        self.events_missing = 0

    @staticmethod
    def columns_for(model: Model) -> dict[str, Column]:
        """The per-stream columns a detector keeps for ``model``."""
        return {
            "state": Column((model.packed.state_width,), np.float32, 0.0),
            "pred": Column((model.n_outputs,), np.float32, np.nan),
            "err_mean": Column((), np.float32, 0.0),
            "err_var": Column((), np.float32, 0.0),
            "n_scored": Column((), np.int64, 0),
        }

    def _check_table(self, table: StreamTable) -> None:
        state = table.column("state")
        if state.shape[1:] != (self.model.packed.state_width,) or table.column("pred").shape[1:] != (self.model.n_outputs,):
            raise StreamrnnError("the stream table's state does not match this model's architecture")

    # ---------------------------------------------------------------- processing
    def process(self, stream_ids, values, timestamps) -> ScoredBatch:
        """Score then step a micro-batch.

        ``stream_ids`` (E,) str, ``values`` (E, D) or (E,) when D == 1 in raw units,
        ``timestamps`` (E,) epoch milliseconds. Each stream's events are applied in the
        order given; streams may interleave freely.
        """
        x, ts = self._validate(stream_ids, values, timestamps)
        n = x.shape[0]
        pred_raw = np.full((n, self.model.n_features), np.nan, np.float32)
        error = np.full(n, np.nan)
        score = np.full(n, np.nan)
        alert = np.zeros(n, bool)
        finite = np.isfinite(x).all(axis=1)
        # A missing or non-finite value never reaches the state: the stream keeps its
        # prediction and continues from the next valid event.
        idx = np.flatnonzero(finite) if not finite.all() else None
        ids_ok = stream_ids if idx is None else [stream_ids[i] for i in idx]
        if len(ids_ok):
            xs = self.model.scale(x if idx is None else x[idx])
            slots, prev = self._step(ids_ok, xs, ts if idx is None else ts[idx])
            e_ok, s_ok, rank = self._score(slots, xs, prev)
            sel = slice(None) if idx is None else idx
            pred_raw[sel] = self.model.unscale(prev[:, : self.model.n_features])
            error[sel] = e_ok
            score[sel] = s_ok
            alert[sel] = self._decide(s_ok, rank)
        self.events_seen += n
        self.events_missing += int(n - finite.sum())
        return ScoredBatch(stream_ids, ts, x, pred_raw, error, score, alert, list(self.model.feature_names))

    def _validate(self, stream_ids, values, timestamps):
        x = np.asarray(values, dtype=np.float64) if not isinstance(values, np.ndarray) else values
        if x.ndim == 1 and self.model.n_features == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.model.n_features:
            raise StreamrnnError(f"values must have shape (events, {self.model.n_features}); got {x.shape}")
        if not np.issubdtype(x.dtype, np.number):
            raise StreamrnnError(f"values must be numeric, not {x.dtype}")
        ts = np.asarray(timestamps)
        if ts.shape != (x.shape[0],) or len(stream_ids) != x.shape[0]:
            raise StreamrnnError(f"stream_ids ({len(stream_ids)}), values ({x.shape[0]}) and "
                                 f"timestamps ({ts.shape[0] if ts.ndim else 0}) must have one entry per event")
        if not np.issubdtype(ts.dtype, np.integer):
            if np.issubdtype(ts.dtype, np.datetime64):
                ts = ts.astype("datetime64[ms]").astype(np.int64)
            else:
                raise StreamrnnError(f"timestamps must be integer epoch milliseconds, not {ts.dtype}")
        return x, ts.astype(np.int64, copy=False)

    def _step(self, stream_ids, xs, ts) -> tuple[np.ndarray, np.ndarray]:
        slots = self.table.assign(stream_ids, ts).slots
        cap = self.table.column("state").shape[0]
        if self._scratch.shape[0] < cap:
            self._scratch = np.zeros(cap, np.int32)
        prev = np.empty((xs.shape[0], self.model.n_outputs), np.float32)
        step_events(slots, np.ascontiguousarray(xs), self.table.column("state"), self.table.column("pred"),
                    prev, self._scratch, numba.get_num_threads(), *self.model.packed.kernel_args())
        return slots, prev

    def _score(self, slots, xs, prev):
        n = xs.shape[0]
        error, score, rank = np.empty(n), np.empty(n), np.empty(n, np.int64)
        t = self.table
        normalised_error_scores(slots, xs, prev, t.column("err_mean"),
                                t.column("err_var"), t.column("n_scored"), self.error_alpha, 1e-12,
                                error, score, rank)
        return error, score, rank

    def _decide(self, score: np.ndarray, rank: np.ndarray) -> np.ndarray:
        # Warm-up: a stream's error statistics mean little until it has some history.
        return (np.nan_to_num(score, nan=-np.inf) > self.threshold) & (rank >= self.warmup)

    # ---------------------------------------------------------------- state
    def evict_idle(self, now_ms: int) -> list[str]:
        return self.table.evict_idle(now_ms)

    def snapshot(self) -> bytes:
        """The per-stream state as bytes (Arrow IPC); see :meth:`restore`."""
        return self.table.snapshot()

    @classmethod
    def restore(cls, model: Model, data: bytes, **options) -> "Detector":
        """A detector that continues exactly where the one that wrote ``data`` stopped."""
        # Limits default to the snapshot's own settings (``...``); pass a value to override.
        table = StreamTable.restore(data, max_streams=options.pop("max_streams", ...),
                                    idle_timeout_ms=options.pop("idle_timeout_ms", ...))
        return cls(model, table=table, **options)
