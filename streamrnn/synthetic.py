"""Synthetic fleets of metric streams with labelled anomalies, for demos and tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Fleet:
    """Events of many streams, in global time order, with the injected anomalies."""

    stream_ids: list[str]
    timestamps: np.ndarray  # (E,) int64 epoch ms
    values: np.ndarray  # (E, 1)
    is_anomaly: np.ndarray  # (E,) bool


def spiky_fleet(n_streams: int = 500, length: int = 300, spike_rate: float = 0.004,
                start_ms: int = 1_767_225_600_000, step_ms: int = 60_000, seed: int = 0) -> Fleet:
    """Daily-looking sine waves with noise, each stream on its own level and scale, with spikes.

    Spikes (6 to 12 noise standard deviations) are injected at random points after the first
    tenth of each stream, so detectors get some history before the first anomaly.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    level = rng.uniform(10, 1000, n_streams)
    amp = level * rng.uniform(0.05, 0.3, n_streams)
    noise = amp * rng.uniform(0.02, 0.05, n_streams)
    period = rng.uniform(40, 120, n_streams)
    phase = rng.uniform(0, 2 * np.pi, n_streams)
    x = level[:, None] + amp[:, None] * np.sin(2 * np.pi * t / period[:, None] + phase[:, None])
    x += noise[:, None] * rng.standard_normal((n_streams, length))
    spikes = rng.random((n_streams, length)) < spike_rate
    spikes[:, : length // 10] = False
    sign = rng.choice([-1.0, 1.0], (n_streams, length))
    x += spikes * sign * noise[:, None] * rng.uniform(6, 12, (n_streams, length))
    ids = np.array([f"host-{i:05d}/cpu" for i in range(n_streams)])
    # Time-major order: every stream's event at t, then t + 1, as a bus would deliver them.
    order = np.argsort(np.tile(t, n_streams), kind="stable")
    stream_of = np.repeat(np.arange(n_streams), length)[order]
    step_of = np.tile(t, n_streams)[order]
    return Fleet(stream_ids=list(ids[stream_of]), timestamps=start_ms + step_of.astype(np.int64) * step_ms,
                 values=x[stream_of, step_of][:, None], is_anomaly=spikes[stream_of, step_of])


#: Anomaly types of :func:`anomaly_fleet`, with their code in ``LabelledFleet.anomaly_type``
#: (0 = normal, i + 1 = ANOMALY_TYPES[i]).
ANOMALY_TYPES = ("spike", "level_shift", "variance_burst", "frequency_change", "flatline",
                 "drift", "contextual")


@dataclass
class Window:
    """A labelled anomaly: events of ``stream`` with start_ts <= ts <= end_ts."""

    stream: str
    start_ts: int
    end_ts: int
    type: str


@dataclass
class LabelledFleet:
    """Events of many streams in global time order, with labelled anomaly windows."""

    stream_ids: list[str]
    timestamps: np.ndarray  # (E,) int64 epoch ms
    values: np.ndarray  # (E, 1)
    anomaly_type: np.ndarray  # (E,) int8: 0 normal, else 1 + index in ANOMALY_TYPES
    windows: list[Window]
    split_ts: int  # events before this are anomaly-free history (for training)

    @property
    def is_anomaly(self) -> np.ndarray:
        return self.anomaly_type > 0

    def type_names(self) -> np.ndarray:
        """Per-event anomaly type names ("" for normal events)."""
        return np.array(("",) + ANOMALY_TYPES, dtype=object)[self.anomaly_type]

    def labels_table(self):
        """The windows as an Arrow table: stream, start, end (timestamp ms UTC), type."""
        import pyarrow as pa

        ts = pa.timestamp("ms", tz="UTC")
        return pa.table({"stream": pa.array([w.stream for w in self.windows], pa.string()),
                         "start": pa.array([w.start_ts for w in self.windows], ts),
                         "end": pa.array([w.end_ts for w in self.windows], ts),
                         "type": pa.array([w.type for w in self.windows], pa.string())})


def _durations(kind: str, rng) -> int:
    lo, hi = {"spike": (1, 1), "level_shift": (20, 50), "variance_burst": (10, 30),
              "frequency_change": (30, 60), "flatline": (20, 50), "drift": (40, 80),
              "contextual": (6, 15)}[kind]
    return int(rng.integers(lo, hi + 1))


def _place(length: int, start: int, durations: list[int], rng, spacing: int = 30) -> list[int] | None:
    """Random non-overlapping starts in [start, length) with ``spacing`` steps between windows."""
    for _ in range(50):
        starts = np.sort(rng.integers(start, length, len(durations)))
        ends = starts + np.asarray(durations)
        if ends[-1] < length and (len(starts) < 2 or np.all(starts[1:] - ends[:-1] >= spacing)):
            return starts.tolist()
    return None


def anomaly_fleet(n_streams: int = 200, length: int = 1000, anomalies_per_stream: int = 2,
                  history: float = 0.4, types: tuple[str, ...] = ANOMALY_TYPES,
                  start_ms: int = 1_767_225_600_000, step_ms: int = 60_000,
                  seed: int = 0) -> LabelledFleet:
    """Many streams with seasonality, trend, AR(1) noise and regime changes, with labelled
    anomalies of each type in ``types`` (see :data:`ANOMALY_TYPES`).

    Every stream has its own level, scale, period (24–96 steps), trend and noise; at one
    or two random points its seasonal amplitude and noise change by up to 25 % (a normal
    regime change, not labelled). After the first ``history`` fraction of time (anomaly-free,
    for training) each stream gets ``anomalies_per_stream`` anomalies of types drawn in turn
    from ``types``, at least 30 steps apart. Sizes are in units of the stream's noise:

    - spike: one event 6–10 sd off;
    - level_shift: the level moves 5–8 sd and stays (labelled: its first 20–50 steps);
    - variance_burst: noise x5–8 for 10–30 steps; frequency_change: the cycle runs 2–3x
      faster for 30–60 steps; flatline: the value sticks (stuck sensor) for 20–50 steps;
    - drift: a ramp of 6–10 sd over 40–80 steps (labelled), the level reached stays;
    - contextual: for 6–15 steps the cycle is shifted by half a period — values within the
      normal range at the wrong phase.

    Temporary anomalies' windows include the event where the series snaps back.
    """
    unknown = set(types) - set(ANOMALY_TYPES)
    if unknown or not types:
        raise ValueError(f"unknown anomaly types {sorted(unknown)}; known: {ANOMALY_TYPES}")
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)
    split = int(history * length)
    x = np.empty((n_streams, length))
    kind_code = np.zeros((n_streams, length), np.int8)
    windows: list[Window] = []
    ids = [f"node-{i:05d}/metric" for i in range(n_streams)]
    type_cycle = [types[(i + j) % len(types)] for i in range(n_streams) for j in range(anomalies_per_stream)]
    for i in range(n_streams):
        level = rng.uniform(10, 1000)
        noise_sd = level * rng.uniform(0.005, 0.02)
        amp = noise_sd * rng.uniform(6, 15)
        period = rng.uniform(24, 96)
        trend = noise_sd * rng.uniform(-2, 2) / length
        phi = rng.uniform(0.0, 0.5)
        amp_t = np.full(length, amp)
        sd_t = np.full(length, noise_sd)
        for cp in rng.integers(0, length, rng.integers(1, 3)):
            amp_t[cp:] *= rng.uniform(0.8, 1.25)
            sd_t[cp:] *= rng.uniform(0.8, 1.25)
        freq = np.full(length, 2 * np.pi / period)
        offset = np.zeros(length)
        kinds = type_cycle[i * anomalies_per_stream:(i + 1) * anomalies_per_stream]
        rng.shuffle(kinds)
        durs = [_durations(k, rng) for k in kinds]
        starts = _place(length, max(split, 1), durs, rng) or []
        flat = []
        for kind, a, dur in zip(kinds, starts, durs):
            b = a + dur
            kind_code[i, a:b] = ANOMALY_TYPES.index(kind) + 1
            sign = rng.choice([-1.0, 1.0])
            if kind == "spike":
                offset[a] += sign * noise_sd * rng.uniform(6, 10)
            elif kind == "level_shift":
                offset[a:] += sign * noise_sd * rng.uniform(5, 8)  # stays: a new normal
            elif kind == "variance_burst":
                sd_t[a:b] *= rng.uniform(5, 8)
            elif kind == "frequency_change":
                freq[a:b] *= rng.uniform(2, 3)
            elif kind == "drift":
                ramp = sign * noise_sd * rng.uniform(6, 10)
                offset[a:b] += ramp * np.linspace(0, 1, dur)
                offset[b:] += ramp  # the level reached stays
            elif kind == "contextual":
                offset[a:b] += np.nan  # marker: filled after the phase is known
            elif kind == "flatline":
                flat.append((a, b))
            if kind in ("variance_burst", "frequency_change", "flatline", "contextual") and b < length:
                b += 1  # the event where the series snaps back belongs to the anomaly
                kind_code[i, b - 1] = kind_code[i, a]
            windows.append(Window(ids[i], start_ms + a * step_ms, start_ms + (b - 1) * step_ms, kind))
        phase = np.cumsum(freq) + rng.uniform(0, 2 * np.pi)
        ctx = np.isnan(offset)
        phase[ctx] += np.pi  # the other half of the cycle: a normal value at the wrong time
        offset[ctx] = 0.0
        eps = rng.standard_normal(length) * sd_t
        ar = np.empty(length)
        acc = 0.0
        for k in range(length):
            acc = phi * acc + np.sqrt(1 - phi * phi) * eps[k]
            ar[k] = acc
        xi = level + trend * t + amp_t * np.sin(phase) + ar + offset
        for a, b in flat:
            xi[a:b] = xi[a - 1] if a > 0 else xi[a]
        x[i] = xi
    order = np.argsort(np.tile(np.arange(length), n_streams), kind="stable")
    stream_of = np.repeat(np.arange(n_streams), length)[order]
    step_of = np.tile(np.arange(length), n_streams)[order]
    windows.sort(key=lambda w: (w.start_ts, w.stream))
    return LabelledFleet(stream_ids=[ids[s] for s in stream_of],
                         timestamps=start_ms + step_of.astype(np.int64) * step_ms,
                         values=x[stream_of, step_of][:, None],
                         anomaly_type=kind_code[stream_of, step_of], windows=windows,
                         split_ts=start_ms + split * step_ms)
