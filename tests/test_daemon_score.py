"""The daemon's last line against bad input: a decoded batch the detector refuses is split
by message; the refused messages become dead letters and the rest score as if alone."""

from __future__ import annotations

import numpy as np

from daemon.codec import DecodedBatch, Rejected, event_offset
from daemon.loop import score_batch
from streamrnn.detector import Detector
from streamrnn.model import Model


def _batch(events):
    """events: (stream, ts, value, message offset, index in message)."""
    ids, ts, x, off = zip(*[(s, t, v, event_offset(m, j)) for s, t, v, m, j in events])
    return DecodedBatch(list(ids), np.array(ts, np.int64), np.array(x, np.float64)[:, None],
                        np.array(off, np.int64), len({e[3] for e in events}))


def test_refused_batch_is_split_by_message_and_the_rest_scores_as_alone():
    model = Model.random("gru", n_features=1, hidden=[8], seed=3)
    good = [("a", 1000, 1.0, 10, 0), ("b", 1000, 2.0, 10, 1), ("a", 2000, 1.5, 12, 0)]
    bad = [("c", 1000, 3.0, 11, 0), ("", 1000, 4.0, 11, 1)]  # an empty id: the detector refuses it
    det = Detector(model)
    out = score_batch(det, _batch(good[:2] + bad + good[2:]), [10, 11, 12])
    assert [type(r).__name__ for r in out] == ["ScoredBatch", "Rejected", "ScoredBatch"]
    assert out[1].index == 1 and "refused by the detector" in out[1].reason and "non-empty" in out[1].reason
    # The refused message changed nothing: no stream 'c', and the good events score exactly
    # as a detector that never saw it.
    assert sorted(det.table.ids()) == ["a", "b"]
    ref = Detector(model)
    want = [ref.process(*_cols(_batch(good[:2]))), ref.process(*_cols(_batch(good[2:])))]
    for got, exp in zip([out[0], out[2]], want):
        assert got.stream_ids == exp.stream_ids
        np.testing.assert_array_equal(got.prediction, exp.prediction)
        np.testing.assert_array_equal(got.score, exp.score)


def test_accepted_batch_is_one_call():
    model = Model.random("gru", n_features=1, hidden=[8], seed=3)
    out = score_batch(Detector(model), _batch([("a", 1000, 1.0, 10, 0), ("a", 2000, 1.0, 11, 0)]), [10, 11])
    assert len(out) == 1 and not isinstance(out[0], Rejected) and len(out[0].stream_ids) == 2


def _cols(b):
    return b.stream_ids, b.values, b.timestamps, b.offsets


def test_count_reads_each_counter_as_the_counters_dict_does():
    """The loop reads ``replay_skipped`` per call through ``Detector.count``: every counter
    must read as in ``counters`` after batches that move them (cold starts, missing values,
    replayed offsets, late events), and an unknown name is an error, not a zero."""
    import pytest

    from streamrnn.detector import COUNTERS
    from streamrnn.errors import StreamrnnError

    det = Detector(Model.random("gru", n_features=1, hidden=[8], seed=3))
    det.process(["a", "b", "a"], np.array([1.0, 2.0, np.nan]), np.array([1000, 1000, 2000]),
                offsets=np.array([5, 6, 7]))
    det.process(["a", "b", "b"], np.array([1.0, 2.0, 3.0]), np.array([3000, 500, 4000]), offsets=np.array([5, 8, 9]))
    counters = det.counters
    assert counters["replay_skipped"] == 1 and counters["missing"] == 1 and counters["cold_starts"] == 2
    assert {k: det.count(k) for k in COUNTERS} == counters
    with pytest.raises(StreamrnnError, match="no counter"):
        det.count("replayed")
