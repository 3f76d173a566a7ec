"""Evaluate scored events against labels: point-wise and event-wise precision/recall/F1,
area under the precision-recall curve, detection delay, and the NAB score.

Labels come as points (``stream``, ``ts``) or as windows (``stream``, ``start``, ``end``), in
Parquet or CSV, with an optional ``type`` column (the anomaly type, for per-type results).

Definitions used here:

- **Point-wise**: every event is a sample; it is positive when labelled (a label point, or
  inside a label window) and predicted positive when its ``alert`` flag is set.
- **Event-wise**: an *event* is a label window (for point labels: a run of consecutive
  labelled events of one stream); an *alert episode* is a run of consecutive alerted events
  of one stream. A window is detected when an episode overlaps it; an episode is a true
  positive when it overlaps any window. Precision = true episodes / episodes, recall =
  detected windows / windows.
- **Detection delay**: for a detected window, time (and events) from its first event to its
  first alerted event.
- **NAB** (Lavin and Ahmad, 2015, and the NAB scorer): each stream is one NAB data file.
  Detections are the alert openings (one per episode, as the alert records are). Windows are
  the label windows; point labels get NAB's windows, centred on the label, of
  ``int(0.1 * events / labels)`` events, overlapping ones merged. The first
  ``min(floor(0.15 n), 750)`` events are probationary and not scored. The first detection in
  a window earns ``tp * sigma(pos) / sigma(-1)``, pos = -(right - i + 1) / width; a window
  without one costs ``-fn``; every other detection costs ``fp * sigma(pos)``, pos =
  (i - right of the preceding window) / (its width - 1), or ``-fp`` before any window, where
  sigma(y) = 2 / (1 + exp(5 y)) - 1 (and -1 for y >= 3). Scores are normalised as NAB does
  with the null detector (no detections) and the perfect detector (every window detected at
  its first scorable event): ``100 (S - S_null) / (S_perfect - S_null)``, summed over
  streams for the total and per stream in :attr:`Evaluation.per_stream`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamrnn.errors import StreamrnnError

#: NAB's three application profiles (config/profiles.json of the NAB repository).
NAB_PROFILES: dict[str, dict[str, float]] = {
    "standard": {"tp": 1.0, "fp": 0.11, "fn": 1.0},
    "reward_low_FP_rate": {"tp": 1.0, "fp": 0.22, "fn": 1.0},
    "reward_low_FN_rate": {"tp": 1.0, "fp": 0.11, "fn": 2.0},
}


class EvaluationError(StreamrnnError):
    """Labels or scores that cannot be evaluated (missing columns, unreadable file)."""


# ------------------------------------------------------------------------------ inputs
@dataclass
class Labels:
    """Label points (``start == end``) or windows per stream, times in epoch ms."""

    kind: str  # "points" or "windows"
    stream: np.ndarray  # (L,) object
    start: np.ndarray  # (L,) int64
    end: np.ndarray  # (L,) int64
    type: np.ndarray | None = None  # (L,) object, the anomaly type

    @classmethod
    def points(cls, stream, ts, type=None) -> "Labels":
        ts = _as_ms(pa.array(ts) if not isinstance(ts, pa.Array) else ts, "ts")
        return cls("points", np.asarray(stream, object), ts, ts.copy(),
                   None if type is None else np.asarray(type, object))

    @classmethod
    def windows(cls, stream, start, end, type=None) -> "Labels":
        start = _as_ms(pa.array(start) if not isinstance(start, pa.Array) else start, "start")
        end = _as_ms(pa.array(end) if not isinstance(end, pa.Array) else end, "end")
        if np.any(end < start):
            raise EvaluationError("a label window ends before it starts")
        return cls("windows", np.asarray(stream, object), start, end,
                   None if type is None else np.asarray(type, object))


@dataclass
class Scores:
    """The columns of a SCORES file that evaluation needs."""

    stream: np.ndarray  # (E,) object
    ts: np.ndarray  # (E,) int64 epoch ms
    score: np.ndarray  # (E,) float64, NaN where the detector had no prediction yet
    alert: np.ndarray  # (E,) bool


def _is_csv(path: Path) -> bool:
    return path.suffix.lower() in {".csv", ".tsv", ".txt"}


def _read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    from streamrnn.data import DataError, did_you_mean, read_parquet

    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"{path}: no such file{did_you_mean(path)}")
    if _is_csv(path):
        import pyarrow.csv as pacsv

        try:
            table = pacsv.read_csv(path)
            return table.select(columns) if columns else table
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            raise EvaluationError(f"{path}: cannot read ({exc})") from None
    try:
        return read_parquet(path, columns=columns)
    except DataError as exc:  # this module's callers catch EvaluationError
        raise EvaluationError(str(exc)) from None


def _as_ms(col: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    """Epoch milliseconds from an integer, timestamp or ISO-8601 string column."""
    t = col.type
    if len(col) == 0:
        return np.zeros(0, np.int64)
    try:
        if pa.types.is_timestamp(t):
            col = pc.cast(pc.cast(col, pa.timestamp("ms", tz=t.tz), safe=False), pa.int64())
        elif pa.types.is_date(t):
            col = pc.cast(pc.cast(col, pa.timestamp("ms")), pa.int64())
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            import pandas as pd

            vals = pd.to_datetime(pd.Series(col.to_pylist()), utc=True, format="ISO8601")
            if vals.isna().any():
                raise EvaluationError(f"column {name!r} has missing values")
            return ((vals - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ms")).to_numpy(np.int64)
        elif not pa.types.is_integer(t):
            raise EvaluationError(f"column {name!r} must hold epoch ms, timestamps or ISO-8601 text, not {t}")
    except EvaluationError:
        raise
    except (pa.ArrowInvalid, ValueError) as exc:
        raise EvaluationError(f"column {name!r}: {exc}") from None
    arr = col.to_numpy(zero_copy_only=False) if isinstance(col, pa.Array) else col.to_numpy()
    if arr.dtype == object or (arr.dtype.kind == "f" and np.isnan(arr).any()):
        raise EvaluationError(f"column {name!r} has missing values")
    return arr.astype(np.int64)


#: Columns that flag each row of a per-event label file (NAB's ``label``, Yahoo's ``is_anomaly``).
FLAG_COLUMNS = ("label", "is_anomaly", "anomaly")


def load_labels(path: str | Path) -> Labels:
    """Read labels from Parquet or CSV: columns ``stream`` and ``ts`` (points) or ``stream``,
    ``start`` and ``end`` (windows), optionally ``type``.

    A points file may list every event with a 0/1 (or boolean) column named ``label``,
    ``is_anomaly`` or ``anomaly``: only the rows flagged non-zero are labels.
    """
    table = _read_table(path)
    names = set(table.column_names)
    if _is_scores_table(names):
        raise EvaluationError(f"{path} is a SCORES file (replay's output, with columns score and alert), not labels: "
                              f"evaluate takes the SCORES file first and the labels (stream+ts points or "
                              f"stream+start+end windows) with --labels")
    if "stream" not in names:
        raise EvaluationError(f"{path}: labels need a 'stream' column; found {sorted(names)}")
    _check_stream_ids(table, path)
    if not {"start", "end"} <= names:
        table = _flagged_rows(table, path)
    stream = np.asarray(table.column("stream").cast(pa.string()).to_pylist(), object)
    typ = (np.asarray(table.column("type").cast(pa.string()).to_pylist(), object)
           if "type" in names else None)
    if {"start", "end"} <= names:
        labels = Labels.windows(stream, table.column("start"), table.column("end"), typ)
        _check_not_seconds(table, ("start", "end"), labels.start, path)
        return labels
    if "ts" in names:
        labels = Labels.points(stream, table.column("ts"), typ)
        _check_not_seconds(table, ("ts",), labels.start, path)
        return labels
    raise EvaluationError(f"{path}: labels need columns stream+ts (points) or stream+start+end "
                          f"(windows); found {sorted(names)}")


def _is_scores_table(names: set[str]) -> bool:
    """Columns of replay's SCORES file and neither windows nor a per-event flag: read as
    labels, every scored event would count as a label point."""
    return ({"score", "alert"} <= names and not {"start", "end"} <= names
            and not any(c in names for c in FLAG_COLUMNS))


def _check_stream_ids(table: pa.Table, path: str | Path) -> None:
    """Rows without a stream id are refused, as train and replay refuse them."""
    from streamrnn.data import blank_id_error

    err = blank_id_error(path, "stream", table.column("stream").chunks, csv=_is_csv(Path(path)))
    if err is not None:
        raise EvaluationError(str(err))


def _flagged_rows(table: pa.Table, path: str | Path) -> pa.Table:
    """The rows a per-event flag column marks as anomalous (all rows without such a column).

    Without this every listed event, normal ones included, counted as a label point."""
    flag = next((c for c in FLAG_COLUMNS if c in table.column_names), None)
    if flag is None:
        return table
    col = table.column(flag)
    if not (pa.types.is_boolean(col.type) or pa.types.is_integer(col.type)):
        raise EvaluationError(f"{path}: column {flag!r} flags anomalous rows and must be 0/1 or "
                              f"boolean, not {col.type}")
    keep = pc.fill_null(pc.cast(col, pa.bool_()), False)
    return table.filter(keep)


def _check_not_seconds(table: pa.Table, cols: tuple[str, ...], ms: np.ndarray, path) -> None:
    """Integer label times in epoch seconds would match no event: say so instead."""
    from streamrnn.data import refuse_epoch_seconds

    if any(pa.types.is_integer(table.column(c).type) for c in cols):
        refuse_epoch_seconds(ms, path, cols[0])


def load_scores(path: str | Path) -> Scores:
    """Read ``stream``, ``ts``, ``score`` and ``alert`` from a SCORES Parquet (or CSV) file."""
    table = _read_table(path)
    missing = {"stream", "ts", "score", "alert"} - set(table.column_names)
    if missing:
        raise EvaluationError(f"{path}: not a SCORES file, missing columns {sorted(missing)}")
    _check_stream_ids(table, path)
    score = table.column("score").cast(pa.float64()).to_numpy()
    alert = table.column("alert").cast(pa.bool_()).fill_null(False).to_numpy()
    return Scores(np.asarray(table.column("stream").cast(pa.string()).to_pylist(), object),
                  _as_ms(table.column("ts"), "ts"), score, alert)


# ------------------------------------------------------------------------------ building blocks
def scaled_sigmoid(position: float) -> float:
    """NAB's reward curve: 2 / (1 + exp(5 y)) - 1, and -1 from y = 3 on."""
    if position >= 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


def alert_episodes(alert: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index (inclusive) of every run of True in ``alert``."""
    a = np.concatenate([[False], np.asarray(alert, bool), [False]])
    d = np.diff(a.astype(np.int8))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1


def merge_intervals(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of inclusive index intervals, as sorted disjoint intervals."""
    if len(starts) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(starts, kind="stable")
    s, e = np.asarray(starts)[order], np.asarray(ends)[order]
    out_s, out_e = [int(s[0])], [int(e[0])]
    for a, b in zip(s[1:], e[1:]):
        if a <= out_e[-1]:
            out_e[-1] = max(out_e[-1], int(b))
        else:
            out_s.append(int(a))
            out_e.append(int(b))
    return np.array(out_s, np.int64), np.array(out_e, np.int64)


def nab_windows_from_points(n: int, anomalies: np.ndarray, window_fraction: float = 0.1
                            ) -> tuple[np.ndarray, np.ndarray]:
    """NAB's windows around labelled anomaly indices of a stream of ``n`` events: each
    ``int(window_fraction * n / len(anomalies))`` events wide, centred, clipped to the data,
    overlapping windows merged."""
    anomalies = np.asarray(anomalies, np.int64)
    if len(anomalies) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    half = int(window_fraction * n / len(anomalies)) // 2
    return merge_intervals(np.maximum(anomalies - half, 0), np.minimum(anomalies + half, n - 1))


def probationary_length(n: int, fraction: float = 0.15) -> int:
    """NAB's probationary period: the first events of a file that are not scored."""
    return int(min(math.floor(fraction * n), fraction * 5000))


@dataclass
class NabStream:
    """Raw NAB scores of one stream for one profile."""

    score: float
    null: float
    perfect: float

    @property
    def normalised(self) -> float:
        span = self.perfect - self.null
        return 100.0 * (self.score - self.null) / span if span > 0 else float("nan")


def nab_stream_score(n: int, win_start: np.ndarray, win_end: np.ndarray, detections: np.ndarray,
                     profile: dict[str, float], probation: int) -> NabStream:
    """Score detections (event indices, sorted) of one stream of ``n`` events against
    disjoint sorted windows (inclusive index ranges), by NAB's rules."""
    tp_w, fp_w, fn_w = profile["tp"], profile["fp"], profile["fn"]
    max_tp = scaled_sigmoid(-1.0)
    score = null = perfect = 0.0
    for a, b in zip(win_start, win_end):
        if b < probation:  # a window wholly inside the probationary period is not scored
            continue
        width = b - a + 1
        null -= fn_w
        first_scorable = max(a, probation)
        perfect += scaled_sigmoid(-(b - first_scorable + 1) / width) * tp_w / max_tp
        inside = detections[(detections >= first_scorable) & (detections <= b)]
        score += (scaled_sigmoid(-(b - inside[0] + 1) / width) * tp_w / max_tp if len(inside)
                  else -fn_w)
    for d in detections:
        if d < probation or _in_any(d, win_start, win_end):
            continue
        k = np.searchsorted(win_end, d, side="left") - 1  # the last window that ended before d
        if k < 0:
            pos = 3.0
        else:
            width = win_end[k] - win_start[k] + 1
            pos = (d - win_end[k]) / (width - 1) if width > 1 else 3.0
        score += scaled_sigmoid(pos) * fp_w
    return NabStream(score, null, perfect)


def _in_any(i: int, starts: np.ndarray, ends: np.ndarray) -> bool:
    k = np.searchsorted(starts, i, side="right") - 1
    return bool(k >= 0 and ends[k] >= i)


def average_precision(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision: the sum over distinct
    thresholds (highest first) of precision times the recall gained. NaN scores rank lowest."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    s = np.where(np.isnan(score), -np.inf, np.asarray(score, np.float64))
    order = np.argsort(-s, kind="stable")
    s, y = s[order], positive[order]
    # Ties share one threshold: take the counts at the last index of each distinct score.
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tp = np.cumsum(y)[last]
    predicted = last + 1
    precision = tp / predicted
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(precision * recall_gain))


# ------------------------------------------------------------------------------ results
def _prf(tp_pred: int, n_pred: int, tp_true: int, n_true: int) -> dict[str, float]:
    p = tp_pred / n_pred if n_pred else float("nan")
    r = tp_true / n_true if n_true else float("nan")
    if not n_true:
        f = float("nan")
    elif not n_pred or p + r == 0:
        f = 0.0  # nothing flagged, or nothing right: no precision to speak of, recall 0
    else:
        f = 2 * p * r / (p + r)
    return {"precision": p, "recall": r, "f1": f}


@dataclass
class Counts:
    """Event-wise tallies; add them up across streams, then read precision/recall/F1."""

    episodes: int = 0
    true_episodes: int = 0
    windows: int = 0
    detected: int = 0
    delays_ms: list[int] = field(default_factory=list)
    delays_events: list[int] = field(default_factory=list)
    nab: dict[str, list[float]] = field(default_factory=lambda: {p: [0.0, 0.0, 0.0] for p in NAB_PROFILES})

    def metrics(self) -> dict[str, float]:
        out = _prf(self.true_episodes, self.episodes, self.detected, self.windows)
        out.update(windows=self.windows, detected=self.detected, episodes=self.episodes,
                   true_episodes=self.true_episodes)
        return out

    def nab_scores(self) -> dict[str, float]:
        return {p: NabStream(*v).normalised for p, v in self.nab.items()}

    def add_nab(self, profile: str, s: NabStream) -> None:
        v = self.nab[profile]
        v[0] += s.score
        v[1] += s.null
        v[2] += s.perfect


@dataclass
class Evaluation:
    """Everything :func:`evaluate` measured. Rates are NaN when undefined (nothing to count)."""

    point: dict[str, float]
    event: dict[str, float]
    auc_pr: float
    delay: dict[str, float]
    nab: dict[str, float]  # normalised, per profile
    nab_raw: dict[str, float]
    per_type: dict[str, dict[str, float]]
    per_stream: list[dict]
    n_events: int
    n_streams: int
    unmatched_labels: int

    def to_dict(self) -> dict:
        return {"events": self.n_events, "streams": self.n_streams, "point": self.point,
                "event": self.event, "auc_pr": self.auc_pr, "delay": self.delay, "nab": self.nab,
                "nab_raw": self.nab_raw, "per_type": self.per_type,
                "unmatched_labels": self.unmatched_labels}


# ------------------------------------------------------------------------------ evaluation
def _group(stream: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream names, and for each an index range into ``order`` (events sorted by stream, ts)."""
    names, code = np.unique(np.asarray(stream, object).astype(str), return_inverse=True)
    order = np.lexsort((ts, code))
    bounds = np.searchsorted(code[order], np.arange(len(names) + 1))
    return names, order, bounds


def _stream_windows(labels: Labels, sel: np.ndarray, ts: np.ndarray, window_fraction: float):
    """This stream's label events (index ranges with types), its labelled mask, its NAB
    windows, and how many labels fell outside its data."""
    n = len(ts)
    labelled = np.zeros(n, bool)
    types = labels.type[sel] if labels.type is not None else np.full(len(sel), "", object)
    if labels.kind == "points":
        idx = np.searchsorted(ts, labels.start[sel], side="left")  # first event at or after
        ok = idx < n
        idx, types = idx[ok], types[ok]
        labelled[idx] = True
        # A run of consecutive labelled events is one incident.
        ev_s, ev_e = alert_episodes(labelled)
        ev_type = np.array([types[np.flatnonzero((idx >= a) & (idx <= b))[0]] for a, b in zip(ev_s, ev_e)],
                           object)
        nab_s, nab_e = nab_windows_from_points(n, ev_s, window_fraction)
        return ev_s, ev_e, ev_type, labelled, nab_s, nab_e, int((~ok).sum())
    a = np.searchsorted(ts, labels.start[sel], side="left")
    b = np.searchsorted(ts, labels.end[sel], side="right") - 1
    ok = a <= b
    a, b, types = a[ok], b[ok], types[ok]
    for lo, hi in zip(a, b):
        labelled[lo:hi + 1] = True
    order = np.argsort(a, kind="stable")
    nab_s, nab_e = merge_intervals(a, b)
    return a[order], b[order], types[order], labelled, nab_s, nab_e, int((~ok).sum())


def _overlaps(q_start, q_end, s_start, s_end) -> np.ndarray:
    """For each query interval, whether it overlaps any of the sorted disjoint intervals."""
    if len(s_start) == 0:
        return np.zeros(len(q_start), bool)
    k1 = np.searchsorted(s_end, q_start, side="left")
    k2 = np.searchsorted(s_start, q_end, side="right")
    return k1 < k2


def evaluate(scores: Scores, labels: Labels, *, probation_fraction: float = 0.15,
             window_fraction: float = 0.1) -> Evaluation:
    """Measure ``scores`` against ``labels``; see the module docstring for the definitions."""
    names, order, bounds = _group(scores.stream, scores.ts)
    label_streams = np.asarray(labels.stream, object).astype(str)
    known = set(names.tolist())
    unmatched = int(sum(1 for s in label_streams if s not in known))
    by_stream: dict[str, np.ndarray] = {}
    for i, s in enumerate(label_streams):
        by_stream.setdefault(s, []).append(i)
    total = Counts()
    per_type: dict[str, Counts] = {}
    point_tp = point_pred = point_true = 0
    score_sorted, positive_sorted = scores.score[order], np.zeros(len(order), bool)
    per_stream = []
    for k, name in enumerate(names):
        lo, hi = bounds[k], bounds[k + 1]
        idx = order[lo:hi]
        ts, alert = scores.ts[idx], scores.alert[idx]
        sel = np.asarray(by_stream.get(name, []), np.int64)
        ev_s, ev_e, ev_t, labelled, nab_s, nab_e, lost = _stream_windows(labels, sel, ts, window_fraction)
        unmatched += lost
        positive_sorted[lo:hi] = labelled
        point_tp += int((alert & labelled).sum())
        point_pred += int(alert.sum())
        point_true += int(labelled.sum())
        ep_s, ep_e = alert_episodes(alert)
        counts = _event_counts(ts, ep_s, ep_e, ev_s, ev_e)
        nab = {p: nab_stream_score(len(ts), nab_s, nab_e, ep_s, prof,
                                   probationary_length(len(ts), probation_fraction))
               for p, prof in NAB_PROFILES.items()}
        _accumulate(total, counts, nab)
        for t in sorted(set(ev_t.tolist())):
            mine = ev_t == t
            others_s, others_e = merge_intervals(ev_s[~mine], ev_e[~mine])
            # Episodes that only touch another type's windows are neither right nor wrong here.
            keep = ~(_overlaps(ep_s, ep_e, others_s, others_e)
                     & ~_overlaps(ep_s, ep_e, *merge_intervals(ev_s[mine], ev_e[mine])))
            _accumulate(per_type.setdefault(str(t), Counts()),
                        _event_counts(ts, ep_s[keep], ep_e[keep], ev_s[mine], ev_e[mine]), nab)
        per_stream.append({"stream": str(name), "events": len(ts), "label_events": len(ev_s),
                           "detected": counts.detected, "episodes": counts.episodes,
                           "true_episodes": counts.true_episodes,
                           **{f"nab_{p}": s.normalised for p, s in nab.items()}})
    delays = np.asarray(total.delays_ms, np.float64)
    delay = {"mean_ms": float(delays.mean()) if len(delays) else float("nan"),
             "median_ms": float(np.median(delays)) if len(delays) else float("nan"),
             "mean_events": float(np.mean(total.delays_events)) if len(delays) else float("nan")}
    point = _prf(point_tp, point_pred, point_tp, point_true)
    point.update(tp=point_tp, fp=point_pred - point_tp, fn=point_true - point_tp)
    return Evaluation(
        point=point, event=total.metrics(), auc_pr=average_precision(score_sorted, positive_sorted),
        delay=delay, nab=total.nab_scores(), nab_raw={p: v[0] for p, v in total.nab.items()},
        per_type={t: {**c.metrics(), **{f"nab_{p}": v for p, v in c.nab_scores().items()}}
                  for t, c in sorted(per_type.items()) if t},
        per_stream=per_stream, n_events=len(order), n_streams=len(names), unmatched_labels=unmatched)


def _event_counts(ts, ep_s, ep_e, ev_s, ev_e) -> Counts:
    """Event-wise tallies of one stream: episodes against label events (index ranges)."""
    c = Counts(episodes=len(ep_s), windows=len(ev_s))
    u_s, u_e = merge_intervals(ev_s, ev_e)
    c.true_episodes = int(_overlaps(ep_s, ep_e, u_s, u_e).sum())
    if len(ep_s):
        k1 = np.searchsorted(ep_e, ev_s, side="left")  # first episode still open at the window start
        k2 = np.searchsorted(ep_s, ev_e, side="right")
        for a, j, hit in zip(ev_s, k1, k1 < k2):
            if hit:
                first = max(int(ep_s[j]), int(a))
                c.detected += 1
                c.delays_ms.append(int(ts[first] - ts[a]))
                c.delays_events.append(first - int(a))
    return c


def _accumulate(into: Counts, c: Counts, nab: dict[str, NabStream]) -> None:
    into.episodes += c.episodes
    into.true_episodes += c.true_episodes
    into.windows += c.windows
    into.detected += c.detected
    into.delays_ms += c.delays_ms
    into.delays_events += c.delays_events
    for p, s in nab.items():
        into.add_nab(p, s)


def evaluate_files(scores_path: str | Path, labels_path: str | Path, **options) -> Evaluation:
    """:func:`evaluate` on a SCORES file and a labels file.

    Labels of which none falls on a scored stream and time are an error: every measure would
    be n/a or zero, and the cause is nearly always a mismatch of ids or time units.
    """
    try:
        scores = load_scores(scores_path)
    except EvaluationError:
        _refuse_swapped(scores_path, labels_path)
        raise
    labels = load_labels(labels_path)
    ev = evaluate(scores, labels, **options)
    n = len(labels.stream)
    if n and ev.unmatched_labels == n:
        raise EvaluationError(
            f"none of the {n} labels in {labels_path} falls on a scored stream and time of {scores_path} "
            f"(label streams e.g. {_examples(labels.stream)}, scored {_examples(scores.stream)}; label "
            f"times {_time_span(labels.start)}, scored {_time_span(scores.ts)}): check the ids and the times")
    return ev


def _column_names(path: Path) -> set[str]:
    """A file's column names from its schema alone (none when it cannot be read)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        schema = pacsv.open_csv(path).schema if _is_csv(path) else pq.read_schema(path)
    except (pa.ArrowException, OSError):
        return set()
    return set(schema.names)


def _refuse_swapped(scores_path: str | Path, labels_path: str | Path) -> None:
    """Raise the message for the two files given the wrong way round (when they are)."""
    if _is_scores_table(_column_names(Path(labels_path))):
        raise EvaluationError(f"the files are the wrong way round: {labels_path} is the SCORES file (replay's "
                              f"output) and {scores_path} is not: evaluate takes the SCORES file first and "
                              f"the labels with --labels") from None


def _examples(ids: np.ndarray, n: int = 2) -> str:
    seen = list(dict.fromkeys(str(s) for s in ids[:10_000]))[:n]
    return ", ".join(map(repr, seen)) or "none"


def _time_span(ms: np.ndarray) -> str:
    import datetime as dt

    if not len(ms):
        return "none"
    iso = [dt.datetime.fromtimestamp(int(v) / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M") for v in
           (ms.min(), ms.max())]
    return f"{iso[0]}..{iso[1]} UTC"


def write_json(path: str | Path, ev: Evaluation) -> Path:
    """The evaluation, per-stream rows included, as JSON at ``path`` (complete or not at all)."""
    path = Path(path)
    if path.is_dir():
        raise EvaluationError(f"--json {path} is a directory; give a file name")
    from streamrnn.data import write_whole

    text = json.dumps(ev.to_dict() | {"per_stream": ev.per_stream}, indent=2)
    try:
        write_whole(path, lambda tmp: tmp.write_text(text))
    except OSError as exc:
        raise EvaluationError(f"--json {path}: cannot write it ({exc.strerror})") from None
    return path


def format_report(ev: Evaluation) -> list[str]:
    """Human-readable lines summarising an :class:`Evaluation`."""
    def f(x):
        return "n/a" if isinstance(x, float) and math.isnan(x) else f"{x:.3f}"

    p, e = ev.point, ev.event
    lines = [
        f"events {ev.n_events:,}  streams {ev.n_streams:,}  unmatched labels {ev.unmatched_labels}",
        f"point-wise  precision {f(p['precision'])}  recall {f(p['recall'])}  F1 {f(p['f1'])}  "
        f"(tp {p['tp']}, fp {p['fp']}, fn {p['fn']})",
        f"event-wise  precision {f(e['precision'])}  recall {f(e['recall'])}  F1 {f(e['f1'])}  "
        f"({e['detected']}/{e['windows']} label events detected, "
        f"{e['true_episodes']}/{e['episodes']} alert episodes true)",
        f"AUC-PR {f(ev.auc_pr)}  detection delay mean {f(ev.delay['mean_ms'] / 1000)} s, "
        f"median {f(ev.delay['median_ms'] / 1000)} s, mean {f(ev.delay['mean_events'])} events",
        "NAB  " + "  ".join(f"{name} {f(v)}" for name, v in ev.nab.items()),
    ]
    for t, m in ev.per_type.items():
        lines.append(f"  type {t:<18} event F1 {f(m['f1'])}  precision {f(m['precision'])}  "
                     f"recall {f(m['recall'])}  NAB standard {f(m['nab_standard'])}")
    return lines
