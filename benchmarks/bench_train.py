"""Training speed: streamrnn's Numba BPTT beside PyTorch CPU, in one run.

For GRU and LSTM at H = 32 and 64 (one layer, one feature, windows of 32 steps, batch 64,
Adam), prints:

- windows/s of a training step (forward, backward, Adam) for both, interleaved A/B, best of
  ``--repeats``, with the same thread count for Numba and PyTorch;
- seconds to reach a fixed validation loss on sines plus noise, from the same initial
  weights, the same batches in the same order;
- the ratio ours / PyTorch for both (target: at least 2x).

Then the peak RSS of ``streamrnn.train.train`` over two Parquet histories, 4x and 16x the rows
it may hold at once (``max_rows``), side by side: memory stays bounded if the peak does not
grow with the history.

Usage: ``python benchmarks/bench_train.py [--threads N] [--quick] [--cells gru,lstm] [--hidden 32,64]``
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch

from streamrnn import Model
from streamrnn.optim import Adam
from streamrnn.train import Net, Stepper

WINDOW, BATCH, LR, CLIP = 32, 64, 3e-3, 1.0
FILE_ROWS, ROW_GROUP = 100_000, 20_000  # the memory benchmark's Parquet layout


def sine_windows(n: int, seed: int) -> np.ndarray:
    """(n, WINDOW + 1, 1) float32 windows of unit sines with random phase/period plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW + 1)[None, :]
    period = rng.uniform(12, 30, (n, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    x = np.sqrt(2) * np.sin(2 * np.pi * t / period + phase) + 0.1 * rng.normal(size=(n, WINDOW + 1))
    return x[..., None].astype(np.float32)


# ----------------------------------------------------------------------------- ours
class Ours:
    def __init__(self, cell: str, hidden: int, seed: int = 0):
        self.init = Model.random(cell, n_features=1, hidden=[hidden], seed=seed)
        self.net = Net.of(self.init)
        self.reset()

    def reset(self) -> None:
        self.theta = self.net.theta(self.init, np.float64)
        self.adam = Adam(self.theta.size)
        self.stepper = Stepper(self.net, self.theta, self.adam, BATCH)  # what train.fit runs

    def step(self, x: np.ndarray, idx: np.ndarray) -> None:
        self.stepper.step(x, idx, LR, CLIP)

    def valid_loss(self, x: np.ndarray) -> float:
        loss, _ = self.net.forward(self.stepper.theta32, x)
        return loss / x.size * x.shape[1] / (x.shape[1] - 1)


# -------------------------------------------------------------------------- PyTorch
class Theirs:
    def __init__(self, cell: str, hidden: int, seed: int = 0):
        self.init = Model.random(cell, n_features=1, hidden=[hidden], seed=seed)
        self.cls = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]
        self.hidden = hidden
        self.reset()

    def reset(self) -> None:
        self.rnn = self.cls(1, self.hidden, batch_first=True)
        self.head = torch.nn.Linear(self.hidden, 1)
        layer = self.init.layers[0]
        with torch.no_grad():
            for name, key in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"),
                              ("bias_ih_l0", "b_ih"), ("bias_hh_l0", "b_hh")):
                getattr(self.rnn, name).copy_(torch.from_numpy(layer[key]))
            self.head.weight.copy_(torch.from_numpy(self.init.head_weight))
            self.head.bias.copy_(torch.from_numpy(self.init.head_bias))
        self.params = list(self.rnn.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.Adam(self.params, lr=LR)

    def step(self, x: torch.Tensor, idx: np.ndarray) -> None:
        xb = x[torch.from_numpy(idx)]
        self.opt.zero_grad()
        loss = ((self.head(self.rnn(xb[:, :-1])[0]) - xb[:, 1:]) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()

    def valid_loss(self, x: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((self.head(self.rnn(x[:, :-1])[0]) - x[:, 1:]) ** 2).mean())


# ---------------------------------------------------------------------- measurements
def windows_per_second(model, x, n_windows: int) -> float:
    order = np.random.default_rng(0).permutation(n_windows)
    t0 = time.perf_counter()
    for b in range(0, n_windows, BATCH):
        model.step(x, order[b:b + BATCH])
    return n_windows / (time.perf_counter() - t0)


def seconds_to_loss(model, x, xv, target: float, max_epochs: int) -> tuple[float, int]:
    """Training seconds (validation excluded) until the validation loss is <= target."""
    model.reset()
    n = len(x)
    spent = 0.0
    for epoch in range(max_epochs):
        order = np.random.default_rng([0, epoch]).permutation(n)
        t0 = time.perf_counter()
        for b in range(0, n, BATCH):
            model.step(x, order[b:b + BATCH])
        spent += time.perf_counter() - t0
        if model.valid_loss(xv) <= target:
            return spent, epoch + 1
    return math.inf, max_epochs


def bench_speed(threads: int, repeats: int, n_windows: int, target: float, max_epochs: int,
                cells=("gru", "lstm"), hiddens=(32, 64)) -> list[dict]:
    rows = []
    x = sine_windows(n_windows, 1)
    xv = sine_windows(512, 2)
    xt, xvt = torch.from_numpy(x), torch.from_numpy(xv)
    for cell in cells:
        for hidden in hiddens:
            ours, theirs = Ours(cell, hidden), Theirs(cell, hidden)
            ours.step(x, np.arange(BATCH))  # compile (or load from cache)
            w_ours, w_theirs = [], []
            for _ in range(repeats):  # A/B interleaved: both see the same machine load
                w_ours.append(windows_per_second(ours, x, n_windows))
                w_theirs.append(windows_per_second(theirs, xt, n_windows))
            s_ours, e_ours = seconds_to_loss(ours, x, xv, target, max_epochs)
            s_theirs, e_theirs = seconds_to_loss(theirs, xt, xvt, target, max_epochs)
            row = {"cell": cell, "hidden": hidden, "threads": threads,
                   "ours_windows_s": max(w_ours), "torch_windows_s": max(w_theirs),
                   "ours_s_to_loss": s_ours, "ours_epochs": e_ours,
                   "torch_s_to_loss": s_theirs, "torch_epochs": e_theirs}
            row["speedup_windows"] = row["ours_windows_s"] / row["torch_windows_s"]
            row["speedup_time_to_loss"] = s_theirs / s_ours if math.isfinite(s_ours) else 0.0
            rows.append(row)
            print(f"{cell:4s} H={hidden:3d}  windows/s ours {row['ours_windows_s']:9,.0f}  "
                  f"torch {row['torch_windows_s']:9,.0f}  ratio {row['speedup_windows']:5.2f}x   "
                  f"s to valid loss {target}: ours {s_ours:6.2f} ({e_ours} ep)  "
                  f"torch {s_theirs:6.2f} ({e_theirs} ep)  ratio {row['speedup_time_to_loss']:5.2f}x",
                  flush=True)
    return rows


# --------------------------------------------------------------------------- memory
def write_history(directory: Path, n_streams: int, rows_per_stream: int) -> int:
    """Parquet files of at most FILE_ROWS rows in row groups of ROW_GROUP rows, so the reader's
    unit of work (a row group) is the same whatever the history's size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    t = np.arange(rows_per_stream)
    per_file = max(1, FILE_ROWS // rows_per_stream)
    for f in range(0, n_streams, per_file):
        ids, ts, vals = [], [], []
        for s in range(f, min(f + per_file, n_streams)):
            ids.append(np.full(rows_per_stream, f"s{s:05d}"))
            ts.append(1_767_225_600_000 + t * 60_000)
            vals.append(10 * s + np.sin(t / (5 + s % 7)) + 0.1 * rng.normal(size=rows_per_stream))
        pq.write_table(pa.table({"stream": np.concatenate(ids), "ts": np.concatenate(ts),
                                 "value": np.concatenate(vals)}), directory / f"part-{f:05d}.parquet",
                       row_group_size=ROW_GROUP)
    return n_streams * rows_per_stream


def _rss_child(directory: str, max_rows: int) -> None:
    from streamrnn.train import train

    t0 = time.perf_counter()
    result = train([directory], Path(directory) / "model.safetensors", cell="gru", hidden=[16], window=32,
                   stride=16, epochs=1, max_rows=max_rows, max_windows=20_000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss": peak, "seconds": time.perf_counter() - t0,
                      "rows": result.model.training["rows"]["rows"]}))


def _measure_rss(n_streams: int, rows_per_stream: int, max_rows: int) -> dict:
    """Write a history of n_streams x rows_per_stream rows, train on it in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = write_history(Path(tmp), n_streams, rows_per_stream)
        out = subprocess.run([sys.executable, __file__, "--rss-child", tmp, str(max_rows)], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        info = json.loads(out)
    return {"rows": rows, "max_rows": max_rows, "peak_rss": info["peak_rss"], "seconds": info["seconds"],
            "bare_arrays_bytes": rows * (8 + 8 + 8)}  # ts + value + a stream code per row


def bench_memory(n_streams: int, rows_per_stream: tuple[int, ...], max_rows: int) -> dict:
    """Peak RSS of training on histories of growing size with the same ``max_rows``: bounded
    memory means the peak stays flat while the history (and what a full load would take) grows."""
    base = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, resource, streamrnn.train, streamrnn.scoring, "
         "streamrnn.data;print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))"],
        check=True, capture_output=True, text=True).stdout)
    runs = [_measure_rss(n_streams, r, max_rows) for r in rows_per_stream]
    print(f"memory (max_rows {max_rows:,}; imports alone {base / 2**20:,.0f} MiB peak RSS):", flush=True)
    for run in runs:
        print(f"  history {run['rows']:>12,} rows ({run['bare_arrays_bytes'] / 2**20:6,.0f} MiB as bare arrays): "
              f"peak RSS {run['peak_rss'] / 2**20:6,.0f} MiB, {run['seconds']:.1f} s", flush=True)
    first, last = runs[0], runs[-1]
    slope = (last["peak_rss"] - first["peak_rss"]) / max(last["rows"] - first["rows"], 1)
    print(f"  growth: {(last['peak_rss'] - first['peak_rss']) / 2**20:+,.0f} MiB for "
          f"{last['rows'] - first['rows']:+,} rows ({slope:+.1f} bytes per extra row; holding a "
          f"timestamp and a value per row would be +16)", flush=True)
    return {"max_rows": max_rows, "import_rss": base, "runs": runs, "bytes_per_extra_row": slope}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--windows", type=int, default=2048)
    p.add_argument("--target", type=float, default=0.08, help="validation MSE to reach (scaled units)")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="fewer windows and a small memory run")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--cells", default="gru,lstm", help="comma-separated subset of gru,lstm")
    p.add_argument("--hidden", default="32,64", help="comma-separated hidden sizes")
    p.add_argument("--skip-memory", action="store_true", help="only the speed comparison")
    p.add_argument("--skip-speed", action="store_true", help="only the peak-RSS measurement")
    p.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child[0], int(args.rss_child[1]))
        return
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads} (Numba and PyTorch), window {WINDOW}, batch {BATCH}, Adam lr {LR}, "
          f"clip {CLIP}; torch {torch.__version__}, numba {numba.__version__}", flush=True)
    n = 512 if args.quick else args.windows
    rows = [] if args.skip_speed else bench_speed(
        args.threads, args.repeats, n, args.target, args.max_epochs,
        tuple(args.cells.split(",")), tuple(int(h) for h in args.hidden.split(",")))
    mem = None
    if not args.skip_memory:
        mem = (bench_memory(200, (1_000, 4_000), 100_000) if args.quick
               else bench_memory(200, (5_000, 20_000), 250_000))
    if args.json:
        args.json.write_text(json.dumps({"speed": rows, "memory": mem}, indent=2))


if __name__ == "__main__":
    main()
