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


def test_process_scores_match_direct_numpy_computation():
    model = Model.random("gru", n_features=2, hidden=[8], seed=4, scaler_scale=[2.0, 0.5])
    streams = _streams(3, 60, 2, seed=5)
    ids, vals, ts = _interleave(streams, np.random.default_rng(6))
    det = Detector(model, error_alpha=0.05)
    got = _run(det, ids, vals, ts, cuts=[17, 50, 51, 120])
    for sid, x in streams.items():
        pred = model.predict(x)[:-1].astype(np.float64)
        err = np.sqrt((((x[1:] - pred) / [2.0, 0.5]) ** 2).mean(axis=1))
        mu = var = 0.0
        scores = [np.nan]
        for k, e in enumerate(err):
            if k == 0:
                scores.append(np.nan)
                mu, var = e, 0.0
                continue
            scores.append((e - mu) / np.sqrt(var + 1e-12))
            a = max(0.05, 1 / (k + 1))
            mu, var = mu + a * (e - mu), (1 - a) * (var + a * (e - mu) ** 2)
        np.testing.assert_allclose(got[sid][1][1:], err, rtol=2e-5)
        np.testing.assert_allclose(got[sid][2], scores, rtol=1e-3, atol=1e-4)


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
    assert det_gap.events_missing == 1


def test_process_spike_after_warmup_alerts_and_not_during_warmup():
    model = Model.random("gru", n_features=1, hidden=[8], seed=10)
    det = Detector(model, warmup=20, threshold=6.0)
    x = 0.01 * np.random.default_rng(0).standard_normal(200)
    x[5] = 50.0  # inside warm-up
    x[150] = 50.0
    alerts = [det.process(["a"], [[v]], [k]).alert[0] for k, v in enumerate(x)]
    assert alerts[150] and not alerts[5]
    assert sum(alerts) <= 3  # the spike and at most the echo of stepping on it


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
