"""Synthetic benchmark data: labelled anomalies of every type, seeded, time-ordered."""

from __future__ import annotations

import numpy as np

from streamrnn.synthetic import ANOMALY_TYPES, anomaly_fleet, spiky_fleet


def _per_stream(fleet):
    ids = np.array(fleet.stream_ids)
    return {sid: np.flatnonzero(ids == sid) for sid in np.unique(ids)}


def test_anomaly_fleet_is_seeded_time_ordered_and_labels_every_type():
    a = anomaly_fleet(n_streams=21, length=400, anomalies_per_stream=2, seed=3)
    b = anomaly_fleet(n_streams=21, length=400, anomalies_per_stream=2, seed=3)
    assert np.array_equal(a.values, b.values) and a.windows == b.windows
    assert not np.array_equal(a.values, anomaly_fleet(n_streams=21, length=400, seed=4).values)
    assert len(a.stream_ids) == 21 * 400 and np.all(np.diff(a.timestamps) >= 0)
    assert {w.type for w in a.windows} == set(ANOMALY_TYPES)
    assert len(a.windows) == 42
    # History before split_ts is anomaly-free; per-event types agree with the windows.
    assert not a.is_anomaly[a.timestamps < a.split_ts].any()
    ids = np.array(a.stream_ids)
    names = a.type_names()
    marked = np.zeros(len(ids), bool)
    for w in a.windows:
        inside = (ids == w.stream) & (a.timestamps >= w.start_ts) & (a.timestamps <= w.end_ts)
        assert inside.any() and (names[inside] == w.type).all()
        marked |= inside
    assert np.array_equal(marked, a.is_anomaly)
    table = a.labels_table()
    assert table.column_names == ["stream", "start", "end", "type"] and table.num_rows == 42


def test_anomaly_shapes_are_what_their_type_says():
    fleet = anomaly_fleet(n_streams=14, length=600, anomalies_per_stream=1, seed=5)
    ids = np.array(fleet.stream_ids)
    x = fleet.values[:, 0]
    for w in fleet.windows:
        rows = np.flatnonzero(ids == w.stream)
        t = fleet.timestamps[rows]
        inside = rows[(t >= w.start_ts) & (t <= w.end_ts)]
        before = rows[(t < w.start_ts)][-60:]
        noise = np.std(np.diff(x[before])) / np.sqrt(2)
        seg = x[inside]
        if w.type == "flatline":  # the window's last event is where the series moves again
            assert np.all(seg[:-1] == seg[0]) and seg[-1] != seg[0]
        elif w.type == "spike":
            assert len(inside) == 1
            assert abs(seg[0] - x[inside[0] - 1]) > 3 * noise
        elif w.type == "variance_burst":
            assert np.std(np.diff(seg)) > 3 * np.std(np.diff(x[before]))
        elif w.type in ("level_shift", "drift"):
            assert len(inside) >= 20


def test_spiky_fleet_still_marks_spikes():
    fleet = spiky_fleet(n_streams=10, length=100, seed=1)
    assert len(fleet.stream_ids) == 1000 and fleet.is_anomaly.any()
    assert not fleet.is_anomaly.reshape(100, 10)[:10].any()
