"""Replay throughput: ``streamrnn.replay`` end to end beside the engine and the raw kernel.

One run, the same events, a GRU with H=32, D=1 over 1000 streams (time-major, as a bus
delivers them), stored as one time-ordered Parquet file. Rows printed, best of the repeats
(A/B interleaved, since the machine is shared):

* **replay -> SCORES**: ``replay(files, model, out)``: read + merge + Detector + write Parquet;
* **replay, no output**: the same without writing SCORES;
* **Detector.process (in memory)**: the engine alone on the same pre-read batches;
* **raw step kernel**: ``kernels.stream.step_events`` (network step only: no id lookup, no
  scoring) on the same events and micro-batches;
* **I/O only**: replay's reading, merging and SCORES writing without the Detector (the
  ceiling the scoring engine leaves room for).

Target: replay >= 1 000 000 events/s on the 2-core development machine (printed as
PASS/FAIL; the script reports, it never asserts).

Usage::

    python benchmarks/bench_replay.py [--streams 1000] [--events 2000] [--hidden 32]
        [--batch-rows 65536] [--repeats 3]
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

import numba  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from streamrnn.data import Schema, iter_events, open_source  # noqa: E402
from streamrnn.detector import Detector  # noqa: E402
from streamrnn.kernels.stream import step_events  # noqa: E402
from streamrnn.model import Model  # noqa: E402
from streamrnn.replay import _AtomicParquet, _prefetch, replay, scores_schema, scores_table  # noqa: E402

TARGET = 1_000_000


def write_fleet(path: Path, n_streams: int, n_events: int, seed: int = 0) -> None:
    """Sine waves with noise on their own levels, time-major, one row group per 64k rows."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_events)
    level = rng.uniform(10, 1000, n_streams)
    period = rng.uniform(40, 200, n_streams)
    x = level[:, None] * (1 + 0.2 * np.sin(2 * np.pi * t / period[:, None]))
    x += level[:, None] * 0.01 * rng.standard_normal((n_streams, n_events))
    ids = np.array([f"host-{i:05d}/cpu" for i in range(n_streams)])
    writer = None
    chunk = max(1, 65536 // n_streams)
    for a in range(0, n_events, chunk):
        b = min(a + chunk, n_events)
        table = pa.table({
            "stream": np.tile(ids, b - a),
            "ts": pa.array(np.repeat(1_767_225_600_000 + t[a:b].astype(np.int64) * 60_000, n_streams)),
            "value": x[:, a:b].T.ravel()})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def model(hidden: int) -> Model:
    m = Model.random("gru", n_features=1, hidden=[hidden], seed=0, feature_names=["value"])
    m.scaler_mean[:] = 500.0
    m.scaler_scale[:] = 300.0
    return m


def run_replay(path: Path, m: Model, out: Path | None, batch_rows: int) -> float:
    res = replay(path, m, out, batch_rows=batch_rows, progress=False)
    return res.n_events / res.seconds


def run_io(path: Path, out: Path, batch_rows: int) -> float:
    """Replay's pipeline without the Detector: read + merge + write SCORES (NaN scores)."""
    schema = scores_schema(["value"])
    t0 = time.perf_counter()
    writer = _AtomicParquet(out, schema)
    n = 0
    for b in _prefetch(iter_events(open_source(path, Schema(features=("value",))), batch_rows)):
        nan = np.full(len(b), np.nan)
        writer.write(scores_table(b, nan[:, None], nan, np.zeros(len(b), bool), schema))
        n += len(b)
    writer.commit()
    return n / (time.perf_counter() - t0)


def run_detector(batches, m: Model) -> float:
    det = Detector(m)
    t0 = time.perf_counter()
    for b in batches:
        det.process(b.stream_ids, b.values, b.ts)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def run_kernel(slot_batches, m: Model, n_streams: int) -> float:
    p = m.packed
    args = p.kernel_args()
    state = np.zeros((n_streams, p.state_width), np.float32)
    pred = np.full((n_streams, m.n_outputs), np.nan, np.float32)
    scratch = np.zeros(n_streams, np.int32)
    threads = numba.get_num_threads()
    t0 = time.perf_counter()
    n = 0
    for slots, xs in slot_batches:
        prev = np.empty((slots.shape[0], m.n_outputs), np.float32)
        step_events(slots, xs, state, pred, prev, scratch, threads, *args)
        n += slots.shape[0]
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--events", type=int, default=2000, help="events per stream")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch-rows", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    m = model(args.hidden)
    total = args.streams * args.events
    print(f"replay benchmark: GRU H={args.hidden} D=1, {args.streams} streams x {args.events} events "
          f"= {total:,} events, batches of {args.batch_rows}, {numba.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "fleet.parquet"
        write_fleet(src, args.streams, args.events)
        small = tmp / "small.parquet"
        write_fleet(small, 10, 50)
        t0 = time.perf_counter()
        replay(small, m, tmp / "warm.parquet", progress=False)  # compile (or load) the kernels
        print(f"kernels ready in {time.perf_counter() - t0:.1f} s")
        batches = list(iter_events(open_source(src, Schema(features=("value",))), args.batch_rows))
        ids = {s: i for i, s in enumerate(dict.fromkeys(batches[0].stream_ids.tolist()))}
        slot_batches = [(np.array([ids[s] for s in b.stream_ids], np.int64),
                         np.ascontiguousarray(((b.values - 500.0) / 300.0).astype(np.float32)))
                        for b in batches]
        run_kernel(slot_batches[:1], m, args.streams)  # warm
        rows = {"replay -> SCORES Parquet": [], "replay, no output": [], "Detector.process (in memory)": [],
                "raw step kernel (network only)": [], "I/O only: read + write, no scoring": []}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits all alike
            rows["replay -> SCORES Parquet"].append(run_replay(src, m, tmp / "scores.parquet", args.batch_rows))
            rows["replay, no output"].append(run_replay(src, m, None, args.batch_rows))
            rows["Detector.process (in memory)"].append(run_detector(batches, m))
            rows["raw step kernel (network only)"].append(run_kernel(slot_batches, m, args.streams))
            rows["I/O only: read + write, no scoring"].append(run_io(src, tmp / "io.parquet", args.batch_rows))
    best = {k: max(v) for k, v in rows.items()}
    kernel = best["raw step kernel (network only)"]
    print(f"{'':34s} {'events/s (best)':>16s} {'median':>12s} {'/ raw kernel':>13s}")
    for k, v in rows.items():
        print(f"{k:34s} {best[k]:16,.0f} {float(np.median(v)):12,.0f} {best[k] / kernel:13.2f}")
    verdict = "PASS" if best["replay -> SCORES Parquet"] >= TARGET else "FAIL"
    print(f"target: replay -> SCORES >= {TARGET:,} events/s: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
