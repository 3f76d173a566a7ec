"""Daemon checkpoint cost: delta checkpoints beside full snapshots, in the same run.

A partition's detector (GRU, H=32, D=1) holds N streams; between two checkpoints C of them
change (the daemon's case: 1 s at 5k events/s touches a few thousand streams). For each N,
the same table is checkpointed both ways by ``daemon.checkpoint.LocalStore`` into a temporary
directory:

* **full**: what every checkpoint did before deltas (and still does when the log would grow
  past ``delta_fraction`` of the snapshot): a copy of the table on the scoring thread, then
  the snapshot encoded and written atomically (fsync) by the writer thread;
* **delta**: the changed rows exported on the scoring thread, then appended to the log and
  fsynced.

Printed per row: the scoring-thread stall (``prepare``: every event waits behind it), the
writer-thread time (``write``), the bytes written, and full / delta as ratios. Best of
``--repeats``. The script reports; it never asserts.

Usage::

    python benchmarks/bench_checkpoint.py [--streams 100000,1000000] [--changed 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.checkpoint import LocalStore  # noqa: E402
from streamrnn.detector import Detector  # noqa: E402
from streamrnn.model import Model  # noqa: E402


def filled_detector(n: int, hidden: int) -> tuple[Detector, list[str]]:
    det = Detector(Model.random("gru", n_features=1, hidden=[hidden], seed=0))
    ids = [f"stream-{i}" for i in range(n)]
    rng = np.random.default_rng(0)
    for k in range(0, n, 100_000):
        chunk = ids[k:k + 100_000]
        det.process(chunk, rng.normal(size=len(chunk)), np.full(len(chunk), 1000, np.int64))
    return det, ids


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def one_round(store: LocalStore, det: Detector, ids: list[str], changed: int, t: int) -> dict:
    """A full checkpoint, then C streams change and a delta checkpoint; the same C streams
    change again and a full one is taken (delta_fraction 0) for the side-by-side."""
    rng = np.random.default_rng(t)
    store.forget("in", 0)
    store.write(store.prepare("in", 0, det, set()))  # the snapshot the deltas follow
    out = {}
    for kind in ("delta", "full"):
        touched = [ids[i] for i in rng.choice(len(ids), changed, replace=False)]
        det.process(touched, rng.normal(size=changed), np.full(changed, 1000 + t, np.int64))
        store.delta_fraction = 0.5 if kind == "delta" else 0.0
        size0 = _written(store)
        prep_s, prepared = timed(lambda: store.prepare("in", 0, det, set(touched)))
        write_s, _ = timed(lambda: store.write(prepared))
        assert type(prepared).__name__ == ("_Delta" if kind == "delta" else "_Full")
        # A delta adds a frame to the log; a full checkpoint rewrites the snapshot and the log.
        out[kind] = (prep_s, write_s, _written(store) - size0 if kind == "delta" else _written(store))
    return out


def _written(store: LocalStore) -> int:
    """Bytes of the partition's snapshot and log."""
    return sum(p.stat().st_size for p in (store.path("in", 0), store.log_path("in", 0)) if p.exists())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="100000,1000000")
    ap.add_argument("--changed", type=int, default=5000)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"GRU H={args.hidden}, {args.changed} streams changed per checkpoint; best of {args.repeats}; "
          f"load average {open('/proc/loadavg').read().split()[0]}")
    print(f"{'streams':>9} | {'full: stall':>11} {'write':>8} {'MB':>7} | {'delta: stall':>12} {'write':>8} "
          f"{'MB':>7} | {'stall ratio':>11} {'write ratio':>11} {'bytes ratio':>11}")
    for n in (int(x) for x in args.streams.split(",")):
        det, ids = filled_detector(n, args.hidden)
        with tempfile.TemporaryDirectory() as tmp:
            store = LocalStore(tmp)
            rounds = [one_round(store, det, ids, min(args.changed, n), t) for t in range(args.repeats)]
        full = [min(r["full"][i] for r in rounds) for i in range(3)]
        delta = [min(r["delta"][i] for r in rounds) for i in range(3)]
        print(f"{n:>9,} | {1e3 * full[0]:>9.1f}ms {1e3 * full[1]:>6.0f}ms {full[2] / 1e6:>7.1f} | "
              f"{1e3 * delta[0]:>10.1f}ms {1e3 * delta[1]:>6.0f}ms {delta[2] / 1e6:>7.2f} | "
              f"{full[0] / delta[0]:>10.0f}x {full[1] / delta[1]:>10.0f}x {full[2] / delta[2]:>10.0f}x")


if __name__ == "__main__":
    main()
