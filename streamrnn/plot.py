"""PNG plots of a SCORES file: one figure per stream and a small-multiples overview.

A stream's figure shows each feature with its one-step-ahead prediction and a band of
three rolling standard deviations of the prediction error around it, alert episodes shaded
red, labels shaded (windows) or marked (points) in orange, and the score below.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from streamrnn.data import did_you_mean, read_parquet, write_whole  # noqa: E402
from streamrnn.errors import StreamrnnError  # noqa: E402
from streamrnn.evaluate import Labels, alert_episodes, load_labels  # noqa: E402

ALERT_COLOUR = "#d62728"
LABEL_COLOUR = "#ff7f0e"
BAND_EVENTS = 50  # rolling window of the prediction band, in events


def feature_names(columns: list[str]) -> list[str]:
    """Features of a SCORES table: the columns that have a ``pred_<feature>`` partner."""
    return [c for c in columns if f"pred_{c}" in columns and not c.startswith("pred_")]


def safe_filename(stream: str) -> str:
    """A file name for a stream id (ids often hold '/', ':' or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stream).strip("._") or "stream"


def rolling_std(x: np.ndarray, window: int) -> np.ndarray:
    """Standard deviation over the last ``window`` finite values at each point (NaN-aware)."""
    ok = np.isfinite(x)
    v = np.where(ok, x, 0.0)
    c = np.cumsum(np.r_[0, ok.astype(np.float64)])
    s1 = np.cumsum(np.r_[0.0, v])
    s2 = np.cumsum(np.r_[0.0, v * v])
    hi = np.arange(1, len(x) + 1)
    lo = np.maximum(hi - window, 0)
    n = c[hi] - c[lo]
    mean = (s1[hi] - s1[lo]) / np.maximum(n, 1)
    var = (s2[hi] - s2[lo]) / np.maximum(n, 1) - mean ** 2
    return np.where(n >= 2, np.sqrt(np.maximum(var, 0.0)), np.nan)


def _read_scores(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise StreamrnnError(f"{path}: no such file{did_you_mean(path)}")
    table = read_parquet(path)
    missing = {"stream", "ts", "score", "alert"} - set(table.column_names)
    if missing:
        raise StreamrnnError(f"{path}: not a SCORES file, missing columns {sorted(missing)}")
    return table


def _as_datetime(ts: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_timestamp(ts.type):
        return pc.cast(ts, pa.timestamp("ms")).to_numpy().astype("datetime64[ms]")
    return ts.to_numpy().astype("datetime64[ms]")


def _stream_table(table: pa.Table, stream: str) -> pa.Table:
    sub = table.filter(pc.equal(table.column("stream"), stream))
    return sub.sort_by("ts")


def _shade(ax, t: np.ndarray, starts, ends, colour: str, alpha: float, label: str | None) -> None:
    for k, (a, b) in enumerate(zip(starts, ends)):
        right = t[b + 1] if b + 1 < len(t) else t[b]
        ax.axvspan(t[a], right, color=colour, alpha=alpha, lw=0, label=label if k == 0 else None)


def _label_spans(labels: Labels | None, stream: str, t_ms: np.ndarray):
    """Index ranges of this stream's label windows, and the indices of its label points."""
    if labels is None:
        return [], [], []
    sel = np.flatnonzero(np.asarray(labels.stream, object).astype(str) == stream)
    if labels.kind == "points":
        idx = np.searchsorted(t_ms, labels.start[sel])
        return [], [], idx[idx < len(t_ms)]
    a = np.searchsorted(t_ms, labels.start[sel], side="left")
    b = np.searchsorted(t_ms, labels.end[sel], side="right") - 1
    ok = a <= b
    return a[ok], b[ok], []


def _draw_feature(ax, t, x, pred, alert, lab_s, lab_e, lab_pts, name: str, legend: bool) -> None:
    band = 3 * rolling_std(x - pred, BAND_EVENTS)
    ax.plot(t, x, lw=0.8, color="#1f77b4", label=name)
    ax.plot(t, pred, lw=0.8, color="#2ca02c", label="prediction")
    ax.fill_between(t, pred - band, pred + band, color="#2ca02c", alpha=0.15, lw=0, label="±3σ error")
    _shade(ax, t, lab_s, lab_e, LABEL_COLOUR, 0.25, "label")
    if len(lab_pts):
        ax.scatter(t[lab_pts], x[lab_pts], s=40, facecolors="none", edgecolors=LABEL_COLOUR, label="label")
    ep_s, ep_e = alert_episodes(alert)
    _shade(ax, t, ep_s, ep_e, ALERT_COLOUR, 0.2, "alert")
    if alert.any():
        ax.scatter(t[alert], x[alert], s=8, color=ALERT_COLOUR, zorder=3)
    if legend:
        ax.legend(loc="upper left", fontsize=7, ncols=3)


def plot_stream(table: pa.Table, stream: str, out: str | Path, *, labels: Labels | None = None) -> Path:
    """Write one stream's PNG from a SCORES table (all streams or just this one)."""
    sub = _stream_table(table, stream)
    if sub.num_rows == 0:
        raise StreamrnnError(f"stream {stream!r} is not in the scores")
    feats = feature_names(sub.column_names)
    t = _as_datetime(sub.column("ts"))
    t_ms = t.astype(np.int64)
    alert = sub.column("alert").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    lab_s, lab_e, lab_pts = _label_spans(labels, stream, t_ms)
    fig, axes = plt.subplots(len(feats) + 1, 1, sharex=True, figsize=(12, 2.4 * (len(feats) + 1)),
                             gridspec_kw={"height_ratios": [3] * len(feats) + [1.5]})
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, feats):
        _draw_feature(ax, t, _col(sub, name), _col(sub, f"pred_{name}"), alert, lab_s, lab_e, lab_pts,
                      name, legend=True)
    score_ax = axes[-1]
    score_ax.plot(t, _col(sub, "score"), lw=0.8, color="black")
    ep_s, ep_e = alert_episodes(alert)
    _shade(score_ax, t, ep_s, ep_e, ALERT_COLOUR, 0.2, None)
    score_ax.set_ylabel("score")
    axes[0].set_title(f"{stream}: {sub.num_rows} events, {len(ep_s)} alert episodes")
    fig.autofmt_xdate()
    fig.tight_layout()
    return _save(fig, Path(out), dpi=90)


def _save(fig, out: Path, dpi: int) -> Path:
    """Write the PNG beside ``out`` and rename it: an interrupted plot leaves the old file
    (or none), never half a PNG; the figure is closed either way."""
    try:
        write_whole(out, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    except OSError as exc:
        raise StreamrnnError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return out


def _col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).cast(pa.float64()).to_numpy()


def plot_small_multiples(table: pa.Table, streams: list[str], out: str | Path, *,
                         labels: Labels | None = None, columns: int = 4) -> Path:
    """Write a grid of small panels, one per stream (first feature, prediction, alerts, labels)."""
    if not streams:
        raise StreamrnnError("no streams to plot")
    feats = feature_names(table.column_names)
    rows = math.ceil(len(streams) / columns)
    cols = min(columns, len(streams))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.2 * rows), squeeze=False)
    for ax, stream in zip(axes.ravel(), streams):
        sub = _stream_table(table, stream)
        t = _as_datetime(sub.column("ts"))
        alert = sub.column("alert").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        lab_s, lab_e, lab_pts = _label_spans(labels, stream, t.astype(np.int64))
        _draw_feature(ax, t, _col(sub, feats[0]), _col(sub, f"pred_{feats[0]}"), alert,
                      lab_s, lab_e, lab_pts, feats[0], legend=False)
        ax.set_title(stream, fontsize=8)
        ax.tick_params(labelsize=6, labelbottom=False)
    for ax in axes.ravel()[len(streams):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, Path(out), dpi=80)


def streams_by_alerts(table: pa.Table) -> list[str]:
    """Stream ids, those with the most alerted events first (then by name)."""
    g = table.group_by("stream").aggregate([("alert", "sum")]).to_pydict()
    counts = {s: int(c or 0) for s, c in zip(g["stream"], g["alert_sum"])}
    return sorted(counts, key=lambda s: (-counts[s], s))


def _make_out_dir(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StreamrnnError(f"--out-dir {out_dir} is a file, not a directory") from None
    except OSError as exc:
        raise StreamrnnError(f"--out-dir {out_dir}: cannot create it ({exc.strerror})") from None
    return out_dir


def plot_scores(scores: str | Path, out_dir: str | Path, *, labels: str | Path | None = None,
                streams: list[str] | None = None, limit: int = 16) -> list[Path]:
    """Plot a SCORES file: a PNG per stream (the given ``streams``, or the ``limit`` streams
    with the most alerts) and ``small_multiples.png`` with all of them. Returns the paths."""
    table = _read_scores(scores)
    if not feature_names(table.column_names):
        raise StreamrnnError(f"{scores}: no feature columns with pred_<feature> partners")
    lab = load_labels(labels) if labels is not None else None
    chosen = list(streams) if streams else streams_by_alerts(table)[:limit]
    known = set(table.column("stream").unique().to_pylist())
    unknown = [s for s in chosen if s not in known]
    if unknown:
        raise StreamrnnError(f"streams not in {scores}: {', '.join(unknown[:5])}")
    out_dir = _make_out_dir(Path(out_dir))
    paths, used = [], {"small_multiples"}
    for stream in chosen:
        name = safe_filename(stream)
        while name in used:  # two ids that sanitise to the same name
            name += "_"
        used.add(name)
        paths.append(plot_stream(table, stream, out_dir / f"{name}.png", labels=lab))
    paths.append(plot_small_multiples(table, chosen, out_dir / "small_multiples.png", labels=lab))
    return paths
