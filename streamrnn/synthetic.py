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
