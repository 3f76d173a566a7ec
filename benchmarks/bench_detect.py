"""Detection quality on labelled synthetic data: streamrnn beside two baselines, one run.

The data: :func:`streamrnn.synthetic.anomaly_fleet` with one anomaly type per stream (the
types taken in turn), so per-type results are exact. Each stream's first ``--history``
fraction is anomaly-free history; the rest is the test period with the labelled anomalies.

* **streamrnn**: :func:`streamrnn.train.train` on the history (its newest part calibrates
  the threshold for a target false-alert rate), then :func:`streamrnn.replay.replay` over
  history and test period (the history warms each stream's state up), scored on the test
  period.
* **rolling z-score**: |x - mean| / std over the stream's previous ``--z-window`` events.
* **River HalfSpaceTrees**: one ``MinMaxScaler | HalfSpaceTrees`` per stream on (value,
  first difference), learning online, as River's documentation sets it up.

Fair terms: every detector sees the history first; each baseline's threshold is the score
quantile giving the same per-event false-alert rate on the history as streamrnn's calibration
target; each baseline's alert episode opens above its threshold and closes after the same
number of consecutive events below it as streamrnn's hysteresis. All three are measured by
:func:`streamrnn.evaluate.evaluate` (event-wise F1: an episode overlapping a label window
detects it; NAB standard profile, no probationary period since history came first).

Targets (printed, never asserted): streamrnn best of the three on every type, overall
event-wise F1 >= 0.8.

Usage::

    python benchmarks/bench_detect.py [--per-type 30] [--length 1200] [--epochs 8] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from streamrnn.evaluate import Labels, Scores, evaluate, load_scores  # noqa: E402
from streamrnn.replay import replay  # noqa: E402
from streamrnn.synthetic import ANOMALY_TYPES, anomaly_fleet  # noqa: E402
from streamrnn.train import TrainConfig, train  # noqa: E402

TARGET_F1 = 0.8


def write_parts(fleet, tmp: Path) -> tuple[Path, Path]:
    """History (before the split) and test period as two Parquet files, plus labels."""
    ts = fleet.timestamps
    table = pa.table({"stream": pa.array(fleet.stream_ids, pa.string()), "ts": pa.array(ts),
                      "value": fleet.values[:, 0]})
    hist = ts < fleet.split_ts
    pq.write_table(table.filter(pa.array(hist)), tmp / "history.parquet")
    pq.write_table(table.filter(pa.array(~hist)), tmp / "test.parquet")
    pq.write_table(fleet.labels_table(), tmp / "labels.parquet")
    return tmp / "history.parquet", tmp / "test.parquet"


def as_grid(fleet) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(stream ids, ts (T,), values (S, T)): the fleet is time-major with every stream each step."""
    n_streams = len(dict.fromkeys(fleet.stream_ids))
    t_len = len(fleet.stream_ids) // n_streams
    ids = fleet.stream_ids[:n_streams]
    return ids, fleet.timestamps[::n_streams], fleet.values[:, 0].reshape(t_len, n_streams).T


def rolling_z(x: np.ndarray, window: int) -> np.ndarray:
    """|x_t - mean| / std over each row's previous ``window`` values (NaN until 2 are seen)."""
    s, t = x.shape
    c1 = np.concatenate([np.zeros((s, 1)), np.cumsum(x, axis=1)], axis=1)
    c2 = np.concatenate([np.zeros((s, 1)), np.cumsum(x * x, axis=1)], axis=1)
    hi = np.arange(t)
    lo = np.maximum(hi - window, 0)
    n = (hi - lo).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (c1[:, hi] - c1[:, lo]) / n
        var = (c2[:, hi] - c2[:, lo]) / n - mean ** 2
        z = np.abs(x - mean) / np.sqrt(np.maximum(var, 1e-12))
    z[:, n < 2] = np.nan
    return z


def half_space_trees(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """River's HalfSpaceTrees, one pipeline per stream, score then learn each event."""
    from river import anomaly, compose, preprocessing

    out = np.empty_like(x)
    for i in range(x.shape[0]):
        model = compose.Pipeline(preprocessing.MinMaxScaler(),
                                 anomaly.HalfSpaceTrees(n_trees=10, height=8, window_size=100, seed=seed + i))
        prev = x[i, 0]
        for t, v in enumerate(x[i]):
            ev = {"value": float(v), "diff": float(v - prev)}
            out[i, t] = model.score_one(ev)
            model.learn_one(ev)
            prev = v
    return out


def episodes_from_scores(score: np.ndarray, threshold: float, close_after: int) -> np.ndarray:
    """Alert flags per event: open above ``threshold``, close after ``close_after`` events at or below."""
    alert = np.zeros(score.shape, bool)
    for i in range(score.shape[0]):
        inside, below = False, 0
        for t, s in enumerate(score[i]):
            high = s > threshold  # NaN is never high
            if not inside and high:
                inside, below = True, 0
            elif inside:
                below = 0 if high else below + 1
                if below >= close_after:
                    inside = False
            alert[i, t] = inside
    return alert


def baseline_scores(ids, ts, score: np.ndarray, hist_steps: int, rate: float, close_after: int) -> Scores:
    """Scores of the test period, thresholded at the (1 - rate) quantile of the newest 30 %
    of the history (past the baseline's own warm-up, like streamrnn's calibration part)."""
    hist = score[:, int(0.7 * hist_steps):hist_steps]
    threshold = float(np.quantile(hist[np.isfinite(hist)], 1.0 - rate, method="higher"))
    alert = episodes_from_scores(score, threshold, close_after)[:, hist_steps:]
    test = score[:, hist_steps:]
    s = len(ids)
    return Scores(np.repeat(np.asarray(ids, object), test.shape[1]), np.tile(ts[hist_steps:], s),
                  test.ravel(), alert.ravel())


def test_part(scores: Scores, split_ts: int) -> Scores:
    keep = scores.ts >= split_ts
    return Scores(scores.stream[keep], scores.ts[keep], scores.score[keep], scores.alert[keep])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-type", type=int, default=30, help="streams per anomaly type")
    ap.add_argument("--length", type=int, default=1200, help="events per stream")
    ap.add_argument("--history", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--z-window", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.per_type, args.length, args.epochs = 4, 600, 2
    n_streams = args.per_type * len(ANOMALY_TYPES)
    fleet = anomaly_fleet(n_streams=n_streams, length=args.length, anomalies_per_stream=1,
                          history=args.history, seed=args.seed)
    labels = Labels.windows([w.stream for w in fleet.windows], [w.start_ts for w in fleet.windows],
                            [w.end_ts for w in fleet.windows], [w.type for w in fleet.windows])
    print(f"detection benchmark: {n_streams} streams x {args.length} events, one anomaly per stream, "
          f"{args.per_type} streams per type, history {args.history:.0%}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hist_path, test_path = write_parts(fleet, tmp)
        t0 = time.perf_counter()
        trained = train([hist_path], tmp / "model.safetensors", cell="gru", hidden=[args.hidden],
                        epochs=args.epochs, per_stream_scaler=True, seed=args.seed)
        model = trained.model
        print(f"trained GRU H={args.hidden} in {time.perf_counter() - t0:.1f} s "
              f"(best epoch {trained.best_epoch}, threshold {model.thresholds.get('threshold'):.3f} "
              f"for {model.thresholds.get('target_false_alert_rate'):g} false alerts per event, "
              f"estimator {model.thresholds.get('calibration', 'quantile')}; empirical quantile "
              f"{model.thresholds.get('quantile_threshold', float('nan')):.3f})")
        t0 = time.perf_counter()
        rep = replay([hist_path, test_path], model, tmp / "scores.parquet", progress=False)
        print(f"replayed {rep.n_events:,} events in {time.perf_counter() - t0:.1f} s")
        results["streamrnn"] = evaluate(test_part(load_scores(tmp / "scores.parquet"), fleet.split_ts),
                                        labels, probation_fraction=0.0)
    from streamrnn.scoring import ScoringConfig

    close_after = ScoringConfig().close_after
    rate = float((model.thresholds or {}).get("target_false_alert_rate",
                                              TrainConfig.target_false_alert_rate))
    ids, ts, x = as_grid(fleet)
    hist_steps = int(np.searchsorted(ts, fleet.split_ts))
    t0 = time.perf_counter()
    results["rolling z-score"] = evaluate(
        baseline_scores(ids, ts, rolling_z(x, args.z_window), hist_steps, rate, close_after),
        labels, probation_fraction=0.0)
    t_z = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["River HalfSpaceTrees"] = evaluate(
        baseline_scores(ids, ts, half_space_trees(x, args.seed), hist_steps, rate, close_after),
        labels, probation_fraction=0.0)
    print(f"baselines: rolling z-score {t_z:.1f} s, HalfSpaceTrees {time.perf_counter() - t0:.1f} s")
    report(results)
    return 0


def report(results: dict) -> None:
    names = list(results)
    head = f"{'type':18s}" + "".join(f"{n[:20]:>22s}" for n in names)
    print("\nevent-wise F1 (precision/recall)                      NAB standard")
    print(head + "   |" + "".join(f"{n[:14]:>16s}" for n in names))

    def cell(m) -> str:
        f = m["f1"]
        return f"{f:6.3f} ({m['precision']:.2f}/{m['recall']:.2f})" if f == f else "n/a"

    wins = []
    for t in ANOMALY_TYPES:
        ms = [results[n].per_type.get(t) for n in names]
        if any(m is None for m in ms):
            continue
        f1 = [m["f1"] for m in ms]
        wins.append(f1[0] >= max(f1[1:]))
        print(f"{t:18s}" + "".join(f"{cell(m):>22s}" for m in ms) + "   |"
              + "".join(f"{m['nab_standard']:16.1f}" for m in ms))
    overall = [results[n].event for n in names]
    print(f"{'overall':18s}" + "".join(f"{cell(m):>22s}" for m in overall) + "   |"
          + "".join(f"{results[n].nab['standard']:16.1f}" for n in names))
    print(f"{'AUC-PR (point)':18s}" + "".join(f"{results[n].auc_pr:22.3f}" for n in names))
    print(f"\ntarget: {names[0]} best event-wise F1 on every type: {'PASS' if all(wins) else 'FAIL'} "
          f"({sum(wins)}/{len(wins)})")
    f1 = overall[0]["f1"]
    print(f"target: overall event-wise F1 >= {TARGET_F1}: {'PASS' if f1 >= TARGET_F1 else 'FAIL'} ({f1:.3f})")


if __name__ == "__main__":
    raise SystemExit(main())
