"""Training: fit a Model's weights on history with the Numba BPTT kernels.

``train(paths, out, ...)`` reads history (``streamrnn.data``), splits it by time per stream,
fits the scaler on the training part only, samples windows, runs mini-batch Adam with
gradient-norm clipping, a learning-rate schedule and early stopping on the validation part,
calibrates thresholds on the newest part and writes the model file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numba
import numpy as np

from streamrnn.compiling import compile_clock, compiling_message, on_first_compile
from streamrnn.data import data_notes, write_whole
from streamrnn.errors import StreamrnnError
from streamrnn.kernels import bptt
from streamrnn.model import Model

_CELL_CODES = {"gru": bptt.GRU, "lstm": bptt.LSTM, "rnn": bptt.RNN_TANH}


@functools.cache  # once per process
def _keep_freed_scratch() -> None:
    """Let glibc reuse freed blocks of up to 8 MiB instead of unmapping them.

    Each BPTT block allocates its scratch (about 1.5 MiB for LSTM H=64, 32 steps, in arrays
    of up to 0.5 MiB) and frees it at the end; by default glibc hands such blocks back to
    the OS, and every block then paid ~35 page faults, ~90 us of a ~1 ms block. At most
    32 MiB of free heap is kept before trimming. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 8 << 20)
    mallopt(m_trim_threshold, 32 << 20)


class TrainError(StreamrnnError):
    """Bad training options or data that cannot train a model."""


# ----------------------------------------------------------------- network <-> vector
@dataclass(frozen=True)
class Net:
    """Architecture of a trainable network and the layout of its flat parameter vector."""

    cell: str
    n_features: int
    hidden: tuple[int, ...]
    reset_after: bool = True
    peephole: bool = False
    nonlinearity: str = "tanh"
    head: str = "linear"

    def __post_init__(self) -> None:
        # Here, not at import: only a process that trains changes the allocator's setting.
        _keep_freed_scratch()

    @property
    def code(self) -> int:
        if self.cell == "rnn" and self.nonlinearity == "relu":
            return bptt.RNN_RELU
        return _CELL_CODES[self.cell]

    @property
    def n_out(self) -> int:
        return self.n_features * (2 if self.head == "gaussian" else 1)

    @cached_property
    def layout(self):
        """(offsets (L, 5), head offsets (2,), total size) of the flat parameter vector."""
        return bptt.param_layout(self.code, self.hidden, self.n_features, self.n_out, self.peephole)

    @cached_property
    def hidden_array(self) -> np.ndarray:
        return np.asarray(self.hidden, np.int64)

    @classmethod
    def of(cls, model: Model) -> "Net":
        return cls(model.cell, model.n_features, tuple(model.hidden), bool(model.reset_after),
                   bool(model.peephole), model.nonlinearity, model.head)

    def theta(self, model: Model, dtype=np.float32) -> np.ndarray:
        """The model's weights as one flat vector (PyTorch layout, see ``bptt.param_layout``)."""
        offs, head, total = self.layout
        theta = np.zeros(total, dtype)
        for i, layer in enumerate(model.layers):
            for k, key in enumerate(("w_ih", "w_hh", "b_ih", "b_hh", "peep")):
                if key in layer:
                    a = layer[key].reshape(-1)
                    theta[offs[i, k]:offs[i, k] + a.size] = a
        theta[head[0]:head[1]] = model.head_weight.reshape(-1)
        theta[head[1]:] = model.head_bias
        return theta

    def tensors(self, theta: np.ndarray) -> tuple[list[dict[str, np.ndarray]], np.ndarray, np.ndarray]:
        """(layers, head_weight, head_bias) views of a flat vector."""
        offs, head, total = self.layout
        g = bptt.GATES[self.code]
        layers, d = [], self.n_features
        for i, h in enumerate(self.hidden):
            shapes = {"w_ih": (g * h, d), "w_hh": (g * h, h), "b_ih": (g * h,), "b_hh": (g * h,)}
            if self.peephole:
                shapes["peep"] = (3, h)
            keys = ("w_ih", "w_hh", "b_ih", "b_hh", "peep")
            layers.append({key: theta[offs[i, keys.index(key)]:offs[i, keys.index(key)]
                                      + int(np.prod(shape))].reshape(shape)
                           for key, shape in shapes.items()})
            d = h
        return layers, theta[head[0]:head[1]].reshape(self.n_out, d), theta[head[1]:total]

    def model(self, theta: np.ndarray, **fields: Any) -> Model:
        """A Model holding these weights (float32 copies) plus the given metadata fields."""
        layers, w, b = self.tensors(theta)
        return Model(cell=self.cell, layers=[{k: v.copy() for k, v in l.items()} for l in layers],
                     head_weight=w.copy(), head_bias=b.copy(), reset_after=self.reset_after,
                     peephole=self.peephole, nonlinearity=self.nonlinearity, head=self.head, **fields)

    def kernel_layout(self, theta: np.ndarray) -> np.ndarray:
        """A copy of ``theta`` with every weight matrix transposed (what the kernels read)."""
        offs, head, _ = self.layout
        return bptt.to_kernel_layout(theta, bptt.GATES[self.code], self.hidden_array,
                                     self.n_features, self.n_out, offs, head)

    def kernel_args(self) -> tuple:
        """Arguments after (theta, x, idx) that every bptt batch kernel takes, up to ``hidden``."""
        return (self.code, bool(self.reset_after), bool(self.peephole))

    def grad(self, theta: np.ndarray, windows: np.ndarray, idx: np.ndarray | None = None,
             scale: float | None = None) -> tuple[float, np.ndarray]:
        """(loss sum, float64 gradient of the mean loss) over ``windows[idx]`` (N, T+1, D).

        ``theta`` and ``windows`` share a dtype: float32 (training, the served activations) or
        float64 (exact activations, for checks).
        """
        idx = np.arange(len(windows)) if idx is None else np.asarray(idx, np.int64)
        n, t1, d = windows.shape
        if scale is None:
            scale = 1.0 / (len(idx) * (t1 - 1) * d)
        offs, head, _ = self.layout
        # Blocks handed out one at a time: on a loaded machine a preempted thread no longer
        # holds back the half it was statically given. Results do not depend on it (each
        # block writes its own row; rows are summed in block order).
        with numba.parallel_chunksize(1):
            return bptt.batch_grad(theta, windows, idx, *self.kernel_args(),
                                   self.hidden_array, self.n_out,
                                   self.head == "gaussian", offs, head, float(scale))

    def forward(self, theta: np.ndarray, windows: np.ndarray, idx: np.ndarray | None = None,
                outputs: bool = False) -> tuple[float, np.ndarray]:
        """(loss sum, head outputs (N, T, O) if ``outputs``) over ``windows[idx]``."""
        idx = np.arange(len(windows)) if idx is None else np.asarray(idx, np.int64)
        offs, head, _ = self.layout
        with numba.parallel_chunksize(1):
            return bptt.batch_forward(theta, windows, idx, *self.kernel_args(),
                                      self.hidden_array, self.n_out,
                                      self.head == "gaussian", offs, head, bool(outputs))


class Stepper:
    """Training steps on ``theta`` (float64 master weights, updated in place) with ``adam``:
    gradient, norm clipping and the Adam update in one parallel Numba call per step.

    Keeps what every step needs between steps: the weights' float32 copies in both layouts
    the gradient kernels read (the Adam pass writes the float32 copy, the step transposes it
    into the kernel layout) and the per-block gradient rows. Same gradient bit for bit as
    :meth:`Net.grad` on ``theta.astype(np.float32)``; the same update as
    ``clip_grad_norm`` then ``Adam.step``. Call :meth:`reload` after changing ``theta``
    other than through :meth:`step`.
    """

    def __init__(self, net: Net, theta: np.ndarray, adam, batch_size: int):
        if theta.dtype != np.float64 or not theta.flags.c_contiguous:
            raise TypeError("Stepper needs C-contiguous float64 master weights")
        self.net, self.theta, self.adam = net, theta, adam
        offs, head, total = net.layout
        self._shape_args = (net.hidden_array, net.n_out, net.head == "gaussian", offs, head)
        n_blocks = -(-int(batch_size) // bptt.BLOCK)
        self.rows = np.empty((n_blocks, total), np.float32)
        self.losses = np.empty(n_blocks)
        self.grad = np.empty(total)
        self._gk = np.empty(total)
        self.reload()

    def reload(self) -> None:
        """Refresh the float32 copies from ``theta``."""
        self.theta32 = self.theta.astype(np.float32)
        self.thetak = self.net.kernel_layout(self.theta32)

    def step(self, windows: np.ndarray, idx: np.ndarray, lr: float, clip: float | None) -> float:
        """One step on windows[idx] (float32 (N, T+1, D), at most ``batch_size`` of them) at
        learning rate ``lr``; returns the loss sum over them."""
        n, t1, d = windows.shape
        if len(idx) > self.rows.shape[0] * bptt.BLOCK:
            raise ValueError(f"{len(idx)} windows in a step of a Stepper made for "
                             f"{self.rows.shape[0] * bptt.BLOCK}")
        scale = 1.0 / (len(idx) * (t1 - 1) * d)
        step, c2 = self.adam.advance(lr)
        a = self.adam
        with numba.parallel_chunksize(1):  # blocks handed out one at a time (see Net.grad)
            loss, _ = bptt.train_step(self.theta, self.theta32, self.thetak, a.m, a.v,
                                      self.rows, self.losses, self._gk, self.grad, windows, idx,
                                      *self.net.kernel_args(), *self._shape_args, scale,
                                      float(clip or 0.0), a.beta1, a.beta2, a.eps, step, c2)
        return loss


# ------------------------------------------------------------------------ options
@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run (what the model file's metadata records)."""

    cell: str = "gru"
    hidden: tuple[int, ...] = (32,)
    reset_after: bool = True
    peephole: bool = False
    nonlinearity: str = "tanh"
    loss: str = "mse"
    window: int = 32
    stride: int = 8
    batch_size: int = 64
    epochs: int = 20
    lr: float = 3e-3
    clip: float | None = 1.0
    schedule: str = "cosine"
    patience: int | None = 5
    restore_best: bool = True
    seed: int = 0
    scaler: str = "zscore"
    per_stream_scaler: bool = False
    valid: float = 0.15
    calib: float = 0.15
    missing: str = "ffill"
    max_gap_ms: int | None = None
    time_delta: bool = False
    max_windows: int = 200_000
    max_rows: int = 20_000_000
    # 1e-4 per event: ~0.14 false alerts per stream per day at 1-minute sampling (1e-3 gives
    # 1.4, too many for fleets of thousands of streams).
    target_false_alert_rate: float = 1e-4
    # Threshold estimator: "pot" (generalised Pareto tail over the 98 % quantile) or "quantile"
    # (the empirical quantile); see streamrnn.scoring.estimate_threshold.
    calibration: str = "pot"

    def check(self) -> None:
        """Raise TrainError naming the first bad option."""
        from streamrnn.optim import SCHEDULES

        if self.cell not in _CELL_CODES:
            raise TrainError(f"cell must be one of {', '.join(_CELL_CODES)}, not {self.cell!r}")
        if not self.hidden or min(self.hidden) < 1:
            raise TrainError(f"hidden sizes must be positive integers, not {list(self.hidden)}")
        if self.loss not in ("mse", "gaussian"):
            raise TrainError(f"loss must be 'mse' or 'gaussian', not {self.loss!r}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.peephole and self.cell != "lstm":
            raise TrainError("peephole connections exist only for the lstm cell")
        if self.nonlinearity not in ("tanh", "relu") or (self.nonlinearity == "relu" and self.cell != "rnn"):
            raise TrainError("nonlinearity is 'tanh', or 'relu' for the rnn cell only")
        for name in ("window", "stride", "batch_size", "max_windows", "max_rows"):
            if int(getattr(self, name)) < 1:
                raise TrainError(f"{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.epochs < 0:
            raise TrainError(f"epochs must be 0 or more, not {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"learning rate must be positive, not {self.lr}")
        if self.clip is not None and not self.clip > 0:
            raise TrainError(f"clip must be positive (or None for no clipping), not {self.clip}")
        if self.patience is not None and self.patience < 1:
            raise TrainError(f"patience must be at least 1 (or None), not {self.patience}")
        if self.calibration not in ("pot", "quantile"):
            raise TrainError(f"calibration must be 'pot' or 'quantile', not {self.calibration!r}")

    def net(self, n_features: int) -> Net:
        return Net(self.cell, n_features, tuple(int(h) for h in self.hidden), self.reset_after,
                   self.peephole, self.nonlinearity, "gaussian" if self.loss == "gaussian" else "linear")

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    model: Model
    path: Path
    epochs: list[dict[str, float]]
    best_epoch: int
    best_valid_loss: float
    windows_per_second: float
    report: dict[str, Any]
    report_path: Path | None = None
    png_path: Path | None = None
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------- data side
@dataclass
class Prepared:
    """Everything the loop needs from the data: scaler, windows, and how to re-read history."""

    features: list[str]
    scaler: Any
    train_windows: np.ndarray
    valid_windows: np.ndarray
    stats: dict[str, Any]
    short_streams: list[str]
    parts: Callable[[], Any]  # () -> iterator of (History, Split)


def prepare(paths: Sequence[str | Path] | str | Path, cfg: TrainConfig, stream_col: str = "stream",
            time_col: str = "ts", features: Sequence[str] | None = None,
            stream_id: str | None = None) -> Prepared:
    """Read, split by time, fit the scaler on the training part only, sample windows.

    History is read in parts of whole streams of at most ``cfg.max_rows`` rows, so memory
    stays bounded: pass one fits the scaler, pass two samples windows into fixed-size
    reservoirs. A history that fits in one part is read once.
    """
    from streamrnn import data

    source = data.open_source(paths, data.Schema(stream_col, time_col,
                                                 tuple(features) if features else None, stream_id))
    opts = dict(missing=cfg.missing, max_gap_ms=cfg.max_gap_ms, time_delta_feature=cfg.time_delta)
    cache: list = []

    def parts():
        if cache:
            yield from cache
            return
        # Only a history that is one part is kept for the next pass; holding every part
        # until the pass ends made memory grow with the history.
        first = None
        for i, part in enumerate(data.iter_history(source, cfg.max_rows, **opts)):
            split = data.split_by_time(part, valid=cfg.valid, calib=cfg.calib)
            first = (part, split) if i == 0 else None
            yield part, split
        if first is not None:
            cache.append(first)

    scaler, stats = _fit_scaler_streaming(parts, cfg, source.n_rows)
    train_s = data.WindowSampler(cfg.window, cfg.stride, cfg.max_windows, cfg.seed)
    valid_s = data.WindowSampler(cfg.window, cfg.stride, max(cfg.max_windows // 4, 1), cfg.seed + 1)
    for _, split in parts():
        for s, v in zip(split.train.streams, scaler.apply(split.train).values):
            train_s.add(s, v)
        for s, v in zip(split.valid.streams, scaler.apply(split.valid).values):
            valid_s.add(s, v)
    short = sorted(set(train_s.short_sequences))
    stats.update(train_windows_offered=int(train_s.n_seen), valid_windows_offered=int(valid_s.n_seen))
    return Prepared(stats["features"], scaler, train_s.windows(), valid_s.windows(), stats, short, parts)


def _fit_scaler_streaming(parts, cfg: TrainConfig, total_rows: int):
    """Fit the scaler on the training parts; rows beyond ``max_rows`` are thinned evenly."""
    from streamrnn import data

    thin = max(1, math.ceil(total_rows / cfg.max_rows))
    keep_streams, keep_ts, keep_vals = [], [], []
    stream_rows: list[tuple[list[str], np.ndarray, np.ndarray]] = []
    stats: dict[str, Any] = {"rows_read": 0, "rows": 0, "rows_train": 0, "rows_valid": 0,
                             "rows_calib": 0, "streams": 0, "time_min": None, "time_max": None}
    features: list[str] = []
    paths: list[str] = []
    for part, split in parts():
        features = list(part.features)
        paths = part.stats.get("paths", paths)
        for key in ("rows_read", "rows", "duplicates_dropped", "conflicts_merged", "nonfinite_values",
                    "missing_filled", "rows_dropped_missing", "gaps_split"):
            stats[key] = stats.get(key, 0) + int(part.stats.get(key, 0) or 0)
        stats["streams"] += len(set(part.streams))
        for key, fn in (("time_min", min), ("time_max", max)):
            v = part.stats.get(key)
            if v is not None:
                stats[key] = v if stats[key] is None else fn(stats[key], v)
        for name in ("train", "valid", "calib"):
            stats[f"rows_{name}"] += getattr(split, name).n_rows
        if cfg.per_stream_scaler and split.train.n_rows:
            sc = data.fit_scaler(split.train, cfg.scaler, per_stream=True)
            stream_rows.append((list(sc.stream_ids), sc.stream_mean, sc.stream_scale))
        for s, t, v in zip(split.train.streams, split.train.ts, split.train.values):
            keep_streams.append(s)
            # Thinned rows are copied: a strided view would keep the whole part alive.
            keep_ts.append(t[::thin].copy() if thin > 1 else t)
            keep_vals.append(v[::thin].copy() if thin > 1 else v)
    stats.update(features=features, paths=[str(p) for p in paths], scaler_thinning=thin)
    if stats["rows_train"] == 0:
        raise TrainError("the training part is empty: every stream is too short to split "
                         f"(valid={cfg.valid}, calib={cfg.calib}); give more history")
    sample = data.History(keep_streams, keep_ts, keep_vals, features, {})
    scaler = data.fit_scaler(sample, cfg.scaler, per_stream=False)
    if cfg.per_stream_scaler:
        ids = [s for ids, _, _ in stream_rows for s in ids]
        scaler = data.Scaler(cfg.scaler, True, scaler.mean, scaler.scale, ids,
                             np.concatenate([m for _, m, _ in stream_rows]),
                             np.concatenate([s for _, _, s in stream_rows]))
    return scaler, stats


def calibration_batches(parts, rows_per_batch: int = 65536):
    """(stream_ids, raw values, timestamps, mask) in time order per stream over all parts;
    mask is True for the calibration part (the states before it are warmed on train+valid)."""
    ids: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    tss: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    size = 0
    for part, split in parts():
        cut = split.cutoffs["calib"]
        for s, t, v in zip(part.streams, part.ts, part.values):
            ids.append(np.full(len(t), s, dtype=object))
            vals.append(v)
            tss.append(t)
            masks.append(t >= cut[s])
            size += len(t)
            if size >= rows_per_batch:
                yield np.concatenate(ids), np.concatenate(vals), np.concatenate(tss), np.concatenate(masks)
                ids, vals, tss, masks, size = [], [], [], [], 0
    if size:
        yield np.concatenate(ids), np.concatenate(vals), np.concatenate(tss), np.concatenate(masks)


# ----------------------------------------------------------------------------- loop
@dataclass
class LoopState:
    """What a checkpoint holds: enough to continue a run exactly where it stopped."""

    theta: np.ndarray  # float64 master weights
    best_theta: np.ndarray
    best_valid: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    lr_factor: float = 1.0
    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)


def _mean_loss(net: Net, theta32: np.ndarray, windows: np.ndarray, chunk: int = 4096) -> float:
    if len(windows) == 0:
        return math.nan
    total = 0.0
    for a in range(0, len(windows), chunk):
        total += net.forward(theta32, windows, np.arange(a, min(a + chunk, len(windows))))[0]
    return total / (windows.shape[0] * (windows.shape[1] - 1) * windows.shape[2])


def save_checkpoint(path: Path, state: LoopState, adam, fingerprint: dict[str, Any]) -> None:
    """Write the loop state as a NumPy .npz (no pickle), atomically."""
    arrays = {"theta": state.theta, "best_theta": state.best_theta,
              "scalars": np.array([state.best_valid, state.best_epoch, state.bad_epochs,
                                   state.lr_factor, state.epoch], np.float64),
              "history": np.frombuffer(json.dumps(state.history).encode(), np.uint8),
              "fingerprint": np.frombuffer(json.dumps(fingerprint, sort_keys=True).encode(), np.uint8),
              **adam.state()}
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    write_whole(path, write)



def load_checkpoint(path: Path, adam, fingerprint: dict[str, Any]) -> LoopState:
    """Read a checkpoint written by :func:`save_checkpoint` for the same run setup."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        stored = json.loads(bytes(data["fingerprint"]).decode())
        history = json.loads(bytes(data["history"]).decode())
        best_valid, best_epoch, bad, lr_factor, epoch = data["scalars"].tolist()
    except FileNotFoundError:
        raise TrainError(f"checkpoint {path} does not exist") from None
    except (OSError, ValueError, KeyError, EOFError) as exc:
        # NumPy's refusal of a non-.npz file reads "contains pickled (object) data ... load it
        # unsafely": advice a user must not follow for a checkpoint
        why = "not a NumPy .npz file" if "pickle" in str(exc) else str(exc)
        raise TrainError(f"{path} is not a streamrnn training checkpoint ({why}); --resume takes "
                         f"the .ckpt.npz a run writes beside its model") from None
    if stored != fingerprint:
        diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        raise TrainError(f"checkpoint {path} belongs to a different run: {', '.join(diff)} differ")
    adam.load(data)
    return LoopState(np.array(data["theta"], np.float64), np.array(data["best_theta"], np.float64),
                     best_valid, int(best_epoch), int(bad), lr_factor, int(epoch), history)


def fit(net: Net, theta0: np.ndarray, train_windows: np.ndarray, valid_windows: np.ndarray,
        cfg: TrainConfig, *, checkpoint: Path | None = None, resume: Path | None = None,
        fingerprint: dict[str, Any] | None = None, progress: bool = False,
        on_epoch: Callable[[LoopState], None] | None = None) -> LoopState:
    """Mini-batch Adam over the windows with clipping, schedule and early stopping.

    Deterministic for a given seed: epoch e shuffles with ``default_rng([seed, e])``, and the
    gradient kernel sums blocks in a fixed order, so a run (or a resumed run) is the same
    bit for bit on the same machine.
    """
    from streamrnn.optim import Adam, cosine_factor

    n = len(train_windows)
    if n == 0:
        raise TrainError("no training windows")
    fingerprint = fingerprint or {}
    adam = Adam(theta0.size)
    if resume is not None:
        state = load_checkpoint(Path(resume), adam, fingerprint)
    else:
        state = LoopState(np.array(theta0, np.float64), np.array(theta0, np.float64))
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * max(cfg.epochs, 1)
    x = np.ascontiguousarray(train_windows, np.float32)
    stepper = Stepper(net, state.theta, adam, cfg.batch_size)
    bar = _Progress(progress, cfg.epochs, steps_per_epoch, state.epoch)
    # an epoch's seconds leave out kernel compiling; the bar closes on any exit
    with compile_clock() as compiled, closing(bar):
        while state.epoch < cfg.epochs and not _stopped(state, cfg):
            t0, c0 = time.perf_counter(), compiled.seconds
            order = np.random.default_rng([cfg.seed, state.epoch]).permutation(n)
            loss_sum, count = 0.0, 0
            for b in range(steps_per_epoch):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                lr = cfg.lr * state.lr_factor
                if cfg.schedule == "cosine":
                    lr *= cosine_factor(adam.step_count, total_steps)
                loss = stepper.step(x, idx, lr, cfg.clip)
                loss_sum += loss
                count += len(idx)
                bar.step(loss_sum / (count * (x.shape[1] - 1) * x.shape[2]))
            if not np.all(np.isfinite(state.theta)):
                raise TrainError(f"training diverged in epoch {state.epoch + 1} (non-finite weights); "
                                 f"lower --lr (now {cfg.lr}) or set --clip")
            train_loss = loss_sum / (count * (x.shape[1] - 1) * x.shape[2])
            valid_loss = _mean_loss(net, state.theta.astype(np.float32), valid_windows)
            _after_epoch(state, cfg, train_loss, valid_loss, lr,
                         time.perf_counter() - t0 - (compiled.seconds - c0), n)
            bar.epoch_done(state)
            if checkpoint is not None:
                save_checkpoint(Path(checkpoint), state, adam, fingerprint)
            if on_epoch is not None:
                on_epoch(state)
    return state


def _stopped(state: LoopState, cfg: TrainConfig) -> bool:
    return cfg.patience is not None and state.bad_epochs >= cfg.patience


def _after_epoch(state: LoopState, cfg: TrainConfig, train_loss: float, valid_loss: float,
                 lr: float, seconds: float, n_windows: int) -> None:
    """Record the epoch; track the best validation loss (train loss if there is no validation)."""
    watched = valid_loss if math.isfinite(valid_loss) else train_loss
    if watched < state.best_valid:
        state.best_valid, state.best_epoch, state.bad_epochs = watched, state.epoch, 0
        state.best_theta = state.theta.copy()
    else:
        state.bad_epochs += 1
        if cfg.schedule == "plateau" and state.bad_epochs % max(1, (cfg.patience or 4) // 2) == 0:
            state.lr_factor *= 0.5
    state.history.append({"epoch": state.epoch + 1, "train_loss": float(train_loss),
                          "valid_loss": float(valid_loss), "lr": float(lr), "seconds": float(seconds),
                          "windows_per_second": float(n_windows / max(seconds, 1e-9))})
    state.epoch += 1


class _Progress:
    """A rich progress bar with the running loss and ETA (a no-op when disabled)."""

    def __init__(self, enabled: bool, epochs: int, steps: int, done_epochs: int):
        self.enabled = enabled and epochs > done_epochs
        self.epochs = epochs
        if not self.enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bar = Progress(TextColumn("[bold]train[/bold] epoch {task.fields[epoch]}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4g}"),
                            TextColumn("valid {task.fields[valid]:.4g}"), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self.task = self.bar.add_task("train", total=(epochs - done_epochs) * steps,
                                      epoch=done_epochs + 1, loss=math.nan, valid=math.nan)
        self.bar.start()

    def step(self, loss: float) -> None:
        if self.enabled:
            self.bar.update(self.task, advance=1, loss=loss)

    def epoch_done(self, state: LoopState) -> None:
        if self.enabled:
            self.bar.update(self.task, epoch=min(state.epoch + 1, self.epochs),
                            valid=state.history[-1]["valid_loss"])

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


# ------------------------------------------------------------------------ the whole run
def train(paths: Sequence[str | Path] | str | Path, out: str | Path, *, cell: str = "gru",
          hidden: Sequence[int] | int = (32,), stream_col: str = "stream", stream_id: str | None = None,
          time_col: str = "ts",
          features: Sequence[str] | None = None, window: int = 32, stride: int = 8,
          batch_size: int = 64, epochs: int = 20, lr: float = 3e-3, clip: float | None = 1.0,
          schedule: str = "cosine", patience: int | None = 5, seed: int = 0, loss: str = "mse",
          scaler: str = "zscore", per_stream_scaler: bool = False, resume: str | Path | None = None,
          report: str | Path | None = None, checkpoint: str | Path | None = None,
          reset_after: bool = True, peephole: bool = False, nonlinearity: str = "tanh",
          valid: float = 0.15, calib: float = 0.15, missing: str = "ffill",
          max_gap_ms: int | None = None, time_delta: bool = False, max_windows: int = 200_000,
          max_rows: int = 20_000_000, target_false_alert_rate: float = 1e-4,
          calibration: str = "pot", restore_best: bool = True, threads: int | None = None,
          progress: bool = False,
          name: str | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train a model on Parquet/CSV history and write it to ``out``.

    Per stream the oldest rows train, the next ``valid`` fraction validates (early stopping)
    and the newest ``calib`` fraction calibrates the thresholds stored in the model: the
    threshold is the score quantile for ``target_false_alert_rate`` false alerts per event
    (default 1e-4, about 0.14 per stream per day at 1-minute sampling; with fewer than a few
    times ``1 / target_false_alert_rate`` calibration events the empirical quantile is near their
    maximum, so ``calibration="pot"``, the default, extrapolates a generalised Pareto tail fitted
    over the 98 % quantile instead; ``"quantile"`` keeps the empirical quantile). The
    scaler is fitted on the training part only. A checkpoint is written after every epoch
    (``checkpoint``, default ``<out>.ckpt.npz``); ``resume`` continues from one. ``report``
    writes a JSON report and a PNG of the loss curves next to it.

    Examples
    --------
    >>> result = train(["history.parquet"], "model.safetensors", cell="lstm", hidden=[32])  # doctest: +SKIP
    >>> result.model.thresholds["threshold"]  # doctest: +SKIP
    """
    hidden_t = (int(hidden),) if np.isscalar(hidden) else tuple(int(h) for h in hidden)
    cfg = TrainConfig(cell=cell, hidden=hidden_t, reset_after=reset_after, peephole=peephole,
                      nonlinearity=nonlinearity, loss=loss, window=int(window), stride=int(stride),
                      batch_size=int(batch_size), epochs=int(epochs), lr=float(lr), clip=clip,
                      schedule=schedule, patience=patience, restore_best=restore_best, seed=int(seed),
                      scaler=scaler, per_stream_scaler=per_stream_scaler, valid=valid, calib=calib,
                      missing=missing, max_gap_ms=max_gap_ms, time_delta=time_delta,
                      max_windows=int(max_windows), max_rows=int(max_rows),
                      target_false_alert_rate=target_false_alert_rate, calibration=calibration)
    cfg.check()
    out = Path(out)
    _check_outputs(out, report, checkpoint, paths)
    if resume is not None and not Path(resume).is_file():
        raise TrainError(f"--resume {resume}: no such checkpoint file")
    log = log or (lambda msg: None)
    compiling = compiling_message("the training and scoring kernels", "2-3 minutes on 2 cores")
    # the caller's thread count comes back, even on an error
    with numba_threads(threads), on_first_compile(lambda: log(compiling)):
        t_start = time.perf_counter()
        prep = prepare(paths, cfg, stream_col, time_col, features, stream_id)
        notes = data_notes(prep.stats)
        if notes:
            log(notes)
        warnings = _check_windows(prep, cfg)
        for w in warnings:
            log(w)
        net = cfg.net(len(prep.features))
        init = Model.random(cell, n_features=net.n_features, hidden=list(net.hidden), seed=cfg.seed,
                            reset_after=reset_after, peephole=peephole, nonlinearity=nonlinearity,
                            head=net.head)
        # calibration does not change the fit, so a checkpoint resumes under either estimator
        untracked = ("epochs", "patience", "calibration")
        fingerprint = {"config": {k: v for k, v in cfg.as_dict().items() if k not in untracked},
                       "features": prep.features, "n_train_windows": int(len(prep.train_windows)),
                       "n_params": int(net.layout[2])}
        ckpt = Path(checkpoint) if checkpoint is not None else out.with_name(out.name + ".ckpt.npz")
        state = fit(net, net.theta(init, np.float64), prep.train_windows, prep.valid_windows, cfg,
                    checkpoint=ckpt, resume=resume, fingerprint=fingerprint, progress=progress)
        theta = state.best_theta if cfg.restore_best and state.best_epoch >= 0 else state.theta
        train_seconds = sum(e["seconds"] for e in state.history)
        summary = _summary(prep, cfg, state, paths, train_seconds)
        fields = dict(feature_names=list(prep.features), name=name or out.name.split(".")[0],
                      training=summary, **prep.scaler.model_fields())
        model = net.model(theta.astype(np.float32), **fields)
        model.thresholds = _calibrate(model, prep, cfg)
        model.save(out)
        log(f"wrote {out}")
        windows_per_s = (len(prep.train_windows) * len(state.history) / train_seconds) if train_seconds else 0.0
        rep = {"model": str(out), "training": summary, "thresholds": model.thresholds,
               "epochs": state.history, "warnings": warnings,
               "seconds_total": time.perf_counter() - t_start}
        report_path = png_path = None
        if report is not None:
            report_path, png_path = write_report(Path(report), rep)
        return TrainResult(model, out, state.history, state.best_epoch + 1, state.best_valid,
                           windows_per_s, rep, report_path, png_path, warnings)


def _check_outputs(out: Path, report: str | Path | None, checkpoint: str | Path | None, paths) -> None:
    """Before reading any data: every file the run writes can be written and replaces no input."""
    from streamrnn.data import check_output_names, check_outputs

    ckpt = Path(checkpoint) if checkpoint is not None else out.with_name(out.name + ".ckpt.npz")
    outputs = {"--out": out, "--checkpoint": ckpt, "--report": report,
               "--report (its PNG)": Path(report).with_suffix(".png") if report is not None else None}
    check_outputs(outputs, paths)
    check_output_names({"--out": out}, "model", "train writes a safetensors model", ".safetensors")
    for flag, p in outputs.items():
        if p is not None and not Path(p).parent.is_dir():
            raise TrainError(f"{flag} {p}: directory {Path(p).parent} does not exist")


@contextmanager
def numba_threads(threads: int | None):
    """Run the block with ``threads`` Numba threads (None: unchanged), then restore the count."""
    if threads is None:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _check_windows(prep: Prepared, cfg: TrainConfig) -> list[str]:
    """Raise when nothing can train; list streams too short to give a single window."""
    need = cfg.window + 1
    if len(prep.train_windows) == 0:
        raise TrainError(f"no training window: every stream's training part has fewer than "
                         f"--window + 1 = {need} rows (streams: {_few(prep.short_streams)}); "
                         f"lower --window or give more history")
    warnings = []
    if prep.short_streams:
        warnings.append(f"{len(prep.short_streams)} stream(s) have fewer than {need} training rows and "
                        f"give no training window: {_few(prep.short_streams)}")
    if len(prep.valid_windows) == 0:
        warnings.append(f"no validation window (validation parts shorter than {need} rows): "
                        f"early stopping watches the training loss")
    return warnings


def _few(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(map(str, items[:n]))
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _summary(prep: Prepared, cfg: TrainConfig, state: LoopState, paths, seconds: float) -> dict[str, Any]:
    import datetime as dt

    st = prep.stats

    def iso(ms):
        return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat()

    return {"data_paths": st["paths"] or [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)],
            "rows": {k: st.get(k) for k in ("rows_read", "rows", "rows_train", "rows_valid", "rows_calib",
                                             "duplicates_dropped", "conflicts_merged", "missing_filled",
                                             "rows_dropped_missing", "gaps_split")},
            "streams": st["streams"], "time_range": {"min_ms": st["time_min"], "max_ms": st["time_max"],
                                                      "min": iso(st["time_min"]), "max": iso(st["time_max"])},
            "features": list(prep.features), "hyper_parameters": cfg.as_dict(),
            "windows": {"train": int(len(prep.train_windows)), "valid": int(len(prep.valid_windows)),
                        "train_offered": st.get("train_windows_offered"),
                        "valid_offered": st.get("valid_windows_offered")},
            "short_streams": len(prep.short_streams),
            "epochs_run": len(state.history), "best_epoch": state.best_epoch + 1,
            "best_valid_loss": None if not math.isfinite(state.best_valid) else float(state.best_valid),
            # without validation windows early stopping (and best_valid_loss) follows the training loss
            "best_loss_on": "validation" if len(prep.valid_windows) else "training",
            "early_stopped": bool(_stopped(state, cfg)), "train_seconds": seconds,
            "loss": cfg.loss, "train_loss": [e["train_loss"] for e in state.history],
            "valid_loss": [e["valid_loss"] for e in state.history]}


def _calibrate(model: Model, prep: Prepared, cfg: TrainConfig) -> dict[str, Any]:
    """Run the model as a stream over all history; thresholds from the calibration part."""
    from streamrnn.scoring import calibrate

    if cfg.calib <= 0:
        return {}
    try:
        # The calibration part's row count bounds its events: keep enough of the highest
        # scores for the empirical quantile of any target rate.
        need = math.ceil(cfg.target_false_alert_rate * prep.stats["rows_calib"]) + 2
        return calibrate(model, calibration_batches(prep.parts),
                         target_false_alert_rate=cfg.target_false_alert_rate,
                         calibration=cfg.calibration, tail_capacity=max(100_000, need))
    except StreamrnnError as exc:
        raise TrainError(f"calibration failed: {exc}") from None


def write_report(path: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write the JSON report at ``path`` and the loss curves as a PNG beside it."""
    text = json.dumps(report, indent=2, default=_jsonable)
    write_whole(path, lambda tmp: tmp.write_text(text))
    png = path.with_suffix(".png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in report["epochs"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, [e["train_loss"] for e in report["epochs"]], marker="o", label="train")
    ax.plot(epochs, [e["valid_loss"] for e in report["epochs"]], marker="o", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{report['training']['loss']} loss (scaled units)")
    ax.set_title(f"streamrnn train: {Path(report['model']).name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        write_whole(png, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path, png


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
