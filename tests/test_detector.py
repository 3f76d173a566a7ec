"""The Detector contract: streaming equals batch, interleaving and batching never change a
stream's numbers, and a snapshot restored elsewhere continues exactly."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrnn import Model
from streamrnn.detector import Detector
from streamrnn.errors import StreamrnnError

CELLS = [
    {"cell": "gru"},
    {"cell": "gru", "reset_after": False},
    {"cell": "lstm"},
    {"cell": "lstm", "peephole": True},
    {"cell": "rnn"},
]


def _streams(n_streams, length, d, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    return {f"s{i}": (np.sin(t[:, None] / (3 + i) + rng.uniform(0, 6, d)) * (1 + i)
                      + rng.normal(0, 0.1, (length, d))).astype(np.float32)
            for i in range(n_streams)}


def _interleave(streams, rng):
    """A random global arrival order that keeps each stream's own order."""
    order = np.concatenate([[sid] * len(x) for sid, x in streams.items()])
    rng.shuffle(order)
    pos = {sid: 0 for sid in streams}
    ids, vals, ts = [], [], []
    for sid in order:
        k = pos[sid]
        ids.append(str(sid))
        vals.append(streams[sid][k])
        ts.append(1_700_000_000_000 + 1000 * k)
        pos[sid] = k + 1
    return ids, np.array(vals), np.array(ts, np.int64)


def _run(det, ids, vals, ts, cuts):
    """Feed events in micro-batches split at ``cuts``; collect per-stream outputs in order."""
    out = {}
    bounds = [0, *sorted(cuts), len(ids)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        res = det.process(ids[a:b], vals[a:b], ts[a:b])
        for i, sid in enumerate(ids[a:b]):
            out.setdefault(sid, []).append((res.prediction[i], res.error[i], res.score[i]))
    return {sid: tuple(np.array(v) for v in zip(*rows)) for sid, rows in out.items()}


@pytest.mark.parametrize("options", CELLS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_process_interleaved_streams_equals_predict_bit_for_bit(options):
    model = Model.random(n_features=2, hidden=[16, 8], seed=1, **options)
    streams = _streams(50, 40, 2, seed=2)
    rng = np.random.default_rng(3)
    ids, vals, ts = _interleave(streams, rng)
    cuts = rng.choice(len(ids), size=30, replace=False)
    got = _run(Detector(model), ids, vals, ts, cuts)
    for sid, x in streams.items():
        preds = got[sid][0]
        assert np.isnan(preds[0]).all()
        assert np.array_equal(preds[1:], model.predict(x)[:-1]), sid


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_cuts=st.integers(0, 40))
def test_process_any_interleaving_and_batching_gives_same_outputs(seed, n_cuts):
    model = Model.random("lstm", n_features=1, hidden=[8], seed=7)
    streams = _streams(8, 12, 1, seed=8)
    reference = _run(Detector(model), *_interleave(streams, np.random.default_rng(0)), cuts=[])
    rng = np.random.default_rng(seed)
    ids, vals, ts = _interleave(streams, rng)
    got = _run(Detector(model), ids, vals, ts, rng.integers(0, len(ids), n_cuts))
    for sid in streams:
        for a, b in zip(got[sid], reference[sid]):
            assert np.array_equal(a, b, equal_nan=True)


def test_process_skips_non_finite_values_without_touching_state():
    model = Model.random("gru", n_features=1, hidden=[8], seed=9)
    x = np.sin(np.arange(30) / 4)[:, None]
    det_gap = Detector(model)
    out_gap = []
    for k in range(30):
        out_gap.append(det_gap.process(["a"], x[k:k + 1], [k]).prediction[0, 0])
        if k == 10:
            res = det_gap.process(["a"], [[np.nan]], [k])
            assert np.isnan(res.score[0]) and not res.alert[0]
    det = Detector(model)
    out = [det.process(["a"], x[k:k + 1], [k]).prediction[0, 0] for k in range(30)]
    assert np.array_equal(out_gap, out, equal_nan=True)
    assert det_gap.counters["missing"] == 1
    assert det.counters["missing"] == 0


def test_process_spike_after_warmup_alerts_and_not_during_warmup():
    model = Model.random("gru", n_features=1, hidden=[8], seed=10)
    det = Detector(model, warmup=20, threshold=0.6)
    x = 0.01 * np.random.default_rng(0).standard_normal(200)
    x[5] = 50.0  # inside warm-up
    x[150] = 50.0
    alerts = [det.process(["a"], [[v]], [k]).alert[0] for k, v in enumerate(x)]
    assert alerts[150] and not alerts[5]
    assert sum(alerts) <= 4  # the spike, then close_after (3) quiet events, the last outside


def test_process_bad_input_raises_clear_errors():
    det = Detector(Model.random("gru", n_features=2, hidden=[8]))
    with pytest.raises(ValueError, match=r"shape \(events, 2\)"):
        det.process(["a"], np.zeros((1, 3)), [0])
    with pytest.raises(ValueError, match="one entry per event"):
        det.process(["a", "b"], np.zeros((1, 2)), [0])
    with pytest.raises(ValueError, match="epoch milliseconds"):
        det.process(["a"], np.zeros((1, 2)), [0.5])


def test_to_arrow_has_one_row_per_event_with_named_columns():
    model = Model.random("gru", n_features=2, hidden=[8], feature_names=["cpu", "mem"])
    res = Detector(model).process(["a", "b", "a"], np.ones((3, 2)), [1, 2, 3])
    table = res.to_arrow()
    assert table.num_rows == 3
    assert table.column_names == ["stream", "ts", "cpu", "mem", "pred_cpu", "pred_mem", "error", "score", "alert"]
    assert table.column("pred_cpu").null_count == 0 and np.isnan(table.column("pred_cpu")[0].as_py())


_CONTINUE = textwrap.dedent("""
    import sys, numpy as np
    from streamrnn import Model
    from streamrnn.detector import Detector
    model = Model.load(sys.argv[1])
    det = Detector.restore(model, open(sys.argv[2], 'rb').read())
    data = np.load(sys.argv[3])
    ids = [str(s) for s in data['ids']]
    res = det.process(ids, data['vals'], data['ts'])
    np.savez(sys.argv[4], pred=res.prediction, score=res.score, error=res.error)
""")


def test_snapshot_restored_in_another_process_continues_identically(tmp_path):
    model = Model.random("lstm", n_features=2, hidden=[16, 16], seed=11, peephole=True)
    model_path = model.save(tmp_path / "m.safetensors")
    streams = _streams(20, 30, 2, seed=12)
    ids, vals, ts = _interleave(streams, np.random.default_rng(13))
    half = len(ids) // 2
    straight = Detector(model)
    straight.process(ids[:half], vals[:half], ts[:half])
    expected = straight.process(ids[half:], vals[half:], ts[half:])

    first = Detector(model)
    first.process(ids[:half], vals[:half], ts[:half])
    (tmp_path / "snap.arrow").write_bytes(first.snapshot())
    np.savez(tmp_path / "rest.npz", ids=np.array(ids[half:]), vals=vals[half:], ts=ts[half:])
    subprocess.run([sys.executable, "-c", _CONTINUE, str(model_path), str(tmp_path / "snap.arrow"),
                    str(tmp_path / "rest.npz"), str(tmp_path / "out.npz")], check=True)
    got = np.load(tmp_path / "out.npz")
    assert np.array_equal(got["pred"], expected.prediction, equal_nan=True)
    assert np.array_equal(got["score"], expected.score, equal_nan=True)
    assert np.array_equal(got["error"], expected.error, equal_nan=True)


# ---------------------------------------------------------------- awkward data and decisions
def _awkward(n_streams, length, seed):
    """Per-stream events with NaNs, a late event, a long gap, replayed offsets, a repeated
    timestamp and a spike."""
    rng = np.random.default_rng(seed)
    events = {}
    for i in range(n_streams):
        x = np.sin(np.arange(length) / (3 + i)) + rng.normal(0, 0.05, length)
        ts = 1_700_000_000_000 + 1000 * np.arange(length, dtype=np.int64)
        ts[length // 2:] += 60_000  # a gap
        off = np.arange(length, dtype=np.int64) + 10 * i
        x[rng.integers(1, length, 2)] = np.nan
        x[rng.integers(length // 3, length)] += 8.0
        late = int(rng.integers(2, length))
        ts[late] = ts[late - 2] - 1  # older than the event before it
        rep = int(rng.integers(3, length))
        off[rep] = off[rep - 2]  # a replayed offset
        ts[4 + 3 * i] = ts[3 + 3 * i]  # the previous event's timestamp again
        events[f"s{i}"] = [(x[k], ts[k], off[k]) for k in range(length)]
    return events


def _interleave_events(events, rng):
    order = np.concatenate([[sid] * len(v) for sid, v in events.items()])
    rng.shuffle(order)
    pos = {sid: 0 for sid in events}
    ids, vals, ts, off = [], [], [], []
    for sid in order:
        x, t, o = events[sid][pos[sid]]
        pos[sid] += 1
        ids.append(str(sid))
        vals.append([x])
        ts.append(t)
        off.append(o)
    return ids, np.array(vals), np.array(ts, np.int64), np.array(off, np.int64)


_AWKWARD_CFG = dict(threshold=0.3, warmup=3, max_gap_ms=30_000, dynamic=True, dynamic_window=8,
                    dynamic_refresh=2, close_after=2)


def _per_stream(det, ids, vals, ts, off, cuts):
    rows, alerts = {}, {}
    bounds = [0, *sorted(set(int(c) for c in cuts)), len(ids)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        res = det.process(ids[a:b], vals[a:b], ts[a:b], off[a:b])
        for i, sid in enumerate(ids[a:b]):
            rows.setdefault(sid, []).append((res.prediction[i, 0], res.error[i], res.score[i],
                                             res.alert[i], res.applied[i]))
        for al in res.alerts:
            alerts.setdefault(al.stream, []).append(al)
    return rows, alerts, det.counters


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_cuts=st.integers(0, 30))
def test_awkward_data_and_alerts_do_not_depend_on_batching(seed, n_cuts):
    model = Model.random("gru", n_features=1, hidden=[8], seed=21)
    events = _awkward(6, 30, seed=22)
    ref = _per_stream(Detector(model, **_AWKWARD_CFG),
                      *_interleave_events(events, np.random.default_rng(0)), cuts=[])
    rng = np.random.default_rng(seed)
    ids, vals, ts, off = _interleave_events(events, rng)
    got = _per_stream(Detector(model, **_AWKWARD_CFG), ids, vals, ts, off,
                      rng.integers(0, len(ids), n_cuts))
    for sid in events:
        assert np.array_equal(np.array(got[0][sid], float), np.array(ref[0][sid], float), equal_nan=True)
        assert got[1].get(sid) == ref[1].get(sid)
    assert got[2] == ref[2]
    c = ref[2]
    assert c["missing"] == 12 and c["late_dropped"] >= 1 and c["replay_skipped"] >= 1 and c["same_ts_dropped"] >= 1
    assert c["gap_resets"] == 6 and c["cold_starts"] == 6 and c["alerts_opened"] >= 1
    assert c["events"] == 180


def test_offsets_already_applied_are_skipped():
    model = Model.random("gru", n_features=1, hidden=[8], seed=23)
    streams = _streams(4, 20, 1, seed=24)
    ids, vals, ts = _interleave(streams, np.random.default_rng(25))
    off = np.arange(len(ids), dtype=np.int64)
    straight = Detector(model)
    straight.process(ids[:40], vals[:40], ts[:40], off[:40])
    expected = straight.process(ids[40:], vals[40:], ts[40:], off[40:])
    crashed = Detector(model)
    crashed.process(ids[:40], vals[:40], ts[:40], off[:40])
    again = crashed.process(ids[:50], vals[:50], ts[:50], off[:50])  # redelivered from offset 0
    assert not again.applied[:40].any() and again.applied[40:].all()
    assert np.isnan(again.score[:40]).all()
    assert crashed.counters["replay_skipped"] == 40
    rest = crashed.process(ids[50:], vals[50:], ts[50:], off[50:])
    assert np.array_equal(np.r_[again.prediction[40:], rest.prediction], expected.prediction, equal_nan=True)
    assert np.array_equal(np.r_[again.score[40:], rest.score], expected.score, equal_nan=True)
    table = crashed.table
    assert max(table.column("last_offset")[table.lookup(list(streams))]) == off[-1]


def test_out_of_order_events_dropped_or_accepted():
    model = Model.random("gru", n_features=1, hidden=[8], seed=26)
    x = np.array([[0.1], [0.2], [0.3], [0.4], [0.5]])
    ts = np.array([1000, 2000, 3000, 2500, 4000])
    det = Detector(model)
    out = det.process(["a"] * 5, x, ts)
    assert out.applied.tolist() == [True, True, True, False, True]
    assert det.counters["late_dropped"] == 1
    clean = Detector(model).process(["a"] * 4, x[[0, 1, 2, 4]], ts[[0, 1, 2, 4]])
    assert np.array_equal(out.prediction[[0, 1, 2, 4]], clean.prediction, equal_nan=True)
    acc = Detector(model, out_of_order="accept")
    assert acc.process(["a"] * 5, x, ts).applied.all() and acc.counters["late_dropped"] == 0
    assert np.array_equal(acc.process(["a"], [[0.6]], [5000]).prediction,
                          Detector(model).process(["a"] * 6, np.r_[x, [[0.6]]], np.r_[ts[:3], 3500, 4000, 5000]).prediction[-1:])


def test_event_at_the_streams_last_timestamp_is_dropped_and_counted():
    model = Model.random("gru", n_features=1, hidden=[8], seed=26)
    x = np.array([[0.1], [0.2], [0.9], [0.3], [0.3], [0.4]])
    ts = np.array([1000, 2000, 2000, 3000, 3000, 4000])
    det = Detector(model, warmup=0)
    out = det.process(["a"] * 6, x, ts)
    assert out.applied.tolist() == [True, True, False, True, False, True]
    assert np.isnan(out.score[[2, 4]]).all() and det.counters["same_ts_dropped"] == 2
    # The first value of an instant stands: as if only the distinct timestamps had come.
    once = Detector(model, warmup=0).process(["a"] * 4, x[[0, 1, 3, 5]], ts[[0, 1, 3, 5]])
    for name in ("prediction", "error", "score"):
        assert np.array_equal(getattr(out, name)[[0, 1, 3, 5]], getattr(once, name), equal_nan=True), name
    # "apply" steps on each, as events at distinct timestamps would (no max_gap_ms: ts unused).
    both = Detector(model, warmup=0, same_timestamp="apply")
    got = both.process(["a"] * 6, x, ts)
    apart = Detector(model, warmup=0).process(["a"] * 6, x, ts + np.arange(6))
    assert got.applied.all() and both.counters["same_ts_dropped"] == 0
    for name in ("prediction", "error", "score"):
        assert np.array_equal(getattr(got, name), getattr(apart, name), equal_nan=True), name


def test_same_timestamp_rule_beside_missing_values_late_events_and_offsets():
    model = Model.random("gru", n_features=1, hidden=[8], seed=26)
    # A missing value does not take its instant: the finite one after it at that ts applies.
    det = Detector(model)
    out = det.process(["a"] * 3, np.array([[0.1], [np.nan], [0.2]]), np.array([1000, 2000, 2000]))
    assert out.applied.tolist() == [True, False, True] and det.counters["same_ts_dropped"] == 0
    # Out of order accepted: an older ts applies, the last applied one (the latest) does not.
    acc = Detector(model, out_of_order="accept")
    out = acc.process(["a"] * 4, np.array([[0.1], [0.2], [0.3], [0.4]]), np.array([1000, 3000, 2000, 3000]))
    assert out.applied.tolist() == [True, True, True, False] and acc.counters["same_ts_dropped"] == 1
    # Redelivered offsets stay replay_skipped; a retried message under a new offset is a
    # same-timestamp event; across micro-batches alike.
    det = Detector(model)
    det.process(["a", "a"], np.array([[0.1], [0.2]]), np.array([1000, 2000]), np.array([5, 6]))
    again = det.process(["a"] * 4, np.array([[0.1], [0.2], [0.2], [0.3]]),
                        np.array([1000, 2000, 2000, 3000]), np.array([5, 6, 7, 8]))
    assert again.applied.tolist() == [False, False, False, True]
    assert det.counters["replay_skipped"] == 2 and det.counters["same_ts_dropped"] == 1
    assert det.table.column("last_offset")[det.table.lookup(["a"])[0]] == 8


@pytest.mark.parametrize("n_streams", [1, 500])
def test_scaled_inputs_round_as_the_trainers(n_streams):
    """The network gets training's float32 inputs bit for bit: (x - mean) / scale in float64,
    rounded once to float32 (fastmath's reciprocal, were it used, is one float64 bit off for a
    quarter of values, which that rounding hides for all but ~1e-9 of them). Read back through
    the repeat term's copy of each stream's last scaled input."""
    rng = np.random.default_rng(n_streams)
    model = Model.random("gru", n_features=3, hidden=[4], seed=28)
    model.scaler_mean[:] = rng.normal(size=3) * 10.0 ** rng.uniform(-3, 3, 3)
    model.scaler_scale[:] = 10.0 ** rng.uniform(-3, 3, 3) * rng.uniform(0.5, 2.0, 3)
    det = Detector(model, method="normalised")
    ids = [f"s{i}" for i in range(n_streams)]
    for step in range(200 // n_streams + 1):
        x = model.scaler_mean + model.scaler_scale * rng.normal(0, 3, (n_streams, 3))
        det.process(ids, x, np.full(n_streams, 1000 * step))
        got = det.table.column("x_last")[det.table.lookup(ids)]
        assert np.array_equal(got, model.scale(x).astype(np.float64))


def test_gap_reset_starts_the_stream_afresh_and_decay_shrinks_the_state():
    model = Model.random("gru", n_features=1, hidden=[8], seed=27)
    x = np.sin(np.arange(20) / 3.0)[:, None]
    ts = np.r_[np.arange(10) * 1000, 100_000 + np.arange(10) * 1000]
    det = Detector(model, max_gap_ms=10_000)
    out = det.process(["a"] * 20, x, ts)
    assert det.counters["gap_resets"] == 1
    assert np.isnan(out.prediction[10]).all() and np.isnan(out.score[10]) and out.applied[10]
    fresh = Detector(model).process(["b"] * 10, x[10:], ts[10:])
    assert np.array_equal(out.prediction[10:], fresh.prediction, equal_nan=True)

    dec = Detector(model, max_gap_ms=10_000, gap_policy="decay")
    dec.process(["a"] * 10, x[:10], ts[:10])
    slot = dec.table.slot_of("a")
    decayed = dec.table.column("state")[slot] * np.float32(0.5 ** ((ts[10] - ts[9]) / 10_000))
    ref = Detector(model)
    ref.process(["a"], x[9:10], [ts[10] - 1])
    rslot = ref.table.slot_of("a")
    ref.table.column("state")[rslot] = decayed
    got = dec.process(["a"] * 10, x[10:], ts[10:])
    want = ref.process(["a"] * 10, x[10:], ts[10:])
    assert np.isnan(got.score[0]) and dec.counters["gap_resets"] == 1
    assert np.array_equal(got.prediction[1:], want.prediction[1:])


def test_cold_start_per_new_stream_and_pyarrow_ids():
    import pyarrow as pa

    model = Model.random("gru", n_features=1, hidden=[8], seed=28)
    det = Detector(model)
    out = det.process(pa.array(["a", "b", "a", "c", "a"]), np.ones((5, 1)), [0, 0, 1000, 0, 2000])
    # A new stream has no prediction; its second event has no error statistics yet.
    assert det.counters["cold_starts"] == 3 and det.counters["scored"] == 1
    assert np.isnan(out.score[:4]).all() and np.isfinite(out.score[4])
    assert np.isnan(out.prediction[[0, 1, 3]]).all() and np.isfinite(out.prediction[[2, 4]]).all()
    assert out.to_arrow().column("stream").to_pylist() == ["a", "b", "a", "c", "a"]


def test_learn_during_alert_false_steps_on_own_prediction():
    model = Model.random("gru", n_features=1, hidden=[8], seed=29)
    x = 0.05 * np.sin(np.arange(80) / 4.0)
    x[50:53] = 5.0
    ts = np.arange(80) * 1000
    det = Detector(model, threshold=0.5, warmup=10)
    out = det.process(["a"] * 80, x[:, None], ts)
    inside = np.flatnonzero(out.alert & (out.score >= det.lower_threshold))
    assert 50 in inside and out.alerts[0].kind == "open"
    # The same stream fed its own predictions at the episode's anomalous points.
    y = x.copy()
    y[inside] = out.prediction[inside, 0]
    ref = Detector(model, threshold=1.0).process(["a"] * 80, y[:, None], ts)
    assert np.array_equal(out.prediction, ref.prediction, equal_nan=True)
    learnt = Detector(model, threshold=0.5, warmup=10, learn_during_alert=True).process(["a"] * 80, x[:, None], ts)
    plain = Detector(model, threshold=1.0).process(["a"] * 80, x[:, None], ts)
    assert np.array_equal(learnt.prediction, plain.prediction, equal_nan=True)
    assert not np.array_equal(out.prediction[51:], plain.prediction[51:])


def test_snapshot_mid_episode_continues_identically():
    model = Model.random("gru", n_features=1, hidden=[8], seed=30)
    events = _awkward(5, 40, seed=31)
    ids, vals, ts, off = _interleave_events(events, np.random.default_rng(32))
    cfg = dict(_AWKWARD_CFG, close_after=20)
    straight = Detector(model, **cfg)
    res = [straight.process(ids[a:a + 50], vals[a:a + 50], ts[a:a + 50], off[a:a + 50]) for a in range(0, 200, 50)]
    first = Detector(model, **cfg)
    for a in range(0, 100, 50):
        first.process(ids[a:a + 50], vals[a:a + 50], ts[a:a + 50], off[a:a + 50])
    assert first.open_alerts(), "the test needs an episode open at the snapshot"
    second = Detector.restore(model, first.snapshot(), **cfg)
    assert second.open_alerts() == first.open_alerts()
    for k, a in enumerate(range(100, 200, 50)):
        got = second.process(ids[a:a + 50], vals[a:a + 50], ts[a:a + 50], off[a:a + 50])
        want = res[2 + k]
        for name in ("prediction", "error", "score", "alert", "applied"):
            assert np.array_equal(getattr(got, name), getattr(want, name), equal_nan=True), name
        assert got.alerts == want.alerts


def test_restore_with_mismatched_dynamic_window_is_a_clear_error():
    model = Model.random("gru", n_features=1, hidden=[8], seed=33)
    det = Detector(model, dynamic=True, dynamic_window=8)
    det.process(["a"], [[1.0]], [0])
    with pytest.raises(ValueError, match="dyn_buf.*dynamic_window"):
        Detector.restore(model, det.snapshot())


def test_per_stream_scaler_is_copied_at_first_sight():
    base = Model.random("gru", n_features=1, hidden=[8], seed=34)
    kw = dict(cell="gru", layers=base.layers, head_weight=base.head_weight, head_bias=base.head_bias)
    model = Model(**kw, stream_scaler={"streams": ["big"], "mean": [[100.0]], "scale": [[8.0]]})
    big_only = Model(**kw, scaler_mean=[100.0], scaler_scale=[8.0])
    x = 100 + 8 * np.sin(np.arange(30) / 3.0)[:, None]
    det = Detector(model, fit_scaler_events=0)  # "small" takes the global scaler
    out = det.process(["big", "small"] * 30, np.repeat(x, 2, axis=0), np.repeat(np.arange(30) * 1000, 2))
    want_big = Detector(big_only).process(["big"] * 30, x, np.arange(30) * 1000)
    want_small = Detector(base).process(["small"] * 30, x, np.arange(30) * 1000)
    assert np.array_equal(out.prediction[0::2], want_big.prediction, equal_nan=True)
    assert np.array_equal(out.prediction[1::2], want_small.prediction, equal_nan=True)
    # The "small" stream (global scaler) sees values 100x outside training: scale drift.
    assert det.drifted_streams() == ["small"] and det.counters["scale_drift"] == 1


def _fitting_case(n_fit=10, length=40):
    """A per-stream-scaled model that knows stream "big" only, and the events of "big" and of
    an unseen stream "new" (level 50, its own scale) interleaved."""
    base = Model.random("gru", n_features=2, hidden=[8], seed=35)
    model = Model(cell="gru", layers=base.layers, head_weight=base.head_weight, head_bias=base.head_bias,
                  scaler_mean=[500.0, -3.0], scaler_scale=[290.0, 40.0],
                  stream_scaler={"streams": ["big"], "mean": [[900.0, 1.0]], "scale": [[20.0, 2.0]]})
    rng = np.random.default_rng(36)
    t = np.arange(length)[:, None]
    new = 50 + np.array([3.0, 0.5]) * np.sin(t / 4.0 + np.array([0.0, 1.0])) + rng.normal(0, 0.2, (length, 2))
    big = 900 + 20 * np.sin(t / 5.0) + rng.normal(0, 1.0, (length, 2))
    ids = ["new", "big"] * length
    x = np.stack([new, big], axis=1).reshape(-1, 2)
    ts = np.repeat(1000 * t[:, 0], 2)
    return model, new, ids, x, ts


def test_unseen_stream_of_a_per_stream_model_fits_its_own_scaler():
    n_fit = 10
    model, new, ids, x, ts = _fitting_case(n_fit)
    det = Detector(model, fit_scaler_events=n_fit)
    out = det.process(ids, x, ts)
    got = slice(0, None, 2)  # the "new" stream's events
    # Its first n_fit - 1 events only fit the scaler: not applied, not scored, no prediction.
    assert not out.applied[got][: n_fit - 1].any() and out.applied[got][n_fit - 1:].all()
    assert np.isnan(out.score[got][:n_fit]).all() and np.isnan(out.prediction[got][:n_fit]).all()
    assert det.counters["scaler_fitting"] == n_fit - 1
    # Its scaler is the trainer's z-score of those n_fit events (population sd).
    slot = det.table.lookup(["new"])
    np.testing.assert_allclose(det.table.column("x_mean")[slot][0], new[:n_fit].mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(det.table.column("x_scale")[slot][0], new[:n_fit].std(axis=0), rtol=1e-12)
    assert np.isnan(det.table.column("x_fit")[slot]).all()  # the fit is over
    # From its n_fit-th event on it is exactly a new stream under that scaler.
    fitted = Model(cell="gru", layers=model.layers, head_weight=model.head_weight, head_bias=model.head_bias,
                   scaler_mean=det.table.column("x_mean")[slot][0], scaler_scale=det.table.column("x_scale")[slot][0])
    want = Detector(fitted).process(["new"] * (len(new) - n_fit + 1), new[n_fit - 1:], ts[got][n_fit - 1:])
    np.testing.assert_array_equal(out.prediction[got][n_fit - 1:], want.prediction)
    np.testing.assert_array_equal(out.score[got][n_fit - 1:], want.score)
    # The known stream keeps its own scaler from its first event.
    assert out.applied[1::2].all()
    np.testing.assert_array_equal(det.table.column("x_mean")[det.table.lookup(["big"])][0], [900.0, 1.0])


@pytest.mark.parametrize("cuts", [[1, 7, 8, 19, 33], [3], list(range(1, 80, 2))])
def test_scaler_fit_does_not_depend_on_batching_and_survives_a_snapshot(cuts):
    model, _new, ids, x, ts = _fitting_case()
    whole = Detector(model, fit_scaler_events=10).process(ids, x, ts)
    det = Detector(model, fit_scaler_events=10)
    bounds = [0, *cuts, len(ids)]
    pred, score = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        # A snapshot restored between every batch: a fit in progress carries over.
        det = Detector.restore(model, det.snapshot(), fit_scaler_events=10)
        res = det.process(ids[a:b], x[a:b], ts[a:b])
        pred.append(res.prediction)
        score.append(res.score)
    np.testing.assert_array_equal(np.concatenate(pred), whole.prediction)
    np.testing.assert_array_equal(np.concatenate(score), whole.score)


def test_scaler_fit_off_or_without_stream_scalers_uses_the_global_scaler():
    from streamrnn.scoring import ScoringConfigError

    model, _new, ids, x, ts = _fitting_case()
    det = Detector(model, fit_scaler_events=0)
    assert det.process(ids, x, ts).applied.all() and det.counters["scaler_fitting"] == 0
    np.testing.assert_array_equal(det.table.column("x_mean")[det.table.lookup(["new"])][0], model.scaler_mean)
    # A model with one scaler for all streams never fits one: the global scaler is its own.
    plain = Model(cell="gru", layers=model.layers, head_weight=model.head_weight, head_bias=model.head_bias,
                  scaler_mean=model.scaler_mean, scaler_scale=model.scaler_scale)
    det = Detector(plain, fit_scaler_events=10)
    assert det.process(ids, x, ts).applied.all() and det.counters["scaler_fitting"] == 0
    assert "x_fit" not in det.table.columns  # nor pays a column's memory for it
    with pytest.raises(ScoringConfigError, match="fit_scaler_events"):
        Detector(model, fit_scaler_events=-1)


def test_reorder_buffer_lets_late_events_through_in_order():
    from streamrnn.reorder import ReorderBuffer

    model = Model.random("gru", n_features=1, hidden=[8], seed=35)
    ts = np.array([0, 1000, 3000, 2000, 4000, 6000, 5000, 7000], np.int64)
    x = (ts / 1000.0)[:, None]
    buf = ReorderBuffer(allowed_lateness_ms=1500)
    det = Detector(model)
    outs = []
    for a in range(0, 8, 3):
        ids, v, t, o = buf.push(["a"] * len(ts[a:a + 3]), x[a:a + 3], ts[a:a + 3])
        assert o is None
        if len(ids):
            outs.append(det.process(ids, v, t))
    ids, v, t, _ = buf.flush()
    outs.append(det.process(ids, v, t))
    released = np.concatenate([o.timestamps for o in outs])
    assert released.tolist() == sorted(ts.tolist()) and det.counters["late_dropped"] == 0
    assert len(buf) == 0
    straight = Detector(model).process(["a"] * 8, x[np.argsort(ts)], np.sort(ts))
    assert np.array_equal(np.concatenate([o.prediction for o in outs]), straight.prediction, equal_nan=True)
    too_late = ReorderBuffer(allowed_lateness_ms=0)
    too_late.push(["a"], [[1.0]], [5000])
    too_late.push(["a"], [[1.0]], [1000])
    assert too_late.released_late == 1
    with pytest.raises(ValueError, match="offsets"):
        too_late.push(["a"], [[1.0]], [6000], offsets=[3])


def _older_snapshot(det: Detector, dropped=("x_lo", "x_hi")) -> bytes:
    """The detector's state as a version before ``dropped`` existed would have written it."""
    from streamrnn.state import StreamTable

    table = StreamTable.restore(det.snapshot())
    for name in dropped:  # the table as it was before these columns were added
        del table._specs[name], table._cols[name]
    return table.snapshot()


def test_restore_snapshot_without_range_columns_upgrades_and_keeps_range_term_off():
    # A ramp that alerts only through the range term (the stored value range), which a
    # snapshot from before that term lacks: restored streams carry on with the term off,
    # exactly as a detector with range_alpha = 0 does; new streams get it.
    layer = {"w_ih": np.array([[0.01]]), "w_hh": np.zeros((1, 1)), "b_ih": np.zeros(1), "b_hh": np.zeros(1)}
    model = Model(cell="rnn", layers=[layer], head_weight=np.array([[100.0]]), head_bias=np.zeros(1))
    rng = np.random.default_rng(14)
    x = rng.normal(0.0, 1.0, 450)
    x[300:] += np.linspace(0.0, 15.0, 150)
    ts = 1000 * np.arange(450, dtype=np.int64)

    def run(det, sid, lo, hi):
        return det.process([sid] * (hi - lo), x[lo:hi, None], ts[lo:hi])

    first = Detector(model, threshold=0.5)
    run(first, "old", 0, 250)
    upgraded = Detector.restore(model, _older_snapshot(first), threshold=0.5)
    off = Detector(model, threshold=0.5, range_alpha=0.0)
    run(off, "old", 0, 250)
    a, b = run(upgraded, "old", 250, 450), run(off, "old", 250, 450)
    np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(a.alert, b.alert)
    assert np.isfinite(a.score).all() and not a.alert.any()
    # A stream new to the upgraded detector learns its range and is flagged on the ramp.
    assert run(upgraded, "new", 0, 450).alert.any()
    # The upgraded state snapshots with the new columns and restores as usual.
    again = Detector.restore(model, upgraded.snapshot(), threshold=0.5)
    assert set(again.table.columns) >= {"x_lo", "x_hi"}


def test_restore_snapshot_without_bias_energy_and_repeat_columns_starts_them_neutral():
    # A snapshot from before the bias, energy and repeat terms: restored streams continue
    # exactly as if their recent averages had been at the values expected under normal
    # behaviour (mean standardised residual 0, mean square 1) and no repeat had been seen.
    model = Model.random("gru", n_features=1, hidden=[8], seed=2)
    rng = np.random.default_rng(5)
    x = np.sin(np.arange(600) / 6.0) + rng.normal(0.0, 0.2, 600)
    ts = 1000 * np.arange(600, dtype=np.int64)
    first = Detector(model, threshold=0.5)
    first.process(["s"] * 300, x[:300, None], ts[:300])
    upgraded = Detector.restore(model, _older_snapshot(first, ("err_bias", "err_energy", "x_last", "rep")), threshold=0.5)
    slot = upgraded.table.lookup(["s"])
    assert upgraded.table.column("err_bias")[slot].tolist() == [[0.0]]
    assert upgraded.table.column("err_energy")[slot].tolist() == [1.0]
    by_hand = Detector.restore(model, first.snapshot(), threshold=0.5)
    by_hand.table.column("err_bias")[slot] = 0.0
    by_hand.table.column("err_energy")[slot] = 1.0
    by_hand.table.column("x_last")[slot] = np.nan
    by_hand.table.column("rep")[slot] = 0.0
    a = upgraded.process(["s"] * 300, x[300:, None], ts[300:])
    b = by_hand.process(["s"] * 300, x[300:, None], ts[300:])
    np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(a.alert, b.alert)
    assert np.isfinite(a.score).all()


def test_restore_snapshot_missing_other_column_is_refused():
    model = Model.random("gru", n_features=1, hidden=[4], seed=0)
    det = Detector(model)
    det.process(["a"], np.ones((1, 1)), np.zeros(1, np.int64))
    with pytest.raises(Exception, match="err_var"):
        Detector.restore(model, _older_snapshot(det, dropped=("err_var",)))


def test_engine_classes_are_public_names_of_the_package():
    # The contract: streamrnn.Model, streamrnn.StreamTable, streamrnn.Detector.
    import streamrnn
    from streamrnn.state import StreamTable

    assert streamrnn.Detector is Detector
    assert streamrnn.StreamTable is StreamTable
    assert {"Model", "Detector", "StreamTable"} <= set(streamrnn.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Detectr'"):
        streamrnn.Detectr  # noqa: B018
    out = subprocess.run([sys.executable, "-c", "from streamrnn import Detector, Model, StreamTable; "
                          "print(Detector.__name__, Model.__name__, StreamTable.__name__)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Detector", "Model", "StreamTable"]


# ----------------------------------------------------------------- a --time-delta model's dt
GAP_MS = 10_000


def _td_model(seed=0, max_gap_ms=GAP_MS, **hyper):
    """A model as ``train --time-delta --max-gap-ms`` writes it: last feature 'dt'."""
    model = Model.random("gru", n_features=3, hidden=[8], seed=seed, feature_names=["a", "b", "dt"],
                         training={"hyper_parameters": {"time_delta": True, "max_gap_ms": max_gap_ms, **hyper}})
    model.scaler_mean[:] = [0.5, -1.0, 1.7]
    model.scaler_scale[:] = [2.0, 0.5, 1.3]
    return model


def _irregular(n_streams, length, seed):
    """Streams with irregular steps (0.2-3.1 s) and a few gaps over GAP_MS, in a random
    global arrival order; values are the two inputs (no dt)."""
    rng = np.random.default_rng(seed)
    streams = {}
    for i in range(n_streams):
        steps = rng.integers(200, 3100, length)
        steps[rng.random(length) < 0.05] = GAP_MS + 1 + rng.integers(0, 30_000)
        steps[rng.integers(1, length)] = GAP_MS  # exactly max_gap_ms: no split, as in training
        ts = 1_700_000_000_000 + np.cumsum(steps)
        streams[f"s{i}"] = (ts, np.sin(ts[:, None] / (4000.0 + 500 * i) + np.array([0.0, 1.0])))
    order = np.concatenate([[sid] * length for sid in streams])
    rng.shuffle(order)
    pos = dict.fromkeys(streams, 0)
    ids, vals, ts = [], [], []
    for sid in order:
        k = pos[sid]
        ids.append(str(sid))
        ts.append(streams[sid][0][k])
        vals.append(streams[sid][1][k])
        pos[sid] = k + 1
    return streams, ids, np.array(vals), np.array(ts, np.int64)


def _training_inputs(ts, values):
    """What training feeds the network for one stream: data._with_dt per _split_gaps segment."""
    from streamrnn.data import _split_gaps, _with_dt

    return np.concatenate([_with_dt(ts[seg], values[seg]) for seg in _split_gaps(ts, GAP_MS)])


def _plain_twin(model):
    """The same weights and scaler as an ordinary model: its dt is an input like the others."""
    import copy

    twin = copy.copy(model)
    twin.training = {}
    return twin


def test_time_delta_model_derives_dt_as_training_does_and_scores_as_if_given():
    model = _td_model(seed=40)
    streams, ids, x, ts = _irregular(4, 120, seed=40)
    det = Detector(model)
    assert det.config.max_gap_ms == GAP_MS  # from the model's training
    out = det.process(ids, x, ts)
    assert out.values.shape == (len(ids), 3) and out.applied.all()
    ids_arr = np.array(ids)
    full = np.empty((len(ids), 3))
    for sid, (s_ts, s_x) in streams.items():
        rows = np.flatnonzero(ids_arr == sid)
        want = _training_inputs(s_ts, s_x)
        assert np.array_equal(out.values[rows], want)  # the dt column bit for bit, incl. 0 after gaps
        assert (want[1:, 2] == 0).any() and (want[:, 2] == GAP_MS / 1000).any(), "the data must have gaps"
        full[rows] = want
    assert det.counters["gap_resets"] == sum((np.diff(s[0]) > GAP_MS).sum() for s in streams.values())
    # The network gets what an ordinary model gets from an explicit column of training's dt.
    ref = Detector(_plain_twin(model), max_gap_ms=GAP_MS).process(ids, full, ts)
    for name in ("prediction", "error", "score", "alert"):
        assert np.array_equal(getattr(out, name), getattr(ref, name), equal_nan=True), name


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_time_delta_streaming_in_random_micro_batches_equals_one_batch(seed):
    model = _td_model(seed=41)
    _, ids, x, ts = _irregular(5, 80, seed=seed)
    whole = Detector(model).process(ids, x, ts)
    rng = np.random.default_rng(seed)
    det = Detector(model)
    bounds = [0, *sorted(rng.choice(np.arange(1, len(ids)), 25, replace=False)), len(ids)]
    parts = [det.process(ids[a:b], x[a:b], ts[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    for name in ("values", "prediction", "score"):
        got = np.concatenate([getattr(p, name) for p in parts])
        assert np.array_equal(got, getattr(whole, name), equal_nan=True), name


def test_time_delta_snapshot_restore_continues_with_the_right_dt():
    model = _td_model(seed=42)
    streams, ids, x, ts = _irregular(3, 60, seed=42)
    whole = Detector(model).process(ids, x, ts)
    half = len(ids) // 2
    first = Detector(model)
    first.process(ids[:half], x[:half], ts[:half])
    second = Detector.restore(model, first.snapshot())
    rest = second.process(ids[half:], x[half:], ts[half:])
    assert np.array_equal(rest.values, whole.values[half:])
    assert np.array_equal(rest.prediction, whole.prediction[half:], equal_nan=True)
    assert np.array_equal(rest.score, whole.score[half:], equal_nan=True)
    # A stream's first event after the restore counts from its last event before it.
    last = {i: t for i, t in zip(ids[:half], ts[:half])}
    firsts = {}
    for k in range(half, len(ids)):
        firsts.setdefault(ids[k], k)
    checked = 0
    for sid, k in firsts.items():
        if ts[k] - last[sid] <= GAP_MS:
            assert rest.values[k - half, 2] == (ts[k] - last[sid]) / 1000.0 > 0
            checked += 1
    assert checked, "the test needs a stream continuing without a gap"


def test_time_delta_rules_at_edges():
    model = _td_model(seed=43)
    t0 = 1_700_000_000_000
    x = np.array([[1.0, 2.0], [1.1, 2.1], [np.nan, 2.2], [1.3, 2.3], [1.4, 2.4], [1.5, 2.5]])
    ts = t0 + np.array([0, 1500, 2000, 2750, 2750 + GAP_MS + 1, 2750 + GAP_MS + 1 + 250])
    out = Detector(model).process(["a"] * 6, x, ts)
    # 0 at the start; a missing event is not applied (dt NaN) and the next counts from the
    # last applied one; 0 after a gap over max_gap_ms.
    assert np.array_equal(out.values[:, 2], [0.0, 1.5, np.nan, 1.25, 0.0, 0.25], equal_nan=True)
    # Under gap_policy "decay" the event after a gap is a segment start too.
    dec = Detector(model, gap_policy="decay").process(["a"] * 6, x, ts)
    assert dec.values[4, 2] == 0.0 and np.array_equal(dec.values, out.values, equal_nan=True)
    # A max_gap_ms set in the scoring config wins over the training one.
    wide = Detector(model, max_gap_ms=GAP_MS + 1).process(["a"] * 6, x, ts)
    assert wide.values[4, 2] == (GAP_MS + 1) / 1000.0
    # A late event the config accepts gets dt 0 (training sorted its rows: never negative).
    late = Detector(model, out_of_order="accept").process(["a"] * 3, x[[0, 1, 3]], t0 + np.array([0, 2000, 1000]))
    assert late.values[:, 2].tolist() == [0.0, 2.0, 0.0]
    # An event at the last applied ts is not applied (dt NaN); the next counts from the kept one.
    same = Detector(model).process(["a"] * 4, x[[0, 1, 3, 5]], t0 + np.array([0, 1500, 1500, 2750]))
    assert np.array_equal(same.values[:, 2], [0.0, 1.5, np.nan, 1.25], equal_nan=True)
    # A model trained without --max-gap-ms: no gap restarts dt.
    nogap = Detector(_td_model(seed=43, max_gap_ms=None))
    assert nogap.config.max_gap_ms is None
    assert nogap.process(["a"] * 6, x, ts).values[4, 2] == (GAP_MS + 1) / 1000.0


def test_time_delta_given_dt_column_is_replaced_and_bad_shapes_say_what_is_derived():
    model = _td_model(seed=44)
    _, ids, x, ts = _irregular(2, 40, seed=44)
    plain = Detector(model).process(ids, x, ts)
    given = np.column_stack([x, np.full(len(ids), 123.0)])  # a dt column computed some other way
    withcol = Detector(model).process(ids, given, ts)
    assert np.array_equal(withcol.values, plain.values) and np.array_equal(withcol.score, plain.score, equal_nan=True)
    assert given[0, 2] == 123.0  # the caller's array is not written to
    with pytest.raises(StreamrnnError, match=r"shape \(events, 2\).*'dt' is derived from the timestamps"):
        Detector(model).process(ids, x[:, :1], ts)
    one = Model.random("gru", n_features=2, hidden=[4], feature_names=["value", "dt"],
                       training={"hyper_parameters": {"time_delta": True}})
    assert Detector(one).process(["a", "a"], np.array([1.0, 2.0]), np.array([0, 3000])).values[1].tolist() == [2.0, 3.0]


def test_inspect_names_the_features_a_caller_supplies_and_the_derived_dt(tmp_path):
    import json

    from typer.testing import CliRunner

    from streamrnn.cli import app

    _td_model(seed=45).save(tmp_path / "td.safetensors")
    Model.random("gru", n_features=2, hidden=[4], feature_names=["a", "dt"]).save(tmp_path / "plain.safetensors")
    runner = CliRunner()
    td = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "td.safetensors")]).output)
    assert td["input_features"] == ["a", "b"] and td["feature_names"] == ["a", "b", "dt"]
    assert list(td["derived_features"]) == ["dt"] and "derived from the timestamps" in td["derived_features"]["dt"]
    plain = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "plain.safetensors")]).output)
    assert plain["input_features"] == ["a", "dt"] and "derived_features" not in plain


def test_time_delta_is_read_from_the_training_record_only():
    from streamrnn.detector import input_features, time_delta_column

    assert time_delta_column(_td_model()) == 2 and input_features(_td_model()) == ["a", "b"]
    named = Model.random("gru", n_features=2, hidden=[4], feature_names=["value", "dt"])  # no --time-delta
    assert time_delta_column(named) is None and input_features(named) == ["value", "dt"]
    odd = Model.random("gru", n_features=2, hidden=[4], feature_names=["value", "gap"],
                       training={"hyper_parameters": {"time_delta": True}})
    with pytest.raises(StreamrnnError, match="trained with --time-delta but its last feature is 'gap'"):
        Detector(odd)
    for training in ({}, {"hyper_parameters": None}, {"hyper_parameters": {"time_delta": False}}):
        named.training = training
        assert time_delta_column(named) is None
