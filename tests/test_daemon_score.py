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
