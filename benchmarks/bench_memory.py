"""Memory per stream and id-lookup throughput: StreamTable versus a Python dict peer.

Both variants hold the same per-stream NumPy columns, sized like a model's state (for a
GRU with H hidden units: ``state`` float32 x H, ``pred`` float32 x 1, plus the built-in
int64 ``last_seen``, ``last_offset`` and ``touch``); they differ in the id -> slot map:

* ``StreamTable``: ids as utf-8 bytes in a NumPy arena and an open-addressing hash index
  probed by Numba kernels.
* ``dict`` peer: a plain Python ``dict[str, int]`` plus the same columns grown the same way.

Each variant runs in a fresh subprocess, so neither pollutes the other's RSS: the worker
imports everything and warms up on a throwaway table (kernels compiled, allocator pools at
their size for 100k-event batches), reads RSS, assigns N streams with realistic ids
(``host-0000042/cpu``) in batches of 100k, reads RSS again. Both variants allocate their
columns the same way (``streamrnn.state._empty``), so the difference is the id map. Then it times ``assign``
on a 100k-event batch of known ids (a Python list of str, as decoded from messages).

Usage::

    python benchmarks/bench_memory.py [--streams 1000000] [--hidden 32] [--cell gru]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from itertools import repeat

BATCH = 100_000


def _widths(cell: str, hidden: int) -> int:
    # Values of recurrent state per stream for one layer: LSTM keeps h and c.
    return {"gru": hidden, "rnn": hidden, "lstm": 2 * hidden}[cell]


class DictTable:
    """The peer: ``dict[str, int]`` id -> slot, same columns, same geometric growth."""

    def __init__(self, specs: dict, capacity: int = 1024):
        import numpy as np

        # The same allocator as StreamTable's columns, so only the id map differs.
        from streamrnn.state import _empty

        self.np = np
        self.empty = _empty
        self.specs = specs
        self.index: dict[str, int] = {}
        self.capacity = capacity
        self.cols = {name: _empty((capacity, *shape), dtype) for name, (shape, dtype, _) in specs.items()}
        self.clock = 0

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        for name, (shape, dtype, _) in self.specs.items():
            grown = self.empty((cap, *shape), dtype)
            grown[: len(self.index)] = self.cols[name][: len(self.index)]
            self.cols[name] = grown
        self.capacity = cap

    def assign(self, ids: list[str], timestamps):
        np = self.np
        slots = np.fromiter(map(self.index.get, ids, repeat(-1)), np.int64, len(ids))
        missing = np.flatnonzero(slots < 0)
        if missing.size:
            self._grow(len(self.index) + missing.size)
            index = self.index
            first = []
            for e in missing.tolist():
                slot = index.get(ids[e])
                if slot is None:
                    slot = index[ids[e]] = len(index)
                    first.append(slot)
                slots[e] = slot
            for name, (_, _, fill) in self.specs.items():
                self.cols[name][first] = fill
        self.clock += 1
        self.cols["touch"][slots] = self.clock
        np.maximum.at(self.cols["last_seen"], slots, timestamps)
        return slots


def worker(variant: str, n: int, hidden: int, cell: str) -> dict:
    import numpy as np
    import psutil

    from streamrnn.state import Column, StreamTable

    width = _widths(cell, hidden)
    proc = psutil.Process()

    def make():
        if variant == "ours":
            table = StreamTable({"state": Column((width,), np.float32, 0.0), "pred": Column((1,), np.float32, np.nan)})
            return table, table.state_nbytes_per_stream
        specs = {
            "state": ((width,), np.float32, 0.0),
            "pred": ((1,), np.float32, np.nan),
            "last_seen": ((), np.int64, np.iinfo(np.int64).min),
            "last_offset": ((), np.int64, -1),
            "touch": ((), np.int64, 0),
        }
        nbytes = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d, _ in specs.values())
        return DictTable(specs), nbytes

    def ids_range(lo, hi):
        return [f"host-{i:07d}/cpu" for i in range(lo, hi)]

    # Warm up on a throwaway table: compile (or load) the kernels, touch every code path,
    # and let the allocators (pymalloc, glibc, Arrow's pool) reach their steady size for
    # batches of this size, so the baseline holds the per-process constants and the
    # difference holds only what grows with the number of streams.
    warm, _ = make()
    warm.assign(ids_range(0, BATCH), np.zeros(BATCH, np.int64))
    warm.assign(ids_range(BATCH // 2, BATCH + BATCH // 2), np.ones(BATCH, np.int64))
    del warm
    gc.collect()

    table, state_nbytes = make()
    gc.collect()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    for lo in range(0, n, BATCH):
        hi = min(n, lo + BATCH)
        ids = ids_range(lo, hi)
        table.assign(ids, np.full(hi - lo, lo, np.int64))
        del ids
    build_s = time.perf_counter() - t0
    gc.collect()
    rss1 = proc.memory_info().rss
    if variant == "ours":
        assert len(table) == n

    # Lookup throughput: 100k events of known streams, random order, with repeats.
    rng = np.random.default_rng(0)
    batch = [f"host-{i:07d}/cpu" for i in rng.integers(0, n, min(BATCH, n)).tolist()]
    ts = np.full(len(batch), n, np.int64)
    times = []
    for _ in range(15):
        t = time.perf_counter()
        table.assign(batch, ts)
        times.append(time.perf_counter() - t)
    out = {
        "variant": variant,
        "streams": n,
        "rss_bytes_per_stream": (rss1 - rss0) / n,
        "state_nbytes_per_stream": state_nbytes,
        "build_s": build_s,
        "lookup_ids_per_s": len(batch) / float(np.median(times)),
    }
    if variant == "ours":
        import pyarrow as pa

        arrow_batch = pa.array(batch, pa.string())
        times = []
        for _ in range(15):
            t = time.perf_counter()
            table.assign(arrow_batch, ts)
            times.append(time.perf_counter() - t)
        out["lookup_arrow_ids_per_s"] = len(batch) / float(np.median(times))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1_000_000)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--cell", choices=["gru", "lstm", "rnn"], default="gru")
    parser.add_argument("--worker", choices=["ours", "dict"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.streams, args.hidden, args.cell)))
        return

    results = {}
    for variant in ("ours", "dict"):
        cmd = [sys.executable, __file__, "--worker", variant, "--streams", str(args.streams),
               "--hidden", str(args.hidden), "--cell", args.cell]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])

    ours, peer = results["ours"], results["dict"]
    width = _widths(args.cell, args.hidden)
    print(f"streams={args.streams:,}  cell={args.cell}  hidden={args.hidden}  "
          f"columns: state float32x{width}, pred float32x1, last_seen/last_offset/touch int64")
    print(f"python {sys.version.split()[0]}; RSS by psutil, one fresh process per variant; "
          f"'ours better by' = peer/ours for bytes and time, ours/peer for ids/s\n")
    o_over = ours["rss_bytes_per_stream"] - ours["state_nbytes_per_stream"]
    p_over = peer["rss_bytes_per_stream"] - peer["state_nbytes_per_stream"]
    rows = [
        ("RSS bytes per stream", ours["rss_bytes_per_stream"], peer["rss_bytes_per_stream"], "{:,.1f}", False),
        ("state arrays bytes per stream", ours["state_nbytes_per_stream"], peer["state_nbytes_per_stream"],
         "{:,.0f}", False),
        ("overhead bytes per stream", o_over, p_over, "{:,.1f}", False),
        ("build time (N new streams), s", ours["build_s"], peer["build_s"], "{:,.2f}", False),
        ("assign() 100k known ids, ids/s", ours["lookup_ids_per_s"], peer["lookup_ids_per_s"], "{:,.0f}", True),
    ]
    print(f"{'':34}{'StreamTable':>16}{'dict peer':>16}{'ours better by':>16}")
    for label, o, p, fmt, higher_better in rows:
        factor = o / p if higher_better else p / o
        print(f"{label:34}{fmt.format(o):>16}{fmt.format(p):>16}{factor:>15.2f}x")
    print(f"{'  same, ids as pa.StringArray':34}{ours['lookup_arrow_ids_per_s']:>16,.0f}{'-':>16}")
    print(f"\noverhead target <= 64 bytes per stream: {'PASS' if o_over <= 64 else 'FAIL'} ({o_over:.1f})")
    print(f"lookup target >= 5M ids/s (list input): {'PASS' if ours['lookup_ids_per_s'] >= 5e6 else 'FAIL'}")


if __name__ == "__main__":
    main()
